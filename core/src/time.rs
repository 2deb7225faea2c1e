//! Commit time conversions: Postgres timestamps to Unix milliseconds and
//! ISO 8601 text, without any calendar library.

/// Microseconds between 1970-01-01 and 2000-01-01 (the Postgres epoch).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A `TimestampTz` (microseconds since 2000-01-01 UTC) as Unix microseconds.
pub fn pg_timestamp_to_unix_us(ts: i64) -> i64 {
    ts.saturating_add(PG_EPOCH_OFFSET_US)
}

/// Unix microseconds to Unix milliseconds, rounding toward negative infinity.
pub fn unix_us_to_ms(us: i64) -> i64 {
    us.div_euclid(1000)
}

/// Writes `2026-11-21T15:00:00.123456+00:00`.
pub fn write_iso8601(unix_us: i64, out: &mut Vec<u8>) {
    let secs = unix_us.div_euclid(1_000_000);
    let micros = unix_us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = crate::pgtext::civil_from_days(days);
    let (m, d) = (i64::from(m), i64::from(d));
    let (hh, mm, ss) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    push_padded(out, y, 4);
    out.push(b'-');
    push_padded(out, m, 2);
    out.push(b'-');
    push_padded(out, d, 2);
    out.push(b'T');
    push_padded(out, hh, 2);
    out.push(b':');
    push_padded(out, mm, 2);
    out.push(b':');
    push_padded(out, ss, 2);
    out.push(b'.');
    push_padded(out, micros, 6);
    out.extend_from_slice(b"+00:00");
}

pub fn iso8601(unix_us: i64) -> String {
    let mut v = Vec::with_capacity(32);
    write_iso8601(unix_us, &mut v);
    String::from_utf8_lossy(&v).into_owned()
}

fn push_padded(out: &mut Vec<u8>, value: i64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(value.unsigned_abs());
    if value < 0 {
        out.push(b'-');
    }
    for _ in digits.len()..width {
        out.push(b'0');
    }
    out.extend_from_slice(digits.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtext::civil_from_days;

    #[test]
    fn formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000000+00:00");
        // 2026-11-21T15:00:00.123456Z
        assert_eq!(iso8601(1_763_737_200_123_456), "2025-11-21T15:00:00.123456+00:00");
        assert_eq!(iso8601(1_795_273_200_123_456), "2026-11-21T15:00:00.123456+00:00");
        assert_eq!(iso8601(951_782_400_000_000), "2000-02-29T00:00:00.000000+00:00");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59.999999+00:00");
    }

    #[test]
    fn converts_postgres_epoch() {
        assert_eq!(pg_timestamp_to_unix_us(0), PG_EPOCH_OFFSET_US);
        assert_eq!(unix_us_to_ms(1_763_737_200_123_456), 1_763_737_200_123);
        assert_eq!(unix_us_to_ms(-1), -1);
    }

    #[test]
    fn every_day_round_trips_through_the_calendar() {
        // Walk 1900..2200 day by day and check the date only ever moves forward by one day.
        let mut prev = civil_from_days(-25_567);
        assert_eq!(prev, (1900, 1, 1));
        for day in -25_566..84_000 {
            let cur = civil_from_days(day);
            let next_expected = if cur.2 == 1 {
                assert!(cur.1 == prev.1 + 1 || (cur.1 == 1 && prev.1 == 12));
                cur
            } else {
                (prev.0, prev.1, prev.2 + 1)
            };
            assert_eq!(cur, next_expected);
            prev = cur;
        }
    }
}
