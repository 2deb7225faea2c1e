//! Images for deletes that carry only their key, from stored history
//! (`changerelay_core::images`; the batch's own changes are looked at
//! first, while it is decoded).
//!
//! For the deletes of one table in one part of a batch, the table's chunks
//! before the first of them are read newest first, at most
//! [`LOOKBACK_CHUNKS`] of them, until every delete has its row's last
//! write. A delete whose row was last written earlier than that (or before
//! the history retention, or before the table was tracked) keeps only its
//! key.

use changerelay_core::chunk;
use changerelay_core::event::{Event, Row};
use changerelay_core::history::HistoryRow;
use changerelay_core::images::{key_json, stored, with_image, Stored};
use pgrx::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// Most chunks of a table read back for one part of a batch.
const LOOKBACK_CHUNKS: i64 = 64;

const CHUNKS_BEFORE: &str = "SELECT h.frames FROM changerelay.history h
     WHERE h.label = $1 AND h.relid = $2 AND (h.event_id, h.pos) < ($3, $4)
     ORDER BY h.event_id DESC, h.pos DESC LIMIT $5";

/// Gives the `wanted` deletes among `rows` their row's last image, where
/// stored history has it.
pub fn fill(rows: &mut [HistoryRow], wanted: &[bool]) -> Result<(), String> {
    let mut groups: BTreeMap<(String, u32), Vec<(usize, Row<'static>)>> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        if !wanted.get(i).copied().unwrap_or(false) {
            continue;
        }
        if let Ok(Event::Change(c)) = changerelay_core::binary::read_event(&row.frame) {
            if let Some(key) = c.key {
                groups.entry((row.label.clone(), row.relid)).or_default().push((i, key));
            }
        }
    }
    for ((label, relid), pending) in groups {
        let Some(&(first, _)) = pending.first() else { continue };
        let before = (rows[first].event_id, rows[first].pos);
        for (i, image) in look_back(&label, relid, before, pending)? {
            rows[i].frame = with_image(&rows[i].frame, image)?;
        }
    }
    Ok(())
}

/// The images found for `pending` (row index, key) in the table's chunks
/// before `before`: each stored change is read once, and matched by key.
fn look_back(
    label: &str,
    relid: u32,
    before: (u64, u32),
    pending: Vec<(usize, Row<'static>)>,
) -> Result<Vec<(usize, Row<'static>)>, String> {
    let Some(template) = pending.first().map(|(_, k)| k.clone()) else {
        return Ok(Vec::new());
    };
    let mut waiting: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    for (i, key) in &pending {
        waiting.entry(key_json(key)).or_default().push(*i);
    }
    let chunks = crate::sql::select_all(
        CHUNKS_BEFORE,
        &[
            label.into(),
            pg_sys::Oid::from(relid).into(),
            (before.0.min(i64::MAX as u64) as i64).into(),
            i64::from(before.1).into(),
            LOOKBACK_CHUNKS.into(),
        ],
        |r| r.get::<Vec<u8>>(1).map(Option::unwrap_or_default),
    )
    .map_err(|e| format!("could not read history for the images of deletes: {e}"))?;
    let mut found = Vec::new();
    for packed in chunks {
        // A chunk that can not be read gives no image; the delete keeps its key.
        let changes = chunk::unpack(&packed, relid, label).unwrap_or_default();
        for change in changes.iter().rev() {
            match stored(&change.frame, &template) {
                Stored::Wrote(key, new) => {
                    if let Some(rows) = waiting.remove(&key) {
                        found.extend(rows.into_iter().map(|i| (i, new.clone())));
                    }
                }
                Stored::Truncated => waiting.clear(),
                Stored::Other => {}
            }
            if waiting.is_empty() {
                return Ok(found);
            }
        }
    }
    Ok(found)
}
