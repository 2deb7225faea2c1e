//! LSN formatting, as Postgres prints it (`pg_lsn` output).

/// `0/16B3748` style text of an LSN.
pub fn format_lsn(lsn: u64, out: &mut Vec<u8>) {
    use std::io::Write;
    // Writing to a Vec can not fail.
    let _ = write!(out, "{:X}/{:X}", lsn >> 32, lsn as u32);
}

pub fn lsn_to_string(lsn: u64) -> String {
    let mut v = Vec::with_capacity(20);
    format_lsn(lsn, &mut v);
    String::from_utf8_lossy(&v).into_owned()
}

/// Parses `X/Y` LSN text.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
        return None;
    }
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_postgres() {
        assert_eq!(lsn_to_string(0x16B3748), "0/16B3748");
        assert_eq!(lsn_to_string((1u64 << 32) | 0xA), "1/A");
        assert_eq!(lsn_to_string(0), "0/0");
    }

    #[test]
    fn parses_round_trip() {
        for lsn in [0u64, 1, 0x16B3748, u64::MAX, 0xDEAD_BEEF_0000_0001] {
            assert_eq!(parse_lsn(&lsn_to_string(lsn)), Some(lsn));
        }
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("/1"), None);
        assert_eq!(parse_lsn("123456789/1"), None);
    }
}
