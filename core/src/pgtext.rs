//! Postgres's text output of common types, written from their stored form
//! without calling the type's output function: numeric and jsonb from their
//! on-disk bytes, timestamps and dates from their integer values, uuids from
//! their 16 bytes.
//!
//! The text is what `numeric_out`, `jsonb_out` and `uuid_out` return, and
//! what `timestamp_out`, `timestamptz_out` and `date_out` return with
//! `DateStyle = ISO` and (for timestamptz) `TimeZone = UTC`: a change feed
//! reads the same whatever settings the decoding session has.
//!
//! The stored layouts read are those of a little-endian server.
//!
//! Stored bytes come from Postgres, but a reader must never trust a length
//! it reads: every parser here checks its bounds and returns `None` on
//! anything it does not recognise, and the caller falls back to the type's
//! output function.

use std::fmt::Write;

/// Where text is written: a `String`, or the byte buffer of a JSON message.
pub trait TextOut {
    fn push_str(&mut self, s: &str);
    fn push(&mut self, c: char);
    /// ASCII bytes (digits): callers pass nothing else.
    fn push_ascii(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(char::from(b));
        }
    }
}

impl TextOut for String {
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }
    fn push(&mut self, c: char) {
        String::push(self, c);
    }
}

impl TextOut for Vec<u8> {
    fn push_str(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }
    fn push(&mut self, c: char) {
        let mut buf = [0u8; 4];
        self.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    fn push_ascii(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Microseconds since 2000-01-01 of `-infinity` and `infinity` (DT_NOBEGIN, DT_NOEND).
const TIMESTAMP_NOBEGIN: i64 = i64::MIN;
const TIMESTAMP_NOEND: i64 = i64::MAX;
/// Days since 2000-01-01 of `-infinity` and `infinity` (DATEVAL_NOBEGIN, DATEVAL_NOEND).
const DATE_NOBEGIN: i32 = i32::MIN;
const DATE_NOEND: i32 = i32::MAX;
const USECS_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to 2000-01-01, Postgres's epoch.
const PG_EPOCH_DAYS_FROM_UNIX: i64 = 10_957;

/// The proleptic Gregorian date `days` after 1970-01-01: (year, month, day),
/// year 0 being 1 BC (the days-to-civil algorithm of H. Hinnant).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `value` in decimal, zero-padded to `width` digits (more when it needs them).
/// (`write!` costs several times as much on this path.)
fn push_padded(out: &mut impl TextOut, value: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut at = buf.len();
    let mut v = value;
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let start = at.min(buf.len() - width.min(buf.len()));
    out.push_ascii(&buf[start..]);
}

/// "00" to "99": two ASCII digits for each number below 100.
const TWO_DIGITS: [u8; 200] = {
    let mut table = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        table[2 * i] = b'0' + (i / 10) as u8;
        table[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    table
};

/// The two digits of `value` (below 100).
fn two_digits(value: u32) -> [u8; 2] {
    let i = (value % 100) as usize * 2;
    [TWO_DIGITS[i], TWO_DIGITS[i + 1]]
}

thread_local! {
    /// The last day written as `YYYY-MM-DD` (years 1 to 9999), by its day
    /// number: the rows of a change stream often share their dates, and the
    /// calendar arithmetic was most of a timestamp's cost.
    static LAST_DAY: std::cell::Cell<Option<(i64, [u8; 10])>> = const { std::cell::Cell::new(None) };
}

/// `YYYY-MM-DD` (at least four year digits), and whether the year is BC.
fn write_ymd(days_since_pg_epoch: i64, out: &mut impl TextOut) -> bool {
    if let Some((day, text)) = LAST_DAY.get() {
        if day == days_since_pg_epoch {
            out.push_ascii(&text);
            return false;
        }
    }
    let (year, month, day) = civil_from_days(days_since_pg_epoch + PG_EPOCH_DAYS_FROM_UNIX);
    if (1..=9999).contains(&year) {
        let year = year as u32;
        let [c1, c2] = two_digits(year / 100);
        let [y1, y2] = two_digits(year % 100);
        let [m1, m2] = two_digits(month);
        let [d1, d2] = two_digits(day);
        let text = [c1, c2, y1, y2, b'-', m1, m2, b'-', d1, d2];
        LAST_DAY.set(Some((days_since_pg_epoch, text)));
        out.push_ascii(&text);
        return false;
    }
    let bc = year <= 0;
    let shown = if bc { 1 - year } else { year };
    push_padded(out, shown.unsigned_abs(), 4);
    out.push('-');
    push_padded(out, u64::from(month), 2);
    out.push('-');
    push_padded(out, u64::from(day), 2);
    bc
}

/// A `date` (days since 2000-01-01) as `date_out` writes it in ISO style.
pub fn write_date(days: i32, out: &mut impl TextOut) {
    match days {
        DATE_NOBEGIN => out.push_str("-infinity"),
        DATE_NOEND => out.push_str("infinity"),
        _ => {
            if write_ymd(i64::from(days), out) {
                out.push_str(" BC");
            }
        }
    }
}

/// A `timestamp` or (`with_zone`) `timestamptz` (microseconds since
/// 2000-01-01, UTC) as its output function writes it in ISO style, in UTC.
pub fn write_timestamp(us: i64, with_zone: bool, out: &mut impl TextOut) {
    match us {
        TIMESTAMP_NOBEGIN => return out.push_str("-infinity"),
        TIMESTAMP_NOEND => return out.push_str("infinity"),
        _ => {}
    }
    let days = us.div_euclid(USECS_PER_DAY);
    let time = us.rem_euclid(USECS_PER_DAY);
    let bc = write_ymd(days, out);
    let secs = (time / 1_000_000) as u32;
    let frac = time % 1_000_000;
    let [h1, h2] = two_digits(secs / 3600);
    let [m1, m2] = two_digits(secs / 60 % 60);
    let [s1, s2] = two_digits(secs % 60);
    out.push_ascii(&[b' ', h1, h2, b':', m1, m2, b':', s1, s2]);
    if frac != 0 {
        // Six digits without their trailing zeros.
        let (mut frac, mut width) = (frac as u64, 6);
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        out.push('.');
        push_padded(out, frac, width);
    }
    if with_zone {
        out.push_str("+00");
    }
    if bc {
        out.push_str(" BC");
    }
}

/// A `uuid` as `uuid_out` writes it.
pub fn write_uuid(bytes: &[u8; 16], out: &mut impl TextOut) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
}

/// The payload of a varlena stored with a 1-byte or an uncompressed 4-byte
/// header (what a detoasted, possibly packed, datum is); `None` for anything else.
pub fn varlena_payload(bytes: &[u8]) -> Option<&[u8]> {
    let first = *bytes.first()?;
    if first & 0x01 == 0x01 {
        // 1-byte header: the length (header included) in the upper 7 bits;
        // 0x01 alone is an external TOAST pointer.
        let len = usize::from(first >> 1);
        return (first != 0x01 && len >= 1).then(|| bytes.get(1..len)).flatten();
    }
    if first & 0x03 != 0 {
        return None; // compressed inline
    }
    let header = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
    let len = (header >> 2) as usize;
    bytes.get(4..len)
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

const NUMERIC_SIGN_MASK: u16 = 0xC000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_SHORT: u16 = 0x8000;
const NUMERIC_SPECIAL: u16 = 0xC000;
const NUMERIC_EXT_SIGN_MASK: u16 = 0xF000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
const NUMERIC_SHORT_SIGN_MASK: u16 = 0x2000;
const NUMERIC_SHORT_DSCALE_MASK: u16 = 0x1F80;
const NUMERIC_SHORT_DSCALE_SHIFT: u16 = 7;
const NUMERIC_SHORT_WEIGHT_SIGN_MASK: u16 = 0x0040;
const NUMERIC_SHORT_WEIGHT_MASK: u16 = 0x003F;
const NUMERIC_DSCALE_MASK: u16 = 0x3FFF;
/// Decimal digits per base-10000 digit.
const DEC_DIGITS: usize = 4;

/// A `numeric` (its bytes after the varlena header) as `numeric_out` writes it.
pub fn write_numeric(num: &[u8], out: &mut impl TextOut) -> Option<()> {
    let head = u16_at(num, 0)?;
    let (negative, weight, dscale, digits_at) = match head & NUMERIC_SIGN_MASK {
        NUMERIC_SPECIAL => {
            out.push_str(match head & NUMERIC_EXT_SIGN_MASK {
                NUMERIC_NAN => "NaN",
                NUMERIC_PINF => "Infinity",
                NUMERIC_NINF => "-Infinity",
                _ => return None,
            });
            return Some(());
        }
        NUMERIC_SHORT => {
            let magnitude = head & NUMERIC_SHORT_WEIGHT_MASK;
            let weight = if head & NUMERIC_SHORT_WEIGHT_SIGN_MASK != 0 {
                (!NUMERIC_SHORT_WEIGHT_MASK | magnitude) as i16
            } else {
                magnitude as i16
            };
            let dscale = (head & NUMERIC_SHORT_DSCALE_MASK) >> NUMERIC_SHORT_DSCALE_SHIFT;
            (head & NUMERIC_SHORT_SIGN_MASK != 0, weight, dscale, 2)
        }
        sign => {
            let weight = u16_at(num, 2)? as i16;
            (sign == NUMERIC_NEG, weight, head & NUMERIC_DSCALE_MASK, 4)
        }
    };
    let body = num.get(digits_at..)?;
    if body.len() % 2 != 0 {
        return None;
    }
    let ndigits = body.len() / 2;
    let digit = |i: i64| -> Option<u16> {
        if i < 0 || i as usize >= ndigits {
            return Some(0);
        }
        let d = u16_at(body, i as usize * 2)?;
        (d < 10_000).then_some(d)
    };
    if negative {
        out.push('-');
    }
    let weight = i64::from(weight);
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            let d = digit(i)?;
            push_padded(out, u64::from(d), if i == 0 { 1 } else { DEC_DIGITS });
        }
    }
    let dscale = usize::from(dscale);
    if dscale > 0 {
        out.push('.');
        let mut written = 0;
        let mut i = weight + 1;
        while written < dscale {
            let d = digit(i)?;
            let take = (dscale - written).min(DEC_DIGITS);
            // The first `take` of the group's four digits.
            let shown = u64::from(d) / 10u64.pow((DEC_DIGITS - take) as u32);
            push_padded(out, shown, take);
            written += take;
            i += 1;
        }
    }
    Some(())
}

/// Whether a numeric's text is a JSON number, as every number jsonb holds
/// is: not NaN or an infinity, and no leading zero digit (which only a
/// damaged value has).
fn is_json_number(num: &[u8]) -> bool {
    let Some(head) = u16_at(num, 0) else { return false };
    let (weight, digits_at) = match head & NUMERIC_SIGN_MASK {
        NUMERIC_SPECIAL => return false,
        // A negative weight: "0.…".
        NUMERIC_SHORT if head & NUMERIC_SHORT_WEIGHT_SIGN_MASK != 0 => return true,
        NUMERIC_SHORT => ((head & NUMERIC_SHORT_WEIGHT_MASK) as i16, 2),
        _ => match u16_at(num, 2) {
            Some(w) => (w as i16, 4),
            None => return false,
        },
    };
    weight <= 0 || u16_at(num, digits_at).is_some_and(|d| d != 0)
}

const JB_CMASK: u32 = 0x0FFF_FFFF;
const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;
const JB_FARRAY: u32 = 0x4000_0000;
const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;
const JENTRY_ISCONTAINER: u32 = 0x5000_0000;
/// Deepest nesting read (Postgres bounds it by its stack depth check).
const JSONB_MAX_DEPTH: usize = 1000;

fn int_align(n: usize) -> usize {
    (n + 3) & !3
}

/// A `jsonb` (its bytes after the varlena header) as `jsonb_out` writes it.
pub fn write_jsonb(jsonb: &[u8], out: &mut String) -> Option<()> {
    write_container(jsonb, out, 0, true)
}

/// One container; `root` is true for the top level, where a scalar is
/// stored as a one-element array flagged JB_FSCALAR and written alone.
fn write_container(c: &[u8], out: &mut String, depth: usize, root: bool) -> Option<()> {
    if depth > JSONB_MAX_DEPTH {
        return None;
    }
    let header = u32_at(c, 0)?;
    let count = (header & JB_CMASK) as usize;
    let (object, scalar) = match header & (JB_FOBJECT | JB_FARRAY | JB_FSCALAR) {
        JB_FOBJECT => (true, false),
        JB_FARRAY => (false, false),
        h if h == JB_FARRAY | JB_FSCALAR && root && count == 1 => (false, true),
        _ => return None,
    };
    let entries = if object { count.checked_mul(2)? } else { count };
    let data_at = entries.checked_mul(4)?.checked_add(4)?;
    let data = c.get(data_at..)?;
    // Start and end of every entry's data, read in order: an entry holds
    // either its length or (every 32nd) its end offset.
    let mut spans = Vec::with_capacity(entries);
    let mut end = 0usize;
    for i in 0..entries {
        let e = u32_at(c, 4 + i * 4)?;
        let start = end;
        end = if e & JENTRY_HAS_OFF != 0 {
            (e & JENTRY_OFFLENMASK) as usize
        } else {
            start.checked_add((e & JENTRY_OFFLENMASK) as usize)?
        };
        if end < start || end > data.len() {
            return None;
        }
        spans.push((e & JENTRY_TYPEMASK, start, end));
    }
    if scalar {
        let &(kind, start, end) = spans.first()?;
        return write_jsonb_value(kind, data, start, end, out, depth);
    }
    if object {
        out.push('{');
        for i in 0..count {
            if i > 0 {
                out.push_str(", ");
            }
            let (kind, start, end) = spans[i];
            if kind != JENTRY_ISSTRING {
                return None;
            }
            write_jsonb_value(kind, data, start, end, out, depth)?;
            out.push_str(": ");
            let (kind, start, end) = spans[count + i];
            write_jsonb_value(kind, data, start, end, out, depth)?;
        }
        out.push('}');
    } else {
        out.push('[');
        for (i, &(kind, start, end)) in spans.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            write_jsonb_value(kind, data, start, end, out, depth)?;
        }
        out.push(']');
    }
    Some(())
}

fn write_jsonb_value(kind: u32, data: &[u8], start: usize, end: usize, out: &mut String, depth: usize) -> Option<()> {
    match kind {
        JENTRY_ISSTRING => {
            let text = std::str::from_utf8(data.get(start..end)?).ok()?;
            write_json_string(text, out);
        }
        JENTRY_ISNUMERIC => {
            let num = varlena_payload(data.get(int_align(start)..end)?)?;
            if !is_json_number(num) {
                return None;
            }
            write_numeric(num, out)?;
        }
        JENTRY_ISBOOL_FALSE => out.push_str("false"),
        JENTRY_ISBOOL_TRUE => out.push_str("true"),
        JENTRY_ISNULL => out.push_str("null"),
        JENTRY_ISCONTAINER => write_container(data.get(int_align(start)..end)?, out, depth + 1, false)?,
        _ => return None,
    }
    Some(())
}

/// A JSON string as Postgres's `escape_json` writes it.
fn write_json_string(text: &str, out: &mut String) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in text.bytes().enumerate() {
        let escape = match b {
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            b'"' => "\\\"",
            b'\\' => "\\\\",
            c if c < 0x20 => "",
            _ => continue,
        };
        // Runs between escapes are copied whole (they end at ASCII bytes,
        // so at character boundaries).
        out.push_str(text.get(plain..i).unwrap_or_default());
        plain = i + 1;
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escape);
        }
    }
    out.push_str(text.get(plain..).unwrap_or_default());
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut String)) -> String {
        let mut out = String::new();
        f(&mut out);
        out
    }

    #[test]
    fn dates_and_timestamps_in_iso_utc() {
        assert_eq!(s(|o| write_date(0, o)), "2000-01-01");
        assert_eq!(s(|o| write_date(-1, o)), "1999-12-31");
        assert_eq!(s(|o| write_date(9_821, o)), "2026-11-21");
        assert_eq!(s(|o| write_date(-730_119, o)), "0001-01-01");
        assert_eq!(s(|o| write_date(-730_120, o)), "0001-12-31 BC");
        assert_eq!(s(|o| write_date(i32::MIN, o)), "-infinity");
        assert_eq!(s(|o| write_date(i32::MAX, o)), "infinity");
        assert_eq!(s(|o| write_timestamp(0, true, o)), "2000-01-01 00:00:00+00");
        assert_eq!(s(|o| write_timestamp(-1, false, o)), "1999-12-31 23:59:59.999999");
        assert_eq!(s(|o| write_timestamp(1_500_000, true, o)), "2000-01-01 00:00:01.5+00");
        assert_eq!(
            s(|o| write_timestamp(-730_120 * USECS_PER_DAY + 3_600_000_000, true, o)),
            "0001-12-31 01:00:00+00 BC"
        );
        assert_eq!(s(|o| write_timestamp(i64::MIN, true, o)), "-infinity");
        assert_eq!(s(|o| write_timestamp(i64::MAX, false, o)), "infinity");
        // Leap days, a century that is not a leap year, one that is.
        assert_eq!(s(|o| write_date(59, o)), "2000-02-29");
        assert_eq!(s(|o| write_date(-36_465, o)), "1900-03-01");
        // Years past 9999 get more digits.
        assert_eq!(s(|o| write_date(2_922_000, o)), "10000-03-01");
    }

    #[test]
    fn the_remembered_day_is_only_the_day_it_was() {
        // Every 97th day from 2 BC to 10001, written between its neighbours and twice in a row, against a plain
        // formatting of the calendar: the cache of the last day written never answers for another day.
        let civil = |d: i64| {
            let (y, m, day) = civil_from_days(d + PG_EPOCH_DAYS_FROM_UNIX);
            let shown = if y <= 0 {
                format!("{:04}", 1 - y)
            } else {
                format!("{y:04}")
            };
            format!("{shown}-{m:02}-{day:02}{}", if y <= 0 { " BC" } else { "" })
        };
        for day in (-730_500i32..2_922_500).step_by(97) {
            for d in [day, day + 1, day, day, day - 1] {
                assert_eq!(s(|o| write_date(d, o)), civil(i64::from(d)), "day {d}");
            }
            let us = i64::from(day) * USECS_PER_DAY + 45_296_000_001;
            let ts = s(|o| write_timestamp(us, true, o));
            assert_eq!(ts, {
                let date = civil(i64::from(day));
                match date.strip_suffix(" BC") {
                    Some(bc) => format!("{bc} 12:34:56.000001+00 BC"),
                    None => format!("{date} 12:34:56.000001+00"),
                }
            });
        }
    }

    #[test]
    fn uuids() {
        let b = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a, 0x11,
        ];
        assert_eq!(s(|o| write_uuid(&b, o)), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }

    fn long_numeric(negative: bool, weight: i16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(if negative { NUMERIC_NEG } else { 0 } | dscale).to_le_bytes());
        v.extend_from_slice(&weight.to_le_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v
    }

    fn short_numeric(negative: bool, weight: i16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let w = (weight as u16) & (NUMERIC_SHORT_WEIGHT_MASK | NUMERIC_SHORT_WEIGHT_SIGN_MASK);
        let head = NUMERIC_SHORT
            | if negative { NUMERIC_SHORT_SIGN_MASK } else { 0 }
            | (dscale << NUMERIC_SHORT_DSCALE_SHIFT)
            | w;
        let mut v = head.to_le_bytes().to_vec();
        for d in digits {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v
    }

    fn num(bytes: &[u8]) -> Option<String> {
        let mut out = String::new();
        write_numeric(bytes, &mut out).map(|()| out)
    }

    #[test]
    fn numerics() {
        assert_eq!(num(&short_numeric(false, 0, 0, &[])).as_deref(), Some("0"));
        assert_eq!(num(&short_numeric(false, 0, 2, &[])).as_deref(), Some("0.00"));
        assert_eq!(num(&short_numeric(false, 0, 2, &[12, 3400])).as_deref(), Some("12.34"));
        assert_eq!(num(&short_numeric(true, -1, 3, &[50])).as_deref(), Some("-0.005"));
        assert_eq!(num(&short_numeric(false, -2, 8, &[12])).as_deref(), Some("0.00000012"));
        assert_eq!(num(&short_numeric(false, 1, 0, &[1])).as_deref(), Some("10000"));
        assert_eq!(
            num(&long_numeric(
                false,
                7,
                9,
                &[12, 3456, 7890, 1234, 5678, 9012, 3456, 7890, 0, 0, 1000]
            ))
            .as_deref(),
            Some("123456789012345678901234567890.000000001")
        );
        assert_eq!(num(&0xC000u16.to_le_bytes()).as_deref(), Some("NaN"));
        assert_eq!(num(&0xD000u16.to_le_bytes()).as_deref(), Some("Infinity"));
        assert_eq!(num(&0xF000u16.to_le_bytes()).as_deref(), Some("-Infinity"));
        // Damaged values are refused, never misread.
        assert_eq!(num(&[]), None);
        assert_eq!(num(&short_numeric(false, 0, 0, &[10_000])), None);
        assert_eq!(num(&[0x00, 0x80, 0x01]), None);
    }

    #[test]
    fn varlena_headers() {
        assert_eq!(varlena_payload(&[(3 << 1) | 1, 7, 8, 9]), Some(&[7u8, 8][..]));
        let mut long = (6u32 << 2).to_le_bytes().to_vec();
        long.extend_from_slice(&[1, 2, 3]);
        assert_eq!(varlena_payload(&long), Some(&[1u8, 2][..]));
        assert_eq!(varlena_payload(&[0x01, 18]), None, "external pointer");
        assert_eq!(varlena_payload(&[0x02, 0, 0, 0]), None, "compressed");
        assert_eq!(
            varlena_payload(&(100u32 << 2).to_le_bytes()),
            None,
            "longer than the bytes"
        );
    }

    /// A jsonb container built as Postgres lays it out.
    enum J {
        Null,
        Bool(bool),
        Num(Vec<u8>),
        Str(&'static str),
        Arr(Vec<J>),
        Obj(Vec<(&'static str, J)>),
    }

    fn container(j: &J, scalar_root: bool) -> Vec<u8> {
        let items: Vec<&J>;
        let keys: Vec<J>;
        let (flags, count, children): (u32, usize, Vec<&J>) = match j {
            J::Arr(a) => {
                items = a.iter().collect();
                (JB_FARRAY, a.len(), items)
            }
            J::Obj(o) => {
                keys = o.iter().map(|(k, _)| J::Str(k)).collect();
                let mut all: Vec<&J> = keys.iter().collect();
                all.extend(o.iter().map(|(_, v)| v));
                (JB_FOBJECT, o.len(), all)
            }
            other if scalar_root => (JB_FARRAY | JB_FSCALAR, 1, vec![other]),
            _ => unreachable!("scalars are only roots here"),
        };
        let mut head = (flags | count as u32).to_le_bytes().to_vec();
        let mut data: Vec<u8> = Vec::new();
        let base = 4 + children.len() * 4;
        for (i, child) in children.iter().enumerate() {
            let start = data.len();
            let kind = match child {
                J::Null => JENTRY_ISNULL,
                J::Bool(true) => JENTRY_ISBOOL_TRUE,
                J::Bool(false) => JENTRY_ISBOOL_FALSE,
                J::Str(t) => {
                    data.extend_from_slice(t.as_bytes());
                    JENTRY_ISSTRING
                }
                J::Num(n) => {
                    while !(base + data.len()).is_multiple_of(4) {
                        data.push(0);
                    }
                    data.extend_from_slice(&((n.len() as u32 + 4) << 2).to_le_bytes());
                    data.extend_from_slice(n);
                    JENTRY_ISNUMERIC
                }
                nested => {
                    while !(base + data.len()).is_multiple_of(4) {
                        data.push(0);
                    }
                    data.extend_from_slice(&container(nested, false));
                    JENTRY_ISCONTAINER
                }
            };
            let entry = if i % 32 == 0 {
                JENTRY_HAS_OFF | data.len() as u32
            } else {
                (data.len() - start) as u32
            };
            head.extend_from_slice(&(kind | entry).to_le_bytes());
        }
        head.extend_from_slice(&data);
        head
    }

    fn jsonb(j: &J) -> Option<String> {
        let mut out = String::new();
        write_jsonb(&container(j, true), &mut out).map(|()| out)
    }

    #[test]
    fn jsonb_as_jsonb_out_writes_it() {
        let one = short_numeric(false, 0, 0, &[1]);
        let doc = J::Obj(vec![
            ("g", J::Num(one.clone())),
            ("tag", J::Str("x\"1\n\u{1}é")),
            (
                "a",
                J::Arr(vec![J::Null, J::Bool(true), J::Bool(false), J::Obj(vec![])]),
            ),
        ]);
        assert_eq!(
            jsonb(&doc).as_deref(),
            Some(r#"{"g": 1, "tag": "x\"1\n\u0001é", "a": [null, true, false, {}]}"#)
        );
        assert_eq!(jsonb(&J::Str("s")).as_deref(), Some(r#""s""#));
        assert_eq!(jsonb(&J::Num(one.clone())).as_deref(), Some("1"));
        assert_eq!(jsonb(&J::Arr(vec![])).as_deref(), Some("[]"));
        // More than 32 children: some entries hold offsets.
        let many = J::Arr((0..70).map(|_| J::Num(one.clone())).collect());
        let expected = format!("[{}]", vec!["1"; 70].join(", "));
        assert_eq!(jsonb(&many).as_deref(), Some(expected.as_str()));
    }

    #[test]
    fn jsonb_numbers_that_are_not_json_are_refused() {
        let nan = 0xC000u16.to_le_bytes().to_vec();
        assert_eq!(jsonb(&J::Arr(vec![J::Num(nan)])), None);
        let leading_zero = short_numeric(false, 1, 0, &[0, 5]);
        assert_eq!(jsonb(&J::Arr(vec![J::Num(leading_zero)])), None);
        let small = short_numeric(true, -1, 3, &[50]);
        assert_eq!(jsonb(&J::Arr(vec![J::Num(small)])).as_deref(), Some("[-0.005]"));
    }

    #[test]
    fn damaged_jsonb_is_refused() {
        let doc = container(&J::Obj(vec![("k", J::Str("value"))]), true);
        for len in 0..doc.len() {
            let mut out = String::new();
            assert!(write_jsonb(&doc[..len], &mut out).is_none(), "prefix of {len} bytes");
        }
        // Altered or random bytes: text that is JSON, or nothing; never a panic.
        let valid = |bytes: &[u8]| {
            let mut out = String::new();
            if write_jsonb(bytes, &mut out).is_some() {
                assert!(
                    serde_json::from_str::<Box<serde_json::value::RawValue>>(&out).is_ok(),
                    "{out:?}"
                );
            }
        };
        let nested = container(
            &J::Obj(vec![(
                "a",
                J::Arr(vec![J::Num(short_numeric(false, 0, 1, &[7, 5000])), J::Null]),
            )]),
            true,
        );
        for doc in [&doc, &nested] {
            for i in 0..doc.len() {
                for v in [0u8, 0x01, 0x10, 0x50, 0x7f, 0x80, 0xc0, 0xff] {
                    let mut d = doc.clone();
                    d[i] = v;
                    valid(&d);
                }
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut bytes = nested.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed % bytes.len() as u64) as usize;
                bytes[at] = (seed >> 32) as u8;
            }
            valid(&bytes);
        }
    }
}
