//! Cursors: positions in the change history, `current_cursor()`, and the
//! checks every cursor a client hands back goes through: this cluster, a
//! timeline this server's history still shares up to the cursor, after any
//! gap and inside the retention window, not ahead of this server.

use crate::errors::raise;
use crate::ha;
use crate::shmem;
use crate::sql::{require_preloaded, select_one};
use changerelay_core::cursor::Cursor;
use changerelay_core::lsn::lsn_to_string;
use changerelay_core::timeline::{self, TimelineProblem};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long `current_cursor()` waits, after a server start with the publish
/// gate on, for the worker to see the standbys catch up.
const PUBLISHED_WAIT: Duration = Duration::from_secs(10);

/// This cluster's identity, as cursors carry it: the system identifier
/// (shared by a primary and its standbys) and the current timeline.
pub fn cluster() -> (u64, u32) {
    // SAFETY: reading control data on the main thread.
    let system_id = unsafe { pg_sys::GetSystemIdentifier() };
    (system_id, ha::current_timeline())
}

fn cursor_hint() -> &'static str {
    "Reload the state you derive from changes (for example changerelay.version_map()), then continue from changerelay.current_cursor()."
}

/// The newest event the history knows: applied by the worker or stored.
fn newest_event() -> u64 {
    let applied = shmem::shared()
        .map(|s| s.status.last_event_id.load(Ordering::Acquire))
        .unwrap_or(0);
    let stored = select_one::<i64>("SELECT applied FROM changerelay.history_horizon", &[])
        .ok()
        .flatten()
        .unwrap_or(0);
    applied.max(stored.max(0) as u64)
}

/// The newest event, for lag figures (never waits): what readers may see,
/// or, while the publish gate does not know that yet, what was applied.
pub fn head_event() -> u64 {
    current_now().map_or_else(newest_event, |c| c.event_id)
}

pub fn horizon() -> u64 {
    select_one::<i64>("SELECT event_id FROM changerelay.history_horizon", &[])
        .ok()
        .flatten()
        .unwrap_or(0)
        .max(0) as u64
}

/// The newest event readers may see while the publish gate holds back what
/// the standbys do not have yet (`Some(0)` until the worker has seen them
/// catch up after a server start); `None`: no cap (no gate, or this server
/// is a standby, which shows what it has).
pub fn published_cap() -> Option<u64> {
    let s = shmem::shared()?;
    if ha::in_recovery() || !s.status.gate_active.load(Ordering::Acquire) {
        return None;
    }
    if !s.status.published_valid.load(Ordering::Acquire) {
        return Some(0);
    }
    Some(s.status.published_event_id.load(Ordering::Acquire))
}

/// The position after everything readers may see; `None` while the publish
/// gate does not know yet what that is (just after a server start).
pub fn current_now() -> Option<Cursor> {
    let newest = match published_cap() {
        None => newest_event(),
        Some(_) if !shmem::shared().is_some_and(|s| s.status.published_valid.load(Ordering::Acquire)) => {
            return None;
        }
        Some(published) => published,
    };
    let (system_id, timeline) = cluster();
    Some(Cursor {
        system_id,
        timeline,
        event_id: newest.max(horizon()),
        pos: Cursor::END,
    })
}

/// [`current_now`], waiting up to [`PUBLISHED_WAIT`] for the publish gate;
/// past it an error (`55000`) naming what holds it.
pub fn current() -> Cursor {
    let deadline = Instant::now() + PUBLISHED_WAIT;
    loop {
        if let Some(c) = current_now() {
            return c;
        }
        if Instant::now() >= deadline {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "the relay worker has not yet seen the standbys receive the change history",
                Some("With changerelay.publish_gate on, clients see only history every standby slot has flushed; since this server started, that has not been confirmed.".into()),
                "Check changerelay.status()->'ha' (a standby named in changerelay.standby_slots may be down or missing), then retry.",
            );
        }
        // SAFETY: waits on this backend's own latch; interrupts are served
        // right after.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                10,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
    }
}

/// Why a cursor cannot be used.
pub enum CursorProblem {
    /// Not a cursor at all (`invalid_parameter_value`).
    Malformed(String),
    /// Issued by another cluster.
    Foreign { theirs: u64, ours: u64 },
    /// History after it was pruned.
    Expired { horizon: u64, at: u64 },
    /// Newer than anything this server has applied.
    Ahead,
    /// The relay lost changes after it (`changerelay.history_gaps`).
    Gap {
        reason: String,
        detail: String,
        at: String,
        start: u64,
    },
    /// Issued on a timeline this server's history does not share up to it.
    Diverged {
        theirs: u32,
        ours: u32,
        problem: TimelineProblem,
    },
}

impl CursorProblem {
    pub fn message(&self) -> String {
        match self {
            CursorProblem::Malformed(e) => format!("invalid cursor: {e}"),
            CursorProblem::Foreign { .. } => "cursor belongs to another cluster".into(),
            CursorProblem::Expired { .. } => "cursor is older than the history retention window".into(),
            CursorProblem::Ahead => "cursor is ahead of this server".into(),
            CursorProblem::Gap { reason, .. } => changerelay_core::ha::gap_message(reason).into(),
            CursorProblem::Diverged { .. } => "cursor is on a timeline that diverged from this server's".into(),
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            CursorProblem::Malformed(_) => None,
            CursorProblem::Foreign { theirs, ours } => Some(format!(
                "The cursor was issued by system {theirs}; this is system {ours}."
            )),
            CursorProblem::Expired { horizon, at } => Some(format!(
                "History up to event {horizon} has been pruned (changerelay.history_retention); the cursor is at event {at}."
            )),
            CursorProblem::Ahead => {
                Some("The server was restored to an earlier point, or the cursor comes from elsewhere.".into())
            }
            CursorProblem::Gap {
                detail, at, start, ..
            } => Some(format!(
                "At {at}, {detail}; history continues from event {start} ({}).",
                lsn_to_string(*start)
            )),
            CursorProblem::Diverged { theirs, ours, problem } => Some(match problem {
                TimelineProblem::Diverged { switchpoint } => format!(
                    "The cursor is on timeline {theirs}, which this server (timeline {ours}) left at {}; the cursor is at or past that point, so it may have seen changes this server never had.",
                    lsn_to_string(*switchpoint)
                ),
                TimelineProblem::NotInHistory => format!(
                    "The cursor is on timeline {theirs}, which is not in the history of this server's timeline {ours} (another standby was promoted)."
                ),
                TimelineProblem::Newer => format!(
                    "The cursor is on timeline {theirs}, newer than this server's {ours}: another server was promoted and this one did not follow it."
                ),
            }),
        }
    }

    /// Raises the documented error for this problem.
    pub fn raise(&self) -> ! {
        match self {
            CursorProblem::Malformed(_) => raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                self.message(),
                None,
                "Pass a cursor returned by changerelay.changes(), watch() or current_cursor(), unchanged.",
            ),
            _ => raise(
                PgSqlErrorCode::ERRCODE_SNAPSHOT_TOO_OLD,
                self.message(),
                self.detail(),
                cursor_hint(),
            ),
        }
    }
}

/// Parses and checks a cursor: from this cluster, on a timeline this
/// server's history shares up to it, after any gap and inside the retention
/// window, not ahead of this server.
pub fn validate_cursor(text: &str) -> Result<Cursor, CursorProblem> {
    let cursor = Cursor::decode(text).map_err(|e| CursorProblem::Malformed(e.to_string()))?;
    let (system_id, current_tli) = cluster();
    if cursor.system_id != system_id {
        return Err(CursorProblem::Foreign {
            theirs: cursor.system_id,
            ours: system_id,
        });
    }
    if cursor.timeline != current_tli {
        let ours = ha::timeline_history(current_tli).unwrap_or_default();
        let theirs = (cursor.timeline > current_tli)
            .then(|| ha::timeline_history(cursor.timeline))
            .flatten();
        timeline::check(cursor.timeline, cursor.event_id, current_tli, &ours, theirs.as_deref()).map_err(
            |problem| CursorProblem::Diverged {
                theirs: cursor.timeline,
                ours: current_tli,
                problem,
            },
        )?;
    }
    not_expired(&cursor)?;
    if cursor.event_id > newest_event() && !may_arrive(cursor.event_id) {
        return Err(CursorProblem::Ahead);
    }
    Ok(cursor)
}

/// Whether the history may still catch up with an event it does not have
/// yet: a standby shows what it has replayed so far; a primary has the WAL
/// of the event (a promoted standby whose worker is decoding again what the
/// old primary had already shown, or a worker catching up).
fn may_arrive(event_id: u64) -> bool {
    if ha::in_recovery() {
        return true;
    }
    // SAFETY: reads the WAL flush position from shared memory.
    event_id <= unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) }
}

pub fn check_cursor(text: &str) -> Cursor {
    validate_cursor(text).unwrap_or_else(|p| p.raise())
}

/// Errors when history after `cursor` is gone: pruned, or lost in a gap.
pub fn not_expired(cursor: &Cursor) -> Result<(), CursorProblem> {
    let h = horizon();
    if cursor.position() >= (h, Cursor::END) {
        return Ok(());
    }
    if let Some(gap) = gap_after(cursor.event_id) {
        return Err(gap);
    }
    Err(CursorProblem::Expired {
        horizon: h,
        at: cursor.event_id,
    })
}

/// The latest gap whose new slot starts after `event_id`.
fn gap_after(event_id: u64) -> Option<CursorProblem> {
    let row = select_one::<pgrx::JsonB>(
        "SELECT pg_catalog.jsonb_build_object('reason', reason, 'detail', detail, 'at', recorded_at::text,
                                              'start', event_id)
           FROM changerelay.history_gaps WHERE event_id > $1 ORDER BY event_id DESC LIMIT 1",
        &[(event_id.min(i64::MAX as u64) as i64).into()],
    )
    .ok()
    .flatten()?;
    let v = &row.0;
    let text = |k: &str| v.get(k).and_then(serde_json::Value::as_str).unwrap_or("").to_string();
    Some(CursorProblem::Gap {
        reason: text("reason"),
        detail: text("detail"),
        at: text("at"),
        start: v.get("start").and_then(serde_json::Value::as_u64).unwrap_or(0),
    })
}

/// The position after everything the relay worker has published.
#[pg_extern(volatile, parallel_safe)]
fn current_cursor() -> String {
    require_preloaded();
    current().encode()
}
