//! Connection limits: 1,000 idle connections do not lock out an authenticated client and are closed by the
//! auth deadline; per-address limit; WebSocket ping/pong timeout; write timeout.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use changerelay_endpoint::{Auth, ToEndpoint};
use common::*;
use serde_json::json;
use tokio::io::AsyncReadExt;

/// Raises the soft RLIMIT_NOFILE to at least `n` (up to the hard limit); returns the soft limit found.
fn raise_nofile(n: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: (a test) getrlimit/setrlimit on a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let found = lim.rlim_cur;
    if lim.rlim_cur < n {
        lim.rlim_cur = n.min(lim.rlim_max);
        // SAFETY: (a test) setrlimit with the struct getrlimit filled.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    found
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Opens `n` idle TCP connections to `addr` from source addresses 127.0.0.`first`.. (`per_source` each).
async fn idle_connections(addr: SocketAddr, n: usize, first: u8, per_source: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, first + (i / per_source) as u8));
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src, 0)).unwrap();
        out.push(sock.connect(addr).await.unwrap());
    }
    out
}

#[test]
fn a_thousand_idle_connections_do_not_lock_out_an_authenticated_client() {
    let soft = raise_nofile(8192);
    eprintln!("RLIMIT_NOFILE soft limit found: {soft}");
    let mut cfg = test_config(Auth::Token);
    cfg.max_clients = 512; // the default
    cfg.max_unauthenticated = 64;
    cfg.max_per_address = 64;
    cfg.auth_timeout = Duration::from_millis(1500);
    cfg.header_timeout = Duration::from_millis(1500);
    let fake = Fake::start(cfg);
    fake.publish(ToEndpoint::Tokens(vec![token("s3cret", &["parameters"], true)]));
    let rt = rt();
    let t0 = Instant::now();
    // 1,000 idle connections from 20 addresses (50 each, under the per-address limit).
    let mut idle = rt.block_on(idle_connections(fake.addr, 1000, 2, 50));
    let opened = t0.elapsed();
    // An authenticated client connects, subscribes and gets a batch, within 3 s.
    let t = Instant::now();
    let mut ws = ws_connect(fake.addr, "/ws?token=s3cret");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    fake.commit_n("parameters", 1, 1, 0);
    assert_eq!(read_changes(&mut ws, 1)[0]["new"]["id"], 1);
    let served = t.elapsed();
    assert!(served < Duration::from_secs(3), "served after {served:?}");
    // Every idle connection is closed by the auth deadline (evicted at once, or at auth_timeout).
    let closed_by = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        for s in idle.iter_mut() {
            let mut b = [0u8; 16];
            match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                Ok(Ok(n)) => panic!("an idle connection got {n} bytes"),
                Err(_) => panic!("an idle connection is still open"),
            }
        }
        t0.elapsed()
    });
    eprintln!(
        "1000 idle connections opened in {opened:?}; authenticated client served in {served:?}; \
         all idle closed {closed_by:?} after the first"
    );
    let evicted = metric(
        fake.addr,
        "changerelay_endpoint_refusals_total{reason=\"unauthenticated_limit\"}",
    );
    let timed_out = metric(
        fake.addr,
        "changerelay_endpoint_refusals_total{reason=\"auth_timeout\"}",
    );
    assert!(evicted + timed_out >= 1000, "evicted {evicted}, timed out {timed_out}");
    assert!(
        (1..=64 + 2).contains(&timed_out),
        "at most the last 64 waited for the deadline: {timed_out}"
    );
    // The authenticated client is still there.
    fake.commit_n("parameters", 2, 1, 0);
    assert_eq!(read_changes(&mut ws, 1)[0]["new"]["id"], 2);
}

#[test]
fn per_address_limit_answers_429() {
    let mut cfg = test_config(Auth::Trust);
    cfg.max_per_address = 3;
    let fake = Fake::start(cfg);
    let rt = rt();
    let held = rt.block_on(idle_connections(fake.addr, 3, 30, 3)); // all from 127.0.0.30
    let refused = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.30:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(fake.addr).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).to_string()
    });
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");
    assert_eq!(get(fake.addr, "/health", &[]).status, 200, "another address is served");
    assert_eq!(
        metric(fake.addr, "changerelay_endpoint_refusals_total{reason=\"per_address\"}"),
        1
    );
    drop(held);
}

#[test]
fn a_websocket_client_that_does_not_pong_is_closed_1011() {
    let mut cfg = test_config(Auth::Trust);
    cfg.ping_interval = Duration::from_millis(200);
    cfg.pong_timeout = Duration::from_millis(300);
    let fake = Fake::start(cfg);
    // A raw socket that completes the handshake and then never reads, so never pongs.
    let mut silent = std::net::TcpStream::connect(fake.addr).unwrap();
    std::io::Write::write_all(
        &mut silent,
        format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            fake.addr
        )
        .as_bytes(),
    )
    .unwrap();
    let mut alive = ws_connect(fake.addr, "/ws");
    // The live client reads (tungstenite answers pings while reading) for 1.5 s: several ping rounds.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        if let Got::Closed(c) = ws_next(&mut alive, Duration::from_millis(100)) {
            panic!("the responsive client was closed: {c:?}");
        }
    }
    assert!(wait_until(Duration::from_secs(3), || metric(
        fake.addr,
        "changerelay_endpoint_refusals_total{reason=\"ping_timeout\"}"
    ) == 1));
    // What it was sent: the 101, pings, then a close frame with 1011 (0x03F3), and the end.
    silent.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut bytes = Vec::new();
    let _ = std::io::Read::read_to_end(&mut silent, &mut bytes);
    assert!(bytes.starts_with(b"HTTP/1.1 101"));
    let close = bytes.windows(4).any(|w| w[0] == 0x88 && w[2] == 0x03 && w[3] == 0xF3);
    assert!(close, "close 1011 in {:?}", &bytes[bytes.len().saturating_sub(64)..]);
}

#[test]
fn a_client_whose_socket_takes_no_bytes_is_cut_after_write_timeout() {
    let mut cfg = test_config(Auth::Trust);
    cfg.client_buffer = 256 << 20; // never cut as slow: the write timeout must act
    cfg.write_timeout = Duration::from_millis(300);
    cfg.checkpoint_every = Duration::from_secs(60);
    let fake = Fake::start(cfg);
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    // 64 KiB rows until the kernel buffers are full and the endpoint gives up (bounded: 64 MiB).
    let mut n = 0;
    while metric(
        fake.addr,
        "changerelay_endpoint_refusals_total{reason=\"write_timeout\"}",
    ) == 0
    {
        assert!(n < 1024, "never timed out");
        fake.commit_n("parameters", n + 1, 16, 64 << 10);
        n += 16;
    }
    assert_eq!(
        metric(fake.addr, "changerelay_endpoint_slow_client_disconnects_total"),
        0
    );
    assert!(wait_until(Duration::from_secs(3), || metric(
        fake.addr,
        "changerelay_endpoint_clients"
    ) == 1));
}
