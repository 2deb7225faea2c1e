//! Version checkpoints: writing the versions the worker holds
//! ([`Unsaved`]) into the version tables.
//!
//! Label versions and floors are upserted into `label_versions` (a few rows).
//! Row versions, the many, go as packed entries into `version_log`
//! (about a dozen bytes a row, `Unsaved::pack_rows`; at most
//! [`FOLD_STEP_ROWS`] rows an entry). While the log holds
//! more than [`FOLD_ABOVE_ROWS`] rows or [`FOLD_ABOVE_ENTRIES`] entries, its
//! oldest entries are folded into `row_versions` a step at a time
//! ([`fold_oldest`], about [`FOLD_STEP_ROWS`] rows a step, each row once
//! however often those entries logged it) and deleted: a step is one short
//! transaction of its own, never part of a batch, so publishing never waits
//! for a whole log. Rows with identifiers longer than shared memory keeps
//! whole are upserted into `row_versions` at once instead (readers list them
//! by name from there). Every write only moves versions forward, and readers
//! take the newest of `row_versions` and the log, so folding the oldest
//! entries first is invisible to them.

use super::persist::Statements;
use changerelay_core::apply::Unsaved;
use changerelay_core::versions::Version;
use pgrx::prelude::*;
use std::collections::BTreeMap;

/// Rows the log may hold before its oldest entries are folded...
const FOLD_ABOVE_ROWS: i64 = 300_000;
/// ...and entries (checkpoints: about an hour of them at one per 10 s).
const FOLD_ABOVE_ENTRIES: i64 = 360;
/// Rows of the oldest entries one fold step takes (whole entries, at least
/// one), and most rows of an entry: a step is about 0.1 s of upserts here,
/// and at one a second far more than pgbench's TPC-B-like load logs, so the
/// log stays bounded.
const FOLD_STEP_ROWS: i64 = 20_000;

/// What the version log holds (read once, then kept by the worker).
#[derive(Debug, Clone, Copy, Default)]
pub struct VersionLog {
    next_id: i64,
    entries: i64,
    rows: i64,
}

impl VersionLog {
    /// Whether its oldest entries are to be folded ([`fold_oldest`]).
    pub fn needs_fold(&self) -> bool {
        self.rows > FOLD_ABOVE_ROWS || self.entries > FOLD_ABOVE_ENTRIES
    }

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
    for (rows, entry) in u.pack_rows(FOLD_STEP_ROWS as usize) {
        Spi::connect_mut(|c| {
            c.update(&st.log, None, &[log.next_id.into(), (rows as i32).into(), entry.into()])
                .map(|_| ())
        })
        .map_err(|e| e.to_string())?;
        log = VersionLog {
            next_id: log.next_id + 1,
            entries: log.entries + 1,
            rows: log.rows + rows as i64,
        };
    }
    Spi::connect_mut(|c| c.update(&st.exact, None, &[true.into()]).map(|_| ())).map_err(|e| e.to_string())?;
    Ok(Saved::Checkpoint(log))
}

/// Folds the log's oldest entries, about [`FOLD_STEP_ROWS`] rows of them,
/// into `row_versions` and deletes them (inside the caller's transaction).
/// Returns the log as it is then.
pub fn fold_oldest(st: &Statements, log: VersionLog) -> Result<VersionLog, String> {
    // The entries' sizes first (a few bytes each), then only the chosen ones.
    let sizes = crate::sql::select_all("SELECT id, rows FROM changerelay.version_log ORDER BY id", &[], |r| {
        Ok((r.get::<i64>(1)?.unwrap_or(0), i64::from(r.get::<i32>(2)?.unwrap_or(0))))
    })
    .map_err(|e| e.to_string())?;
    let (mut upto, mut taken, mut entries) = (None, 0i64, 0i64);
    for (id, rows) in &sizes {
        if taken >= FOLD_STEP_ROWS {
            break;
        }
        upto = Some(*id);
        taken += rows;
        entries += 1;
    }
    let Some(upto) = upto else {
        return Ok(VersionLog {
            next_id: log.next_id,
            entries: 0,
            rows: 0,
        });
    };
    let mut merged: BTreeMap<(String, String), Version> = BTreeMap::new();
    let chosen = crate::sql::select_all(
        "SELECT entries FROM changerelay.version_log WHERE id <= $1 ORDER BY id",
        &[upto.into()],
        |r| r.get::<Vec<u8>>(1).map(Option::unwrap_or_default),
    )
    .map_err(|e| e.to_string())?;
    for entry in chosen {
        for (key, v) in Unsaved::unpack_rows(&entry)? {
            let slot = merged.entry(key).or_default();
            *slot = slot.max(v);
        }
    }
    upsert_rows(st, merged.iter().map(|(k, v)| (k, *v)))?;
    Spi::connect_mut(|c| {
        c.update(
            "DELETE FROM changerelay.version_log WHERE id <= $1",
            None,
            &[upto.into()],
        )
        .map(|_| ())
    })
    .map_err(|e| e.to_string())?;
    Ok(VersionLog {
        next_id: log.next_id,
        entries: (sizes.len() as i64 - entries).max(0),
        rows: sizes.iter().map(|(_, r)| r).sum::<i64>() - taken,
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
