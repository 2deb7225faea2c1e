//! Origin and Host checks (cross-site WebSocket hijacking, DNS rebinding), and HTTP keep-alive.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use changerelay_endpoint::{Auth, ToEndpoint};
use common::*;

fn ws_handshake(addr: std::net::SocketAddr, extra: &str) -> HttpResponse {
    request_head(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        ),
    )
}

/// A refused handshake: the whole 403 response (its head comes first; the body is JSON).
fn ws_refused(addr: std::net::SocketAddr, extra: &str) -> HttpResponse {
    raw_request(
        addr,
        &format!(
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        ),
    )
}

#[test]
fn trust_accepts_only_loopback_origins_and_hosts() {
    let fake = Fake::trust();
    let a = fake.addr;
    let port = a.port();
    for origin in [
        format!("http://localhost:{port}"),
        "http://localhost:3000".to_string(),
        "https://127.0.0.1".to_string(),
        "http://[::1]:8080".to_string(),
    ] {
        let r = ws_handshake(a, &format!("Host: {a}\r\nOrigin: {origin}\r\n"));
        assert_eq!(r.status, 101, "{origin}");
    }
    let r = ws_handshake(a, &format!("Host: localhost:{port}\r\n"));
    assert_eq!(r.status, 101, "no Origin (a non-browser client), Host localhost");
    for origin in [
        "https://evil.example",
        "null",
        "http://127.0.0.1.evil.example",
        "file://",
    ] {
        let r = ws_refused(a, &format!("Host: {a}\r\nOrigin: {origin}\r\n"));
        assert_eq!(r.status, 403, "{origin}");
        assert_eq!(r.json()["code"], "forbidden_origin", "{origin}: {}", r.body);
    }
    // DNS rebinding: a page on evil.example resolving to 127.0.0.1; its requests carry its own host name.
    for path in [
        "/ws",
        "/events?labels=parameters",
        "/changes?wait=0s",
        "/versions/parameters",
        "/metrics",
    ] {
        let r = get(a, path, &[("Host", &format!("evil.example:{port}"))]);
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(r.json()["code"], "forbidden_host", "{path}");
    }
    let r = get(
        a,
        "/changes?wait=0s",
        &[("Host", &format!("127.0.0.1:{}", port.wrapping_add(1)))],
    );
    assert_eq!(r.status, 403, "another port");
    assert_eq!(
        get(a, "/health", &[("Host", "evil.example")]).status,
        200,
        "health is exempt"
    );
    // An SSE or long-poll request from a foreign page.
    let r = get(a, "/changes?wait=0s", &[("Origin", "https://evil.example")]);
    assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("forbidden_origin")));
    assert!(metric(a, "changerelay_endpoint_refusals_total{reason=\"origin\"}") >= 5);
    assert!(metric(a, "changerelay_endpoint_refusals_total{reason=\"host\"}") >= 6);
}

#[test]
fn token_auth_allows_listed_and_same_host_origins() {
    let mut cfg = test_config(Auth::Token);
    cfg.allowed_origins = vec!["https://app.example.com".into()];
    cfg.allowed_hosts = vec!["relay.example.com".into()];
    let fake = Fake::start(cfg);
    fake.publish(ToEndpoint::Tokens(vec![token("t", &["parameters"], true)]));
    let a = fake.addr;
    let auth = "Authorization: Bearer t\r\n";
    assert!(wait_until(Duration::from_secs(2), || ws_handshake(
        a,
        &format!("Host: {a}\r\n{auth}")
    )
    .status
        == 101));
    let r = ws_handshake(a, &format!("Host: {a}\r\nOrigin: https://app.example.com\r\n{auth}"));
    assert_eq!(r.status, 101, "listed");
    let r = ws_handshake(
        a,
        &format!("Host: relay.example.com\r\nOrigin: http://relay.example.com\r\n{auth}"),
    );
    assert_eq!(r.status, 101, "same host (an allowed host, default port)");
    let r = ws_handshake(a, &format!("Host: {a}\r\nOrigin: http://{a}\r\n{auth}"));
    assert_eq!(r.status, 101, "same host");
    let r = ws_refused(a, &format!("Host: {a}\r\nOrigin: http://localhost:3000\r\n{auth}"));
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (403, Some("forbidden_origin")),
        "loopback is not special"
    );
    let r = ws_refused(
        a,
        &format!("Host: {a}\r\nOrigin: https://app.example.com:444\r\n{auth}"),
    );
    assert_eq!(r.status, 403, "another port");
    let r = ws_refused(a, &format!("Host: evil.example\r\n{auth}"));
    assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("forbidden_host")));
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let fake = Fake::trust();
    let rows = fake.commit_n("parameters", 1, 3, 0);
    let mut s = TcpStream::connect(fake.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (i, path) in [
        "/health".to_string(),
        "/versions/parameters".to_string(),
        format!("/changes?labels=parameters&since={}&wait=0s", rows[0].cursor),
    ]
    .iter()
    .enumerate()
    {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", fake.addr).as_bytes())
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200, "request {i} {path}: {}", r.body);
    }
    // One connection did all three.
    assert_eq!(metric(fake.addr, "changerelay_endpoint_clients"), 2);
    // Idle for header_timeout (500 ms): closed without a word.
    let t = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}
