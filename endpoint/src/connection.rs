//! One client connection: the TLS handshake (when configured), then hyper's HTTP/1.1 server (keep-alive,
//! header size, count and read-time limits, upgrades), bounded by the auth deadline: a connection that has
//! not authenticated `auth_timeout` after accept is shut down (after the response in progress, if any).

use std::rc::Rc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::admission::{ConnState, Kill};
use crate::metrics::Refusal;
use crate::request::Ctx;
use crate::response::Response;
use crate::router;
use crate::shared::Shared;
use crate::timed_io::{SharedIo, TimedIo};

/// Largest request head: beyond it hyper answers 431.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// How long a connection may take to finish its response once it is to close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub(crate) async fn serve_tcp(stream: TcpStream, conn: Rc<ConnState>, shared: Rc<Shared>) {
    let _ = stream.set_nodelay(true);
    let io = TimedIo::new(stream, shared.cfg.write_timeout, shared.metrics.clone());
    let Some(acceptor) = shared.tls.clone() else {
        return serve_http(io, conn, shared).await;
    };
    let deadline = conn.accepted + shared.cfg.auth_timeout;
    let handshake = tokio::select! {
        biased;
        _ = conn.killed() => return,
        h = timeout_at(deadline, acceptor.accept(io)) => h,
    };
    match handshake {
        Ok(Ok(tls)) => serve_http(tls, conn, shared).await,
        Ok(Err(_)) => shared.metrics.refused(Refusal::TlsHandshake),
        Err(_) => shared.metrics.refused(Refusal::AuthTimeout),
    }
}

/// Serves HTTP on any byte stream (a socket, a TLS stream, or an in-memory pipe for fuzzing).
pub(crate) async fn serve_http<I>(io: I, conn: Rc<ConnState>, shared: Rc<Shared>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Ctx {
        shared: shared.clone(),
        conn: conn.clone(),
    };
    let service = service_fn(move |req| router::handle(req, ctx.clone()));
    let io = SharedIo::new(io);
    let spare = io.clone();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(shared.cfg.header_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD)
        .max_buf_size(64 << 10);
    let http = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(http);
    let deadline = conn.accepted + shared.cfg.auth_timeout;
    let mut deadline_armed = true;
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            done = &mut http => {
                // hyper gave up waiting for a request head (it only times out between responses): 408 when the
                // client had started one, silence for an idle connection.
                if done.is_err_and(|e| e.is_timeout()) {
                    if !conn.is_authenticated() {
                        shared.metrics.refused(Refusal::AuthTimeout);
                    }
                    if !spare.heard_since_answer() {
                        return;
                    }
                    let r = Response::error(408, "timeout", "the request head did not arrive in time");
                    let mut io = spare;
                    let _ = tokio::time::timeout(CLOSE_GRACE, async {
                        io.write_all(&r.to_wire()).await?;
                        io.shutdown().await
                    })
                    .await;
                }
                return;
            }
            how = conn.killed(), if closing.is_none() => match how {
                Kill::Now => return,
                Kill::Graceful => {
                    http.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
            },
            _ = sleep_until(deadline), if deadline_armed && closing.is_none() => {
                deadline_armed = false;
                if !conn.is_authenticated() {
                    shared.metrics.refused(Refusal::AuthTimeout);
                    http.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
            }
            _ = sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => return,
        }
    }
}
