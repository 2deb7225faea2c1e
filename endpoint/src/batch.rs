//! A published batch, prepared once for every recipient.
//!
//! Each change is serialised once into shared bytes (its SSE form lazily, the first time an SSE client needs
//! it), rows are indexed by label, and each version delta becomes one shared message. Tenant filters parse a
//! row's JSON at most once per batch, however many subscribers filter on it.

use std::cell::OnceCell;
use std::collections::HashMap;

use changerelay_core::cursor::Cursor;
use changerelay_core::filter::Filter;
use serde_json::{Map, Value};
use tungstenite::Utf8Bytes;

use crate::api::{Batch, ChangeRow};
use crate::messages;

pub(crate) type Pos = (u64, u32);

/// The position of a cursor text; `None` when it does not decode.
pub(crate) fn position(cursor: &str) -> Option<Pos> {
    Cursor::decode(cursor).ok().map(|c| c.position())
}

pub(crate) struct PreparedRow {
    pub row: ChangeRow,
    pub pos: Option<Pos>,
    /// The change object, shared by WebSocket messages and long-poll bodies.
    pub json: Utf8Bytes,
    sse: OnceCell<Utf8Bytes>,
    filter_row: OnceCell<Option<Map<String, Value>>>,
}

impl PreparedRow {
    pub fn new(row: ChangeRow) -> PreparedRow {
        PreparedRow {
            pos: position(&row.cursor),
            json: Utf8Bytes::from(messages::change(&row)),
            row,
            sse: OnceCell::new(),
            filter_row: OnceCell::new(),
        }
    }

    /// The SSE event of this change.
    pub fn sse(&self) -> Utf8Bytes {
        self.sse
            .get_or_init(|| Utf8Bytes::from(messages::sse_event(Some(&self.row.cursor), "change", &self.json)))
            .clone()
    }

    /// Tenant filters apply to the new row, or for a delete to the old row (REPLICA IDENTITY FULL) or the key.
    pub fn matches(&self, filter: &Filter) -> bool {
        let row = self.filter_row.get_or_init(|| {
            let r = &self.row;
            let text = if r.op.eq_ignore_ascii_case("delete") {
                r.old.as_ref().or(r.key.as_ref())
            } else {
                r.new.as_ref()
            };
            text.and_then(|t| serde_json::from_str::<Map<String, Value>>(t).ok())
        });
        filter.matches(row.as_ref())
    }
}

pub(crate) struct PreparedBatch {
    pub head: String,
    pub head_pos: Option<Pos>,
    pub rows: Vec<PreparedRow>,
    by_label: HashMap<String, Vec<usize>>,
    /// (label, `{"label":..,"data":..}`) in the batch's order.
    pub deltas: Vec<(String, Utf8Bytes)>,
}

impl PreparedBatch {
    pub fn new(batch: Batch) -> PreparedBatch {
        let mut by_label: HashMap<String, Vec<usize>> = HashMap::new();
        let rows: Vec<PreparedRow> = batch.changes.into_iter().map(PreparedRow::new).collect();
        for (i, r) in rows.iter().enumerate() {
            by_label.entry(r.row.label.clone()).or_default().push(i);
        }
        let deltas = batch
            .versions
            .iter()
            .map(|d| {
                (
                    d.label.clone(),
                    Utf8Bytes::from(messages::version_delta(&d.label, &d.data)),
                )
            })
            .collect();
        PreparedBatch {
            head_pos: position(&batch.head),
            head: batch.head,
            rows,
            by_label,
            deltas,
        }
    }

    /// Indices of the rows of these labels, in commit order.
    pub fn rows_for(&self, labels: &[String]) -> Vec<usize> {
        let mut idx: Vec<usize> = labels
            .iter()
            .filter_map(|l| self.by_label.get(l))
            .flatten()
            .copied()
            .collect();
        if labels.len() > 1 {
            idx.sort_unstable();
            idx.dedup();
        }
        idx
    }
}
