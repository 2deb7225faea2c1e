//! HTTP endpoints: health, metrics, versions with ETags, auth, handshake errors, limits and malformed requests.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use changerelay_endpoint::{Auth, ToEndpoint};
use common::*;
use serde_json::json;

fn token_fake() -> Fake {
    let fake = Fake::start(test_config(Auth::Token));
    fake.publish(ToEndpoint::Tokens(vec![
        token("all", &["parameters", "flags"], true),
        token("versions-only", &["parameters"], false),
    ]));
    std::thread::sleep(Duration::from_millis(50));
    fake
}

#[test]
fn health_follows_the_worker_status() {
    let mut cfg = test_config(Auth::Token);
    cfg.checkpoint_every = Duration::from_secs(1);
    let (endpoint, _port) = changerelay_endpoint::start(cfg).unwrap();
    let addr = endpoint.local_addrs()[0];
    let r = get(addr, "/health", &[]);
    assert_eq!(r.status, 503, "no status yet");
    assert_eq!(r.json()["status"], "unavailable");
    drop(endpoint);

    let fake = Fake::trust();
    let r = get(fake.addr, "/health-check", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (v["status"].as_str(), v["consuming"].as_bool()),
        (Some("ok"), Some(true))
    );
    assert_eq!(v["state"], "streaming");
    assert_eq!(v["lag_bytes"], 123);
    assert_eq!(v["clients"], 1);
    fake.world.lock().unwrap().consuming = false;
    fake.publish_status();
    assert!(wait_until(Duration::from_secs(2), || get(fake.addr, "/health", &[])
        .status
        == 503));
    let v = get(fake.addr, "/health", &[]).json();
    assert_eq!(
        (v["status"].as_str(), v["state"].as_str()),
        (Some("unavailable"), Some("disabled"))
    );
}

#[test]
fn versions_with_etag_and_304() {
    let fake = token_fake();
    let rows = fake.commit_n("parameters", 1, 2, 0);
    let auth = [("Authorization", "Bearer all")];
    let r = get(fake.addr, "/versions/parameters", &auth);
    assert_eq!(r.status, 200, "{}", r.body);
    let etag = format!("\"{}\"", rows[1].event_id);
    assert_eq!(r.header("ETag"), Some(etag.as_str()));
    assert_eq!(r.header("Cache-Control"), Some("no-cache"));
    assert_eq!(r.json()["data"]["all"]["v"].as_u64(), Some(rows[1].event_id));
    let r = get(fake.addr, "/versions/parameters", &[auth[0], ("If-None-Match", &etag)]);
    assert_eq!(r.status, 304);
    assert_eq!(r.body, "");
    fake.commit_n("parameters", 3, 1, 0);
    let r = get(fake.addr, "/versions/parameters", &[auth[0], ("If-None-Match", &etag)]);
    assert_eq!(r.status, 200, "changed since");
    assert_eq!(
        get(fake.addr, "/versions/nosuch", &auth).status,
        403,
        "outside the token"
    );
    let trust = Fake::trust();
    assert_eq!(get(trust.addr, "/versions/nosuch", &[]).status, 404);
    assert_eq!(get(trust.addr, "/versions/parameters?x=1", &[]).status, 200);
}

#[test]
fn token_scoping_and_auth_failures() {
    let fake = token_fake();
    let r = get(fake.addr, "/changes?labels=parameters&wait=0s", &[]);
    assert_eq!(r.status, 401);
    assert!(r.header("WWW-Authenticate").unwrap().starts_with("Bearer"));
    assert_eq!(get(fake.addr, "/changes?wait=0s&token=wrong", &[]).status, 401);
    assert_eq!(metric(fake.addr, "changerelay_endpoint_auth_failures_total"), 2);
    // Versions-only token: versions yes, changes no.
    let vo = [("Authorization", "Bearer versions-only")];
    assert_eq!(get(fake.addr, "/versions/parameters", &vo).status, 200);
    let r = get(fake.addr, "/changes?labels=parameters&wait=0s", &vo);
    assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("forbidden")));
    assert_eq!(get(fake.addr, "/events?labels=parameters", &vo).status, 403);
    let mut ws = ws_connect(fake.addr, "/ws?token=versions-only");
    ws_send(
        &mut ws,
        &json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    assert_eq!(ws_json(&mut ws)["code"], "forbidden");
    ws_send(&mut ws, &json!({"op":"subscribe","labels":["flags"]}));
    let e = ws_json(&mut ws);
    assert_eq!(
        (e["code"].as_str(), e["label"].as_str()),
        (Some("forbidden"), Some("flags"))
    );
    // Another label than the token's.
    let r = get(fake.addr, "/changes?labels=other&wait=0s&token=all", &[]);
    assert_eq!(r.status, 403);
    assert_eq!(get(fake.addr, "/health", &[]).status, 200, "health needs no token");
    assert_eq!(get(fake.addr, "/metrics", &[]).status, 200, "metrics need no token");
}

#[test]
fn websocket_handshake_errors() {
    let fake = Fake::trust();
    let r = get(fake.addr, "/ws", &[]);
    assert_eq!(r.status, 426);
    assert_eq!(r.header("Upgrade"), Some("websocket"));
    let up = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
    ];
    let r = get(fake.addr, "/ws", &up);
    assert_eq!(r.status, 400, "missing key");
    let r = get(fake.addr, "/ws", &[up[0], up[1], up[2], ("Sec-WebSocket-Key", "short")]);
    assert_eq!(r.status, 400, "invalid key");
    let key = ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    let r = get(fake.addr, "/ws", &[up[0], up[1], ("Sec-WebSocket-Version", "8"), key]);
    assert_eq!(r.status, 400, "version");
    let r = request_head(
        fake.addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            fake.addr
        ),
    );
    assert_eq!(r.status, 101);
    assert_eq!(r.header("Sec-WebSocket-Accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
}

#[test]
fn malformed_and_unknown_requests() {
    let fake = Fake::trust();
    assert_eq!(get(fake.addr, "/nope", &[]).status, 404);
    assert_eq!(
        raw_request(fake.addr, "POST /changes HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").status,
        405
    );
    let huge = format!("GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(raw_request(fake.addr, &huge).status, 431);
    assert_eq!(raw_request(fake.addr, "GARBAGE\0\r\n\r\n").status, 400);
}

#[test]
fn slow_header_sender_gets_408() {
    let fake = Fake::trust(); // header_timeout 500ms
    let mut s = TcpStream::connect(fake.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = s.write_all(b"X-Slow: 1\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let took = t.elapsed();
    assert_eq!(parse_response(&buf).status, 408);
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn too_many_clients_get_503() {
    let mut cfg = test_config(Auth::Trust);
    cfg.max_clients = 2;
    let fake = Fake::start(cfg);
    let a = ws_connect(fake.addr, "/ws");
    let _b = ws_connect(fake.addr, "/ws");
    let r = get(fake.addr, "/health", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert_eq!(r.json()["code"], "too_many_clients");
    drop(a);
    assert!(wait_until(Duration::from_secs(3), || get(fake.addr, "/health", &[])
        .status
        == 200));
    let m = get(fake.addr, "/metrics", &[]).body;
    assert!(
        m.contains("# TYPE changerelay_endpoint_rejected_connections_total counter"),
        "{m}"
    );
    assert!(metric(fake.addr, "changerelay_endpoint_rejected_connections_total") >= 1);
}

#[test]
fn metrics_exposition() {
    let fake = Fake::trust();
    let mut ws = ws_connect(fake.addr, "/ws");
    ws_send(
        &mut ws,
        &json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    assert_eq!(ws_json(&mut ws)["type"], "subscribed");
    fake.commit_n("parameters", 1, 1, 0);
    assert_eq!(ws_json_skip_checkpoints(&mut ws)["type"], "change");
    let body = get(fake.addr, "/metrics", &[]).body;
    for name in [
        "changerelay_endpoint_clients",
        "changerelay_endpoint_messages_sent_total",
        "changerelay_endpoint_bytes_sent_total",
        "changerelay_endpoint_slow_client_disconnects_total",
        "changerelay_endpoint_auth_failures_total",
        "changerelay_endpoint_rejected_connections_total",
        "changerelay_worker_lag_bytes",
        "changerelay_worker_last_event_id",
        "changerelay_worker_consuming",
    ] {
        assert!(body.contains(&format!("# HELP {name} ")), "{name}");
        assert!(body.contains(&format!("# TYPE {name} ")), "{name}");
    }
    assert_eq!(
        metric(fake.addr, "changerelay_endpoint_clients"),
        2,
        "the socket and the metrics request"
    );
    assert!(metric(fake.addr, "changerelay_endpoint_messages_sent_total") >= 2);
    assert!(metric(fake.addr, "changerelay_endpoint_bytes_sent_total") > 100);
    assert_eq!(metric(fake.addr, "changerelay_worker_consuming"), 1);
    assert_eq!(metric(fake.addr, "changerelay_worker_lag_bytes"), 123);
}

#[test]
fn binding_a_taken_address_fails_naming_it() {
    let fake = Fake::trust();
    let mut cfg = test_config(Auth::Trust);
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap(), fake.addr];
    let err = changerelay_endpoint::start(cfg).err().expect("address in use");
    assert!(err.contains(&fake.addr.to_string()), "{err}");
}
