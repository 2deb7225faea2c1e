//! The hub: everything the endpoint knows about subscriptions, owned by its single thread.
//!
//! It holds the worker's latest status and tokens, every subscribed client (one per WebSocket, SSE stream,
//! long-poll or one-shot request waiting for the worker), and the requests to the worker (`requests.rs`).
//! Worker messages are applied in the order they were published; replies are routed to the client (and
//! subscription) that asked, stale ones dropped. The hub never waits: it pushes into client outboxes.
//! Batches, gaps and checkpoints are in `fanout.rs`, subscriptions in `subscribe.rs`.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tungstenite::Utf8Bytes;

use crate::api::{Reply, ReplyError, ReplyErrorKind, RequestKind, Status, ToEndpoint, Token};
use crate::auth::{self, Principal};
use crate::batch::{position, Pos};
use crate::config::Config;
use crate::feed::{Feed, Phase};
use crate::inbox::Inbound;
use crate::metrics::{bump, Metrics};
use crate::outbox::{CloseReason, Outbox};
pub(crate) use crate::requests::ClientId;
use crate::requests::{Bucket, RequestSender, Requests, Waiting, WORKER_GONE};

pub(crate) struct Client {
    pub outbox: Rc<Outbox>,
    /// Set once the request is authorised; a revoked token closes the client.
    pub who: Option<Principal>,
    pub kind: Kind,
    /// Its requests the worker has not answered yet, queued or sent (WebSocket commands are limited by it).
    pub outstanding: usize,
}

pub(crate) enum Kind {
    /// A one-shot request waiting for the worker (versions).
    Plain,
    Ws(WsSubs),
    Sse(Feed),
    LongPoll(LongPoll),
}

#[derive(Default)]
pub(crate) struct WsSubs {
    pub versions: HashMap<String, VState>,
    pub feeds: BTreeMap<u64, Feed>,
    pub next_feed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VState {
    /// The snapshot was asked for with this request.
    Pending(u64),
    /// The snapshot arrived but did not fit the client's queue: ask again once it drained.
    Refetch,
    Live,
}

pub(crate) struct LongPoll {
    pub feed: Feed,
    pub max: u32,
    /// Byte bound of the answer's changes.
    pub max_bytes: usize,
    pub deadline: Instant,
    pub done: Option<oneshot::Sender<PollOutcome>>,
}

pub(crate) enum PollOutcome {
    Rows {
        rows: Vec<Utf8Bytes>,
        cursor: Option<String>,
    },
    Failed(ReplyError),
}

/// How many clients of each kind are subscribed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ClientKinds {
    pub websocket: usize,
    pub sse: usize,
    pub long_poll: usize,
}

pub(crate) struct Hub {
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub status: Option<Status>,
    /// The newest head seen (status or batch): "now" for new feeds.
    pub head: Option<(String, Pos)>,
    pub tokens: Vec<Token>,
    pub clients: HashMap<ClientId, Client>,
    next_client: ClientId,
    pub requests: Requests,
    pub shutting_down: bool,
}

impl Hub {
    pub fn new(cfg: Config, metrics: Arc<Metrics>, port: RequestSender) -> Hub {
        Hub {
            requests: Requests::new(port, cfg.max_worker_requests, cfg.max_requests_per_token),
            cfg,
            metrics,
            status: None,
            head: None,
            tokens: Vec::new(),
            clients: HashMap::new(),
            next_client: 1,
            shutting_down: false,
        }
    }

    /// A new client (a subscription or a request waiting for the worker) with its outbox.
    pub fn join(&mut self, who: &Principal) -> (ClientId, Rc<Outbox>) {
        let id = self.next_client;
        self.next_client += 1;
        let outbox = Rc::new(Outbox::new(self.cfg.client_buffer, self.metrics.clone()));
        if self.shutting_down {
            outbox.close(CloseReason::Shutdown);
        }
        self.clients.insert(
            id,
            Client {
                outbox: outbox.clone(),
                who: Some(who.clone()),
                kind: Kind::Plain,
                outstanding: 0,
            },
        );
        (id, outbox)
    }

    pub fn remove(&mut self, id: ClientId) {
        self.clients.remove(&id);
    }

    /// Subscribed clients by kind (for `GET /status`).
    pub fn client_kinds(&self) -> ClientKinds {
        let mut k = ClientKinds::default();
        for c in self.clients.values() {
            match c.kind {
                Kind::Plain => {}
                Kind::Ws(_) => k.websocket += 1,
                Kind::Sse(_) => k.sse += 1,
                Kind::LongPoll(_) => k.long_poll += 1,
            }
        }
        k
    }

    pub fn known_labels(&self) -> Option<&[String]> {
        self.status.as_ref().map(|s| s.labels.as_slice())
    }

    /// Authenticates a presented secret, counting failures; `None`: 401.
    pub fn authenticate(&self, secret: Option<&str>) -> Option<Principal> {
        let who = auth::authenticate(self.cfg.auth, &self.tokens, secret);
        if who.is_none() {
            bump(&self.metrics.auth_failures, 1);
        }
        who
    }

    pub fn handle(&mut self, msg: Inbound) {
        match msg {
            Inbound::Msg(ToEndpoint::Status(s)) => self.on_status(s),
            Inbound::Msg(ToEndpoint::Tokens(t)) => self.on_tokens(t),
            Inbound::Msg(ToEndpoint::Batch(b)) => self.on_batch(b),
            Inbound::Msg(ToEndpoint::Reply { id, result }) => self.on_reply(id, result),
            Inbound::Gap { head, labels } => self.on_gap(&head, Some(&labels)),
        }
    }

    /// Moves "now" (the newest head seen, where new feeds without a cursor start) forward, never back.
    pub fn advance_head(&mut self, head: &str) {
        let Some(pos) = position(head) else { return };
        if self.head.as_ref().is_some_and(|(_, p)| *p >= pos) {
            return;
        }
        self.head = Some((head.to_string(), pos));
    }

    /// Live feeds are covered up to a status's head too: every batch before it was published before it.
    fn on_status(&mut self, s: Status) {
        self.advance_head(&s.head);
        let pos = position(&s.head);
        for c in self.clients.values_mut() {
            for feed in feeds_mut(&mut c.kind) {
                if feed.phase == Phase::Live {
                    feed.advance(&s.head, pos);
                }
            }
        }
        self.status = Some(s);
    }

    /// A new token list replaces the old: a client whose token is gone, or no longer covers what it is
    /// subscribed to (labels, rows), is closed; others go on with the new privileges (readable tables).
    fn on_tokens(&mut self, tokens: Vec<Token>) {
        for c in self.clients.values_mut() {
            let Some(who) = &c.who else { continue };
            if who.token.is_none() {
                continue;
            }
            match who.refreshed(&tokens) {
                Some(p) if covers(&p, &c.kind) => c.who = Some(p),
                _ => c.outbox.close(CloseReason::Revoked),
            }
        }
        self.tokens = tokens;
    }

    fn on_reply(&mut self, id: u64, result: Result<Reply, ReplyError>) {
        let Some(w) = self.requests.answered(id) else { return };
        self.forget_request(&w);
        self.pump();
        match w {
            Waiting::Oneshot(tx) => {
                let _ = tx.send(result);
            }
            Waiting::WsVersions { client, label } => self.versions_reply(client, label, id, result),
            Waiting::Feed { client, feed } => self.feed_reply(client, feed, id, result),
        }
    }

    /// The bucket of a client's requests: its token, or under trust the client itself.
    pub fn bucket_of(&self, client: ClientId) -> Bucket {
        self.clients
            .get(&client)
            .and_then(|c| c.who.as_ref())
            .and_then(|w| w.token_key())
            .map_or(Bucket::Client(client), Bucket::Token)
    }

    /// Asks the worker (in turn, see `requests.rs`); the request's id, or `Err` when the worker is gone.
    pub fn request(&mut self, kind: RequestKind, waiting: Waiting, bucket: Bucket) -> Result<u64, String> {
        let client = waiting.client();
        let id = self.requests.queue(kind, waiting, bucket)?;
        if let Some(c) = client.and_then(|c| self.clients.get_mut(&c)) {
            c.outstanding += 1;
        }
        self.pump();
        Ok(id)
    }

    fn forget_request(&mut self, w: &Waiting) {
        if let Some(c) = w.client().and_then(|c| self.clients.get_mut(&c)) {
            c.outstanding = c.outstanding.saturating_sub(1);
        }
    }

    /// Sends what the request limits allow; requests that cannot be sent (worker gone) are answered with an
    /// error.
    fn pump(&mut self) {
        let clients = &self.clients;
        let (dropped, failed) = self.requests.pump(|w| match w {
            Waiting::Oneshot(tx) => tx.is_closed(),
            Waiting::WsVersions { client, .. } | Waiting::Feed { client, .. } => !clients.contains_key(client),
        });
        for w in &dropped {
            self.forget_request(w);
        }
        for id in failed {
            let error = ReplyError {
                kind: ReplyErrorKind::Internal,
                message: WORKER_GONE.into(),
            };
            self.on_reply(id, Err(error));
        }
    }

    pub fn shutdown_all(&mut self) {
        self.shutting_down = true;
        for c in self.clients.values() {
            c.outbox.close(CloseReason::Shutdown);
        }
    }
}

/// Whether a (changed) token still covers everything a client is subscribed to.
fn covers(who: &Principal, kind: &Kind) -> bool {
    let feed_ok = |f: &Feed| who.rows && f.labels.iter().all(|l| who.allows(l));
    match kind {
        Kind::Plain => true,
        Kind::Ws(ws) => ws.versions.keys().all(|l| who.allows(l)) && ws.feeds.values().all(feed_ok),
        Kind::Sse(f) => feed_ok(f),
        Kind::LongPoll(lp) => feed_ok(&lp.feed),
    }
}

/// Every feed of a client.
pub(crate) fn feeds_mut(kind: &mut Kind) -> Vec<&mut Feed> {
    match kind {
        Kind::Plain => Vec::new(),
        Kind::Ws(ws) => ws.feeds.values_mut().collect(),
        Kind::Sse(f) => vec![f],
        Kind::LongPoll(lp) => vec![&mut lp.feed],
    }
}
