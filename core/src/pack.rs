//! The packed form that history chunks and the version log share: a format
//! byte, then lz4 (block format, the uncompressed size first) of a body of
//! LEB128 varints and bytes.

/// The format byte.
pub const FORMAT: u8 = 1;

/// Most bytes a packed body may unpack to (a damaged size prefix must not
/// make a reader allocate gigabytes).
pub const MAX_UNPACKED: usize = 64 << 20;

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn get_varint(data: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = data.get(*at) else {
            return Err("packed data ends inside a number".into());
        };
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("packed data holds a number longer than 64 bits".into())
}

/// A length-prefixed byte string.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

pub fn get_bytes<'a>(data: &'a [u8], at: &mut usize) -> Result<&'a [u8], String> {
    let len = get_varint(data, at)? as usize;
    let b = data
        .get(*at..at.saturating_add(len))
        .ok_or("packed data ends inside a byte string")?;
    *at += len;
    Ok(b)
}

pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Compresses a body.
pub fn pack(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / 2 + 16);
    out.push(FORMAT);
    out.extend_from_slice(&lz4_flex::block::compress_prepend_size(raw));
    out
}

/// The body of packed bytes.
pub fn unpack(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let Some((&format, body)) = bytes.split_first() else {
        return Err("empty".into());
    };
    if format != FORMAT {
        return Err(format!("format {format} is unknown"));
    }
    let size = body
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("too short for its size")?;
    if size > MAX_UNPACKED {
        return Err(format!("claims {size} bytes"));
    }
    lz4_flex::block::decompress_size_prepended(body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_zigzag_and_bytes_round_trip() {
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
        let mut out = Vec::new();
        put_bytes(&mut out, b"abc");
        let mut at = 0;
        assert_eq!(get_bytes(&out, &mut at), Ok(&b"abc"[..]));
        assert!(get_bytes(&out[..2], &mut 0).is_err());
    }

    #[test]
    fn packed_bytes_round_trip_and_damage_is_an_error() {
        let raw = b"abcabcabcabcabcabcabcabc".repeat(10);
        let p = pack(&raw);
        assert!(p.len() < raw.len());
        assert_eq!(unpack(&p), Ok(raw));
        assert!(unpack(&[]).is_err());
        assert!(unpack(&[9]).is_err());
        assert!(unpack(&p[..p.len() - 1]).is_err());
        let mut huge = vec![FORMAT];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&huge).is_err());
    }
}
