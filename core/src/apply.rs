//! What the relay worker does with a batch of decoded events: the version
//! updates it implies (merged so each label and row is written once) and
//! the history rows it records.

use crate::event::{Event, TxnHeader};
use crate::history::HistoryRow;
use crate::images;
use crate::time::unix_us_to_ms;
use crate::versions::Version;
use std::collections::{BTreeMap, BTreeSet};

/// The table holding tracking state; its changes move versions but are not
/// history.
pub const CONFIG_TABLE: (&str, &str) = ("changerelay", "tracked_tables");

/// Version updates and history of a batch of complete transactions.
///
/// History rows are queued in commit order as changes arrive (the applier
/// takes them in chunks with [`VersionUpdates::take_history`], so a huge
/// transaction never sits in memory whole). Per-row versions are kept up to
/// `row_limit` entries; past it, a label's rows are folded into its floor
/// (every row of the label moves), which is always correct and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionUpdates {
    /// Label → its new `all` version.
    pub labels: BTreeMap<String, Version>,
    /// (label, identifier) → the row's new version.
    pub rows: BTreeMap<(String, String), Version>,
    /// Label → every row of it moves to at least this version (truncate, a
    /// change whose row identifier is unknown, or too many rows in a batch).
    pub floors: BTreeMap<String, Version>,
    /// History rows not yet taken, in commit order.
    pub history: Vec<HistoryRow>,
    /// Bytes of frames in `history`.
    pub history_bytes: usize,
    /// (event id, merged metadata JSON object) of committed transactions
    /// that carried metadata.
    pub metadata: Vec<(u64, String)>,
    /// The transaction being read: its header and next history position.
    open: Option<(TxnHeader, u32)>,
    /// Most entries `rows` may hold.
    row_limit: usize,
    /// Labels whose rows were folded into their floor in this batch.
    folded: BTreeSet<String>,
    /// Recent row images of the batch, for deletes ([`images`]).
    images: images::Images,
    /// Positions in `history` of deletes still without an image (to look
    /// for in stored history).
    pub needs_image: Vec<usize>,
    /// Labels tracked with `history => false`, as of the event being read
    /// (set by the caller before the batch, followed through the batch's
    /// changes of the tracking table).
    pub no_history: BTreeSet<String>,
    /// The last committed transaction of the batch.
    pub last_commit: Option<TxnHeader>,
    pub transactions: u64,
    pub changes: u64,
}

impl Default for VersionUpdates {
    fn default() -> Self {
        VersionUpdates::with_row_limit(usize::MAX)
    }
}

fn version_of(h: &TxnHeader) -> Version {
    Version {
        v: h.event_id,
        ts: unix_us_to_ms(h.commit_us),
    }
}

fn raise<K: Ord>(map: &mut BTreeMap<K, Version>, key: K, v: Version) {
    let slot = map.entry(key).or_default();
    *slot = slot.max(v);
}

impl VersionUpdates {
    pub fn with_row_limit(row_limit: usize) -> VersionUpdates {
        VersionUpdates {
            labels: BTreeMap::new(),
            rows: BTreeMap::new(),
            floors: BTreeMap::new(),
            history: Vec::new(),
            history_bytes: 0,
            metadata: Vec::new(),
            open: None,
            row_limit,
            folded: BTreeSet::new(),
            images: images::Images::default(),
            needs_image: Vec::new(),
            no_history: BTreeSet::new(),
            last_commit: None,
            transactions: 0,
            changes: 0,
        }
    }

    /// Files one decoded event; `frame` is the binary frame it was read from.
    pub fn add(&mut self, event: &Event<'_>, frame: &[u8]) {
        match event {
            Event::Begin(h) => self.open = Some((*h, 0)),
            Event::Change(c) => {
                self.changes += 1;
                let Some(t) = &c.tracking else { return };
                let v = version_of(&c.txn);
                raise(&mut self.labels, t.label.to_string(), v);
                for id in [&t.identifier, &t.old_identifier].into_iter().flatten() {
                    self.raise_row(&t.label, id, v);
                }
                if t.unknown_identifier {
                    raise(&mut self.floors, t.label.to_string(), v);
                }
                if (c.schema.as_ref(), c.table.as_ref()) == CONFIG_TABLE {
                    self.note_policy(&t.label, c.new.as_ref());
                    return;
                }
                if !self.keeps_history(&t.label) {
                    return;
                }
                if !images::wants_image(c) {
                    self.images.note(t.relid, c, frame);
                    self.queue(&c.txn, t.relid, &t.label, frame);
                    return;
                }
                match self
                    .images
                    .image_for(t.relid, c)
                    .map(|img| images::with_image(frame, img))
                {
                    Some(Ok(with)) => self.queue(&c.txn, t.relid, &t.label, &with),
                    _ => {
                        self.needs_image.push(self.history.len());
                        self.queue(&c.txn, t.relid, &t.label, frame);
                    }
                }
            }
            Event::Truncate(t) => {
                self.changes += 1;
                let v = version_of(&t.txn);
                for label in t.labels() {
                    raise(&mut self.labels, label.to_string(), v);
                    raise(&mut self.floors, label.to_string(), v);
                }
                for table in &t.tracked {
                    if self.keeps_history(&table.label) {
                        self.queue(&t.txn, table.relid, &table.label, frame);
                    }
                }
            }
            Event::Commit(c) => {
                self.transactions += 1;
                self.last_commit = Some(c.txn);
                self.open = None;
                if let Some(m) = &c.metadata {
                    self.metadata.push((c.txn.event_id, m.to_string()));
                }
            }
            Event::Message(_) | Event::Metadata(_) => {}
        }
    }

    /// Whether changes of `label` are kept as history (`track(…, history =>
    /// false)` keeps versions only).
    pub fn keeps_history(&self, label: &str) -> bool {
        !self.no_history.contains(label)
    }

    /// A change of the tracking table: its new row says whether its label
    /// keeps history (column `history`; absent or not false: it does).
    fn note_policy(&mut self, label: &str, new: Option<&crate::event::Row<'_>>) {
        let Some(row) = new else { return };
        let off = row
            .iter()
            .any(|c| c.name == "history" && c.value == crate::event::Value::Scalar(crate::event::Scalar::Bool(false)));
        if off {
            self.no_history.insert(label.to_string());
        } else {
            self.no_history.remove(label);
        }
    }

    fn raise_row(&mut self, label: &str, id: &str, v: Version) {
        if self.folded.contains(label) {
            raise(&mut self.floors, label.to_string(), v);
            return;
        }
        raise(&mut self.rows, (label.to_string(), id.to_string()), v);
        if self.rows.len() > self.row_limit {
            self.fold_largest_label();
        }
    }

    /// Replaces the per-row entries of the label with the most of them by
    /// one floor at their newest version.
    fn fold_largest_label(&mut self) {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (label, _) in self.rows.keys() {
            *counts.entry(label.as_str()).or_default() += 1;
        }
        let Some(label) = counts.into_iter().max_by_key(|(_, n)| *n).map(|(l, _)| l.to_string()) else {
            return;
        };
        let mut newest = Version::default();
        self.rows.retain(|(l, _), v| {
            if *l == label {
                newest = newest.max(*v);
                false
            } else {
                true
            }
        });
        raise(&mut self.floors, label.clone(), newest);
        self.folded.insert(label);
    }

    /// Queues a history row of the transaction being read, at its next position.
    fn queue(&mut self, txn: &TxnHeader, relid: u32, label: &str, frame: &[u8]) {
        let pos = match &mut self.open {
            Some((h, next)) if h.event_id == txn.event_id => {
                *next += 1;
                *next - 1
            }
            _ => {
                self.open = Some((*txn, 1));
                0
            }
        };
        self.history_bytes += frame.len();
        self.history.push(HistoryRow {
            event_id: txn.event_id,
            pos,
            ts: unix_us_to_ms(txn.commit_us),
            relid,
            label: label.to_string(),
            frame: frame.to_vec(),
        });
    }

    /// Takes the queued history rows (and their metadata) for writing;
    /// `needs_image` then holds positions in the rows taken.
    pub fn take_history(&mut self) -> (Vec<HistoryRow>, Vec<(u64, String)>) {
        self.history_bytes = 0;
        (std::mem::take(&mut self.history), std::mem::take(&mut self.metadata))
    }

    /// Whether the batch ended inside a transaction (its commit not read).
    pub fn inside_transaction(&self) -> bool {
        self.open.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.rows.is_empty() && self.floors.is_empty() && self.history.is_empty()
    }

    /// Folds the updates of a later batch into these (both applied already;
    /// they are published together): every version the maximum of the two,
    /// the later last commit, counts added. The row limit still holds.
    pub fn absorb(&mut self, later: VersionUpdates) {
        for (label, v) in later.labels {
            raise(&mut self.labels, label, v);
        }
        for (label, v) in later.floors {
            raise(&mut self.floors, label, v);
        }
        self.folded.extend(later.folded);
        for ((label, id), v) in later.rows {
            self.raise_row(&label, &id, v);
        }
        self.history.extend(later.history);
        self.history_bytes += later.history_bytes;
        self.metadata.extend(later.metadata);
        if later
            .last_commit
            .is_some_and(|l| self.last_commit.is_none_or(|c| l.event_id > c.event_id))
        {
            self.last_commit = later.last_commit;
        }
        self.transactions += later.transactions;
        self.changes += later.changes;
        self.no_history = later.no_history;
    }
}

/// A row's version: ((label, identifier), version).
pub type RowVersion = ((String, String), Version);

/// Versions applied to shared memory but not yet written to the version
/// tables: the relay worker writes them at a version checkpoint instead of
/// with every batch (a row changed a thousand times between checkpoints is
/// written once). Until then the tables say they are not exact, and a
/// restart that finds them so raises every label's floor to the end of WAL:
/// a spurious increment, never a missed one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unsaved {
    pub labels: BTreeMap<String, Version>,
    pub floors: BTreeMap<String, Version>,
    pub rows: BTreeMap<(String, String), Version>,
}

impl Unsaved {
    /// Adds a batch's versions (each key keeps its newest version). Rows
    /// with identifiers too long to be kept whole in shared memory are not
    /// kept here: they are returned, to be written at once (readers list
    /// them by name from the table).
    pub fn add(&mut self, u: &VersionUpdates) -> Vec<RowVersion> {
        for (label, v) in &u.labels {
            raise(&mut self.labels, label.clone(), *v);
        }
        for (label, v) in &u.floors {
            raise(&mut self.floors, label.clone(), *v);
        }
        let mut long = Vec::new();
        for (key, v) in &u.rows {
            if key.1.len() > crate::versions::IDENT_INLINE {
                long.push((key.clone(), *v));
            } else {
                raise(&mut self.rows, key.clone(), *v);
            }
        }
        long
    }

    /// Everything a version map holds (rows with identifiers kept whole
    /// only: the others are in the tables already, see [`Unsaved::add`]).
    pub fn of_map(m: &crate::versions::VersionMap<'_>) -> Unsaved {
        let mut out = Unsaved::default();
        for l in m.labels.iter().filter(|l| l.in_use) {
            out.labels.insert(l.name().to_string(), l.all);
            if l.floor.is_set() {
                out.floors.insert(l.name().to_string(), l.floor);
            }
        }
        for e in m.entries.iter().filter(|e| e.hash != 0 && !e.is_truncated()) {
            if let Some(l) = m.label(e.label) {
                let id = String::from_utf8_lossy(e.ident()).into_owned();
                out.rows.insert((l.name().to_string(), id), e.version);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.floors.is_empty() && self.rows.is_empty()
    }

    /// The row versions, packed for entries of the version log of at most
    /// `per_entry` rows each, as (rows, bytes) (see `crate::version_log`).
    pub fn pack_rows(&self, per_entry: usize) -> Vec<(usize, Vec<u8>)> {
        crate::version_log::pack_entries(self.rows.iter().map(|(k, v)| (k, *v)), per_entry)
    }

    /// Entries held (what a checkpoint will write).
    pub fn len(&self) -> usize {
        self.labels.len() + self.floors.len() + self.rows.len()
    }
}

/// Fewest transactions a gather must be expected to collect: below that it
/// saves little WAL and only adds latency (and, since a gathered batch holds
/// several transactions, it would keep itself going at moderate rates).
const MIN_GATHERED: f64 = 4.0;

/// How long a relay worker lets commits gather before its next batch: none
/// unless the last batch held several transactions (commits come faster
/// than one per batch) and at that rate (`transactions` in `since`) at least
/// [`MIN_GATHERED`] arrive within `max`; then the time in which `target`
/// transactions arrive, at most `max`.
pub fn gather_time(
    transactions: u64,
    since: std::time::Duration,
    target: u64,
    max: std::time::Duration,
) -> Option<std::time::Duration> {
    if transactions < 2 || max.is_zero() || since.is_zero() {
        return None;
    }
    let per_transaction = since.as_secs_f64() / transactions as f64;
    if max.as_secs_f64() / per_transaction < MIN_GATHERED {
        return None;
    }
    Some(std::time::Duration::from_secs_f64(per_transaction * target as f64).min(max))
}

/// The moved versions of one label, as an endpoint sends them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelDelta {
    pub label: String,
    /// `{"all":{"v":..,"ts":..},"<identifier>":{"v":..,"ts":..}}`: only the
    /// entries this batch moved.
    pub data: String,
    /// Every row of the label moved (truncate, or a row the batch could not
    /// identify): send the whole map instead of `data`.
    pub whole_label: bool,
}

impl VersionUpdates {
    /// The batch's moved versions per label, in label order.
    pub fn deltas(&self) -> Vec<LabelDelta> {
        let mut out = Vec::with_capacity(self.labels.len());
        for (label, all) in &self.labels {
            let from = (label.clone(), String::new());
            let rows = self.rows.range(from..).take_while(|((l, _), _)| l == label);
            let data = crate::versions::data_json(Some(*all), rows.map(|((_, id), v)| (id.as_str(), *v)));
            out.push(LabelDelta {
                label: label.clone(),
                data,
                whole_label: self.floors.contains_key(label),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;

    fn h(event_id: u64) -> TxnHeader {
        TxnHeader {
            xid: 1,
            event_id,
            commit_us: event_id as i64 * 1000,
        }
    }

    fn change(event_id: u64, label: &str, id: Option<&str>, old: Option<&str>, unknown: bool) -> Event<'static> {
        Event::Change(Change {
            txn: h(event_id),
            seq: 0,
            op: Op::Update,
            schema: "public".into(),
            table: "t".into(),
            key: Some(vec![Column {
                name: "id".into(),
                value: Value::Scalar(Scalar::Int(1)),
            }]),
            new: None,
            old: None,
            unchanged_toast: vec![],
            tracking: Some(Tracking {
                relid: 42,
                label: label.to_string().into(),
                identifier: id.map(|s| s.to_string().into()),
                old_identifier: old.map(|s| s.to_string().into()),
                unknown_identifier: unknown,
            }),
        })
    }

    fn commit(event_id: u64, metadata: Option<&'static str>) -> Event<'static> {
        Event::Commit(Commit {
            txn: h(event_id),
            changes: 1,
            metadata: metadata.map(Into::into),
        })
    }

    /// Files an event with a stand-in frame (the event's own encoding).
    fn add(u: &mut VersionUpdates, e: &Event<'_>) {
        let mut frame = Vec::new();
        crate::binary::write_event(e, &mut frame).unwrap_or_else(|e| panic!("{e}"));
        u.add(e, &frame);
    }

    #[test]
    fn merges_to_the_newest_version() {
        let mut u = VersionUpdates::default();
        add(&mut u, &Event::Begin(h(10)));
        add(&mut u, &change(10, "p", Some("A"), None, false));
        add(&mut u, &commit(10, None));
        add(&mut u, &Event::Begin(h(20)));
        add(&mut u, &change(20, "p", Some("B"), Some("A"), false));
        add(&mut u, &change(20, "q", None, None, true));
        add(&mut u, &commit(20, Some("{\"who\":\"ann\"}")));
        assert_eq!(u.labels["p"], Version { v: 20, ts: 20 });
        assert_eq!(u.rows[&("p".into(), "A".into())].v, 20);
        assert_eq!(u.rows[&("p".into(), "B".into())].v, 20);
        assert_eq!(u.floors["q"].v, 20);
        assert_eq!(u.last_commit.map(|c| c.event_id), Some(20));
        assert_eq!((u.transactions, u.changes), (2, 3));
        assert!(!u.inside_transaction());
        let positions: Vec<_> = u.history.iter().map(|r| (r.event_id, r.pos, r.ts)).collect();
        assert_eq!(positions, vec![(10, 0, 10), (20, 0, 20), (20, 1, 20)]);
        assert_eq!(u.metadata, vec![(20, "{\"who\":\"ann\"}".to_string())]);
        let view = u.history[0].view().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(view.key.as_deref(), Some("{\"id\":1}"));
        assert_eq!(view.op, "update");
        let bytes: usize = u.history.iter().map(|r| r.frame.len()).sum();
        assert_eq!(u.history_bytes, bytes);
        let (rows, meta) = u.take_history();
        assert_eq!((rows.len(), meta.len(), u.history_bytes), (3, 1, 0));
        assert!(u.history.is_empty() && u.metadata.is_empty());
    }

    #[test]
    fn truncate_raises_floor_and_all_and_records_each_table() {
        let mut u = VersionUpdates::default();
        add(&mut u, &Event::Begin(h(7)));
        add(
            &mut u,
            &Event::Truncate(Truncate {
                txn: h(7),
                seq: 0,
                tables: vec!["public.a".into(), "public.b".into()],
                cascade: false,
                restart_identity: false,
                tracked: vec![
                    TruncatedTable {
                        relid: 1,
                        table: "public.a".into(),
                        label: "x".into(),
                    },
                    TruncatedTable {
                        relid: 2,
                        table: "public.b".into(),
                        label: "x".into(),
                    },
                ],
            }),
        );
        add(&mut u, &commit(7, None));
        assert_eq!(u.labels["x"].v, 7);
        assert_eq!(u.floors["x"].v, 7);
        let rows: Vec<_> = u
            .history
            .iter()
            .map(|r| (r.pos, r.relid, r.view().map(|v| v.op).unwrap_or("?")))
            .collect();
        assert_eq!(rows, vec![(0, 1, "truncate"), (1, 2, "truncate")]);
    }

    #[test]
    fn untracked_and_config_changes_are_not_history() {
        let mut u = VersionUpdates::default();
        let mut e = change(5, "x", Some("1"), None, false);
        if let Event::Change(c) = &mut e {
            c.tracking = None;
        }
        add(&mut u, &e);
        assert!(u.is_empty());
        let mut cfg = change(6, "x", None, None, false);
        if let Event::Change(c) = &mut cfg {
            c.schema = "changerelay".into();
            c.table = "tracked_tables".into();
        }
        add(&mut u, &cfg);
        add(&mut u, &commit(6, None));
        assert_eq!(u.labels["x"].v, 6, "tracking changes move the label");
        assert!(u.history.is_empty());
    }

    #[test]
    fn labels_tracked_without_history_keep_versions_only() {
        let mut u = VersionUpdates::default();
        u.no_history.insert("v".into());
        let config = |event_id, label: &str, history: bool| {
            let mut e = change(event_id, label, None, None, false);
            if let Event::Change(c) = &mut e {
                c.schema = "changerelay".into();
                c.table = "tracked_tables".into();
                c.new = Some(vec![Column {
                    name: "history".into(),
                    value: Value::Scalar(Scalar::Bool(history)),
                }]);
            }
            e
        };
        add(&mut u, &Event::Begin(h(1)));
        add(&mut u, &change(1, "v", Some("a"), None, false));
        add(&mut u, &change(1, "h", Some("a"), None, false));
        add(&mut u, &config(1, "v", true));
        add(&mut u, &config(1, "h", false));
        add(&mut u, &change(1, "v", Some("b"), None, false));
        add(&mut u, &change(1, "h", Some("b"), None, false));
        add(&mut u, &commit(1, None));
        let kept: Vec<_> = u.history.iter().map(|r| (r.label.as_str(), r.pos)).collect();
        assert_eq!(
            kept,
            vec![("h", 0), ("v", 1)],
            "each label as its policy stood at the change"
        );
        assert_eq!(u.rows.len(), 4, "versions move for every change");
        assert!(u.keeps_history("v") && !u.keeps_history("h"));
    }

    #[test]
    fn a_transaction_left_open_at_the_end_of_a_batch_is_reported() {
        let mut u = VersionUpdates::default();
        add(&mut u, &Event::Begin(h(9)));
        add(&mut u, &change(9, "p", Some("A"), None, false));
        assert!(u.inside_transaction(), "the applier refuses to commit such a batch");
    }

    #[test]
    fn too_many_rows_fold_into_the_label_floor() {
        let mut u = VersionUpdates::with_row_limit(3);
        add(&mut u, &Event::Begin(h(10)));
        add(&mut u, &change(10, "small", Some("s"), None, false));
        for id in ["a", "b", "c"] {
            add(&mut u, &change(10, "big", Some(id), None, false));
        }
        add(&mut u, &commit(10, None));
        add(&mut u, &Event::Begin(h(20)));
        add(&mut u, &change(20, "big", Some("d"), None, false));
        add(&mut u, &commit(20, None));
        assert_eq!(u.rows.len(), 1, "only the small label keeps per-row entries");
        assert_eq!(u.rows[&("small".into(), "s".into())].v, 10);
        assert_eq!(u.floors["big"].v, 20, "later rows of a folded label raise its floor");
        assert_eq!(u.labels["big"].v, 20);
        assert_eq!(u.history.len(), 5, "history is unaffected");
    }

    #[test]
    fn unsaved_versions_keep_the_newest_and_hand_back_long_identifiers() {
        let mut u = VersionUpdates::default();
        let v = |v| Version { v, ts: 1 };
        let long = "x".repeat(crate::versions::IDENT_INLINE + 1);
        u.labels.insert("a".into(), v(10));
        u.rows.insert(("a".into(), "k".into()), v(10));
        u.rows.insert(("a".into(), long.clone()), v(10));
        let mut s = Unsaved::default();
        assert_eq!(s.add(&u), vec![(("a".to_string(), long), v(10))]);
        let mut older = VersionUpdates::default();
        older.labels.insert("a".into(), v(5));
        older.rows.insert(("a".into(), "k".into()), v(5));
        older.floors.insert("b".into(), v(7));
        assert!(s.add(&older).is_empty());
        assert_eq!(s.labels["a"], v(10));
        assert_eq!(s.rows[&("a".into(), "k".into())], v(10));
        assert_eq!(s.floors["b"], v(7));
        assert_eq!(s.len(), 3);
        assert!(!s.is_empty() && Unsaved::default().is_empty());
    }

    #[test]
    fn a_busy_worker_gathers_up_to_a_bound() {
        use std::time::Duration as D;
        let max = D::from_millis(3);
        assert_eq!(
            gather_time(1, D::from_millis(1), 16, max),
            None,
            "one commit per batch: no wait"
        );
        assert_eq!(
            gather_time(8, D::from_millis(2), 16, max),
            Some(D::from_millis(3)),
            "capped"
        );
        assert_eq!(gather_time(20, D::from_millis(2), 16, max), Some(D::from_micros(1600)));
        assert_eq!(gather_time(20, D::from_millis(2), 16, D::ZERO), None, "switched off");
        assert_eq!(
            gather_time(3, D::from_millis(3), 16, max),
            None,
            "1,000 commits/s: three would gather in 3 ms, not worth the latency"
        );
        assert_eq!(
            gather_time(5, D::from_millis(3), 16, max),
            Some(max),
            "about 1,700 commits/s: worth it"
        );
    }

    #[test]
    fn absorbing_a_later_batch_keeps_the_newest_of_everything() {
        let mut a = VersionUpdates::with_row_limit(2);
        add(&mut a, &Event::Begin(h(10)));
        add(&mut a, &change(10, "p", Some("A"), None, false));
        add(&mut a, &commit(10, None));
        let mut b = VersionUpdates::with_row_limit(2);
        add(&mut b, &Event::Begin(h(20)));
        add(&mut b, &change(20, "p", Some("B"), None, false));
        add(&mut b, &change(20, "q", None, None, true));
        add(&mut b, &commit(20, None));
        a.take_history();
        b.take_history();
        a.absorb(b);
        assert_eq!(a.labels["p"].v, 20);
        assert_eq!(
            (a.rows[&("p".into(), "A".into())].v, a.rows[&("p".into(), "B".into())].v),
            (10, 20)
        );
        assert_eq!(a.floors["q"].v, 20);
        assert_eq!(a.last_commit.map(|c| c.event_id), Some(20));
        assert_eq!((a.transactions, a.changes), (2, 3));
        let mut c = VersionUpdates::with_row_limit(2);
        add(&mut c, &Event::Begin(h(30)));
        add(&mut c, &change(30, "p", Some("C"), None, false));
        add(&mut c, &commit(30, None));
        a.absorb(c);
        assert!(a.rows.len() <= 2, "the row limit holds: {:?}", a.rows);
        assert_eq!(a.floors["p"].v, 30, "folded rows are covered by the floor");
    }

    #[test]
    fn deltas_hold_only_moved_entries_per_label() {
        let mut u = VersionUpdates::default();
        let v = |v| Version { v, ts: 7 };
        u.labels.insert("a".into(), v(10));
        u.labels.insert("b".into(), v(11));
        u.rows.insert(("a".into(), "x".into()), v(10));
        u.rows.insert(("ab".into(), "y".into()), v(9));
        u.rows.insert(("b".into(), "z".into()), v(11));
        u.floors.insert("b".into(), v(11));
        let d = u.deltas();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].label, "a");
        assert_eq!(d[0].data, r#"{"all":{"v":10,"ts":7},"x":{"v":10,"ts":7}}"#);
        assert!(!d[0].whole_label);
        assert_eq!(d[1].data, r#"{"all":{"v":11,"ts":7},"z":{"v":11,"ts":7}}"#);
        assert!(d[1].whole_label);
    }
}
