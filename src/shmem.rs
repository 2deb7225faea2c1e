//! Shared memory: the version map, the relay worker's status, and the
//! condition variable watchers sleep on.
//!
//! Layout: one `ShmemInitStruct` named "pg_changerelay" holding [`Shared`]
//! followed by `max_labels` [`LabelSlot`]s and `max_tracked_rows` [`Entry`]s
//! (64 bytes each), sized from postmaster-context settings when the library
//! is preloaded.
//!
//! Locking rules:
//! * `lock` (the named LWLock tranche "pg_changerelay") protects the map:
//!   `map`, the label slots and the entries. The relay worker holds it
//!   exclusively while applying a batch it has already committed; readers
//!   (`version()`, `versions()`, `version_map()`) hold it shared, copy what
//!   they need and release it before building any result. Nothing that can
//!   raise an error runs while it is held.
//! * `status` fields are atomics written only by the relay worker (pid and
//!   latch at start and exit, the rest after each batch). Readers take no
//!   lock and may see fields from two consecutive batches.
//! * `cv` is broadcast by the worker after every published batch.
//! * `wake_latch` is the worker's process latch; committing backends set it
//!   (a latch tolerates spurious and stale sets).

use changerelay_core::versions::{Entry, LabelSlot, MapHeader, VersionMap, VersionMapMut};
use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};

const NAME: &std::ffi::CStr = c"pg_changerelay";

/// What the relay worker is doing.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    NotRunning = 0,
    Starting = 1,
    WaitingForExtension = 2,
    Disabled = 3,
    Streaming = 4,
    Loading = 5,
    WaitingForUpdate = 6,
}

impl WorkerState {
    pub fn from_u32(v: u32) -> WorkerState {
        match v {
            1 => WorkerState::Starting,
            2 => WorkerState::WaitingForExtension,
            3 => WorkerState::Disabled,
            4 => WorkerState::Streaming,
            5 => WorkerState::Loading,
            6 => WorkerState::WaitingForUpdate,
            _ => WorkerState::NotRunning,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::NotRunning => "not running",
            WorkerState::Starting => "starting",
            WorkerState::WaitingForExtension => "waiting for CREATE EXTENSION",
            WorkerState::Disabled => "disabled",
            WorkerState::Streaming => "streaming",
            WorkerState::Loading => "loading versions",
            WorkerState::WaitingForUpdate => "waiting for ALTER EXTENSION pg_changerelay UPDATE",
        }
    }
}

#[repr(C)]
pub struct WorkerStatus {
    pub pid: AtomicI32,
    pub state: AtomicU32,
    /// The database the worker serves (an Oid), 0 until connected.
    pub database: AtomicU32,
    /// The worker's latch, as an address; null when no worker runs.
    pub wake_latch: AtomicPtr<pg_sys::Latch>,
    pub last_event_id: AtomicU64,
    pub last_commit_ts: AtomicI64,
    pub confirmed_lsn: AtomicU64,
    pub batches: AtomicU64,
    pub changes: AtomicU64,
    /// The map holds the persisted versions (loaded after a restart).
    pub loaded: AtomicBool,
    /// Bumped when a transaction that changed `changerelay.tokens` commits.
    pub tokens_generation: AtomicU64,
    /// The endpoint: 0 off, 1 listening, 2 failed to start.
    pub endpoint: AtomicU32,
    /// Transactions recorded in changerelay.dead_letters since start.
    pub dead_letters: AtomicU64,
    /// Failed attempts to apply a transaction since start.
    pub apply_retries: AtomicU64,
    /// Times the endpoint thread ended and was started again.
    pub endpoint_restarts: AtomicU64,
    /// Bumped when a transaction that changed `changerelay.sinks` commits.
    pub sinks_generation: AtomicU64,
    /// Times the sinks thread ended and was started again.
    pub sinks_restarts: AtomicU64,
    // --- failover (README: High availability) ---
    /// The publish gate holds batches back until the standbys have them:
    /// readers cap history at `published_event_id`.
    pub gate_active: AtomicBool,
    /// `published_event_id` is known (since this server started, the worker
    /// saw the standbys catch up with the history it found).
    pub published_valid: AtomicBool,
    /// The newest event clients may see.
    pub published_event_id: AtomicU64,
    /// Unix microseconds since the oldest batch held by the gate waits (0:
    /// none), and the WAL position it waits for.
    pub gate_held_since_us: AtomicI64,
    pub gate_waiting_lsn: AtomicU64,
    /// The WAL position the oldest unconfirmed slot position waits for (0:
    /// none).
    pub confirm_waiting_lsn: AtomicU64,
    /// How far every standby slot has flushed (0: unknown; u64::MAX: none).
    pub standby_flushed_lsn: AtomicU64,
}

#[repr(C)]
pub struct Shared {
    pub lock: *mut pg_sys::LWLock,
    pub cv: pg_sys::ConditionVariable,
    pub status: WorkerStatus,
    pub map: MapHeader,
    pub n_labels: u32,
    pub n_entries: u32,
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
static N_LABELS: AtomicU32 = AtomicU32::new(0);
static N_ENTRIES: AtomicU32 = AtomicU32::new(0);

fn labels_offset() -> usize {
    std::mem::size_of::<Shared>().next_multiple_of(64)
}

fn entries_offset(n_labels: usize) -> usize {
    (labels_offset() + n_labels * std::mem::size_of::<LabelSlot>()).next_multiple_of(64)
}

fn total_size(n_labels: usize, n_entries: usize) -> usize {
    entries_offset(n_labels) + n_entries * std::mem::size_of::<Entry>()
}

/// Bytes of shared memory per tracked row.
pub const BYTES_PER_ROW: usize = std::mem::size_of::<Entry>();

/// Requests shared memory and installs the hooks; from `_PG_init` while
/// preloading only.
pub fn install(n_labels: usize, n_entries: usize) {
    N_LABELS.store(n_labels as u32, Ordering::Relaxed);
    N_ENTRIES.store(n_entries as u32, Ordering::Relaxed);
    // SAFETY: _PG_init runs single-threaded in the postmaster; saving and
    // replacing hook pointers is the documented way to chain them.
    unsafe {
        crate::compat::on_shmem_request(request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

/// # Safety
/// Only where Postgres accepts shared memory requests (compat::on_shmem_request).
unsafe fn request() {
    let size = total_size(
        N_LABELS.load(Ordering::Relaxed) as usize,
        N_ENTRIES.load(Ordering::Relaxed) as usize,
    );
    // SAFETY: called where Postgres allows requesting shared memory.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size);
        pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: chaining to the previous hook; ShmemInitStruct under
    // AddinShmemInitLock as every extension does; the memory is zeroed and
    // initialised exactly once, by the first process that creates it.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        let n_labels = N_LABELS.load(Ordering::Relaxed) as usize;
        let n_entries = N_ENTRIES.load(Ordering::Relaxed) as usize;
        let size = total_size(n_labels, n_entries);
        pg_sys::LWLockAcquire(addin_shmem_init_lock(), pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ptr = pg_sys::ShmemInitStruct(NAME.as_ptr(), size, &mut found).cast::<Shared>();
        if !found {
            std::ptr::write_bytes(ptr.cast::<u8>(), 0, size);
            (*ptr).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock;
            pg_sys::ConditionVariableInit(&raw mut (*ptr).cv);
            (*ptr).n_labels = n_labels as u32;
            // Until the worker says otherwise, readers hold back what the
            // standbys may not have (the worker starts after readers can).
            (*ptr).status.gate_active = AtomicBool::new(crate::worker::gate_configured());
            (*ptr).n_entries = n_entries as u32;
            let salt =
                (pg_sys::GetCurrentTimestamp() as u64) ^ ((std::process::id() as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15;
            let mut map = map_mut(ptr);
            map.reset(salt);
        }
        pg_sys::LWLockRelease(addin_shmem_init_lock());
        SHARED.store(ptr, Ordering::Release);
    }
}

/// `AddinShmemInitLock`, a macro over the main LWLock array in C (slot 21
/// since PostgreSQL 9.6, lwlocknames.txt).
///
/// # Safety
/// Only after shared memory is set up.
unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    // SAFETY: MainLWLockArray has every individual lock, 21 among them.
    unsafe { &raw mut (*pg_sys::MainLWLockArray.add(21)).lock }
}

/// # Safety
/// `ptr` must be the initialised shared struct and the caller must hold its
/// lock exclusively (or be initialising it).
unsafe fn map_mut<'a>(ptr: *mut Shared) -> VersionMapMut<'a> {
    // SAFETY: the label and entry arrays follow the header at the offsets
    // computed from the sizes stored in it.
    unsafe {
        let n_labels = (*ptr).n_labels as usize;
        let n_entries = (*ptr).n_entries as usize;
        let base = ptr.cast::<u8>();
        VersionMapMut {
            header: &mut (*ptr).map,
            labels: std::slice::from_raw_parts_mut(base.add(labels_offset()).cast::<LabelSlot>(), n_labels),
            entries: std::slice::from_raw_parts_mut(base.add(entries_offset(n_labels)).cast::<Entry>(), n_entries),
        }
    }
}

/// The shared struct, when the library was preloaded.
pub fn shared() -> Option<&'static Shared> {
    let ptr = SHARED.load(Ordering::Acquire);
    // SAFETY: set once by the startup hook to memory that lives as long as
    // the postmaster; only atomics and the lock pointer are read through it.
    unsafe { ptr.as_ref() }
}

/// Runs `f` on the map with the lock held shared. `f` must not raise errors.
pub fn with_map<R>(f: impl FnOnce(VersionMap<'_>) -> R) -> Option<R> {
    let ptr = SHARED.load(Ordering::Acquire);
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the lock is held for the life of the view; the view is only
    // read; LWLocks are released by error cleanup should anything go wrong.
    unsafe {
        pg_sys::LWLockAcquire((*ptr).lock, pg_sys::LWLockMode::LW_SHARED);
        let m = map_mut(ptr);
        let r = f(VersionMap {
            header: m.header,
            labels: m.labels,
            entries: m.entries,
        });
        pg_sys::LWLockRelease((*ptr).lock);
        Some(r)
    }
}

/// Runs `f` on the map with the lock held exclusively. `f` must not raise errors.
pub fn with_map_mut<R>(f: impl FnOnce(VersionMapMut<'_>) -> R) -> Option<R> {
    let ptr = SHARED.load(Ordering::Acquire);
    if ptr.is_null() {
        return None;
    }
    // SAFETY: as for `with_map`, with exclusive access.
    unsafe {
        pg_sys::LWLockAcquire((*ptr).lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let r = f(map_mut(ptr));
        pg_sys::LWLockRelease((*ptr).lock);
        Some(r)
    }
}

/// Wakes every backend sleeping in `watch()`.
pub fn broadcast() {
    let ptr = SHARED.load(Ordering::Acquire);
    if !ptr.is_null() {
        // SAFETY: the condition variable was initialised with the struct.
        unsafe { pg_sys::ConditionVariableBroadcast(&raw mut (*ptr).cv) };
    }
}

/// This backend's transaction changed the tokens (backend-local).
static TOKENS_CHANGED: AtomicBool = AtomicBool::new(false);
/// Set by the trigger on `changerelay.sinks` in this backend's transaction.
static SINKS_CHANGED: AtomicBool = AtomicBool::new(false);

/// Marks the current transaction as changing the tokens: at commit the
/// token generation moves and the worker is woken to reload them.
pub fn tokens_changed_at_commit() {
    TOKENS_CHANGED.store(true, Ordering::Relaxed);
}

/// Marks the current transaction as changing the sinks: at commit the
/// sinks generation moves and the worker is woken to reload them.
pub fn sinks_changed_at_commit() {
    SINKS_CHANGED.store(true, Ordering::Relaxed);
}

/// Wakes the relay worker if this backend's transaction wrote to the
/// database it serves. Registered as a transaction callback in every backend.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if event == pg_sys::XactEvent::XACT_EVENT_ABORT || event == pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT {
        TOKENS_CHANGED.store(false, Ordering::Relaxed);
        SINKS_CHANGED.store(false, Ordering::Relaxed);
        return;
    }
    if event != pg_sys::XactEvent::XACT_EVENT_COMMIT && event != pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT {
        return;
    }
    let Some(shared) = shared() else { return };
    if TOKENS_CHANGED.swap(false, Ordering::Relaxed) {
        shared.status.tokens_generation.fetch_add(1, Ordering::AcqRel);
    }
    if SINKS_CHANGED.swap(false, Ordering::Relaxed) {
        shared.status.sinks_generation.fetch_add(1, Ordering::AcqRel);
    }
    // SAFETY: reading backend-local globals and setting a latch in shared
    // memory; SetLatch never raises an error.
    unsafe {
        if pg_sys::GetTopTransactionIdIfAny() == pg_sys::InvalidTransactionId {
            return;
        }
        let latch = shared.status.wake_latch.load(Ordering::Acquire);
        if latch.is_null()
            || latch == pg_sys::MyLatch
            || shared.status.database.load(Ordering::Relaxed) != pg_sys::MyDatabaseId.to_u32()
        {
            return;
        }
        pg_sys::SetLatch(latch);
    }
}

/// Registers the commit callback that wakes the worker.
pub fn register_wakeup() {
    // SAFETY: registering a callback with the right signature from _PG_init.
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut()) };
}
