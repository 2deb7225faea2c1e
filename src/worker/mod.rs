//! The relay worker: owns a logical slot, decodes it with the pg_changerelay
//! plugin (binary format, tracked tables only) and keeps the version map.
//!
//! Loop: wait on the latch (set by committing backends) or the poll
//! interval; handle SIGHUP/SIGTERM; then one step:
//!   decode from the slot it holds (whole transactions, bounded by
//!   `batch_changes`; see [`decoder`])
//!   → persist the version updates in one transaction and commit
//!   → apply them to shared memory and wake watchers
//!   → confirm the position to the slot.
//! A crash at any point re-decodes from the slot's confirmed position and
//! re-applies; applying is idempotent (versions only move forward). Idle
//! steps run no transaction at all and still confirm the position decoded,
//! so the slot pins no WAL. Errors exit the worker; the postmaster
//! restarts it after `RESTART_DELAY`.

use crate::gucs;
use crate::shmem::{self, WorkerState};
use crate::sql::{select_all, select_one};
use changerelay_core::apply::VersionUpdates;
use changerelay_core::binary;
use changerelay_core::lsn::lsn_to_string;
mod decoder;
mod endpoint;
mod persist;

use decoder::Decoder;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub const RESTART_DELAY: Duration = Duration::from_secs(2);
const APP_NAME: &std::ffi::CStr = c"pg_changerelay relay";

/// Registers the worker; from `_PG_init` while preloading.
pub fn register() {
    BackgroundWorkerBuilder::new("pg_changerelay relay")
        .set_type("pg_changerelay relay")
        .set_library("pg_changerelay")
        .set_function("changerelay_relay_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

fn set_state(state: WorkerState) {
    if let Some(s) = shmem::shared() {
        let old = s.status.state.swap(state as u32, Ordering::AcqRel);
        if old != state as u32 && state != WorkerState::Streaming {
            log!("pg_changerelay relay: {}", state.as_str());
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Some(s) = shmem::shared() {
        s.status.wake_latch.store(std::ptr::null_mut(), Ordering::Release);
        s.status.pid.store(0, Ordering::Release);
        s.status.state.store(WorkerState::NotRunning as u32, Ordering::Release);
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn changerelay_relay_main(_arg: pg_sys::Datum) {
    // SAFETY: first thing in the worker's main function.
    unsafe { crate::compat::attach_worker_signal_handlers() };
    let Some(shared) = shmem::shared() else {
        error!("pg_changerelay relay: shared memory is not initialised");
    };
    // SAFETY: backend globals read on the main thread; the exit callback
    // clears what this process publishes in shared memory.
    unsafe {
        shared.status.pid.store(pg_sys::MyProcPid, Ordering::Release);
        shared.status.wake_latch.store(pg_sys::MyLatch, Ordering::Release);
        pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0usize));
    }
    set_state(WorkerState::Starting);
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: as above; pgstat_report_appname copies the string.
    unsafe {
        shared
            .status
            .database
            .store(pg_sys::MyDatabaseId.to_u32(), Ordering::Release);
        pg_sys::pgstat_report_appname(APP_NAME.as_ptr());
    }
    let slot = gucs::slot_name();
    log!("pg_changerelay relay started: database \"{database}\", slot \"{slot}\"");
    let mut relay = Relay {
        slot,
        decoder: None,
        installed: false,
        last_prune: None,
        link: endpoint::start(),
        persister: persist::Persister::default(),
    };
    let mut sleep = Duration::ZERO;
    while wait(sleep, relay.link.as_ref().map(endpoint::Link::wake_fd)) {
        if crate::compat::sighup_received() {
            // SAFETY: reloading the configuration file between steps.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        sleep = relay.step();
        let installed = relay.installed;
        if let Some(link) = relay.link.as_mut() {
            link.tick(installed);
        }
    }
    log!("pg_changerelay relay stopping");
    if let Some(link) = relay.link.take() {
        link.shutdown();
    }
    // Exit code 1: the postmaster restarts the worker after RESTART_DELAY,
    // so pg_terminate_backend() restarts it rather than removing it for
    // good (exit code 0 would); at shutdown nothing is restarted anyway.
    // Stop it for good with changerelay.enabled = off.
    // SAFETY: leaving the process the way Postgres expects.
    unsafe { pg_sys::proc_exit(1) };
}

/// Sleeps until the latch is set (a commit, a signal), the endpoint's wake
/// socket is readable (a request) or `timeout` passes. False on SIGTERM.
fn wait(timeout: Duration, wake_fd: Option<std::os::fd::RawFd>) -> bool {
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    if wake_fd.is_some() {
        events |= pg_sys::WL_SOCKET_READABLE;
    }
    // SAFETY: main thread; MyLatch is this process's latch; the socket is
    // the endpoint's wake socket, open for the endpoint's life.
    unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            wake_fd.unwrap_or(-1),
            timeout.as_millis().min(i64::MAX as u128) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
    !crate::compat::sigterm_received()
}

struct Relay {
    slot: String,
    decoder: Option<Decoder>,
    installed: bool,
    last_prune: Option<std::time::Instant>,
    link: Option<endpoint::Link>,
    persister: persist::Persister,
}

impl Relay {
    /// Does one unit of work; returns how long to sleep before the next.
    fn step(&mut self) -> Duration {
        let poll = gucs::poll_interval();
        if !gucs::enabled() {
            set_state(WorkerState::Disabled);
            return poll;
        }
        // The slot comes first: with nothing tracked it decodes nothing, but
        // it must exist before anything can be tracked so that no tracked
        // change can fall between tracking and the slot's creation.
        if self.decoder.is_none() {
            ensure_slot(&self.slot);
            self.decoder = Some(Decoder::open(&self.slot));
        }
        if !self.installed {
            let installed = BackgroundWorker::transaction(|| {
                select_one::<bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_changerelay')",
                    &[],
                )
            });
            self.installed = matches!(installed, Ok(Some(true)));
        }
        if self.installed && !shmem::shared().is_some_and(|s| s.status.loaded.load(Ordering::Acquire)) {
            set_state(WorkerState::Loading);
            load_versions();
        }
        set_state(if self.installed {
            WorkerState::Streaming
        } else {
            WorkerState::WaitingForExtension
        });
        if self.installed {
            self.maybe_prune();
        }
        let Some(decoder) = self.decoder.as_mut() else {
            return poll;
        };
        let (frames, end, more) = decoder.decode(gucs::batch_changes().max(1) as usize);
        if frames.is_empty() && end <= decoder.confirmed() {
            return poll;
        }
        let mut updates = VersionUpdates::default();
        for (lsn, frame) in &frames {
            match binary::read_event(frame) {
                Ok(event) => updates.add(&event),
                Err(e) => error!(
                    "pg_changerelay relay: undecodable frame at {}: {e}",
                    lsn_to_string(*lsn)
                ),
            }
        }
        let changed = !updates.is_empty();
        let fresh = if !changed {
            Vec::new()
        } else {
            let fresh = self.persister.persist(&mut updates);
            apply_to_shared_memory(&updates);
            fresh
        };
        decoder.confirm(end);
        if let Some(s) = shmem::shared() {
            if let Some(c) = updates.last_commit {
                s.status.last_event_id.store(c.event_id, Ordering::Release);
                s.status
                    .last_commit_ts
                    .store(changerelay_core::time::unix_us_to_ms(c.commit_us), Ordering::Release);
            }
            s.status.confirmed_lsn.store(decoder.confirmed(), Ordering::Release);
            s.status.batches.fetch_add(1, Ordering::Relaxed);
            s.status.changes.fetch_add(updates.changes, Ordering::Relaxed);
        }
        if changed {
            shmem::broadcast();
            if let Some(link) = self.link.as_mut() {
                link.publish_batch(fresh, &updates);
            }
        }
        if more {
            Duration::ZERO
        } else {
            poll
        }
    }
}

impl Relay {
    /// Prunes history older than `changerelay.history_retention`, at most
    /// every tenth of the retention (between 1 s and 1 min). Writes (and so
    /// takes a transaction id) only when there is something to prune.
    fn maybe_prune(&mut self) {
        let retention = gucs::history_retention();
        let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        if self.last_prune.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last_prune = Some(std::time::Instant::now());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let cutoff = now_ms - retention.as_millis() as i64;
        let cut = BackgroundWorker::transaction(move || {
            select_one::<i64>(
                "SELECT max(event_id) FROM changerelay.history WHERE ts < $1",
                &[cutoff.into()],
            )
        });
        let Ok(Some(cut)) = cut else { return };
        let done = BackgroundWorker::transaction(move || {
            Spi::run_with_args("DELETE FROM changerelay.history WHERE event_id <= $1", &[cut.into()])?;
            Spi::run_with_args(
                "UPDATE changerelay.history_horizon SET event_id = greatest(event_id, $1)",
                &[cut.into()],
            )
        });
        if let Err(e) = done {
            error!("pg_changerelay relay: could not prune history: {e}");
        }
    }
}

/// Creates the worker's slot when it does not exist.
fn ensure_slot(slot: &str) {
    let slot = slot.to_string();
    BackgroundWorker::transaction(move || {
        let plugin = select_one::<String>(
            "SELECT (SELECT plugin::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1)",
            &[slot.as_str().into()],
        );
        match plugin {
            Ok(Some(p)) if p == "pg_changerelay" => {}
            Ok(Some(p)) => error!(
                "pg_changerelay relay: replication slot \"{slot}\" uses plugin \"{p}\", not pg_changerelay; \
                 drop it or set changerelay.slot_name to another name"
            ),
            Ok(None) => {
                log!("pg_changerelay relay: creating logical replication slot \"{slot}\"");
                if let Err(e) = select_one::<String>(
                    "SELECT slot_name::text FROM pg_catalog.pg_create_logical_replication_slot($1, 'pg_changerelay')",
                    &[slot.as_str().into()],
                ) {
                    error!("pg_changerelay relay: could not create slot \"{slot}\": {e}");
                }
            }
            Err(e) => error!("pg_changerelay relay: could not read pg_replication_slots: {e}"),
        }
    });
}

fn apply_to_shared_memory(u: &VersionUpdates) {
    let full = shmem::with_map_mut(|mut m| {
        let mut full = Vec::new();
        for (label, v) in &u.labels {
            match m.ensure_label(label) {
                Ok(i) => m.bump_all(i, *v),
                Err(_) => full.push(label.clone()),
            }
        }
        for (label, v) in &u.floors {
            if let Ok(i) = m.ensure_label(label) {
                m.raise_floor(i, *v);
            }
        }
        for ((label, id), v) in &u.rows {
            if let Ok(i) = m.ensure_label(label) {
                m.bump_row(i, id.as_bytes(), *v);
            }
        }
        full
    })
    .unwrap_or_default();
    for label in full {
        warning!("pg_changerelay relay: no room for label \"{label}\"; raise changerelay.max_labels");
    }
}

/// Loads the persisted versions into shared memory (after a server restart).
fn load_versions() {
    let (labels, rows) = BackgroundWorker::transaction(|| {
        let labels = select_all(
            "SELECT label, v, ts, floor_v, floor_ts FROM changerelay.label_versions
             UNION ALL
             SELECT DISTINCT label, 0, 0, 0, 0 FROM changerelay.tracked_tables
              WHERE label NOT IN (SELECT label FROM changerelay.label_versions)",
            &[],
            |r| {
                let n = |i| r.get::<i64>(i).map(|v| v.unwrap_or(0));
                Ok((r.get::<String>(1)?.unwrap_or_default(), n(2)?, n(3)?, n(4)?, n(5)?))
            },
        );
        // Oldest first, so that when the map is smaller than the table the
        // oldest rows are the ones evicted into the label floors.
        let rows = select_all(
            "SELECT label, identifier, v, ts FROM changerelay.row_versions ORDER BY v",
            &[],
            |r| {
                let text = |i| r.get::<String>(i).map(|v| v.unwrap_or_default());
                let n = |i| r.get::<i64>(i).map(|v| v.unwrap_or(0));
                Ok((text(1)?, text(2)?, n(3)?, n(4)?))
            },
        );
        match (labels, rows) {
            (Ok(l), Ok(r)) => (l, r),
            (Err(e), _) | (_, Err(e)) => error!("pg_changerelay relay: could not load versions: {e}"),
        }
    });
    use changerelay_core::versions::Version;
    let n = rows.len();
    shmem::with_map_mut(|mut m| {
        for (label, v, ts, fv, fts) in &labels {
            if let Ok(i) = m.ensure_label(label) {
                m.bump_all(i, Version { v: *v as u64, ts: *ts });
                m.raise_floor(
                    i,
                    Version {
                        v: *fv as u64,
                        ts: *fts,
                    },
                );
            }
        }
        for (label, id, v, ts) in &rows {
            if let Ok(i) = m.ensure_label(label) {
                m.bump_row(i, id.as_bytes(), Version { v: *v as u64, ts: *ts });
            }
        }
    });
    if let Some(s) = shmem::shared() {
        s.status.loaded.store(true, Ordering::Release);
    }
    log!(
        "pg_changerelay relay: loaded {} label(s) and {n} row version(s)",
        labels.len()
    );
}
