//! The one-shot endpoints: `/health` (and `/health-check`), `/metrics` and `/versions/{label}`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::api::{Reply, RequestKind};
use crate::conn::{authorize, reply_error_response, unavailable, Ctx};
use crate::http::{Head, Response};
use crate::params::{percent_decode, valid_label};

/// How long a one-shot request waits for the worker's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn health(ctx: &Ctx) -> Response {
    let hub = ctx.shared.hub.borrow();
    let clients = hub.clients.len();
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
    Response::json(code, body.to_string()).header("Cache-Control", "no-cache")
}

pub(crate) fn metrics(ctx: &Ctx) -> Response {
    let hub = ctx.shared.hub.borrow();
    Response {
        status: 200,
        headers: vec![("Content-Type", "text/plain; version=0.0.4; charset=utf-8".into())],
        body: ctx.shared.metrics.render(hub.clients.len(), hub.status.as_ref()),
    }
}

/// `GET /versions/{label}`; `None` when the client is being closed (revoked, shutdown).
pub(crate) async fn versions(head: &Head, ctx: &Ctx) -> Option<Response> {
    let (_, who) = match authorize(head, ctx) {
        Ok(x) => x,
        Err(r) => return Some(r),
    };
    let label = percent_decode(head.path.trim_start_matches("/versions/")).unwrap_or_default();
    if !valid_label(&label) {
        return Some(Response::error(404, "unknown_label", "no such label"));
    }
    if !who.allows(&label) {
        return Some(Response::error(
            403,
            "forbidden",
            &format!("this token may not read label {label:?}"),
        ));
    }
    let rx = {
        let mut hub = ctx.shared.hub.borrow_mut();
        if hub.known_labels().is_some_and(|k| !k.contains(&label)) {
            return Some(Response::error(
                404,
                "unknown_label",
                &format!("unknown label {label:?}"),
            ));
        }
        match hub.ask(RequestKind::VersionMap { label }) {
            Ok(rx) => rx,
            Err(m) => return Some(unavailable(&m)),
        }
    };
    let answer = tokio::select! {
        biased;
        _ = ctx.outbox.closed() => return None,
        a = tokio::time::timeout(REPLY_TIMEOUT, rx) => a,
    };
    let json = match answer {
        Ok(Ok(Ok(Reply::VersionMap { json }))) => json,
        Ok(Ok(Ok(_))) => {
            return Some(Response::error(
                500,
                "internal",
                "the relay worker answered the wrong question",
            ))
        }
        Ok(Ok(Err(e))) => return Some(reply_error_response(&e)),
        Ok(Err(_)) | Err(_) => return Some(unavailable("the relay worker did not answer in time")),
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
        Response {
            status: 304,
            headers: Vec::new(),
            body: String::new(),
        }
    } else {
        Response::json(200, json)
    };
    r = r.header("Cache-Control", "no-cache");
    if let Some(tag) = etag {
        r = r.header("ETag", tag);
    }
    Some(r)
}
