//! What a request handler works with: the request head, the connection and the endpoint's shared state,
//! plus the checks and answers every handler shares (authorization, worker errors, joining the hub).

use std::rc::Rc;

use hyper::header::HeaderMap;

use crate::admission::ConnState;
use crate::api::{ReplyError, ReplyErrorKind};
use crate::auth::{self, Principal};
use crate::hub::ClientId;
use crate::messages;
use crate::outbox::{CloseReason, Outbox};
use crate::params::Query;
use crate::response::Response;
use crate::shared::Shared;

/// The parts of a request the handlers read.
pub(crate) struct Head {
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
    }

    /// Whether a comma-separated header (`Connection: keep-alive, Upgrade`) holds `token`, case-insensitively.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// One request's context.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub shared: Rc<Shared>,
    pub conn: Rc<ConnState>,
}

/// A client of the hub for as long as this lives (a subscription, or a request waiting for the worker).
pub(crate) struct Joined {
    pub id: ClientId,
    pub outbox: Rc<Outbox>,
    shared: Rc<Shared>,
}

impl Joined {
    pub fn new(ctx: &Ctx, who: &Principal) -> Joined {
        let (id, outbox) = ctx.shared.hub.borrow_mut().join(who);
        Joined {
            id,
            outbox,
            shared: ctx.shared.clone(),
        }
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if let Ok(mut hub) = self.shared.hub.try_borrow_mut() {
            hub.remove(self.id);
        }
    }
}

pub(crate) fn bad_request(message: &str) -> Response {
    Response::error(400, "bad_request", message)
}

/// The query and the authenticated client, or the response refusing the request (400 or 401). Success
/// marks the connection authenticated.
pub(crate) fn authorize(head: &Head, ctx: &Ctx) -> Result<(Query, Principal), Response> {
    let query = Query::parse(&head.query).map_err(|m| bad_request(&m))?;
    let secret = auth::presented_secret(&head.headers, query.get("token"));
    let who = ctx.shared.hub.borrow().authenticate(secret.as_deref());
    match who {
        Some(who) => {
            ctx.conn.authenticated();
            Ok((query, who))
        }
        None => Err(Response::error(
            401,
            "unauthorized",
            "a valid token is required (Authorization: Bearer <token>)",
        )
        .header("www-authenticate", "Bearer realm=\"changerelay\"")),
    }
}

/// The HTTP answer to a worker error.
pub(crate) fn reply_error_response(e: &ReplyError) -> Response {
    match e.kind {
        ReplyErrorKind::Malformed => bad_request(&e.message),
        ReplyErrorKind::UnknownLabel => Response::error(404, "unknown_label", &e.message),
        ReplyErrorKind::NoHistory => Response::error(409, "no_history", &e.message),
        ReplyErrorKind::Internal => Response::error(500, "internal", &e.message),
        _ => {
            let (reason, _) = crate::fanout::error_code(e);
            Response::json(410, messages::resync(reason, &e.message, None))
        }
    }
}

/// The answer to a request the hub closed while it waited: token revoked or shutdown.
pub(crate) fn closed_response(outbox: &Outbox) -> Response {
    match outbox.close_reason() {
        Some(CloseReason::Revoked) => Response::error(401, "unauthorized", "token revoked"),
        _ => unavailable("the server is shutting down"),
    }
}

/// 503 when the worker cannot be asked or does not answer.
pub(crate) fn unavailable(message: &str) -> Response {
    Response::error(503, "unavailable", message).header("retry-after", "1")
}

/// 429 when the token has too many requests waiting for the worker.
pub(crate) fn too_many_requests(ctx: &Ctx) -> Response {
    ctx.shared.metrics.refused(crate::metrics::Refusal::RequestsPerToken);
    Response::error(
        429,
        "too_many_requests",
        "this token has too many requests waiting for the relay worker; retry later",
    )
    .header("retry-after", "1")
}
