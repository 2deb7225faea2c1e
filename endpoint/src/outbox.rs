//! A client's bounded outgoing queue.
//!
//! The hub pushes shared, already serialised messages and never waits; the connection task pops and writes
//! them. The queue is counted in bytes against `client_buffer`:
//! - a live message (change, delta, checkpoint, error) that would pass the bound cuts the client as slow at
//!   once (its queue is dropped, the connection task is told to close);
//! - a bulk message the client asked for (a page of history, a version map) is only *offered*: refused when
//!   it would pass the bound, and the caller pauses the feed at the last row queued and continues once the
//!   queue drained ([`Outbox::want_resume`]). So a catching-up client is never cut, and never holds more than
//!   the bound;
//! - one large message (over half the bound, live or bulk) that does not fit is still accepted when the
//!   queue is at most half full. It is
//!   *exempt*: it does not count against the bound while it waits, so live messages queued behind it do not
//!   cut the client because of it. A client can therefore not livelock on one large change, and a queue holds
//!   at most the bound plus that one message.
//!
//! Closing for any reason (slow, token revoked, shutdown) is signalled separately so a task blocked writing
//! to a stalled socket notices it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;
use tungstenite::Utf8Bytes;

use crate::metrics::{Metrics, Refusal};

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
    /// Messages with whether each is the exempt one.
    queue: RefCell<VecDeque<(Out, bool)>>,
    bytes: Cell<usize>,
    exempt_bytes: Cell<usize>,
    limit: usize,
    close: Cell<Option<CloseReason>>,
    resume: Cell<bool>,
    ready: Notify,
    closing: Notify,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Outbox {
        Outbox {
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            exempt_bytes: Cell::new(0),
            limit,
            close: Cell::new(None),
            resume: Cell::new(false),
            ready: Notify::new(),
            closing: Notify::new(),
            metrics,
        }
    }

    /// Bytes that count against the bound.
    fn counted(&self) -> usize {
        self.bytes.get() - self.exempt_bytes.get()
    }

    fn enqueue(&self, out: Out, exempt: bool) {
        if let Out::Data(d) = &out {
            self.bytes.set(self.bytes.get() + d.len());
            if exempt {
                self.exempt_bytes.set(self.exempt_bytes.get() + d.len());
            }
        }
        self.queue.borrow_mut().push_back((out, exempt));
        self.ready.notify_one();
    }

    /// Queues a live message; cuts the client (and counts it) when its queue passes the bound.
    pub fn push(&self, out: Out) {
        if self.close.get().is_some() {
            return;
        }
        if let Out::Data(d) = &out {
            if self.counted().saturating_add(d.len()) > self.limit {
                if d.len() > self.limit / 2 && self.exempt_allowed() {
                    return self.enqueue(out, true);
                }
                self.metrics.refused(Refusal::SlowClient);
                self.close(CloseReason::Slow);
                return;
            }
        }
        self.enqueue(out, false);
    }

    pub fn data(&self, text: Utf8Bytes) {
        self.push(Out::Data(text));
    }

    /// Offers a bulk message (history row, version map); false: not queued (no room), try again after the
    /// queue drained. A closed client takes everything (and drops it).
    pub fn offer_bulk(&self, text: Utf8Bytes) -> bool {
        if self.close.get().is_some() {
            return true;
        }
        if self.counted().saturating_add(text.len()) <= self.limit {
            self.enqueue(Out::Data(text), false);
            return true;
        }
        if self.exempt_allowed() {
            self.enqueue(Out::Data(text), true);
            return true;
        }
        false
    }

    /// Whether a message that does not fit may go as the one exempt message: none is waiting and the queue
    /// is at most half full.
    fn exempt_allowed(&self) -> bool {
        self.exempt_bytes.get() == 0 && self.counted() <= self.limit / 2
    }

    /// Whether a page of about `bytes` would fit now (else the feed waits for the queue to drain).
    pub fn has_room_for(&self, bytes: usize) -> bool {
        self.counted() == 0 || self.counted().saturating_add(bytes) <= self.limit
    }

    /// Asks the connection task to call the hub back once the queue is empty.
    pub fn want_resume(&self) {
        self.resume.set(true);
        self.ready.notify_one();
    }

    /// True once, after [`Outbox::want_resume`], when the queue is empty.
    pub fn take_resume(&self) -> bool {
        self.queue.borrow().is_empty() && self.resume.replace(false)
    }

    pub fn pop(&self) -> Option<Out> {
        if self.close.get().is_some() {
            return None;
        }
        let (out, exempt) = self.queue.borrow_mut().pop_front()?;
        if let Out::Data(d) = &out {
            self.bytes.set(self.bytes.get() - d.len());
            if exempt {
                self.exempt_bytes.set(self.exempt_bytes.get() - d.len());
            }
        }
        Some(out)
    }

    /// Marks the client for closing (the first reason wins) and drops whatever is queued.
    pub fn close(&self, reason: CloseReason) {
        if self.close.get().is_none() {
            self.close.set(Some(reason));
            self.queue.borrow_mut().clear();
            self.bytes.set(0);
            self.exempt_bytes.set(0);
            self.closing.notify_one();
            self.ready.notify_one();
        }
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.get()
    }

    /// Resolves once something is queued, a resume is due, or the client is closing.
    pub async fn ready(&self) {
        while self.close.get().is_none() && self.queue.borrow().is_empty() && !self.resume.get() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    #[test]
    fn bulk_is_refused_not_cut_and_one_large_message_passes() {
        let o = Outbox::new(1000, Arc::new(Metrics::default()));
        assert!(o.offer_bulk(msg(600)));
        assert!(!o.offer_bulk(msg(600)), "no room: refused, not cut");
        assert!(o.close_reason().is_none());
        assert!(o.pop().is_some());
        assert!(o.offer_bulk(msg(5000)), "larger than the bound, queue empty: exempt");
        assert!(!o.offer_bulk(msg(5000)), "only one exempt message at a time");
        o.data(msg(900)); // live traffic behind it is not cut because of it
        assert!(o.close_reason().is_none());
        o.data(msg(200));
        assert_eq!(o.close_reason(), Some(CloseReason::Slow));
        let live = Outbox::new(1000, Arc::new(Metrics::default()));
        live.data(msg(3000));
        assert!(
            live.close_reason().is_none(),
            "one large live message on an empty queue goes out"
        );
        live.data(msg(3000));
        assert_eq!(live.close_reason(), Some(CloseReason::Slow), "a second one cuts");
    }
}
