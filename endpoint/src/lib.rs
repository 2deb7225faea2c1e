//! pg_changerelay's WebSocket / HTTP long-poll / SSE endpoint.
//!
//! The relay worker calls [`start`]: the endpoint binds its addresses and runs on ONE dedicated thread (a
//! current-thread tokio runtime, every signal blocked). It never calls Postgres. The worker feeds it
//! [`ToEndpoint`] messages with [`Endpoint::publish`] (status, tokens, committed batches, replies) and answers
//! its [`Request`]s, read from the [`WorkerPort`] on the worker's main thread. See the README's endpoint section for what
//! clients see.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

mod api;
mod auth;
mod batch;
mod config;
mod conn;
mod fanout;
mod feed;
mod http;
mod hub;
pub mod listen;
mod longpoll;
mod messages;
mod metrics;
mod outbox;
mod params;
mod routes;
mod server;
mod signals;
mod sse;
mod subscribe;
mod ws;

use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;

pub use api::{
    Batch, ChangeRow, Reply, ReplyError, ReplyErrorKind, Request, RequestKind, Status, ToEndpoint, Token, VersionDelta,
};
pub use config::{Auth, Config};

/// The running endpoint, owned by the worker. Dropping it shuts it down like [`Endpoint::shutdown`].
pub struct Endpoint {
    addrs: Vec<SocketAddr>,
    tx: tokio::sync::mpsc::UnboundedSender<ToEndpoint>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The worker's side of the request channel. Wait on [`WorkerPort::wake_fd`] (readable when requests are
/// pending) together with the latch; nothing here blocks.
pub struct WorkerPort {
    rx: mpsc::Receiver<Request>,
    wake: UnixStream,
}

/// Binds every address and starts the endpoint thread.
pub fn start(config: Config) -> Result<(Endpoint, WorkerPort), String> {
    config.validate()?;
    let mut std_listeners = Vec::with_capacity(config.listen.len());
    let mut addrs = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
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
    let (tx, inbox) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop) = tokio::sync::oneshot::channel();
    let channels = server::Channels {
        inbox,
        stop,
        port: hub::RequestSender {
            tx: req_tx,
            wake: wake_tx,
        },
    };
    let thread = signals::spawn_with_signals_blocked("changerelay endpoint", move || {
        server::run(rt, listeners, config, channels)
    })
    .map_err(|e| format!("endpoint: could not start its thread: {e}"))?;
    let endpoint = Endpoint {
        addrs,
        tx,
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    Ok((
        endpoint,
        WorkerPort {
            rx: req_rx,
            wake: wake_rx,
        },
    ))
}

impl Endpoint {
    /// The bound addresses (with the real ports when port 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// Hands a message to the endpoint thread; never blocks, never fails loudly (a stopped endpoint ignores it).
    pub fn publish(&self, msg: ToEndpoint) {
        let _ = self.tx.send(msg);
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
    /// Read end of a non-blocking socket pair: readable while wake bytes are pending.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Reads and discards every pending wake byte.
    pub fn drain_wake(&self) {
        let mut buf = [0u8; 256];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// The next pending request, if any.
    pub fn try_recv(&self) -> Option<Request> {
        self.rx.try_recv().ok()
    }
}
