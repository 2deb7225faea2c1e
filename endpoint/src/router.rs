//! One HTTP request: method and path to its handler, after the `Host` (and for feeds `Origin`) checks.

use std::convert::Infallible;

use hyper::body::Incoming;
use hyper::{Method, Request};

use crate::origin::{check_host, check_origin};
use crate::request::{Ctx, Head};
use crate::response::{HttpResponse, Response};
use crate::{dashboard, longpoll, routes, sse, ws};

/// The hyper service: every request of a connection comes here.
pub(crate) async fn handle(mut req: Request<Incoming>, ctx: Ctx) -> Result<HttpResponse, Infallible> {
    let head = Head {
        path: req.uri().path().to_string(),
        query: req.uri().query().unwrap_or("").to_string(),
        headers: std::mem::take(req.headers_mut()),
    };
    let response = route(&mut req, head, &ctx).await;
    Ok(response)
}

async fn route(req: &mut Request<Incoming>, head: Head, ctx: &Ctx) -> HttpResponse {
    let whole = |r: Response| {
        ctx.shared.metrics.sent(r.body.len());
        r.into_http()
    };
    if req.method() != Method::GET {
        return whole(Response::error(405, "method_not_allowed", "only GET is supported").header("allow", "GET"));
    }
    if head.path == "/health" || head.path == "/health-check" {
        return whole(routes::health(ctx));
    }
    if let Err(r) = check_host(&head, ctx) {
        return whole(r);
    }
    let feed =
        matches!(head.path.as_str(), "/ws" | "/events" | "/changes" | "/status") || head.path.starts_with("/versions/");
    if feed {
        if let Err(r) = check_origin(&head, ctx) {
            return whole(r);
        }
    }
    match head.path.as_str() {
        "/metrics" => whole(routes::metrics(ctx)),
        "/status" => whole(routes::status(&head, ctx)),
        "/debug/panic" if ctx.shared.cfg.debug_panic_path => {
            panic!("changerelay endpoint: GET /debug/panic (debug_panic_path is set)")
        }
        "/ws" => match ws::serve(req, head, ctx) {
            Ok(upgrade) => upgrade,
            Err(r) => whole(r),
        },
        "/events" => match sse::serve(head, ctx) {
            Ok(stream) => stream,
            Err(r) => whole(r),
        },
        "/changes" => whole(longpoll::serve(&head, ctx).await),
        p if p.starts_with("/versions/") => whole(routes::versions(&head, ctx).await),
        p => match dashboard::asset(p) {
            Some((content_type, body)) => whole(dashboard::serve(&head, ctx, content_type, body)),
            None => whole(Response::error(404, "not_found", "no such endpoint")),
        },
    }
}
