//! The endpoint thread: a current-thread tokio runtime running the accept loops, the dispatcher that applies
//! the worker's messages to the hub, the checkpoint timer, and the shutdown sequence. A panic in any task is
//! carried to the dispatcher and ends the thread (its state may be inconsistent); `lib.rs` catches it so the
//! listeners and the worker's channels are closed and the worker can start a new endpoint.
//!
//! Module layout, from the socket in: `server` accepts and asks `admission` whether a connection may stay;
//! `connection` runs TLS and hyper on it; `router` sends each request to `routes` (health, metrics, versions),
//! `longpoll`, `sse` or `ws`, after the `origin` checks, with `request` holding what handlers share. All of
//! them reach the `hub` (subscriptions; `subscribe`, `fanout`, `feed`, `requests` to the worker) through
//! `shared`. The worker's messages come in through `inbox`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::{spawn_local, LocalSet};
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};
use tokio_rustls::TlsAcceptor;

use crate::admission::{Admission, Admit};
use crate::config::Config;
use crate::connection;
use crate::inbox::Inbox;
use crate::metrics::{Metrics, Refusal};
use crate::requests::RequestSender;
use crate::response::Response;
use crate::shared::{spawn, Shared};

/// How long shutdown waits for clients to take their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(700);
const MAX_REFUSING: usize = 64;

pub(crate) struct Channels {
    pub inbox: Arc<Inbox>,
    pub stop: oneshot::Receiver<()>,
    pub port: RequestSender,
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
            _ = shared.panicked() => {
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
    let _ = timeout(SHUTDOWN_GRACE, Admission::all_closed(&shared.admission)).await;
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
        let admitted = Admission::admit(&shared.admission, peer, local, &shared.metrics);
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
    let write = async {
        stream.write_all(&r.header("retry-after", "1").to_wire()).await?;
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
