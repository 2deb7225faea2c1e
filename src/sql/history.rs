//! The change history: its tables, reading it, `changes()` and `watch()`.
//!
//! History rows are written by the relay worker in the same transaction as
//! the versions (see `worker::persist`); each holds the plugin's binary
//! frame of one change, decoded here when read. Row-level security on
//! `changerelay.history` hands each row only to roles that can SELECT its
//! table. `watch()` sleeps on the shared condition variable the worker
//! broadcasts after each batch, and reads with a fresh snapshot each time it
//! wakes (READ COMMITTED). On a hot standby (no worker) both read the
//! replicated history; `watch()` then looks at the replay position every
//! 50 ms instead. With the publish gate on, readers see no event newer than
//! what the worker published (what the standbys have).

use crate::errors::raise;
use crate::shmem;
use crate::sql::access::hide_by_row_security;
use crate::sql::cursors::{self, check_cursor, cluster, not_expired};
use crate::sql::jsonb::JsonbText;
use crate::sql::require_preloaded;
use changerelay_core::chunk::{self, Merge, Position};
use changerelay_core::cursor::Cursor;
use changerelay_core::filter::Filter;
use changerelay_core::history::{ChangeView, HistoryRow};
use pgrx::datum::DatumWithOid;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::JsonB;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

extension_sql!(
    r#"
-- Every change of a tracked table, kept for changerelay.history_retention,
-- packed by the relay worker: one row (a chunk) holds the changes of one
-- table and label from one applied batch, in commit order, from (event_id,
-- pos) to (last_event_id, last_pos); batch is the first event id of that
-- batch. frames is the chunk's packed, lz4-compressed binary frames (one per
-- change, what changerelay.decode() shows); changes counts them; ts is the
-- commit time of the last one (pruning goes by it). (event_id, pos) of a
-- change orders history in commit order and forms cursors.
CREATE TABLE changerelay.history (
    event_id bigint NOT NULL,
    pos int NOT NULL,
    last_event_id bigint NOT NULL,
    last_pos int NOT NULL,
    batch bigint NOT NULL,
    ts bigint NOT NULL,
    relid oid NOT NULL,
    label text NOT NULL,
    changes int NOT NULL,
    frames bytea NOT NULL,
    PRIMARY KEY (event_id, pos)
);
-- Chunks are compressed already.
ALTER TABLE changerelay.history ALTER COLUMN frames SET STORAGE EXTERNAL;
CREATE INDEX history_label ON changerelay.history (label, event_id, pos);
CREATE INDEX history_ts ON changerelay.history USING brin (ts);
ALTER TABLE changerelay.history ENABLE ROW LEVEL SECURITY;
CREATE POLICY history_readable ON changerelay.history FOR SELECT
    USING (coalesce(pg_catalog.has_table_privilege(relid, 'SELECT'), false));
-- A transaction's metadata (changerelay.set_metadata), kept once; visible
-- with any history row of the transaction the reader may see.
CREATE TABLE changerelay.history_metadata (
    event_id bigint PRIMARY KEY,
    metadata json NOT NULL
);
ALTER TABLE changerelay.history_metadata ENABLE ROW LEVEL SECURITY;
CREATE POLICY history_metadata_readable ON changerelay.history_metadata FOR SELECT
    USING (EXISTS (SELECT 1 FROM changerelay.history h
                    WHERE h.event_id <= history_metadata.event_id AND h.last_event_id >= history_metadata.event_id));
-- event_id: history at or before (event_id, end of that transaction) has been
-- pruned (or lies before a gap, see history_gaps). applied: the last
-- transaction the relay worker applied; written in the same transaction as its
-- history, so a batch decoded again after a crash is recognised and skipped
-- instead of written twice. decoded_upto: the WAL position decoding had
-- reached at that write (the worker's slot is never confirmed beyond it; a
-- slot that is, after a failover, consumed changes this history lacks);
-- timeline: the timeline of that write (a promotion shows as a change).
-- versions_exact: label_versions and row_versions hold every version shared
-- memory shows. The worker writes versions at checkpoints and sets this false
-- before shared memory shows one the tables do not hold; after a restart that
-- finds it false, every label's floor is raised to the end of WAL.
CREATE TABLE changerelay.history_horizon (
    one bool PRIMARY KEY DEFAULT true CHECK (one),
    event_id bigint NOT NULL,
    applied bigint NOT NULL DEFAULT 0,
    versions_exact bool NOT NULL DEFAULT true,
    decoded_upto bigint,
    timeline bigint
);
INSERT INTO changerelay.history_horizon (one, event_id, applied) VALUES (true, 0, 0);
-- decoded_upto of idle steps (WAL with no tracked change): kept in a sequence,
-- whose changes no logical decoding stream shows (only an empty transaction).
CREATE SEQUENCE changerelay.decoded_mark MINVALUE 0 START 0;
-- Gaps: the relay lost changes (its slot was dropped or invalidated, was
-- confirmed beyond this history, or this server was promoted without it).
-- Cursors before event_id get the error of the reason; see README, HA.
CREATE TABLE changerelay.history_gaps (
    event_id bigint PRIMARY KEY,
    reason text NOT NULL,
    detail text NOT NULL,
    timeline bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
-- Transactions the relay worker could not apply, with their frames: the
-- versions they touched were moved; their history is missing. Superusers
-- only (the frames hold row data).
CREATE TABLE changerelay.dead_letters (
    event_id bigint PRIMARY KEY,
    xid bigint,
    labels text[] NOT NULL,
    error text NOT NULL,
    frames int NOT NULL,
    bytes bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE changerelay.dead_letter_frames (
    event_id bigint NOT NULL,
    n int NOT NULL,
    frame bytea NOT NULL,
    PRIMARY KEY (event_id, n)
);
REVOKE ALL ON changerelay.history, changerelay.history_metadata, changerelay.history_horizon,
              changerelay.history_gaps, changerelay.dead_letters, changerelay.dead_letter_frames FROM PUBLIC;
GRANT SELECT ON changerelay.history, changerelay.history_metadata, changerelay.history_horizon,
                changerelay.history_gaps, changerelay.decoded_mark TO PUBLIC;
"#,
    name = "history_tables",
    requires = ["tracking_tables"]
);

/// Checks `labels` exist, keep history, and that the caller may read every
/// table of each.
pub(crate) fn check_labels(labels: &[String]) {
    for label in labels {
        if !crate::sql::label_known(label) {
            crate::sql::unknown_label(label);
        }
        crate::sql::check_label_access(label);
    }
    if let Some(label) = without_history(labels).first() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            no_history_message(label),
            Some("It is tracked with history => false: only its versions are kept.".into()),
            format!(
                "Read its versions with changerelay.version_map('{label}'), or track its tables with history => true."
            ),
        );
    }
}

/// Those of `labels` tracked with `history => false`.
pub fn without_history(labels: &[String]) -> Vec<String> {
    crate::sql::select_all(
        "SELECT DISTINCT label FROM changerelay.tracked_tables WHERE label = ANY ($1) AND NOT history ORDER BY 1",
        &[labels.to_vec().into()],
        |r| r.get::<String>(1).map(Option::unwrap_or_default),
    )
    .unwrap_or_default()
}

pub fn no_history_message(label: &str) -> String {
    format!("label \"{label}\" keeps no history")
}

pub(crate) fn parse_filter(filter: Option<&JsonB>) -> Option<Filter> {
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

/// Most changes one call returns.
pub const MAX_EVENTS: i32 = 10_000;

/// A validated request for history rows.
pub struct Request {
    pub after: Cursor,
    pub labels: Option<Vec<String>>,
    pub max_events: i32,
    pub filter: Option<Filter>,
    /// Stop once the rows read hold this many bytes of frames (at least one
    /// row is always returned).
    pub max_bytes: usize,
    /// Read no event after this one (the publish gate: what the standbys
    /// have); `None`: everything committed.
    pub upto: Option<u64>,
    /// Read no row after this position (a consumer's lease).
    pub until: Option<(u64, u32)>,
}

fn request(
    since: Option<&str>,
    labels: Option<Vec<String>>,
    max_events: i32,
    filter: Option<JsonB>,
    from_now: bool,
) -> Request {
    require_preloaded();
    if !(1..=MAX_EVENTS).contains(&max_events) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_events must be between 1 and {MAX_EVENTS}, not {max_events}"),
            None,
            "Pass a number of changes to return at most; continue from the last row's cursor for more.",
        );
    }
    let after = match since {
        Some(text) => check_cursor(text),
        None if from_now => cursors::current(),
        None => {
            let (system_id, timeline) = cluster();
            Cursor {
                system_id,
                timeline,
                event_id: cursors::horizon(),
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
        max_bytes: usize::MAX,
        upto: cursors::published_cap(),
        until: None,
    }
}

/// The cursor of the position after `view`.
pub fn cursor_after(view: &ChangeView) -> Cursor {
    let (system_id, timeline) = cluster();
    Cursor {
        system_id,
        timeline,
        event_id: view.event_id,
        pos: view.pos,
    }
}

/// Bytes of the JSON texts of a row, as replies count them.
pub fn text_bytes(v: &ChangeView) -> usize {
    [&v.key, &v.new, &v.old, &v.metadata]
        .iter()
        .map(|t| t.as_ref().map_or(0, String::len))
        .sum()
}

/// Chunks read per query.
const CHUNK_PAGE: i64 = 16;

/// Where reading chunks after `after` starts: the `batch` of the chunk that
/// begins last at or before it (chunks that hold changes on both sides of
/// the cursor all belong to that batch, see `changerelay_core::chunk`), or
/// nothing before the cursor.
const SEEK: &str = "SELECT h.batch FROM changerelay.history h
     WHERE (h.event_id, h.pos) <= ($1, $2) AND ($3::pg_catalog.text[] IS NULL OR h.label = ANY ($3))
     ORDER BY h.event_id DESC, h.pos DESC LIMIT 1";
/// Chunks in order of their first change that hold changes after the
/// cursor ($5, $6), from a start ($1, $2), beginning at or before ($7, $8).
const CHUNKS: &str = "SELECT h.event_id, h.pos, h.relid, h.label, h.frames
      FROM changerelay.history h
     WHERE (h.event_id, h.pos) > ($1, $2) AND (h.last_event_id, h.last_pos) > ($5, $6)
       AND (h.event_id, h.pos) <= ($7, $8)
       AND ($3::pg_catalog.text[] IS NULL OR h.label = ANY ($3))
     ORDER BY h.event_id, h.pos LIMIT $4";
const METADATA: &str = "SELECT m.event_id, m.metadata::pg_catalog.text FROM changerelay.history_metadata m
     WHERE m.event_id = ANY ($1)";

/// One stored chunk, as read.
struct StoredChunk {
    first: Position,
    relid: u32,
    label: String,
    frames: Vec<u8>,
}

fn read_chunks(from: Position, req: &Request, last_allowed: Position) -> Result<Vec<StoredChunk>, String> {
    let after = req.after.position();
    let args: Vec<DatumWithOid<'_>> = vec![
        (from.0.min(i64::MAX as u64) as i64).into(),
        i64::from(from.1).into(),
        req.labels.clone().into(),
        CHUNK_PAGE.into(),
        (after.0.min(i64::MAX as u64) as i64).into(),
        i64::from(after.1).into(),
        (last_allowed.0.min(i64::MAX as u64) as i64).into(),
        i64::from(last_allowed.1).into(),
    ];
    crate::sql::select_all(CHUNKS, &args, |r| {
        Ok(StoredChunk {
            first: (
                r.get::<i64>(1)?.unwrap_or(0) as u64,
                r.get::<i32>(2)?.unwrap_or(0) as u32,
            ),
            relid: r.get::<pg_sys::Oid>(3)?.map_or(0, |o| o.to_u32()),
            label: r.get::<String>(4)?.unwrap_or_default(),
            frames: r.get::<Vec<u8>>(5)?.unwrap_or_default(),
        })
    })
    .map_err(|e| e.to_string())
}

/// Where reading starts for the request: just before the first chunk that
/// may hold changes after its cursor.
fn seek(req: &Request) -> Result<Position, String> {
    let (event_id, pos) = req.after.position();
    let args: Vec<DatumWithOid<'_>> = vec![
        (event_id.min(i64::MAX as u64) as i64).into(),
        i64::from(pos).into(),
        req.labels.clone().into(),
    ];
    let batch = crate::sql::select_one::<i64>(SEEK, &args).map_err(|e| e.to_string())?;
    // Chunks strictly after (batch - 1, END): every chunk of that batch.
    Ok(match batch {
        Some(b) if b > 0 => (b as u64 - 1, u32::MAX),
        _ => (0, 0),
    })
}

/// Adds each row's transaction metadata.
fn add_metadata(views: &mut [ChangeView]) -> Result<(), String> {
    let mut ids: Vec<i64> = views.iter().map(|v| v.event_id as i64).collect();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    // As the extension's owner: these rows passed the caller's privileges
    // and row-level security already, and the table's own policy (a chunk of
    // a readable table holding the transaction) costs a scan per row.
    let found = crate::sql::access::as_role(crate::sql::access::extension_owner(), || {
        crate::sql::select_all(METADATA, &[ids.into()], |r| {
            Ok((r.get::<i64>(1)?.unwrap_or(0) as u64, r.get::<String>(2)?))
        })
    })
    .map_err(|e| e.to_string())?;
    if found.is_empty() {
        return Ok(());
    }
    let found: std::collections::HashMap<u64, Option<String>> = found.into_iter().collect();
    for v in views {
        if let Some(m) = found.get(&v.event_id) {
            v.metadata.clone_from(m);
        }
    }
    Ok(())
}

/// Reads the history after the request's cursor in commit order, with a
/// fresh snapshot (so a waiting `watch()` sees what the worker committed
/// since): chunks in order of their first change, merged back into commit
/// order ([`Merge`]); filters and row-level security apply to the decoded
/// rows, a page at a time.
pub fn read_rows(req: &Request) -> Result<Vec<ChangeView>, String> {
    read_page(req).map(|(rows, _)| rows)
}

/// [`read_rows`], and the position the read covers: the last row returned
/// when it stopped at `max_events` or `max_bytes`, otherwise the last row it
/// looked at (rows after it that the filter or privileges left out count as
/// read). Rows become visible in history order, so nothing can appear at or
/// before that position later.
pub fn read_page(req: &Request) -> Result<(Vec<ChangeView>, Position), String> {
    // The publish gate caps whole events; a lease caps a position. Rows
    // before `cap` (exclusive) may be read.
    let mut last_allowed = (req.upto.unwrap_or(u64::MAX), u32::MAX);
    if let Some(until) = req.until {
        last_allowed = last_allowed.min(until);
    }
    let cap = successor(last_allowed);
    let want = req.max_events.max(1) as usize;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut at = req.after.position();
    // SAFETY: a fresh snapshot for this read only, popped right after.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let read = (|| -> Result<(), String> {
        let mut from = seek(req)?;
        let mut merge = Merge::after(req.after.position());
        // Pops what is ready before `next` (and before the cap) into `out`;
        // true when `out` is full.
        let mut drain = |merge: &mut Merge, next: Option<Position>, out: &mut Vec<ChangeView>| {
            let before = [next, cap].into_iter().flatten().min();
            // Filters and privileges may leave out some of what is popped:
            // pop again until `out` is full or nothing more is ready.
            loop {
                let mut views = Vec::new();
                while views.len() + out.len() < want {
                    let Some(row) = merge.pop_before(before) else { break };
                    at = (row.event_id, row.pos);
                    views.push(view_or_marker(&row));
                }
                if views.is_empty() {
                    return Ok::<bool, String>(out.len() >= want);
                }
                if emit(req, views, out, &mut bytes, want)? {
                    if let Some(last) = out.last() {
                        at = (last.event_id, last.pos);
                    }
                    return Ok(true);
                }
            }
        };
        loop {
            let chunks = read_chunks(from, req, last_allowed)?;
            let last_page = (chunks.len() as i64) < CHUNK_PAGE;
            let mut chunks = chunks.into_iter().peekable();
            while let Some(c) = chunks.next() {
                // (No chunk begins past the cap: the query leaves them out.)
                from = c.first;
                merge.add(chunk::unpack(&c.frames, c.relid, &c.label).unwrap_or_else(|e| vec![damaged(&c, &e)]));
                // Every change before the next chunk's first is ready; after
                // the last chunk of a page, the next page tells.
                let next = match chunks.peek() {
                    Some(next) => Some(next.first),
                    None if last_page => None,
                    None => continue,
                };
                if drain(&mut merge, next, &mut out)? {
                    return Ok(());
                }
            }
            if last_page {
                // Whatever the last chunk left held (it may have ended a
                // full page that was followed by nothing) is ready now.
                drain(&mut merge, None, &mut out)?;
                return Ok(());
            }
        }
    })();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    // Pruning deletes rows and moves the horizon in one transaction. Had it
    // committed before this read, the rows right after the cursor would be
    // silently missing; reading the horizon again now (a later snapshot)
    // turns that into the documented error.
    not_expired(&req.after).map_err(|p| p.message())?;
    read.map_err(|e| format!("could not read history: {e}"))?;
    Ok((out, at))
}

/// The position right after `p` (`None`: there is none).
fn successor(p: Position) -> Option<Position> {
    match p {
        (e, u32::MAX) => e.checked_add(1).map(|e| (e, 0)),
        (e, pos) => Some((e, pos + 1)),
    }
}

/// Filters and checks rows ready in commit order and adds them to `out`;
/// true when `out` is full (in rows or bytes).
fn emit(
    req: &Request,
    mut views: Vec<ChangeView>,
    out: &mut Vec<ChangeView>,
    bytes: &mut usize,
    want: usize,
) -> Result<bool, String> {
    if views.is_empty() {
        return Ok(out.len() >= want);
    }
    hide_by_row_security(&mut views)?;
    views.retain(|v| req.filter.as_ref().is_none_or(|f| v.matches(f)));
    add_metadata(&mut views)?;
    for view in views {
        *bytes += text_bytes(&view);
        out.push(view);
        if out.len() >= want || *bytes >= req.max_bytes {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A chunk that can not be unpacked (damaged storage) shows as one marker
/// at its first position instead of hiding every change after it.
fn damaged(c: &StoredChunk, error: &str) -> HistoryRow {
    pgrx::warning!(
        "pg_changerelay: the history chunk at {}/{} can not be read: {error}",
        c.first.0,
        c.first.1
    );
    HistoryRow {
        event_id: c.first.0,
        pos: c.first.1,
        ts: 0,
        relid: c.relid,
        label: c.label.clone(),
        frame: Vec::new(),
    }
}

/// The row as readers see it; a frame that can not be decoded (damaged
/// storage) shows as a marker instead of hiding every row after it.
fn view_or_marker(row: &HistoryRow) -> ChangeView {
    row.view().unwrap_or_else(|e| ChangeView {
        event_id: row.event_id,
        pos: row.pos,
        ts: row.ts,
        relid: row.relid,
        label: row.label.clone(),
        op: "undecodable",
        new: Some(format!(
            "{{\"$changerelay\":\"undecodable\",\"error\":{}}}",
            serde_json::Value::String(e.to_string())
        )),
        ..ChangeView::default()
    })
}

fn fetch(req: &Request) -> Vec<ChangeTuple> {
    let rows = match read_rows(req) {
        Ok(rows) => rows,
        Err(e) => {
            // Pruning that committed during the read gives the documented error.
            if let Err(p) = not_expired(&req.after) {
                p.raise()
            }
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                e,
                None,
                "Retry; if it persists, check the server log.",
            )
        }
    };
    rows.into_iter().map(tuple).collect()
}

/// One row of `changes()`/`watch()`.
pub(crate) type ChangeTuple = (
    String,
    i64,
    i32,
    i64,
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<JsonbText>,
    Option<JsonbText>,
    Option<JsonbText>,
    Option<JsonbText>,
);

pub(crate) fn tuple(v: ChangeView) -> ChangeTuple {
    let cursor = cursor_after(&v).encode();
    (
        cursor,
        v.event_id as i64,
        v.seq as i32,
        v.ts,
        i64::from(v.xid),
        v.label,
        v.table_name,
        v.op.to_string(),
        v.identifier,
        v.key.map(JsonbText),
        v.new.map(JsonbText),
        v.old.map(JsonbText),
        v.metadata.map(JsonbText),
    )
}

/// The changes strictly after `since` (NULL: the oldest retained), in commit
/// order, at most `max_events`. Each row's cursor is the position after it.
// pgrx spells the SQL row type out in the signature.
#[allow(clippy::type_complexity)]
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
        name!(key, Option<JsonbText>),
        name!(new, Option<JsonbText>),
        name!(old, Option<JsonbText>),
        name!(metadata, Option<JsonbText>),
    ),
> {
    let req = request(since, labels, max_events, filter, false);
    TableIterator::new(fetch(&req))
}

pub(crate) fn interval_ms(i: &Interval) -> i64 {
    let days = i64::from(i.months()) * 30 + i64::from(i.days());
    days.saturating_mul(86_400_000).saturating_add(i.micros() / 1000)
}

/// Like `changes()`, but when nothing follows `since` (NULL: now) it sleeps
/// until the relay worker applies changes or `timeout` passes.
// pgrx spells the SQL row type out in the signature.
#[allow(clippy::type_complexity)]
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
        name!(key, Option<JsonbText>),
        name!(new, Option<JsonbText>),
        name!(old, Option<JsonbText>),
        name!(metadata, Option<JsonbText>),
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
    let mut req = req;
    loop {
        let seen = shared.status.last_event_id.load(Ordering::Acquire);
        req.upto = cursors::published_cap();
        let rows = fetch(&req);
        if !rows.is_empty() || Instant::now() >= deadline {
            return TableIterator::new(rows);
        }
        if crate::ha::in_recovery() {
            // A standby has no relay worker to wake watchers: look again
            // once replay has moved on.
            wait_for_replay(deadline);
            continue;
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

/// On a standby: sleeps until replay has moved past where it was (checked
/// every [`STANDBY_POLL`]), `deadline`, or promotion.
fn wait_for_replay(deadline: Instant) {
    // SAFETY: reads the replay position from shared memory.
    let replayed = unsafe { pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut()) };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !crate::ha::in_recovery() {
            return;
        }
        // SAFETY: waits on this backend's own latch; interrupts (cancel,
        // statement_timeout) are served right after.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                left.min(STANDBY_POLL).as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
        // SAFETY: as above.
        if unsafe { pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut()) } != replayed {
            return;
        }
    }
}

/// How often `watch()` on a standby looks at the replay position.
const STANDBY_POLL: Duration = Duration::from_millis(50);
