//! A change as the history keeps it, and how it is shown.
//!
//! The relay worker stores each change of a tracked table as the binary
//! frame the output plugin wrote for it, plus the few columns needed to
//! seek, prune and check privileges. Nothing is parsed or cast when it is
//! written, so no value a table can hold can make the write fail; readers
//! decode the frame and render its JSON (the same encoder as the plugin's
//! json format).

use crate::binary::{self, DecodeError};
use crate::event::{Event, Row};
use crate::filter::Filter;
use crate::json::write_row;

/// One change of `changerelay.history`: the only shape a history row has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    /// Commit LSN of the change's transaction.
    pub event_id: u64,
    /// Position among the transaction's history rows (from 0); with the
    /// event id it orders history and forms cursors.
    pub pos: u32,
    /// Commit time, milliseconds since the Unix epoch.
    pub ts: i64,
    /// OID of the changed table (privilege and row-level security checks).
    pub relid: u32,
    pub label: String,
    /// The change's binary frame: an `Event::Change`, or for a truncate the
    /// `Event::Truncate` (shared by every truncated table's row).
    pub frame: Vec<u8>,
}

/// A history row decoded for readers: what `changes()` returns and the
/// endpoint sends. JSON fields are JSON texts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeView {
    pub event_id: u64,
    pub pos: u32,
    pub ts: i64,
    pub relid: u32,
    pub label: String,
    pub seq: u32,
    pub xid: u32,
    pub op: &'static str,
    /// Schema-qualified.
    pub table_name: String,
    pub identifier: Option<String>,
    pub key: Option<String>,
    pub new: Option<String>,
    pub old: Option<String>,
    /// The transaction's metadata object, when it has one (kept once per
    /// transaction, so readers add it).
    pub metadata: Option<String>,
    /// A truncate: every table of this row's label it emptied, in order. It
    /// is one change (one `seq`) kept as one history row per table; the row of
    /// the first of them stands for the change where a change must appear once.
    pub label_tables: Vec<String>,
}

fn row_json(row: Option<&Row<'_>>) -> Option<String> {
    row.map(|r| {
        let mut out = Vec::with_capacity(64);
        write_row(r, &mut out);
        // The encoder writes only valid UTF-8.
        String::from_utf8_lossy(&out).into_owned()
    })
}

impl HistoryRow {
    /// Decodes the stored frame.
    pub fn event(&self) -> Result<Event<'static>, DecodeError> {
        binary::read_event(&self.frame)
    }

    /// The row as readers see it (without its transaction's metadata).
    pub fn view(&self) -> Result<ChangeView, DecodeError> {
        let event = self.event()?;
        let mut view = view_of(&event, self.relid)
            .ok_or_else(|| DecodeError::Malformed("a history frame holds no change or truncate".into()))?;
        view.event_id = self.event_id;
        view.pos = self.pos;
        view.ts = self.ts;
        view.relid = self.relid;
        view.label.clone_from(&self.label);
        Ok(view)
    }
}

/// How a decoded change (or the truncate of table `relid`) is shown; the
/// stored row's own fields (position, label, ...) are left default.
pub fn view_of(event: &Event<'_>, relid: u32) -> Option<ChangeView> {
    match event {
        Event::Change(c) => Some(ChangeView {
            seq: c.seq,
            xid: c.txn.xid,
            op: c.op.as_str(),
            table_name: format!("{}.{}", c.schema, c.table),
            identifier: c
                .tracking
                .as_ref()
                .and_then(|t| t.identifier.as_ref())
                .map(|s| s.to_string()),
            key: row_json(c.key.as_ref()),
            new: row_json(c.new.as_ref()),
            old: row_json(c.old.as_ref()),
            ..ChangeView::default()
        }),
        Event::Truncate(t) => {
            let this = t.tracked.iter().find(|x| x.relid == relid);
            let label_tables = this.map_or_else(Vec::new, |this| {
                t.tracked
                    .iter()
                    .filter(|x| x.label == this.label)
                    .map(|x| x.table.to_string())
                    .collect()
            });
            Some(ChangeView {
                seq: t.seq,
                xid: t.txn.xid,
                op: "truncate",
                table_name: this.map(|x| x.table.to_string()).unwrap_or_default(),
                label_tables,
                ..ChangeView::default()
            })
        }
        _ => None,
    }
}

impl ChangeView {
    /// Whether a tenant filter accepts this change: it applies to the new
    /// row, or for a delete to the old row or the key, compared as the
    /// endpoint compares them. A truncate has no row and never matches.
    pub fn matches(&self, filter: &Filter) -> bool {
        let text = if self.op == "delete" {
            self.old.as_ref().or(self.key.as_ref())
        } else {
            self.new.as_ref()
        };
        filter.matches_json(text.map(String::as_str))
    }
}

/// A history row as version 0.1.0 stored it (JSON columns), for the upgrade
/// to 0.2.0, which turns it into a frame.
pub struct V1Row<'a> {
    pub event_id: u64,
    pub seq: u32,
    pub ts: i64,
    pub xid: u32,
    pub relid: u32,
    pub label: &'a str,
    /// `schema.table`.
    pub table_name: &'a str,
    pub op: &'a str,
    pub identifier: Option<&'a str>,
    pub key: Option<&'a str>,
    pub new: Option<&'a str>,
    pub old: Option<&'a str>,
}

/// The frame that shows `row` as it was shown before: its JSON members
/// become columns whose values render to the same JSON.
pub fn v1_frame(row: &V1Row<'_>) -> Result<Vec<u8>, String> {
    use crate::event::{Change, Column, Op, Scalar, Tracking, Truncate, TruncatedTable, TxnHeader, Value as V};
    use std::borrow::Cow;
    let txn = TxnHeader {
        xid: row.xid,
        event_id: row.event_id,
        commit_us: row.ts.saturating_mul(1000),
    };
    let (schema, table) = row.table_name.split_once('.').unwrap_or(("", row.table_name));
    let columns = |text: Option<&str>| -> Result<Option<Row<'static>>, String> {
        let Some(text) = text else { return Ok(None) };
        let members: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> =
            serde_json::from_str(text).map_err(|e| format!("history row {}/{}: {e}", row.event_id, row.seq))?;
        let mut out = Vec::with_capacity(members.len());
        for (name, raw) in members {
            let text = raw.get();
            let scalar = match text.as_bytes().first() {
                Some(b'"') => Scalar::Text(Cow::Owned(
                    serde_json::from_str::<String>(text).map_err(|e| e.to_string())?,
                )),
                Some(b't') => Scalar::Bool(true),
                Some(b'f') => Scalar::Bool(false),
                Some(b'n') => Scalar::Null,
                // Numbers, objects and arrays are embedded as the JSON they were.
                _ => Scalar::Json(Cow::Owned(text.to_string())),
            };
            out.push(Column {
                name: Cow::Owned(name),
                value: V::Scalar(scalar),
            });
        }
        Ok(Some(out))
    };
    let event = match row.op {
        "truncate" => Event::Truncate(Truncate {
            txn,
            seq: row.seq,
            tables: vec![Cow::Owned(row.table_name.to_string())],
            cascade: false,
            restart_identity: false,
            tracked: vec![TruncatedTable {
                relid: row.relid,
                table: Cow::Owned(row.table_name.to_string()),
                label: Cow::Owned(row.label.to_string()),
            }],
        }),
        op => Event::Change(Change {
            txn,
            seq: row.seq,
            op: match op {
                "insert" => Op::Insert,
                "update" => Op::Update,
                "delete" => Op::Delete,
                other => {
                    return Err(format!(
                        "history row {}/{}: unknown op {other:?}",
                        row.event_id, row.seq
                    ))
                }
            },
            schema: Cow::Owned(schema.to_string()),
            table: Cow::Owned(table.to_string()),
            key: columns(row.key)?,
            new: columns(row.new)?,
            old: columns(row.old)?,
            unchanged_toast: Vec::new(),
            tracking: Some(Tracking {
                relid: row.relid,
                label: Cow::Owned(row.label.to_string()),
                identifier: row.identifier.map(|s| Cow::Owned(s.to_string())),
                old_identifier: None,
                unknown_identifier: false,
            }),
        }),
    };
    let mut out = Vec::new();
    binary::write_event(&event, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Change, Column, Op, Scalar, Tracking, Truncate, TruncatedTable, TxnHeader, Value};
    use serde_json::json;

    fn frame(event: &Event<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        binary::write_event(event, &mut out).unwrap_or_else(|e| panic!("{e}"));
        out
    }

    fn col(name: &'static str, value: Scalar<'static>) -> Column<'static> {
        Column {
            name: name.into(),
            value: Value::Scalar(value),
        }
    }

    fn change(op: Op, new: Option<Row<'static>>, key: Option<Row<'static>>) -> Event<'static> {
        Event::Change(Change {
            txn: TxnHeader {
                xid: 9,
                event_id: 100,
                commit_us: 5_000,
            },
            seq: 3,
            op,
            schema: "public".into(),
            table: "t".into(),
            key,
            new,
            old: None,
            unchanged_toast: vec![],
            tracking: Some(Tracking {
                relid: 7,
                label: "l".into(),
                identifier: Some("1".into()),
                old_identifier: None,
                unknown_identifier: false,
            }),
        })
    }

    #[test]
    fn a_stored_frame_renders_as_the_plugin_would() {
        let new = vec![
            col("id", Scalar::Int(1)),
            col("tenant", Scalar::Text("t1".into())),
            col("doc", Scalar::Json("{\"a\":\"\\u0000\",\"n\":1e1000000}".into())),
            col("big", Scalar::Omitted(300_000_000)),
        ];
        let row = HistoryRow {
            event_id: 100,
            pos: 0,
            ts: 5,
            relid: 7,
            label: "l".into(),
            frame: frame(&change(Op::Insert, Some(new), Some(vec![col("id", Scalar::Int(1))]))),
        };
        let v = row.view().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (v.seq, v.xid, v.op, v.table_name.as_str()),
            (3, 9, "insert", "public.t")
        );
        assert_eq!(
            (v.event_id, v.pos, v.ts, v.relid, v.label.as_str()),
            (100, 0, 5, 7, "l")
        );
        assert_eq!(v.identifier.as_deref(), Some("1"));
        assert_eq!(v.key.as_deref(), Some("{\"id\":1}"));
        assert_eq!(
            v.new.as_deref(),
            Some(
                "{\"id\":1,\"tenant\":\"t1\",\"doc\":{\"a\":\"\\u0000\",\"n\":1e1000000},\
                 \"big\":{\"$changerelay\":\"omitted\",\"bytes\":300000000}}"
            )
        );
        let f = Filter::parse(&json!({"tenant": "t1"})).unwrap_or_else(|e| panic!("{e}"));
        assert!(v.matches(&f));
        let g = Filter::parse(&json!({"tenant": "t2"})).unwrap_or_else(|e| panic!("{e}"));
        assert!(!v.matches(&g));
    }

    #[test]
    fn deletes_filter_on_their_key_and_truncates_name_their_table() {
        let del = HistoryRow {
            event_id: 1,
            pos: 0,
            ts: 0,
            relid: 7,
            label: "l".into(),
            frame: frame(&change(
                Op::Delete,
                None,
                Some(vec![col("tenant", Scalar::Text("t1".into()))]),
            )),
        };
        let f = Filter::parse(&json!({"tenant": "t1"})).unwrap_or_else(|e| panic!("{e}"));
        assert!(del.view().map(|v| v.matches(&f)).unwrap_or(false));
        let trunc = Event::Truncate(Truncate {
            txn: TxnHeader {
                xid: 1,
                event_id: 2,
                commit_us: 0,
            },
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
        });
        let row = HistoryRow {
            event_id: 2,
            pos: 1,
            ts: 0,
            relid: 2,
            label: "x".into(),
            frame: frame(&trunc),
        };
        let v = row.view().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((v.op, v.table_name.as_str()), ("truncate", "public.b"));
        assert_eq!(
            v.label_tables,
            ["public.a", "public.b"],
            "both tables of label x, first stands for the change"
        );
        assert!(!v.matches(&f));
    }

    #[test]
    fn a_v1_row_renders_as_it_did() {
        let v1 = V1Row {
            event_id: 42,
            seq: 1,
            ts: 7,
            xid: 3,
            relid: 9,
            label: "l",
            table_name: "public.t",
            op: "update",
            identifier: Some("1"),
            key: Some(r#"{"id": 1}"#),
            new: Some(
                r#"{"id": 1, "n": 12345678901234567890.5, "doc": {"a": [1, "x"]}, "s": "t", "b": true, "z": null}"#,
            ),
            old: None,
        };
        let row = HistoryRow {
            event_id: 42,
            pos: 0,
            ts: 7,
            relid: 9,
            label: "l".into(),
            frame: v1_frame(&v1).unwrap_or_else(|e| panic!("{e}")),
        };
        let v = row.view().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (v.op, v.seq, v.xid, v.table_name.as_str()),
            ("update", 1, 3, "public.t")
        );
        assert_eq!(v.identifier.as_deref(), Some("1"));
        let new: serde_json::Value = serde_json::from_str(v.new.as_deref().unwrap_or("")).unwrap_or_default();
        let was: serde_json::Value = serde_json::from_str(v1.new.unwrap_or("")).unwrap_or_default();
        assert_eq!(new, was);
        assert!(
            v.new.as_deref().unwrap_or("").contains("12345678901234567890.5"),
            "exact digits kept"
        );
        let t = V1Row {
            op: "truncate",
            key: None,
            new: None,
            ..v1
        };
        let row = HistoryRow {
            frame: v1_frame(&t).unwrap_or_default(),
            ..row
        };
        assert_eq!(
            row.view().map(|v| (v.op, v.table_name)).ok(),
            Some(("truncate", "public.t".to_string()))
        );
    }

    #[test]
    fn a_damaged_frame_is_an_error_not_a_panic() {
        let row = HistoryRow {
            event_id: 1,
            pos: 0,
            ts: 0,
            relid: 0,
            label: "l".into(),
            frame: vec![1, 200, 3],
        };
        assert!(row.view().is_err());
    }
}
