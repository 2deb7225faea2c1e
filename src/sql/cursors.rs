//! Cursors: positions in the change history, `current_cursor()`, and the
//! checks every cursor a client hands back goes through (this cluster,
//! inside the retention window, not ahead of this server).

use crate::errors::raise;
use crate::shmem;
use crate::sql::{require_preloaded, select_one};
use changerelay_core::cursor::Cursor;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;

/// This cluster's identity, as cursors carry it.
pub fn cluster() -> (u64, u32) {
    // SAFETY: reading control data on the main thread.
    unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::GetWALInsertionTimeLine()) }
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

pub fn horizon() -> u64 {
    select_one::<i64>("SELECT event_id FROM changerelay.history_horizon", &[])
        .ok()
        .flatten()
        .unwrap_or(0)
        .max(0) as u64
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
}

impl CursorProblem {
    pub fn message(&self) -> String {
        match self {
            CursorProblem::Malformed(e) => format!("invalid cursor: {e}"),
            CursorProblem::Foreign { .. } => "cursor belongs to another cluster".into(),
            CursorProblem::Expired { .. } => "cursor is older than the history retention window".into(),
            CursorProblem::Ahead => "cursor is ahead of this server".into(),
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

/// Parses and checks a cursor: from this cluster, inside the retention
/// window, not ahead of this server.
pub fn validate_cursor(text: &str) -> Result<Cursor, CursorProblem> {
    let cursor = Cursor::decode(text).map_err(|e| CursorProblem::Malformed(e.to_string()))?;
    let (system_id, _) = cluster();
    if cursor.system_id != system_id {
        return Err(CursorProblem::Foreign {
            theirs: cursor.system_id,
            ours: system_id,
        });
    }
    not_expired(&cursor)?;
    if cursor.event_id > newest_event() {
        return Err(CursorProblem::Ahead);
    }
    Ok(cursor)
}

pub fn check_cursor(text: &str) -> Cursor {
    validate_cursor(text).unwrap_or_else(|p| p.raise())
}

/// Errors when history after `cursor` has been pruned.
pub fn not_expired(cursor: &Cursor) -> Result<(), CursorProblem> {
    let h = horizon();
    if cursor.position() < (h, Cursor::END) {
        return Err(CursorProblem::Expired {
            horizon: h,
            at: cursor.event_id,
        });
    }
    Ok(())
}

pub fn current() -> Cursor {
    let (system_id, timeline) = cluster();
    Cursor {
        system_id,
        timeline,
        event_id: newest_event().max(horizon()),
        pos: Cursor::END,
    }
}

/// The position after everything the relay worker has applied.
#[pg_extern(volatile, parallel_safe)]
fn current_cursor() -> String {
    require_preloaded();
    current().encode()
}
