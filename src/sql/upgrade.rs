//! Functions only the extension's upgrade scripts call (`sql/`), created
//! and dropped by them: not part of a fresh install.

use crate::errors::raise;
use changerelay_core::history::{v1_frame, V1Row};
use pgrx::prelude::*;

/// 0.1.0 → 0.2.0: the binary frame of a history row 0.1.0 kept as JSON
/// columns (`key`, `new`, `old` as jsonb text).
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false, immutable)]
fn frame_from_v1(
    event_id: i64,
    seq: i32,
    ts: i64,
    xid: i64,
    relid: pg_sys::Oid,
    label: &str,
    table_name: &str,
    op: &str,
    identifier: Option<&str>,
    key: Option<&str>,
    new: Option<&str>,
    old: Option<&str>,
) -> Vec<u8> {
    let row = V1Row {
        event_id: event_id as u64,
        seq: seq.max(0) as u32,
        ts,
        xid: xid as u32,
        relid: relid.to_u32(),
        label,
        table_name,
        op,
        identifier,
        key,
        new,
        old,
    };
    v1_frame(&row).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("could not convert a history row of version 0.1.0: {e}"),
            None,
            "Report this; the update is rolled back and version 0.1.0 stays installed.",
        )
    })
}
