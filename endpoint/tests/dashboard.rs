//! The dashboard: its static page at `/` (Content-Security-Policy, Host check, no token) and `GET /status`, the
//! data it polls (token, labels of the token, worker state, clients by kind, running totals, Origin check).

mod common;

use std::time::Duration;

use changerelay_endpoint::{Auth, ToEndpoint};
use common::*;
use serde_json::json;

fn token_fake() -> Fake {
    let fake = Fake::start(test_config(Auth::Token));
    fake.publish(ToEndpoint::Tokens(vec![
        token("dash", &["parameters", "flags"], false),
        token("other", &["other"], true),
    ]));
    fake.wait_token("dash");
    fake
}

#[test]
fn the_page_and_its_files_are_served_confined() {
    let fake = token_fake();
    let host = fake.addr.to_string();
    let r = get(fake.addr, "/", &[]);
    assert_eq!(r.status, 200, "no token needed for the page");
    assert_eq!(r.header("Content-Type"), Some("text/html; charset=utf-8"));
    assert!(
        r.body
            .contains("<script type=\"module\" src=\"/dashboard.js\"></script>"),
        "{}",
        r.body
    );
    let csp = r.header("Content-Security-Policy").expect("a CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self';"),
        "{csp}"
    );
    assert!(csp.contains(&format!("connect-src 'self' ws://{host};")), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(r.header("X-Frame-Options"), Some("DENY"));
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(r.header("Referrer-Policy"), Some("no-referrer"));
    for (path, kind, marker) in [
        ("/dashboard.js", "text/javascript; charset=utf-8", "/status"),
        ("/dashboard.css", "text/css; charset=utf-8", ".card"),
        ("/index.html", "text/html; charset=utf-8", "<title>"),
    ] {
        let r = get(fake.addr, path, &[]);
        assert_eq!((r.status, r.header("Content-Type")), (200, Some(kind)), "{path}");
        assert!(r.body.contains(marker), "{path}");
        assert!(r.header("Content-Security-Policy").is_some(), "{path}");
    }
    // A page on a rebound name may not load it (DNS rebinding), nor ask for anything else.
    let evil = format!("evil.example:{}", fake.addr.port());
    assert_eq!(get(fake.addr, "/", &[("Host", &evil)]).status, 403);
    assert_eq!(
        get(
            fake.addr,
            "/status",
            &[("Host", &evil), ("Authorization", "Bearer dash")]
        )
        .status,
        403
    );
    assert_eq!(get(fake.addr, "/dashboard.js?x", &[]).status, 200);
    assert_eq!(get(fake.addr, "/dashboard.jsx", &[]).status, 404);
}

#[test]
fn status_needs_a_token_and_shows_only_its_labels() {
    let fake = token_fake();
    let r = get(fake.addr, "/status", &[]);
    assert_eq!(r.status, 401);
    assert!(r.header("WWW-Authenticate").is_some());
    assert_eq!(get(fake.addr, "/status?token=wrong", &[]).status, 401);
    let r = get(fake.addr, "/status", &[("Authorization", "Bearer dash")]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("Cache-Control"), Some("no-cache"));
    let v = r.json();
    assert_eq!(
        v["labels"],
        json!(["parameters", "flags"]),
        "the token's labels that the worker knows"
    );
    assert_eq!(
        v["worker"],
        json!({"state": "streaming", "consuming": true, "last_event_id": 1000, "lag_bytes": 123,
               "cursor": fake.head()})
    );
    assert_eq!(
        get(fake.addr, "/status?token=other", &[]).json()["labels"],
        json!(["other"])
    );
    // A label the worker does not know yet is not listed.
    fake.world.lock().unwrap().labels = vec!["flags".into()];
    fake.publish_status();
    assert!(wait_until(Duration::from_secs(2), || {
        get(fake.addr, "/status?token=dash", &[]).json()["labels"] == json!(["flags"])
    }));
    // Origin: the page's own origin passes, another site's is refused.
    let own = format!("http://{}", fake.addr);
    let r = get(fake.addr, "/status?token=dash", &[("Origin", &own)]);
    assert_eq!(r.status, 200);
    let r = get(fake.addr, "/status?token=dash", &[("Origin", "https://evil.example")]);
    assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("forbidden_origin")));
}

#[test]
fn status_counts_clients_by_kind_and_the_totals_move() {
    let fake = Fake::trust();
    let status = || get(fake.addr, "/status", &[]).json();
    let v = status();
    assert_eq!(
        v["labels"],
        json!(["parameters", "flags", "other"]),
        "trust: every known label"
    );
    assert_eq!(
        v["clients"],
        json!({"connections": 1, "unauthenticated": 0, "websocket": 0, "sse": 0, "long_poll": 0,
               "worker_requests": 0})
    );
    assert!(v["uptime_ms"].as_u64().is_some());
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"versions":false,"changes":true}),
    );
    let (_sse, head) = open_request(
        fake.addr,
        &format!("GET /events?labels=flags HTTP/1.1\r\nHost: {}\r\n\r\n", fake.addr),
    );
    assert_eq!(head.status, 200);
    let c = status()["clients"].clone();
    assert_eq!(
        (c["connections"].as_u64(), c["websocket"].as_u64(), c["sse"].as_u64()),
        (Some(3), Some(1), Some(1)),
        "{c}"
    );

    let before = status()["totals"].clone();
    fake.commit("parameters", &[json!({"id": 1}), json!({"id": 2})]);
    fake.commit("flags", &[json!({"id": 3})]);
    read_changes(&mut ws, 2);
    assert!(wait_until(Duration::from_secs(2), || {
        status()["totals"]["changes"].as_u64() == before["changes"].as_u64().map(|n| n + 3)
    }));
    let after = status()["totals"].clone();
    assert_eq!(after["batches"].as_u64(), before["batches"].as_u64().map(|n| n + 2));
    assert!(after["messages_sent"].as_u64() > before["messages_sent"].as_u64());
    assert!(after["bytes_sent"].as_u64() > before["bytes_sent"].as_u64());
    assert_eq!(metric(fake.addr, "changerelay_endpoint_batches_received_total"), 2);
    assert_eq!(metric(fake.addr, "changerelay_endpoint_changes_received_total"), 3);
    drop(ws);
    assert!(wait_until(Duration::from_secs(3), || status()["clients"]["websocket"] == 0));
}

#[test]
fn status_before_the_worker_reported() {
    let (endpoint, _port) = changerelay_endpoint::start(test_config(Auth::Trust)).unwrap();
    let addr = endpoint.local_addrs()[0];
    let v = get(addr, "/status", &[]).json();
    assert_eq!(
        v["worker"],
        json!({"state": "starting", "consuming": false, "last_event_id": 0, "lag_bytes": 0, "cursor": null})
    );
    assert_eq!(v["labels"], json!([]));
}
