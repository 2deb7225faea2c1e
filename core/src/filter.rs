//! Tenant filters: equality on columns, `{"tenant_id":"t1"}` or
//! `{"tenant_id":["t1","t2"]}`, applied to a change's new row (or, for a
//! delete, its old row or key). Values compare as text, the way `->>` shows
//! them.

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// (column, accepted values as text); all columns must match.
    pub terms: Vec<(String, Vec<String>)>,
}

/// Longest filter accepted: columns and values per column.
pub const MAX_TERMS: usize = 32;
pub const MAX_VALUES: usize = 1000;

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Filter {
    pub fn parse(value: &Value) -> Result<Filter, String> {
        let Value::Object(map) = value else {
            return Err("filter must be a JSON object such as {\"tenant_id\":\"t1\"}".into());
        };
        if map.is_empty() {
            return Err("filter must name at least one column".into());
        }
        if map.len() > MAX_TERMS {
            return Err(format!(
                "filter has {} columns; at most {MAX_TERMS} are allowed",
                map.len()
            ));
        }
        let mut terms = Vec::with_capacity(map.len());
        for (column, v) in map {
            let values: Vec<String> =
                match v {
                    Value::Array(items) => {
                        if items.is_empty() || items.len() > MAX_VALUES {
                            return Err(format!("filter on \"{column}\" must list 1 to {MAX_VALUES} values"));
                        }
                        items.iter().map(as_text).collect::<Option<_>>().ok_or_else(|| {
                            format!("filter on \"{column}\": values must be strings, numbers or booleans")
                        })?
                    }
                    other => vec![as_text(other).ok_or_else(|| {
                        format!("filter on \"{column}\": value must be a string, number, boolean or an array of them")
                    })?],
                };
            terms.push((column.clone(), values));
        }
        Ok(Filter { terms })
    }

    /// Whether a row given as JSON object text matches every term. Only the
    /// filtered columns are parsed, so a value serde cannot hold (a number
    /// beyond f64, say) in another column does not hide the row.
    pub fn matches_json(&self, row: Option<&str>) -> bool {
        let Some(text) = row else { return false };
        let Ok(map) = serde_json::from_str::<HashMap<String, &RawValue>>(text) else {
            return false;
        };
        self.terms.iter().all(|(col, values)| {
            map.get(col)
                .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
                .as_ref()
                .and_then(as_text)
                .is_some_and(|v| values.contains(&v))
        })
    }

    /// Whether a row (a JSON object) matches every term.
    pub fn matches(&self, row: Option<&Map<String, Value>>) -> bool {
        let Some(row) = row else { return false };
        self.terms
            .iter()
            .all(|(col, values)| row.get(col).and_then(as_text).is_some_and(|v| values.contains(&v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_scalars_and_lists() {
        let f = Filter::parse(&json!({"tenant_id": "t1", "region": ["eu", "us"], "n": 5}))
            .unwrap_or_else(|e| panic!("{e}"));
        let row = json!({"tenant_id": "t1", "region": "us", "n": 5, "x": null});
        assert!(f.matches(row.as_object()));
        let other = json!({"tenant_id": "t2", "region": "us", "n": 5});
        assert!(!f.matches(other.as_object()));
        assert!(
            !f.matches(json!({"region": "eu"}).as_object()),
            "missing column never matches"
        );
        assert!(!f.matches(None));
        let text = r#"{"tenant_id":"t1","region":"us","n":5,"huge":1e1000000}"#;
        assert!(
            f.matches_json(Some(text)),
            "an unparseable other column does not hide the row"
        );
        assert!(!f.matches_json(Some(r#"{"tenant_id":"t2","region":"us","n":5}"#)));
        assert!(!f.matches_json(Some("not json")) && !f.matches_json(None));
    }

    #[test]
    fn rejects_bad_filters() {
        for bad in [
            json!([1]),
            json!("t1"),
            json!({}),
            json!({"a": {"b": 1}}),
            json!({"a": []}),
            json!({"a": [null]}),
            json!({"a": null}),
        ] {
            assert!(Filter::parse(&bad).is_err(), "{bad}");
        }
    }
}
