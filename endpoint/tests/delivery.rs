//! Bounded delivery: long-poll answers and history pages bounded in bytes, one change larger than
//! client_buffer still delivered, and nothing lost when the worker channel overflows (gap) or a batch leaves
//! its rows out (`rows_omitted`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use changerelay_endpoint::{Auth, RequestKind};
use common::*;
use serde_json::{json, Value};

#[test]
fn long_poll_answers_are_bounded_by_client_buffer_and_resume_exactly() {
    let mut cfg = test_config(Auth::Trust);
    cfg.client_buffer = 64 << 10;
    let fake = Fake::start(cfg);
    fake.world.lock().unwrap().page = 10_000;
    let rows = fake.commit_n("parameters", 1, 2000, 1 << 10); // ~2.3 MB of history
    let mut since = cursor(rows[0].event_id - 16, u32::MAX);
    let mut ids = Vec::new();
    let mut answers = 0;
    while ids.len() < 2000 {
        assert!(answers < 200, "too many answers");
        let r = get(
            fake.addr,
            &format!("/changes?labels=parameters&since={since}&max=10000&wait=0s"),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.len() <= (64 << 10) + 2048, "answer of {} bytes", r.body.len());
        let v = r.json();
        let changes = v["changes"].as_array().unwrap();
        assert!(!changes.is_empty() && changes.len() <= 1000);
        ids.extend(changes.iter().map(|c| c["new"]["id"].as_i64().unwrap()));
        since = v["cursor"].as_str().unwrap().to_string();
        answers += 1;
    }
    assert_eq!(ids, (1..=2000).collect::<Vec<_>>(), "every change once, in order");
    // The worker was asked with a byte budget and a capped row count.
    let w = fake.world.lock().unwrap();
    for r in &w.requests {
        if let RequestKind::History {
            max, max_bytes, role, ..
        } = &r.kind
        {
            assert!(*max <= changerelay_endpoint::MAX_HISTORY_ROWS);
            assert_eq!(*max_bytes, 64 << 10);
            assert_eq!(*role, 0, "trust");
        }
    }
}

#[test]
fn one_change_larger_than_client_buffer_is_still_delivered() {
    let mut cfg = test_config(Auth::Trust);
    cfg.client_buffer = 64 << 10;
    let fake = Fake::start(cfg);
    let before = fake.head();
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    // Live: one 200 KiB change on an empty queue.
    fake.commit_n("parameters", 1, 1, 200 << 10);
    let got = read_changes(&mut ws, 1);
    assert_eq!(got[0]["new"]["pad"].as_str().unwrap().len(), 200 << 10);
    fake.commit_n("parameters", 2, 1, 0);
    assert_eq!(read_changes(&mut ws, 1)[0]["new"]["id"], 2, "and the client goes on");
    // From history: WebSocket catch-up, SSE and long-poll.
    let mut ws2 = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws2,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false,"since":before}),
    );
    let got = read_changes(&mut ws2, 2);
    assert_eq!(ids(&got).len(), 2);
    let r = get(
        fake.addr,
        &format!("/changes?labels=parameters&since={before}&wait=0s"),
        &[],
    );
    let v = r.json();
    assert_eq!(
        v["changes"].as_array().unwrap().len(),
        1,
        "one row, larger than the bound"
    );
    assert_eq!(v["changes"][0]["new"]["id"], 1);
    assert_eq!(
        metric(fake.addr, "changerelay_endpoint_slow_client_disconnects_total"),
        0
    );
}

fn sse(addr: std::net::SocketAddr, path: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    r
}

/// `data:` of the next `n` SSE change events.
fn sse_changes(r: &mut BufReader<TcpStream>, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut event = String::new();
    while out.len() < n {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended");
        let line = line.trim_end();
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            if event == "change" {
                out.push(serde_json::from_str(d).unwrap());
            }
        }
    }
    out
}

/// Subscribers of every kind; `publish` makes rows reach them some way; each must get them exactly once.
fn every_subscriber_gets(fake: &Fake, publish: impl FnOnce(&Fake) -> Vec<i64>) {
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    let mut sse = sse(fake.addr, "/events?labels=parameters");
    // From the current head: whether its (empty) history answer comes before or after the commits, the
    // first change it returns is the first one published.
    let poll = {
        let addr = fake.addr;
        let since = fake.head();
        std::thread::spawn(move || get(addr, &format!("/changes?labels=parameters&since={since}&wait=10s"), &[]).json())
    };
    // The long-poll is waiting once the endpoint counts its connection.
    assert!(wait_until(Duration::from_secs(3), || metric(
        fake.addr,
        "changerelay_endpoint_clients"
    ) >= 4));
    let expected = publish(fake);
    let got: Vec<i64> = read_changes(&mut ws, expected.len())
        .iter()
        .map(|c| c["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, expected, "WebSocket");
    let got: Vec<i64> = sse_changes(&mut sse, expected.len())
        .iter()
        .map(|c| c["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, expected, "SSE");
    let v = poll.join().unwrap();
    assert_eq!(v["changes"][0]["new"]["id"].as_i64(), Some(expected[0]), "long-poll");
    // Live again afterwards, nothing repeated.
    fake.commit_n("parameters", 9000, 1, 0);
    assert_eq!(read_changes(&mut ws, 1)[0]["new"]["id"], 9000);
    assert_eq!(sse_changes(&mut sse, 1)[0]["new"]["id"], 9000);
}

#[test]
fn a_batch_the_channel_cannot_hold_becomes_a_gap_filled_from_history() {
    let mut cfg = test_config(Auth::Trust);
    cfg.worker_channel_bytes = 64 << 10;
    cfg.client_buffer = 4 << 20;
    let fake = Fake::start(cfg);
    // A version subscriber too: after a gap it gets its full map again.
    let mut versions = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut versions,
        json!({"op":"subscribe","labels":["parameters"],"versions":true}),
    );
    assert_eq!(ws_json(&mut versions)["label"], "parameters", "the first snapshot");
    every_subscriber_gets(&fake, |f| {
        // 3 transactions; the middle one (100 KiB) is larger than the whole channel: always a gap.
        f.commit_n("parameters", 1, 1, 0);
        f.commit_n("parameters", 2, 1, 100 << 10);
        f.commit_n("parameters", 3, 1, 0);
        vec![1, 2, 3]
    });
    assert_eq!(metric(fake.addr, "changerelay_endpoint_channel_gaps_total"), 1);
    assert!(
        metric(fake.addr, "changerelay_endpoint_catch_ups_total") >= 2,
        "WebSocket and SSE at least"
    );
    // The version subscriber saw a delta, then (the gap) a full map holding all three, never a hole.
    let mut seen = serde_json::Map::new();
    while !(seen.contains_key("1") && seen.contains_key("2") && seen.contains_key("3") && seen.contains_key("9000")) {
        let m = ws_json(&mut versions);
        assert_eq!(m["label"], "parameters", "{m}");
        seen.extend(m["data"].as_object().unwrap().clone());
    }
    assert_eq!(metric(fake.addr, "changerelay_endpoint_version_refetches_total"), 1);
}

#[test]
fn a_batch_without_its_rows_is_filled_from_history() {
    let fake = Fake::trust();
    every_subscriber_gets(&fake, |f| {
        let rows: Vec<Value> = (1..=5).map(|i| json!({"id": i, "tenant": "t1"})).collect();
        f.commit_omitted("parameters", &rows);
        f.commit_n("parameters", 6, 1, 0);
        vec![1, 2, 3, 4, 5, 6]
    });
    assert_eq!(metric(fake.addr, "changerelay_endpoint_channel_gaps_total"), 0);
    // WebSocket and SSE, and the long-poll unless it was still reading its history.
    assert!(metric(fake.addr, "changerelay_endpoint_catch_ups_total") >= 2);
}
