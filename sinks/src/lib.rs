//! pg_changerelay's sinks: every change of a sink's labels, exactly once and in commit order per label, into
//! Redis Streams or NATS JetStream.
//!
//! The relay worker calls [`start`]: the sinks run on ONE dedicated thread (a current-thread tokio runtime, every
//! signal blocked), one task per sink. The thread never calls Postgres. The worker feeds it [`ToSinks`] with
//! [`Sinks::publish`] (the sinks to run, each committed batch, answers to reads) and reads [`FromSinks`] from the
//! [`SinkPort`] on its main thread (reads of history to answer, progress to record). A failing sink only lags: it
//! backs off and resumes from what its broker holds, and never holds up the worker or another sink.
#![deny(unsafe_code)]

pub mod api;
mod broker;
pub mod config;
mod nats_broker;
mod outbox;
mod redis_broker;
mod sink;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

pub use api::{FromSinks, LiveBatch, Page, PageError, Position, Report, SinkConfig, SinkRow, State, ToSinks, END};
pub use config::{Kind, Target};
use tokio::sync::mpsc as tmpsc;

/// Bytes of committed batches the worker may have queued for the sinks thread; a batch beyond it goes without
/// its rows (sinks read them from the history).
pub const CHANNEL_BYTES: usize = 32 << 20;
/// Batches queued for one sink; beyond, it reads the history instead.
const SINK_QUEUE: usize = 64;

/// The running sinks thread, owned by the worker. Dropping it stops the thread.
pub struct Sinks {
    tx: tmpsc::UnboundedSender<ToSinks>,
    queued: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// The worker's side: wait on [`SinkPort::wake_fd`] (readable when messages are pending, and at end-of-file once
/// the thread has ended), then [`SinkPort::try_recv`]. Nothing here blocks.
pub struct SinkPort {
    rx: mpsc::Receiver<FromSinks>,
    wake: UnixStream,
    closed: std::cell::Cell<bool>,
}

/// Starts the sinks thread (with no sink until [`ToSinks::Configs`]).
pub fn start() -> Result<(Sinks, SinkPort), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("sinks: could not create their runtime: {e}"))?;
    let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| format!("sinks: wake socket: {e}"))?;
    for s in [&wake_tx, &wake_rx] {
        s.set_nonblocking(true)
            .map_err(|e| format!("sinks: wake socket: {e}"))?;
    }
    let (out_tx, out_rx) = mpsc::channel();
    let (tx, rx) = tmpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let counted = queued.clone();
    let thread = changerelay_core::thread::spawn_with_signals_blocked("changerelay sinks", move || {
        // A panic ends the thread here, after the runtime, every task and connection, and the channel ends are
        // dropped: the worker sees end-of-file on the wake socket and may start the thread again.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(move || {
            let outbox = Rc::new(outbox::Outbox::new(out_tx, wake_tx));
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, dispatch(rx, outbox, counted));
        }));
    })
    .map_err(|e| format!("sinks: could not start their thread: {e}"))?;
    Ok((
        Sinks {
            tx,
            queued,
            thread: Some(thread),
        },
        SinkPort {
            rx: out_rx,
            wake: wake_rx,
            closed: std::cell::Cell::new(false),
        },
    ))
}

fn batch_bytes(b: &LiveBatch) -> usize {
    b.rows
        .as_ref()
        .map_or(0, |rows| rows.iter().map(|r| r.json.len() + 64).sum())
}

impl Sinks {
    /// Hands a message to the sinks thread; never blocks. A batch that would put more than [`CHANNEL_BYTES`]
    /// in the queue goes without its rows.
    pub fn publish(&self, msg: ToSinks) {
        let msg = match msg {
            ToSinks::Batch(b) => {
                let bytes = batch_bytes(&b);
                if self.queued.load(Ordering::Acquire) + bytes > CHANNEL_BYTES {
                    ToSinks::Batch(Arc::new(LiveBatch {
                        after: b.after,
                        head: b.head,
                        rows: None,
                    }))
                } else {
                    self.queued.fetch_add(bytes, Ordering::AcqRel);
                    ToSinks::Batch(b)
                }
            }
            other => other,
        };
        let _ = self.tx.send(msg);
    }

    /// Whether the thread still runs (false after a panic ended it).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        // Closing the channel ends the dispatcher, and with it every sink task.
        let (closed, _) = tmpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl SinkPort {
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Discards the pending wake bytes; false once the thread has ended.
    pub fn drain_wake(&self) -> bool {
        if self.closed.get() {
            return false;
        }
        let mut buf = [0u8; 256];
        loop {
            match (&self.wake).read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => break,
            }
        }
        self.closed.set(true);
        false
    }

    pub fn try_recv(&self) -> Option<FromSinks> {
        match self.rx.try_recv() {
            Ok(m) => Some(m),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.closed.set(true);
                None
            }
        }
    }
}

struct Running {
    config: SinkConfig,
    live: tmpsc::Sender<Arc<LiveBatch>>,
    task: tokio::task::JoinHandle<()>,
}

/// The thread's main task: starts and stops sink tasks, fans batches out, routes answers.
async fn dispatch(mut rx: tmpsc::UnboundedReceiver<ToSinks>, outbox: Rc<outbox::Outbox>, queued: Arc<AtomicUsize>) {
    let mut running: HashMap<String, Running> = HashMap::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            ToSinks::Configs(configs) => {
                running.retain(|name, r| {
                    let keep = configs.iter().any(|c| c.name == *name && same_sink(c, &r.config));
                    if !keep {
                        r.task.abort();
                    }
                    keep
                });
                for config in configs {
                    if running.contains_key(&config.name) {
                        continue;
                    }
                    let (live, live_rx) = tmpsc::channel(SINK_QUEUE);
                    let out = outbox.clone();
                    let task = match config.target.kind {
                        Kind::Redis => tokio::task::spawn_local(sink::run::<redis_broker::RedisBroker>(
                            config.clone(),
                            live_rx,
                            out,
                        )),
                        Kind::Nats => {
                            tokio::task::spawn_local(sink::run::<nats_broker::NatsBroker>(config.clone(), live_rx, out))
                        }
                    };
                    running.insert(config.name.clone(), Running { config, live, task });
                }
            }
            ToSinks::Batch(batch) => {
                let bytes = batch_bytes(&batch);
                let _ = queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(bytes)));
                for r in running.values() {
                    // A full queue: the sink reads the history instead.
                    let _ = r.live.try_send(batch.clone());
                }
            }
            ToSinks::Page { id, result } => outbox.answer(id, result),
        }
    }
    for r in running.values() {
        r.task.abort();
    }
}

/// Whether a new configuration is the sink already running (its start position moves as it delivers and does
/// not count).
fn same_sink(a: &SinkConfig, b: &SinkConfig) -> bool {
    a.id == b.id && a.target == b.target && a.labels == b.labels && a.live == b.live && a.paused == b.paused
}
