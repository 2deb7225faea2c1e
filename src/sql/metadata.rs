//! `changerelay.set_metadata()` and `changerelay.decode()`.

use crate::errors::raise;
use crate::sql::jsonb::JsonbText;
use changerelay_core::metadata::{validate, METADATA_PREFIX};
use changerelay_core::{binary, json};
use pgrx::prelude::*;
use pgrx::JsonB;

/// Attaches a JSON object to the current transaction as transaction metadata:
/// a transactional logical message with prefix `changerelay.metadata`. The
/// output plugin merges every such object of a transaction (later keys win)
/// and repeats the result on the commit record.
#[pg_extern(volatile, parallel_unsafe)]
fn set_metadata(metadata: JsonB) {
    crate::sql::require_primary("set transaction metadata");
    let text = metadata.0.to_string();
    if let Err(why) = validate(&text, &metadata.0) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            why,
            None,
            "Pass a JSON object of at most 64 KiB, for example '{\"request_id\":\"abc\"}'.",
        );
    }
    let prefix = match std::ffi::CString::new(METADATA_PREFIX) {
        Ok(p) => p,
        Err(_) => unreachable!("the prefix has no NUL byte"),
    };
    crate::plugin::log_transactional_message(&prefix, text.as_bytes());
}

/// Decodes one message of the binary format into exactly the JSON object the
/// json format produces for the same event.
/// Numbers keep every digit: the text is read by Postgres's own jsonb input
/// (serde_json would round them to f64).
#[pg_extern(immutable, parallel_safe, strict)]
fn decode(frame: &[u8]) -> JsonbText {
    match binary::read_event(frame) {
        Ok(event) => JsonbText(json::event_to_string(&event)),
        Err(why) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
            format!("could not decode pg_changerelay frame: {why}"),
            Some(format!("The frame is {} bytes long.", frame.len())),
            "Pass one row's data from pg_logical_slot_get_binary_changes() or peek_binary_changes() on a slot read with format 'binary'.",
        ),
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn set_metadata_accepts_objects() {
        Spi::run("SELECT changerelay.set_metadata('{\"user\":\"ann\"}')").unwrap_or_else(|e| panic!("{e}"));
        Spi::run("SELECT changerelay.set_metadata('{\"user\":\"bob\",\"n\":1}')").unwrap_or_else(|e| panic!("{e}"));
    }

    #[pg_test(error = "metadata must be a JSON object, not an array")]
    fn set_metadata_rejects_arrays() {
        Spi::run("SELECT changerelay.set_metadata('[1,2]')").unwrap_or_else(|e| panic!("{e}"));
    }

    #[pg_test(error = "metadata is 65544 bytes, more than the limit of 65536 bytes")]
    fn set_metadata_rejects_large_objects() {
        Spi::run("SELECT changerelay.set_metadata(jsonb_build_object('k', repeat('x', 65536)))")
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[pg_test]
    fn decode_round_trips_a_frame() {
        use changerelay_core::event::{Event, TxnHeader};
        let mut frame = Vec::new();
        let event = Event::Begin(TxnHeader {
            xid: 750,
            event_id: 23_803_720,
            commit_us: 1_763_737_200_123_456,
        });
        changerelay_core::binary::write_event(&event, &mut frame).unwrap_or_else(|e| panic!("{e}"));
        let got = Spi::get_one_with_args::<pgrx::JsonB>("SELECT changerelay.decode($1)", &[frame.into()])
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|j| j.0);
        assert_eq!(
            got,
            Some(
                serde_json::json!({"type":"begin","xid":750,"event_id":23803720,"lsn":"0/16B3748",
                "ts":1763737200123_i64,"commit_time":"2025-11-21T15:00:00.123456+00:00"})
            )
        );
    }

    #[pg_test(
        error = "could not decode pg_changerelay frame: binary format version 7 is not supported (this build reads version 1)"
    )]
    fn decode_rejects_unknown_versions() {
        Spi::run("SELECT changerelay.decode('\\x0700')").unwrap_or_else(|e| panic!("{e}"));
    }

    #[pg_test(error = "could not decode pg_changerelay frame: empty frame")]
    fn decode_rejects_empty_frames() {
        Spi::run("SELECT changerelay.decode('')").unwrap_or_else(|e| panic!("{e}"));
    }
}
