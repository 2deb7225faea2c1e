//! The worker's slot before decoding: it exists, is usable, is a failover
//! slot where the major has them, and agrees with the history; or the gap
//! between them is made explicit (README: High availability).
//!
//! A gap is recorded in `changerelay.history_gaps` and raises the history
//! horizon to where the new slot starts, in one transaction, after the new
//! slot exists; every cursor from before it then gets the error of the
//! gap's reason. It is logged once, as a WARNING. Should the worker stop
//! between creating the slot and recording the gap, the next start finds a
//! slot ahead of the history: a gap again, still explicit.

use crate::compat;
use crate::sql::select_one;
use crate::txn::try_transaction;
use changerelay_core::ha::{self, GapReason, HistoryMark, SlotAction, SlotInfo};
use changerelay_core::lsn::{lsn_to_string, parse_lsn};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

/// What the history knew when the slot was opened.
pub struct Opened {
    /// The position the history covers (the slot is never confirmed beyond
    /// it): 0 when unknown.
    pub decoded_upto: u64,
}

/// A gap whose new slot exists but whose record could not be written yet.
pub type PendingGap = Option<(GapReason, u64, u32)>;

/// Makes the slot usable, or returns why it can not be yet (the caller logs
/// it and retries later; `pending` then keeps a gap still to record).
/// `installed`: the extension is installed at this library's version, so
/// the history can be read and a gap recorded.
pub fn prepare(slot: &str, installed: bool, pending: &mut PendingGap) -> Result<Opened, String> {
    if let Some((reason, start, tli)) = pending.take() {
        if let Err(e) = record_gap(slot, &reason, start, tli) {
            *pending = Some((reason, start, tli));
            return Err(e);
        }
        return Ok(Opened { decoded_upto: start });
    }
    let tli = crate::ha::current_timeline();
    let (info, mark) = read(slot, installed)?;
    if let Some(i) = &info {
        if i.plugin != "pg_changerelay" {
            error!(
                "pg_changerelay relay: replication slot \"{slot}\" uses plugin \"{}\", not pg_changerelay; \
                 drop it or set changerelay.slot_name to another name",
                i.plugin
            );
        }
    }
    let mut decoded_upto = mark.and_then(|m| m.decoded_upto).unwrap_or(0);
    match ha::decide(info.as_ref(), mark.as_ref(), tli) {
        SlotAction::Use => {
            if compat::FAILOVER_SLOTS && info.as_ref().and_then(|i| i.failover) == Some(false) {
                enable_failover(slot);
            }
            if let Some(old) = mark.and_then(|m| m.timeline).filter(|&t| t != tli) {
                note_promotion(slot, old, tli);
            }
        }
        SlotAction::Create => {
            warn_if_unrecordable(slot, installed);
            create(slot)?;
        }
        SlotAction::Replace => {
            warn_if_unrecordable(slot, installed);
            drop_slot(slot)?;
            create(slot)?;
        }
        SlotAction::Gap(reason) => {
            if info.is_some() {
                drop_slot(slot)?;
            }
            let start = create(slot)?;
            if let Err(e) = record_gap(slot, &reason, start, tli) {
                *pending = Some((reason, start, tli));
                return Err(e);
            }
            decoded_upto = start;
        }
    }
    Ok(Opened { decoded_upto })
}

/// While the extension waits for `ALTER EXTENSION ... UPDATE`, its tables
/// have the old shape and a gap can not be recorded: a slot lost then, with
/// history already there, is only logged.
fn warn_if_unrecordable(slot: &str, installed: bool) {
    if installed {
        return;
    }
    let had_history = try_transaction(|| {
        let exists = select_one::<bool>("SELECT to_regclass('changerelay.history') IS NOT NULL", &[])
            .map_err(|e| e.to_string())?
            .unwrap_or(false);
        if !exists {
            return Ok(false);
        }
        select_one::<bool>("SELECT EXISTS (SELECT 1 FROM changerelay.history)", &[])
            .map(|b| b.unwrap_or(false))
            .map_err(|e| e.to_string())
    })
    .unwrap_or(false);
    if had_history {
        warning!(
            "pg_changerelay relay: replication slot \"{slot}\" is missing or unusable while the extension waits for \
             ALTER EXTENSION pg_changerelay UPDATE; changes since it was lost are missing from the history and \
             clients' cursors can not tell: reload clients after the update"
        );
    }
}

/// Promoted since the history was last written, and the slot came along:
/// notes the new timeline now, so that a slot lost later is not taken for
/// one lost in this promotion.
fn note_promotion(slot: &str, old: u32, tli: u32) {
    log!("pg_changerelay relay: this server was promoted (timeline {old} -> {tli}); continuing from slot \"{slot}\"");
    let noted = try_transaction(|| {
        pgrx::Spi::connect_mut(|c| {
            c.update(
                "UPDATE changerelay.history_horizon SET timeline = $1",
                None,
                &[i64::from(tli).into()],
            )
            .map(|_| ())
        })
        .map_err(|e| e.to_string())
    });
    if let Err(e) = noted {
        warning!("pg_changerelay relay: could not note the new timeline: {e}");
    }
}

/// The slot's row and the history's mark (`None` when not installed).
fn read(slot: &str, installed: bool) -> Result<(Option<SlotInfo>, Option<HistoryMark>), String> {
    let slot = slot.to_string();
    try_transaction(move || {
        let info = select_one::<pgrx::JsonB>(
            "SELECT pg_catalog.to_jsonb(s) FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = $1",
            &[slot.as_str().into()],
        )
        .map_err(|e| format!("could not read pg_replication_slots: {e}"))?
        .map(|j| SlotInfo::from_json(&j.0));
        if !installed {
            return Ok((info, None));
        }
        let mark = select_one::<pgrx::JsonB>(
            "SELECT pg_catalog.jsonb_build_object(
                    'decoded_upto', greatest(h.decoded_upto, m.mark), 'timeline', h.timeline,
                    'has_history', h.applied > 0 OR h.decoded_upto IS NOT NULL OR m.mark IS NOT NULL
                                   OR EXISTS (SELECT 1 FROM changerelay.history))
               FROM changerelay.history_horizon h,
                    (SELECT CASE WHEN is_called THEN last_value END AS mark FROM changerelay.decoded_mark) m",
            &[],
        )
        .map_err(|e| format!("could not read changerelay.history_horizon: {e}"))?
        .map(|j| {
            let v = &j.0;
            HistoryMark {
                decoded_upto: v.get("decoded_upto").and_then(serde_json::Value::as_u64),
                timeline: v.get("timeline").and_then(serde_json::Value::as_u64).map(|t| t as u32),
                has_history: v
                    .get("has_history")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
            }
        });
        Ok((info, Some(mark.unwrap_or_default())))
    })
}

/// Creates the slot (a failover slot on 17+); returns where it starts.
fn create(slot: &str) -> Result<u64, String> {
    log!("pg_changerelay relay: creating logical replication slot \"{slot}\"");
    let name = slot.to_string();
    let start =
        BackgroundWorker::transaction(move || select_one::<String>(compat::CREATE_SLOT_SQL, &[name.as_str().into()]));
    match start {
        Ok(Some(lsn)) => parse_lsn(&lsn).ok_or_else(|| format!("slot \"{slot}\" was created at \"{lsn}\"?")),
        Ok(None) => Err(format!("creating slot \"{slot}\" returned nothing")),
        Err(e) => error!("pg_changerelay relay: could not create slot \"{slot}\": {e}"),
    }
}

fn drop_slot(slot: &str) -> Result<(), String> {
    log!("pg_changerelay relay: dropping unusable replication slot \"{slot}\"");
    let name = slot.to_string();
    try_transaction(move || {
        select_one::<String>(
            "SELECT pg_catalog.pg_drop_replication_slot($1)::text",
            &[name.as_str().into()],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    })
    .map_err(|e| format!("could not drop replication slot \"{slot}\": {e}"))
}

/// Makes the existing slot a failover slot (17+). A failure is logged and
/// the worker goes on with a slot that does not survive failover (status()
/// shows `failover: false`).
fn enable_failover(slot: &str) {
    let Ok(name) = std::ffi::CString::new(slot) else { return };
    let done = try_transaction(|| {
        // SAFETY: the worker holds no slot yet (the decoder is not open) and
        // is not in recovery (it starts after recovery ends); an error is
        // caught by the transaction, and a slot it left acquired is
        // released below.
        unsafe { compat::enable_failover(&name) };
        Ok(())
    });
    // SAFETY: an error inside ReplicationSlotAlter may leave the slot
    // acquired by this process; releasing it is what error recovery in a
    // regular backend does.
    unsafe {
        if !pgrx::pg_sys::MyReplicationSlot.is_null() {
            pgrx::pg_sys::ReplicationSlotRelease();
        }
    }
    match done {
        Ok(()) => log!("pg_changerelay relay: replication slot \"{slot}\" is now a failover slot"),
        Err(e) => warning!(
            "pg_changerelay relay: could not make replication slot \"{slot}\" a failover slot, so it will not \
             survive a failover: {e}"
        ),
    }
}

/// Records the gap and raises the horizon to the new slot's start.
fn record_gap(slot: &str, reason: &GapReason, start: u64, tli: u32) -> Result<(), String> {
    let detail = reason.detail(slot);
    let code = reason.code();
    let at = start.min(i64::MAX as u64) as i64;
    let d = detail.clone();
    try_transaction(move || {
        pgrx::Spi::connect_mut(|c| {
            c.update(
                "INSERT INTO changerelay.history_gaps (event_id, reason, detail, timeline)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING",
                None,
                &[at.into(), code.into(), d.as_str().into(), i64::from(tli).into()],
            )?;
            c.update(
                "UPDATE changerelay.history_horizon
                    SET event_id = greatest(event_id, $1), decoded_upto = greatest(coalesce(decoded_upto, 0), $1),
                        timeline = $2",
                None,
                &[at.into(), i64::from(tli).into()],
            )
            .map(|_| ())
        })
        .map_err(|e| e.to_string())
    })
    .map_err(|e| format!("could not record a gap in the change history ({detail}): {e}"))?;
    warning!(
        "pg_changerelay relay: the change history has a gap: {detail}; a new slot starts at {}. \
         Clients following cursors from before it get an error (SQLSTATE 72000) telling them to reload and \
         continue from changerelay.current_cursor(); see changerelay.status()->'ha'->'last_gap'",
        lsn_to_string(start)
    );
    Ok(())
}
