//! Plugin and per-transaction state.
//!
//! The plugin state is a Rust box owned by the decoding context: a reset
//! callback registered on `ctx->context` drops it when Postgres frees the
//! context, which also happens on error paths that skip the shutdown
//! callback. Per-transaction state hangs off `txn->output_plugin_private`;
//! the boxes are owned by the plugin state, so they are freed with it too.

use super::relations::RelationCache;
use super::values::Scratch;
use changerelay_core::options::Options;
use changerelay_core::TxnHeader;
use pgrx::pg_sys;
use serde_json::{Map, Value};
use std::collections::HashMap;

pub struct PluginState {
    pub options: Options,
    /// Reset after every change.
    pub change_cxt: pg_sys::MemoryContext,
    pub relations: RelationCache,
    pub scratch: Scratch,
    /// Output buffer, reused across messages.
    pub buf: Vec<u8>,
    /// The database encoding is UTF-8 (text needs no conversion).
    pub utf8: bool,
    txns: HashMap<u32, Box<TxnState>>,
}

pub struct TxnState {
    pub header: TxnHeader,
    /// Position of the next change in the transaction, counting every change
    /// decoded (also those the `tables` option leaves out), so that
    /// `(event_id, seq)` names the same change in every slot.
    pub next_seq: u32,
    /// Change records written to this stream.
    pub emitted: u32,
    /// A begin record was written.
    pub opened: bool,
    pub metadata: Option<Map<String, Value>>,
    /// Bytes of the metadata messages merged so far.
    pub metadata_bytes: usize,
}

impl PluginState {
    /// Creates the state and hands its ownership to `ctx->context`.
    ///
    /// # Safety
    /// `ctx` must be the live decoding context passed to the startup callback.
    pub unsafe fn install(ctx: *mut pg_sys::LogicalDecodingContext, options: Options) {
        // SAFETY: ctx->context is the decoding context's long-lived memory
        // context; children and the callback struct are allocated in it and
        // so live exactly as long as the state.
        unsafe {
            let parent = (*ctx).context;
            let change_cxt = pg_sys::AllocSetContextCreateInternal(
                parent,
                c"pg_changerelay change".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            let tracked = options.tracked;
            let state = Box::new(PluginState {
                options,
                change_cxt,
                relations: RelationCache::new(parent, tracked),
                scratch: Scratch::default(),
                buf: Vec::with_capacity(8192),
                utf8: pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32,
                txns: HashMap::new(),
            });
            let raw = Box::into_raw(state);
            (*raw).relations.activate();
            let cb = pg_sys::MemoryContextAlloc(parent, std::mem::size_of::<pg_sys::MemoryContextCallback>())
                .cast::<pg_sys::MemoryContextCallback>();
            cb.write(pg_sys::MemoryContextCallback {
                func: Some(release),
                arg: raw.cast(),
                next: std::ptr::null_mut(),
            });
            pg_sys::MemoryContextRegisterResetCallback(parent, cb);
            (*ctx).output_plugin_private = raw.cast();
        }
    }

    /// # Safety
    /// `ctx` must be a decoding context whose startup callback installed the state.
    pub unsafe fn get<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut PluginState {
        // SAFETY: installed by `install` and alive until ctx->context is freed,
        // which happens after the last callback.
        unsafe { &mut *(*ctx).output_plugin_private.cast::<PluginState>() }
    }

    /// Starts per-transaction state and hangs it off `txn`.
    ///
    /// # Safety
    /// `txn` must be the live transaction passed to the begin callback.
    pub unsafe fn begin_txn(&mut self, txn: *mut pg_sys::ReorderBufferTXN, header: TxnHeader) {
        let mut ts = Box::new(TxnState {
            header,
            next_seq: 0,
            emitted: 0,
            opened: false,
            metadata: None,
            metadata_bytes: 0,
        });
        // SAFETY: the box's heap address is stable while it sits in `txns`.
        unsafe { (*txn).output_plugin_private = std::ptr::from_mut(&mut *ts).cast() };
        self.txns.insert(header.xid, ts);
    }

    /// # Safety
    /// `txn` must be a live transaction whose begin callback ran.
    pub unsafe fn txn<'a>(txn: *mut pg_sys::ReorderBufferTXN) -> Option<&'a mut TxnState> {
        // SAFETY: set by `begin_txn`, cleared by `end_txn`.
        unsafe { (*txn).output_plugin_private.cast::<TxnState>().as_mut() }
    }

    /// Detaches and returns the transaction's state.
    ///
    /// # Safety
    /// `txn` must be the live transaction passed to the commit callback.
    pub unsafe fn end_txn(&mut self, txn: *mut pg_sys::ReorderBufferTXN) -> Option<Box<TxnState>> {
        // SAFETY: `txn` is live; clearing the pointer before the box is freed.
        let xid = unsafe {
            (*txn).output_plugin_private = std::ptr::null_mut();
            (*txn).xid.into_inner()
        };
        self.txns.remove(&xid)
    }
}

/// Memory context reset callback: drops the plugin state.
unsafe extern "C-unwind" fn release(arg: *mut std::ffi::c_void) {
    // SAFETY: `arg` is the pointer from Box::into_raw in `install`, and this
    // callback runs exactly once, when the owning context is reset or deleted.
    let mut state = unsafe { Box::from_raw(arg.cast::<PluginState>()) };
    state.relations.deactivate();
    drop(state);
}
