//! What the relay worker does with a batch of decoded events: the version
//! updates it implies (merged so each label and row is written once) and
//! the history rows it records.

use crate::event::{Event, TxnHeader};
use crate::json::write_row;
use crate::time::unix_us_to_ms;
use crate::versions::Version;
use std::collections::BTreeMap;

/// The table holding tracking state; its changes move versions but are not
/// history.
pub const CONFIG_TABLE: (&str, &str) = ("changerelay", "tracked_tables");

/// One change as kept in `changerelay.history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub event_id: u64,
    /// Position among the transaction's history rows (from 0); with the
    /// event id it orders history and forms cursors.
    pub pos: u32,
    /// The change's `seq` in the decoded stream.
    pub seq: u32,
    pub ts: i64,
    pub xid: u32,
    pub relid: u32,
    pub label: String,
    pub table_name: String,
    pub op: &'static str,
    pub identifier: Option<String>,
    pub key: Option<String>,
    pub new: Option<String>,
    pub old: Option<String>,
    pub metadata: Option<String>,
}

/// Version updates and history of a batch of complete transactions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VersionUpdates {
    /// Label → its new `all` version.
    pub labels: BTreeMap<String, Version>,
    /// (label, identifier) → the row's new version.
    pub rows: BTreeMap<(String, String), Version>,
    /// Label → every row of it moves to at least this version (truncate, or
    /// a change whose row identifier is unknown).
    pub floors: BTreeMap<String, Version>,
    /// History rows of the committed transactions, in commit order.
    pub history: Vec<HistoryRow>,
    /// Rows of the transaction being read (metadata arrives with its commit).
    pending: Vec<HistoryRow>,
    /// The last committed transaction of the batch.
    pub last_commit: Option<TxnHeader>,
    pub transactions: u64,
    pub changes: u64,
}

impl HistoryRow {
    /// A row of a change in transaction `txn`; `pos` is set when it is queued.
    fn new(txn: &TxnHeader, seq: u32, relid: u32, label: &str, table_name: String, op: &'static str) -> HistoryRow {
        HistoryRow {
            event_id: txn.event_id,
            pos: 0,
            seq,
            ts: unix_us_to_ms(txn.commit_us),
            xid: txn.xid,
            relid,
            label: label.to_string(),
            table_name,
            op,
            identifier: None,
            key: None,
            new: None,
            old: None,
            metadata: None,
        }
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

fn row_json(row: &Option<crate::event::Row<'_>>) -> Option<String> {
    row.as_ref().map(|r| {
        let mut out = Vec::with_capacity(64);
        write_row(r, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

impl VersionUpdates {
    pub fn add(&mut self, event: &Event<'_>) {
        match event {
            Event::Begin(_) => self.pending.clear(),
            Event::Change(c) => {
                self.changes += 1;
                let Some(t) = &c.tracking else { return };
                let v = version_of(&c.txn);
                raise(&mut self.labels, t.label.to_string(), v);
                for id in [&t.identifier, &t.old_identifier].into_iter().flatten() {
                    raise(&mut self.rows, (t.label.to_string(), id.to_string()), v);
                }
                if t.unknown_identifier {
                    raise(&mut self.floors, t.label.to_string(), v);
                }
                if (c.schema.as_ref(), c.table.as_ref()) == CONFIG_TABLE {
                    return;
                }
                let table = format!("{}.{}", c.schema, c.table);
                let mut row = HistoryRow::new(&c.txn, c.seq, t.relid, &t.label, table, c.op.as_str());
                row.identifier = t.identifier.as_ref().map(|s| s.to_string());
                row.key = row_json(&c.key);
                row.new = row_json(&c.new);
                row.old = row_json(&c.old);
                self.queue(row);
            }
            Event::Truncate(t) => {
                self.changes += 1;
                let v = version_of(&t.txn);
                for label in t.labels() {
                    raise(&mut self.labels, label.to_string(), v);
                    raise(&mut self.floors, label.to_string(), v);
                }
                for table in &t.tracked {
                    let row = HistoryRow::new(
                        &t.txn,
                        t.seq,
                        table.relid,
                        &table.label,
                        table.table.to_string(),
                        "truncate",
                    );
                    self.queue(row);
                }
            }
            Event::Commit(c) => {
                self.transactions += 1;
                self.last_commit = Some(c.txn);
                let metadata = c.metadata.as_ref().map(|m| m.to_string());
                for mut row in self.pending.drain(..) {
                    row.metadata = metadata.clone();
                    self.history.push(row);
                }
            }
            Event::Message(_) | Event::Metadata(_) => {}
        }
    }

    /// Queues a row of the transaction being read, at the next position.
    fn queue(&mut self, mut row: HistoryRow) {
        row.pos = self.pending.len() as u32;
        self.pending.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.rows.is_empty() && self.floors.is_empty() && self.history.is_empty()
    }
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

    #[test]
    fn merges_to_the_newest_version() {
        let mut u = VersionUpdates::default();
        u.add(&Event::Begin(h(10)));
        u.add(&change(10, "p", Some("A"), None, false));
        u.add(&commit(10, None));
        u.add(&Event::Begin(h(20)));
        u.add(&change(20, "p", Some("B"), Some("A"), false));
        u.add(&change(20, "q", None, None, true));
        u.add(&commit(20, Some("{\"who\":\"ann\"}")));
        assert_eq!(u.labels["p"], Version { v: 20, ts: 20 });
        assert_eq!(u.rows[&("p".into(), "A".into())].v, 20);
        assert_eq!(u.rows[&("p".into(), "B".into())].v, 20);
        assert_eq!(u.floors["q"].v, 20);
        assert_eq!(u.last_commit.map(|c| c.event_id), Some(20));
        assert_eq!((u.transactions, u.changes), (2, 3));
        let positions: Vec<_> = u
            .history
            .iter()
            .map(|r| (r.event_id, r.pos, r.metadata.is_some()))
            .collect();
        assert_eq!(positions, vec![(10, 0, false), (20, 0, true), (20, 1, true)]);
        assert_eq!(u.history[0].key.as_deref(), Some("{\"id\":1}"));
        assert_eq!(u.history[1].op, "update");
    }

    #[test]
    fn truncate_raises_floor_and_all_and_records_each_table() {
        let mut u = VersionUpdates::default();
        u.add(&Event::Begin(h(7)));
        u.add(&Event::Truncate(Truncate {
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
        }));
        u.add(&commit(7, None));
        assert_eq!(u.labels["x"].v, 7);
        assert_eq!(u.floors["x"].v, 7);
        let rows: Vec<_> = u.history.iter().map(|r| (r.pos, r.relid, r.op)).collect();
        assert_eq!(rows, vec![(0, 1, "truncate"), (1, 2, "truncate")]);
    }

    #[test]
    fn untracked_and_config_changes_are_not_history() {
        let mut u = VersionUpdates::default();
        let mut e = change(5, "x", Some("1"), None, false);
        if let Event::Change(c) = &mut e {
            c.tracking = None;
        }
        u.add(&e);
        assert!(u.is_empty());
        let mut cfg = change(6, "x", None, None, false);
        if let Event::Change(c) = &mut cfg {
            c.schema = "changerelay".into();
            c.table = "tracked_tables".into();
        }
        u.add(&cfg);
        u.add(&commit(6, None));
        assert_eq!(u.labels["x"].v, 6, "tracking changes move the label");
        assert!(u.history.is_empty());
    }

    #[test]
    fn a_transaction_left_open_at_the_end_of_a_batch_is_not_history() {
        let mut u = VersionUpdates::default();
        u.add(&Event::Begin(h(9)));
        u.add(&change(9, "p", Some("A"), None, false));
        assert!(u.history.is_empty());
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
