//! How history is stored: the changes of one table in one applied batch,
//! packed into one `changerelay.history` row (a *chunk*), and how readers
//! put chunks back into commit order.
//!
//! A batch's changes of one table (and label) become one chunk, or several
//! in commit order when there are more than [`CHUNK_CHANGES`] or
//! [`CHUNK_BYTES`]. Chunks of one table never overlap; chunks of different
//! tables of one batch do (their changes interleave), and every chunk lies
//! within its batch. So a reader that goes through chunks in order of their
//! first change can hand out every change that comes before the next chunk's
//! first change: nothing later can precede it ([`Merge`]).
//!
//! The packed form (`crate::pack`) holds, per change, varints: the event id's
//! difference to the previous change's, the position, the frame's length and
//! how it is kept; then, for a change or truncate, the frame without its
//! transaction header, whose transaction id and commit time (which gives the
//! change's time in ms) follow as differences to the previous change's (the
//! header is most of what the frames of one table do not share: leaving it
//! out saves a third of a chunk); for any other frame, the time's difference
//! (zigzag) and the whole frame. Frames of one
//! table repeat their schema, table, label and column names, which is what
//! the compression takes out.

use crate::binary;
use crate::event::TxnHeader;
use crate::history::HistoryRow;
use crate::pack::{self, get_varint, put_varint, unzigzag, zigzag};
use crate::time::unix_us_to_ms;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Most changes in one chunk...
pub const CHUNK_CHANGES: usize = 1000;
/// ...and bytes of frames (a reader decodes a chunk whole).
pub const CHUNK_BYTES: usize = 1 << 20;

/// A position in history: (event id, position in its transaction).
pub type Position = (u64, u32);

/// The changes of one chunk being built, in commit order.
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    raw: Vec<u8>,
    first: Option<Position>,
    last: Position,
    last_ts: i64,
    /// The transaction header of the last change whose frame's header was
    /// left out (the next one is written as differences to it).
    last_header: (u32, i64),
    changes: usize,
}

/// How a change's frame is kept in a chunk: whole, or without its
/// transaction header (variant 1, a change; 2, a truncate), which the chunk
/// then holds as differences to the previous change's.
const WHOLE: u64 = 0;

impl ChunkBuilder {
    /// Appends a change (after every change already in the chunk).
    pub fn push(&mut self, row: &HistoryRow) {
        let (prev_event, prev_ts) = if self.first.is_some() {
            (self.last.0, self.last_ts)
        } else {
            (0, 0)
        };
        put_varint(&mut self.raw, row.event_id.wrapping_sub(prev_event));
        put_varint(&mut self.raw, u64::from(row.pos));
        // The commit time in ms is the header's, when the header is left out.
        let split = binary::split_header(&row.frame)
            .filter(|(h, _)| h.event_id == row.event_id && unix_us_to_ms(h.commit_us) == row.ts);
        match split {
            Some((h, at)) => {
                let rest = &row.frame[at..];
                put_varint(&mut self.raw, (rest.len() as u64) << 2 | u64::from(row.frame[1]));
                let (xid, commit_us) = self.last_header;
                put_varint(&mut self.raw, zigzag(i64::from(h.xid) - i64::from(xid)));
                put_varint(&mut self.raw, zigzag(h.commit_us.wrapping_sub(commit_us)));
                self.raw.extend_from_slice(rest);
                self.last_header = (h.xid, h.commit_us);
            }
            None => {
                put_varint(&mut self.raw, (row.frame.len() as u64) << 2 | WHOLE);
                put_varint(&mut self.raw, zigzag(row.ts.wrapping_sub(prev_ts)));
                self.raw.extend_from_slice(&row.frame);
            }
        }
        self.first.get_or_insert((row.event_id, row.pos));
        self.last = (row.event_id, row.pos);
        self.last_ts = row.ts;
        self.changes += 1;
    }

    pub fn changes(&self) -> usize {
        self.changes
    }

    /// Bytes of the changes so far, uncompressed.
    pub fn bytes(&self) -> usize {
        self.raw.len()
    }

    /// Whether the chunk is as large as a chunk may be.
    pub fn is_full(&self) -> bool {
        self.changes >= CHUNK_CHANGES || self.raw.len() >= CHUNK_BYTES
    }

    /// The chunk's bounds and packed bytes; `None` when it is empty. The
    /// builder is empty again afterwards.
    pub fn take(&mut self) -> Option<Packed> {
        let first = self.first.take()?;
        let packed = Packed {
            first,
            last: self.last,
            last_ts: self.last_ts,
            changes: self.changes as u32,
            bytes: pack::pack(&self.raw),
        };
        *self = ChunkBuilder::default();
        Some(packed)
    }
}

/// A chunk ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub first: Position,
    pub last: Position,
    /// Commit time of the last change (pruning goes by it).
    pub last_ts: i64,
    pub changes: u32,
    pub bytes: Vec<u8>,
}

/// The changes of a stored chunk of table `relid` under `label`.
pub fn unpack(bytes: &[u8], relid: u32, label: &str) -> Result<Vec<HistoryRow>, String> {
    let raw = pack::unpack(bytes).map_err(|e| format!("a damaged history chunk: {e}"))?;
    let mut rows = Vec::new();
    let (mut at, mut event_id, mut ts) = (0usize, 0u64, 0i64);
    let (mut xid, mut commit_us) = (0u32, 0i64);
    while at < raw.len() {
        event_id = event_id.wrapping_add(get_varint(&raw, &mut at)?);
        let pos = u32::try_from(get_varint(&raw, &mut at)?).map_err(|_| "a history position beyond 32 bits")?;
        let tag = get_varint(&raw, &mut at)?;
        let (len, kind) = ((tag >> 2) as usize, tag & 3);
        let mut header = None;
        if kind == WHOLE {
            ts = ts.wrapping_add(unzigzag(get_varint(&raw, &mut at)?));
        } else {
            let x = i64::from(xid) + unzigzag(get_varint(&raw, &mut at)?);
            xid = u32::try_from(x).map_err(|_| "a history chunk holds a transaction id beyond 32 bits")?;
            commit_us = commit_us.wrapping_add(unzigzag(get_varint(&raw, &mut at)?));
            ts = unix_us_to_ms(commit_us);
            header = Some(TxnHeader {
                xid,
                event_id,
                commit_us,
            });
        }
        let body = raw
            .get(at..at.saturating_add(len))
            .ok_or("a history chunk ends inside a frame")?;
        at += len;
        let frame = match header {
            Some(h) => {
                let mut f = Vec::with_capacity(len + 24);
                binary::join_header(kind as u8, &h, body, &mut f)?;
                f
            }
            None => body.to_vec(),
        };
        rows.push(HistoryRow {
            event_id,
            pos,
            ts,
            relid,
            label: label.to_string(),
            frame,
        });
    }
    Ok(rows)
}

/// Puts the changes of chunks, fed in order of their first change, back
/// into commit order, keeping only those after a cursor.
#[derive(Debug)]
pub struct Merge {
    after: Position,
    pending: BinaryHeap<Reverse<Pending>>,
}

#[derive(Debug)]
struct Pending(HistoryRow);

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}
impl Pending {
    fn key(&self) -> Position {
        (self.0.event_id, self.0.pos)
    }
}

impl Merge {
    /// Changes strictly after `after` only.
    pub fn after(after: Position) -> Merge {
        Merge {
            after,
            pending: BinaryHeap::new(),
        }
    }

    /// Adds the changes of the next chunk (its first change at or after
    /// every chunk's given before).
    pub fn add(&mut self, rows: Vec<HistoryRow>) {
        for row in rows {
            if (row.event_id, row.pos) > self.after {
                self.pending.push(Reverse(Pending(row)));
            }
        }
    }

    /// The next change in commit order that comes before `next_chunk` (the
    /// first change of the next chunk; `None`: there is none, so every
    /// change held is ready).
    pub fn pop_before(&mut self, next_chunk: Option<Position>) -> Option<HistoryRow> {
        let top = self.pending.peek()?;
        if next_chunk.is_some_and(|next| top.0.key() >= next) {
            return None;
        }
        self.pending.pop().map(|Reverse(Pending(row))| row)
    }

    /// Changes held, not handed out yet.
    pub fn held(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_id: u64, pos: u32, relid: u32, frame: &[u8]) -> HistoryRow {
        HistoryRow {
            event_id,
            pos,
            ts: event_id as i64 * 10 - 5,
            relid,
            label: "l".into(),
            frame: frame.to_vec(),
        }
    }

    fn chunk(rows: &[HistoryRow]) -> Packed {
        let mut b = ChunkBuilder::default();
        for r in rows {
            b.push(r);
        }
        b.take().unwrap_or_else(|| panic!("empty"))
    }

    #[test]
    fn a_chunk_unpacks_to_its_changes() {
        let frame = vec![7u8; 300];
        let rows = vec![row(100, 0, 5, &frame), row(100, 2, 5, b"x"), row(90_000, 0, 5, &[])];
        let p = chunk(&rows);
        assert_eq!(
            (p.first, p.last, p.last_ts, p.changes),
            ((100, 0), (90_000, 0), 899_995, 3)
        );
        assert!(p.bytes.len() < 300, "repeated bytes compress: {}", p.bytes.len());
        assert_eq!(unpack(&p.bytes, 5, "l"), Ok(rows));
    }

    /// Real change frames lose their transaction header in the chunk and
    /// get it back, byte for byte.
    #[test]
    fn change_frames_unpack_byte_for_byte() {
        use crate::event::{Change, Column, Event, Op, Scalar, Tracking, TxnHeader, Value};
        let frame = |xid: u32, event_id: u64, id: i64| {
            let e = Event::Change(Change {
                txn: TxnHeader {
                    xid,
                    event_id,
                    commit_us: event_id as i64 * 7,
                },
                seq: 0,
                op: Op::Update,
                schema: "public".into(),
                table: "accounts".into(),
                key: Some(vec![Column {
                    name: "id".into(),
                    value: Value::Scalar(Scalar::Int(id)),
                }]),
                new: None,
                old: None,
                unchanged_toast: vec![],
                tracking: Some(Tracking {
                    relid: 5,
                    label: "l".into(),
                    identifier: Some(id.to_string().into()),
                    old_identifier: None,
                    unknown_identifier: false,
                }),
            });
            let mut out = Vec::new();
            crate::binary::write_event(&e, &mut out).unwrap_or_else(|e| panic!("{e}"));
            out
        };
        let rows: Vec<HistoryRow> = (0..50u64)
            .map(|i| {
                row(
                    90_000_000 + i * 300,
                    0,
                    5,
                    &frame(70_000 + i as u32, 90_000_000 + i * 300, i as i64),
                )
            })
            .collect();
        let p = chunk(&rows);
        assert_eq!(unpack(&p.bytes, 5, "l"), Ok(rows.clone()));
        // A frame whose header names another transaction is kept whole.
        let odd = vec![row(10, 0, 5, &frame(1, 11, 1)), row(10, 1, 5, &frame(1, 10, 2))];
        assert_eq!(unpack(&chunk(&odd).bytes, 5, "l"), Ok(odd));
    }

    #[test]
    fn a_builder_is_empty_after_take_and_says_when_full() {
        let mut b = ChunkBuilder::default();
        assert!(b.take().is_none());
        for i in 0..CHUNK_CHANGES as u32 {
            assert!(!b.is_full());
            b.push(&row(1, i, 1, b"f"));
        }
        assert!(b.is_full());
        assert_eq!(b.take().map(|p| p.changes), Some(CHUNK_CHANGES as u32));
        assert_eq!((b.changes(), b.bytes()), (0, 0));
    }

    #[test]
    fn damaged_chunks_are_errors() {
        let p = chunk(&[row(1, 0, 1, b"abc")]);
        assert!(unpack(&[], 1, "l").is_err());
        assert!(unpack(&[9], 1, "l").is_err());
        assert!(unpack(&p.bytes[..p.bytes.len() - 1], 1, "l").is_err());
        let mut huge = vec![pack::FORMAT];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&huge, 1, "l").is_err());
        // A frame length beyond the chunk.
        let mut raw = Vec::new();
        for v in [1u64, 0, 1000 << 2, 0] {
            put_varint(&mut raw, v);
        }
        assert!(unpack(&pack::pack(&raw), 1, "l").is_err());
    }

    /// Two tables of one batch, interleaved, then a later batch: read from a
    /// cursor in the middle, in commit order, nothing twice.
    #[test]
    fn merge_restores_commit_order_after_a_cursor() {
        let a = chunk(&[row(10, 0, 1, b"a"), row(20, 0, 1, b"b"), row(30, 1, 1, b"c")]);
        let b = chunk(&[row(10, 1, 2, b"d"), row(30, 0, 2, b"e")]);
        let later = chunk(&[row(40, 0, 1, b"f")]);
        let mut chunks = [(a, 1), (b, 2), (later, 1)];
        chunks.sort_by_key(|(p, _)| p.first);
        let mut m = Merge::after((10, 0));
        let mut out = Vec::new();
        for i in 0..chunks.len() {
            m.add(unpack(&chunks[i].0.bytes, chunks[i].1, "l").unwrap_or_default());
            let next = chunks.get(i + 1).map(|(p, _)| p.first);
            while let Some(r) = m.pop_before(next) {
                out.push((r.event_id, r.pos, r.relid));
            }
        }
        assert_eq!(out, vec![(10, 1, 2), (20, 0, 1), (30, 0, 2), (30, 1, 1), (40, 0, 1)]);
        assert_eq!(m.held(), 0);
    }
}
