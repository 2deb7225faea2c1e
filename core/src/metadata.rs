//! Transaction metadata: JSON objects attached with `changerelay.set_metadata`
//! and carried as transactional logical messages with prefix
//! [`METADATA_PREFIX`]. Several objects in one transaction merge, later keys
//! winning.

use serde_json::{Map, Value};

pub const METADATA_PREFIX: &str = "changerelay.metadata";
/// Largest metadata object accepted, in bytes of its JSON text.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// Parses message content as a metadata object; `None` when it is not one.
pub fn parse_object(content: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(content) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Checks one metadata message before it is merged: at most
/// [`MAX_METADATA_BYTES`], together with what the transaction already merged,
/// UTF-8, one JSON object. Returns the object, or why it is left out.
pub fn accept(content: &[u8], merged_bytes: usize) -> Result<Map<String, Value>, String> {
    if content.len() > MAX_METADATA_BYTES {
        return Err(format!(
            "{} bytes, more than the limit of {MAX_METADATA_BYTES} bytes",
            content.len()
        ));
    }
    if merged_bytes + content.len() > MAX_METADATA_BYTES {
        return Err(format!(
            "the transaction's metadata would reach {} bytes, more than the limit of {MAX_METADATA_BYTES} bytes",
            merged_bytes + content.len()
        ));
    }
    let text = std::str::from_utf8(content).map_err(|_| "not valid UTF-8".to_string())?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("metadata must be a JSON object, not {}", kind(&other))),
        Err(e) => Err(format!("not valid JSON ({e})")),
    }
}

/// What stands in for metadata that was left out:
/// `{"$changerelay":{"metadata_omitted":"<why>","bytes":N}}`.
pub fn omitted_marker(why: &str, bytes: usize) -> Map<String, Value> {
    let mut inner = Map::new();
    inner.insert("metadata_omitted".into(), Value::String(why.to_string()));
    inner.insert("bytes".into(), Value::from(bytes));
    let mut outer = Map::new();
    outer.insert(crate::event::OMITTED_MARKER.into(), Value::Object(inner));
    outer
}

/// Merges `more` into `into`, later keys winning.
pub fn merge(into: &mut Map<String, Value>, more: Map<String, Value>) {
    for (k, v) in more {
        into.insert(k, v);
    }
}

/// Why a value can not be attached as metadata.
pub fn validate(json_text: &str, value: &Value) -> Result<(), String> {
    if !value.is_object() {
        return Err(format!("metadata must be a JSON object, not {}", kind(value)));
    }
    if json_text.len() > MAX_METADATA_BYTES {
        return Err(format!(
            "metadata is {} bytes, more than the limit of {} bytes",
            json_text.len(),
            MAX_METADATA_BYTES
        ));
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_only_bounded_objects() {
        assert!(accept(br#"{"a":1}"#, 0).is_ok());
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_METADATA_BYTES));
        assert!(accept(big.as_bytes(), 0).unwrap_err().contains("more than the limit"));
        assert!(accept(br#"{"a":1}"#, MAX_METADATA_BYTES - 2)
            .unwrap_err()
            .contains("would reach"));
        assert!(accept(b"[1]", 0).unwrap_err().contains("JSON object"));
        assert!(accept(b"{\"a\":1e1000000}", 0).unwrap_err().contains("not valid JSON"));
        assert!(accept(&[0xff, 0xfe], 0).unwrap_err().contains("UTF-8"));
        let m = omitted_marker("too big", 9);
        assert_eq!(
            Value::Object(m).to_string(),
            r#"{"$changerelay":{"bytes":9,"metadata_omitted":"too big"}}"#
        );
    }

    #[test]
    fn later_keys_win() {
        let mut m = parse_object(r#"{"a":1,"b":2}"#).unwrap_or_default();
        merge(&mut m, parse_object(r#"{"b":3,"c":4}"#).unwrap_or_default());
        assert_eq!(Value::Object(m), json!({"a":1,"b":3,"c":4}));
    }

    #[test]
    fn only_objects_are_metadata() {
        assert!(parse_object("[1]").is_none());
        assert!(parse_object("not json").is_none());
        assert!(validate("1", &json!(1)).is_err());
        assert!(validate("{}", &json!({})).is_ok());
        let big = format!("{{\"k\":\"{}\"}}", "x".repeat(MAX_METADATA_BYTES));
        assert!(validate(&big, &json!({})).is_err());
    }
}
