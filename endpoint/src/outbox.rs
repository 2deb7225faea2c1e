//! A client's bounded outgoing queue.
//!
//! The hub pushes shared, already serialised messages and never waits; the connection task pops and writes
//! them. The queue is counted in bytes: passing `client_buffer` cuts the client as slow at once (its queue is
//! dropped, the connection task is told to close). Closing for any reason (slow, token revoked, shutdown) is
//! signalled separately so a task blocked writing to a stalled socket notices it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use tokio::sync::Notify;
use tungstenite::Utf8Bytes;

use crate::metrics::{bump, Metrics};

pub(crate) enum Out {
    /// One message: a WebSocket text message, or SSE bytes.
    Data(Utf8Bytes),
    /// Send everything before this, then end the connection normally.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    Slow,
    Revoked,
    Shutdown,
}

pub(crate) struct Outbox {
    queue: RefCell<VecDeque<Out>>,
    bytes: Cell<usize>,
    limit: usize,
    close: Cell<Option<CloseReason>>,
    resume: Cell<bool>,
    ready: Notify,
    closing: Notify,
    metrics: Rc<Metrics>,
}

impl Outbox {
    pub fn new(limit: usize, metrics: Rc<Metrics>) -> Outbox {
        Outbox {
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            limit,
            close: Cell::new(None),
            resume: Cell::new(false),
            ready: Notify::new(),
            closing: Notify::new(),
            metrics,
        }
    }

    /// Queues a message; cuts the client (and counts it) when its queue passes the limit.
    pub fn push(&self, out: Out) {
        if self.close.get().is_some() {
            return;
        }
        if let Out::Data(d) = &out {
            let bytes = self.bytes.get().saturating_add(d.len());
            if bytes > self.limit {
                bump(&self.metrics.slow_disconnects, 1);
                self.close(CloseReason::Slow);
                return;
            }
            self.bytes.set(bytes);
        }
        self.queue.borrow_mut().push_back(out);
        self.ready.notify_one();
    }

    pub fn data(&self, text: Utf8Bytes) {
        self.push(Out::Data(text));
    }

    /// Queues a bulk answer the client asked for (a version map, a page of history): counted, but never cuts
    /// the client by itself, since its size is the server's choice. Whoever asks for more pages waits until
    /// the queue drained ([`Outbox::want_resume`]).
    pub fn data_bulk(&self, text: Utf8Bytes) {
        if self.close.get().is_some() {
            return;
        }
        self.bytes.set(self.bytes.get().saturating_add(text.len()));
        self.queue.borrow_mut().push_back(Out::Data(text));
        self.ready.notify_one();
    }

    /// Whether the queue is over half full (time to stop fetching history for this client).
    pub fn filling(&self) -> bool {
        self.bytes.get() > self.limit / 2
    }

    /// Asks the connection task to call the hub back once the queue is empty.
    pub fn want_resume(&self) {
        self.resume.set(true);
    }

    pub fn take_resume(&self) -> bool {
        self.resume.replace(false)
    }

    pub fn pop(&self) -> Option<Out> {
        if self.close.get().is_some() {
            return None;
        }
        let out = self.queue.borrow_mut().pop_front()?;
        if let Out::Data(d) = &out {
            self.bytes.set(self.bytes.get().saturating_sub(d.len()));
        }
        Some(out)
    }

    /// Marks the client for closing (the first reason wins) and drops whatever is queued.
    pub fn close(&self, reason: CloseReason) {
        if self.close.get().is_none() {
            self.close.set(Some(reason));
            self.queue.borrow_mut().clear();
            self.bytes.set(0);
            self.closing.notify_one();
            self.ready.notify_one();
        }
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.get()
    }

    /// Resolves once something is queued (or the client is closing).
    pub async fn ready(&self) {
        while self.close.get().is_none() && self.queue.borrow().is_empty() {
            self.ready.notified().await;
        }
    }

    /// Resolves once the client is to be closed.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(r) = self.close.get() {
                return r;
            }
            self.closing.notified().await;
        }
    }
}
