//! Accessors for decoding structures whose shape differs between major
//! versions. Everything version-specific in the plugin goes through here.

use pgrx::pg_sys;

/// Commit time of a decoded transaction (microseconds since 2000-01-01).
///
/// # Safety
/// `txn` must point to a live ReorderBufferTXN that has been committed.
pub unsafe fn commit_time(txn: *const pg_sys::ReorderBufferTXN) -> i64 {
    // SAFETY: caller guarantees `txn` is live; for a committed transaction the
    // union holds commit_time.
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    unsafe {
        (*txn).xact_time.commit_time
    }
    // SAFETY: as above.
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        (*txn).commit_time
    }
}

/// The new and old tuple of an insert/update/delete change (null when absent).
///
/// # Safety
/// `change` must point to a live tuple change (insert, update or delete).
pub unsafe fn change_tuples(change: *const pg_sys::ReorderBufferChange) -> (pg_sys::HeapTuple, pg_sys::HeapTuple) {
    // SAFETY: for tuple changes the `tp` member of the union is the active one.
    let tp = unsafe { &(*change).data.tp };
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    {
        let tuple = |buf: *mut pg_sys::ReorderBufferTupleBuf| {
            if buf.is_null() {
                std::ptr::null_mut()
            } else {
                // SAFETY: a non-null tuple buffer is live for the duration of the callback.
                unsafe { &raw mut (*buf).tuple }
            }
        };
        (tuple(tp.newtuple), tuple(tp.oldtuple))
    }
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    {
        (tp.newtuple, tp.oldtuple)
    }
}

/// Tells the walsender a transaction was skipped, so it can send keepalives
/// and let the slot advance past transactions that produced no output.
///
/// # Safety
/// Must be called from a decoding callback with its context.
pub unsafe fn report_skipped_transaction(ctx: *mut pg_sys::LogicalDecodingContext) {
    // SAFETY: `ctx` is the live decoding context of the current callback.
    #[cfg(feature = "pg15")]
    unsafe {
        pg_sys::OutputPluginUpdateProgress(ctx, true);
    }
    #[cfg(not(feature = "pg15"))]
    let _ = ctx;
}

// replication/message.h is not in pgrx's bindings; the symbol is exported by
// the server. Calls go through pg_guard_ffi_boundary, which turns a Postgres
// ERROR inside it into a Rust panic that pgrx re-raises, as the generated
// bindings do.
#[cfg(not(any(feature = "pg17", feature = "pg18")))]
unsafe extern "C-unwind" {
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
}

#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe extern "C-unwind" {
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
        flush: bool,
    ) -> pg_sys::XLogRecPtr;
}

/// Writes a transactional logical decoding message.
pub fn log_transactional_message(prefix: &std::ffi::CStr, content: &[u8]) {
    // SAFETY: both pointers are valid for the lengths given; Postgres copies
    // the data into WAL before returning.
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            LogLogicalMessage(prefix.as_ptr(), content.as_ptr().cast(), content.len(), true)
        });
    }
    // SAFETY: as above; `flush` is only meaningful for non-transactional messages.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            LogLogicalMessage(prefix.as_ptr(), content.as_ptr().cast(), content.len(), true, false)
        });
    }
}
