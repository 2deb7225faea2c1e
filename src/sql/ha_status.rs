//! `status()->'ha'`: this server's role and timeline, whether the relay's
//! slot would survive a failover, the standbys the relay waits for, the
//! publish gate's delay and the last gap in the history (README: High
//! availability).

use crate::compat::FAILOVER_SLOTS;
use crate::ha::{self, Standby};
use crate::shmem;
use crate::sql::select_one;
use changerelay_core::ha::SlotInfo;
use changerelay_core::lsn::lsn_to_string;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// The `ha` object; `slot`: the `to_jsonb()` of the relay slot's row in
/// `pg_replication_slots` (`null` when it does not exist).
pub fn ha(slot: &Value) -> Value {
    let standby = ha::in_recovery();
    let (names, from) = ha::standby_slot_names();
    let standbys = if standby { Vec::new() } else { ha::standbys(&names) };
    let info = (!slot.is_null()).then(|| SlotInfo::from_json(slot));
    let (ready, why) = if standby {
        ready_on_standby(info.as_ref())
    } else {
        ready_on_primary(info.as_ref(), &names, &standbys)
    };
    // The tables of this version (before ALTER EXTENSION ... UPDATE they do not exist yet).
    let current = select_one::<bool>(
        "SELECT extversion = $1 FROM pg_catalog.pg_extension WHERE extname = 'pg_changerelay'",
        &[env!("CARGO_PKG_VERSION").into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    let (mark, last_gap, gaps) = if current {
        let mark = query(
            "SELECT pg_catalog.jsonb_build_object('timeline', h.timeline, 'decoded_upto',
                    greatest(h.decoded_upto, (SELECT CASE WHEN is_called THEN last_value END
                                                FROM changerelay.decoded_mark)))
               FROM changerelay.history_horizon h",
        );
        let last_gap = query(
            "SELECT pg_catalog.to_jsonb(g) - 'event_id'
                    || pg_catalog.jsonb_build_object('starts_at_event_id', g.event_id)
               FROM changerelay.history_gaps g ORDER BY g.event_id DESC LIMIT 1",
        );
        let gaps = select_one::<i64>("SELECT count(*) FROM changerelay.history_gaps", &[])
            .ok()
            .flatten();
        (mark, last_gap, gaps)
    } else {
        (Value::Null, Value::Null, None)
    };
    let history_tli = mark.get("timeline").and_then(Value::as_u64);
    let tli = ha::current_timeline();
    json!({
        "role": if standby { "standby" } else { "primary" },
        "timeline": tli,
        "history_timeline": history_tli,
        "failover_slots": FAILOVER_SLOTS,
        "failover_ready": ready,
        "failover_ready_detail": why,
        "standby_slots": {
            "source": from.as_str(),
            "names": names,
            "slots": if standby { Value::Null } else { Value::from(standbys.iter().map(standby_json).collect::<Vec<_>>()) },
        },
        "publish_gate": gate(),
        "confirm": {
            "decoded_upto": lsn_or_null(mark.get("decoded_upto").and_then(Value::as_u64).unwrap_or(0)),
            "waiting_for_lsn": lsn_or_null(load(|s| s.status.confirm_waiting_lsn.load(Ordering::Acquire))),
        },
        "last_gap": last_gap,
        "gaps": gaps,
    })
}

fn query(sql: &str) -> Value {
    select_one::<JsonB>(sql, &[])
        .ok()
        .flatten()
        .map_or(Value::Null, |j| j.0)
}

fn load(f: impl FnOnce(&shmem::Shared) -> u64) -> u64 {
    shmem::shared().map_or(0, f)
}

fn lsn_or_null(lsn: u64) -> Value {
    if lsn == 0 || lsn == u64::MAX {
        Value::Null
    } else {
        Value::from(lsn_to_string(lsn))
    }
}

fn gate() -> Value {
    let Some(s) = shmem::shared() else { return Value::Null };
    let st = &s.status;
    let since = st.gate_held_since_us.load(Ordering::Acquire);
    let delay_ms = if since > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(since);
        Value::from(((now - since).max(0) as f64 / 1000.0 * 10.0).round() / 10.0)
    } else {
        Value::from(0.0)
    };
    json!({
        "enabled": crate::gucs::publish_gate(),
        "active": st.gate_active.load(Ordering::Acquire),
        "ready": st.published_valid.load(Ordering::Acquire),
        "published_event_id": st.published_event_id.load(Ordering::Acquire),
        "delay_ms": delay_ms,
        "waiting_for_lsn": lsn_or_null(st.gate_waiting_lsn.load(Ordering::Acquire)),
    })
}

fn standby_json((name, state): &(String, Standby)) -> Value {
    // SAFETY: reads the WAL flush position from shared memory.
    let flush = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
    match state {
        Standby::Streaming { flushed, connected } => json!({
            "name": name, "state": "streaming", "connected": connected,
            "flushed_lsn": lsn_or_null(*flushed),
            "behind_bytes": if *flushed == 0 { Value::Null } else { Value::from(flush.saturating_sub(*flushed)) },
        }),
        Standby::Missing => json!({"name": name, "state": "missing"}),
        Standby::Logical => json!({"name": name, "state": "not a physical slot"}),
        Standby::Invalidated => json!({"name": name, "state": "invalidated"}),
    }
}

/// On a standby: whether its copy of the slot can be used after promotion.
fn ready_on_standby(slot: Option<&SlotInfo>) -> (bool, String) {
    if !FAILOVER_SLOTS {
        return (
            false,
            "this major has no failover slots: promoting this standby makes clients resync".into(),
        );
    }
    let Some(s) = slot else {
        return (
            false,
            "no copy of the relay's slot here (sync_replication_slots, hot_standby_feedback, primary_slot_name and dbname in primary_conninfo are needed)".into(),
        );
    };
    if s.synced != Some(true) {
        return (false, "the slot here was not synchronized from the primary".into());
    }
    if let Some(why) = s.invalidated() {
        return (false, format!("the synchronized slot was invalidated ({why})"));
    }
    if s.temporary {
        return (false, "the synchronized slot is not sync-ready yet (temporary)".into());
    }
    (true, "the synchronized slot is sync-ready".into())
}

/// On the primary: whether, as far as it can tell, every standby has what
/// it needs (the synchronized copy itself is only visible on the standby).
fn ready_on_primary(slot: Option<&SlotInfo>, names: &[String], standbys: &[(String, Standby)]) -> (bool, String) {
    if !FAILOVER_SLOTS {
        return (
            false,
            "this major has no failover slots: a promoted standby makes clients resync".into(),
        );
    }
    let Some(s) = slot else {
        return (false, "the relay's slot does not exist".into());
    };
    if s.failover != Some(true) {
        return (false, "the relay's slot is not a failover slot".into());
    }
    if names.is_empty() {
        return (
            false,
            "no standby slots: set changerelay.standby_slots (or synchronized_standby_slots)".into(),
        );
    }
    for (name, state) in standbys {
        match state {
            Standby::Streaming {
                connected: true,
                flushed,
            } if *flushed >= s.confirmed_flush.unwrap_or(0) => {}
            Standby::Streaming { connected: true, .. } => {
                return (false, format!("standby slot \"{name}\" is behind the relay's slot"));
            }
            Standby::Streaming { .. } => return (false, format!("standby slot \"{name}\" is not connected")),
            _ => return (false, format!("standby slot \"{name}\" is not usable")),
        }
    }
    (
        true,
        "every standby slot is connected and has the slot's position; each standby's own status() says whether its copy is sync-ready".into(),
    )
}
