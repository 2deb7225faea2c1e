//! What the relay worker does with a batch of decoded events: the version
//! updates it implies, merged so each label and row is written once.

use crate::event::{Event, TxnHeader};
use crate::time::unix_us_to_ms;
use crate::versions::Version;
use std::collections::BTreeMap;

/// Version updates of a batch of complete transactions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VersionUpdates {
    /// Label → its new `all` version.
    pub labels: BTreeMap<String, Version>,
    /// (label, identifier) → the row's new version.
    pub rows: BTreeMap<(String, String), Version>,
    /// Label → every row of it moves to at least this version (truncate, or
    /// a change whose row identifier is unknown).
    pub floors: BTreeMap<String, Version>,
    /// The last committed transaction of the batch.
    pub last_commit: Option<TxnHeader>,
    pub transactions: u64,
    pub changes: u64,
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
    pub fn add(&mut self, event: &Event<'_>) {
        match event {
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
            }
            Event::Truncate(t) => {
                self.changes += 1;
                let v = version_of(&t.txn);
                for label in &t.labels {
                    raise(&mut self.labels, label.to_string(), v);
                    raise(&mut self.floors, label.to_string(), v);
                }
            }
            Event::Commit(c) => {
                self.transactions += 1;
                self.last_commit = Some(c.txn);
            }
            Event::Begin(_) | Event::Message(_) | Event::Metadata(_) => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.rows.is_empty() && self.floors.is_empty()
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
            key: None,
            new: None,
            old: None,
            unchanged_toast: vec![],
            tracking: Some(Tracking {
                label: label.to_string().into(),
                identifier: id.map(|s| s.to_string().into()),
                old_identifier: old.map(|s| s.to_string().into()),
                unknown_identifier: unknown,
            }),
        })
    }

    #[test]
    fn merges_to_the_newest_version() {
        let mut u = VersionUpdates::default();
        u.add(&Event::Begin(h(10)));
        u.add(&change(10, "p", Some("A"), None, false));
        u.add(&Event::Commit(Commit {
            txn: h(10),
            changes: 1,
            metadata: None,
        }));
        u.add(&change(20, "p", Some("B"), Some("A"), false));
        u.add(&change(20, "q", None, None, true));
        u.add(&Event::Commit(Commit {
            txn: h(20),
            changes: 2,
            metadata: None,
        }));
        assert_eq!(u.labels["p"], Version { v: 20, ts: 20 });
        assert_eq!(u.rows[&("p".into(), "A".into())].v, 20);
        assert_eq!(u.rows[&("p".into(), "B".into())].v, 20);
        assert_eq!(u.floors["q"].v, 20);
        assert_eq!(u.last_commit.map(|c| c.event_id), Some(20));
        assert_eq!((u.transactions, u.changes), (2, 3));
    }

    #[test]
    fn truncate_raises_floor_and_all() {
        let mut u = VersionUpdates::default();
        u.add(&Event::Truncate(Truncate {
            txn: h(7),
            seq: 0,
            tables: vec!["public.a".into()],
            cascade: false,
            restart_identity: false,
            labels: vec!["a".into()],
        }));
        assert_eq!(u.labels["a"].v, 7);
        assert_eq!(u.floors["a"].v, 7);
    }

    #[test]
    fn untracked_changes_move_nothing() {
        let mut u = VersionUpdates::default();
        let mut e = change(5, "x", Some("1"), None, false);
        if let Event::Change(c) = &mut e {
            c.tracking = None;
        }
        u.add(&e);
        assert!(u.is_empty());
    }
}
