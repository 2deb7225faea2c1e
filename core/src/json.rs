//! The JSON format: one object per event, written straight into a byte buffer.
//!
//! `decode(frame)` in SQL and the json format share this encoder, so the same
//! event always produces the same bytes.

use crate::event::*;
use crate::lsn::format_lsn;
use crate::time::{unix_us_to_ms, write_iso8601};

/// Appends the JSON object for `event` to `out`.
pub fn write_event(event: &Event<'_>, out: &mut Vec<u8>) {
    match event {
        Event::Begin(h) => write_txn_record(b"begin", h, out),
        Event::Change(c) => write_change(c, out),
        Event::Truncate(t) => write_truncate(t, out),
        Event::Message(m) => write_message(m, out),
        Event::Metadata(m) => {
            out.extend_from_slice(b"{\"type\":\"metadata\"");
            write_txn_fields(&m.txn, out);
            out.extend_from_slice(b",\"metadata\":");
            write_embedded_json(&m.json, out);
            out.push(b'}');
        }
        Event::Commit(c) => {
            write_txn_record(b"commit", &c.txn, out);
            out.pop();
            out.extend_from_slice(b",\"changes\":");
            push_int(out, c.changes);
            if let Some(meta) = &c.metadata {
                out.extend_from_slice(b",\"metadata\":");
                write_embedded_json(meta, out);
            }
            out.push(b'}');
        }
    }
}

pub fn event_to_string(event: &Event<'_>) -> String {
    let mut out = Vec::with_capacity(256);
    write_event(event, &mut out);
    // The encoder writes only valid UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

fn write_txn_record(kind: &[u8], h: &TxnHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind);
    out.extend_from_slice(b"\",\"xid\":");
    push_int(out, h.xid);
    out.extend_from_slice(b",\"event_id\":");
    push_int(out, h.event_id);
    out.extend_from_slice(b",\"lsn\":\"");
    format_lsn(h.event_id, out);
    out.extend_from_slice(b"\",\"ts\":");
    push_int(out, unix_us_to_ms(h.commit_us));
    out.extend_from_slice(b",\"commit_time\":\"");
    write_iso8601(h.commit_us, out);
    out.extend_from_slice(b"\"}");
}

/// `,"event_id":…,"xid":…,"ts":…` shared by records inside a transaction.
fn write_txn_fields(h: &TxnHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"event_id\":");
    push_int(out, h.event_id);
    out.extend_from_slice(b",\"xid\":");
    push_int(out, h.xid);
    out.extend_from_slice(b",\"ts\":");
    push_int(out, unix_us_to_ms(h.commit_us));
}

fn write_change(c: &Change<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(c.op.as_str().as_bytes());
    out.extend_from_slice(b"\",\"event_id\":");
    push_int(out, c.txn.event_id);
    out.extend_from_slice(b",\"seq\":");
    push_int(out, c.seq);
    out.extend_from_slice(b",\"xid\":");
    push_int(out, c.txn.xid);
    out.extend_from_slice(b",\"ts\":");
    push_int(out, unix_us_to_ms(c.txn.commit_us));
    out.extend_from_slice(b",\"schema\":");
    write_str(&c.schema, out);
    out.extend_from_slice(b",\"table\":");
    write_str(&c.table, out);
    out.extend_from_slice(b",\"key\":");
    match &c.key {
        Some(row) => write_row(row, out),
        None => out.extend_from_slice(b"null"),
    }
    if let Some(row) = &c.new {
        out.extend_from_slice(b",\"new\":");
        write_row(row, out);
    }
    if let Some(row) = &c.old {
        out.extend_from_slice(b",\"old\":");
        write_row(row, out);
    }
    if let Some(t) = &c.tracking {
        out.extend_from_slice(b",\"label\":");
        write_str(&t.label, out);
        if let Some(id) = &t.identifier {
            out.extend_from_slice(b",\"identifier\":");
            write_str(id, out);
        }
        if let Some(id) = &t.old_identifier {
            out.extend_from_slice(b",\"old_identifier\":");
            write_str(id, out);
        }
        if t.unknown_identifier {
            out.extend_from_slice(b",\"unknown_identifier\":true");
        }
    }
    if !c.unchanged_toast.is_empty() {
        out.extend_from_slice(b",\"unchanged_toast\":[");
        for (i, name) in c.unchanged_toast.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(name, out);
        }
        out.push(b']');
    }
    out.push(b'}');
}

fn write_truncate(t: &Truncate<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"type\":\"truncate\",\"event_id\":");
    push_int(out, t.txn.event_id);
    out.extend_from_slice(b",\"seq\":");
    push_int(out, t.seq);
    out.extend_from_slice(b",\"xid\":");
    push_int(out, t.txn.xid);
    out.extend_from_slice(b",\"ts\":");
    push_int(out, unix_us_to_ms(t.txn.commit_us));
    out.extend_from_slice(b",\"tables\":[");
    for (i, name) in t.tables.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(name, out);
    }
    out.extend_from_slice(b"],\"cascade\":");
    push_bool(out, t.cascade);
    out.extend_from_slice(b",\"restart_identity\":");
    push_bool(out, t.restart_identity);
    let labels = t.labels();
    if !labels.is_empty() {
        out.extend_from_slice(b",\"labels\":[");
        for (i, label) in labels.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(label, out);
        }
        out.push(b']');
    }
    out.push(b'}');
}

fn write_message(m: &Message<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"type\":\"message\",\"transactional\":");
    push_bool(out, m.txn.is_some());
    if let Some(h) = &m.txn {
        write_txn_fields(h, out);
    }
    out.extend_from_slice(b",\"lsn\":\"");
    format_lsn(m.lsn, out);
    out.extend_from_slice(b"\",\"prefix\":");
    write_str(&m.prefix, out);
    match &m.content {
        MessageContent::Text(text) => {
            out.extend_from_slice(b",\"content\":");
            write_str(text, out);
        }
        MessageContent::Bytes(bytes) => {
            // Not UTF-8: sent as bytea hex text, like Postgres prints bytea.
            out.extend_from_slice(b",\"content\":null,\"content_bytea\":\"\\\\x");
            const HEX: &[u8; 16] = b"0123456789abcdef";
            for b in bytes.iter() {
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
            }
            out.push(b'"');
        }
    }
    out.push(b'}');
}

pub fn write_row(row: &[Column<'_>], out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, col) in row.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&col.name, out);
        out.push(b':');
        write_value(&col.value, out);
    }
    out.push(b'}');
}

pub fn write_value(value: &Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Scalar(s) => write_scalar(s, out),
        Value::Array { dims, elems } => {
            if dims.is_empty() || elems.is_empty() {
                out.extend_from_slice(b"[]");
            } else {
                write_array_dim(dims, elems, out);
            }
        }
    }
}

/// Writes nested arrays for `dims`, consuming `elems` in row-major order.
/// Missing elements (a malformed frame) are written as null.
fn write_array_dim(dims: &[u32], elems: &[Scalar<'_>], out: &mut Vec<u8>) {
    let len = dims[0] as usize;
    out.push(b'[');
    if dims.len() == 1 {
        for i in 0..len {
            if i > 0 {
                out.push(b',');
            }
            match elems.get(i) {
                Some(e) => write_scalar(e, out),
                None => out.extend_from_slice(b"null"),
            }
        }
    } else {
        let stride: usize = dims[1..].iter().map(|d| *d as usize).product();
        for i in 0..len {
            if i > 0 {
                out.push(b',');
            }
            let start = (i * stride).min(elems.len());
            let end = (start + stride).min(elems.len());
            write_array_dim(&dims[1..], &elems[start..end], out);
        }
    }
    out.push(b']');
}

pub fn write_scalar(s: &Scalar<'_>, out: &mut Vec<u8>) {
    match s {
        Scalar::Null => out.extend_from_slice(b"null"),
        Scalar::Bool(b) => push_bool(out, *b),
        Scalar::Int(i) => push_int(out, *i),
        Scalar::Float4(f) => push_float4(out, *f),
        Scalar::Float(f) => push_float(out, *f),
        Scalar::Numeric(text) | Scalar::Text(text) => write_str(text, out),
        Scalar::Json(text) => write_embedded_json(text, out),
        Scalar::Omitted(bytes) => {
            out.extend_from_slice(b"{\"");
            out.extend_from_slice(OMITTED_MARKER.as_bytes());
            out.extend_from_slice(b"\":\"omitted\",\"bytes\":");
            push_int(out, *bytes);
            out.push(b'}');
        }
        Scalar::Date(_) | Scalar::Timestamp(_) | Scalar::TimestampTz(_) | Scalar::Uuid(_) => {
            // Digits, dashes, colons, spaces, a dot, a plus and "BC": nothing to escape.
            out.push(b'"');
            s.write_typed_text(out);
            out.push(b'"');
        }
    }
}

fn push_int<I: itoa::Integer>(out: &mut Vec<u8>, value: I) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(value).as_bytes());
}

fn push_bool(out: &mut Vec<u8>, value: bool) {
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

fn push_float(out: &mut Vec<u8>, value: f64) {
    if value.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if value.is_infinite() {
        out.extend_from_slice(if value > 0.0 { b"\"Infinity\"" } else { b"\"-Infinity\"" });
    } else {
        let mut buf = ryu::Buffer::new();
        out.extend_from_slice(buf.format_finite(value).as_bytes());
    }
}

fn push_float4(out: &mut Vec<u8>, value: f32) {
    if value.is_finite() {
        let mut buf = ryu::Buffer::new();
        out.extend_from_slice(buf.format_finite(value).as_bytes());
    } else {
        push_float(out, f64::from(value));
    }
}

/// Embeds JSON text verbatim, minus line breaks and indentation outside
/// strings, so every message stays on one line (json keeps its input's
/// formatting; jsonb output never has line breaks). Empty text becomes null.
pub fn write_embedded_json(text: &str, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        out.extend_from_slice(b"null");
        return;
    }
    if !bytes.iter().any(|&b| b == b'\n' || b == b'\r') {
        out.extend_from_slice(bytes);
        return;
    }
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'\n' | b'\r' | b'\t' | b' ' => {}
                b'"' => {
                    in_string = true;
                    out.push(b);
                }
                _ => out.push(b),
            }
        }
    }
}

/// Writes a JSON string literal.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Most strings need no escape: one check the compiler vectorises.
    if bytes.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value as J};
    use std::borrow::Cow;

    fn header() -> TxnHeader {
        TxnHeader {
            xid: 750,
            event_id: 23_803_720,
            commit_us: 1_763_737_200_123_456,
        }
    }

    fn parse(event: &Event<'_>) -> J {
        let text = event_to_string(event);
        assert!(!text.contains('\n'), "one line: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("invalid JSON {text}: {e}"))
    }

    fn col<'a>(name: &'a str, value: Scalar<'a>) -> Column<'a> {
        Column {
            name: Cow::Borrowed(name),
            value: Value::Scalar(value),
        }
    }

    #[test]
    fn begin_has_the_documented_shape() {
        assert_eq!(
            parse(&Event::Begin(header())),
            json!({"type":"begin","xid":750,"event_id":23803720,"lsn":"0/16B3748",
                   "ts":1763737200123_i64,"commit_time":"2025-11-21T15:00:00.123456+00:00"})
        );
    }

    #[test]
    fn commit_carries_changes_and_metadata() {
        let c = Commit {
            txn: header(),
            changes: 3,
            metadata: Some(Cow::Borrowed("{\"a\": 1}")),
        };
        let j = parse(&Event::Commit(c));
        assert_eq!(j["type"], "commit");
        assert_eq!(j["changes"], 3);
        assert_eq!(j["metadata"], json!({"a":1}));
        assert_eq!(j["lsn"], "0/16B3748");
        let c = Commit {
            txn: header(),
            changes: 0,
            metadata: None,
        };
        assert!(parse(&Event::Commit(c)).get("metadata").is_none());
    }

    #[test]
    fn change_values_are_typed() {
        let change = Change {
            txn: header(),
            seq: 4,
            op: Op::Update,
            schema: "public".into(),
            table: "t\"x".into(),
            key: Some(vec![col("id", Scalar::Int(10))]),
            new: Some(vec![
                col("id", Scalar::Int(10)),
                col("b", Scalar::Bool(true)),
                col("f", Scalar::Float(1.5)),
                col("f4", Scalar::Float4(0.1)),
                col("f4n", Scalar::Float4(f32::NAN)),
                col("nan", Scalar::Float(f64::NAN)),
                col("inf", Scalar::Float(f64::NEG_INFINITY)),
                col("n", Scalar::Numeric("12345678901234567890.123456789".into())),
                col("j", Scalar::Json("{\n  \"k\": \"a b\\n\"\n}".into())),
                col("t", Scalar::Text("line\nbreak \u{1} \\ \"q\" é".into())),
                col("z", Scalar::Null),
                Column {
                    name: "arr".into(),
                    value: Value::Array {
                        dims: vec![2, 2],
                        elems: vec![Scalar::Int(1), Scalar::Int(2), Scalar::Null, Scalar::Int(4)],
                    },
                },
                Column {
                    name: "empty".into(),
                    value: Value::Array {
                        dims: vec![],
                        elems: vec![],
                    },
                },
            ]),
            old: None,
            unchanged_toast: vec!["big".into()],
            tracking: None,
        };
        let j = parse(&Event::Change(change));
        assert_eq!(
            j,
            json!({"type":"update","event_id":23803720,"seq":4,"xid":750,"ts":1763737200123_i64,
              "schema":"public","table":"t\"x","key":{"id":10},
              "new":{"id":10,"b":true,"f":1.5,"f4":0.1,"f4n":"NaN","nan":"NaN","inf":"-Infinity",
                     "n":"12345678901234567890.123456789","j":{"k":"a b\n"},
                     "t":"line\nbreak \u{1} \\ \"q\" é","z":null,"arr":[[1,2],[null,4]],"empty":[]},
              "unchanged_toast":["big"]})
        );
    }

    #[test]
    fn delete_without_identity_has_null_key() {
        let change = Change {
            txn: header(),
            seq: 0,
            op: Op::Delete,
            schema: "s".into(),
            table: "t".into(),
            key: None,
            new: None,
            old: None,
            unchanged_toast: vec![],
            tracking: Some(Tracking {
                relid: 16384,
                label: "parameters".into(),
                identifier: Some("WAFCONFIG".into()),
                old_identifier: None,
                unknown_identifier: true,
            }),
        };
        let j = parse(&Event::Change(change));
        assert_eq!(j["label"], "parameters");
        assert_eq!(j["identifier"], "WAFCONFIG");
        assert_eq!(j["unknown_identifier"], true);
        assert!(j.get("old_identifier").is_none());
        assert_eq!(j["key"], J::Null);
        assert!(j.get("new").is_none() && j.get("old").is_none() && j.get("unchanged_toast").is_none());
    }

    #[test]
    fn truncate_and_messages() {
        let t = Truncate {
            txn: header(),
            seq: 1,
            tables: vec!["public.a".into(), "public.b".into()],
            cascade: true,
            restart_identity: false,
            tracked: vec![],
        };
        assert_eq!(
            parse(&Event::Truncate(t)),
            json!({"type":"truncate","event_id":23803720,"seq":1,"xid":750,"ts":1763737200123_i64,
                   "tables":["public.a","public.b"],"cascade":true,"restart_identity":false})
        );
        let m = Message {
            txn: None,
            lsn: 0x10,
            prefix: "p".into(),
            content: MessageContent::Bytes(Cow::Borrowed(&[0xff, 0x01])),
        };
        let j = parse(&Event::Message(m));
        assert_eq!(j["transactional"], false);
        assert_eq!(j["content_bytea"], "\\xff01");
        assert!(j.get("event_id").is_none());
        let m = Message {
            txn: Some(header()),
            lsn: 0x10,
            prefix: "p".into(),
            content: MessageContent::Text("hello".into()),
        };
        let j = parse(&Event::Message(m));
        assert_eq!(j["transactional"], true);
        assert_eq!(j["content"], "hello");
        assert_eq!(j["event_id"], 23803720);
        let md = MetadataEvent {
            txn: header(),
            json: "{\"user\":\"ann\"}".into(),
        };
        assert_eq!(parse(&Event::Metadata(md))["metadata"], json!({"user":"ann"}));
    }

    #[test]
    fn strings_escape_every_control_character() {
        for c in 0u8..0x20 {
            let s = String::from(char::from(c));
            let mut out = Vec::new();
            write_str(&s, &mut out);
            let back: String = serde_json::from_slice(&out).unwrap_or_default();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn embedded_json_keeps_strings_intact() {
        let mut out = Vec::new();
        write_embedded_json("[\n \"a \\\" b \", {\"b\" :\r\n 2}]", &mut out);
        assert_eq!(String::from_utf8_lossy(&out), "[\"a \\\" b \",{\"b\":2}]");
    }

    #[test]
    fn floats_round_trip() {
        for f in [0.0, -0.0, 1e300, 1e-300, 0.1, f64::MAX, f64::MIN_POSITIVE] {
            let mut out = Vec::new();
            push_float(&mut out, f);
            let back: f64 = serde_json::from_slice(&out).unwrap_or(f64::NAN);
            assert_eq!(back, f);
        }
    }
}
