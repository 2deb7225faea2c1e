//! `GET /events`: Server-Sent Events.
//!
//! Each change is `id: <cursor>` / `event: change` / `data: <change object>`; idle streams get
//! `event: checkpoint` with the cursor as id, so a browser's `Last-Event-ID` always resumes at the right place.
//! An expired or foreign cursor gets `event: resync` and the stream ends.

use changerelay_core::filter::Filter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::Principal;
use crate::batch::Pos;
use crate::conn::{authorize, bad_request, reply, unavailable, Ctx};
use crate::http::{self, Head, Response};
use crate::outbox::Out;
use crate::params::{parse_filter_text, parse_labels, parse_since, resolve_labels, LabelRefusal, Query};

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

pub(crate) async fn serve(mut stream: TcpStream, head: Head, ctx: Ctx) {
    let req = match feed_request(&head, &ctx, true) {
        Ok(r) => r,
        Err(r) => return reply(&mut stream, &ctx, r).await,
    };
    let started = ctx
        .shared
        .hub
        .borrow_mut()
        .start_feed(ctx.id, &req.who, (req.labels, req.filter), req.since, None);
    if let Err(m) = started {
        return reply(&mut stream, &ctx, unavailable(&m)).await;
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 2000\n\n";
    if !http::write_all(&mut stream, head.as_bytes()).await {
        return;
    }
    let (mut rd, mut wr) = stream.split();
    let mut sink = [0u8; 1024];
    'stream: loop {
        tokio::select! {
            biased;
            _ = ctx.outbox.closed() => break,
            _ = ctx.outbox.ready() => {
                while let Some(item) = ctx.outbox.pop() {
                    let Out::Data(text) = item else { break 'stream };
                    tokio::select! {
                        biased;
                        _ = ctx.outbox.closed() => break 'stream,
                        w = wr.write_all(text.as_bytes()) => if w.is_err() { break 'stream },
                    }
                    ctx.shared.metrics.sent(text.len());
                }
                if ctx.outbox.take_resume() {
                    ctx.shared.hub.borrow_mut().resume(ctx.id);
                }
            }
            // The client sends nothing; end when it goes away.
            n = rd.read(&mut sink) => if !matches!(n, Ok(n) if n > 0) { break },
        }
    }
    http::finish(&mut stream, std::time::Duration::from_millis(200)).await;
}
