//! A decoding context the relay worker keeps for its whole life, the way a
//! walsender does: the slot is acquired once, WAL is read forward from where
//! the last round stopped, and progress is confirmed after each batch is
//! applied. (The SQL functions pg_logical_slot_peek_changes() and
//! pg_replication_slot_advance() build a new context every call and re-read
//! WAL from the slot's restart_lsn each time.)

use changerelay_core::lsn::lsn_to_string;
use pgrx::prelude::*;
use std::ffi::CString;

use super::frames::FrameBuffer;

pub struct Decoder {
    ctx: *mut pg_sys::LogicalDecodingContext,
    owner: pg_sys::ResourceOwner,
    /// Where the output writer callbacks put frames (boxed: its address is
    /// handed to Postgres). For commit frames the lsn is the end of the
    /// commit record.
    out: Box<FrameBuffer>,
}

// Raw server symbols. The WAL page callbacks must be the C functions
// themselves (pgrx's bindings are guarded Rust wrappers, whose addresses are
// no C callbacks), and replication/decode.h is not in pgrx's bindings.
unsafe extern "C-unwind" {
    #[link_name = "read_local_xlog_page"]
    fn c_read_local_xlog_page(
        state: *mut pg_sys::XLogReaderState,
        target_page: pg_sys::XLogRecPtr,
        req_len: std::ffi::c_int,
        target_rec: pg_sys::XLogRecPtr,
        cur_page: *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    #[link_name = "wal_segment_open"]
    fn c_wal_segment_open(state: *mut pg_sys::XLogReaderState, seg: pg_sys::XLogSegNo, tli: *mut pg_sys::TimeLineID);
    #[link_name = "wal_segment_close"]
    fn c_wal_segment_close(state: *mut pg_sys::XLogReaderState);
    fn LogicalDecodingProcessRecord(ctx: *mut pg_sys::LogicalDecodingContext, record: *mut pg_sys::XLogReaderState);
}

/// The WAL page callback: `read_local_xlog_page`, except that while the
/// page is not flushed yet it waits here (and exits if the postmaster dies)
/// and gives up (-1: `XLogReadRecord` returns no record and no error) once
/// SIGTERM has arrived.
/// `read_local_xlog_page` itself waits in a loop that only a backend's die()
/// ends, and the flush position can cut through a record (the WAL writer
/// flushes whole pages) whose rest, at shutdown, is never flushed: the
/// worker hung there until the postmaster gave up on it.
unsafe extern "C-unwind" fn read_page_or_stop(
    state: *mut pg_sys::XLogReaderState,
    target_page: pg_sys::XLogRecPtr,
    req_len: std::ffi::c_int,
    target_rec: pg_sys::XLogRecPtr,
    cur_page: *mut std::ffi::c_char,
) -> std::ffi::c_int {
    let wanted = target_page + req_len.max(0) as u64;
    // SAFETY: reading the flush position from shared memory, on the main
    // thread (decoding calls this from XLogReadRecord).
    while wanted > unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) } {
        if crate::compat::sigterm_received() {
            return -1;
        }
        // 1 ms, as read_local_xlog_page waits, on the latch's timeout so that
        // the postmaster's death ends the worker here too.
        super::sleep_through_latch(std::time::Duration::from_millis(1));
    }
    // SAFETY: the arguments are XLogReadRecord's, passed on unchanged.
    unsafe { c_read_local_xlog_page(state, target_page, req_len, target_rec, cur_page) }
}

/// Options the worker decodes with.
const OPTIONS: &[(&str, &str)] = &[("format", "binary"), ("tracked", "true"), ("include_messages", "false")];

impl Decoder {
    /// Acquires `slot` and sets up decoding from its confirmed position.
    pub fn open(slot: &str) -> Decoder {
        let Ok(slot_c) = CString::new(slot) else {
            error!("slot name contains a NUL byte")
        };
        // SAFETY: main thread, outside any transaction, as a walsender would:
        // a resource owner for decoding's own resources, the slot acquired
        // for this process, and the context allocated in TopMemoryContext so
        // it outlives every transaction the worker runs.
        unsafe {
            pg_sys::CheckLogicalDecodingRequirements();
            let owner = pg_sys::ResourceOwnerCreate(std::ptr::null_mut(), c"pg_changerelay relay".as_ptr());
            pg_sys::CurrentResourceOwner = owner;
            crate::compat::replication_slot_acquire(&slot_c);
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let mut options: *mut pg_sys::List = std::ptr::null_mut();
            for (name, value) in OPTIONS {
                let name = pg_sys::pstrdup(CString::new(*name).unwrap_or_default().as_ptr());
                let value = pg_sys::pstrdup(CString::new(*value).unwrap_or_default().as_ptr());
                let elem = pg_sys::makeDefElem(name, pg_sys::makeString(value).cast(), -1);
                options = pg_sys::lappend(options, elem.cast());
            }
            let mut routine = pg_sys::XLogReaderRoutine {
                page_read: Some(read_page_or_stop),
                segment_open: Some(c_wal_segment_open),
                segment_close: Some(c_wal_segment_close),
            };
            let ctx = pg_sys::CreateDecodingContext(
                pg_sys::InvalidXLogRecPtr as u64,
                options,
                false,
                &mut routine,
                Some(prepare_write),
                Some(do_write),
                None,
            );
            pg_sys::MemoryContextSwitchTo(old);
            leave_logical_decoding_status();
            let mut out = Box::new(FrameBuffer::default());
            (*ctx).output_writer_private = std::ptr::from_mut(&mut *out).cast();
            // Whole transactions committing after confirmed_flush must be
            // accumulated, so reading starts at restart_lsn.
            pg_sys::XLogBeginRead((*ctx).reader, (*pg_sys::MyReplicationSlot).data.restart_lsn);
            pg_sys::CurrentResourceOwner = std::ptr::null_mut();
            Decoder { ctx, owner, out }
        }
    }

    /// Where decoding has read up to.
    pub fn position(&self) -> u64 {
        // SAFETY: the reader belongs to the context this decoder owns.
        unsafe { (*(*self.ctx).reader).EndRecPtr }
    }

    /// The slot's confirmed position.
    pub fn confirmed(&self) -> u64 {
        // SAFETY: the slot is acquired by this process for the decoder's life.
        unsafe { (*pg_sys::MyReplicationSlot).data.confirmed_flush }
    }

    /// Decodes up to the WAL flush position, stopping early (at a record
    /// boundary, so only whole transactions) once `limit` frames are out.
    /// Returns the frames, the position decoded up to, and whether it
    /// stopped early.
    // The loop condition reads the reader's position, which XLogReadRecord
    // moves through the pointer: clippy can not see that.
    #[allow(clippy::while_immutable_condition)]
    pub fn decode(&mut self, limit: usize) -> (FrameBuffer, u64, bool) {
        // SAFETY: main thread, outside a transaction; decoding starts and
        // ends its own transactions for catalog access.
        //
        // Caches: this process also uses normal snapshots, for its own
        // tables only (versions, history), which decoding never needs in an
        // older shape. Entries decoding loads under historic snapshots are
        // only wrong for normal use when a decoded transaction changed the
        // catalogs; then every cache is dropped (logicalfuncs.c drops them
        // around every call, which costs this loop ~1.5 ms per round).
        unsafe {
            let reader = (*self.ctx).reader;
            let end_of_wal = pg_sys::GetFlushRecPtr(std::ptr::null_mut());
            if (*reader).EndRecPtr >= end_of_wal {
                return (FrameBuffer::default(), (*reader).EndRecPtr, false);
            }
            pg_sys::CurrentResourceOwner = self.owner;
            let mut more = false;
            while (*reader).EndRecPtr < end_of_wal {
                let mut errm: *mut std::ffi::c_char = std::ptr::null_mut();
                let record = pg_sys::XLogReadRecord(reader, &mut errm);
                if !errm.is_null() {
                    let msg = std::ffi::CStr::from_ptr(errm).to_string_lossy().into_owned();
                    error!(
                        "pg_changerelay relay: could not read WAL at {}: {msg}",
                        lsn_to_string((*reader).EndRecPtr)
                    );
                }
                if record.is_null() {
                    // No record and no error: SIGTERM arrived while WAL was
                    // awaited (see read_page_or_stop). Nothing of this batch
                    // is applied; the next worker decodes it again.
                    drop(std::mem::take(&mut *self.out));
                    pg_sys::CurrentResourceOwner = std::ptr::null_mut();
                    return (FrameBuffer::default(), self.confirmed(), false);
                }
                // An ERROR inside becomes a Rust panic, re-raised by pgrx.
                pg_sys::ffi::pg_guard_ffi_boundary(|| LogicalDecodingProcessRecord(self.ctx, reader));
                if self.out.len() >= limit {
                    more = (*reader).EndRecPtr < end_of_wal;
                    break;
                }
                pg_sys::check_for_interrupts!();
            }
            if crate::plugin::take_catalog_changed() {
                pg_sys::InvalidateSystemCaches();
            }
            pg_sys::CurrentResourceOwner = std::ptr::null_mut();
            (std::mem::take(&mut *self.out), (*reader).EndRecPtr, more)
        }
    }

    /// Records that everything before `lsn` has been applied.
    pub fn confirm(&self, lsn: u64) {
        if lsn <= self.confirmed() {
            return;
        }
        // SAFETY: the slot is ours; this is what a walsender does on a reply.
        unsafe {
            pg_sys::LogicalConfirmReceivedLocation(lsn);
            pg_sys::ReplicationSlotMarkDirty();
        }
    }
}

/// Clears `PROC_IN_LOGICAL_DECODING`, which creating a decoding context
/// outside a transaction sets on this process (as it does for a walsender).
///
/// Other backends leave a process with that flag out of their snapshots
/// entirely, its own transaction id included: it is meant for processes
/// that only decode. This worker also writes (history, versions). With the
/// flag set, a concurrent reader did not see the worker's open transaction
/// as running, found it not yet committed in the commit log, and hinted its
/// new history rows as aborted (HEAP_XMIN_INVALID), for good: committed
/// history vanished, and index entries went missing with it. Without the
/// flag the worker is an ordinary backend; the slot's catalog_xmin still
/// protects the catalog rows decoding needs.
fn leave_logical_decoding_status() {
    // ProcArrayLock is a macro over the main LWLock array in C (slot 4 in
    // lwlocknames.h for every supported major version).
    const PROC_ARRAY_LOCK: usize = 4;
    // SAFETY: main thread of a backend with a PGPROC; statusFlags is written
    // under ProcArrayLock held exclusively, mirrored into ProcGlobal's dense
    // array at this process's index, exactly as procarray.c does.
    unsafe {
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(PROC_ARRAY_LOCK)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let proc = pg_sys::MyProc;
        (*proc).statusFlags &= !(pg_sys::PROC_IN_LOGICAL_DECODING as u8);
        *(*pg_sys::ProcGlobal).statusFlags.add((*proc).pgxactoff as usize) = (*proc).statusFlags;
        pg_sys::LWLockRelease(lock);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn prepare_write(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last_write: bool,
) {
    // SAFETY: ctx->out is the context's output buffer.
    unsafe { pg_sys::resetStringInfo((*ctx).out) };
}

#[pg_guard]
unsafe extern "C-unwind" fn do_write(
    ctx: *mut pg_sys::LogicalDecodingContext,
    lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last_write: bool,
) {
    // SAFETY: output_writer_private is the decoder's boxed frame list, alive
    // as long as the context; ctx->out holds `len` bytes.
    unsafe {
        let out = &mut *(*ctx).output_writer_private.cast::<FrameBuffer>();
        let buf = &*(*ctx).out;
        let bytes = std::slice::from_raw_parts(buf.data.cast::<u8>(), buf.len.max(0) as usize);
        out.push(lsn, bytes, changerelay_core::binary::opens_transaction(bytes));
    }
}
