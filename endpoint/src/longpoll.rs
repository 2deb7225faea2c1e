//! `GET /changes`: long-poll.
//!
//! With `since`, the history after it is asked for first (up to `max` rows); rows return at once. Without
//! rows, or without `since` (from now), the request waits up to `wait` for a batch with matching rows. The
//! answer is `{"changes":[..],"cursor":..}`: the cursor after the last row, or when there are none, the point
//! the request covered (never before `since`), so polling again from it misses nothing.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use tungstenite::Utf8Bytes;

use crate::api::{Reply, ReplyError};
use crate::conn::{bad_request, closed_response, reply, reply_error_response, unavailable, Ctx};
use crate::fanout::{history_request, internal, reply_error};
use crate::feed::Phase;
use crate::http::{Head, Response};
use crate::hub::{ClientId, Hub, Kind, Pending, PollOutcome};
use crate::messages;
use crate::params::{parse_max, parse_wait};
use crate::sse::feed_request;

const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const DEFAULT_MAX: u32 = 1000;
/// How long a poll waits for its history reply, whatever its `wait`.
const HISTORY_GRACE: Duration = Duration::from_secs(10);

pub(crate) async fn serve(mut stream: TcpStream, head: Head, ctx: Ctx) {
    // `None`: the hub closed the client (token revoked, shutdown).
    let response = match poll(&head, &ctx).await {
        Some(r) => r,
        None => closed_response(&ctx),
    };
    reply(&mut stream, &ctx, response).await;
}

async fn poll(head: &Head, ctx: &Ctx) -> Option<Response> {
    let req = match feed_request(head, ctx, false) {
        Ok(r) => r,
        Err(r) => return Some(r),
    };
    let wait = req.query.get("wait").map(parse_wait).transpose();
    let max = req.query.get("max").map(parse_max).transpose();
    let (wait, max) = match (wait, max) {
        (Ok(w), Ok(m)) => (w.unwrap_or(DEFAULT_WAIT), m.unwrap_or(DEFAULT_MAX)),
        (Err(m), _) | (_, Err(m)) => return Some(bad_request(&m)),
    };
    let start = Instant::now();
    let deadline = start + wait;
    let started = ctx.shared.hub.borrow_mut().start_feed(
        ctx.id,
        &req.who,
        (req.labels, req.filter),
        req.since,
        Some((max, deadline)),
    );
    let mut rx = match started {
        Ok(Some(rx)) => rx,
        Ok(None) => return None,
        Err(m) => return Some(unavailable(&m)),
    };
    let mut timer = deadline;
    let outcome = loop {
        tokio::select! {
            biased;
            _ = ctx.outbox.closed() => return None,
            o = &mut rx => match o {
                Ok(o) => break o,
                Err(_) => return Some(unavailable("the long-poll was abandoned")),
            },
            _ = sleep_until(timer) => {
                let force = Instant::now() >= start + HISTORY_GRACE.max(wait);
                match ctx.shared.hub.borrow_mut().poll_expire(ctx.id, force) {
                    Expiry::Finished(cursor) => break PollOutcome::Rows { rows: Vec::new(), cursor },
                    Expiry::InHistory => timer = start + HISTORY_GRACE.max(wait),
                    Expiry::AlreadySent => timer = Instant::now() + Duration::from_secs(1),
                }
            }
        }
    };
    Some(match outcome {
        PollOutcome::Rows { rows, cursor } => Response::json(
            200,
            messages::changes_body(rows.iter().map(|r| r.as_str()), cursor.as_deref()),
        )
        .header("Cache-Control", "no-cache"),
        PollOutcome::Failed(e) => reply_error_response(&e),
    })
}

/// What a long-poll's timer finds.
pub(crate) enum Expiry {
    /// Its history is still outstanding: wait a little longer.
    InHistory,
    /// Ended now, without rows, covered up to this cursor.
    Finished(Option<String>),
    /// Its outcome was already sent.
    AlreadySent,
}

impl Hub {
    /// A long-poll's wait is over: end it without rows unless its history is still outstanding (and not
    /// `force`d) or its outcome was sent already.
    pub(crate) fn poll_expire(&mut self, id: ClientId, force: bool) -> Expiry {
        let Some(Kind::LongPoll(lp)) = self.clients.get_mut(&id).map(|c| &mut c.kind) else {
            return Expiry::AlreadySent;
        };
        if lp.done.is_none() {
            return Expiry::AlreadySent;
        }
        if matches!(lp.feed.phase, Phase::History(_)) && !force {
            return Expiry::InHistory;
        }
        lp.done = None;
        Expiry::Finished(lp.feed.cursor.clone())
    }

    /// A history reply for a long-poll: rows end it at once; none leave it waiting for a batch (or end it if
    /// its wait is already over).
    pub(crate) fn poll_reply(&mut self, client: ClientId, id: u64, result: Result<Reply, ReplyError>) {
        let Some(Kind::LongPoll(lp)) = self.clients.get_mut(&client).map(|c| &mut c.kind) else {
            return;
        };
        if lp.feed.phase != Phase::History(id) || lp.done.is_none() {
            return;
        }
        let outcome = match result {
            Ok(Reply::History { rows, head, more }) => {
                let step = lp.feed.take_history(rows, &head, more);
                if step.deliver.is_empty() {
                    if let Some(since) = step.next {
                        let kind = history_request(&lp.feed, since, lp.max);
                        match self.request(kind, Pending::Feed { client, feed: 0 }) {
                            Ok(next) => return self.set_phase(client, 0, Phase::History(next)),
                            Err(m) => PollOutcome::Failed(internal(m)),
                        }
                    } else if tokio::time::Instant::now() < lp.deadline {
                        return; // live now: wait for a batch
                    } else {
                        PollOutcome::Rows {
                            rows: Vec::new(),
                            cursor: lp.feed.cursor.clone(),
                        }
                    }
                } else {
                    let rows = step
                        .deliver
                        .iter()
                        .map(|r| Utf8Bytes::from(messages::change(r)))
                        .collect();
                    PollOutcome::Rows {
                        rows,
                        cursor: lp.feed.cursor.clone(),
                    }
                }
            }
            other => PollOutcome::Failed(reply_error(other)),
        };
        let Some(Kind::LongPoll(lp)) = self.clients.get_mut(&client).map(|c| &mut c.kind) else {
            return;
        };
        if let Some(done) = lp.done.take() {
            let _ = done.send(outcome);
        }
    }
}
