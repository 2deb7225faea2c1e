//! Version checkpoints: writing the versions the worker holds
//! ([`Unsaved`]) into the version tables.
//!
//! Label versions and floors are upserted into `label_versions` (a few rows).
//! Row versions, the many, go as one packed entry into `version_log`
//! (about a dozen bytes a row, `Unsaved::pack_rows`); when the log holds
//! more than [`COMPACT_ROWS`] rows or [`COMPACT_ENTRIES`] entries, it is
//! folded into `row_versions` (each row once, however often it was logged)
//! and emptied. Rows with identifiers longer than shared memory keeps whole
//! are upserted into `row_versions` at once instead (readers list them by
//! name from there). Every write only moves versions forward.

use super::persist::Statements;
use changerelay_core::apply::Unsaved;
use changerelay_core::versions::Version;
use pgrx::prelude::*;
use std::collections::BTreeMap;

/// Rows the log may hold before it is compacted...
const COMPACT_ROWS: i64 = 300_000;
/// ...and entries (checkpoints: about an hour of them at one per 10 s).
const COMPACT_ENTRIES: i64 = 360;
/// Rows upserted per statement when compacting.
const UPSERT_ROWS: usize = 50_000;

/// What the version log holds (read once, then kept by the worker).
#[derive(Debug, Clone, Copy, Default)]
pub struct VersionLog {
    next_id: i64,
    entries: i64,
    rows: i64,
}

impl VersionLog {
    /// Reads the log's size (inside a transaction).
    pub fn read() -> Result<VersionLog, String> {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT coalesce(max(id), 0), count(*), coalesce(sum(rows), 0)::int8 FROM changerelay.version_log",
                Some(1),
                &[],
            )?;
            let r = t.first();
            let n = |i| r.get::<i64>(i).map(|v| v.unwrap_or(0));
            Ok::<_, pgrx::spi::Error>(VersionLog {
                next_id: n(1)? + 1,
                entries: n(2)?,
                rows: n(3)?,
            })
        })
        .map_err(|e| e.to_string())
    }
}

/// How a committed batch left the version tables.
#[derive(Clone, Copy)]
pub enum Saved {
    /// Unchanged.
    Same,
    /// Marked inexact.
    Inexact,
    /// A checkpoint: everything held was written; the log as it is now.
    Checkpoint(VersionLog),
}

/// Writes everything `u` holds and marks the tables exact (inside the
/// caller's transaction).
pub fn write(st: &Statements, u: &Unsaved, log: VersionLog) -> Result<Saved, String> {
    upsert_labels(st, u)?;
    let mut log = log;
    if !u.rows.is_empty() {
        let rows = u.rows.len() as i64;
        let entries = u.pack_rows();
        Spi::connect_mut(|c| {
            c.update(
                &st.log,
                None,
                &[
                    log.next_id.into(),
                    (rows.min(i64::from(i32::MAX)) as i32).into(),
                    entries.into(),
                ],
            )
            .map(|_| ())
        })
        .map_err(|e| e.to_string())?;
        log = VersionLog {
            next_id: log.next_id + 1,
            entries: log.entries + 1,
            rows: log.rows + rows,
        };
    }
    if log.rows > COMPACT_ROWS || log.entries > COMPACT_ENTRIES {
        log = compact(st, log)?;
    }
    Spi::connect_mut(|c| c.update(&st.exact, None, &[true.into()]).map(|_| ())).map_err(|e| e.to_string())?;
    Ok(Saved::Checkpoint(log))
}

/// Folds the log into `row_versions` and empties it.
fn compact(st: &Statements, log: VersionLog) -> Result<VersionLog, String> {
    let mut merged: BTreeMap<(String, String), Version> = BTreeMap::new();
    for entry in read_log()? {
        for (key, v) in Unsaved::unpack_rows(&entry)? {
            let slot = merged.entry(key).or_default();
            *slot = slot.max(v);
        }
    }
    let rows: Vec<_> = merged.into_iter().collect();
    for slice in rows.chunks(UPSERT_ROWS) {
        upsert_rows(st, slice.iter().map(|(k, v)| (k, *v)))?;
    }
    Spi::run("DELETE FROM changerelay.version_log").map_err(|e| e.to_string())?;
    log!(
        "pg_changerelay relay: compacted the version log ({} entries, {} rows) into {} row versions",
        log.entries,
        log.rows,
        rows.len()
    );
    Ok(VersionLog {
        next_id: log.next_id,
        entries: 0,
        rows: 0,
    })
}

/// The log's packed entries, oldest first.
pub fn read_log() -> Result<Vec<Vec<u8>>, String> {
    crate::sql::select_all("SELECT entries FROM changerelay.version_log ORDER BY id", &[], |r| {
        r.get::<Vec<u8>>(1).map(Option::unwrap_or_default)
    })
    .map_err(|e| e.to_string())
}

/// Upserts label versions and floors.
pub fn upsert_labels(st: &Statements, u: &Unsaved) -> Result<(), String> {
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
    if labels.is_empty() {
        return Ok(());
    }
    Spi::connect_mut(|c| {
        c.update(
            &st.labels,
            None,
            &[labels.into(), lv.into(), lts.into(), fv.into(), fts.into()],
        )
        .map(|_| ())
    })
    .map_err(|e| e.to_string())
}

/// Upserts row versions into `row_versions`.
pub fn upsert_rows<'a>(
    st: &Statements,
    rows: impl Iterator<Item = (&'a (String, String), Version)>,
) -> Result<(), String> {
    let (mut rl, mut ri, mut rv, mut rts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((label, id), v) in rows {
        rl.push(label.as_str());
        ri.push(id.as_str());
        rv.push(v.v as i64);
        rts.push(v.ts);
    }
    if rl.is_empty() {
        return Ok(());
    }
    Spi::connect_mut(|c| {
        c.update(&st.rows, None, &[rl.into(), ri.into(), rv.into(), rts.into()])
            .map(|_| ())
    })
    .map_err(|e| e.to_string())
}
