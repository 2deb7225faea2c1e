//! The state every task of the endpoint thread shares, and how tasks are spawned (a panic in any of them is
//! carried to the dispatcher in `server.rs`, which ends the thread).

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::task::spawn_local;
use tokio_rustls::TlsAcceptor;

use crate::admission::Admission;
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::requests::RequestSender;

/// Everything the connection tasks share (all on the endpoint thread).
pub(crate) struct Shared {
    pub hub: RefCell<Hub>,
    pub admission: Rc<RefCell<Admission>>,
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub tls: Option<TlsAcceptor>,
    /// The bound addresses.
    pub listen: Vec<SocketAddr>,
    /// Connections being refused right now (bounded, each lingers briefly).
    pub refusing: Cell<usize>,
    /// When this endpoint started (`uptime_ms` of `/status`).
    pub started: Instant,
    /// A task's panic, for the dispatcher to resume.
    panicked: RefCell<Option<Box<dyn Any + Send>>>,
    panic: Notify,
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
            admission: Rc::new(RefCell::new(Admission::new(
                cfg.max_clients,
                cfg.max_unauthenticated,
                cfg.max_per_address,
            ))),
            cfg,
            metrics,
            tls,
            listen,
            refusing: Cell::new(0),
            started: Instant::now(),
            panicked: RefCell::new(None),
            panic: Notify::new(),
        })
    }

    /// The panic of a task, if one panicked.
    pub fn take_panic(&self) -> Option<Box<dyn Any + Send>> {
        self.panicked.borrow_mut().take()
    }

    /// Resolves once a task panicked (the dispatcher then resumes the panic).
    pub async fn panicked(&self) {
        while self.panicked.borrow().is_none() {
            self.panic.notified().await;
        }
    }
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
