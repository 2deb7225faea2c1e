//! Entry points for the fuzz targets in the workspace's `fuzz/` directory; not part of the API.
//!
//! [`http_request`] feeds raw bytes as one client connection through the real request handling (hyper's
//! parser, routing, authorization, the WebSocket handshake and frame loop) over an in-memory pipe, with no
//! socket and no worker (requests to the worker fail at once, as when it is gone).

use std::net::SocketAddr;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::LocalSet;

use crate::admission::{Admission, Admit};
use crate::api::{Status, ToEndpoint, Token};
use crate::config::{Auth, Config};
use crate::inbox::Inbound;
use crate::metrics::Metrics;
use crate::requests::RequestSender;
use crate::shared::{spawn, Shared};

thread_local! {
    static RUNTIME: Option<tokio::runtime::Runtime> =
        tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
}

/// How long one input may keep the connection busy (a long-poll waits, an SSE stream streams).
const PER_INPUT: Duration = Duration::from_millis(20);

/// Serves `bytes` as everything one client sends; panics only if the endpoint panics. `trust` picks the
/// authentication mode (token mode knows one token, secret `fuzz`).
pub fn http_request(bytes: &[u8], trust: bool) {
    RUNTIME.with(|rt| {
        let Some(rt) = rt else { return };
        let local = LocalSet::new();
        local.block_on(rt, one(bytes, trust));
    });
}

async fn one(bytes: &[u8], trust: bool) {
    let cfg = Config {
        auth: if trust { Auth::Trust } else { Auth::Token },
        max_client_message: 4096,
        ..Config::default()
    };
    let (tx, rx) = mpsc::channel();
    drop(rx);
    let Ok((wake, _other)) = std::os::unix::net::UnixStream::pair() else {
        return;
    };
    let _ = wake.set_nonblocking(true);
    let listen: SocketAddr = ([127, 0, 0, 1], 8432).into();
    let shared = Shared::new(
        cfg,
        Arc::new(Metrics::default()),
        RequestSender { tx, wake },
        None,
        vec![listen],
    );
    {
        let mut hub = shared.hub.borrow_mut();
        hub.handle(Inbound::Msg(ToEndpoint::Status(Status {
            consuming: true,
            state: "streaming".into(),
            labels: vec!["a".into(), "b".into()],
            ..Status::default()
        })));
        hub.handle(Inbound::Msg(ToEndpoint::Tokens(vec![Token {
            name: "fuzz".into(),
            sha256: sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(b"fuzz")).into(),
            labels: vec!["a".into()],
            rows: true,
            role: 10,
            readable: vec![1],
        }])));
    }
    let conn = match Admission::admit(
        &shared.admission,
        ([127, 0, 0, 1], 40000).into(),
        listen,
        &shared.metrics,
    ) {
        Admit::Yes(c) => c,
        Admit::No(_) => return,
    };
    let (mut client, server) = tokio::io::duplex(64 << 10);
    spawn(&shared, crate::connection::serve_http(server, conn, shared.clone()));
    let exchange = async {
        let _ = client.write_all(bytes).await;
        let _ = client.shutdown().await;
        let mut sink = vec![0u8; 8192];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(PER_INPUT, exchange).await;
    if let Some(p) = shared.take_panic() {
        std::panic::resume_unwind(p);
    }
}
