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
//! The packed form, [`pack`]: a format byte (1), then lz4 (block format,
//! with the uncompressed size first) of, per change, varints: the event id's
//! difference to the previous change's, the position, the commit time's
//! difference (zigzag), the frame's length; then the frame. Frames of one
//! table repeat their schema, table, label and column names, which is what
//! the compression takes out.

use crate::history::HistoryRow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Most changes in one chunk...
pub const CHUNK_CHANGES: usize = 1000;
/// ...and bytes of frames (a reader decodes a chunk whole).
pub const CHUNK_BYTES: usize = 1 << 20;

const FORMAT: u8 = 1;

/// A position in history: (event id, position in its transaction).
pub type Position = (u64, u32);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = data.get(*at) else {
            return Err("a history chunk ends inside a number".into());
        };
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a history chunk holds a number longer than 64 bits".into())
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// The changes of one chunk being built, in commit order.
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    raw: Vec<u8>,
    first: Option<Position>,
    last: Position,
    last_ts: i64,
    changes: usize,
}

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
        put_varint(&mut self.raw, zigzag(row.ts.wrapping_sub(prev_ts)));
        put_varint(&mut self.raw, row.frame.len() as u64);
        self.raw.extend_from_slice(&row.frame);
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
            bytes: pack(&self.raw),
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

fn pack(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / 2 + 16);
    out.push(FORMAT);
    out.extend_from_slice(&lz4_flex::block::compress_prepend_size(raw));
    out
}

/// Most bytes a chunk may unpack to (a damaged size prefix must not make a
/// reader allocate gigabytes).
const MAX_UNPACKED: usize = 64 << 20;

/// The changes of a stored chunk of table `relid` under `label`.
pub fn unpack(bytes: &[u8], relid: u32, label: &str) -> Result<Vec<HistoryRow>, String> {
    let Some((&format, body)) = bytes.split_first() else {
        return Err("an empty history chunk".into());
    };
    if format != FORMAT {
        return Err(format!("history chunk format {format} is unknown"));
    }
    let size = body
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("a history chunk too short for its size")?;
    if size > MAX_UNPACKED {
        return Err(format!("a history chunk claims {size} bytes"));
    }
    let raw = lz4_flex::block::decompress_size_prepended(body).map_err(|e| format!("a damaged history chunk: {e}"))?;
    let mut rows = Vec::new();
    let (mut at, mut event_id, mut ts) = (0usize, 0u64, 0i64);
    while at < raw.len() {
        event_id = event_id.wrapping_add(get_varint(&raw, &mut at)?);
        let pos = u32::try_from(get_varint(&raw, &mut at)?).map_err(|_| "a history position beyond 32 bits")?;
        ts = ts.wrapping_add(unzigzag(get_varint(&raw, &mut at)?));
        let len = get_varint(&raw, &mut at)? as usize;
        let frame = raw
            .get(at..at.saturating_add(len))
            .ok_or("a history chunk ends inside a frame")?;
        at += len;
        rows.push(HistoryRow {
            event_id,
            pos,
            ts,
            relid,
            label: label.to_string(),
            frame: frame.to_vec(),
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
        let mut huge = vec![FORMAT];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&huge, 1, "l").is_err());
        // A frame length beyond the chunk.
        let mut raw = Vec::new();
        for v in [1u64, 0, 0, 1000] {
            put_varint(&mut raw, v);
        }
        assert!(unpack(&pack(&raw), 1, "l").is_err());
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

    #[test]
    fn varints_and_zigzag_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut at = 0;
            assert_eq!(get_varint(&out, &mut at), Ok(v));
            assert_eq!(at, out.len());
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert!(get_varint(&[0x80; 11], &mut 0).is_err());
    }
}
