//! Request parameters: query strings, labels, cursors, wait durations, limits and tenant filters.
//!
//! Shared by WebSocket subscriptions, SSE and long-polls so they accept and refuse the same things.

use std::time::Duration;

use changerelay_core::cursor::Cursor;
use changerelay_core::filter::Filter;
use serde_json::Value;

use crate::auth::Principal;

/// Most labels one subscription or request may name.
pub(crate) const MAX_LABELS: usize = 256;
/// Longest long-poll wait.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(300);

/// A decoded query string; later duplicates are ignored.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(q: &str) -> Result<Query, String> {
        let mut pairs = Vec::new();
        for part in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let k = percent_decode(k).ok_or("query parameter name is not valid percent-encoded UTF-8")?;
            let v =
                percent_decode(v).ok_or_else(|| format!("query parameter {k} is not valid percent-encoded UTF-8"))?;
            pairs.push((k, v));
        }
        Ok(Query(pairs))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space); `None` for bad escapes or UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Labels are `[A-Za-z0-9_.:-]{1,64}`, as `changerelay.track()` enforces.
pub(crate) fn valid_label(l: &str) -> bool {
    (1..=64).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

/// Checks and de-duplicates a list of labels, keeping their order.
pub(crate) fn check_labels<I: IntoIterator<Item = String>>(labels: I) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for l in labels {
        if !valid_label(&l) {
            return Err(format!(
                "invalid label {l:?}: labels are 1 to 64 characters of A-Z a-z 0-9 _ . : -"
            ));
        }
        if !out.contains(&l) {
            out.push(l);
        }
        if out.len() > MAX_LABELS {
            return Err(format!("at most {MAX_LABELS} labels per request"));
        }
    }
    if out.is_empty() {
        return Err("labels must name at least one label".into());
    }
    Ok(out)
}

/// `labels=a,b`.
pub(crate) fn parse_labels(s: &str) -> Result<Vec<String>, String> {
    check_labels(s.split(',').map(|l| l.trim().to_string()).filter(|l| !l.is_empty()))
}

/// A cursor and its position.
pub(crate) fn parse_since(s: &str) -> Result<(String, (u64, u32)), String> {
    Cursor::decode(s)
        .map(|c| (s.to_string(), c.position()))
        .map_err(|e| format!("invalid cursor: {e}"))
}

/// `500ms`, `30s`, `2m` (or bare seconds), capped at [`MAX_WAIT`].
pub(crate) fn parse_wait(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid wait {s:?}: use e.g. 500ms, 30s or 2m");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    Ok(d.min(MAX_WAIT))
}

/// `max`: 1 to 10000.
pub(crate) fn parse_max(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(format!("invalid max {s:?}: must be 1 to 10000")),
    }
}

/// A tenant filter from JSON text (query parameter).
pub(crate) fn parse_filter_text(s: &str) -> Result<(Filter, String), String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("filter is not JSON: {e}"))?;
    parse_filter_value(&v)
}

/// A tenant filter from JSON (WebSocket subscribe); also returns the compact text for the worker.
pub(crate) fn parse_filter_value(v: &Value) -> Result<(Filter, String), String> {
    let f = Filter::parse(v)?;
    Ok((f, v.to_string()))
}

/// Why a label was refused.
pub(crate) enum LabelRefusal {
    Forbidden(String),
    Unknown(String),
}

/// The labels a request reads: the ones it names (each allowed and, once labels are known, known), or
/// when it names none, the token's labels (trust: every known label).
pub(crate) fn resolve_labels(
    requested: Option<Vec<String>>,
    who: &Principal,
    known: Option<&[String]>,
) -> Result<Vec<String>, LabelRefusal> {
    let Some(requested) = requested else {
        return Ok(match &who.labels {
            Some(ls) => ls.clone(),
            None => known.map(<[String]>::to_vec).unwrap_or_default(),
        });
    };
    for l in &requested {
        if !who.allows(l) {
            return Err(LabelRefusal::Forbidden(l.clone()));
        }
        if known.is_some_and(|k| !k.contains(l)) {
            return Err(LabelRefusal::Unknown(l.clone()));
        }
    }
    Ok(requested)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_and_limits() {
        assert_eq!(parse_wait("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_wait("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_wait("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_wait("99m"), Ok(MAX_WAIT));
        for bad in ["", "s", "-1s", "1h", "1.5s", "ms"] {
            assert!(parse_wait(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_max("10000"), Ok(10_000));
        assert!(parse_max("0").is_err() && parse_max("10001").is_err() && parse_max("x").is_err());
    }

    #[test]
    fn queries_and_labels() {
        let q = Query::parse("labels=a%2Cb,c&filter=%7B%22t%22%3A1%7D&x=1+2").unwrap();
        assert_eq!(q.get("labels"), Some("a,b,c"));
        assert_eq!(q.get("filter"), Some("{\"t\":1}"));
        assert_eq!(q.get("x"), Some("1 2"));
        assert!(Query::parse("a=%zz").is_err());
        assert_eq!(parse_labels("a, b,a").unwrap(), vec!["a", "b"]);
        assert!(parse_labels("a b").is_err() && parse_labels(",").is_err());
    }
}
