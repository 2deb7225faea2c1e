//! The last known image of a deleted row.
//!
//! Under REPLICA IDENTITY DEFAULT (or USING INDEX) a delete logs only the
//! key, so a tenant filter could not see it. The relay worker gives such a
//! delete, in its history, the row as last written: the new row of the
//! row's latest insert or update before it (matched by the key columns), as
//! its `old`. It is found among the batch's earlier changes ([`Images`]) or,
//! failing that, in the stored history of the table ([`image_in`]).

use crate::binary;
use crate::event::{Change, Event, Op, Row};
use std::collections::HashMap;

/// Bytes of frames [`Images`] keeps; past it, it starts again empty (the
/// stored history still has them).
const MAX_BYTES: usize = 4 << 20;

/// Whether a change is a delete that carries no old row (only its key).
pub fn wants_image(c: &Change<'_>) -> bool {
    c.op == Op::Delete && c.old.is_none() && c.key.as_ref().is_some_and(|k| !k.is_empty())
}

/// The key a row is matched by: the JSON of `row`'s columns named as the
/// key's, in the key's order; `None` when `row` lacks one of them.
pub fn key_of(key: &Row<'_>, row: &Row<'_>) -> Option<Vec<u8>> {
    let mut projected = Vec::with_capacity(key.len());
    for k in key {
        projected.push(row.iter().find(|c| c.name == k.name)?.clone());
    }
    let mut out = Vec::new();
    crate::json::write_row(&projected, &mut out);
    Some(out)
}

/// The key a delete is matched by (see [`key_of`]).
pub fn key_json(key: &Row<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    crate::json::write_row(key, &mut out);
    out
}

/// The frames of a batch's inserts and updates by table and key, newest
/// last written.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Images {
    frames: HashMap<(u32, Vec<u8>), Vec<u8>>,
    bytes: usize,
}

impl Images {
    /// Notes an insert or update of table `relid` (its frame).
    pub fn note(&mut self, relid: u32, c: &Change<'_>, frame: &[u8]) {
        if !matches!(c.op, Op::Insert | Op::Update) {
            return;
        }
        let (Some(key), Some(new)) = (&c.key, &c.new) else {
            return;
        };
        let Some(k) = key_of(key, new) else { return };
        if self.bytes + frame.len() > MAX_BYTES {
            *self = Images::default();
        }
        self.bytes += frame.len() + k.len();
        if let Some(old) = self.frames.insert((relid, k), frame.to_vec()) {
            self.bytes = self.bytes.saturating_sub(old.len());
        }
    }

    /// The image of the row a delete of table `relid` removed, when the
    /// batch wrote it.
    pub fn image_for(&self, relid: u32, c: &Change<'_>) -> Option<Row<'static>> {
        let key = c.key.as_ref()?;
        let frame = self.frames.get(&(relid, key_json(key)))?;
        match binary::read_event(frame).ok()? {
            Event::Change(w) => w.new,
            _ => None,
        }
    }
}

/// What a stored change says to deletes looking back for their rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// An insert or update: the key it wrote (as [`key_json`], with the
    /// columns of `key`) and its new row.
    Wrote(Vec<u8>, Row<'static>),
    /// A truncate: no image comes from further back.
    Truncated,
    Other,
}

/// Reads a stored change; `key` names the key columns.
pub fn stored(frame: &[u8], key: &Row<'_>) -> Stored {
    match binary::read_event(frame) {
        Ok(Event::Change(w)) if matches!(w.op, Op::Insert | Op::Update) => {
            match w.new.and_then(|new| key_of(key, &new).map(|k| (k, new))) {
                Some((k, new)) => Stored::Wrote(k, new),
                None => Stored::Other,
            }
        }
        Ok(Event::Truncate(_)) => Stored::Truncated,
        _ => Stored::Other,
    }
}

/// The delete's frame with `image` as its old row.
pub fn with_image(frame: &[u8], image: Row<'static>) -> Result<Vec<u8>, String> {
    let mut event = binary::read_event(frame).map_err(|e| e.to_string())?;
    if let Event::Change(c) = &mut event {
        c.old = Some(image);
    }
    let mut out = Vec::with_capacity(frame.len() * 2);
    binary::write_event(&event, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Column, Scalar, TxnHeader, Value};

    fn col(name: &'static str, v: Scalar<'static>) -> Column<'static> {
        Column {
            name: name.into(),
            value: Value::Scalar(v),
        }
    }

    fn change(op: Op, id: i64, tenant: Option<&'static str>) -> Change<'static> {
        let key = vec![col("id", Scalar::Int(id))];
        let new = tenant.map(|t| vec![col("tenant", Scalar::Text(t.into())), col("id", Scalar::Int(id))]);
        Change {
            txn: TxnHeader {
                xid: 1,
                event_id: 10,
                commit_us: 0,
            },
            seq: 0,
            op,
            schema: "public".into(),
            table: "t".into(),
            key: Some(key),
            new,
            old: None,
            unchanged_toast: vec![],
            tracking: None,
        }
    }

    fn frame(c: &Change<'static>) -> Vec<u8> {
        let mut out = Vec::new();
        binary::write_event(&Event::Change(c.clone()), &mut out).unwrap_or_else(|e| panic!("{e}"));
        out
    }

    #[test]
    fn a_delete_gets_the_image_of_the_batch_s_last_write_of_its_row() {
        let mut images = Images::default();
        for c in [change(Op::Insert, 1, Some("t1")), change(Op::Update, 1, Some("t2"))] {
            images.note(7, &c, &frame(&c));
        }
        let del = change(Op::Delete, 1, None);
        assert!(wants_image(&del));
        let image = images.image_for(7, &del);
        assert_eq!(
            image.as_ref().map(|r| r[0].value.clone()),
            Some(Value::Scalar(Scalar::Text("t2".into())))
        );
        assert_eq!(images.image_for(8, &del), None, "another table");
        assert_eq!(images.image_for(7, &change(Op::Delete, 2, None)), None, "another row");
        let rewritten = with_image(&frame(&del), image.unwrap_or_default()).unwrap_or_default();
        let Ok(Event::Change(c)) = binary::read_event(&rewritten) else {
            panic!("not a change")
        };
        assert_eq!(c.old.map(|r| r.len()), Some(2));
        assert!(!wants_image(&c_with_old()));
    }

    fn c_with_old() -> Change<'static> {
        let mut c = change(Op::Delete, 1, None);
        c.old = Some(vec![col("id", Scalar::Int(1))]);
        c
    }

    #[test]
    fn stored_changes_say_what_they_know_of_a_row() {
        let key = vec![col("id", Scalar::Int(1))];
        let ins = change(Op::Insert, 1, Some("t1"));
        match stored(&frame(&ins), &key) {
            Stored::Wrote(k, new) => assert_eq!((k, new.len()), (key_json(&key), 2)),
            other => panic!("{other:?}"),
        }
        assert_eq!(stored(&frame(&change(Op::Delete, 1, None)), &key), Stored::Other);
        assert_eq!(stored(b"junk", &key), Stored::Other);
    }
}
