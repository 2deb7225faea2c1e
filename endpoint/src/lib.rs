//! pg_changerelay's WebSocket / HTTP long-poll / SSE endpoint.
//!
//! The relay worker calls [`start`]: the endpoint binds its addresses and runs on ONE dedicated thread (a
//! current-thread tokio runtime, every signal blocked). It never calls Postgres. The worker feeds it
//! [`ToEndpoint`] messages with [`Endpoint::publish`] (status, tokens, committed batches, replies) and answers
//! its [`Request`]s, read from the [`WorkerPort`] on the worker's main thread. See the README's endpoint section for what
//! clients see.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

mod admission;
mod api;
mod auth;
mod batch;
mod config;
mod connection;
mod dashboard;
mod fanout;
mod feed;
mod hub;
mod inbox;
pub mod listen;
mod longpoll;
mod messages;
mod metrics;
mod origin;
mod outbox;
mod params;
mod request;
mod requests;
mod response;
mod router;
mod routes;
mod server;
mod shared;
mod sse;
mod subscribe;
mod timed_io;
mod tls;
mod ws;

#[doc(hidden)]
pub mod fuzzing;

use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

pub use api::{
    Batch, ChangeRow, Reply, ReplyError, ReplyErrorKind, Request, RequestKind, Status, ToEndpoint, Token, VersionDelta,
    MAX_HISTORY_ROWS,
};
pub use config::{Auth, Config, TlsFiles};

/// The change object `{"type":"change","cursor":..,...}` exactly as the endpoint sends it to clients (the sinks
/// deliver the same text).
pub fn change_json(row: &ChangeRow) -> String {
    messages::change(row)
}

/// The running endpoint, owned by the worker. Dropping it shuts it down like [`Endpoint::shutdown`].
pub struct Endpoint {
    addrs: Vec<SocketAddr>,
    inbox: Arc<inbox::Inbox>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The worker's side of the request channel. Wait on [`WorkerPort::wake_fd`] (readable when requests are
/// pending, and at end-of-file once the endpoint thread has ended) together with the latch; nothing here
/// blocks.
pub struct WorkerPort {
    rx: mpsc::Receiver<Request>,
    wake: UnixStream,
    closed: std::cell::Cell<bool>,
}

/// What [`WorkerPort::drain_wake`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Wake {
    /// The endpoint runs; read requests with [`WorkerPort::try_recv`].
    Open,
    /// The endpoint thread has ended (stopped, or died of a panic): the wake socket stays readable at
    /// end-of-file, so stop waiting on it. Answer nothing more; drop the [`Endpoint`] and this port, and
    /// [`start`] a new endpoint if wanted.
    Closed,
}

/// Checks the configuration, loads the TLS files, binds every address and starts the endpoint thread.
pub fn start(config: Config) -> Result<(Endpoint, WorkerPort), String> {
    config.validate()?;
    check_descriptor_limit(&config)?;
    let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
    let mut std_listeners = Vec::with_capacity(config.listen.len());
    let mut addrs = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        // std sets SO_REUSEADDR on Unix, so a restarted endpoint binds the same port again at once.
        let l = std::net::TcpListener::bind(addr).map_err(|e| format!("endpoint: could not listen on {addr}: {e}"))?;
        l.set_nonblocking(true).map_err(|e| format!("endpoint: {addr}: {e}"))?;
        addrs.push(l.local_addr().unwrap_or(*addr));
        std_listeners.push(l);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("endpoint: could not create its runtime: {e}"))?;
    let listeners = {
        let _guard = rt.enter();
        std_listeners
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("endpoint: {e}"))?
    };
    let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| format!("endpoint: wake socket: {e}"))?;
    wake_tx
        .set_nonblocking(true)
        .map_err(|e| format!("endpoint: wake socket: {e}"))?;
    wake_rx
        .set_nonblocking(true)
        .map_err(|e| format!("endpoint: wake socket: {e}"))?;
    let (req_tx, req_rx) = mpsc::channel();
    let metrics = Arc::new(metrics::Metrics::default());
    let inbox = Arc::new(inbox::Inbox::new(config.worker_channel_bytes, metrics.clone()));
    let (stop_tx, stop) = tokio::sync::oneshot::channel();
    let channels = server::Channels {
        inbox: inbox.clone(),
        stop,
        port: requests::RequestSender {
            tx: req_tx,
            wake: wake_tx,
        },
    };
    let thread = changerelay_core::thread::spawn_with_signals_blocked("changerelay endpoint", move || {
        // A panic anywhere on the thread ends it here: by then the runtime and every task, listener, socket
        // and the worker's channel ends have been dropped (so the worker sees end-of-file and the ports are
        // free). The panic message went to stderr through the panic hook.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(move || {
            server::run(rt, listeners, config, tls, metrics, channels)
        }));
    })
    .map_err(|e| format!("endpoint: could not start its thread: {e}"))?;
    let endpoint = Endpoint {
        addrs,
        inbox,
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    Ok((
        endpoint,
        WorkerPort {
            rx: req_rx,
            wake: wake_rx,
            closed: std::cell::Cell::new(false),
        },
    ))
}

/// Descriptors the endpoint needs besides its clients: listeners, the wake pair, the runtime's own.
const DESCRIPTOR_RESERVE: u64 = 64;

/// Refuses a `max_clients` the process's soft RLIMIT_NOFILE could never serve (each client is a socket).
fn check_descriptor_limit(config: &Config) -> Result<(), String> {
    let Some(soft) = soft_descriptor_limit() else {
        return Ok(());
    };
    let needed = config.max_clients as u64 + config.listen.len() as u64 + DESCRIPTOR_RESERVE;
    if needed > soft {
        return Err(format!(
            "endpoint: max_clients {} needs about {needed} file descriptors but the process may open only {soft} \
             (RLIMIT_NOFILE soft limit): lower max_clients or raise the limit (e.g. LimitNOFILE= in the \
             service unit)",
            config.max_clients
        ));
    }
    Ok(())
}

/// The soft limit on open files, from /proc/self/limits (no unsafe call); `None` if unknown or unlimited.
fn soft_descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Endpoint {
    /// The bound addresses (with the real ports when port 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// Hands a message to the endpoint thread. Never blocks (beyond a short lock) and never fails loudly: a
    /// stopped endpoint ignores it. The channel is bounded: a batch that does not fit becomes a gap that
    /// subscribers fill from the history (see the README's endpoint section).
    pub fn publish(&self, msg: ToEndpoint) {
        if self.is_running() {
            self.inbox.publish(msg);
        }
    }

    /// Whether the endpoint thread is still running (false after it died of a panic, or stopped).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Sends close 1001 to every WebSocket client, ends SSE streams and long-polls, stops listening and joins
    /// the thread, within about a second.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl WorkerPort {
    /// Read end of a non-blocking socket pair: readable while wake bytes are pending, and for good (at
    /// end-of-file) once the endpoint thread has ended.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Reads and discards every pending wake byte; [`Wake::Closed`] once the endpoint thread has ended.
    pub fn drain_wake(&self) -> Wake {
        if self.closed.get() {
            return Wake::Closed;
        }
        let mut buf = [0u8; 256];
        loop {
            match (&self.wake).read(&mut buf) {
                Ok(0) => {
                    self.closed.set(true);
                    return Wake::Closed;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Wake::Open,
                Err(_) => {
                    self.closed.set(true);
                    return Wake::Closed;
                }
            }
        }
    }

    /// Whether the endpoint thread has ended (as [`WorkerPort::drain_wake`] last found, or the request
    /// channel shows).
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// The next pending request, if any.
    pub fn try_recv(&self) -> Option<Request> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.closed.set(true);
                None
            }
        }
    }
}
