//! `GET /events`: Server-Sent Events, a streaming (chunked) hyper body.
//!
//! Each change is `id: <cursor>` / `event: change` / `data: <change object>`; idle streams get
//! `event: checkpoint` with the cursor as id, so a browser's `Last-Event-ID` always resumes at the right place.
//! An expired or foreign cursor gets `event: resync` and the stream ends. A task moves the client's outbox into
//! the body through a two-chunk channel, so a slow client holds its bytes in the outbox, where they count.

use bytes::Bytes;
use changerelay_core::filter::Filter;
use tokio::sync::mpsc;

use crate::auth::Principal;
use crate::batch::Pos;
use crate::outbox::Out;
use crate::params::{parse_filter_text, parse_labels, parse_since, resolve_labels, LabelRefusal, Query};
use crate::request::{authorize, bad_request, unavailable, Ctx, Head, Joined};
use crate::response::{event_stream, HttpResponse, Response};
use crate::shared::spawn;

/// A change-feed request (SSE or long-poll), checked.
pub(crate) struct FeedRequest {
    pub query: Query,
    pub who: Principal,
    pub labels: Vec<String>,
    pub filter: Option<(Filter, String)>,
    pub since: Option<(String, Pos)>,
}

/// Checks `labels`, `since` (or `Last-Event-ID`), `filter` and the token: the request or its refusal.
pub(crate) fn feed_request(head: &Head, ctx: &Ctx, last_event_id: bool) -> Result<FeedRequest, Response> {
    let (query, who) = authorize(head, ctx)?;
    if !who.rows {
        return Err(Response::error(
            403,
            "forbidden",
            "this token may read versions only, not changes",
        ));
    }
    let requested = query
        .get("labels")
        .map(parse_labels)
        .transpose()
        .map_err(|m| bad_request(&m))?;
    let labels = {
        let hub = ctx.shared.hub.borrow();
        resolve_labels(requested, &who, hub.known_labels())
    };
    let labels = match labels {
        Ok(l) => l,
        Err(LabelRefusal::Forbidden(l)) => {
            return Err(Response::error(
                403,
                "forbidden",
                &format!("this token may not read label {l:?}"),
            ))
        }
        Err(LabelRefusal::Unknown(l)) => {
            return Err(Response::error(404, "unknown_label", &format!("unknown label {l:?}")))
        }
    };
    let header_id = head.header("last-event-id").filter(|v| last_event_id && !v.is_empty());
    let since = match header_id.or(query.get("since").filter(|s| !s.is_empty())) {
        Some(s) => Some(parse_since(s).map_err(|m| bad_request(&m))?),
        None => None,
    };
    let filter = query
        .get("filter")
        .map(parse_filter_text)
        .transpose()
        .map_err(|m| bad_request(&m))?;
    Ok(FeedRequest {
        query,
        who,
        labels,
        filter,
        since,
    })
}

pub(crate) fn serve(head: Head, ctx: &Ctx) -> Result<HttpResponse, Response> {
    let req = feed_request(&head, ctx, true)?;
    let joined = Joined::new(ctx, &req.who);
    let started =
        ctx.shared
            .hub
            .borrow_mut()
            .start_feed(joined.id, &req.who, (req.labels, req.filter), req.since, None);
    if let Err(m) = started {
        return Err(unavailable(&m));
    }
    let (tx, rx) = mpsc::channel(2);
    spawn(&ctx.shared, pump(tx, joined, ctx.clone()));
    Ok(event_stream(rx))
}

/// Moves the outbox into the response body until the stream ends, the client goes or the hub closes it.
async fn pump(tx: mpsc::Sender<Bytes>, joined: Joined, ctx: Ctx) {
    let outbox = &joined.outbox;
    if tx.send(Bytes::from_static(b"retry: 2000\n\n")).await.is_err() {
        return;
    }
    'stream: loop {
        tokio::select! {
            biased;
            _ = outbox.closed() => break,
            _ = tx.closed() => break,
            _ = outbox.ready() => {
                while let Some(item) = outbox.pop() {
                    let Out::Data(text) = item else { break 'stream };
                    let len = text.len();
                    tokio::select! {
                        biased;
                        _ = outbox.closed() => break 'stream,
                        sent = tx.send(Bytes::from(text)) => if sent.is_err() { break 'stream },
                    }
                    ctx.shared.metrics.sent(len);
                }
                if outbox.take_resume() {
                    ctx.shared.hub.borrow_mut().resume(joined.id);
                }
            }
        }
    }
}
