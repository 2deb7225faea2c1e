//! Version checkpoints: writing the versions the worker holds
//! ([`Unsaved`]) into the version tables, and compacting the version log.
//!
//! Label versions and floors are upserted into `label_versions` (a few rows).
//! Row versions, the many, go as packed entries into `version_log` (about a
//! dozen bytes a row, at most [`ENTRY_ROWS`] rows an entry; see
//! `changerelay_core::version_log`). Once the log has grown by more than
//! [`COMPACT_ABOVE_ROWS`] rows (or as many as its last compaction left) or
//! [`COMPACT_ABOVE_ENTRIES`] entries, it is compacted ([`compact`]): each row
//! once, with its newest version, at most as many rows as shared memory holds
//! (7/8 of `changerelay.max_tracked_rows`; older rows are dropped into their
//! label's floor, as the map does when it evicts them), written as new entries that
//! replace the old ones, in a short transaction of its own between batches.
//! A row version is so written about once more, packed, instead of once more
//! as a row of its own. Rows with identifiers longer than shared memory keeps
//! whole are upserted into `row_versions` at once instead (readers list them
//! by name from there; `row_versions` also holds what 0.1.0 wrote). Every
//! write only moves versions forward, and readers take the newest of
//! `row_versions`, the log and the label's floor (read after the rows), so a
//! compaction is invisible to them.

use super::persist::Statements;
use changerelay_core::apply::Unsaved;
use changerelay_core::version_log;
use changerelay_core::versions::Version;
use pgrx::prelude::*;

/// Rows the log may grow by before it is compacted (at least; as many as
/// its last compaction left, so a compaction costs about one more write of
/// each row logged)...
const COMPACT_ABOVE_ROWS: i64 = 300_000;
/// ...and entries (checkpoints: about an hour of them at one per 10 s).
const COMPACT_ABOVE_ENTRIES: i64 = 360;
/// Most rows of an entry.
const ENTRY_ROWS: usize = 20_000;

/// What the version log holds (read once, then kept by the worker).
#[derive(Debug, Clone, Copy, Default)]
pub struct VersionLog {
    next_id: i64,
    entries: i64,
    rows: i64,
    /// What the worker's last compaction left (none yet: zero).
    compacted_entries: i64,
    compacted_rows: i64,
}

impl VersionLog {
    /// Whether it is to be compacted ([`compact`]).
    pub fn needs_compaction(&self) -> bool {
        self.rows - self.compacted_rows > COMPACT_ABOVE_ROWS.max(self.compacted_rows)
            || self.entries - self.compacted_entries > COMPACT_ABOVE_ENTRIES
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
                ..VersionLog::default()
            })
        })
        .map_err(|e| e.to_string())
    }

    /// Appends packed entries (inside the caller's transaction); returns the
    /// log as it is then.
    fn append(mut self, st: &Statements, entries: Vec<(usize, Vec<u8>)>) -> Result<VersionLog, String> {
        for (rows, entry) in entries {
            Spi::connect_mut(|c| {
                c.update(
                    &st.log,
                    None,
                    &[self.next_id.into(), (rows as i32).into(), entry.into()],
                )
                .map(|_| ())
            })
            .map_err(|e| e.to_string())?;
            self.next_id += 1;
            self.entries += 1;
            self.rows += rows as i64;
        }
        Ok(self)
    }
}

impl std::fmt::Display for VersionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rows in {} entries", self.rows, self.entries)
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
    let log = log.append(st, u.pack_rows(ENTRY_ROWS))?;
    Spi::connect_mut(|c| c.update(&st.exact, None, &[true.into()]).map(|_| ())).map_err(|e| e.to_string())?;
    Ok(Saved::Checkpoint(log))
}

/// Replaces the whole log by its compaction, keeping at most `keep` rows
/// (inside the caller's transaction). Returns the log as it is then.
pub fn compact(st: &Statements, log: VersionLog, keep: usize) -> Result<VersionLog, String> {
    let entries = crate::sql::select_all(
        "SELECT id, entries FROM changerelay.version_log ORDER BY id",
        &[],
        |r| Ok((r.get::<i64>(1)?.unwrap_or(0), r.get::<Vec<u8>>(2)?.unwrap_or_default())),
    )
    .map_err(|e| e.to_string())?;
    let Some(upto) = entries.last().map(|(id, _)| *id) else {
        return Ok(VersionLog {
            next_id: log.next_id,
            ..VersionLog::default()
        });
    };
    let mut rows = Vec::new();
    for (_, entry) in &entries {
        rows.extend(version_log::unpack_entry(entry)?);
    }
    drop(entries);
    let compacted = version_log::compact(rows, keep);
    // The dropped rows' floors, in the same transaction as the entries
    // that no longer hold them.
    let floors = Unsaved {
        labels: compacted.floors.clone(),
        floors: compacted.floors,
        ..Unsaved::default()
    };
    upsert_labels(st, &floors)?;
    Spi::connect_mut(|c| {
        c.update(
            "DELETE FROM changerelay.version_log WHERE id <= $1",
            None,
            &[upto.into()],
        )
        .map(|_| ())
    })
    .map_err(|e| e.to_string())?;
    let packed = version_log::pack_entries(compacted.rows.iter().map(|(k, v)| (k, *v)), ENTRY_ROWS);
    let empty = VersionLog {
        next_id: log.next_id.max(upto + 1),
        ..VersionLog::default()
    };
    let after = empty.append(st, packed)?;
    Ok(VersionLog {
        compacted_entries: after.entries,
        compacted_rows: after.rows,
        ..after
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
