//! Delivery: batches, history and version-map replies, and checkpoints, pushed to client outboxes.
//!
//! A batch is prepared once ([`PreparedBatch`]) and its shared bytes are queued for every subscriber. Version
//! deltas go to labels whose snapshot was delivered (a snapshot still outstanding already includes them).
//! Feeds get history replies and, once live, batch rows (see `feed.rs`).

use crate::api::{Batch, Reply, ReplyError, ReplyErrorKind, RequestKind};
use crate::batch::PreparedBatch;
use crate::feed::{Feed, Phase};
use crate::hub::{ClientId, Hub, Kind, Pending, PollOutcome, VState};
use crate::messages;
use crate::outbox::{Out, Outbox};

/// Rows asked for per history request of a streaming feed.
pub(crate) const HISTORY_CHUNK: u32 = 1000;

impl Hub {
    pub(crate) fn on_batch(&mut self, batch: Batch) {
        self.advance_head(&batch.head);
        if self.clients.values().all(|c| matches!(c.kind, Kind::Plain)) {
            return; // nobody to serialise for
        }
        let batch = PreparedBatch::new(batch);
        for c in self.clients.values_mut() {
            let outbox = &c.outbox;
            match &mut c.kind {
                Kind::Plain => {}
                Kind::Ws(ws) => {
                    for (label, delta) in &batch.deltas {
                        if ws.versions.get(label) == Some(&VState::Live) {
                            outbox.data(delta.clone());
                        }
                    }
                    for feed in ws.feeds.values_mut() {
                        for r in feed.live_rows(&batch, usize::MAX) {
                            outbox.data(r.json.clone());
                        }
                    }
                }
                Kind::Sse(feed) => {
                    for r in feed.live_rows(&batch, usize::MAX) {
                        outbox.data(r.sse());
                    }
                }
                Kind::LongPoll(lp) => {
                    if lp.done.is_none() {
                        continue;
                    }
                    let rows = lp.feed.live_rows(&batch, lp.max as usize);
                    // The answer's cursor is the last row's (the feed itself may have moved on to the head).
                    let Some(last) = rows.last().map(|r| r.row.cursor.clone()) else {
                        continue;
                    };
                    let rows = rows.into_iter().map(|r| r.json.clone()).collect();
                    if let Some(done) = lp.done.take() {
                        let _ = done.send(PollOutcome::Rows {
                            rows,
                            cursor: Some(last),
                        });
                    }
                }
            }
        }
    }

    /// Every `checkpoint_every`: idle live feeds get their cursor, so clients can store progress.
    pub(crate) fn checkpoint_tick(&mut self) {
        for c in self.clients.values_mut() {
            let sse = matches!(c.kind, Kind::Sse(_));
            let feeds: Vec<&mut Feed> = match &mut c.kind {
                Kind::Ws(ws) => ws.feeds.values_mut().collect(),
                Kind::Sse(f) => vec![f],
                _ => continue,
            };
            for feed in feeds {
                let busy = std::mem::take(&mut feed.busy);
                let (Phase::Live, false, Some(cursor)) = (feed.phase, busy, &feed.cursor) else {
                    continue;
                };
                let json = messages::checkpoint(cursor);
                let text = if sse {
                    messages::sse_event(Some(cursor), "checkpoint", &json)
                } else {
                    json
                };
                c.outbox.data(text.into());
            }
        }
    }

    pub(crate) fn versions_reply(
        &mut self,
        client: ClientId,
        label: String,
        id: u64,
        result: Result<Reply, ReplyError>,
    ) {
        let Some(c) = self.clients.get_mut(&client) else { return };
        let Kind::Ws(ws) = &mut c.kind else { return };
        if ws.versions.get(&label) != Some(&VState::Pending(id)) {
            return; // unsubscribed or subscribed again since
        }
        match result {
            Ok(Reply::VersionMap { json }) => {
                ws.versions.insert(label, VState::Live);
                c.outbox.data_bulk(json.into());
            }
            other => {
                ws.versions.remove(&label);
                let e = reply_error(other);
                let (code, _) = error_code(&e);
                c.outbox.data(messages::error(code, &e.message, Some(&label)).into());
            }
        }
    }

    pub(crate) fn feed_reply(&mut self, client: ClientId, feed_id: u64, id: u64, result: Result<Reply, ReplyError>) {
        let Some(c) = self.clients.get_mut(&client) else { return };
        let outbox = c.outbox.clone();
        let (feed, sse) = match &mut c.kind {
            Kind::Ws(ws) => match ws.feeds.get_mut(&feed_id) {
                Some(f) => (f, false),
                None => return,
            },
            Kind::Sse(f) => (f, true),
            Kind::LongPoll(_) => return self.poll_reply(client, id, result), // longpoll.rs
            Kind::Plain => return,
        };
        if feed.phase != Phase::History(id) {
            return;
        }
        let (rows, head, more) = match result {
            Ok(Reply::History { rows, head, more }) => (rows, head, more),
            other => {
                let e = reply_error(other);
                let labels = feed.labels.clone();
                if let Kind::Ws(ws) = &mut c.kind {
                    ws.feeds.remove(&feed_id);
                }
                return feed_failed(&outbox, sse, &labels, &e);
            }
        };
        let step = feed.take_history(rows, &head, more);
        for row in &step.deliver {
            let json = messages::change(row);
            outbox.data_bulk(
                if sse {
                    messages::sse_event(Some(&row.cursor), "change", &json)
                } else {
                    json
                }
                .into(),
            );
        }
        if let Some(since) = step.next {
            if outbox.filling() {
                feed.phase = Phase::Paused;
                feed.resume_from = Some(since);
                return outbox.want_resume();
            }
            let kind = history_request(feed, since, HISTORY_CHUNK);
            match self.request(kind, Pending::Feed { client, feed: feed_id }) {
                Ok(next) => self.set_phase(client, feed_id, Phase::History(next)),
                Err(m) => feed_failed(&outbox, sse, &[], &internal(m)),
            }
        }
    }

    /// A client's queue drained: paused feeds read their next page of history.
    pub(crate) fn resume(&mut self, client: ClientId) {
        let Some(c) = self.clients.get_mut(&client) else { return };
        let outbox = c.outbox.clone();
        let (paused, sse): (Vec<(u64, RequestKind)>, bool) = match &mut c.kind {
            Kind::Ws(ws) => (
                ws.feeds
                    .iter_mut()
                    .filter_map(|(id, f)| Some((*id, take_paused(f)?)))
                    .collect(),
                false,
            ),
            Kind::Sse(f) => (take_paused(f).map(|k| (0, k)).into_iter().collect(), true),
            _ => return,
        };
        for (feed, kind) in paused {
            match self.request(kind, Pending::Feed { client, feed }) {
                Ok(id) => self.set_phase(client, feed, Phase::History(id)),
                Err(m) => feed_failed(&outbox, sse, &[], &internal(m)),
            }
        }
    }

    pub(crate) fn set_phase(&mut self, client: ClientId, feed_id: u64, phase: Phase) {
        let Some(c) = self.clients.get_mut(&client) else { return };
        match &mut c.kind {
            Kind::Ws(ws) => {
                if let Some(f) = ws.feeds.get_mut(&feed_id) {
                    f.phase = phase;
                }
            }
            Kind::Sse(f) => f.phase = phase,
            Kind::LongPoll(lp) => lp.feed.phase = phase,
            Kind::Plain => {}
        }
    }
}

fn take_paused(f: &mut Feed) -> Option<RequestKind> {
    if f.phase != Phase::Paused {
        return None;
    }
    let since = f.resume_from.take()?;
    Some(history_request(f, since, HISTORY_CHUNK))
}

/// A history request continuing a feed from `since`.
pub(crate) fn history_request(feed: &Feed, since: String, max: u32) -> RequestKind {
    RequestKind::History {
        since,
        labels: feed.labels.clone(),
        max,
        filter: feed.filter_text.clone(),
    }
}

pub(crate) fn internal(message: String) -> ReplyError {
    ReplyError {
        kind: ReplyErrorKind::Internal,
        message,
    }
}

/// The error of a reply that is not the expected kind of success.
pub(crate) fn reply_error(r: Result<Reply, ReplyError>) -> ReplyError {
    match r {
        Err(e) => e,
        Ok(_) => internal("the relay worker answered with the wrong kind of reply".into()),
    }
}

/// Tells a feed's client that its history could not be read: resync or error; an SSE stream then ends.
fn feed_failed(outbox: &Outbox, sse: bool, labels: &[String], e: &ReplyError) {
    let (code, resync) = error_code(e);
    let json = match (resync, sse) {
        (true, true) => messages::resync(code, &e.message, None),
        (true, false) => messages::resync(code, &e.message, Some(labels)),
        (false, _) => messages::error(code, &e.message, None),
    };
    if sse {
        outbox.data(messages::sse_event(None, if resync { "resync" } else { "error" }, &json).into());
        outbox.push(Out::End);
    } else {
        outbox.data(json.into());
    }
}

/// The client-facing wording of a worker error: (WebSocket error code or resync reason, is it a resync).
pub(crate) fn error_code(e: &ReplyError) -> (&'static str, bool) {
    match e.kind {
        ReplyErrorKind::Malformed => ("bad_cursor", false),
        ReplyErrorKind::Foreign => ("cursor_foreign", true),
        ReplyErrorKind::Expired => ("cursor_expired", true),
        ReplyErrorKind::UnknownLabel => ("unknown_label", false),
        ReplyErrorKind::Internal => ("internal", false),
    }
}
