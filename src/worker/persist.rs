//! Writing a batch: history, metadata, versions, the applied mark and how
//! far decoding reached in one transaction, streamed in chunks so no batch
//! is ever held whole.
//!
//! History holds the plugin's binary frames: nothing is parsed or cast on
//! the way in, so no value a table can hold makes the write fail. A batch's
//! changes of one table are packed into one history row, a chunk
//! (`changerelay_core::chunk`), or several when there are many; chunks are
//! written together in one statement, bounded in bytes, and each write's SPI
//! memory is released after it. Transactions at or below the applied mark
//! were applied before (the batch is decoded again after a crash): their
//! history is skipped and their versions applied again (harmless: versions
//! only move forward).
//!
//! The statements are prepared once per worker process (SPI_keepplan); the
//! plan cache re-plans them by itself if the tables change.
//!
//! A transaction that can not be applied is recorded as a dead letter
//! ([`Persister::dead_letter`]): its frames and the error are kept, and the
//! versions it touches move, so caches reload; the relay goes on.

use super::checkpoint::{self, Saved, VersionLog};
use super::frames::{FrameBuffer, Span};
use super::images;
use crate::sql::select_one;
use crate::txn::try_transaction;
use changerelay_core::apply::{Unsaved, VersionUpdates};
use changerelay_core::binary;
use changerelay_core::chunk::{ChunkBuilder, Packed};
use changerelay_core::event::Event;
use changerelay_core::history::HistoryRow;
use changerelay_core::lsn::lsn_to_string;
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Changes taken from the decoded batch at a time...
const TAKE_ROWS: usize = 10_000;
/// ...and bytes of their frames.
const TAKE_BYTES: usize = 8 << 20;
/// Packed chunks held before they are written (well below the 1 GB limit
/// of an array).
const WRITE_BYTES: usize = 8 << 20;
/// Per-row versions kept for one batch; beyond, a label's rows fold into
/// its floor (see `VersionUpdates`).
const ROW_LIMIT: usize = 50_000;
/// History rows a batch hands to the endpoint; a larger batch is published
/// without its rows, which clients then read from history.
pub const PUBLISH_ROWS: usize = 10_000;
/// ...and bytes of their frames.
pub const PUBLISH_BYTES: usize = 16 << 20;

const APPLIED: &str = "SELECT applied, versions_exact FROM changerelay.history_horizon";
const LABELS: &str = "INSERT INTO changerelay.label_versions AS t (label, v, ts, floor_v, floor_ts)
     SELECT * FROM unnest($1::pg_catalog.text[], $2::pg_catalog.int8[], $3::pg_catalog.int8[],
                                     $4::pg_catalog.int8[], $5::pg_catalog.int8[])
     ON CONFLICT (label) DO UPDATE SET
        v = greatest(t.v, excluded.v),
        ts = CASE WHEN excluded.v > t.v THEN excluded.ts ELSE t.ts END,
        floor_v = greatest(t.floor_v, excluded.floor_v),
        floor_ts = CASE WHEN excluded.floor_v > t.floor_v THEN excluded.floor_ts ELSE t.floor_ts END";
const ROWS: &str = "INSERT INTO changerelay.row_versions AS t (label, identifier, v, ts)
     SELECT * FROM unnest($1::pg_catalog.text[], $2::pg_catalog.text[], $3::pg_catalog.int8[],
                                     $4::pg_catalog.int8[])
     ON CONFLICT (label, identifier) DO UPDATE SET v = excluded.v, ts = excluded.ts
     WHERE excluded.v > t.v";
const HISTORY: &str = "INSERT INTO changerelay.history
            (event_id, pos, last_event_id, last_pos, batch, ts, relid, label, changes, frames)
     SELECT * FROM unnest($1::pg_catalog.int8[], $2::pg_catalog.int4[], $3::pg_catalog.int8[],
                          $4::pg_catalog.int4[], $5::pg_catalog.int8[], $6::pg_catalog.int8[],
                          $7::pg_catalog.oid[], $8::pg_catalog.text[], $9::pg_catalog.int4[],
                          $10::pg_catalog.bytea[])";
const METADATA: &str = "INSERT INTO changerelay.history_metadata (event_id, metadata)
     SELECT e, m::pg_catalog.json
       FROM unnest($1::pg_catalog.int8[], $2::pg_catalog.text[]) AS u(e, m)";
const HORIZON: &str = "UPDATE changerelay.history_horizon
     SET applied = greatest(applied, $1), decoded_upto = greatest(coalesce(decoded_upto, 0), $2), timeline = $3";
const EXACT: &str = "UPDATE changerelay.history_horizon SET versions_exact = $1";
const LOG: &str = "INSERT INTO changerelay.version_log (id, rows, entries) VALUES ($1, $2, $3)";
const DEAD_LETTER: &str = "INSERT INTO changerelay.dead_letters (event_id, xid, labels, error, frames, bytes)
     VALUES ($1, $2, $3, $4, $5, $6)";
const DEAD_LETTER_FRAMES: &str = "INSERT INTO changerelay.dead_letter_frames (event_id, n, frame)
     SELECT $1, * FROM unnest($2::pg_catalog.int4[], $3::pg_catalog.bytea[])";

pub struct Statements {
    applied: OwnedPreparedStatement,
    pub labels: OwnedPreparedStatement,
    pub rows: OwnedPreparedStatement,
    history: OwnedPreparedStatement,
    metadata: OwnedPreparedStatement,
    horizon: OwnedPreparedStatement,
    pub exact: OwnedPreparedStatement,
    pub log: OwnedPreparedStatement,
}

fn oids(types: &[pg_sys::Oid]) -> Vec<PgOid> {
    types.iter().map(|t| PgOid::from(*t)).collect()
}

impl Statements {
    fn prepare(c: &SpiClient<'_>) -> Result<Statements, pgrx::spi::Error> {
        use pg_sys::{
            BYTEAARRAYOID as BS, INT4ARRAYOID as I4S, INT8ARRAYOID as I8S, INT8OID as I8, OIDARRAYOID as OS,
            TEXTARRAYOID as TS,
        };
        Ok(Statements {
            applied: c.prepare(APPLIED, &[])?.keep(),
            labels: c.prepare_mut(LABELS, &oids(&[TS, I8S, I8S, I8S, I8S]))?.keep(),
            rows: c.prepare_mut(ROWS, &oids(&[TS, TS, I8S, I8S]))?.keep(),
            history: c
                .prepare_mut(HISTORY, &oids(&[I8S, I4S, I8S, I4S, I8S, I8S, OS, TS, I4S, BS]))?
                .keep(),
            metadata: c.prepare_mut(METADATA, &oids(&[I8S, TS]))?.keep(),
            horizon: c.prepare_mut(HORIZON, &oids(&[I8, I8, I8]))?.keep(),
            exact: c.prepare_mut(EXACT, &oids(&[pg_sys::BOOLOID]))?.keep(),
            log: c
                .prepare_mut(LOG, &oids(&[I8, pg_sys::INT4OID, pg_sys::BYTEAOID]))?
                .keep(),
        })
    }
}

/// What applying frames produced.
pub struct Applied {
    /// The versions the frames moved (their history already written).
    pub updates: VersionUpdates,
    /// History rows written for the first time, to publish; `None` when
    /// there were more than [`PUBLISH_ROWS`] or [`PUBLISH_BYTES`] (clients
    /// then read them from history).
    pub fresh: Option<Fresh>,
}

/// Rows to publish, with their transactions' metadata.
#[derive(Default)]
pub struct Fresh {
    pub rows: Vec<HistoryRow>,
    /// (event id, metadata JSON object).
    pub metadata: Vec<(u64, String)>,
}

/// Longest time between version checkpoints...
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// ...and most versions held unsaved before one.
const CHECKPOINT_ENTRIES: usize = 100_000;
/// Shortest time between two compactions of the version log (one that
/// fails is not retried at every step).
const COMPACT_EVERY: Duration = Duration::from_secs(10);

/// Writes batches. History goes out with every batch; versions are held
/// ([`Unsaved`]) and written at version checkpoints: every
/// [`CHECKPOINT_EVERY`], past [`CHECKPOINT_ENTRIES`], and when the worker
/// stops. Before shared memory shows a version the tables do not hold, the
/// tables are marked inexact (`history_horizon.versions_exact`), in the same
/// transaction; a restart that finds them so floors every label (see
/// `load_versions`).
pub struct Persister {
    statements: Option<Statements>,
    /// Labels tracked with `history => false` as of the last applied batch
    /// (read from `tracked_tables` at first, then followed through the
    /// decoded changes of that table, in commit order).
    no_history: Option<BTreeSet<String>>,
    unsaved: Unsaved,
    /// What `history_horizon.versions_exact` says, once read.
    exact: Option<bool>,
    /// The version log, once read.
    log: Option<VersionLog>,
    last_checkpoint: Instant,
    last_compaction: Option<Instant>,
}

impl Default for Persister {
    fn default() -> Self {
        Persister {
            statements: None,
            no_history: None,
            unsaved: Unsaved::default(),
            exact: None,
            log: None,
            last_checkpoint: Instant::now(),
            last_compaction: None,
        }
    }
}

fn prepared(statements: &mut Option<Statements>) -> Result<&Statements, String> {
    if statements.is_none() {
        *statements = Some(Spi::connect(Statements::prepare).map_err(|e| e.to_string())?);
    }
    statements.as_ref().ok_or_else(|| "statements not prepared".to_string())
}

impl Persister {
    /// Applies the frames of `spans` in one transaction and commits it,
    /// recording that decoding reached `upto` (`None`: the end of the last
    /// frame). A Postgres error rolls everything back and is returned as
    /// text.
    pub fn apply(&mut self, frames: &mut FrameBuffer, spans: &[Span], upto: Option<u64>) -> Result<Applied, String> {
        let due = self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY || self.unsaved.len() >= CHECKPOINT_ENTRIES;
        let (statements, unsaved, policy) = (&mut self.statements, &mut self.unsaved, &mut self.no_history);
        let log = self.log;
        let (applied, saved) = try_transaction(|| {
            let st = prepared(statements)?;
            if policy.is_none() {
                *policy = Some(labels_without_history()?);
            }
            let no_history = policy.clone().unwrap_or_default();
            let log = match log {
                Some(l) => l,
                None => VersionLog::read()?,
            };
            write_batch(st, frames, spans, upto, unsaved, no_history, due.then_some(log))
        })?;
        self.no_history = Some(applied.updates.no_history.clone());
        self.saved(saved);
        Ok(applied)
    }

    fn saved(&mut self, saved: Saved) {
        match saved {
            Saved::Same => {}
            Saved::Inexact => self.exact = Some(false),
            Saved::Checkpoint(log) => {
                self.unsaved = Unsaved::default();
                self.exact = Some(true);
                self.log = Some(log);
                self.last_checkpoint = Instant::now();
            }
        }
    }

    /// Writes the versions held once they have waited a checkpoint interval
    /// with no batch to carry them (the primary went quiet): hot standbys
    /// and a restart then find them.
    pub fn checkpoint_if_due(&mut self) -> Result<(), String> {
        let pending = !self.unsaved.is_empty() || self.exact == Some(false);
        if !pending || self.last_checkpoint.elapsed() < CHECKPOINT_EVERY {
            return Ok(());
        }
        let done = self.checkpoint();
        if done.is_err() {
            // Tried again an interval later, not at every idle step.
            self.last_checkpoint = Instant::now();
        }
        done
    }

    /// Compacts the version log once it has grown enough (see
    /// [`checkpoint`]), in a transaction of its own, at most every
    /// [`COMPACT_EVERY`].
    pub fn compact_if_due(&mut self) -> Result<(), String> {
        let Some(log) = self.log else { return Ok(()) };
        if !log.needs_compaction() || self.last_compaction.is_some_and(|t| t.elapsed() < COMPACT_EVERY) {
            return Ok(());
        }
        self.last_compaction = Some(Instant::now());
        // As many rows as shared memory holds: loading more would only evict them.
        let keep = changerelay_core::versions::most_held(crate::gucs::max_tracked_rows());
        let statements = &mut self.statements;
        let started = Instant::now();
        let compacted = try_transaction(|| checkpoint::compact(prepared(statements)?, log, keep))?;
        debug1!(
            "pg_changerelay relay: compacted the version log from {log} into {compacted} in {} ms",
            started.elapsed().as_millis()
        );
        self.log = Some(compacted);
        Ok(())
    }

    /// Writes every version held (when the worker stops).
    pub fn checkpoint(&mut self) -> Result<(), String> {
        if self.unsaved.is_empty() && self.exact == Some(true) {
            return Ok(());
        }
        let (statements, unsaved, log) = (&mut self.statements, &self.unsaved, self.log);
        let saved = try_transaction(|| {
            let st = prepared(statements)?;
            let log = match log {
                Some(l) => l,
                None => VersionLog::read()?,
            };
            checkpoint::write(st, unsaved, log)
        })?;
        self.saved(saved);
        Ok(())
    }

    /// Once per worker process, after shared memory holds the versions:
    /// when the tables are inexact (the process before ended without its
    /// checkpoint, or the server restarted and the floors were raised), the
    /// whole shared map is written, and the tables are exact again.
    pub fn save_shared_memory_if_inexact(&mut self) -> Result<(), String> {
        let statements = &mut self.statements;
        let exact = try_transaction(|| {
            prepared(statements)?;
            crate::sql::select_one::<bool>("SELECT versions_exact FROM changerelay.history_horizon", &[])
                .map_err(|e| e.to_string())
        })?;
        if exact != Some(false) {
            self.exact = exact;
            return Ok(());
        }
        let all = crate::shmem::with_map(|m| Unsaved::of_map(&m)).unwrap_or_default();
        let (rows, labels) = (all.rows.len(), all.labels.len());
        self.unsaved = all;
        self.exact = Some(false);
        self.checkpoint()?;
        log!("pg_changerelay relay: wrote {labels} label(s) and {rows} row version(s) of shared memory");
        Ok(())
    }

    /// Records the transaction in `span`, which could not be applied, as a
    /// dead letter: its frames and `error` in `changerelay.dead_letters`,
    /// every label it touches moved (its floor too, so every cached row
    /// reloads), and the applied mark moved past it. Returns the versions
    /// moved, to apply to shared memory.
    pub fn dead_letter(
        &mut self,
        frames: &mut FrameBuffer,
        span: &Span,
        error: &str,
        upto: Option<u64>,
    ) -> Result<Applied, String> {
        let statements = &mut self.statements;
        try_transaction(|| {
            let mut updates = VersionUpdates::with_row_limit(0);
            let mut header = None;
            let mut chunk: Vec<Vec<u8>> = Vec::new();
            let (mut n, mut bytes, mut first_lsn) = (0i32, 0i64, 0u64);
            let mut undecodable = None;
            let mut event_id = None;
            let mut last_lsn = 0;
            frames.for_each(std::slice::from_ref(span), |lsn, frame| -> Result<(), String> {
                if first_lsn == 0 {
                    first_lsn = lsn;
                }
                last_lsn = lsn;
                match binary::read_event(frame) {
                    Ok(event) => {
                        if let Event::Begin(h) | Event::Commit(changerelay_core::event::Commit { txn: h, .. }) = &event
                        {
                            header = Some(*h);
                        }
                        updates.add(&event, frame);
                        updates.take_history();
                    }
                    Err(e) => undecodable = Some(e.to_string()),
                }
                let id = *event_id.get_or_insert_with(|| header.map_or(lsn, |h| h.event_id) as i64);
                bytes += frame.len() as i64;
                chunk.push(frame.to_vec());
                n += 1;
                if chunk.len() >= 1000 || chunk.iter().map(Vec::len).sum::<usize>() >= TAKE_BYTES {
                    insert_dead_frames(id, n, &mut chunk)?;
                }
                Ok(())
            })?;
            let event_id = event_id.unwrap_or(first_lsn as i64);
            insert_dead_frames(event_id, n, &mut chunk)?;
            // Every label touched moves as a whole: the dead letter's rows
            // are not known to have been filed.
            let labels: Vec<String> = updates.labels.keys().cloned().collect();
            for (label, v) in updates.labels.clone() {
                let floor = updates.floors.entry(label).or_default();
                *floor = floor.max(v);
            }
            updates.rows.clear();
            let error = match &undecodable {
                Some(why) => format!("{error} (a frame is undecodable: {why}; versions could not be moved)"),
                None => error.to_string(),
            };
            Spi::connect_mut(|c| {
                c.update(
                    DEAD_LETTER,
                    None,
                    &[
                        event_id.into(),
                        header.map(|h| i64::from(h.xid)).into(),
                        labels.into(),
                        error.as_str().into(),
                        n.into(),
                        bytes.into(),
                    ],
                )
                .map(|_| ())
            })
            .map_err(|e| e.to_string())?;
            let st = prepared(statements)?;
            // Written at once, not held: dead letters are rare.
            let moved = Unsaved {
                labels: updates.labels.clone(),
                floors: updates.floors.clone(),
                rows: BTreeMap::new(),
            };
            checkpoint::upsert_labels(st, &moved)?;
            move_applied_mark(st, event_id, upto.unwrap_or(last_lsn))?;
            Ok(Applied {
                updates,
                fresh: Some(Fresh::default()),
            })
        })
    }
}

fn insert_dead_frames(event_id: i64, n: i32, chunk: &mut Vec<Vec<u8>>) -> Result<(), String> {
    if chunk.is_empty() {
        return Ok(());
    }
    let first = n - chunk.len() as i32;
    let numbers: Vec<i32> = (first..n).collect();
    let slices: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
    Spi::connect_mut(|c| {
        c.update(
            DEAD_LETTER_FRAMES,
            None,
            &[event_id.into(), numbers.into(), slices.into()],
        )
        .map(|_| ())
    })
    .map_err(|e| e.to_string())?;
    chunk.clear();
    Ok(())
}

/// The body of [`Persister::apply`], inside its transaction: the history,
/// the applied mark, and the versions (held, or a checkpoint when `due`).
fn write_batch(
    st: &Statements,
    frames: &mut FrameBuffer,
    spans: &[Span],
    upto: Option<u64>,
    unsaved: &mut Unsaved,
    no_history: BTreeSet<String>,
    due: Option<VersionLog>,
) -> Result<(Applied, Saved), String> {
    let (applied, exact) = Spi::connect(|c| {
        let t = c.select(&st.applied, Some(1), &[])?;
        let r = t.first();
        Ok::<_, pgrx::spi::Error>((r.get::<i64>(1)?.unwrap_or(0), r.get::<bool>(2)?.unwrap_or(false)))
    })
    .map_err(|e| e.to_string())?;
    let mut updates = VersionUpdates::with_row_limit(ROW_LIMIT);
    updates.no_history = no_history;
    let mut out = Output::new(applied);
    let mut last_lsn = 0;
    frames.for_each(spans, |lsn, frame| -> Result<(), String> {
        last_lsn = lsn;
        let event =
            binary::read_event(frame).map_err(|e| format!("undecodable frame at {}: {e}", lsn_to_string(lsn)))?;
        updates.add(&event, frame);
        if updates.history.len() >= TAKE_ROWS || updates.history_bytes >= TAKE_BYTES {
            out.take(st, &mut updates)?;
        }
        Ok(())
    })?;
    if updates.inside_transaction() {
        return Err("the batch ended inside a transaction (its commit record was not decoded)".into());
    }
    out.take(st, &mut updates)?;
    out.finish(st)?;
    // Also without history (labels that keep none): the slot is confirmed
    // only up to what the horizon says was decoded.
    move_applied_mark(
        st,
        updates.last_commit.map_or(0, |c| c.event_id as i64),
        upto.unwrap_or(last_lsn),
    )?;
    let long = unsaved.add(&updates);
    if !long.is_empty() {
        checkpoint::upsert_rows(st, long.iter().map(|(k, v)| (k, *v)))?;
    }
    let moved = !updates.labels.is_empty() || !updates.floors.is_empty() || !updates.rows.is_empty();
    let saved = match due {
        Some(log) if !unsaved.is_empty() || !exact => checkpoint::write(st, unsaved, log)?,
        _ if moved && exact => {
            Spi::connect_mut(|c| c.update(&st.exact, None, &[false.into()]).map(|_| ())).map_err(|e| e.to_string())?;
            Saved::Inexact
        }
        _ => Saved::Same,
    };
    let applied = Applied {
        updates,
        fresh: out.publish,
    };
    Ok((applied, saved))
}

/// The labels tracked with `history => false` now.
fn labels_without_history() -> Result<BTreeSet<String>, String> {
    crate::sql::select_all(
        "SELECT DISTINCT label FROM changerelay.tracked_tables WHERE NOT history",
        &[],
        |r| r.get::<String>(1).map(Option::unwrap_or_default),
    )
    .map(|v| v.into_iter().collect())
    .map_err(|e| e.to_string())
}

/// Moves the applied mark (the newest transaction whose history exists) to
/// `through` and records that decoding reached `upto` (on this timeline).
fn move_applied_mark(st: &Statements, through: i64, upto: u64) -> Result<(), String> {
    let timeline = i64::from(crate::ha::current_timeline());
    let args: [pgrx::datum::DatumWithOid<'_>; 3] = [
        through.into(),
        (upto.min(i64::MAX as u64) as i64).into(),
        timeline.into(),
    ];
    Spi::connect_mut(|c| c.update(&st.horizon, None, &args).map(|_| ())).map_err(|e| e.to_string())
}

/// Where a batch's history goes: chunks being filled, one per table and
/// label; packed chunks waiting to be written; the rows to publish.
struct Output {
    /// The applied mark: history of transactions at or below it exists.
    applied: i64,
    /// The first event id of the batch's history (every chunk's `batch`).
    batch: Option<u64>,
    open: BTreeMap<(u32, String), ChunkBuilder>,
    packed: Vec<(u32, String, Packed)>,
    packed_bytes: usize,
    /// `None` once there are too many to publish.
    publish: Option<Fresh>,
    publish_bytes: usize,
}

impl Output {
    fn new(applied: i64) -> Output {
        Output {
            applied,
            batch: None,
            open: BTreeMap::new(),
            packed: Vec::new(),
            packed_bytes: 0,
            publish: Some(Fresh::default()),
            publish_bytes: 0,
        }
    }

    /// Takes the changes decoded so far (those above the applied mark) into
    /// chunks, writes the metadata of their transactions, and writes the
    /// packed chunks once they are many.
    fn take(&mut self, st: &Statements, updates: &mut VersionUpdates) -> Result<(), String> {
        let (rows, metadata) = updates.take_history();
        let mut wanted = vec![false; rows.len()];
        for i in std::mem::take(&mut updates.needs_image) {
            if let Some(w) = wanted.get_mut(i) {
                *w = true;
            }
        }
        let (mut rows, wanted): (Vec<HistoryRow>, Vec<bool>) = rows
            .into_iter()
            .zip(wanted)
            .filter(|(r, _)| r.event_id as i64 > self.applied)
            .unzip();
        fail_if_asked(&rows)?;
        if wanted.contains(&true) {
            // Earlier chunks of this batch go first, so the lookup sees them.
            self.finish(st)?;
            images::fill(&mut rows, &wanted)?;
        }
        for row in &rows {
            self.batch.get_or_insert(row.event_id);
            let key = (row.relid, row.label.clone());
            let chunk = self.open.entry(key).or_default();
            chunk.push(row);
            if chunk.is_full() {
                if let Some(p) = chunk.take() {
                    self.packed_bytes += p.bytes.len();
                    self.packed.push((row.relid, row.label.clone(), p));
                }
            }
        }
        let metadata: Vec<(u64, String)> = metadata.into_iter().filter(|(e, _)| *e as i64 > self.applied).collect();
        if !metadata.is_empty() {
            let ids: Vec<i64> = metadata.iter().map(|(e, _)| *e as i64).collect();
            let texts: Vec<&str> = metadata.iter().map(|(_, m)| m.as_str()).collect();
            Spi::connect_mut(|c| c.update(&st.metadata, None, &[ids.into(), texts.into()]).map(|_| ()))
                .map_err(|e| e.to_string())?;
        }
        if let Some(out) = self.publish.as_mut() {
            self.publish_bytes += rows.iter().map(|r| r.frame.len()).sum::<usize>();
            if out.rows.len() + rows.len() > PUBLISH_ROWS || self.publish_bytes > PUBLISH_BYTES {
                self.publish = None;
            } else {
                out.rows.extend(rows);
                out.metadata.extend(metadata);
            }
        }
        let open: usize = self.open.values().map(ChunkBuilder::bytes).sum();
        if self.packed_bytes >= WRITE_BYTES || open >= TAKE_BYTES {
            self.finish(st)?;
        }
        Ok(())
    }

    /// Closes every open chunk and writes all packed chunks in one
    /// statement. Chunks of one table stay in commit order and never
    /// overlap: each table's open chunk is closed before the next begins.
    fn finish(&mut self, st: &Statements) -> Result<(), String> {
        for ((relid, label), mut chunk) in std::mem::take(&mut self.open) {
            if let Some(p) = chunk.take() {
                self.packed.push((relid, label, p));
            }
        }
        let packed = std::mem::take(&mut self.packed);
        self.packed_bytes = 0;
        if packed.is_empty() {
            return Ok(());
        }
        let batch = self.batch.unwrap_or(0) as i64;
        let n = packed.len();
        let (mut event_id, mut pos, mut last_event_id, mut last_pos) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut ts, mut relid, mut label, mut changes, mut bytes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (r, l, p) in &packed {
            event_id.push(p.first.0 as i64);
            pos.push(p.first.1 as i32);
            last_event_id.push(p.last.0 as i64);
            last_pos.push(p.last.1 as i32);
            ts.push(p.last_ts);
            relid.push(pg_sys::Oid::from(*r));
            label.push(l.as_str());
            changes.push(p.changes as i32);
            bytes.push(p.bytes.as_slice());
        }
        let batches = vec![batch; n];
        Spi::connect_mut(|c| {
            c.update(
                &st.history,
                None,
                &[
                    event_id.into(),
                    pos.into(),
                    last_event_id.into(),
                    last_pos.into(),
                    batches.into(),
                    ts.into(),
                    relid.into(),
                    label.into(),
                    changes.into(),
                    bytes.into(),
                ],
            )
            .map(|_| ())
        })
        .map_err(|e| e.to_string())
    }
}

/// Debug builds only: `changerelay.debug_fail_label` makes every write of
/// history for that label fail, to exercise retries and dead letters.
fn fail_if_asked(rows: &[HistoryRow]) -> Result<(), String> {
    match crate::gucs::debug_fail_label() {
        Some(label) if rows.iter().any(|r| r.label == label) => Err(format!(
            "changerelay.debug_fail_label = '{label}': refusing to write its history (a test of dead letters)"
        )),
        _ => Ok(()),
    }
}

/// Records that decoding reached `upto` with nothing to write (the WAL since
/// the last write held no tracked change), so the slot may be confirmed
/// there: it never is beyond what the history says it covers. The mark is a
/// sequence value (`changerelay.decoded_mark`): physically replicated like
/// the history, but no change in any logical decoding stream.
pub fn mark_decoded(upto: u64) -> Result<(), String> {
    try_transaction(|| {
        select_one::<i64>(
            "SELECT pg_catalog.setval('changerelay.decoded_mark', $1)",
            &[(upto.min(i64::MAX as u64) as i64).into()],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    })
}
