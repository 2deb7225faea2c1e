//! Server APIs whose shape differs between major versions, for everything
//! but the output plugin (whose decoding structures are in
//! `plugin/compat.rs`): the library's setup, shared memory and the relay
//! worker (its slot, failover slots, its signal handlers). Version `cfg`s outside these
//! two modules are a bug.

use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

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

// --- failover slots ----------------------------------------------------------

/// Whether this major has failover slots (synchronised to standbys; 17+).
pub const FAILOVER_SLOTS: bool = cfg!(any(feature = "pg17", feature = "pg18"));

/// Creates the worker's logical slot `$1` with the pg_changerelay plugin,
/// as a failover slot where the major has them; returns the position it
/// starts at (its consistent point) as text.
#[cfg(any(feature = "pg17", feature = "pg18"))]
pub const CREATE_SLOT_SQL: &str =
    "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot($1, 'pg_changerelay', false, false, true)";
#[cfg(not(any(feature = "pg17", feature = "pg18")))]
pub const CREATE_SLOT_SQL: &str =
    "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot($1, 'pg_changerelay')";

/// Makes an existing slot a failover slot (17+; nothing before). It
/// acquires and releases the slot itself, so this process must hold none,
/// and raises an error for a slot that can not be one (temporary, or on a
/// standby).
///
/// `ReplicationSlotAlter` is found by name in the running server (see
/// [`pqsignal`]): a build for 17 that referenced it at link time would fail
/// to load into 15 ("undefined symbol") before PostgreSQL could say which
/// major the library was built for.
///
/// # Safety
/// Main thread of a backend with a PGPROC, holding no slot, not in recovery.
pub unsafe fn enable_failover(name: &CStr) {
    // SAFETY: dlsym with RTLD_DEFAULT searches the server; the symbol, when
    // found, is the function of this major, with this signature.
    #[cfg(feature = "pg17")]
    unsafe {
        type Alter = unsafe extern "C-unwind" fn(*const std::ffi::c_char, bool);
        let f = dlsym(std::ptr::null_mut(), c"ReplicationSlotAlter".as_ptr());
        if f.is_null() {
            pgrx::error!("pg_changerelay: the server has no ReplicationSlotAlter()");
        }
        let alter = std::mem::transmute::<*mut std::ffi::c_void, Alter>(f);
        pgrx::pg_sys::ffi::pg_guard_ffi_boundary(|| alter(name.as_ptr(), true));
    }
    // SAFETY: as above; 18 takes the properties to change by pointer.
    #[cfg(feature = "pg18")]
    unsafe {
        type Alter = unsafe extern "C-unwind" fn(*const std::ffi::c_char, *const bool, *const bool);
        let f = dlsym(std::ptr::null_mut(), c"ReplicationSlotAlter".as_ptr());
        if f.is_null() {
            pgrx::error!("pg_changerelay: the server has no ReplicationSlotAlter()");
        }
        let alter = std::mem::transmute::<*mut std::ffi::c_void, Alter>(f);
        let failover = true;
        pgrx::pg_sys::ffi::pg_guard_ffi_boundary(|| alter(name.as_ptr(), &failover, std::ptr::null()));
    }
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    let _ = name;
}

/// Whether PostgreSQL invalidated the slot: 16+ keep the cause, 15 the
/// position at which it happened.
///
/// # Safety
/// `slot` points into the replication slot array, with
/// ReplicationSlotControlLock held (at least shared).
pub unsafe fn slot_invalidated(slot: *const pg_sys::ReplicationSlot) -> bool {
    // SAFETY: caller's contract; a plain read of a field the owner writes
    // under the slot's spinlock (an aligned word: never torn).
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    unsafe {
        std::ptr::read_volatile(&raw const (*slot).data.invalidated_at) != 0
    }
    // SAFETY: as above.
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    unsafe {
        std::ptr::read_volatile(&raw const (*slot).data.invalidated)
            != pg_sys::ReplicationSlotInvalidationCause::RS_INVAL_NONE
    }
}

// --- the relay worker's signal handlers ------------------------------------

static GOT_SIGHUP: AtomicBool = AtomicBool::new(false);
static GOT_SIGTERM: AtomicBool = AtomicBool::new(false);

type SignalHandler = unsafe extern "C-unwind" fn(std::ffi::c_int);
/// `pqsignal(signo, func)`; its return value (the old handler up to 17,
/// nothing from 18) is not used.
type PqSignal = unsafe extern "C-unwind" fn(std::ffi::c_int, Option<SignalHandler>);

unsafe extern "C" {
    fn dlsym(handle: *mut std::ffi::c_void, symbol: *const std::ffi::c_char) -> *mut std::ffi::c_void;
}

/// The server's own backend `pqsignal`, found by name in the running
/// server: PostgreSQL 18 renamed it `pqsignal_be` (a macro keeps the old
/// name in C). It was the one symbol a build for one major needed that the
/// servers of the others lack, so with a link-time reference `LOAD` of a
/// wrong build failed in dlopen ("undefined symbol: pqsignal_be") before
/// PostgreSQL could read the library's magic block and say which major it
/// was built for ("incompatible library ...: version mismatch").
fn pqsignal() -> PqSignal {
    #[cfg(not(feature = "pg18"))]
    const NAME: &CStr = c"pqsignal";
    #[cfg(feature = "pg18")]
    const NAME: &CStr = c"pqsignal_be";
    // SAFETY: dlsym with RTLD_DEFAULT (a null handle in glibc) searches the
    // executable and every loaded library; the symbol, when found, is the
    // function with PqSignal's signature.
    unsafe {
        let f = dlsym(std::ptr::null_mut(), NAME.as_ptr());
        if f.is_null() {
            pgrx::error!("pg_changerelay: the server has no {}()", NAME.to_string_lossy());
        }
        std::mem::transmute::<*mut std::ffi::c_void, PqSignal>(f)
    }
}

unsafe extern "C-unwind" fn on_sighup(_signo: std::ffi::c_int) {
    GOT_SIGHUP.store(true, Ordering::SeqCst);
    // SAFETY: what a signal handler of a background worker does: flag, then
    // set its own latch (both async-signal-safe).
    unsafe {
        (&raw mut pg_sys::ConfigReloadPending).write_volatile(1);
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// SIGTERM: the worker's own loops see `sigterm_received`; `ProcDiePending`
/// (without `InterruptPending`, so no `CHECK_FOR_INTERRUPTS` turns it into
/// a FATAL) is for the waits inside PostgreSQL that only a backend's die()
/// ends. The one the worker meets is a commit waiting for a synchronous
/// standby (`SyncRepWaitForLSN`): with the standby gone it waited forever
/// and held up a fast shutdown until pg_ctl gave up. Seeing the flag, that
/// wait ends as a client backend's does (a WARNING: committed locally, not
/// yet replicated), which the publish gate already allows for.
unsafe extern "C-unwind" fn on_sigterm(_signo: std::ffi::c_int) {
    GOT_SIGTERM.store(true, Ordering::SeqCst);
    // SAFETY: as for on_sighup.
    unsafe {
        (&raw mut pg_sys::ShutdownRequestPending).write_volatile(1);
        (&raw mut pg_sys::ProcDiePending).write_volatile(1);
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// Installs the worker's SIGHUP and SIGTERM handlers and unblocks signals,
/// as pgrx's `BackgroundWorker::attach_signal_handlers` does (whose
/// link-time reference to pqsignal this avoids, see [`pqsignal`]).
///
/// # Safety
/// First thing in a background worker's main function, on its main thread.
pub unsafe fn attach_worker_signal_handlers() {
    let pqsignal = pqsignal();
    // SAFETY: caller's contract; the handlers only touch atomics and the
    // process latch.
    unsafe {
        pqsignal(pg_sys::SIGHUP as std::ffi::c_int, Some(on_sighup));
        pqsignal(pg_sys::SIGTERM as std::ffi::c_int, Some(on_sigterm));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

/// Whether SIGHUP arrived since the last call.
pub fn sighup_received() -> bool {
    GOT_SIGHUP.swap(false, Ordering::SeqCst)
}

/// Whether SIGTERM arrived. It stays set: a shutdown request does not go
/// away because one check saw it (the retry backoff and the main loop both
/// look).
pub fn sigterm_received() -> bool {
    GOT_SIGTERM.load(Ordering::SeqCst)
}
