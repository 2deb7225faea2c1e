//! `GET /ws`: the WebSocket handshake (by hand, after our own HTTP parsing) and the connection loop.
//!
//! One task per connection reads client commands, writes its outbox, pings every 30 s and watches for the
//! hub closing it. Close codes: 1001 shutdown, 1002 protocol error, 1003 binary message, 1007 invalid UTF-8,
//! 1009 message too large, 4001 slow client, 4003 token revoked.

use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{interval_at, timeout, Instant};
use tokio_tungstenite::WebSocketStream;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Bytes, Error as WsError, Message};

use crate::conn::{authorize, bad_request, reply, Ctx};
use crate::http::{self, Head, Response};
use crate::messages;
use crate::outbox::{CloseReason, Out, Outbox};

const PING_EVERY: Duration = Duration::from_secs(30);
pub(crate) const SLOW_REASON: &str = "slow client: send queue exceeded changerelay.client_buffer";

type Ws = WebSocketStream<TcpStream>;

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

pub(crate) async fn serve(mut stream: TcpStream, head: Head, ctx: Ctx) {
    if !head.has_token("upgrade", "websocket") {
        let r = Response::error(426, "upgrade_required", "this endpoint speaks WebSocket only")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13");
        return reply(&mut stream, &ctx, r).await;
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
        return reply(&mut stream, &ctx, bad_request(p).header("Sec-WebSocket-Version", "13")).await;
    }
    let who = match authorize(&head, &ctx) {
        Ok((_, who)) => who,
        Err(r) => return reply(&mut stream, &ctx, r).await,
    };
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if !http::write_all(&mut stream, response.as_bytes()).await {
        return;
    }
    ctx.shared.hub.borrow_mut().become_ws(ctx.id, &who);
    let max = ctx.shared.cfg.max_client_message;
    let config = WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .write_buffer_size(64 << 10)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut ws = WebSocketStream::from_partially_read(stream, head.leftover, Role::Server, Some(config)).await;
    let end = run(&mut ws, &ctx).await;
    if let End::Close(code, reason, grace) = end {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = timeout(grace, ws.close(Some(frame))).await;
    }
    let linger = if ctx.outbox.close_reason() == Some(CloseReason::Shutdown) {
        200
    } else {
        500
    };
    http::finish(ws.get_mut(), Duration::from_millis(linger)).await;
}

fn closing(reason: CloseReason) -> End {
    match reason {
        CloseReason::Slow => End::Close(4001, SLOW_REASON, Duration::from_secs(2)),
        CloseReason::Revoked => End::Close(4003, "token revoked", Duration::from_millis(500)),
        CloseReason::Shutdown => End::Close(1001, "server shutting down", Duration::from_millis(250)),
    }
}

async fn run(ws: &mut Ws, ctx: &Ctx) -> End {
    let outbox: &Rc<Outbox> = &ctx.outbox;
    let mut ping = interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            biased;
            r = outbox.closed() => return closing(r),
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => ctx.shared.hub.borrow_mut().ws_command(ctx.id, &text),
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
            },
            _ = outbox.ready() => {
                if let Some(end) = drain(ws, ctx).await {
                    return end;
                }
            }
            _ = ping.tick() => {
                tokio::select! {
                    biased;
                    r = outbox.closed() => return closing(r),
                    sent = ws.send(Message::Ping(Bytes::new())) => if sent.is_err() { return End::Quiet },
                }
            }
        }
    }
}

/// Writes everything queued; `Some` when the connection is to end.
async fn drain(ws: &mut Ws, ctx: &Ctx) -> Option<End> {
    let outbox = &ctx.outbox;
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
        ctx.shared.hub.borrow_mut().resume(ctx.id);
    }
    tokio::select! {
        biased;
        r = outbox.closed() => Some(closing(r)),
        flushed = ws.flush() => flushed.err().map(|_| End::Quiet),
    }
}
