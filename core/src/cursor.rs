//! Cursors: opaque tokens naming a position in the change history.
//!
//! A cursor encodes the cluster (system identifier and timeline), an event
//! id (commit LSN) and a position within that transaction's history rows.
//! Position [`Cursor::END`] means "after the whole transaction". Text form:
//! `cr1_` followed by the URL-safe base64 of 25 bytes (version, system id,
//! timeline, event id, position, all big-endian) and a 2-byte check.

use std::fmt;

pub const PREFIX: &str = "cr1_";
const VERSION: u8 = 1;
const RAW_LEN: usize = 1 + 8 + 4 + 8 + 4 + 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cursor {
    pub system_id: u64,
    pub timeline: u32,
    pub event_id: u64,
    pub pos: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorError(pub String);

impl fmt::Display for CursorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Cursor {
    /// Position after every history row of a transaction.
    pub const END: u32 = u32::MAX;

    /// The (event id, position) pair cursors are ordered by.
    pub fn position(&self) -> (u64, u32) {
        (self.event_id, self.pos)
    }

    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(RAW_LEN);
        raw.push(VERSION);
        raw.extend_from_slice(&self.system_id.to_be_bytes());
        raw.extend_from_slice(&self.timeline.to_be_bytes());
        raw.extend_from_slice(&self.event_id.to_be_bytes());
        raw.extend_from_slice(&self.pos.to_be_bytes());
        let check = checksum(&raw);
        raw.extend_from_slice(&check.to_be_bytes());
        let mut s = String::with_capacity(PREFIX.len() + 36);
        s.push_str(PREFIX);
        base64url_encode(&raw, &mut s);
        s
    }

    pub fn decode(text: &str) -> Result<Cursor, CursorError> {
        let body = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| CursorError(format!("cursor must start with \"{PREFIX}\"")))?;
        let raw = base64url_decode(body).ok_or_else(|| CursorError("cursor is not valid base64url".into()))?;
        if raw.len() != RAW_LEN {
            return Err(CursorError(format!(
                "cursor has {} bytes, expected {RAW_LEN}",
                raw.len()
            )));
        }
        if raw[0] != VERSION {
            return Err(CursorError(format!("cursor version {} is not supported", raw[0])));
        }
        let (data, check) = raw.split_at(RAW_LEN - 2);
        if checksum(data).to_be_bytes() != check {
            return Err(CursorError(
                "cursor checksum does not match (altered or truncated)".into(),
            ));
        }
        let u64_at = |i: usize| u64::from_be_bytes(data[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap_or_default());
        Ok(Cursor {
            system_id: u64_at(1),
            timeline: u32_at(9),
            event_id: u64_at(13),
            pos: u32_at(21),
        })
    }
}

/// Fletcher-16 over the payload: catches typos and truncation, not forgery
/// (cursors carry no secret).
fn checksum(data: &[u8]) -> u16 {
    let (mut a, mut b) = (0u16, 0u16);
    for &x in data {
        a = (a + u16::from(x)) % 255;
        b = (b + a) % 255;
    }
    (b << 8) | a
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// URL-safe base64 without padding (also used for token secrets).
pub fn base64url_encode(data: &[u8], out: &mut String) {
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let vals: Vec<u8> = text
        .bytes()
        .map(|c| ALPHABET.iter().position(|&a| a == c).map(|p| p as u8))
        .collect::<Option<_>>()?;
    if vals.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(vals.len() * 3 / 4);
    for chunk in vals.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &v)| acc | (u32::from(v) << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for c in [
            Cursor {
                system_id: 7_300_000_000_000_000_001,
                timeline: 1,
                event_id: 23_803_720,
                pos: 0,
            },
            Cursor {
                system_id: 0,
                timeline: u32::MAX,
                event_id: u64::MAX,
                pos: Cursor::END,
            },
        ] {
            let text = c.encode();
            assert!(text.starts_with("cr1_") && text.len() == 4 + 36, "{text}");
            assert!(text[4..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(Cursor::decode(&text), Ok(c));
        }
    }

    #[test]
    fn rejects_malformed_and_altered() {
        let good = Cursor {
            system_id: 1,
            timeline: 1,
            event_id: 2,
            pos: 3,
        }
        .encode();
        for bad in [
            "",
            "cr1_",
            "nope",
            "cr2_AAAA",
            "cr1_!!!!",
            &good[..good.len() - 1],
            &format!("{good}A"),
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?}");
        }
        // Flip one character anywhere in the body: rejected.
        for i in 4..good.len() {
            let mut b = good.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(b).unwrap_or_default();
            assert!(Cursor::decode(&altered).is_err(), "altered at {i}: {altered}");
        }
    }

    #[test]
    fn orders_by_event_then_position() {
        let c = |e, p| {
            Cursor {
                system_id: 1,
                timeline: 1,
                event_id: e,
                pos: p,
            }
            .position()
        };
        assert!(c(5, Cursor::END) < c(6, 0));
        assert!(c(5, 1) < c(5, 2));
    }
}
