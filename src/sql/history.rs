//! The change history: `current_cursor()`, `changes()` and `watch()`.
//!
//! History rows are written by the relay worker in the same transaction as
//! the versions. Row-level security on `changerelay.history` hands each row
//! only to roles that can SELECT its table. `watch()` sleeps on the shared
//! condition variable the worker broadcasts after each batch, and reads with
//! a fresh snapshot each time it wakes (READ COMMITTED).

use crate::errors::raise;
use crate::shmem;
use crate::sql::{require_preloaded, select_one};
use changerelay_core::cursor::Cursor;
use changerelay_core::filter::Filter;
use pgrx::datum::DatumWithOid;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::JsonB;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

extension_sql!(
    r#"
-- Every change of a tracked table, kept for changerelay.history_retention.
-- (event_id, pos) orders it in commit order and forms cursors.
CREATE TABLE changerelay.history (
    event_id bigint NOT NULL,
    pos int NOT NULL,
    seq int NOT NULL,
    ts bigint NOT NULL,
    xid bigint NOT NULL,
    relid oid NOT NULL,
    label text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL,
    identifier text,
    key jsonb,
    new jsonb,
    old jsonb,
    metadata jsonb,
    PRIMARY KEY (event_id, pos)
);
CREATE INDEX history_label ON changerelay.history (label, event_id, pos);
CREATE INDEX history_ts ON changerelay.history USING brin (ts);
ALTER TABLE changerelay.history ENABLE ROW LEVEL SECURITY;
CREATE POLICY history_readable ON changerelay.history FOR SELECT
    USING (coalesce(pg_catalog.has_table_privilege(relid, 'SELECT'), false));
-- event_id: history at or before (event_id, end of that transaction) has been
-- pruned. applied: the last transaction the relay worker applied; written in
-- the same transaction as its history, so a batch decoded again after a
-- crash is recognised and skipped instead of written twice.
CREATE TABLE changerelay.history_horizon (
    one bool PRIMARY KEY DEFAULT true CHECK (one),
    event_id bigint NOT NULL,
    applied bigint NOT NULL DEFAULT 0
);
INSERT INTO changerelay.history_horizon VALUES (true, 0, 0);
REVOKE ALL ON changerelay.history, changerelay.history_horizon FROM PUBLIC;
GRANT SELECT ON changerelay.history, changerelay.history_horizon TO PUBLIC;
"#,
    name = "history_tables",
    requires = ["tracking_tables"]
);

/// One row of `changes()`/`watch()`.
pub type ChangeRow = (
    String,
    i64,
    i32,
    i64,
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<JsonB>,
    Option<JsonB>,
    Option<JsonB>,
    Option<JsonB>,
);

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
    let stored = select_one::<i64>("SELECT max(event_id) FROM changerelay.history", &[])
        .ok()
        .flatten()
        .unwrap_or(0);
    applied.max(stored.max(0) as u64)
}

fn horizon() -> u64 {
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

fn check_cursor(text: &str) -> Cursor {
    validate_cursor(text).unwrap_or_else(|p| p.raise())
}

/// Errors when history after `cursor` has been pruned.
fn not_expired(cursor: &Cursor) -> Result<(), CursorProblem> {
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

/// Checks `labels` exist and that the caller may read every table of each.
fn check_labels(labels: &[String]) {
    for label in labels {
        if !crate::sql::label_known(label) {
            crate::sql::unknown_label(label);
        }
        crate::sql::check_label_access(label);
    }
}

fn parse_filter(filter: Option<&JsonB>) -> Option<Filter> {
    let value = &filter?.0;
    match Filter::parse(value) {
        Ok(f) => Some(f),
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid filter: {e}"),
            None,
            "Use {\"column\": \"value\"} or {\"column\": [\"value\", …]}.",
        ),
    }
}

/// A validated request for history rows.
pub struct Request {
    pub after: Cursor,
    pub labels: Option<Vec<String>>,
    pub max_events: i32,
    pub filter: Option<Filter>,
}

fn request(
    since: Option<&str>,
    labels: Option<Vec<String>>,
    max_events: i32,
    filter: Option<JsonB>,
    from_now: bool,
) -> Request {
    require_preloaded();
    if max_events < 1 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_events must be at least 1, not {max_events}"),
            None,
            "Pass a positive number of changes to return at most.",
        );
    }
    let after = match since {
        Some(text) => check_cursor(text),
        None if from_now => current(),
        None => {
            let (system_id, timeline) = cluster();
            Cursor {
                system_id,
                timeline,
                event_id: horizon(),
                pos: Cursor::END,
            }
        }
    };
    if let Some(labels) = &labels {
        check_labels(labels);
    }
    let filter = parse_filter(filter.as_ref());
    Request {
        after,
        labels,
        max_events,
        filter,
    }
}

/// Reads the history rows after the request's cursor, with a fresh
/// snapshot (so a waiting `watch()` sees what the worker committed since).
pub fn read_rows(req: &Request) -> Result<Vec<ChangeRow>, String> {
    let mut sql = String::from(
        "SELECT event_id, pos, seq, ts, xid, label, table_name, op, identifier, key, new, old, metadata
           FROM changerelay.history
          WHERE (event_id, pos) > ($1, $2) AND ($3::text[] IS NULL OR label = ANY ($3))",
    );
    let mut args: Vec<DatumWithOid<'_>> = vec![
        (req.after.event_id.min(i64::MAX as u64) as i64).into(),
        (req.after.pos as i64).into(),
        req.labels.clone().into(),
        req.max_events.into(),
    ];
    for (column, values) in req.filter.iter().flat_map(|f| f.terms.iter()) {
        let n = args.len();
        sql.push_str(&format!(
            " AND coalesce(new, old, key) ->> ${} = ANY (${})",
            n + 1,
            n + 2
        ));
        args.push(column.as_str().into());
        args.push(values.clone().into());
    }
    sql.push_str(" ORDER BY event_id, pos LIMIT $4");
    let (system_id, timeline) = cluster();
    // SAFETY: a fresh snapshot for this read only, popped right after.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let rows = Spi::connect(|client| {
        let t = client.select(&sql, None, &args)?;
        t.map(|r| {
            let event_id = r.get::<i64>(1)?.unwrap_or(0);
            let pos = r.get::<i32>(2)?.unwrap_or(0);
            let cursor = Cursor {
                system_id,
                timeline,
                event_id: event_id as u64,
                pos: pos as u32,
            }
            .encode();
            Ok::<_, pgrx::spi::Error>((
                cursor,
                event_id,
                r.get::<i32>(3)?.unwrap_or(0),
                r.get::<i64>(4)?.unwrap_or(0),
                r.get::<i64>(5)?.unwrap_or(0),
                r.get::<String>(6)?.unwrap_or_default(),
                r.get::<String>(7)?.unwrap_or_default(),
                r.get::<String>(8)?.unwrap_or_default(),
                r.get::<String>(9)?,
                r.get::<JsonB>(10)?,
                r.get::<JsonB>(11)?,
                r.get::<JsonB>(12)?,
                r.get::<JsonB>(13)?,
            ))
        })
        .collect::<Result<Vec<_>, _>>()
    });
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    // Pruning deletes rows and moves the horizon in one transaction. Had it
    // committed before this read, the rows right after the cursor would be
    // silently missing; reading the horizon again now (a later snapshot)
    // turns that into the documented error.
    not_expired(&req.after).map_err(|p| p.message())?;
    rows.map_err(|e| format!("could not read history: {e}"))
}

fn fetch(req: &Request) -> Vec<ChangeRow> {
    match read_rows(req) {
        Ok(rows) => rows,
        Err(e) => {
            // Pruning that committed during the read gives the documented error.
            if let Err(p) = not_expired(&req.after) {
                p.raise()
            }
            raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e, None, "")
        }
    }
}

/// The changes strictly after `since` (NULL: the oldest retained), in commit
/// order, at most `max_events`. Each row's cursor is the position after it.
#[pg_extern(volatile)]
fn changes(
    since: default!(Option<&str>, "NULL"),
    labels: default!(Option<Vec<String>>, "NULL"),
    max_events: default!(i32, 1000),
    filter: default!(Option<JsonB>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(cursor, String),
        name!(event_id, i64),
        name!(seq, i32),
        name!(ts, i64),
        name!(xid, i64),
        name!(label, String),
        name!(table_name, String),
        name!(op, String),
        name!(identifier, Option<String>),
        name!(key, Option<JsonB>),
        name!(new, Option<JsonB>),
        name!(old, Option<JsonB>),
        name!(metadata, Option<JsonB>),
    ),
> {
    let req = request(since, labels, max_events, filter, false);
    TableIterator::new(fetch(&req))
}

fn interval_ms(i: &Interval) -> i64 {
    let days = i64::from(i.months()) * 30 + i64::from(i.days());
    days.saturating_mul(86_400_000).saturating_add(i.micros() / 1000)
}

/// Like `changes()`, but when nothing follows `since` (NULL: now) it sleeps
/// until the relay worker applies changes or `timeout` passes.
#[pg_extern(volatile)]
fn watch(
    since: default!(Option<&str>, "NULL"),
    labels: default!(Option<Vec<String>>, "NULL"),
    timeout: default!(Interval, "'30 seconds'"),
    max_events: default!(i32, 1000),
    filter: default!(Option<JsonB>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(cursor, String),
        name!(event_id, i64),
        name!(seq, i32),
        name!(ts, i64),
        name!(xid, i64),
        name!(label, String),
        name!(table_name, String),
        name!(op, String),
        name!(identifier, Option<String>),
        name!(key, Option<JsonB>),
        name!(new, Option<JsonB>),
        name!(old, Option<JsonB>),
        name!(metadata, Option<JsonB>),
    ),
> {
    // SAFETY: reading the session's isolation level.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "watch() needs READ COMMITTED isolation",
            Some(
                "Under REPEATABLE READ or SERIALIZABLE a statement never sees changes committed after it began.".into(),
            ),
            "Call watch() outside an explicit transaction, or in a READ COMMITTED one.",
        );
    }
    let timeout_ms = interval_ms(&timeout);
    if timeout_ms < 0 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "timeout must not be negative",
            None,
            "Pass an interval such as '30 seconds'.",
        );
    }
    let req = request(since, labels, max_events, filter, true);
    let Some(shared) = shmem::shared() else {
        unreachable!("checked by request()")
    };
    let deadline = Instant::now() + Duration::from_millis(timeout_ms as u64);
    let cv = std::ptr::from_ref(&shared.cv).cast_mut();
    loop {
        let seen = shared.status.last_event_id.load(Ordering::Acquire);
        let rows = fetch(&req);
        if !rows.is_empty() || Instant::now() >= deadline {
            return TableIterator::new(rows);
        }
        // Sleep until the worker applies another batch. Interrupts
        // (pg_cancel_backend, statement_timeout) are served inside the sleep
        // and abort the statement, which also cancels the sleep.
        // SAFETY: the condition variable lives in shared memory for the
        // server's life; prepare/sleep/cancel are used as documented.
        unsafe {
            pg_sys::ConditionVariablePrepareToSleep(cv);
            while shared.status.last_event_id.load(Ordering::Acquire) == seen {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                pg_sys::ConditionVariableTimedSleep(
                    cv,
                    left.as_millis().max(1) as std::ffi::c_long,
                    pg_sys::PG_WAIT_EXTENSION,
                );
            }
            pg_sys::ConditionVariableCancelSleep();
        }
    }
}
