//! The relay worker's side of its sinks (crate `changerelay-sinks`, on a
//! thread of its own that never calls Postgres). On the worker's main thread
//! this module: loads the sinks from `changerelay.sinks` whenever the table
//! changes (and every few seconds, for privileges); hands each committed
//! batch over; answers the sinks' reads of history, as each sink's creator,
//! between batches and within a time budget; and records their progress in
//! the table at most every second.

use super::endpoint::change_row;
use super::persist::Fresh;
use crate::shmem;
use crate::sql::access::as_role;
use crate::sql::cursors::{self, CursorProblem};
use crate::sql::history;
use crate::sql::select_all;
use changerelay_core::cursor::Cursor;
use changerelay_core::history::ChangeView;
use changerelay_sinks::{self as sk, FromSinks, LiveBatch, Page, PageError, Report, SinkConfig, SinkRow, ToSinks};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time a loop turn spends answering reads before decoding again.
const TURN_BUDGET: Duration = Duration::from_millis(20);
/// Progress is written to `changerelay.sinks` at most this often.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Sinks are reloaded at least this often (their creators' privileges change
/// without touching the table).
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// A batch hands its rows to the sinks up to this many rows and bytes;
/// beyond, they read it from the history.
const LIVE_ROWS: usize = 2000;
const LIVE_BYTES: usize = 2 << 20;
/// Bytes of rows in one answer to a read.
const READ_BYTES: usize = 4 << 20;

struct Loaded {
    config: SinkConfig,
    creator: pg_sys::Oid,
}

pub struct Link {
    sinks: sk::Sinks,
    port: sk::SinkPort,
    loaded: Vec<Loaded>,
    /// The generation loaded last, and when.
    seen: Option<(u64, Instant)>,
    /// The newest event handed over (batches cover event ids after it).
    head: Option<u64>,
    reads: VecDeque<(u64, String, Vec<String>, sk::Position, u32)>,
    /// Latest report per sink not yet recorded, and the counters recorded.
    reports: HashMap<String, Report>,
    recorded: HashMap<String, (u64, u64)>,
    persisted: Instant,
}

/// Starts the sinks thread (no sink runs until they are loaded).
pub fn start() -> Option<Link> {
    match sk::start() {
        Ok((sinks, port)) => Some(Link {
            sinks,
            port,
            loaded: Vec::new(),
            seen: None,
            head: None,
            reads: VecDeque::new(),
            reports: HashMap::new(),
            recorded: HashMap::new(),
            persisted: Instant::now(),
        }),
        Err(e) => {
            warning!("pg_changerelay relay: sinks not started: {e}");
            None
        }
    }
}

impl Link {
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.port.wake_fd()
    }

    /// Hands a committed batch to the sinks: its rows of the sinks' labels,
    /// when there are not too many (`fresh` is `None` when even the endpoint
    /// got none).
    pub fn publish(&mut self, fresh: Option<&Fresh>, last_event: Option<u64>) {
        let Some(new_head) = last_event else { return };
        // Unknown start: no sink may take the batch as the next after its position.
        let after = self.head.unwrap_or(u64::MAX);
        self.head = Some(self.head.map_or(new_head, |h| h.max(new_head)));
        // A sink dropped before this batch committed must not get it: the
        // drop moved the generation, so the sinks are loaded again first.
        self.reload_if_due();
        if self.loaded.is_empty() {
            return;
        }
        let rows = fresh.and_then(|f| self.live_rows(f));
        self.sinks.publish(ToSinks::Batch(Arc::new(LiveBatch {
            after,
            head: new_head,
            rows,
        })));
    }

    fn live_rows(&self, fresh: &Fresh) -> Option<Vec<SinkRow>> {
        let wanted = |label: &str| self.loaded.iter().any(|l| l.config.labels.iter().any(|x| x == label));
        let metadata: HashMap<u64, &String> = fresh.metadata.iter().map(|(e, m)| (*e, m)).collect();
        let (system_id, timeline) = cursors::cluster();
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in fresh.rows.iter().filter(|r| wanted(&r.label)) {
            let mut view = match row.view() {
                Ok(v) => v,
                Err(_) => return None,
            };
            view.metadata = metadata.get(&row.event_id).map(|m| (*m).clone());
            if let Some(r) = sink_row(view, system_id, timeline) {
                bytes += r.json.len();
                out.push(r);
            }
            if out.len() > LIVE_ROWS || bytes > LIVE_BYTES {
                return None;
            }
        }
        Some(out)
    }

    /// Between batches: reloads the sinks when they changed, answers reads,
    /// records progress. False when the sinks thread has ended.
    pub fn tick(&mut self, installed: bool) -> bool {
        if !self.sinks.is_running() || !self.port.drain_wake() {
            return false;
        }
        while let Some(msg) = self.port.try_recv() {
            match msg {
                FromSinks::Read {
                    id,
                    sink,
                    labels,
                    after,
                    max,
                } => self.reads.push_back((id, sink, labels, after, max)),
                FromSinks::Report(r) => {
                    self.reports.insert(r.sink.clone(), r);
                }
            }
        }
        if !installed {
            while let Some((id, ..)) = self.reads.pop_front() {
                let result = Err(PageError::Failed(
                    "pg_changerelay is not installed in this database yet".into(),
                ));
                self.sinks.publish(ToSinks::Page { id, result });
            }
            return true;
        }
        if self.head.is_none() {
            // Not before the publish gate knows what readers may see (never
            // wait for it here: this thread is the one that moves it).
            self.head = BackgroundWorker::transaction(cursors::current_now).map(|c| c.event_id);
        }
        self.reload_if_due();
        self.answer_reads();
        if self.persisted.elapsed() >= PERSIST_EVERY && !self.reports.is_empty() {
            self.persist();
        }
        true
    }

    fn reload_if_due(&mut self) {
        let generation = shmem::shared().map_or(0, |s| s.status.sinks_generation.load(Ordering::Acquire));
        let due = match self.seen {
            Some((g, at)) => g != generation || at.elapsed() >= RELOAD_EVERY,
            None => true,
        };
        if !due {
            return;
        }
        self.seen = Some((generation, Instant::now()));
        let loaded = BackgroundWorker::transaction(load);
        let configs: Vec<SinkConfig> = loaded.iter().map(|l| l.config.clone()).collect();
        self.reports.retain(|name, _| configs.iter().any(|c| c.name == *name));
        self.loaded = loaded;
        self.sinks.publish(ToSinks::Configs(configs));
    }

    fn answer_reads(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        let turn_ends = Instant::now() + TURN_BUDGET;
        let limit = crate::gucs::request_timeout();
        let creators: HashMap<String, pg_sys::Oid> =
            self.loaded.iter().map(|l| (l.config.name.clone(), l.creator)).collect();
        let reads = std::panic::AssertUnwindSafe(&mut self.reads);
        let answers = BackgroundWorker::transaction(move || {
            let reads = reads;
            let mut answers = Vec::new();
            while let Some((id, sink, labels, after, max)) = reads.0.pop_front() {
                let result = match creators.get(&sink) {
                    None => Err(PageError::Failed(format!("sink \"{sink}\" was dropped"))),
                    Some(creator) => guarded(|| {
                        crate::txn::with_statement_timeout(limit, || {
                            as_role(*creator, || read_page(&labels, after, max))
                        })
                    }),
                };
                answers.push((id, result));
                if Instant::now() >= turn_ends {
                    break;
                }
            }
            answers
        });
        for (id, result) in answers {
            self.sinks.publish(ToSinks::Page { id, result });
        }
        if !self.reads.is_empty() {
            // SAFETY: setting our own latch makes the next wait return at once.
            unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
        }
    }

    /// Records each sink's latest report: position (forward only), state,
    /// counters, last error.
    fn persist(&mut self) {
        self.persisted = Instant::now();
        let reports: Vec<Report> = self.reports.drain().map(|(_, r)| r).collect();
        let mut updates = Vec::with_capacity(reports.len());
        for r in &reports {
            let (written, dups) = self.recorded.get(&r.sink).copied().unwrap_or((0, 0));
            // Counters restart with the sink's task.
            let dw = if r.written >= written {
                r.written - written
            } else {
                r.written
            };
            let dd = if r.duplicates >= dups {
                r.duplicates - dups
            } else {
                r.duplicates
            };
            self.recorded.insert(r.sink.clone(), (r.written, r.duplicates));
            updates.push((r, dw as i64, dd as i64));
        }
        let done = crate::txn::try_transaction(|| {
            for (r, dw, dd) in &updates {
                Spi::run_with_args(
                    "UPDATE changerelay.sinks SET
                        event_id = CASE WHEN ($3, $4) > (event_id, pos) THEN $3 ELSE event_id END,
                        pos = CASE WHEN ($3, $4) > (event_id, pos) THEN $4 ELSE pos END,
                        delivered_at = CASE WHEN ($3, $4) > (event_id, pos) THEN pg_catalog.now() ELSE delivered_at END,
                        state = $5, changes_written = changes_written + $6, duplicates = duplicates + $7,
                        last_error_at = CASE WHEN $8::text IS DISTINCT FROM last_error AND $8 IS NOT NULL
                                             THEN pg_catalog.now() ELSE last_error_at END,
                        last_error = coalesce($8, CASE WHEN $5 = 'streaming' THEN NULL ELSE last_error END)
                      WHERE name = $1 AND id = $2",
                    &[
                        r.sink.as_str().into(),
                        r.sink_id.into(),
                        (r.delivered.0 as i64).into(),
                        i64::from(r.delivered.1).into(),
                        r.state.as_str().into(),
                        (*dw).into(),
                        (*dd).into(),
                        r.error.as_deref().into(),
                    ],
                )
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        if let Err(e) = done {
            warning!("pg_changerelay relay: could not record the sinks' progress: {e}");
        }
    }
}

/// Runs `read` in a subtransaction: a Postgres error (a statement timeout,
/// a dropped creator) becomes a failed read, retried by the sink, instead of
/// ending the worker.
fn guarded(read: impl FnOnce() -> Result<Page, PageError>) -> Result<Page, PageError> {
    let mut refused = None;
    let result = crate::txn::try_subtransaction(|| {
        read().map_err(|e| {
            refused = Some(e);
            String::new()
        })
    });
    match (result, refused) {
        (Ok(page), _) => Ok(page),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(PageError::Failed(e)),
    }
}

/// The sinks, as the worker runs them.
fn load() -> Vec<Loaded> {
    let (system_id, _) = cursors::cluster();
    let rows = select_all(
        "SELECT s.id, s.name, s.kind, s.url, s.labels, s.options::text, s.event_id, s.pos, s.creator,
                ARRAY(SELECT l FROM pg_catalog.unnest(s.labels) AS l
                       WHERE NOT coalesce(changerelay.label_readable(l, s.creator), false)
                          OR changerelay.label_row_security_applies(l, s.creator))
           FROM changerelay.sinks s ORDER BY s.name",
        &[],
        |r| {
            Ok((
                r.get::<i64>(1)?.unwrap_or(0),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<String>(3)?.unwrap_or_default(),
                r.get::<String>(4)?.unwrap_or_default(),
                r.get::<Vec<String>>(5)?.unwrap_or_default(),
                r.get::<String>(6)?.unwrap_or_default(),
                (r.get::<i64>(7)?.unwrap_or(0), r.get::<i64>(8)?.unwrap_or(0)),
                r.get::<pg_sys::Oid>(9)?.unwrap_or(pg_sys::Oid::INVALID),
                r.get::<Vec<String>>(10)?.unwrap_or_default(),
            ))
        },
    );
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            warning!("pg_changerelay relay: could not read changerelay.sinks (sinks keep their last settings): {e}");
            return Vec::new();
        }
    };
    rows.into_iter()
        .filter_map(|(id, name, kind, url, labels, options, (e, p), creator, unreadable)| {
            let options = serde_json::from_str(&options).unwrap_or(serde_json::Value::Null);
            let target = match changerelay_sinks::Target::parse(&kind, &url, &options) {
                Ok(t) => t,
                Err(e) => {
                    warning!("pg_changerelay relay: sink \"{name}\" is not started: {e}");
                    return None;
                }
            };
            let paused = (!unreadable.is_empty()).then(|| {
                format!(
                    "its creator may not read every row of label(s) {} (SELECT on each table, no row-level security)",
                    unreadable.join(", ")
                )
            });
            Some(Loaded {
                config: SinkConfig {
                    id,
                    name,
                    target,
                    labels,
                    start: (e.max(0) as u64, p.clamp(0, i64::from(u32::MAX)) as u32),
                    system_id,
                    live: paused.is_none(),
                    paused,
                },
                creator,
            })
        })
        .collect()
}

/// Rows of `labels` after `after`, as the current role.
fn read_page(labels: &[String], after: sk::Position, max: u32) -> Result<Page, PageError> {
    let (system_id, timeline) = cursors::cluster();
    let after_cursor = Cursor {
        system_id,
        timeline,
        event_id: after.0,
        pos: after.1,
    };
    if let Err(p) = cursors::not_expired(&after_cursor) {
        return Err(match p {
            CursorProblem::Expired { horizon, .. } => PageError::Expired { horizon },
            other => PageError::Failed(other.message()),
        });
    }
    let max = max.clamp(1, 1000);
    let req = history::Request {
        after: after_cursor,
        labels: Some(labels.to_vec()),
        max_events: max as i32,
        filter: None,
        max_bytes: READ_BYTES,
        // The publish gate: a sink is a client like any other.
        upto: cursors::published_cap(),
        until: None,
    };
    let (views, _) = history::read_page(&req).map_err(PageError::Failed)?;
    let more = views.len() as u32 >= max || views.iter().map(history::text_bytes).sum::<usize>() >= READ_BYTES;
    let head = match views.last() {
        Some(v) if more => (v.event_id, v.pos),
        // Everything up to what readers may see was read (the worker, which
        // alone writes the history and moves the gate, is answering this).
        _ => match cursors::current_now() {
            Some(now) => (now.event_id, sk::END),
            None => views.last().map_or(after, |v| (v.event_id, v.pos)),
        },
    };
    let rows = views
        .into_iter()
        .filter_map(|v| sink_row(v, system_id, timeline))
        .collect();
    Ok(Page { rows, head, more })
}

/// The row a sink delivers for a history row: the endpoint's change object.
/// A truncate of several tables of one label is one change (one `seq`):
/// only its first table's row is delivered, naming them all in `tables`.
fn sink_row(view: ChangeView, system_id: u64, timeline: u32) -> Option<SinkRow> {
    let tables = if view.label_tables.len() > 1 {
        if view.label_tables.first() != Some(&view.table_name) {
            return None;
        }
        Some(view.label_tables.clone())
    } else {
        None
    };
    let (label, event_id, pos, seq) = (view.label.clone(), view.event_id, view.pos, view.seq);
    let mut json = changerelay_endpoint::change_json(&change_row(view, system_id, timeline));
    if let Some(tables) = tables {
        if json.ends_with('}') {
            json.pop();
            json.push_str(",\"tables\":");
            json.push_str(&serde_json::to_string(&tables).unwrap_or_else(|_| "[]".into()));
            json.push('}');
        }
    }
    Some(SinkRow {
        label: label.into(),
        event_id,
        pos,
        seq,
        json: json.into(),
    })
}
