//! The one-shot endpoints: `/health` (and `/health-check`), `/metrics`, `/status` and `/versions/{label}`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::api::{Reply, RequestKind};
use crate::metrics::Gauges;
use crate::params::{percent_decode, valid_label};
use crate::request::{
    authorize, closed_response, reply_error_response, too_many_requests, unavailable, Ctx, Head, Joined,
};
use crate::requests::{Bucket, Waiting};
use crate::response::Response;

/// How long a one-shot request waits for the worker's answer (queueing included).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn health(ctx: &Ctx) -> Response {
    let hub = ctx.shared.hub.borrow();
    let clients = ctx.shared.admission.borrow().total;
    let (code, body) = match &hub.status {
        Some(s) => {
            let ok = s.consuming;
            let body = json!({"status": if ok { "ok" } else { "unavailable" }, "state": s.state, "consuming": s.consuming,
                "last_event_id": s.last_event_id, "lag_bytes": s.lag_bytes, "clients": clients});
            (if ok { 200 } else { 503 }, body)
        }
        None => (
            503,
            json!({"status": "unavailable", "state": "starting", "consuming": false, "last_event_id": 0, "lag_bytes": 0,
                "clients": clients}),
        ),
    };
    Response::json(code, body.to_string()).header("cache-control", "no-cache")
}

/// `GET /status`: what the dashboard shows, for a token: the worker's state and lag, the connections by kind,
/// the labels this token may read, and the endpoint's running totals (rates are the client's to derive).
pub(crate) fn status(head: &Head, ctx: &Ctx) -> Response {
    let (_, who) = match authorize(head, ctx) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let hub = ctx.shared.hub.borrow();
    let admission = ctx.shared.admission.borrow();
    let worker = match &hub.status {
        Some(s) => json!({"state": s.state, "consuming": s.consuming, "last_event_id": s.last_event_id,
            "lag_bytes": s.lag_bytes, "cursor": s.head}),
        None => json!({"state": "starting", "consuming": false, "last_event_id": 0, "lag_bytes": 0,
            "cursor": null}),
    };
    let kinds = hub.client_kinds();
    let labels: Vec<&String> = hub
        .known_labels()
        .unwrap_or_default()
        .iter()
        .filter(|l| who.allows(l))
        .collect();
    let totals = ctx.shared.metrics.totals();
    let body = json!({
        "worker": worker,
        "clients": {"connections": admission.total, "unauthenticated": admission.unauthenticated,
            "websocket": kinds.websocket, "sse": kinds.sse, "long_poll": kinds.long_poll,
            "worker_requests": hub.requests.in_flight() + hub.requests.queued()},
        "labels": labels,
        "totals": {"batches": totals.batches, "changes": totals.changes, "messages_sent": totals.messages_sent,
            "bytes_sent": totals.bytes_sent},
        "uptime_ms": u64::try_from(ctx.shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    });
    Response::json(200, body.to_string()).header("cache-control", "no-cache")
}

pub(crate) fn metrics(ctx: &Ctx) -> Response {
    let hub = ctx.shared.hub.borrow();
    let admission = ctx.shared.admission.borrow();
    let gauges = Gauges {
        connections: admission.total,
        unauthenticated: admission.unauthenticated,
        requests_in_flight: hub.requests.in_flight(),
        requests_queued: hub.requests.queued(),
        status: hub.status.as_ref(),
    };
    Response {
        status: 200,
        headers: vec![("content-type", "text/plain; version=0.0.4; charset=utf-8".into())],
        body: ctx.shared.metrics.render(&gauges),
    }
}

/// `GET /versions/{label}`.
pub(crate) async fn versions(head: &Head, ctx: &Ctx) -> Response {
    let (_, who) = match authorize(head, ctx) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let label = percent_decode(head.path.trim_start_matches("/versions/")).unwrap_or_default();
    if !valid_label(&label) {
        return Response::error(404, "unknown_label", "no such label");
    }
    if !who.allows(&label) {
        return Response::error(403, "forbidden", &format!("this token may not read label {label:?}"));
    }
    let joined = Joined::new(ctx, &who);
    let rx = {
        let mut hub = ctx.shared.hub.borrow_mut();
        if hub.known_labels().is_some_and(|k| !k.contains(&label)) {
            return Response::error(404, "unknown_label", &format!("unknown label {label:?}"));
        }
        let bucket = who.token_key().map_or(Bucket::Client(joined.id), Bucket::Token);
        if hub.requests.saturated(bucket) {
            drop(hub);
            return too_many_requests(ctx);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(m) = hub.request(RequestKind::VersionMap { label }, Waiting::Oneshot(tx), bucket) {
            return unavailable(&m);
        }
        rx
    };
    let answer = tokio::select! {
        biased;
        _ = joined.outbox.closed() => return closed_response(&joined.outbox),
        a = tokio::time::timeout(REPLY_TIMEOUT, rx) => a,
    };
    let json = match answer {
        Ok(Ok(Ok(Reply::VersionMap { json }))) => json,
        Ok(Ok(Ok(_))) => return Response::error(500, "internal", "the relay worker answered the wrong question"),
        Ok(Ok(Err(e))) => return reply_error_response(&e),
        Ok(Err(_)) | Err(_) => return unavailable("the relay worker did not answer in time"),
    };
    let etag = serde_json::from_str::<Value>(&json).ok().and_then(|v| {
        v.pointer("/data/all/v")
            .map(|v| format!("\"{}\"", v.as_str().map_or_else(|| v.to_string(), str::to_string)))
    });
    let matched = match (&etag, head.header("if-none-match")) {
        (Some(tag), Some(inm)) => inm
            .split(',')
            .map(|t| t.trim())
            .any(|t| t == "*" || t.trim_start_matches("W/") == tag),
        _ => false,
    };
    let mut r = if matched {
        Response::not_modified()
    } else {
        Response::json(200, json)
    };
    r = r.header("cache-control", "no-cache");
    if let Some(tag) = etag {
        r = r.header("etag", tag);
    }
    r
}
