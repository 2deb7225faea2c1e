//! The version log's entries: row versions packed for
//! `changerelay.version_log`, and the compaction that keeps the log bounded.
//!
//! An entry is a [`crate::pack`]ed body holding, per row, the label and the
//! identifier (both length prefixed), the version and its time (zigzag).
//! Rows come in key order, so the labels repeat and compress away: about a
//! dozen bytes a row.
//!
//! Versions only move forward, so the newest version of a row is the
//! greatest one any entry holds, whatever the entries' order: any set of
//! entries can be replaced by their [`compact`]ion at any time. A compaction
//! keeps at most `keep` rows, the newest, which is all a version map of that
//! capacity would hold after loading them; each older row is dropped into
//! its label's floor (every row of the label is at least that new), so a
//! reader of a dropped row sees a version at least as new as its own, never
//! an older one.

use crate::apply::RowVersion;
use crate::pack;
use crate::versions::Version;
use std::collections::BTreeMap;

/// Packs rows (in the order given; key order packs best) into entries of at
/// most `per_entry` rows each, as (rows, bytes).
pub fn pack_entries<'a>(
    rows: impl Iterator<Item = (&'a (String, String), Version)>,
    per_entry: usize,
) -> Vec<(usize, Vec<u8>)> {
    let per_entry = per_entry.max(1);
    let mut out = Vec::new();
    let mut raw = Vec::new();
    let mut n = 0;
    for ((label, id), v) in rows {
        pack::put_bytes(&mut raw, label.as_bytes());
        pack::put_bytes(&mut raw, id.as_bytes());
        pack::put_varint(&mut raw, v.v);
        pack::put_varint(&mut raw, pack::zigzag(v.ts));
        n += 1;
        if n == per_entry {
            out.push((n, pack::pack(&raw)));
            raw.clear();
            n = 0;
        }
    }
    if n > 0 {
        out.push((n, pack::pack(&raw)));
    }
    out
}

/// The row versions of an entry, in the order packed.
pub fn unpack_entry(bytes: &[u8]) -> Result<Vec<RowVersion>, String> {
    let raw = pack::unpack(bytes).map_err(|e| format!("a damaged version log entry: {e}"))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < raw.len() {
        let label = text(pack::get_bytes(&raw, &mut at)?);
        let id = text(pack::get_bytes(&raw, &mut at)?);
        let v = pack::get_varint(&raw, &mut at)?;
        let ts = pack::unzigzag(pack::get_varint(&raw, &mut at)?);
        out.push(((label, id), Version { v, ts }));
    }
    Ok(out)
}

/// What a compaction leaves: the rows kept, in key order, and the floors
/// the dropped rows raise.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    pub rows: Vec<RowVersion>,
    /// Per label, the newest version of its dropped rows.
    pub floors: BTreeMap<String, Version>,
}

/// Each row once, with its newest version; at most `keep` rows (the newest
/// by version; of rows with the same version, the first by key), the others
/// dropped into their label's floor.
pub fn compact(rows: impl IntoIterator<Item = RowVersion>, keep: usize) -> Compacted {
    let mut all: Vec<RowVersion> = rows.into_iter().collect();
    // Entries are sorted runs, which a stable sort merges.
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 = kept.1.max(later.1);
        }
        same
    });
    let mut floors = BTreeMap::new();
    if all.len() <= keep {
        return Compacted { rows: all, floors };
    }
    // The oldest version kept, and how many rows of that version are kept.
    let (cutoff, mut at_cutoff) = if keep == 0 {
        (u64::MAX, 0)
    } else {
        let mut vs: Vec<u64> = all.iter().map(|(_, v)| v.v).collect();
        let drop = all.len() - keep;
        let (_, &mut cutoff, newer) = vs.select_nth_unstable(drop);
        (cutoff, keep - newer.iter().filter(|&&v| v > cutoff).count())
    };
    let mut kept = Vec::with_capacity(keep);
    for (key, v) in all {
        let stays = v.v > cutoff || (v.v == cutoff && at_cutoff > 0);
        if stays {
            if v.v == cutoff {
                at_cutoff -= 1;
            }
            kept.push((key, v));
        } else {
            let floor: &mut Version = floors.entry(key.0).or_default();
            *floor = floor.max(v);
        }
    }
    Compacted { rows: kept, floors }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u64) -> Version {
        Version {
            v: n,
            ts: 1_764_000_000_000 + n as i64,
        }
    }

    fn row(label: &str, id: &str, n: u64) -> RowVersion {
        ((label.into(), id.into()), v(n))
    }

    fn rows(list: &[(&str, &str, u64)]) -> Vec<RowVersion> {
        list.iter().map(|&(label, id, n)| row(label, id, n)).collect()
    }

    #[test]
    fn entries_pack_a_dozen_bytes_a_row_and_unpack_as_packed() {
        let rows: BTreeMap<(String, String), Version> = (0..1000u64)
            .map(|i| (("pgbench_accounts".into(), i.to_string()), v(90_000_000 + i)))
            .collect();
        let entries = pack_entries(rows.iter().map(|(k, v)| (k, *v)), 1000);
        assert_eq!(entries.len(), 1);
        let (n, packed) = &entries[0];
        assert_eq!(*n, 1000);
        assert!(packed.len() < 1000 * 16, "about a dozen bytes a row: {}", packed.len());
        let back = unpack_entry(packed).unwrap_or_default();
        assert_eq!(back, rows.clone().into_iter().collect::<Vec<_>>());
        assert!(unpack_entry(&packed[..packed.len() - 2]).is_err());
        // At most 300 rows an entry: 300, 300, 300, 100, in order.
        let split = pack_entries(rows.iter().map(|(k, v)| (k, *v)), 300);
        assert_eq!(
            split.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![300, 300, 300, 100]
        );
        let mut again = Vec::new();
        for (n, bytes) in &split {
            let part = unpack_entry(bytes).unwrap_or_default();
            assert_eq!(part.len(), *n);
            again.extend(part);
        }
        assert_eq!(again, back);
        assert!(pack_entries(std::iter::empty(), 300).is_empty());
    }

    #[test]
    fn a_compaction_keeps_each_rows_newest_version_in_key_order() {
        let input = rows(&[
            ("a", "2", 5),
            ("a", "1", 9),
            ("b", "1", 3),
            ("a", "2", 4),
            ("a", "1", 7),
            ("a", "2", 8),
        ]);
        let c = compact(input, 10);
        assert_eq!(c.rows, vec![row("a", "1", 9), row("a", "2", 8), row("b", "1", 3)]);
        assert!(c.floors.is_empty());
        assert_eq!(compact(Vec::new(), 10), Compacted::default());
    }

    #[test]
    fn past_its_capacity_a_compaction_drops_the_oldest_rows_into_their_floors() {
        let input = rows(&[
            ("a", "1", 1),
            ("a", "2", 6),
            ("b", "1", 2),
            ("b", "2", 3),
            ("a", "3", 5),
            ("b", "2", 4),
        ]);
        let c = compact(input, 2);
        // Newest two: a/2 (6) and a/3 (5); dropped: a/1 (1), b/1 (2), b/2 (4).
        assert_eq!(c.rows, vec![row("a", "2", 6), row("a", "3", 5)]);
        assert_eq!(
            c.floors,
            BTreeMap::from([("a".to_string(), v(1)), ("b".to_string(), v(4))])
        );
        // Rows of one transaction share its version: the first by key stay.
        let ties = compact(
            vec![row("a", "3", 5), row("a", "1", 5), row("a", "2", 5), row("a", "0", 9)],
            3,
        );
        assert_eq!(ties.rows, vec![row("a", "0", 9), row("a", "1", 5), row("a", "2", 5)]);
        assert_eq!(ties.floors, BTreeMap::from([("a".to_string(), v(5))]));
        let none = compact(vec![row("a", "1", 1), row("a", "2", 2)], 0);
        assert!(none.rows.is_empty());
        assert_eq!(none.floors, BTreeMap::from([("a".to_string(), v(2))]));
    }

    #[test]
    fn every_dropped_row_reads_at_least_as_new_as_it_was() {
        // Any input, any capacity: a row's version after compaction (its own,
        // or its label's floor when dropped) is never older than its newest
        // input version, and a kept row keeps exactly that version.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let n = (next() % 60) as usize;
            let input: Vec<RowVersion> = (0..n)
                .map(|_| {
                    let label = ["a", "b", "c"][(next() % 3) as usize];
                    row(label, &(next() % 20).to_string(), 1 + next() % 100)
                })
                .collect();
            let keep = (next() % 25) as usize;
            let c = compact(input.clone(), keep);
            let distinct: std::collections::BTreeSet<_> = input.iter().map(|(k, _)| k.clone()).collect();
            assert_eq!(c.rows.len(), keep.min(distinct.len()));
            assert!(c.rows.windows(2).all(|w| w[0].0 < w[1].0), "key order, each row once");
            for ((label, id), was) in &input {
                let kept = c.rows.iter().find(|(k, _)| k.0 == *label && k.1 == *id);
                let floor = c.floors.get(label).copied().unwrap_or_default();
                let now = kept.map_or(floor, |(_, v)| v.max(floor));
                assert!(now.v >= was.v, "{label}/{id}: {was:?} read as {now:?}");
            }
        }
    }
}
