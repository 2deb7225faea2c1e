//! Showing JSON text as `jsonb` without ever failing.
//!
//! History keeps changes as the plugin wrote them, so a `json` column may
//! hold what `jsonb` refuses: `\u0000` in a string, a number beyond
//! numeric's range, or (outside UTF-8 databases) a character the server
//! encoding lacks. One such value must not make `changes()` fail for
//! everyone after it, so a refused text is shown as a marker object that
//! keeps the original text as a string:
//! `{"$changerelay":"unrepresentable","error":"…","json":"…"}`.

use changerelay_core::event::OMITTED_MARKER;
use pgrx::prelude::*;
use pgrx::{direct_function_call_as_datum, IntoDatum, PgTryBuilder};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::ffi::CString;

/// JSON text returned as `jsonb` (see the module documentation).
pub struct JsonbText(pub String);

pgrx::impl_sql_translatable!(JsonbText, "jsonb");

// SAFETY: returns the datum `into_datum` builds, as pgrx does for its own
// IntoDatum types (impl_repackage_into_datum in pgrx's callconv.rs).
unsafe impl pgrx::callconv::BoxRet for JsonbText {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut pgrx::callconv::FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        match self.into_datum() {
            // SAFETY: a valid jsonb datum in the current memory context.
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

impl IntoDatum for JsonbText {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(to_jsonb(&self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

/// `jsonb` of `text`, or the marker object when `jsonb` refuses it. For an
/// object (a row), only the members `jsonb` refuses become markers.
pub fn to_jsonb(text: &str) -> pg_sys::Datum {
    let error = match try_jsonb(text) {
        Ok(d) => return d,
        Err(e) => e,
    };
    if let Some(d) = repair_members(text) {
        return d;
    }
    let marker = marker(&error, text);
    if let Ok(d) = try_jsonb(&marker) {
        return d;
    }
    // The text holds characters the server encoding can not show even as
    // \u escapes: replace them. Plain ASCII always converts.
    match try_jsonb(&marker_ascii(text)) {
        Ok(d) => d,
        Err(_) => try_jsonb("{}").unwrap_or(pg_sys::Datum::from(0usize)),
    }
}

/// A JSON object whose refused members are replaced by markers.
fn repair_members(text: &str) -> Option<pg_sys::Datum> {
    let members: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text).ok()?;
    let mut out = String::with_capacity(text.len() + 64);
    out.push('{');
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_ascii_string(&mut out, key, false);
        out.push(':');
        match try_jsonb(value.get()) {
            Ok(_) => out.push_str(value.get()),
            Err(e) => out.push_str(&marker(&e, value.get())),
        }
    }
    out.push('}');
    try_jsonb(&out).ok()
}

/// Calls `jsonb_in` on `text` (converted to the server encoding), catching
/// its error.
fn try_jsonb(text: &str) -> Result<pg_sys::Datum, String> {
    let Ok(c) = CString::new(text) else {
        return Err("the text contains a NUL byte".into());
    };
    PgTryBuilder::new(|| {
        // SAFETY: `c` is a NUL-terminated UTF-8 string; converting it to the
        // server encoding and parsing it only allocate in the current memory
        // context, so an error leaves nothing to clean up.
        unsafe {
            let utf8 = pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32;
            let server = if utf8 {
                c.as_ptr()
            } else {
                pg_sys::pg_any_to_server(c.as_ptr(), text.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32)
            };
            let arg = pg_sys::Datum::from(server);
            direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(arg)])
                .ok_or_else(|| "jsonb_in returned NULL".to_string())
        }
    })
    .catch_others(|e| Err(crate::errors::describe(&e)))
    .execute()
}

fn marker(error: &str, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 96);
    out.push_str("{\"");
    out.push_str(OMITTED_MARKER);
    out.push_str("\":\"unrepresentable\",\"error\":");
    push_ascii_string(&mut out, error, false);
    out.push_str(",\"json\":");
    push_ascii_string(&mut out, text, false);
    out.push('}');
    out
}

fn marker_ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 96);
    out.push_str("{\"");
    out.push_str(OMITTED_MARKER);
    out.push_str("\":\"unrepresentable\",\"json\":");
    push_ascii_string(&mut out, text, true);
    out.push('}');
    out
}

/// A JSON string literal of `s` in ASCII only: non-ASCII characters as
/// `\u` escapes, or as `?` when `replace`.
fn push_ascii_string(out: &mut String, s: &str, replace: bool) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if c.is_ascii() => out.push(c),
            _ if replace => out.push('?'),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    fn shown(text: &str) -> String {
        let d = JsonbText(text.to_string()).into_datum();
        // SAFETY: a jsonb datum just built in this memory context.
        let j = unsafe { pgrx::JsonB::from_datum(d.unwrap_or(pg_sys::Datum::from(0usize)), d.is_none()) };
        j.map(|j| j.0.to_string()).unwrap_or_default()
    }

    #[pg_test]
    fn ordinary_json_is_kept() {
        assert_eq!(shown(r#"{"a":[1,"x",null]}"#), r#"{"a":[1,"x",null]}"#);
    }

    #[pg_test]
    fn what_jsonb_refuses_becomes_a_marker_keeping_the_text() {
        let row = shown(r#"{"id":1,"doc":{"a":"\u0000"},"n":1e1000000}"#);
        let v: serde_json::Value = serde_json::from_str(&row).unwrap_or_default();
        assert_eq!(v["id"], 1, "{row}");
        assert_eq!(v["doc"]["$changerelay"], "unrepresentable", "{row}");
        assert_eq!(v["doc"]["json"], r#"{"a":"\u0000"}"#, "{row}");
        assert_eq!(v["n"]["json"], "1e1000000", "{row}");
        let scalar = shown(r#""\u0000""#);
        assert!(scalar.contains("unrepresentable"), "{scalar}");
    }
}
