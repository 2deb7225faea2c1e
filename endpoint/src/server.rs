//! The endpoint thread: a current-thread tokio runtime running the accept loops, the dispatcher that applies
//! the worker's messages to the hub, the checkpoint timer, and the shutdown sequence.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::{spawn_local, LocalSet};
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};

use crate::api::ToEndpoint;
use crate::config::Config;
use crate::conn;
use crate::http::{self, Response};
use crate::hub::{Admit, Hub, RequestSender};
use crate::metrics::Metrics;

/// Everything the connection tasks share (all on the endpoint thread).
pub(crate) struct Shared {
    pub hub: RefCell<Hub>,
    pub cfg: Config,
    pub metrics: Rc<Metrics>,
    /// Signalled when the last client leaves.
    pub idle: Notify,
    /// Connections being refused right now (bounded, each lingers briefly).
    refusing: Cell<usize>,
}

/// How long shutdown waits for clients to take their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(700);
const MAX_REFUSING: usize = 256;

pub(crate) struct Channels {
    pub inbox: mpsc::UnboundedReceiver<ToEndpoint>,
    pub stop: oneshot::Receiver<()>,
    pub port: RequestSender,
}

/// The body of the endpoint thread; returns when stopped (or when the [`crate::Endpoint`] is gone).
pub(crate) fn run(rt: Runtime, listeners: Vec<TcpListener>, cfg: Config, ch: Channels) {
    let local = LocalSet::new();
    local.block_on(&rt, serve(listeners, cfg, ch));
}

async fn serve(listeners: Vec<TcpListener>, cfg: Config, ch: Channels) {
    let Channels {
        mut inbox,
        mut stop,
        port,
    } = ch;
    let metrics = Rc::new(Metrics::default());
    let shared = Rc::new(Shared {
        hub: RefCell::new(Hub::new(cfg.clone(), metrics.clone(), port)),
        cfg: cfg.clone(),
        metrics,
        idle: Notify::new(),
        refusing: Cell::new(0),
    });
    let accepts: Vec<_> = listeners
        .into_iter()
        .map(|l| spawn_local(accept_loop(l, shared.clone())))
        .collect();
    let mut tick = interval(cfg.checkpoint_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            msg = inbox.recv() => match msg {
                Some(msg) => {
                    shared.hub.borrow_mut().handle(msg);
                    // Let connection tasks drain their queues between batches.
                    tokio::task::yield_now().await;
                }
                None => break,
            },
            _ = tick.tick() => shared.hub.borrow_mut().checkpoint_tick(),
        }
    }
    for a in accepts {
        a.abort();
    }
    shared.hub.borrow_mut().shutdown_all();
    let _ = timeout(SHUTDOWN_GRACE, async {
        while !shared.hub.borrow().clients.is_empty() {
            shared.idle.notified().await;
        }
    })
    .await;
}

async fn accept_loop(listener: TcpListener, shared: Rc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of descriptors or similar: back off instead of spinning.
                sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let admitted = shared.hub.borrow_mut().admit();
        match admitted {
            Admit::Yes(id, outbox) => {
                spawn_local(conn::serve(stream, id, outbox, shared.clone()));
            }
            Admit::Full if shared.refusing.get() < MAX_REFUSING => {
                shared.refusing.set(shared.refusing.get() + 1);
                spawn_local(refuse(stream, shared.clone()));
            }
            Admit::Full | Admit::ShuttingDown => drop(stream),
        }
    }
}

/// 503 for a connection beyond `max_clients`.
async fn refuse(mut stream: TcpStream, shared: Rc<Shared>) {
    let response =
        Response::error(503, "too_many_clients", "too many clients connected; retry later").header("Retry-After", "1");
    http::respond(&mut stream, response).await;
    shared.refusing.set(shared.refusing.get().saturating_sub(1));
}
