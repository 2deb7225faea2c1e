//! Writing a batch: history, metadata, versions, the applied mark and how
//! far decoding reached in one transaction, streamed in chunks so no batch
//! is ever held whole.
//!
//! History rows hold the plugin's binary frames (bytea): nothing is parsed
//! or cast on the way in, so no value a table can hold makes the write fail.
//! Chunks are bounded in rows and bytes, and each chunk's SPI memory is
//! released after it is written. Transactions at or below the applied mark
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

use super::frames::{FrameBuffer, Span};
use crate::sql::select_one;
use crate::txn::try_transaction;
use changerelay_core::apply::VersionUpdates;
use changerelay_core::binary;
use changerelay_core::event::Event;
use changerelay_core::history::HistoryRow;
use changerelay_core::lsn::lsn_to_string;
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};

/// History rows written per statement...
const CHUNK_ROWS: usize = 10_000;
/// ...and bytes of frames (well below the 1 GB limit of an array).
const CHUNK_BYTES: usize = 8 << 20;
/// Per-row versions kept for one batch; beyond, a label's rows fold into
/// its floor (see `VersionUpdates`).
const ROW_LIMIT: usize = 50_000;
/// History rows a batch hands to the endpoint; a larger batch is published
/// without its rows, which clients then read from history.
pub const PUBLISH_ROWS: usize = 10_000;
/// ...and bytes of their frames.
pub const PUBLISH_BYTES: usize = 16 << 20;

const APPLIED: &str = "SELECT applied FROM changerelay.history_horizon";
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
     ON CONFLICT (label, identifier) DO UPDATE SET
        v = greatest(t.v, excluded.v),
        ts = CASE WHEN excluded.v > t.v THEN excluded.ts ELSE t.ts END";
const HISTORY: &str = "INSERT INTO changerelay.history (event_id, pos, ts, relid, label, change)
     SELECT * FROM unnest($1::pg_catalog.int8[], $2::pg_catalog.int4[], $3::pg_catalog.int8[],
                                     $4::pg_catalog.oid[], $5::pg_catalog.text[], $6::pg_catalog.bytea[])";
const METADATA: &str = "INSERT INTO changerelay.history_metadata (event_id, metadata)
     SELECT e, m::pg_catalog.json
       FROM unnest($1::pg_catalog.int8[], $2::pg_catalog.text[]) AS u(e, m)";
const HORIZON: &str = "UPDATE changerelay.history_horizon
     SET applied = greatest(applied, $1), decoded_upto = greatest(coalesce(decoded_upto, 0), $2), timeline = $3";
const DEAD_LETTER: &str = "INSERT INTO changerelay.dead_letters (event_id, xid, labels, error, frames, bytes)
     VALUES ($1, $2, $3, $4, $5, $6)";
const DEAD_LETTER_FRAMES: &str = "INSERT INTO changerelay.dead_letter_frames (event_id, n, frame)
     SELECT $1, * FROM unnest($2::pg_catalog.int4[], $3::pg_catalog.bytea[])";

struct Statements {
    applied: OwnedPreparedStatement,
    labels: OwnedPreparedStatement,
    rows: OwnedPreparedStatement,
    history: OwnedPreparedStatement,
    metadata: OwnedPreparedStatement,
    horizon: OwnedPreparedStatement,
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
            history: c.prepare_mut(HISTORY, &oids(&[I8S, I4S, I8S, OS, TS, BS]))?.keep(),
            metadata: c.prepare_mut(METADATA, &oids(&[I8S, TS]))?.keep(),
            horizon: c.prepare_mut(HORIZON, &oids(&[I8, I8, I8]))?.keep(),
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

#[derive(Default)]
pub struct Persister {
    statements: Option<Statements>,
}

impl Persister {
    /// Applies the frames of `spans` in one transaction and commits it,
    /// recording that decoding reached `upto` (`None`: the end of the last
    /// frame). A Postgres error rolls everything back and is returned as
    /// text.
    pub fn apply(&mut self, frames: &mut FrameBuffer, spans: &[Span], upto: Option<u64>) -> Result<Applied, String> {
        let statements = &mut self.statements;
        try_transaction(|| {
            if statements.is_none() {
                *statements = Some(Spi::connect(Statements::prepare).map_err(|e| e.to_string())?);
            }
            let Some(st) = statements.as_ref() else {
                return Err("statements not prepared".to_string());
            };
            write_batch(st, frames, spans, upto)
        })
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
                if chunk.len() >= 1000 || chunk.iter().map(Vec::len).sum::<usize>() >= CHUNK_BYTES {
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
            if statements.is_none() {
                *statements = Some(Spi::connect(Statements::prepare).map_err(|e| e.to_string())?);
            }
            let Some(st) = statements.as_ref() else {
                return Err("statements not prepared".to_string());
            };
            write_versions(st, &updates, event_id, upto.unwrap_or(last_lsn))?;
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

/// The body of [`Persister::apply`], inside its transaction.
fn write_batch(
    st: &Statements,
    frames: &mut FrameBuffer,
    spans: &[Span],
    upto: Option<u64>,
) -> Result<Applied, String> {
    let applied = Spi::connect(|c| {
        c.select(&st.applied, Some(1), &[])?
            .first()
            .get_one::<i64>()
            .map(|v| v.unwrap_or(0))
    })
    .map_err(|e| e.to_string())?;
    let mut updates = VersionUpdates::with_row_limit(ROW_LIMIT);
    let mut publish = Publish::default();
    let mut last_lsn = 0;
    frames.for_each(spans, |lsn, frame| -> Result<(), String> {
        last_lsn = lsn;
        let event =
            binary::read_event(frame).map_err(|e| format!("undecodable frame at {}: {e}", lsn_to_string(lsn)))?;
        updates.add(&event, frame);
        if updates.history.len() >= CHUNK_ROWS || updates.history_bytes >= CHUNK_BYTES {
            flush(st, &mut updates, applied, &mut publish)?;
        }
        Ok(())
    })?;
    if updates.inside_transaction() {
        return Err("the batch ended inside a transaction (its commit record was not decoded)".into());
    }
    flush(st, &mut updates, applied, &mut publish)?;
    let through = updates.last_commit.map_or(0, |c| c.event_id as i64);
    write_versions(st, &updates, through, upto.unwrap_or(last_lsn))?;
    Ok(Applied {
        updates,
        fresh: publish.rows,
    })
}

/// The rows a batch will publish, until they are too many.
struct Publish {
    rows: Option<Fresh>,
    bytes: usize,
}

impl Default for Publish {
    fn default() -> Self {
        Publish {
            rows: Some(Fresh::default()),
            bytes: 0,
        }
    }
}

/// Writes the queued history rows (those above the applied mark) and the
/// metadata of their transactions, each chunk in an SPI connection of its
/// own so its memory is freed right after.
fn flush(st: &Statements, updates: &mut VersionUpdates, applied: i64, publish: &mut Publish) -> Result<(), String> {
    let (mut rows, metadata) = updates.take_history();
    rows.retain(|r| r.event_id as i64 > applied);
    fail_if_asked(&rows)?;
    if !rows.is_empty() {
        let event_ids: Vec<i64> = rows.iter().map(|r| r.event_id as i64).collect();
        let pos: Vec<i32> = rows.iter().map(|r| r.pos as i32).collect();
        let ts: Vec<i64> = rows.iter().map(|r| r.ts).collect();
        let relid: Vec<pg_sys::Oid> = rows.iter().map(|r| pg_sys::Oid::from(r.relid)).collect();
        let label: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        let change: Vec<&[u8]> = rows.iter().map(|r| r.frame.as_slice()).collect();
        Spi::connect_mut(|c| {
            c.update(
                &st.history,
                None,
                &[
                    event_ids.into(),
                    pos.into(),
                    ts.into(),
                    relid.into(),
                    label.into(),
                    change.into(),
                ],
            )
            .map(|_| ())
        })
        .map_err(|e| e.to_string())?;
    }
    let metadata: Vec<(u64, String)> = metadata.into_iter().filter(|(e, _)| *e as i64 > applied).collect();
    if !metadata.is_empty() {
        let ids: Vec<i64> = metadata.iter().map(|(e, _)| *e as i64).collect();
        let texts: Vec<&str> = metadata.iter().map(|(_, m)| m.as_str()).collect();
        Spi::connect_mut(|c| c.update(&st.metadata, None, &[ids.into(), texts.into()]).map(|_| ()))
            .map_err(|e| e.to_string())?;
    }
    if let Some(out) = publish.rows.as_mut() {
        publish.bytes += rows.iter().map(|r| r.frame.len()).sum::<usize>();
        if out.rows.len() + rows.len() > PUBLISH_ROWS || publish.bytes > PUBLISH_BYTES {
            publish.rows = None;
        } else {
            out.rows.extend(rows);
            out.metadata.extend(metadata);
        }
    }
    Ok(())
}

/// Writes the batch's versions, moves the applied mark to `through` and
/// records that decoding reached `upto` (on this timeline).
fn write_versions(st: &Statements, u: &VersionUpdates, through: i64, upto: u64) -> Result<(), String> {
    Spi::connect_mut(|c| {
        let mut labels: Vec<&str> = Vec::new();
        let (mut lv, mut lts, mut fv, mut fts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for label in u
            .labels
            .keys()
            .chain(u.floors.keys().filter(|l| !u.labels.contains_key(*l)))
        {
            let all = u.labels.get(label).copied().unwrap_or_default();
            let floor = u.floors.get(label).copied().unwrap_or_default();
            labels.push(label);
            lv.push(all.v as i64);
            lts.push(all.ts);
            fv.push(floor.v as i64);
            fts.push(floor.ts);
        }
        if !labels.is_empty() {
            c.update(
                &st.labels,
                None,
                &[labels.into(), lv.into(), lts.into(), fv.into(), fts.into()],
            )?;
        }
        if !u.rows.is_empty() {
            let (mut rl, mut ri, mut rv, mut rts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((label, id), v) in &u.rows {
                rl.push(label.as_str());
                ri.push(id.as_str());
                rv.push(v.v as i64);
                rts.push(v.ts);
            }
            c.update(&st.rows, None, &[rl.into(), ri.into(), rv.into(), rts.into()])?;
        }
        let timeline = i64::from(crate::ha::current_timeline());
        c.update(
            &st.horizon,
            None,
            &[
                through.into(),
                (upto.min(i64::MAX as u64) as i64).into(),
                timeline.into(),
            ],
        )?;
        Ok::<_, pgrx::spi::Error>(())
    })
    .map_err(|e| e.to_string())
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
