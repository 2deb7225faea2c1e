//! Functions only the extension's upgrade scripts call (`sql/`), created
//! and dropped by them: not part of a fresh install.

use crate::errors::raise;
use changerelay_core::chunk::ChunkBuilder;
use changerelay_core::history::{v1_frame, HistoryRow, V1Row};
use pgrx::prelude::*;

/// 0.1.0 → 0.2.0: a history row 0.1.0 kept as JSON columns (`key`, `new`,
/// `old` as jsonb text) as a chunk of one change: its binary frame, packed.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false, immutable)]
fn chunk_from_v1(
    event_id: i64,
    pos: i32,
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
    let frame = v1_frame(&row).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("could not convert a history row of version 0.1.0: {e}"),
            None,
            "Report this; the update is rolled back and version 0.1.0 stays installed.",
        )
    });
    let mut chunk = ChunkBuilder::default();
    chunk.push(&HistoryRow {
        event_id: event_id as u64,
        pos: pos.max(0) as u32,
        ts,
        relid: row.relid,
        label: label.to_string(),
        frame,
    });
    chunk.take().map(|p| p.bytes).unwrap_or_default()
}
