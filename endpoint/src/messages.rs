//! The JSON (and SSE) texts sent to clients.
//!
//! Change objects are built by hand so the JSON texts from Postgres (`key`, `new`, `old`, `metadata`) are
//! embedded without re-encoding; each is checked to be one JSON value first (a broken text becomes `null`
//! rather than breaking the client's parser). Live rows are serialised once per batch and the bytes shared.

use serde_json::value::RawValue;

use crate::api::ChangeRow;

/// Appends `s` as a JSON string.
pub(crate) fn push_str(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => out.push_str("null"),
    }
}

fn push_raw(out: &mut String, json: Option<&str>) {
    match json.and_then(|t| serde_json::from_str::<&RawValue>(t).ok()) {
        Some(raw) => out.push_str(raw.get()),
        None => out.push_str("null"),
    }
}

fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_str(out, s),
        None => out.push_str("null"),
    }
}

/// `{"type":"change","cursor":..,...}`.
pub(crate) fn change(row: &ChangeRow) -> String {
    let payload = [&row.key, &row.new, &row.old, &row.metadata]
        .iter()
        .map(|t| t.as_ref().map_or(0, String::len))
        .sum::<usize>();
    let mut out = String::with_capacity(256 + payload);
    out.push_str("{\"type\":\"change\",\"cursor\":");
    push_str(&mut out, &row.cursor);
    out.push_str(&format!(
        ",\"event_id\":{},\"seq\":{},\"ts\":{},\"xid\":{},\"label\":",
        row.event_id, row.seq, row.ts, row.xid
    ));
    push_str(&mut out, &row.label);
    out.push_str(",\"table\":");
    push_str(&mut out, &row.table_name);
    out.push_str(",\"op\":");
    push_str(&mut out, &row.op);
    out.push_str(",\"identifier\":");
    push_opt_str(&mut out, row.identifier.as_deref());
    for (name, json) in [
        ("key", &row.key),
        ("new", &row.new),
        ("old", &row.old),
        ("metadata", &row.metadata),
    ] {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        push_raw(&mut out, json.as_deref());
    }
    out.push('}');
    out
}

/// A version increment: `{"label":..,"data":{..moved entries..}}`.
pub(crate) fn version_delta(label: &str, data: &str) -> String {
    let mut out = String::with_capacity(32 + label.len() + data.len());
    out.push_str("{\"label\":");
    push_str(&mut out, label);
    out.push_str(",\"data\":");
    push_raw(&mut out, Some(data));
    out.push('}');
    out
}

/// One SSE event; a `data` of several lines becomes several `data:` lines (SSE joins them back with `\n`).
pub(crate) fn sse_event(id: Option<&str>, event: &str, data: &str) -> String {
    let mut out = String::with_capacity(32 + data.len() + id.map_or(0, str::len));
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
    out
}

/// `{"type":"error","code":..,"message":..}`, with the label it concerns when there is one.
pub(crate) fn error(code: &str, message: &str, label: Option<&str>) -> String {
    let mut out = String::from("{\"type\":\"error\",\"code\":");
    push_str(&mut out, code);
    if let Some(label) = label {
        out.push_str(",\"label\":");
        push_str(&mut out, label);
    }
    out.push_str(",\"message\":");
    push_str(&mut out, message);
    out.push('}');
    out
}

/// `{"type":"resync","reason":"cursor_expired"|"cursor_foreign"|"history_gap"|"timeline_diverged","labels":[..],
/// "message":..}` (labels: of the WebSocket subscription concerned).
pub(crate) fn resync(reason: &str, message: &str, labels: Option<&[String]>) -> String {
    let mut out = String::from("{\"type\":\"resync\",\"reason\":");
    push_str(&mut out, reason);
    if let Some(labels) = labels {
        out.push_str(",\"labels\":");
        push_labels(&mut out, labels);
    }
    out.push_str(",\"message\":");
    push_str(&mut out, message);
    out.push('}');
    out
}

fn push_labels(out: &mut String, labels: &[String]) {
    out.push('[');
    for (i, l) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(out, l);
    }
    out.push(']');
}

/// `{"type":"subscribed"|"unsubscribed","labels":[..]}` with `"cursor"` for subscriptions.
pub(crate) fn subscribed(kind: &str, labels: &[String], cursor: Option<Option<&str>>) -> String {
    let mut out = String::from("{\"type\":");
    push_str(&mut out, kind);
    out.push_str(",\"labels\":");
    push_labels(&mut out, labels);
    if let Some(cursor) = cursor {
        out.push_str(",\"cursor\":");
        push_opt_str(&mut out, cursor);
    }
    out.push('}');
    out
}

/// `{"type":"checkpoint","cursor":..}`.
pub(crate) fn checkpoint(cursor: &str) -> String {
    let mut out = String::from("{\"type\":\"checkpoint\",\"cursor\":");
    push_str(&mut out, cursor);
    out.push('}');
    out
}

/// The long-poll body `{"changes":[..],"cursor":..}` from already serialised change objects.
pub(crate) fn changes_body<'a>(changes: impl Iterator<Item = &'a str>, cursor: Option<&str>) -> String {
    let mut out = String::from("{\"changes\":[");
    for (i, c) in changes.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(c);
    }
    out.push_str("],\"cursor\":");
    push_opt_str(&mut out, cursor);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn change_objects_embed_row_json_and_escape_text() {
        let row = ChangeRow {
            cursor: "cr1_x".into(),
            event_id: 5,
            seq: 1,
            ts: -2,
            xid: 9,
            label: "l\"abel".into(),
            table_name: "public.t".into(),
            op: "update".into(),
            identifier: None,
            key: Some("{\"id\": 1}".into()),
            new: Some("{\"a\":[1,2,{\"b\":\"\\u00e9\\n\"}]}".into()),
            old: Some("{broken".into()),
            metadata: None,
            relid: 1,
            audience: None,
        };
        let v: Value = serde_json::from_str(&change(&row)).unwrap();
        assert_eq!(
            v,
            json!({"type":"change","cursor":"cr1_x","event_id":5,"seq":1,"ts":-2,"xid":9,"label":"l\"abel",
                   "table":"public.t","op":"update","identifier":null,"key":{"id":1},"new":{"a":[1,2,{"b":"é\n"}]},
                   "old":null,"metadata":null})
        );
        assert_eq!(
            sse_event(Some("c"), "change", "a\nb"),
            "id: c\nevent: change\ndata: a\ndata: b\n\n"
        );
        let body = changes_body(["{}", "[]"].into_iter(), None);
        assert_eq!(body, "{\"changes\":[{},[]],\"cursor\":null}");
    }
}
