//! `GET /ws`: the WebSocket handshake (checked here, upgraded through hyper) and the connection loop.
//!
//! One task per connection reads client commands, writes its outbox, pings every `ping_interval` and closes
//! a client that sends nothing for `pong_timeout` after a ping. Close codes: 1000 normal end, 1001 shutdown,
//! 1002 protocol error, 1003 binary message, 1007 invalid UTF-8, 1009 message too large, 1011 no pong,
//! 4001 slow client, 4003 token revoked.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::time::{interval_at, sleep_until, timeout, Instant};
use tokio_tungstenite::WebSocketStream;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Bytes, Error as WsError, Message};

use crate::messages;
use crate::metrics::Refusal;
use crate::outbox::{CloseReason, Out};
use crate::request::{authorize, bad_request, Ctx, Head, Joined};
use crate::response::{Body, HttpResponse, Response};
use crate::shared::spawn;

pub(crate) const SLOW_REASON: &str = "slow client: send queue exceeded changerelay.client_buffer";

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Why the loop ended: a close frame to send (code, reason, grace), or nothing (peer gone or closed).
enum End {
    Close(u16, &'static str, Duration),
    Quiet,
}

fn valid_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key.as_bytes()[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Checks the handshake and answers 101, leaving the connection to a task; or the refusal.
pub(crate) fn serve(req: &mut Request<Incoming>, head: Head, ctx: &Ctx) -> Result<HttpResponse, Response> {
    if !head.has_token("upgrade", "websocket") {
        return Err(
            Response::error(426, "upgrade_required", "this endpoint speaks WebSocket only")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13"),
        );
    }
    let key = head.header("sec-websocket-key").unwrap_or("").to_string();
    let problem = if !head.has_token("connection", "upgrade") {
        Some("Connection: Upgrade is missing")
    } else if !valid_key(&key) {
        Some("Sec-WebSocket-Key is missing or invalid")
    } else if head.header("sec-websocket-version") != Some("13") {
        Some("Sec-WebSocket-Version must be 13")
    } else {
        None
    };
    if let Some(p) = problem {
        return Err(bad_request(p).header("sec-websocket-version", "13"));
    }
    let (_, who) = authorize(&head, ctx)?;
    let joined = Joined::new(ctx, &who);
    ctx.shared.hub.borrow_mut().become_ws(joined.id);
    let upgrade = hyper::upgrade::on(req);
    let ctx2 = ctx.clone();
    spawn(&ctx.shared, async move {
        let Ok(upgraded) = upgrade.await else { return };
        let max = ctx2.shared.cfg.max_client_message;
        let config = WebSocketConfig::default()
            .read_buffer_size(8 << 10)
            .write_buffer_size(64 << 10)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        let end = run(&mut ws, &ctx2, &joined).await;
        if let End::Close(code, reason, grace) = end {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            let _ = timeout(grace, ws.close(Some(frame))).await;
        }
        // Read until the client closes too (briefly), so unread input does not reset the close away.
        let linger = if joined.outbox.close_reason() == Some(CloseReason::Shutdown) {
            200
        } else {
            500
        };
        let _ = timeout(Duration::from_millis(linger), async {
            while ws.next().await.is_some() {}
        })
        .await;
    });
    let mut r = hyper::Response::new(Body::Full(None));
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", hyper::header::HeaderValue::from_static("websocket"));
    h.insert("connection", hyper::header::HeaderValue::from_static("Upgrade"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", v);
    }
    Ok(r)
}

fn closing(reason: CloseReason) -> End {
    match reason {
        CloseReason::Slow => End::Close(4001, SLOW_REASON, Duration::from_secs(2)),
        CloseReason::Revoked => End::Close(4003, "token revoked", Duration::from_millis(500)),
        CloseReason::Shutdown => End::Close(1001, "server shutting down", Duration::from_millis(250)),
    }
}

async fn run(ws: &mut Ws, ctx: &Ctx, joined: &Joined) -> End {
    let outbox = &joined.outbox;
    let (every, patience) = (ctx.shared.cfg.ping_interval, ctx.shared.cfg.pong_timeout);
    let mut ping = interval_at(Instant::now() + every, every);
    // Set when a ping went out and nothing came back since.
    let mut waiting_since: Option<Instant> = None;
    loop {
        let pong_deadline = waiting_since.map(|t| t + patience);
        tokio::select! {
            biased;
            r = outbox.closed() => return closing(r),
            msg = ws.next() => {
                waiting_since = None;
                match msg {
                    Some(Ok(Message::Text(text))) => ctx.shared.hub.borrow_mut().ws_command(joined.id, &text),
                    Some(Ok(Message::Binary(_))) => {
                        return End::Close(1003, "binary messages are not supported", Duration::from_millis(500))
                    }
                    Some(Ok(_)) => {} // ping, pong (answered by tungstenite), close (replied; the stream ends next)
                    Some(Err(WsError::Capacity(_))) => {
                        let e = messages::error("too_large", "message exceeds changerelay.max_client_message", None);
                        let _ = timeout(Duration::from_millis(500), ws.send(Message::text(e))).await;
                        return End::Close(1009, "message too large", Duration::from_millis(500));
                    }
                    Some(Err(WsError::Utf8(_))) => return End::Close(1007, "invalid UTF-8", Duration::from_millis(500)),
                    Some(Err(WsError::Protocol(_))) => return End::Close(1002, "protocol error", Duration::from_millis(500)),
                    Some(Err(_)) | None => return End::Quiet,
                }
            }
            _ = sleep_until(pong_deadline.unwrap_or_else(Instant::now)), if pong_deadline.is_some() => {
                ctx.shared.metrics.refused(Refusal::PingTimeout);
                return End::Close(1011, "no pong within pong_timeout", Duration::from_millis(250));
            }
            _ = outbox.ready() => {
                if let Some(end) = drain(ws, ctx, joined).await {
                    return end;
                }
            }
            _ = ping.tick() => {
                tokio::select! {
                    biased;
                    r = outbox.closed() => return closing(r),
                    sent = ws.send(Message::Ping(Bytes::new())) => if sent.is_err() { return End::Quiet },
                }
                waiting_since.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// Writes everything queued; `Some` when the connection is to end.
async fn drain(ws: &mut Ws, ctx: &Ctx, joined: &Joined) -> Option<End> {
    let outbox = &joined.outbox;
    while let Some(item) = outbox.pop() {
        let text = match item {
            Out::Data(text) => text,
            Out::End => return Some(End::Close(1000, "", Duration::from_millis(500))),
        };
        let len = text.len();
        tokio::select! {
            biased;
            r = outbox.closed() => return Some(closing(r)),
            fed = ws.feed(Message::Text(text)) => if fed.is_err() { return Some(End::Quiet) },
        }
        ctx.shared.metrics.sent(len);
    }
    if outbox.take_resume() {
        ctx.shared.hub.borrow_mut().resume(joined.id);
    }
    tokio::select! {
        biased;
        r = outbox.closed() => Some(closing(r)),
        flushed = ws.flush() => flushed.err().map(|_| End::Quiet),
    }
}
