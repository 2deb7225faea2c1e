//! The logical decoding output plugin `pg_changerelay`.
//!
//! Callbacks are named by decoding stage. Options are parsed once at
//! startup; every change is converted in a memory context reset right after
//! it; each event becomes exactly one output message (a transaction is never
//! buffered whole), so memory stays bounded whatever the transaction size.

mod compat;
pub use compat::log_transactional_message;
mod relations;
mod state;
mod tracked;
mod values;

use crate::errors::raise;
use changerelay_core::event::{
    Change, Commit, Event, Message, MessageContent, MetadataEvent, Op, Tracking, Truncate, TruncatedTable,
};
use changerelay_core::metadata::{self, METADATA_PREFIX};
use changerelay_core::options::{Format, Options};
use changerelay_core::time::pg_timestamp_to_unix_us;
use changerelay_core::{binary, json, TxnHeader};
use pgrx::{pg_guard, pg_sys, warning, PgSqlErrorCode};
use relations::{RelInfo, RelTracking};
use state::{PluginState, TxnState};
use std::borrow::Cow;
use std::ffi::{c_char, CStr};

/// Set when a decoded transaction changed the catalogs (it carries
/// invalidations). A process that mixes decoding with normal catalog access
/// (the relay worker) must then drop caches filled under historic snapshots.
static CATALOG_CHANGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a transaction decoded since the last call changed the catalogs.
pub fn take_catalog_changed() -> bool {
    CATALOG_CHANGED.swap(false, std::sync::atomic::Ordering::AcqRel)
}

/// Entry point Postgres looks up when a slot uses the `pg_changerelay` plugin.
///
/// # Safety
/// Called by Postgres with a valid callbacks struct to fill in.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: Postgres passes a zeroed, writable callbacks struct.
    let cb = unsafe { &mut *cb };
    cb.startup_cb = Some(startup);
    cb.begin_cb = Some(begin_txn);
    cb.change_cb = Some(change);
    cb.truncate_cb = Some(truncate);
    cb.message_cb = Some(message);
    cb.commit_cb = Some(commit_txn);
    cb.shutdown_cb = Some(shutdown);
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    opts: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    // SAFETY: ctx is live during the callback; its option list holds DefElems.
    let pairs = unsafe { option_pairs((*ctx).output_plugin_options) };
    let options = match Options::parse(pairs.iter().map(|(k, v)| (k.as_str(), v.as_deref()))) {
        Ok(options) => options,
        Err(e) => raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.message, None, e.hint),
    };
    // SAFETY: opts is the writable options struct for this context.
    unsafe {
        (*opts).output_type = match options.format {
            Format::Json => pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_TEXTUAL_OUTPUT,
            Format::Binary => pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT,
        };
        (*opts).receive_rewrites = false;
        PluginState::install(ctx, options);
    }
}

/// Reads the slot options as (name, value) pairs.
///
/// # Safety
/// `list` must be null or a List of DefElem.
unsafe fn option_pairs(list: *mut pg_sys::List) -> Vec<(String, Option<String>)> {
    let mut pairs = Vec::new();
    if list.is_null() {
        return pairs;
    }
    // SAFETY: a non-null List has `length` cells, each a DefElem pointer.
    unsafe {
        for i in 0..(*list).length {
            let elem = (*(*list).elements.add(i as usize)).ptr_value.cast::<pg_sys::DefElem>();
            let name = relations::cstr_to_string((*elem).defname);
            let value = if (*elem).arg.is_null() {
                None
            } else {
                Some(relations::cstr_to_string(pg_sys::defGetString(elem)))
            };
            pairs.push((name, value));
        }
    }
    pairs
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(_ctx: *mut pg_sys::LogicalDecodingContext) {
    // The state is dropped by the memory context callback registered at
    // startup, which also covers error paths that never reach this callback.
}

#[pg_guard]
unsafe extern "C-unwind" fn begin_txn(ctx: *mut pg_sys::LogicalDecodingContext, txn: *mut pg_sys::ReorderBufferTXN) {
    // SAFETY: ctx and txn are live during the callback; the transaction has
    // committed (non-streaming decoding replays only committed transactions).
    unsafe {
        let header = TxnHeader {
            xid: (*txn).xid.into_inner(),
            event_id: (*txn).final_lsn,
            commit_us: pg_timestamp_to_unix_us(compat::commit_time(txn)),
        };
        PluginState::get(ctx).begin_txn(txn, header);
    }
    // The begin record is written lazily, before the transaction's first
    // record: transactions that produce nothing produce no output at all.
}

#[pg_guard]
unsafe extern "C-unwind" fn commit_txn(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: txn is live during the callback.
    if unsafe { (*txn).txn_flags } & pg_sys::RBTXN_HAS_CATALOG_CHANGES != 0 {
        CATALOG_CHANGED.store(true, std::sync::atomic::Ordering::Release);
    }
    // SAFETY: ctx and txn are live during the callback.
    let state = unsafe { PluginState::get(ctx) };
    // SAFETY: as above.
    let Some(ts) = (unsafe { state.end_txn(txn) }) else {
        return;
    };
    if !ts.opened {
        // SAFETY: ctx is live.
        unsafe { compat::report_skipped_transaction(ctx) };
        return;
    }
    if !state.options.include_transaction {
        return;
    }
    let metadata = ts
        .metadata
        .map(|m| Cow::Owned(serde_json::Value::Object(m).to_string()));
    let event = Event::Commit(Commit {
        txn: ts.header,
        changes: ts.emitted,
        metadata,
    });
    // SAFETY: ctx is live.
    unsafe { write_event(ctx, state.options.format, &mut state.buf, &event, true) };
}

/// Writes the begin record if this transaction has not had one yet.
///
/// # Safety
/// `ctx` must be live.
unsafe fn open_txn(
    ctx: *mut pg_sys::LogicalDecodingContext,
    format: Format,
    buf: &mut Vec<u8>,
    include: bool,
    ts: &mut TxnState,
) {
    if ts.opened {
        return;
    }
    ts.opened = true;
    if include {
        // SAFETY: forwarded from the caller.
        unsafe { write_event(ctx, format, buf, &Event::Begin(ts.header), false) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    relation: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: all pointers are live during the callback.
    let (state, ts) = unsafe { (PluginState::get(ctx), PluginState::txn(txn)) };
    let Some(ts) = ts else { return };
    let seq = ts.next_seq;
    ts.next_seq += 1;
    // SAFETY: `change` is live.
    let op = match unsafe { (*change).action } {
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT => Op::Insert,
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE => Op::Update,
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE => Op::Delete,
        _ => return,
    };
    // SAFETY: the per-change context is ours and reset below, after every
    // borrow of memory allocated in it has been dropped.
    let old_cxt = unsafe { pg_sys::MemoryContextSwitchTo(state.change_cxt) };
    let PluginState {
        options,
        relations,
        scratch,
        buf,
        utf8,
        ..
    } = state;
    let conv = values::Conversion {
        utf8: *utf8,
        max_value_size: options.max_value_size.unwrap_or_else(crate::gucs::max_value_size),
    };
    let mut is_config = false;
    // SAFETY: `relation` is open for the callback.
    let info = unsafe { relations.get(relation, options.tables.as_ref()) };
    if info.included {
        // SAFETY: the tuples belong to `relation`, whose descriptor we pass.
        let (new_tuple, old_tuple) = unsafe { compat::change_tuples(change) };
        // SAFETY: `relation` is open for the callback; its descriptor matches the tuples.
        let tupdesc = unsafe { (*relation).rd_att };
        let full_old = info.replident_full && options.include_old;
        // SAFETY: as above; rows are dropped before the context reset.
        let decode = |tuple: pg_sys::HeapTuple, only: Option<&[usize]>, scratch: &mut values::Scratch| unsafe {
            (!tuple.is_null()).then(|| values::decode_row(info, tupdesc, tuple, only, scratch, conv))
        };
        let new = if op == Op::Delete {
            None
        } else {
            decode(new_tuple, None, scratch)
        };
        let old = if full_old {
            decode(old_tuple, None, scratch)
        } else if op != Op::Insert {
            // Only the old key is logged (delete, or an update that changed
            // the key), plus the identifier column under REPLICA IDENTITY FULL.
            decode(old_tuple, Some(&info.old_attrs), scratch)
        } else {
            None
        };
        let key = match (&old, &new) {
            (Some(o), _) => o.key(info),
            (None, Some(n)) => n.key(info),
            (None, None) => None,
        };
        let tracking = tracking_of(info, op, new.as_ref(), old.as_ref());
        is_config = matches!(info.tracking, Some(RelTracking::Config { .. }));
        let (new, unchanged_toast) = match new {
            Some(n) => (Some(n.row), n.unchanged_toast),
            None => (None, Vec::new()),
        };
        let event = Event::Change(Change {
            txn: ts.header,
            seq,
            op,
            schema: Cow::Borrowed(&info.schema),
            table: Cow::Borrowed(&info.table),
            key,
            new,
            old: old.filter(|_| full_old).map(|o| o.row),
            unchanged_toast,
            tracking,
        });
        // SAFETY: ctx is live.
        unsafe {
            open_txn(ctx, options.format, buf, options.include_transaction, ts);
            write_event(ctx, options.format, buf, &event, true);
        }
        ts.emitted += 1;
    }
    if is_config {
        // Tracking changed: later changes are filed by the new set.
        relations.tracked_changed();
    }
    // SAFETY: restoring the caller's context, then freeing this change's memory.
    unsafe {
        pg_sys::MemoryContextSwitchTo(old_cxt);
        pg_sys::MemoryContextReset(state.change_cxt);
    }
}

/// Where a change of a tracked table lands in the version map.
fn tracking_of<'a>(
    info: &'a RelInfo,
    op: Op,
    new: Option<&values::DecodedRow<'a>>,
    old: Option<&values::DecodedRow<'a>>,
) -> Option<Tracking<'a>> {
    match info.tracking.as_ref()? {
        RelTracking::Config { label_attr } => {
            let attr = (*label_attr)?;
            let label = new
                .and_then(|r| r.text_of(attr))
                .or_else(|| old.and_then(|r| r.text_of(attr)))?;
            Some(Tracking {
                relid: info.relid,
                label,
                identifier: None,
                old_identifier: None,
                unknown_identifier: false,
            })
        }
        RelTracking::Table { label, ident_attr } => {
            let mut t = Tracking {
                relid: info.relid,
                label: Cow::Borrowed(label.as_str()),
                identifier: None,
                old_identifier: None,
                unknown_identifier: false,
            };
            let Some(attr) = *ident_attr else { return Some(t) };
            let old_id = old.filter(|o| o.has(attr)).map(|o| o.text_of(attr));
            match op {
                Op::Insert | Op::Update => {
                    t.identifier = new.and_then(|n| n.text_of(attr));
                    t.old_identifier = old_id.flatten().filter(|o| Some(o) != t.identifier.as_ref());
                }
                Op::Delete => match old_id {
                    Some(id) => t.identifier = id,
                    None => t.unknown_identifier = true,
                },
            }
            Some(t)
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: std::ffi::c_int,
    rels: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: all pointers are live during the callback.
    let (state, ts) = unsafe { (PluginState::get(ctx), PluginState::txn(txn)) };
    let Some(ts) = ts else { return };
    let seq = ts.next_seq;
    ts.next_seq += 1;
    // SAFETY: switching to our per-change context, reset below.
    let old_cxt = unsafe { pg_sys::MemoryContextSwitchTo(state.change_cxt) };
    let mut tables = Vec::new();
    let mut tracked: Vec<TruncatedTable<'_>> = Vec::new();
    for i in 0..nrelations.max(0) as usize {
        // SAFETY: `rels` holds `nrelations` open relations.
        let info = unsafe { state.relations.get(*rels.add(i), state.options.tables.as_ref()) };
        if info.included {
            tables.push(Cow::Owned(info.qualified_name()));
            if let Some(RelTracking::Table { label, .. }) = &info.tracking {
                tracked.push(TruncatedTable {
                    relid: info.relid,
                    table: Cow::Owned(info.qualified_name()),
                    label: Cow::Owned(label.clone()),
                });
            }
        }
    }
    if !tables.is_empty() {
        // SAFETY: for a truncate change the `truncate` union member is active.
        let (cascade, restart_identity) =
            unsafe { ((*change).data.truncate.cascade, (*change).data.truncate.restart_seqs) };
        let event = Event::Truncate(Truncate {
            txn: ts.header,
            seq,
            tables,
            cascade,
            restart_identity,
            tracked,
        });
        let (format, include) = (state.options.format, state.options.include_transaction);
        // SAFETY: ctx is live.
        unsafe {
            open_txn(ctx, format, &mut state.buf, include, ts);
            write_event(ctx, format, &mut state.buf, &event, true);
        }
        ts.emitted += 1;
    }
    // SAFETY: restoring the caller's context, then freeing this change's memory.
    unsafe {
        pg_sys::MemoryContextSwitchTo(old_cxt);
        pg_sys::MemoryContextReset(state.change_cxt);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const c_char,
    size: pg_sys::Size,
    content: *const c_char,
) {
    // SAFETY: ctx is live; prefix is NUL-terminated and content has `size` bytes.
    let (state, prefix, bytes) = unsafe {
        let bytes: &[u8] = if size == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(content.cast::<u8>(), size)
        };
        (PluginState::get(ctx), CStr::from_ptr(prefix).to_string_lossy(), bytes)
    };
    let ts = if transactional && !txn.is_null() {
        // SAFETY: a transactional message's txn is live during the callback.
        unsafe { PluginState::txn(txn) }
    } else {
        None
    };
    let format = state.options.format;
    match ts {
        Some(ts) if prefix == METADATA_PREFIX => {
            // The plugin enforces the metadata rules itself: anyone may emit
            // a message with this prefix (pg_logical_emit_message), so
            // set_metadata()'s checks are not the only way in.
            let accepted = metadata::accept(bytes, ts.metadata_bytes);
            let (json, object) = match accepted {
                Ok(object) => {
                    ts.metadata_bytes += bytes.len();
                    (Cow::Borrowed(std::str::from_utf8(bytes).unwrap_or_default()), object)
                }
                Err(why) => {
                    warning!(
                        "pg_changerelay: metadata of transaction {} left out: {why}",
                        ts.header.xid
                    );
                    let marker = metadata::omitted_marker(&why, bytes.len());
                    (
                        Cow::Owned(serde_json::Value::Object(marker.clone()).to_string()),
                        marker,
                    )
                }
            };
            let event = Event::Metadata(MetadataEvent { txn: ts.header, json });
            // SAFETY: ctx is live.
            unsafe {
                open_txn(ctx, format, &mut state.buf, state.options.include_transaction, ts);
                write_event(ctx, format, &mut state.buf, &event, true);
            }
            metadata::merge(ts.metadata.get_or_insert_with(Default::default), object);
        }
        ts if state.options.include_messages => {
            let event = plain_message(ts.as_ref().map(|t| t.header), lsn, &prefix, bytes);
            // SAFETY: ctx is live.
            unsafe {
                if let Some(ts) = ts {
                    open_txn(ctx, format, &mut state.buf, state.options.include_transaction, ts);
                }
                write_event(ctx, format, &mut state.buf, &event, true);
            }
        }
        _ => {}
    }
}

fn plain_message<'a>(txn: Option<TxnHeader>, lsn: u64, prefix: &'a str, bytes: &'a [u8]) -> Event<'a> {
    let content = match std::str::from_utf8(bytes) {
        Ok(text) => MessageContent::Text(Cow::Borrowed(text)),
        Err(_) => MessageContent::Bytes(Cow::Borrowed(bytes)),
    };
    Event::Message(Message {
        txn,
        lsn,
        prefix: Cow::Borrowed(prefix),
        content,
    })
}

/// Encodes one event and writes it as one output message.
///
/// # Safety
/// `ctx` must be the live decoding context of the current callback.
unsafe fn write_event(
    ctx: *mut pg_sys::LogicalDecodingContext,
    format: Format,
    buf: &mut Vec<u8>,
    event: &Event<'_>,
    last_write: bool,
) {
    buf.clear();
    match format {
        Format::Json => json::write_event(event, buf),
        Format::Binary => {
            if let Err(why) = binary::write_event(event, buf) {
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    format!("could not encode event: {why}"),
                    None,
                    "",
                );
            }
        }
    }
    // SAFETY: ctx is live; ctx->out is the StringInfo prepared for this write.
    unsafe {
        pg_sys::OutputPluginPrepareWrite(ctx, last_write);
        pg_sys::appendBinaryStringInfo((*ctx).out, buf.as_ptr().cast(), buf.len() as i32);
        pg_sys::OutputPluginWrite(ctx, last_write);
    }
}
