//! The relay worker: owns a logical slot, decodes it with the pg_changerelay
//! plugin (binary format, tracked tables only) and keeps the version map.
//!
//! Loop: wait on the latch (set by committing backends) or the poll
//! interval; handle SIGHUP/SIGTERM; then one step:
//!   make sure the slot is usable and agrees with the history, or record
//!   the gap ([`slot`]), once per process
//!   → decode from the slot it holds (whole transactions, bounded by
//!   `batch_changes`; see [`decoder`])
//!   → persist history and version updates, with how far decoding reached,
//!   in one transaction and commit
//!   → once the standby slots have that commit ([`gate`]; at once without
//!   standbys): apply the versions to shared memory, wake watchers, hand the
//!   batch to the endpoint, and confirm the position to the slot.
//! A crash at any point re-decodes from the slot's confirmed position and
//! re-applies; applying is idempotent (versions only move forward). The slot
//! is never confirmed beyond the position the history records; idle steps
//! (WAL without tracked changes) record it at most every [`IDLE_MARK_BYTES`]
//! of WAL. Errors exit the worker; the postmaster restarts it after
//! `RESTART_DELAY`.

use crate::gucs;
use crate::shmem::{self, WorkerState};
use crate::sql::{select_all, select_one};
use changerelay_core::apply::VersionUpdates;
use changerelay_core::lsn::lsn_to_string;
mod checkpoint;
mod decoder;
mod endpoint;
mod frames;
mod gate;
mod images;
mod persist;
mod prune;
mod settings;
mod sinks;
mod slot;
mod wake;

pub use gate::configured as gate_configured;

use decoder::Decoder;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub const RESTART_DELAY: Duration = Duration::from_secs(2);
/// WAL decoded past the last write, without a tracked change, after which
/// the position is recorded (so the slot can be confirmed there).
const IDLE_MARK_BYTES: u64 = 64 * 1024;
/// ...at most this often.
const IDLE_MARK_EVERY: Duration = Duration::from_millis(100);
/// The extension version this library implements.
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");
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
    settings::pin();
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
        sinks: sinks::start(),
        persister: persist::Persister::default(),
        pace: Pace::default(),
        gather: None,
        versions_saved: false,
        waiting_for_update: None,
        endpoint_retry: None,
        sinks_retry: None,
        wake: wake::WakeSet::default(),
        history_rows_unanalyzed: 0,
        last_analyze: None,
        gate: gate::Gate::default(),
        recorded: (0, 0),
        last_mark: None,
        started: false,
        pending_gap: None,
        slot_problem: None,
    };
    let mut sleep = Duration::ZERO;
    while wait(sleep, relay.wake_fd()) {
        reload_if_asked();
        sleep = relay.step();
        relay.serve_endpoint();
        relay.serve_sinks();
    }
    log!("pg_changerelay relay stopping");
    if let Some(link) = relay.link.take() {
        link.shutdown();
    }
    drop(relay.sinks.take());
    // The versions held go to the tables, so the next start finds them exact.
    if relay.versions_saved {
        if let Err(e) = relay.persister.checkpoint() {
            warning!("pg_changerelay relay: could not write its versions before stopping: {e}");
        }
    }
    // Exit code 1: the postmaster restarts the worker after RESTART_DELAY,
    // so pg_terminate_backend() restarts it rather than removing it for
    // good (exit code 0 would); at shutdown nothing is restarted anyway.
    // Stop it for good with changerelay.enabled = off.
    // SAFETY: leaving the process the way Postgres expects.
    unsafe { pg_sys::proc_exit(1) };
}

/// Sleeps until the latch is set (a commit, a signal), the endpoint's wake
/// socket is readable (a request) or `timeout` passes. False on SIGTERM. A
/// timeout under a millisecond (the latch's unit) is slept out first, then
/// the latch and socket are looked at without waiting.
fn wait(timeout: Duration, wake_fd: Option<std::os::fd::RawFd>) -> bool {
    let timeout = if !timeout.is_zero() && timeout < Duration::from_millis(1) {
        std::thread::sleep(timeout);
        Duration::ZERO
    } else {
        timeout
    };
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
    sinks: Option<sinks::Link>,
    persister: persist::Persister,
    /// How fast commits arrive, and so how long the next batch gathers.
    pace: Pace,
    /// The next batch [`gather`]s this long first.
    gather: Option<Duration>,
    /// Whether this process made the version tables exact after start
    /// ([`persist::Persister::save_shared_memory_if_inexact`]).
    versions_saved: bool,
    /// The older extension version found installed, once warned about.
    waiting_for_update: Option<String>,
    /// When to start the endpoint again after its thread ended, and the wait
    /// after that.
    endpoint_retry: Option<(std::time::Instant, Duration)>,
    /// The same for the sinks thread.
    sinks_retry: Option<(std::time::Instant, Duration)>,
    wake: wake::WakeSet,
    /// History rows written since the worker last analyzed the table, and when.
    history_rows_unanalyzed: u64,
    last_analyze: Option<std::time::Instant>,
    gate: gate::Gate,
    /// The position the history records as decoded, and the end of the
    /// commit that recorded it (the slot is never confirmed beyond it).
    recorded: (u64, u64),
    last_mark: Option<std::time::Instant>,
    /// The history found at start is held for the standbys (publish gate).
    started: bool,
    pending_gap: slot::PendingGap,
    /// Why the slot could not be prepared, as last logged.
    slot_problem: Option<String>,
}

impl Relay {
    /// Does one unit of work; returns how long to sleep before the next.
    fn step(&mut self) -> Duration {
        let poll = gucs::poll_interval();
        self.release();
        if !gucs::enabled() {
            set_state(WorkerState::Disabled);
            return self.gate.sleep(poll);
        }
        if !self.installed {
            match extension_version() {
                Some(v) if v == LIBRARY_VERSION => self.installed = true,
                Some(v) => {
                    // The library was updated but the extension not yet: its
                    // tables have the old shape. Decode nothing until the
                    // update (the slot keeps every change meanwhile).
                    if self.waiting_for_update.as_deref() != Some(v.as_str()) {
                        warning!(
                            "pg_changerelay relay: the extension is installed at version {v} and the library is \
                             {LIBRARY_VERSION}; waiting for ALTER EXTENSION pg_changerelay UPDATE (changes are kept)"
                        );
                        self.waiting_for_update = Some(v);
                    }
                    if self.decoder.is_none() && !self.open_slot() {
                        return poll;
                    }
                    set_state(WorkerState::WaitingForUpdate);
                    return poll;
                }
                None => {}
            }
        }
        // The slot comes first: with nothing tracked it decodes nothing, but
        // it must exist before anything can be tracked so that no tracked
        // change can fall between tracking and the slot's creation.
        if self.decoder.is_none() && !self.open_slot() {
            return poll.max(Duration::from_secs(1));
        }
        if self.installed && !shmem::shared().is_some_and(|s| s.status.loaded.load(Ordering::Acquire)) {
            set_state(WorkerState::Loading);
            load_versions();
        }
        if self.installed && !self.versions_saved {
            if let Err(e) = self.persister.save_shared_memory_if_inexact() {
                error!("pg_changerelay relay: could not write the versions of shared memory: {e}");
            }
            self.versions_saved = true;
        }
        set_state(if self.installed {
            WorkerState::Streaming
        } else {
            WorkerState::WaitingForExtension
        });
        if self.installed {
            self.hold_start();
            self.maybe_prune();
            self.maybe_analyze();
            if let Err(e) = self.persister.compact_if_due() {
                warning!("pg_changerelay relay: could not compact the version log: {e}");
            }
        }
        let Some(decoder) = self.decoder.as_mut() else {
            return poll;
        };
        if let Some(d) = self.gather.take() {
            sleep_through_latch(d);
        }
        let (mut frames, end, more) = decoder.decode(gucs::batch_changes().max(1) as usize);
        if let Some(why) = frames.failure() {
            error!("pg_changerelay relay: {why}");
        }
        if frames.spilled_bytes() > 0 {
            log!(
                "pg_changerelay relay: a batch of {} frames kept {} MB of them in a temporary file",
                frames.len(),
                frames.spilled_bytes() >> 20
            );
        }
        if frames.is_empty() {
            self.idle(end);
            if self.versions_saved {
                if let Err(e) = self.persister.checkpoint_if_due() {
                    warning!("pg_changerelay relay: could not write a version checkpoint: {e}");
                }
            }
            self.release();
            return if more { Duration::ZERO } else { self.gate.sleep(poll) };
        }
        let Some(results) = self.apply(&mut frames, end) else {
            // SIGTERM while recovering: nothing was confirmed, so the batch
            // is decoded again after the restart.
            return Duration::ZERO;
        };
        drop(frames);
        let need = last_commit_end();
        self.recorded = (self.recorded.0.max(end), need);
        self.gate.confirm_after(end, need);
        self.gather = self
            .pace
            .next_gather(results.iter().map(|a| a.updates.transactions).sum());
        for applied in results {
            if self.gate.is_on() {
                self.gate.hold(
                    need,
                    gate::Held {
                        newest: 0,
                        applied: Some(applied),
                    },
                );
            } else {
                self.publish(applied);
            }
        }
        self.release();
        if more {
            Duration::ZERO
        } else {
            self.gate.sleep(poll)
        }
    }

    /// Prepares the slot (see [`slot::prepare`]) and opens the decoder on
    /// it. False when the slot could not be prepared (logged once; retried
    /// on the next step).
    fn open_slot(&mut self) -> bool {
        match slot::prepare(&self.slot, self.installed, &mut self.pending_gap) {
            Ok(opened) => {
                self.slot_problem = None;
                // What the history records was written before this process
                // started: anything written since then is older than now.
                // SAFETY: reads the WAL insert position.
                let start = unsafe { pg_sys::GetXLogInsertRecPtr() };
                self.recorded = (opened.decoded_upto, start);
                self.decoder = Some(Decoder::open(&self.slot));
                true
            }
            Err(e) => {
                if self.slot_problem.as_deref() != Some(e.as_str()) {
                    warning!("pg_changerelay relay: {e}; retrying");
                    self.slot_problem = Some(e);
                }
                false
            }
        }
    }

    /// Once per process, holds the history found at start for the standbys:
    /// after a server restart readers see none of it (nor get a current
    /// cursor) until the standbys have everything written before now.
    fn hold_start(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        let newest =
            BackgroundWorker::transaction(|| select_one::<i64>("SELECT applied FROM changerelay.history_horizon", &[]))
                .ok()
                .flatten()
                .unwrap_or(0)
                .max(0) as u64;
        // SAFETY: reads the WAL insert position.
        let now = unsafe { pg_sys::GetXLogInsertRecPtr() };
        self.gate.hold(now, gate::Held { newest, applied: None });
        self.release();
    }

    /// WAL without tracked changes was decoded up to `end`: confirm it, once
    /// the history records it (or at once when there is no history).
    fn idle(&mut self, end: u64) {
        let Some(decoder) = self.decoder.as_ref() else { return };
        if end <= decoder.confirmed() {
            return;
        }
        if !self.installed {
            decoder.confirm(end);
            if let Some(s) = shmem::shared() {
                s.status.confirmed_lsn.store(decoder.confirmed(), Ordering::Release);
            }
            return;
        }
        let (recorded, need) = self.recorded;
        if end <= recorded {
            // Decoded again after a restart: recorded before.
            self.gate.confirm_after(end, need);
            return;
        }
        if end - recorded < IDLE_MARK_BYTES || self.last_mark.is_some_and(|t| t.elapsed() < IDLE_MARK_EVERY) {
            // The slot stays at what the history records.
            if recorded > decoder.confirmed() {
                self.gate.confirm_after(recorded, need);
            }
            return;
        }
        self.last_mark = Some(std::time::Instant::now());
        match persist::mark_decoded(end) {
            Ok(()) => {
                let need = last_commit_end();
                self.recorded = (end, need);
                self.gate.confirm_after(end, need);
            }
            Err(e) => warning!("pg_changerelay relay: could not record the decoded position: {e}"),
        }
    }

    /// Releases what the standbys have: publishes held batches, confirms the
    /// slot.
    fn release(&mut self) {
        let released = self.gate.turn();
        for held in released.publish {
            match held.applied {
                Some(applied) => self.publish(applied),
                None => {
                    if let Some(s) = shmem::shared() {
                        s.status.published_event_id.fetch_max(held.newest, Ordering::AcqRel);
                    }
                }
            }
            if let Some(s) = shmem::shared() {
                s.status.published_valid.store(true, Ordering::Release);
            }
            shmem::broadcast();
        }
        if let (Some(end), Some(decoder)) = (released.confirm, self.decoder.as_ref()) {
            decoder.confirm(end);
            if let Some(s) = shmem::shared() {
                s.status.confirmed_lsn.store(decoder.confirmed(), Ordering::Release);
            }
        }
    }

    /// Applies a decoded batch. When the batch as a whole fails, each of
    /// its transactions is applied alone, retried with backoff, and one that
    /// still fails becomes a dead letter: the relay never stops or loops on
    /// a transaction it can not apply. `None`: SIGTERM arrived meanwhile.
    /// `end`: the position decoding reached, recorded with the last span.
    fn apply(&mut self, frames: &mut frames::FrameBuffer, end: u64) -> Option<Vec<persist::Applied>> {
        let spans = frames.spans().to_vec();
        let first_error = match self.persister.apply(frames, &spans, Some(end)) {
            Ok(applied) => return Some(vec![applied]),
            Err(e) => e,
        };
        if spans.len() > 1 {
            warning!(
                "pg_changerelay relay: could not apply a batch of {} transactions: {first_error}",
                spans.len()
            );
        }
        let mut out = Vec::with_capacity(spans.len());
        for (i, span) in spans.iter().enumerate() {
            // Each transaction records its own end; the last one the batch's.
            let upto = (i + 1 == spans.len()).then_some(end);
            out.push(self.apply_alone(frames, span, upto)?);
        }
        Some(out)
    }

    fn apply_alone(
        &mut self,
        frames: &mut frames::FrameBuffer,
        span: &frames::Span,
        upto: Option<u64>,
    ) -> Option<persist::Applied> {
        let mut last_error = String::new();
        for (attempt, backoff) in RETRY_BACKOFF.iter().enumerate() {
            match self.persister.apply(frames, std::slice::from_ref(span), upto) {
                Ok(applied) => return Some(applied),
                Err(e) => {
                    if let Some(s) = shmem::shared() {
                        s.status.apply_retries.fetch_add(1, Ordering::Relaxed);
                    }
                    warning!(
                        "pg_changerelay relay: could not apply a transaction (attempt {} of {}): {e}",
                        attempt + 1,
                        RETRY_BACKOFF.len()
                    );
                    last_error = e;
                }
            }
            if !pause(*backoff) {
                return None;
            }
        }
        let mut wait = Duration::from_secs(1);
        loop {
            match self.persister.dead_letter(frames, span, &last_error, upto) {
                Ok(applied) => {
                    let event_id = applied.updates.last_commit.map_or(0, |c| c.event_id);
                    warning!(
                        "pg_changerelay relay: transaction {} ({} changes) could not be applied and was recorded \
                         in changerelay.dead_letters; the versions it touches were moved so caches reload: {last_error}",
                        lsn_to_string(event_id),
                        span.frames.saturating_sub(2)
                    );
                    if let Some(s) = shmem::shared() {
                        s.status.dead_letters.fetch_add(1, Ordering::Relaxed);
                    }
                    return Some(applied);
                }
                Err(e) => {
                    // Not even the dead letter can be written: the problem is
                    // the database (disk full, read-only), not the data.
                    warning!(
                        "pg_changerelay relay: could not record a dead letter, retrying in {} s: {e}",
                        wait.as_secs()
                    );
                    if !pause(wait) {
                        return None;
                    }
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// After an applied batch committed (and, with the publish gate, reached
    /// the standbys): shared memory, status, watchers and the endpoint.
    fn publish(&mut self, applied: persist::Applied) {
        let updates = &applied.updates;
        self.history_rows_unanalyzed += updates.changes;
        let changed = !updates.labels.is_empty() || !updates.floors.is_empty() || !updates.rows.is_empty();
        if changed {
            apply_to_shared_memory(updates);
        }
        if let Some(s) = shmem::shared() {
            if let Some(c) = updates.last_commit {
                s.status.last_event_id.fetch_max(c.event_id, Ordering::AcqRel);
                s.status
                    .last_commit_ts
                    .store(changerelay_core::time::unix_us_to_ms(c.commit_us), Ordering::Release);
                s.status.published_event_id.fetch_max(c.event_id, Ordering::AcqRel);
            }
            s.status.batches.fetch_add(1, Ordering::Relaxed);
            s.status.changes.fetch_add(updates.changes, Ordering::Relaxed);
        }
        if let Some(sinks) = self.sinks.as_mut().filter(|_| self.installed) {
            sinks.publish(applied.fresh.as_ref(), updates.last_commit.map(|c| c.event_id));
        }
        if changed || updates.last_commit.is_some() {
            shmem::broadcast();
            if let Some(link) = self.link.as_mut() {
                link.publish_batch(applied.fresh, updates);
            }
        }
    }
}

/// Transactions a busy worker aims to apply per batch: several commits per
/// apply transaction write a fraction of the WAL of one each (a history row
/// per table and batch, one commit record).
const GATHER_TARGET: u64 = 16;

/// The rate of the last batches, from which the next batch's gathering time
/// follows: busy (a batch held several transactions, so commits come faster
/// than the worker applies them one by one), the time in which
/// [`GATHER_TARGET`] commits arrive, at most `changerelay.max_gather`.
#[derive(Default)]
struct Pace {
    last: Option<std::time::Instant>,
}

impl Pace {
    fn next_gather(&mut self, transactions: u64) -> Option<Duration> {
        let now = std::time::Instant::now();
        let since = self.last.replace(now).map(|t| now - t)?;
        let max = gucs::max_gather();
        changerelay_core::apply::gather_time(transactions, since, GATHER_TARGET, max)
    }
}

/// Sleeps `d` whatever sets the latch (commits do, all the time); a SIGTERM
/// is seen right after, the postmaster's death ends the process.
fn sleep_through_latch(d: Duration) {
    // SAFETY: main thread; a timeout-only wait on this process's latch.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            d.as_millis().max(1) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
    }
}

/// Waits between retries of a transaction that failed to apply.
const RETRY_BACKOFF: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_millis(2500),
];

/// Sleeps for `d` on the latch, serving interrupts and reloading the
/// configuration on SIGHUP (a setting may be what fixes the failure); false
/// on SIGTERM.
fn pause(d: Duration) -> bool {
    let deadline = std::time::Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || !wait(left, None) {
            reload_if_asked();
            return !crate::compat::sigterm_received();
        }
        reload_if_asked();
    }
}

/// Reloads the configuration file after SIGHUP.
fn reload_if_asked() {
    if crate::compat::sighup_received() {
        // SAFETY: reloading the configuration file between steps.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        settings::apply_reloadable();
    }
}

impl Relay {
    /// Lets the endpoint link do its turn; when the endpoint thread has
    /// ended (a panic), drops it and starts a new one, after 1 s and then
    /// up to 30 s between attempts: never a busy loop on a dead socket.
    fn serve_endpoint(&mut self) {
        let installed = self.installed;
        let decoded = self.decoder.as_ref().map_or(u64::MAX, decoder::Decoder::position);
        if let Some(link) = self.link.as_mut() {
            if link.tick(installed, decoded) {
                return;
            }
            warning!("pg_changerelay relay: the endpoint thread has ended; starting it again in 1 s");
            if let Some(s) = shmem::shared() {
                s.status.endpoint_restarts.fetch_add(1, Ordering::Relaxed);
            }
            endpoint::set_endpoint_state(endpoint::EndpointState::Failed);
            self.link = None;
            self.endpoint_retry = Some((
                std::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            ));
            return;
        }
        let Some((at, wait)) = self.endpoint_retry else { return };
        if std::time::Instant::now() < at {
            return;
        }
        self.link = endpoint::start();
        self.endpoint_retry = match self.link {
            Some(_) => None,
            None => {
                let next = (wait * 2).min(Duration::from_secs(30));
                Some((std::time::Instant::now() + next, next))
            }
        };
    }

    /// Lets the sinks link do its turn; when the sinks thread has ended (a
    /// panic), starts it again after 1 s and then up to 30 s between
    /// attempts. The sinks resume from what their brokers hold.
    fn serve_sinks(&mut self) {
        let installed = self.installed;
        if let Some(link) = self.sinks.as_mut() {
            if link.tick(installed) {
                return;
            }
            warning!("pg_changerelay relay: the sinks thread has ended; starting it again in 1 s");
            if let Some(s) = shmem::shared() {
                s.status.sinks_restarts.fetch_add(1, Ordering::Relaxed);
            }
            self.sinks = None;
            self.sinks_retry = Some((
                std::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            ));
            return;
        }
        let (at, wait) = self
            .sinks_retry
            .unwrap_or((std::time::Instant::now(), Duration::from_secs(1)));
        if std::time::Instant::now() < at {
            return;
        }
        self.sinks = sinks::start();
        self.sinks_retry = match self.sinks {
            Some(_) => None,
            None => {
                let next = (wait * 2).min(Duration::from_secs(30));
                Some((std::time::Instant::now() + next, next))
            }
        };
    }

    /// Analyzes the history once much has been written to it since the last
    /// time (autovacuum gets there too, but later): history reads of one
    /// label walk the label index only when the planner knows the table is
    /// large; with no statistics it sorts every row of the label instead.
    /// That needs the table's size and its labels' shares, which a sample of
    /// 3,000 rows (statistics target 10) gives as well as the default
    /// 30,000: on a 560 MB history the default took 130-210 ms, every
    /// change waiting behind it (the 140 ms latency maxima of `make bench`),
    /// target 10 took 15-17 ms. Autovacuum and a DBA's ANALYZE keep theirs.
    fn maybe_analyze(&mut self) {
        const ROWS: u64 = 50_000;
        const EVERY: Duration = Duration::from_secs(10);
        if self.history_rows_unanalyzed < ROWS || self.last_analyze.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.last_analyze = Some(std::time::Instant::now());
        self.history_rows_unanalyzed = 0;
        let done = crate::txn::try_transaction(|| {
            Spi::run("SET LOCAL default_statistics_target = 10").map_err(|e| e.to_string())?;
            Spi::run("ANALYZE changerelay.history, changerelay.history_metadata").map_err(|e| e.to_string())
        });
        if let Err(e) = done {
            warning!("pg_changerelay relay: could not analyze the history: {e}");
        }
    }

    /// The descriptor to wait on for the threads' wake sockets.
    fn wake_fd(&mut self) -> Option<std::os::fd::RawFd> {
        let fds: Vec<std::os::fd::RawFd> = self
            .link
            .as_ref()
            .map(endpoint::Link::wake_fd)
            .into_iter()
            .chain(self.sinks.as_ref().map(sinks::Link::wake_fd))
            .collect();
        self.wake.fd(&fds)
    }

    fn maybe_prune(&mut self) {
        prune::maybe_prune(&mut self.last_prune);
    }
}

/// The installed version of the extension in this database, if any.
fn extension_version() -> Option<String> {
    BackgroundWorker::transaction(|| {
        select_one::<String>(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_changerelay'",
            &[],
        )
    })
    .ok()
    .flatten()
}

/// The end of the commit record of this process's last writing transaction.
fn last_commit_end() -> u64 {
    // SAFETY: a backend-local global, set at each commit that wrote WAL.
    unsafe { pg_sys::XactLastCommitEnd }
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
/// When the tables are not exact (the server stopped before the worker's
/// last version checkpoint), every label's `all` and floor are raised to the
/// end of WAL (what `sql::versions` readers see meanwhile too): versions
/// moved since the checkpoint are not known, and no commit before the
/// restart can be newer. A spurious increment for every row, never a missed
/// one; `Persister::save_shared_memory_if_inexact` then writes the map.
fn load_versions() {
    let (labels, rows, floor, logged) = BackgroundWorker::transaction(|| {
        let floor = crate::sql::versions::floor_if_inexact();
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
        let logged = checkpoint::read_log().and_then(|entries| {
            let mut out = Vec::new();
            for e in entries {
                out.extend(changerelay_core::version_log::unpack_entry(&e)?);
            }
            Ok(out)
        });
        match (labels, rows, floor, logged) {
            (Ok(l), Ok(r), Ok(f), Ok(g)) => (l, r, f, g),
            (Err(e), _, _, _) | (_, Err(e), _, _) | (_, _, Err(e), _) => {
                error!("pg_changerelay relay: could not load versions: {e}")
            }
            (_, _, _, Err(e)) => error!("pg_changerelay relay: could not load the version log: {e}"),
        }
    });
    use changerelay_core::versions::Version;
    let n = rows.len() + logged.len();
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
                if let Some(f) = floor {
                    m.bump_all(i, f);
                    m.raise_floor(i, f);
                }
            }
        }
        for (label, id, v, ts) in &rows {
            if let Ok(i) = m.ensure_label(label) {
                m.bump_row(i, id.as_bytes(), Version { v: *v as u64, ts: *ts });
            }
        }
        // Then the version log, oldest checkpoint first.
        for ((label, id), v) in &logged {
            if let Ok(i) = m.ensure_label(label) {
                m.bump_row(i, id.as_bytes(), *v);
            }
        }
    });
    if let Some(s) = shmem::shared() {
        s.status.loaded.store(true, Ordering::Release);
    }
    match floor {
        Some(f) => log!(
            "pg_changerelay relay: loaded {} label(s) and {n} row version(s); the server stopped before the last \
             version checkpoint, so every label's floor was raised to {} (caches reload once)",
            labels.len(),
            lsn_to_string(f.v)
        ),
        None => log!(
            "pg_changerelay relay: loaded {} label(s) and {n} row version(s)",
            labels.len()
        ),
    }
}
