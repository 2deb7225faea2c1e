//! One client connection: read the request head (within the header timeout), route it, and leave the hub
//! when done, whatever happened.

use std::rc::Rc;

use tokio::net::TcpStream;

use crate::api::{ReplyError, ReplyErrorKind};
use crate::auth::{self, Principal};
use crate::http::{self, Head, HeadError, Response};
use crate::hub::ClientId;
use crate::outbox::{CloseReason, Outbox};
use crate::params::Query;
use crate::server::Shared;
use crate::{longpoll, messages, routes, sse, ws};

/// A connection's membership of the hub; leaving it (on any return) removes the client.
struct Registered {
    id: ClientId,
    shared: Rc<Shared>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut hub) = self.shared.hub.try_borrow_mut() {
            hub.remove(self.id);
            if hub.clients.is_empty() {
                self.shared.idle.notify_one();
            }
        }
    }
}

/// What a connection task needs besides its socket.
pub(crate) struct Ctx {
    pub id: ClientId,
    pub outbox: Rc<Outbox>,
    pub shared: Rc<Shared>,
}

pub(crate) async fn serve(mut stream: TcpStream, id: ClientId, outbox: Rc<Outbox>, shared: Rc<Shared>) {
    let _registered = Registered {
        id,
        shared: shared.clone(),
    };
    let read = tokio::select! {
        biased;
        _ = outbox.closed() => return,
        head = http::read_head(&mut stream, shared.cfg.header_timeout) => head,
    };
    let ctx = Ctx { id, outbox, shared };
    let head = match read {
        Ok(head) => head,
        Err(HeadError::Timeout) => {
            let r = Response::error(408, "timeout", "the request head did not arrive in time");
            return reply(&mut stream, &ctx, r).await;
        }
        Err(HeadError::TooLarge) => {
            let r = Response::error(431, "too_large", "the request head is larger than 16 KiB");
            return reply(&mut stream, &ctx, r).await;
        }
        Err(HeadError::Bad(m)) => {
            return reply(&mut stream, &ctx, bad_request(&format!("malformed request: {m}"))).await
        }
        Err(HeadError::Closed) => return,
    };
    route(stream, head, ctx).await;
}

async fn route(mut stream: TcpStream, head: Head, ctx: Ctx) {
    if head.method != "GET" {
        let r = Response::error(405, "method_not_allowed", "only GET is supported").header("Allow", "GET");
        return reply(&mut stream, &ctx, r).await;
    }
    match head.path.as_str() {
        "/health" | "/health-check" => reply(&mut stream, &ctx, routes::health(&ctx)).await,
        "/metrics" => reply(&mut stream, &ctx, routes::metrics(&ctx)).await,
        "/ws" => ws::serve(stream, head, ctx).await,
        "/events" => sse::serve(stream, head, ctx).await,
        "/changes" => longpoll::serve(stream, head, ctx).await,
        p if p.starts_with("/versions/") => {
            let r = routes::versions(&head, &ctx)
                .await
                .unwrap_or_else(|| closed_response(&ctx));
            reply(&mut stream, &ctx, r).await;
        }
        _ => reply(&mut stream, &ctx, Response::error(404, "not_found", "no such endpoint")).await,
    }
}

/// Writes a response (counted) and closes the connection.
pub(crate) async fn reply(stream: &mut TcpStream, ctx: &Ctx, response: Response) {
    let len = response.body.len();
    if http::respond(stream, response).await {
        ctx.shared.metrics.sent(len);
    }
}

pub(crate) fn bad_request(message: &str) -> Response {
    Response::error(400, "bad_request", message)
}

/// The query and the authenticated client, or the response refusing the request (400 or 401).
pub(crate) fn authorize(head: &Head, ctx: &Ctx) -> Result<(Query, Principal), Response> {
    let query = Query::parse(&head.query).map_err(|m| bad_request(&m))?;
    let secret = auth::presented_secret(head, query.get("token"));
    let who = ctx.shared.hub.borrow().authenticate(secret.as_deref());
    match who {
        Some(who) => {
            ctx.shared.hub.borrow_mut().set_who(ctx.id, &who);
            Ok((query, who))
        }
        None => Err(Response::error(
            401,
            "unauthorized",
            "a valid token is required (Authorization: Bearer <token>)",
        )
        .header("WWW-Authenticate", "Bearer realm=\"changerelay\"")),
    }
}

/// The HTTP answer to a worker error.
pub(crate) fn reply_error_response(e: &ReplyError) -> Response {
    match e.kind {
        ReplyErrorKind::Malformed => bad_request(&e.message),
        ReplyErrorKind::Foreign => Response::json(410, messages::resync("cursor_foreign", &e.message, None)),
        ReplyErrorKind::Expired => Response::json(410, messages::resync("cursor_expired", &e.message, None)),
        ReplyErrorKind::UnknownLabel => Response::error(404, "unknown_label", &e.message),
        ReplyErrorKind::Internal => Response::error(500, "internal", &e.message),
    }
}

/// The answer to a request the hub closed while it waited: token revoked or shutdown.
pub(crate) fn closed_response(ctx: &Ctx) -> Response {
    match ctx.outbox.close_reason() {
        Some(CloseReason::Revoked) => Response::error(401, "unauthorized", "token revoked"),
        _ => unavailable("the server is shutting down"),
    }
}

/// 503 when the worker cannot be asked or does not answer.
pub(crate) fn unavailable(message: &str) -> Response {
    Response::error(503, "unavailable", message).header("Retry-After", "1")
}
