//! What the relay worker and the SQL functions need to know about this
//! server's place in a replicated cluster: whether it is a standby, its
//! timeline and that timeline's history, and how far the standbys the relay
//! waits for have flushed WAL (read from their physical slots).

use changerelay_core::timeline::{self, TimelineEntry};
use pgrx::pg_sys;
use std::ffi::CString;

/// Whether this server is a standby (in recovery).
pub fn in_recovery() -> bool {
    // SAFETY: reads shared recovery state; callable in any backend.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// The timeline this server is on: the one it writes WAL on, or on a
/// standby the one it is replaying.
pub fn current_timeline() -> u32 {
    // SAFETY: both read shared memory. GetWALInsertionTimeLine is only
    // valid once recovery has ended, hence the check.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            let mut tli: pg_sys::TimeLineID = 0;
            pg_sys::GetXLogReplayRecPtr(&mut tli);
            tli
        } else {
            pg_sys::GetWALInsertionTimeLine()
        }
    }
}

/// The history of timeline `tli`, read from `pg_wal/<TLI>.history` in the
/// data directory (the server's working directory), the file PostgreSQL
/// writes at promotion and a standby fetches when it follows a new
/// timeline. `None` when the file is missing (timeline 1 has none).
pub fn timeline_history(tli: u32) -> Option<Vec<TimelineEntry>> {
    if tli <= 1 {
        return Some(timeline::parse_history("", tli));
    }
    let text = std::fs::read_to_string(format!("pg_wal/{tli:08X}.history")).ok()?;
    Some(timeline::parse_history(&text, tli))
}

/// Where the standby slots come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotsFrom {
    Setting,
    SynchronizedStandbySlots,
    None,
}

impl SlotsFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotsFrom::Setting => "changerelay.standby_slots",
            SlotsFrom::SynchronizedStandbySlots => "synchronized_standby_slots",
            SlotsFrom::None => "none",
        }
    }
}

/// The physical slots of the standbys the relay waits for:
/// `changerelay.standby_slots`, or when empty PostgreSQL's
/// `synchronized_standby_slots` (17+; older servers do not know it).
pub fn standby_slot_names() -> (Vec<String>, SlotsFrom) {
    let own = split_names(&crate::gucs::standby_slots());
    if !own.is_empty() {
        return (own, SlotsFrom::Setting);
    }
    // SAFETY: GetConfigOption with missing_ok returns NULL for a setting this
    // server does not have, else a string owned by the GUC machinery that
    // is copied at once.
    let theirs = unsafe {
        let v = pg_sys::GetConfigOption(c"synchronized_standby_slots".as_ptr(), true, false);
        if v.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned()
        }
    };
    let theirs = split_names(&theirs);
    if theirs.is_empty() {
        (Vec::new(), SlotsFrom::None)
    } else {
        (theirs, SlotsFrom::SynchronizedStandbySlots)
    }
}

fn split_names(list: &str) -> Vec<String> {
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// One standby slot as the primary sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standby {
    /// No such slot: everything waits (as for synchronized_standby_slots).
    Missing,
    /// A logical slot was named: not a standby.
    Logical,
    /// PostgreSQL invalidated it: the standby can not catch up by streaming.
    Invalidated,
    /// Its standby has flushed WAL up to `flushed`; `connected`: a walsender
    /// holds the slot now.
    Streaming { flushed: u64, connected: bool },
}

/// Reads the named physical slots from shared memory.
pub fn standbys(names: &[String]) -> Vec<(String, Standby)> {
    // ReplicationSlotControlLock: the 38th individual LWLock (index 37 in
    // lwlocknames.h for 15, 17 and 18).
    const REPLICATION_SLOT_CONTROL_LOCK: usize = 37;
    let mut out = Vec::with_capacity(names.len());
    if names.is_empty() {
        return out;
    }
    // SAFETY: the lock keeps slots from being created or dropped while the
    // array is searched, as StandbySlotsHaveCaughtup() does; the fields are
    // read without the slot's spinlock, each an aligned word written whole
    // (a value may be a moment old, never torn). Nothing here can raise an
    // error while the lock is held: the names were made C strings first.
    unsafe {
        let c_names: Vec<(String, Option<CString>)> = names
            .iter()
            .map(|n| (n.clone(), CString::new(n.as_str()).ok()))
            .collect();
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(REPLICATION_SLOT_CONTROL_LOCK)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_SHARED);
        for (name, c_name) in c_names {
            let slot = match &c_name {
                Some(c) => pg_sys::SearchNamedReplicationSlot(c.as_ptr(), false),
                None => std::ptr::null_mut(),
            };
            let state = if slot.is_null() {
                Standby::Missing
            } else if std::ptr::read_volatile(&raw const (*slot).data.database) != pg_sys::InvalidOid {
                Standby::Logical
            } else if crate::compat::slot_invalidated(slot) {
                Standby::Invalidated
            } else {
                Standby::Streaming {
                    flushed: std::ptr::read_volatile(&raw const (*slot).data.restart_lsn),
                    connected: std::ptr::read_volatile(&raw const (*slot).active_pid) != 0,
                }
            };
            out.push((name, state));
        }
        pg_sys::LWLockRelease(lock);
    }
    out
}

/// How far every standby has flushed: the oldest of their positions;
/// `Some(u64::MAX)` when there are none to wait for, `None` when one is
/// missing, not physical or invalidated (then nothing is released).
pub fn flushed_by_all(standbys: &[(String, Standby)]) -> Option<u64> {
    let mut oldest = u64::MAX;
    for (_, s) in standbys {
        match s {
            Standby::Streaming { flushed, .. } => oldest = oldest.min(*flushed),
            _ => return None,
        }
    }
    Some(oldest)
}
