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
