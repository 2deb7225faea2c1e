//! The hub: everything the endpoint knows, owned by its single thread.
//!
//! It holds the worker's latest status and tokens, every connected client with its subscriptions, and the
//! requests outstanding at the worker. Worker messages are applied in the order they were published; replies
//! are routed to the client (and subscription) that asked, stale ones dropped. The hub never waits: it pushes
//! into client outboxes. Batches and checkpoints are in `fanout.rs`, subscriptions in `subscribe.rs`.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::mpsc;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tungstenite::Utf8Bytes;

use crate::api::{Reply, ReplyError, Request, RequestKind, Status, ToEndpoint, Token};
use crate::auth::{self, Principal};
use crate::batch::{position, Pos};
use crate::config::Config;
use crate::feed::Feed;
use crate::metrics::{bump, Metrics};
use crate::outbox::{CloseReason, Outbox};

pub(crate) type ClientId = u64;

/// Most requests outstanding at the worker; beyond it new ones are refused as busy.
const MAX_PENDING: usize = 10_000;

pub(crate) struct Client {
    pub outbox: Rc<Outbox>,
    /// Set once the request is authorised; a revoked token closes the client.
    pub who: Option<Principal>,
    pub kind: Kind,
    /// Its requests the worker has not answered yet (WebSocket commands are limited by it).
    pub outstanding: usize,
}

pub(crate) enum Kind {
    /// Reading its request, or a one-shot request (health, versions).
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
    Live,
}

pub(crate) struct LongPoll {
    pub feed: Feed,
    pub max: u32,
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

pub(crate) enum Pending {
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

/// The endpoint's end of the request channel.
pub(crate) struct RequestSender {
    pub tx: mpsc::Sender<Request>,
    /// Write end of the wake socket pair (non-blocking).
    pub wake: UnixStream,
}

pub(crate) enum Admit {
    Yes(ClientId, Rc<Outbox>),
    Full,
    ShuttingDown,
}

pub(crate) struct Hub {
    pub cfg: Config,
    pub metrics: Rc<Metrics>,
    pub status: Option<Status>,
    /// The newest head seen (status or batch): "now" for new feeds.
    pub head: Option<(String, Pos)>,
    pub tokens: Vec<Token>,
    pub clients: HashMap<ClientId, Client>,
    next_client: ClientId,
    pub pending: HashMap<u64, Pending>,
    next_request: Cell<u64>,
    port: RequestSender,
    pub shutting_down: bool,
}

impl Hub {
    pub fn new(cfg: Config, metrics: Rc<Metrics>, port: RequestSender) -> Hub {
        Hub {
            cfg,
            metrics,
            status: None,
            head: None,
            tokens: Vec::new(),
            clients: HashMap::new(),
            next_client: 1,
            pending: HashMap::new(),
            next_request: Cell::new(1),
            port,
            shutting_down: false,
        }
    }

    pub fn admit(&mut self) -> Admit {
        if self.shutting_down {
            return Admit::ShuttingDown;
        }
        if self.clients.len() >= self.cfg.max_clients {
            bump(&self.metrics.rejected, 1);
            return Admit::Full;
        }
        let id = self.next_client;
        self.next_client += 1;
        let outbox = Rc::new(Outbox::new(self.cfg.client_buffer, self.metrics.clone()));
        self.clients.insert(
            id,
            Client {
                outbox: outbox.clone(),
                who: None,
                kind: Kind::Plain,
                outstanding: 0,
            },
        );
        Admit::Yes(id, outbox)
    }

    pub fn remove(&mut self, id: ClientId) {
        self.clients.remove(&id);
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

    /// Records who a client is (so revoking its token closes it).
    pub fn set_who(&mut self, id: ClientId, who: &Principal) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.who = Some(who.clone());
        }
    }

    /// Sends a request to the worker; `Err` when the worker is gone or too far behind.
    pub fn request(&mut self, kind: RequestKind, pending: Pending) -> Result<u64, String> {
        if self.pending.len() >= MAX_PENDING {
            return Err("the relay worker has too many requests outstanding; try again".into());
        }
        let id = self.next_request.get();
        self.next_request.set(id + 1);
        self.port
            .tx
            .send(Request { id, kind })
            .map_err(|_| "the relay worker is not running".to_string())?;
        // A full socket already wakes the worker; nothing else can go wrong that retrying would fix.
        let _ = (&self.port.wake).write(&[1]);
        self.count_outstanding(&pending, true);
        self.pending.insert(id, pending);
        Ok(id)
    }

    fn count_outstanding(&mut self, pending: &Pending, up: bool) {
        let (Pending::WsVersions { client, .. } | Pending::Feed { client, .. }) = pending else {
            return;
        };
        if let Some(c) = self.clients.get_mut(client) {
            c.outstanding = if up {
                c.outstanding + 1
            } else {
                c.outstanding.saturating_sub(1)
            };
        }
    }

    /// A request whose reply goes to a waiting task.
    pub fn ask(&mut self, kind: RequestKind) -> Result<oneshot::Receiver<Result<Reply, ReplyError>>, String> {
        let (tx, rx) = oneshot::channel();
        self.request(kind, Pending::Oneshot(tx))?;
        Ok(rx)
    }

    pub fn handle(&mut self, msg: ToEndpoint) {
        match msg {
            ToEndpoint::Status(s) => self.on_status(s),
            ToEndpoint::Tokens(t) => self.on_tokens(t),
            ToEndpoint::Batch(b) => self.on_batch(b),
            ToEndpoint::Reply { id, result } => self.on_reply(id, result),
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
                if feed.phase == crate::feed::Phase::Live {
                    feed.advance(&s.head, pos);
                }
            }
        }
        self.status = Some(s);
    }

    fn on_tokens(&mut self, tokens: Vec<Token>) {
        for c in self.clients.values_mut() {
            let Some(who) = &c.who else { continue };
            if who.token.is_none() {
                continue;
            }
            match who.refreshed(&tokens) {
                Some(p) if p.covers(&c.kind) => c.who = Some(p),
                _ => c.outbox.close(CloseReason::Revoked),
            }
        }
        self.tokens = tokens;
    }

    fn on_reply(&mut self, id: u64, result: Result<Reply, ReplyError>) {
        let Some(p) = self.pending.remove(&id) else { return };
        self.count_outstanding(&p, false);
        match p {
            Pending::Oneshot(tx) => {
                let _ = tx.send(result);
            }
            Pending::WsVersions { client, label } => self.versions_reply(client, label, id, result),
            Pending::Feed { client, feed } => self.feed_reply(client, feed, id, result),
        }
    }

    pub fn shutdown_all(&mut self) {
        self.shutting_down = true;
        for c in self.clients.values() {
            c.outbox.close(CloseReason::Shutdown);
        }
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
