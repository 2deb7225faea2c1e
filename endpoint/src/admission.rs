//! Which connections get in: `max_clients` in all, `max_per_address` per remote IP, and `max_unauthenticated`
//! not yet authenticated.
//!
//! A connection counts from accept until its socket closes (an upgraded WebSocket included). It is
//! *unauthenticated* until a request on it authorizes (a valid token, or under trust a feed or versions
//! request). When the unauthenticated connections are at their limit, a new one makes the OLDEST of them
//! close: idle connections (slowloris, port scans) therefore cannot lock out a client that authenticates at
//! once, and every unauthenticated connection is closed at its `auth_timeout` anyway (see `connection.rs`).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::{Metrics, Refusal};

/// How a connection is to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kill {
    /// Evicted to make room: close now.
    Now,
    /// Shutdown: finish the request in progress, then close.
    Graceful,
}

/// One accepted connection. Dropping the last reference frees its place.
pub(crate) struct ConnState {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub accepted: Instant,
    authenticated: Cell<bool>,
    evicted: Cell<bool>,
    kill: Cell<Option<Kill>>,
    killed: Notify,
    admission: Weak<RefCell<Admission>>,
}

impl ConnState {
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.get()
    }

    /// Resolves when the connection is to end, with how.
    pub async fn killed(&self) -> Kill {
        loop {
            if let Some(k) = self.kill.get() {
                return k;
            }
            self.killed.notified().await;
        }
    }

    fn kill(&self, how: Kill) {
        if self.kill.get() != Some(Kill::Now) {
            self.kill.set(Some(how));
            self.killed.notify_one();
        }
    }

    /// A request on it authorized: it no longer counts as unauthenticated.
    pub fn authenticated(&self) {
        if self.authenticated.replace(true) || self.evicted.get() {
            return;
        }
        if let Some(admission) = self.admission.upgrade() {
            if let Ok(mut a) = admission.try_borrow_mut() {
                a.unauthenticated = a.unauthenticated.saturating_sub(1);
            }
        }
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        let Some(admission) = self.admission.upgrade() else {
            return;
        };
        let Ok(mut a) = admission.try_borrow_mut() else { return };
        a.total = a.total.saturating_sub(1);
        if !self.authenticated.get() && !self.evicted.get() {
            a.unauthenticated = a.unauthenticated.saturating_sub(1);
        }
        let ip = self.peer.ip();
        if let Some(n) = a.per_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                a.per_address.remove(&ip);
            }
        }
        if a.total == 0 {
            a.idle.notify_one();
        }
    }
}

pub(crate) enum Admit {
    Yes(Rc<ConnState>),
    No(Refusal),
}

pub(crate) struct Admission {
    max_total: usize,
    max_unauthenticated: usize,
    max_per_address: usize,
    pub total: usize,
    pub unauthenticated: usize,
    per_address: HashMap<IpAddr, usize>,
    /// Connections in accept order, for eviction and shutdown (dead ones are skipped and pruned).
    order: VecDeque<Weak<ConnState>>,
    /// Signalled when the last connection closes.
    idle: Rc<Notify>,
}

impl Admission {
    pub fn new(max_total: usize, max_unauthenticated: usize, max_per_address: usize) -> Admission {
        Admission {
            max_total,
            max_unauthenticated,
            max_per_address,
            total: 0,
            unauthenticated: 0,
            per_address: HashMap::new(),
            order: VecDeque::new(),
            idle: Rc::new(Notify::new()),
        }
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(this: &RefCell<Admission>) {
        loop {
            let idle = {
                let a = this.borrow();
                if a.total == 0 {
                    return;
                }
                a.idle.clone()
            };
            idle.notified().await;
        }
    }

    /// Admits a connection, evicting the oldest unauthenticated one when those are at their limit.
    pub fn admit(this: &Rc<RefCell<Admission>>, peer: SocketAddr, local: SocketAddr, metrics: &Metrics) -> Admit {
        let weak = Rc::downgrade(this);
        let Ok(mut a) = this.try_borrow_mut() else {
            return Admit::No(Refusal::MaxClients);
        };
        a.admit_as(weak, peer, local, metrics)
    }

    fn admit_as(
        &mut self,
        me: Weak<RefCell<Admission>>,
        peer: SocketAddr,
        local: SocketAddr,
        metrics: &Metrics,
    ) -> Admit {
        if self.total >= self.max_total {
            return Admit::No(Refusal::MaxClients);
        }
        if self.per_address.get(&peer.ip()).copied().unwrap_or(0) >= self.max_per_address {
            return Admit::No(Refusal::PerAddress);
        }
        if self.unauthenticated >= self.max_unauthenticated {
            self.evict_oldest_unauthenticated(metrics);
        }
        let conn = Rc::new(ConnState {
            peer,
            local,
            accepted: Instant::now(),
            authenticated: Cell::new(false),
            evicted: Cell::new(false),
            kill: Cell::new(None),
            killed: Notify::new(),
            admission: me,
        });
        self.total += 1;
        self.unauthenticated += 1;
        *self.per_address.entry(peer.ip()).or_default() += 1;
        if self.order.len() >= 2 * self.max_total.max(64) {
            self.order.retain(|w| w.strong_count() > 0);
        }
        self.order.push_back(Rc::downgrade(&conn));
        Admit::Yes(conn)
    }

    fn evict_oldest_unauthenticated(&mut self, metrics: &Metrics) {
        let victim = self
            .order
            .iter()
            .filter_map(Weak::upgrade)
            .find(|c| !c.authenticated.get() && !c.evicted.get());
        if let Some(c) = victim {
            c.evicted.set(true);
            self.unauthenticated = self.unauthenticated.saturating_sub(1);
            metrics.refused(Refusal::UnauthenticatedLimit);
            c.kill(Kill::Now);
        }
        self.order.retain(|w| w.upgrade().is_some_and(|c| !c.evicted.get()));
    }

    /// Shutdown: every connection finishes its request and closes.
    pub fn kill_all(&mut self) {
        for c in self.order.iter().filter_map(Weak::upgrade) {
            c.kill(Kill::Graceful);
        }
    }
}
