//! The binary format: one frame per event, a version byte followed by the
//! bincode (varint, little-endian) encoding of [`Event`].
//!
//! Frames come from untrusted places (a client may hand any bytea to
//! `changerelay.decode`), so decoding bounds allocations by the frame's own
//! length, rejects trailing bytes and checks array shapes.

use crate::event::{Event, TxnHeader, Value, MAX_ARRAY_DIMS};
use bincode::Options;
use std::fmt;

/// The first byte of every binary frame.
pub const FORMAT_VERSION: u8 = 1;

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_little_endian()
}

/// Appends one frame for `event` to `out`.
/// Encoding into memory only fails for types serde can not size, which the
/// event model does not have; the error is still reported, never unwrapped.
pub fn write_event(event: &Event<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    out.push(FORMAT_VERSION);
    codec().serialize_into(&mut *out, event).map_err(|e| e.to_string())
}

/// Whether a frame is a transaction's begin record, without decoding it
/// (bincode writes the variant index first, as a varint: `Begin` is 0).
pub fn opens_transaction(frame: &[u8]) -> bool {
    frame.len() >= 2 && frame[0] == FORMAT_VERSION && frame[1] == 0
}

/// A change or truncate frame split at the end of its transaction header
/// (bincode writes the variant index, then the struct's first field, its
/// `txn`): the header, and where the rest of the frame starts. History
/// chunks keep the header once per transaction and the rest per change.
/// `None` for other frames.
pub fn split_header(frame: &[u8]) -> Option<(TxnHeader, usize)> {
    if frame.len() < 3 || frame[0] != FORMAT_VERSION || !matches!(frame[1], 1 | 2) {
        return None;
    }
    let mut rest = &frame[2..];
    let header: TxnHeader = codec().deserialize_from(&mut rest).ok()?;
    Some((header, frame.len() - rest.len()))
}

/// The frame that [`split_header`] split: version, variant, header, rest.
pub fn join_header(variant: u8, header: &TxnHeader, rest: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    out.push(FORMAT_VERSION);
    out.push(variant);
    codec().serialize_into(&mut *out, header).map_err(|e| e.to_string())?;
    out.extend_from_slice(rest);
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnsupportedVersion(u8),
    Malformed(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty frame"),
            DecodeError::UnsupportedVersion(v) => write!(
                f,
                "binary format version {v} is not supported (this build reads version {FORMAT_VERSION})"
            ),
            DecodeError::Malformed(why) => write!(f, "malformed frame: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one frame into an owned event.
pub fn read_event(frame: &[u8]) -> Result<Event<'static>, DecodeError> {
    let (&version, body) = frame.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let event: Event<'static> = codec()
        .with_limit(body.len() as u64)
        .reject_trailing_bytes()
        .deserialize(body)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    check_arrays(&event)?;
    Ok(event)
}

fn check_arrays(event: &Event<'_>) -> Result<(), DecodeError> {
    let Event::Change(change) = event else {
        return Ok(());
    };
    let rows = [&change.key, &change.new, &change.old];
    for col in rows.into_iter().flatten().flatten() {
        if let Value::Array { dims, elems } = &col.value {
            let count = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d as usize));
            let ok = dims.len() <= MAX_ARRAY_DIMS
                && match count {
                    Some(n) if dims.is_empty() => elems.is_empty() && n == 1,
                    Some(n) => n == elems.len(),
                    None => false,
                };
            if !ok {
                return Err(DecodeError::Malformed(format!(
                    "array column \"{}\" has dimensions {:?} but {} elements",
                    col.name,
                    dims,
                    elems.len()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_begin_frame_is_recognised_without_decoding() {
        let h = TxnHeader {
            xid: 1,
            event_id: 2,
            commit_us: 3,
        };
        let mut begin = Vec::new();
        write_event(&Event::Begin(h), &mut begin).unwrap_or_else(|e| panic!("{e}"));
        assert!(opens_transaction(&begin));
        let mut other = Vec::new();
        write_event(&sample(), &mut other).unwrap_or_else(|e| panic!("{e}"));
        assert!(!opens_transaction(&other));
        let mut commit = Vec::new();
        let c = Event::Commit(Commit {
            txn: h,
            changes: 0,
            metadata: None,
        });
        write_event(&c, &mut commit).unwrap_or_else(|e| panic!("{e}"));
        assert!(!opens_transaction(&commit) && !opens_transaction(&[]));
    }
    use crate::event::*;
    use crate::json;
    use std::borrow::Cow;

    fn sample() -> Event<'static> {
        Event::Change(Change {
            txn: TxnHeader {
                xid: 7,
                event_id: 99,
                commit_us: 1_700_000_000_000_000,
            },
            seq: 2,
            op: Op::Insert,
            schema: "public".into(),
            table: "t".into(),
            key: Some(vec![Column {
                name: "id".into(),
                value: Value::Scalar(Scalar::Int(1)),
            }]),
            new: Some(vec![
                Column {
                    name: "id".into(),
                    value: Value::Scalar(Scalar::Int(1)),
                },
                Column {
                    name: "f".into(),
                    value: Value::Scalar(Scalar::Float(f64::INFINITY)),
                },
                Column {
                    name: "a".into(),
                    value: Value::Array {
                        dims: vec![3],
                        elems: vec![Scalar::Text("x".into()), Scalar::Null, Scalar::Bool(false)],
                    },
                },
            ]),
            old: None,
            unchanged_toast: vec![],
            tracking: Some(Tracking {
                relid: 1,
                label: "l".into(),
                identifier: Some("1".into()),
                old_identifier: None,
                unknown_identifier: false,
            }),
        })
    }

    #[test]
    fn round_trips_to_identical_json() {
        let events = vec![
            sample(),
            Event::Begin(TxnHeader {
                xid: 1,
                event_id: 2,
                commit_us: 3,
            }),
            Event::Commit(Commit {
                txn: TxnHeader {
                    xid: 1,
                    event_id: 2,
                    commit_us: 3,
                },
                changes: 5,
                metadata: Some(Cow::Borrowed("{\"a\":1}")),
            }),
        ];
        for event in events {
            let mut frame = Vec::new();
            write_event(&event, &mut frame).unwrap_or_default();
            let back = read_event(&frame).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, event);
            assert_eq!(json::event_to_string(&back), json::event_to_string(&event));
        }
    }

    #[test]
    fn binary_is_smaller_than_json() {
        let event = sample();
        let mut frame = Vec::new();
        write_event(&event, &mut frame).unwrap_or_default();
        assert!(frame.len() < json::event_to_string(&event).len());
    }

    #[test]
    fn rejects_bad_frames() {
        assert_eq!(read_event(&[]), Err(DecodeError::Empty));
        assert_eq!(read_event(&[9, 0]), Err(DecodeError::UnsupportedVersion(9)));
        assert!(matches!(read_event(&[1]), Err(DecodeError::Malformed(_))));
        let mut frame = Vec::new();
        write_event(&sample(), &mut frame).unwrap_or_default();
        frame.push(0);
        assert!(
            matches!(read_event(&frame), Err(DecodeError::Malformed(_))),
            "trailing byte"
        );
        // Every truncation of a valid frame is an error, never a panic.
        frame.pop();
        for len in 1..frame.len() {
            assert!(read_event(&frame[..len]).is_err(), "prefix of {len} bytes");
        }
    }

    #[test]
    fn huge_length_prefixes_do_not_allocate() {
        // Change variant tag, then a string length claiming ~2^62 bytes.
        let frame = [1u8, 1, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
        assert!(read_event(&frame).is_err());
        // Flip every byte of a valid frame: errors or values, never a panic.
        let mut good = Vec::new();
        write_event(&sample(), &mut good).unwrap_or_default();
        for i in 1..good.len() {
            for v in [0u8, 0x7f, 0xfb, 0xfc, 0xfd, 0xff] {
                let mut f = good.clone();
                f[i] = v;
                if let Ok(ev) = read_event(&f) {
                    let _ = json::event_to_string(&ev);
                }
            }
        }
    }

    #[test]
    fn rejects_arrays_whose_shape_lies() {
        let mut ev = sample();
        if let Event::Change(c) = &mut ev {
            if let Some(new) = &mut c.new {
                new[2].value = Value::Array {
                    dims: vec![5, 5],
                    elems: vec![Scalar::Null],
                };
            }
        }
        let mut frame = Vec::new();
        write_event(&ev, &mut frame).unwrap_or_default();
        assert!(matches!(read_event(&frame), Err(DecodeError::Malformed(_))));
    }
}
