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

use crate::api::{Reply, ReplyError, ReplyErrorKind, Request, RequestKind};
use crate::hub::{ClientId, Hub};

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
    fn client(&self) -> Option<ClientId> {
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

const WORKER_GONE: &str = "the relay worker is not running";

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

impl Hub {
    /// The bucket of a client's requests: its token, or under trust the client itself.
    pub fn bucket_of(&self, client: ClientId) -> Bucket {
        self.clients
            .get(&client)
            .and_then(|c| c.who.as_ref())
            .and_then(|w| w.token_key())
            .map_or(Bucket::Client(client), Bucket::Token)
    }

    /// Queues a request for the worker; `Err` when the worker is gone.
    pub fn request(&mut self, kind: RequestKind, waiting: Waiting, bucket: Bucket) -> Result<u64, String> {
        if self.requests.worker_gone {
            return Err(WORKER_GONE.into());
        }
        let r = &mut self.requests;
        let id = r.next_id;
        r.next_id += 1;
        if let Some(c) = waiting.client().and_then(|c| self.clients.get_mut(&c)) {
            c.outstanding += 1;
        }
        let r = &mut self.requests;
        let state = r.buckets.entry(bucket).or_default();
        if state.queue.is_empty() {
            r.turn.push_back(bucket);
        }
        state.queue.push_back(id);
        r.queued += 1;
        r.pending.insert(
            id,
            Pending {
                waiting,
                bucket,
                kind: Some(kind),
            },
        );
        self.pump();
        Ok(id)
    }

    /// The waiter of an answered request (`None`: unknown or stale), freeing its slot.
    pub(crate) fn answered(&mut self, id: u64) -> Option<Waiting> {
        let p = self.requests.pending.remove(&id)?;
        if p.kind.is_none() {
            let r = &mut self.requests;
            r.in_flight = r.in_flight.saturating_sub(1);
            if let Some(b) = r.buckets.get_mut(&p.bucket) {
                b.in_flight = b.in_flight.saturating_sub(1);
            }
            r.cleanup(p.bucket);
        }
        if let Some(c) = p.waiting.client().and_then(|c| self.clients.get_mut(&c)) {
            c.outstanding = c.outstanding.saturating_sub(1);
        }
        self.pump();
        Some(p.waiting)
    }

    fn stale(&self, w: &Waiting) -> bool {
        match w {
            Waiting::Oneshot(tx) => tx.is_closed(),
            Waiting::WsVersions { client, .. } | Waiting::Feed { client, .. } => !self.clients.contains_key(client),
        }
    }

    /// Sends queued requests while the limits allow, buckets taking turns.
    fn pump(&mut self) {
        let mut failed = Vec::new();
        let mut blocked = 0;
        while self.requests.in_flight < self.requests.max_in_flight && blocked < self.requests.turn.len() {
            let Some(bucket) = self.requests.turn.pop_front() else {
                break;
            };
            let per = self.requests.per_bucket;
            let Some(state) = self.requests.buckets.get_mut(&bucket) else {
                continue;
            };
            if state.in_flight >= per {
                self.requests.turn.push_back(bucket);
                blocked += 1;
                continue;
            }
            blocked = 0;
            let Some(id) = state.queue.pop_front() else { continue };
            if !state.queue.is_empty() {
                self.requests.turn.push_back(bucket);
            }
            self.requests.queued -= 1;
            let stale = self.requests.pending.get(&id).is_none_or(|p| self.stale(&p.waiting));
            if stale {
                if let Some(p) = self.requests.pending.remove(&id) {
                    if let Some(c) = p.waiting.client().and_then(|c| self.clients.get_mut(&c)) {
                        c.outstanding = c.outstanding.saturating_sub(1);
                    }
                }
                self.requests.cleanup(bucket);
                continue;
            }
            let r = &mut self.requests;
            let Some(kind) = r.pending.get_mut(&id).and_then(|p| p.kind.take()) else {
                continue;
            };
            if r.worker_gone || r.port.tx.send(Request { id, kind }).is_err() {
                r.worker_gone = true;
                failed.push(id);
                continue;
            }
            // A full socket already wakes the worker; nothing else can go wrong that retrying would fix.
            let _ = (&r.port.wake).write(&[1]);
            r.in_flight += 1;
            if let Some(b) = r.buckets.get_mut(&bucket) {
                b.in_flight += 1;
            }
        }
        if self.requests.worker_gone {
            // Everything still queued fails too, here, so answering does not recurse request by request.
            let r = &mut self.requests;
            for (_, b) in r.buckets.iter_mut() {
                failed.extend(b.queue.drain(..));
            }
            r.turn.clear();
            r.queued = 0;
            for id in failed {
                let Some(p) = self.requests.pending.remove(&id) else {
                    continue;
                };
                let error = ReplyError {
                    kind: ReplyErrorKind::Internal,
                    message: WORKER_GONE.into(),
                };
                self.requests.pending.insert(id, Pending { kind: None, ..p });
                self.in_flight_failed(id, error);
            }
        }
    }

    /// Delivers a failure for a request that could not be sent.
    fn in_flight_failed(&mut self, id: u64, e: ReplyError) {
        // Counted as in flight so `answered` frees it the usual way.
        self.requests.in_flight += 1;
        if let Some(b) = self
            .requests
            .pending
            .get(&id)
            .map(|p| p.bucket)
            .and_then(|b| self.requests.buckets.get_mut(&b))
        {
            b.in_flight += 1;
        }
        self.handle(crate::inbox::Inbound::Msg(crate::api::ToEndpoint::Reply {
            id,
            result: Err(e),
        }));
    }
}
