//! Server APIs whose shape differs between major versions, for everything
//! but the output plugin (whose decoding structures are in
//! `plugin/compat.rs`): the library's setup, shared memory and the relay
//! worker. Version `cfg`s outside these two modules are a bug.

use pgrx::pg_sys;
use std::ffi::CStr;

/// Reserves a setting prefix: unknown `prefix.*` settings warn and are removed.
///
/// # Safety
/// From `_PG_init`, on the main thread.
pub unsafe fn reserve_guc_prefix(prefix: &'static CStr) {
    // SAFETY: caller's contract; the prefix is a static C string.
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(prefix.as_ptr());
    }
    // SAFETY: as above; the pre-15 spelling of the same thing.
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(prefix.as_ptr());
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut SHMEM_REQUEST: Option<unsafe fn()> = None;

/// Runs `request` where Postgres accepts shared memory and LWLock requests:
/// from `shmem_request_hook` since 15 (chained to the previous hook), from
/// `_PG_init` itself before.
///
/// # Safety
/// From `_PG_init` while preloading, on the main thread; `request` must only
/// call `RequestAddinShmemSpace` / `RequestNamedLWLockTranche` and the like.
pub unsafe fn on_shmem_request(request: unsafe fn()) {
    // SAFETY: _PG_init runs single-threaded in the postmaster; saving and
    // replacing hook pointers is the documented way to chain them.
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    unsafe {
        SHMEM_REQUEST = Some(request);
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
    }
    // SAFETY: before 15 _PG_init is where requests are made.
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        request();
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: chaining to the previous hook, then the request registered by
    // on_shmem_request (both set once in _PG_init).
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        if let Some(request) = SHMEM_REQUEST {
            request();
        }
    }
}

/// Acquires the logical replication slot `name` for this process, failing
/// at once if another process has it. An invalidated slot is an error: from
/// 18 at acquisition (`error_if_invalid`, as the decoding SQL functions
/// pass), before 18 when the decoding context is created on it.
///
/// # Safety
/// Main thread of a backend with a PGPROC, holding no slot.
pub unsafe fn replication_slot_acquire(name: &CStr) {
    // SAFETY: caller's contract; `name` is a valid C string Postgres copies.
    #[cfg(not(feature = "pg18"))]
    unsafe {
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), true);
    }
    // SAFETY: as above.
    #[cfg(feature = "pg18")]
    unsafe {
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), true, true);
    }
}
