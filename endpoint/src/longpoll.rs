//! `GET /changes`: long-poll.
//!
//! With `since`, the history after it is asked for first (up to `max` rows, at most 1000, and about
//! `client_buffer` bytes, at least one row); rows return at once. Without rows, or without `since` (from now),
//! the request waits up to `wait` for a batch with matching rows. The answer is `{"changes":[..],"cursor":..}`:
//! the cursor after the last row, or when there are none, the point the request covered (never before
//! `since`), so polling again from it misses nothing.

use std::time::Duration;

use tokio::time::{sleep_until, Instant};

use tungstenite::Utf8Bytes;

use crate::api::{Reply, ReplyError, MAX_HISTORY_ROWS};
use crate::fanout::{history_request, internal, reply_error};
use crate::feed::Phase;
use crate::hub::{ClientId, Hub, Kind, PollOutcome};
use crate::messages;
use crate::params::{parse_max, parse_wait};
use crate::request::{
    bad_request, closed_response, reply_error_response, too_many_requests, unavailable, Ctx, Head, Joined,
};
use crate::requests::{Bucket, Waiting};
use crate::response::Response;
use crate::sse::feed_request;

const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const DEFAULT_MAX: u32 = MAX_HISTORY_ROWS;
/// How long a poll waits for its history reply, whatever its `wait`.
const HISTORY_GRACE: Duration = Duration::from_secs(10);

pub(crate) async fn serve(head: &Head, ctx: &Ctx) -> Response {
    let req = match feed_request(head, ctx, false) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let wait = req.query.get("wait").map(parse_wait).transpose();
    let max = req.query.get("max").map(parse_max).transpose();
    let (wait, max) = match (wait, max) {
        (Ok(w), Ok(m)) => (
            w.unwrap_or(DEFAULT_WAIT),
            m.unwrap_or(DEFAULT_MAX).min(MAX_HISTORY_ROWS),
        ),
        (Err(m), _) | (_, Err(m)) => return bad_request(&m),
    };
    let joined = Joined::new(ctx, &req.who);
    let bucket = req.who.token_key().map_or(Bucket::Client(joined.id), Bucket::Token);
    if req.since.is_some() && ctx.shared.hub.borrow().requests.saturated(bucket) {
        return too_many_requests(ctx);
    }
    let start = Instant::now();
    let deadline = start + wait;
    let started = ctx.shared.hub.borrow_mut().start_feed(
        joined.id,
        &req.who,
        (req.labels, req.filter),
        req.since,
        Some((max, deadline)),
    );
    let mut rx = match started {
        Ok(Some(rx)) => rx,
        Ok(None) => return closed_response(&joined.outbox),
        Err(m) => return unavailable(&m),
    };
    let mut timer = deadline;
    let outcome = loop {
        tokio::select! {
            biased;
            _ = joined.outbox.closed() => return closed_response(&joined.outbox),
            o = &mut rx => match o {
                Ok(o) => break o,
                Err(_) => return unavailable("the long-poll was abandoned"),
            },
            _ = sleep_until(timer) => {
                let force = Instant::now() >= start + HISTORY_GRACE.max(wait);
                match ctx.shared.hub.borrow_mut().poll_expire(joined.id, force) {
                    Expiry::Finished(cursor) => break PollOutcome::Rows { rows: Vec::new(), cursor },
                    Expiry::InHistory => timer = start + HISTORY_GRACE.max(wait),
                    Expiry::AlreadySent => timer = Instant::now() + Duration::from_secs(1),
                }
            }
        }
    };
    match outcome {
        PollOutcome::Rows { rows, cursor } => Response::json(
            200,
            messages::changes_body(rows.iter().map(|r| r.as_str()), cursor.as_deref()),
        )
        .header("cache-control", "no-cache"),
        PollOutcome::Failed(e) => reply_error_response(&e),
    }
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
        let Some(Kind::LongPoll(lp)) = self.clients.get(&client).map(|c| &c.kind) else {
            return;
        };
        if lp.feed.phase != Phase::History(id) || lp.done.is_none() {
            return;
        }
        let who = self.clients.get(&client).and_then(|c| c.who.clone());
        let Some(Kind::LongPoll(lp)) = self.clients.get_mut(&client).map(|c| &mut c.kind) else {
            return;
        };
        let Some(who) = who else { return };
        let outcome = match result {
            Ok(Reply::History { rows, head, more }) => {
                // The answer is bounded: `max` rows and about `max_bytes`, at least one row.
                let (max, max_bytes) = (lp.max as usize, lp.max_bytes);
                let mut out: Vec<Utf8Bytes> = Vec::new();
                let mut bytes = 0;
                let step = lp.feed.take_history(
                    rows,
                    &head,
                    more,
                    |r| who.may_receive(r),
                    |r| {
                        let json = messages::change(r);
                        if out.len() == max || (!out.is_empty() && bytes + json.len() > max_bytes) {
                            return false;
                        }
                        bytes += json.len();
                        out.push(json.into());
                        true
                    },
                );
                if out.is_empty() {
                    if let Some(since) = step.next {
                        let kind = history_request(&lp.feed, since, &who, lp.max, lp.max_bytes);
                        let bucket = self.bucket_of(client);
                        match self.request(kind, Waiting::Feed { client, feed: 0 }, bucket) {
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
                    PollOutcome::Rows {
                        rows: out,
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
