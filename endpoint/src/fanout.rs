//! Delivery: batches, gaps, history and version-map replies, and checkpoints, pushed to client outboxes.
//!
//! A batch is prepared once ([`PreparedBatch`]) and its shared bytes are queued for every subscriber whose
//! token may receive each row. Version deltas go to labels whose snapshot was delivered (a snapshot still
//! outstanding already includes them). Feeds get history replies and, once live, batch rows (see `feed.rs`).
//! When rows were left out (a gap in the worker channel, or a batch with `rows_omitted`), every live feed
//! goes back to the history from its own cursor; after a gap, version subscriptions fetch their map again.

use std::collections::BTreeSet;

use crate::api::{Batch, Reply, ReplyError, ReplyErrorKind, RequestKind, MAX_HISTORY_ROWS};
use crate::auth::Principal;
use crate::batch::PreparedBatch;
use crate::config::Config;
use crate::feed::{Feed, Phase};
use crate::hub::{ClientId, Hub, Kind, PollOutcome, VState};
use crate::messages;
use crate::metrics::bump;
use crate::outbox::{Out, Outbox};
use crate::requests::Waiting;

/// Byte budget of one history page for a streaming feed: a quarter of the client's queue, 16 KiB to 1 MiB.
pub(crate) fn page_bytes(cfg: &Config) -> usize {
    (cfg.client_buffer / 4).clamp(16 << 10, 1 << 20)
}

impl Hub {
    pub(crate) fn on_batch(&mut self, batch: Batch) {
        self.advance_head(&batch.head);
        let omitted = batch.rows_omitted;
        if self.clients.values().any(|c| !matches!(c.kind, Kind::Plain)) {
            let batch = PreparedBatch::new(batch);
            let client_buffer = self.cfg.client_buffer;
            for c in self.clients.values_mut() {
                let outbox = &c.outbox;
                let Some(who) = &c.who else { continue };
                let allow = |r: &crate::api::ChangeRow| who.may_receive(r);
                match &mut c.kind {
                    Kind::Plain => {}
                    Kind::Ws(ws) => {
                        for (label, delta) in &batch.deltas {
                            if ws.versions.get(label) == Some(&VState::Live) {
                                outbox.data(delta.clone());
                            }
                        }
                        if !omitted {
                            for feed in ws.feeds.values_mut() {
                                feed.live_rows(&batch, allow, |r| {
                                    outbox.data(r.json.clone());
                                    true
                                });
                            }
                        }
                    }
                    Kind::Sse(feed) if !omitted => feed.live_rows(&batch, allow, |r| {
                        outbox.data(r.sse());
                        true
                    }),
                    Kind::Sse(_) => {}
                    Kind::LongPoll(lp) if !omitted => {
                        if lp.done.is_none() {
                            continue;
                        }
                        let (max, max_bytes) = (lp.max as usize, lp.max_bytes.min(client_buffer));
                        let mut rows = Vec::new();
                        let mut bytes = 0;
                        let mut last = None;
                        lp.feed.live_rows(&batch, allow, |r| {
                            if rows.len() == max || (!rows.is_empty() && bytes + r.json.len() > max_bytes) {
                                return false;
                            }
                            bytes += r.json.len();
                            rows.push(r.json.clone());
                            last = Some(r.row.cursor.clone());
                            true
                        });
                        // The answer's cursor is the last row's (the feed itself may have moved on to the head).
                        let Some(cursor) = last else { continue };
                        let cursor = Some(cursor);
                        if let Some(done) = lp.done.take() {
                            let _ = done.send(PollOutcome::Rows { rows, cursor });
                        }
                    }
                    Kind::LongPoll(_) => {}
                }
            }
        }
        if omitted {
            self.on_gap("", None);
        }
    }

    /// Rows were left out up to `head`: live feeds catch up from their cursors; version subscriptions of
    /// `labels` (`None`: none, the versions were delivered) fetch their maps again.
    pub(crate) fn on_gap(&mut self, head: &str, labels: Option<&BTreeSet<String>>) {
        if !head.is_empty() {
            self.advance_head(head);
        }
        let mut feeds: Vec<(ClientId, u64, RequestKind)> = Vec::new();
        let mut maps: Vec<(ClientId, String)> = Vec::new();
        let cfg = self.cfg.clone();
        for (&id, c) in self.clients.iter_mut() {
            let Some(who) = &c.who else { continue };
            match &mut c.kind {
                Kind::Plain => {}
                Kind::Ws(ws) => {
                    for (&fid, feed) in ws.feeds.iter_mut() {
                        if let Some(since) = feed.catch_up() {
                            feeds.push((
                                id,
                                fid,
                                history_request(feed, since, who, MAX_HISTORY_ROWS, page_bytes(&cfg)),
                            ));
                        }
                    }
                    if let Some(labels) = labels {
                        for (label, state) in ws.versions.iter() {
                            if *state == VState::Live && labels.contains(label) {
                                maps.push((id, label.clone()));
                            }
                        }
                    }
                }
                Kind::Sse(feed) => {
                    if let Some(since) = feed.catch_up() {
                        feeds.push((
                            id,
                            0,
                            history_request(feed, since, who, MAX_HISTORY_ROWS, page_bytes(&cfg)),
                        ));
                    }
                }
                Kind::LongPoll(lp) => {
                    if lp.done.is_some() {
                        if let Some(since) = lp.feed.catch_up() {
                            feeds.push((id, 0, history_request(&lp.feed, since, who, lp.max, lp.max_bytes)));
                        }
                    }
                }
            }
        }
        bump(&self.metrics.catch_ups, feeds.len() as u64);
        bump(&self.metrics.version_refetches, maps.len() as u64);
        for (client, feed, kind) in feeds {
            let bucket = self.bucket_of(client);
            match self.request(kind, Waiting::Feed { client, feed }, bucket) {
                Ok(rid) => self.set_phase(client, feed, Phase::History(rid)),
                Err(m) => self.fail_feed(client, feed, &internal(m)),
            }
        }
        for (client, label) in maps {
            self.ask_version_map(client, &label);
        }
    }

    /// Asks for a WebSocket client's version map of `label` (again); deltas wait for it.
    pub(crate) fn ask_version_map(&mut self, client: ClientId, label: &str) {
        let bucket = self.bucket_of(client);
        let waiting = Waiting::WsVersions {
            client,
            label: label.to_string(),
        };
        let kind = RequestKind::VersionMap {
            label: label.to_string(),
        };
        match self.request(kind, waiting, bucket) {
            Ok(rid) => {
                if let Some(Kind::Ws(ws)) = self.clients.get_mut(&client).map(|c| &mut c.kind) {
                    ws.versions.insert(label.to_string(), VState::Pending(rid));
                }
            }
            Err(m) => {
                if let Some(c) = self.clients.get_mut(&client) {
                    if let Kind::Ws(ws) = &mut c.kind {
                        ws.versions.remove(label);
                    }
                    c.outbox.data(messages::error("internal", &m, Some(label)).into());
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
                if c.outbox.offer_bulk(json.into()) {
                    ws.versions.insert(label, VState::Live);
                } else {
                    ws.versions.insert(label, VState::Refetch);
                    c.outbox.want_resume();
                }
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
        let page = page_bytes(&self.cfg);
        let Some(c) = self.clients.get_mut(&client) else { return };
        let outbox = c.outbox.clone();
        let Some(who) = c.who.clone() else { return };
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
            other => return self.fail_feed(client, feed_id, &reply_error(other)),
        };
        let step = feed.take_history(
            rows,
            &head,
            more,
            |r| who.may_receive(r),
            |row| {
                let json = messages::change(row);
                let text = if sse {
                    messages::sse_event(Some(&row.cursor), "change", &json)
                } else {
                    json
                };
                outbox.offer_bulk(text.into())
            },
        );
        if step.stalled {
            return outbox.want_resume();
        }
        if let Some(since) = step.next {
            if !outbox.has_room_for(page) {
                feed.phase = Phase::Paused;
                feed.resume_from = Some(since);
                return outbox.want_resume();
            }
            let kind = history_request(feed, since, &who, MAX_HISTORY_ROWS, page);
            let bucket = self.bucket_of(client);
            match self.request(kind, Waiting::Feed { client, feed: feed_id }, bucket) {
                Ok(next) => self.set_phase(client, feed_id, Phase::History(next)),
                Err(m) => self.fail_feed(client, feed_id, &internal(m)),
            }
        }
    }

    /// A client's queue drained: paused feeds read their next page of history, refused version maps are
    /// fetched again.
    pub(crate) fn resume(&mut self, client: ClientId) {
        let page = page_bytes(&self.cfg);
        let Some(c) = self.clients.get_mut(&client) else { return };
        let Some(who) = c.who.clone() else { return };
        let take = |f: &mut Feed| -> Option<RequestKind> {
            if f.phase != Phase::Paused {
                return None;
            }
            let since = f.resume_from.take()?;
            Some(history_request(f, since, &who, MAX_HISTORY_ROWS, page))
        };
        let (paused, maps): (Vec<(u64, RequestKind)>, Vec<String>) = match &mut c.kind {
            Kind::Ws(ws) => (
                ws.feeds
                    .iter_mut()
                    .filter_map(|(id, f)| Some((*id, take(f)?)))
                    .collect(),
                ws.versions
                    .iter()
                    .filter(|(_, s)| **s == VState::Refetch)
                    .map(|(l, _)| l.clone())
                    .collect(),
            ),
            Kind::Sse(f) => (take(f).map(|k| (0, k)).into_iter().collect(), Vec::new()),
            _ => return,
        };
        let bucket = self.bucket_of(client);
        for (feed, kind) in paused {
            match self.request(kind, Waiting::Feed { client, feed }, bucket) {
                Ok(id) => self.set_phase(client, feed, Phase::History(id)),
                Err(m) => self.fail_feed(client, feed, &internal(m)),
            }
        }
        for label in maps {
            self.ask_version_map(client, &label);
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

    /// Tells a feed's client that its history could not be read: resync or error; a WebSocket feed is
    /// dropped, an SSE stream ends, a long-poll answers with the error.
    pub(crate) fn fail_feed(&mut self, client: ClientId, feed_id: u64, e: &ReplyError) {
        let Some(c) = self.clients.get_mut(&client) else { return };
        match &mut c.kind {
            Kind::Ws(ws) => {
                let labels = ws.feeds.remove(&feed_id).map(|f| f.labels).unwrap_or_default();
                feed_failed(&c.outbox, false, &labels, e);
            }
            Kind::Sse(_) => feed_failed(&c.outbox, true, &[], e),
            Kind::LongPoll(lp) => {
                if let Some(done) = lp.done.take() {
                    let _ = done.send(PollOutcome::Failed(e.clone()));
                }
            }
            Kind::Plain => {}
        }
    }
}

/// A history request continuing a feed from `since`, read as the client's role, bounded in rows and bytes.
pub(crate) fn history_request(feed: &Feed, since: String, who: &Principal, max: u32, max_bytes: usize) -> RequestKind {
    RequestKind::History {
        since,
        labels: feed.labels.clone(),
        max: max.clamp(1, MAX_HISTORY_ROWS),
        filter: feed.filter_text.clone(),
        max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
        role: who.role,
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
        ReplyErrorKind::Gap => ("history_gap", true),
        ReplyErrorKind::Diverged => ("timeline_diverged", true),
        ReplyErrorKind::UnknownLabel => ("unknown_label", false),
        ReplyErrorKind::NoHistory => ("no_history", false),
        ReplyErrorKind::Internal => ("internal", false),
    }
}
