//! The endpoint thread: a current-thread tokio runtime running the accept loops, the dispatcher that applies
//! the worker's messages to the hub, the checkpoint timer, and the shutdown sequence. A panic in any task is
//! carried to the dispatcher and ends the thread (its state may be inconsistent); `lib.rs` catches it so the
//! listeners and the worker's channels are closed and the worker can start a new endpoint.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Notify};
use tokio::task::{spawn_local, LocalSet};
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};
use tokio_rustls::TlsAcceptor;

use crate::admission::{Admission, Admit};
use crate::config::Config;
use crate::connection;
use crate::hub::Hub;
use crate::inbox::Inbox;
use crate::metrics::{Metrics, Refusal};
use crate::requests::RequestSender;
use crate::response::Response;

/// Everything the connection tasks share (all on the endpoint thread).
pub(crate) struct Shared {
    pub hub: RefCell<Hub>,
    pub admission: RefCell<Admission>,
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub tls: Option<TlsAcceptor>,
    /// The bound addresses.
    pub listen: Vec<SocketAddr>,
    /// Signalled when the last connection closes.
    pub idle: Notify,
    /// Connections being refused right now (bounded, each lingers briefly).
    refusing: Cell<usize>,
    /// A task's panic, for the dispatcher to resume.
    panicked: RefCell<Option<Box<dyn Any + Send>>>,
    panic: Notify,
}

/// How long shutdown waits for clients to take their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(700);
const MAX_REFUSING: usize = 64;

pub(crate) struct Channels {
    pub inbox: Arc<Inbox>,
    pub stop: oneshot::Receiver<()>,
    pub port: RequestSender,
}

/// Spawns a task on the endpoint thread; its panic ends the thread (see the module comment).
pub(crate) fn spawn(shared: &Rc<Shared>, task: impl Future<Output = ()> + 'static) {
    let shared = Rc::downgrade(shared);
    spawn_local(async move {
        if let Err(p) = AssertUnwindSafe(task).catch_unwind().await {
            if let Some(s) = shared.upgrade() {
                s.panicked.borrow_mut().get_or_insert(p);
                s.panic.notify_one();
            }
        }
    });
}

/// The body of the endpoint thread; returns when stopped (or when the [`crate::Endpoint`] is gone), panics
/// when a task panicked.
pub(crate) fn run(
    rt: Runtime,
    listeners: Vec<TcpListener>,
    cfg: Config,
    tls: Option<TlsAcceptor>,
    metrics: Arc<Metrics>,
    ch: Channels,
) {
    let local = LocalSet::new();
    local.block_on(&rt, serve(listeners, cfg, tls, metrics, ch));
}

impl Shared {
    pub fn new(
        cfg: Config,
        metrics: Arc<Metrics>,
        port: RequestSender,
        tls: Option<TlsAcceptor>,
        listen: Vec<SocketAddr>,
    ) -> Rc<Shared> {
        Rc::new(Shared {
            hub: RefCell::new(Hub::new(cfg.clone(), metrics.clone(), port)),
            admission: RefCell::new(Admission::new(
                cfg.max_clients,
                cfg.max_unauthenticated,
                cfg.max_per_address,
            )),
            cfg,
            metrics,
            tls,
            listen,
            idle: Notify::new(),
            refusing: Cell::new(0),
            panicked: RefCell::new(None),
            panic: Notify::new(),
        })
    }

    /// The panic of a task, if one panicked.
    pub fn take_panic(&self) -> Option<Box<dyn Any + Send>> {
        self.panicked.borrow_mut().take()
    }
}

async fn serve(
    listeners: Vec<TcpListener>,
    cfg: Config,
    tls: Option<TlsAcceptor>,
    metrics: Arc<Metrics>,
    ch: Channels,
) {
    let Channels { inbox, mut stop, port } = ch;
    let listen = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let shared = Shared::new(cfg.clone(), metrics, port, tls, listen);
    let accepts: Vec<_> = listeners
        .into_iter()
        .map(|l| spawn_local(accept_loop(l, shared.clone())))
        .collect();
    let mut tick = interval(cfg.checkpoint_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shared.panic.notified() => {
                if let Some(p) = shared.take_panic() {
                    std::panic::resume_unwind(p);
                }
            }
            _ = &mut stop => break,
            msg = inbox.recv() => {
                shared.hub.borrow_mut().handle(msg);
                // Let connection tasks drain their queues between batches.
                tokio::task::yield_now().await;
            }
            _ = tick.tick() => shared.hub.borrow_mut().checkpoint_tick(),
        }
    }
    for a in accepts {
        a.abort();
    }
    shared.hub.borrow_mut().shutdown_all();
    shared.admission.borrow_mut().kill_all();
    let _ = timeout(SHUTDOWN_GRACE, async {
        while shared.admission.borrow().total > 0 {
            shared.idle.notified().await;
        }
    })
    .await;
}

async fn accept_loop(listener: TcpListener, shared: Rc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // Out of descriptors or similar: back off instead of spinning.
                sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let local = stream.local_addr().unwrap_or(peer);
        let admitted = shared.admission.borrow_mut().admit(peer, local, &shared);
        match admitted {
            Admit::Yes(conn) => spawn(&shared, connection::serve_tcp(stream, conn, shared.clone())),
            Admit::No(why) => {
                shared.metrics.refused(why);
                if shared.tls.is_none() && shared.refusing.get() < MAX_REFUSING {
                    shared.refusing.set(shared.refusing.get() + 1);
                    spawn(&shared, refuse(stream, why, shared.clone()));
                }
            }
        }
    }
}

/// 503 (max_clients) or 429 (per address) for a connection that was not admitted, then close.
async fn refuse(mut stream: TcpStream, why: Refusal, shared: Rc<Shared>) {
    let r = match why {
        Refusal::PerAddress => Response::error(
            429,
            "too_many_connections",
            "too many connections from this address; retry later",
        ),
        _ => Response::error(503, "too_many_clients", "too many clients connected; retry later"),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        r.status,
        if r.status == 429 { "Too Many Requests" } else { "Service Unavailable" },
        r.body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(r.body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = timeout(Duration::from_millis(500), write).await;
    // Read what the client still sends for a moment, so the close does not reset the response away.
    let mut sink = [0u8; 1024];
    let _ = timeout(Duration::from_millis(200), async {
        use tokio::io::AsyncReadExt;
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    shared.refusing.set(shared.refusing.get().saturating_sub(1));
}
