//! Requests to the worker, limited per token and in total so no client can starve the worker.
//!
//! Every request gets its id at once (feeds remember it as their phase) and waits in its bucket's queue until
//! both limits allow it: at most `max_requests_per_token` in flight per bucket (a token; under trust, a
//! client) and `max_worker_requests` in flight overall. Buckets take turns (round robin), so one busy token
//! cannot hold back the others. A request whose client left while it waited is dropped unsent. Queues are
//! bounded by what clients may subscribe to (one request per feed, one per version label); HTTP one-shot
//! requests are refused with 429 instead when their bucket already has [`ONESHOT_QUEUE`] waiting.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::api::{Reply, ReplyError, Request, RequestKind};

/// A hub client: a subscription, or a request waiting for the worker.
pub(crate) type ClientId = u64;

/// Queued requests a bucket may have before HTTP one-shot requests of it get 429.
pub(crate) const ONESHOT_QUEUE: usize = 16;

/// The endpoint's end of the request channel.
pub(crate) struct RequestSender {
    pub tx: mpsc::Sender<Request>,
    /// Write end of the wake socket pair (non-blocking).
    pub wake: UnixStream,
}

/// Who waits for a reply.
pub(crate) enum Waiting {
    WsVersions {
        client: ClientId,
        label: String,
    },
    /// History for a feed: WebSocket feed id, or 0 for an SSE or long-poll client's feed.
    Feed {
        client: ClientId,
        feed: u64,
    },
    Oneshot(oneshot::Sender<Result<Reply, ReplyError>>),
}

impl Waiting {
    pub fn client(&self) -> Option<ClientId> {
        match self {
            Waiting::WsVersions { client, .. } | Waiting::Feed { client, .. } => Some(*client),
            Waiting::Oneshot(_) => None,
        }
    }
}

/// Whose limit a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Bucket {
    Token([u8; 32]),
    Client(ClientId),
}

struct Pending {
    waiting: Waiting,
    bucket: Bucket,
    /// `None` once sent.
    kind: Option<RequestKind>,
}

#[derive(Default)]
struct BucketState {
    in_flight: usize,
    queue: VecDeque<u64>,
}

pub(crate) struct Requests {
    port: RequestSender,
    next_id: u64,
    max_in_flight: usize,
    per_bucket: usize,
    pending: HashMap<u64, Pending>,
    buckets: HashMap<Bucket, BucketState>,
    /// Buckets with queued requests, in turn order.
    turn: VecDeque<Bucket>,
    in_flight: usize,
    queued: usize,
    worker_gone: bool,
}

pub(crate) const WORKER_GONE: &str = "the relay worker is not running";

impl Requests {
    pub fn new(port: RequestSender, max_in_flight: usize, per_bucket: usize) -> Requests {
        Requests {
            port,
            next_id: 1,
            max_in_flight,
            per_bucket,
            pending: HashMap::new(),
            buckets: HashMap::new(),
            turn: VecDeque::new(),
            in_flight: 0,
            queued: 0,
            worker_gone: false,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Whether a bucket is saturated: its slots are taken and [`ONESHOT_QUEUE`] requests wait.
    pub fn saturated(&self, bucket: Bucket) -> bool {
        self.buckets
            .get(&bucket)
            .is_some_and(|b| b.in_flight >= self.per_bucket && b.queue.len() >= ONESHOT_QUEUE)
    }

    fn cleanup(&mut self, bucket: Bucket) {
        if self
            .buckets
            .get(&bucket)
            .is_some_and(|b| b.in_flight == 0 && b.queue.is_empty())
        {
            self.buckets.remove(&bucket);
        }
    }
}

impl Requests {
    /// Queues a request; its id at once. `Err` when the worker is gone.
    pub fn queue(&mut self, kind: RequestKind, waiting: Waiting, bucket: Bucket) -> Result<u64, String> {
        if self.worker_gone {
            return Err(WORKER_GONE.into());
        }
        let id = self.next_id;
        self.next_id += 1;
        let state = self.buckets.entry(bucket).or_default();
        if state.queue.is_empty() {
            self.turn.push_back(bucket);
        }
        state.queue.push_back(id);
        self.queued += 1;
        self.pending.insert(
            id,
            Pending {
                waiting,
                bucket,
                kind: Some(kind),
            },
        );
        Ok(id)
    }

    /// The waiter of an answered request (`None`: unknown), freeing its slot.
    pub fn answered(&mut self, id: u64) -> Option<Waiting> {
        let p = self.pending.remove(&id)?;
        if p.kind.is_none() {
            self.in_flight = self.in_flight.saturating_sub(1);
            if let Some(b) = self.buckets.get_mut(&p.bucket) {
                b.in_flight = b.in_flight.saturating_sub(1);
            }
            self.cleanup(p.bucket);
        }
        Some(p.waiting)
    }

    /// Sends queued requests while the limits allow, buckets taking turns. Returns the waiters dropped unsent
    /// (`stale`: nobody waits any more) and, once the worker is found gone, every request that could not be
    /// sent (still pending: answer them with an error).
    pub fn pump(&mut self, stale: impl Fn(&Waiting) -> bool) -> (Vec<Waiting>, Vec<u64>) {
        let (mut dropped, mut failed) = (Vec::new(), Vec::new());
        let mut blocked = 0;
        while self.in_flight < self.max_in_flight && blocked < self.turn.len() {
            let Some(bucket) = self.turn.pop_front() else { break };
            let Some(state) = self.buckets.get_mut(&bucket) else {
                continue;
            };
            if state.in_flight >= self.per_bucket {
                self.turn.push_back(bucket);
                blocked += 1;
                continue;
            }
            blocked = 0;
            let Some(id) = state.queue.pop_front() else { continue };
            if !state.queue.is_empty() {
                self.turn.push_back(bucket);
            }
            self.queued -= 1;
            if self.pending.get(&id).is_none_or(|p| stale(&p.waiting)) {
                if let Some(p) = self.pending.remove(&id) {
                    dropped.push(p.waiting);
                }
                self.cleanup(bucket);
                continue;
            }
            let Some(kind) = self.pending.get_mut(&id).and_then(|p| p.kind.take()) else {
                continue;
            };
            // Counted in flight from here: `answered` frees it, whether the worker answers or we fail it.
            self.in_flight += 1;
            if let Some(b) = self.buckets.get_mut(&bucket) {
                b.in_flight += 1;
            }
            if self.worker_gone || self.port.tx.send(Request { id, kind }).is_err() {
                self.worker_gone = true;
                failed.push(id);
                continue;
            }
            // A full socket already wakes the worker; nothing else can go wrong that retrying would fix.
            let _ = (&self.port.wake).write(&[1]);
        }
        if self.worker_gone {
            // Everything still queued fails too, now, so answering does not recurse request by request.
            for (_, b) in self.buckets.iter_mut() {
                for id in b.queue.drain(..) {
                    if let Some(p) = self.pending.get_mut(&id) {
                        p.kind = None;
                    }
                    b.in_flight += 1;
                    self.in_flight += 1;
                    failed.push(id);
                }
            }
            self.turn.clear();
            self.queued = 0;
        }
        (dropped, failed)
    }
}
