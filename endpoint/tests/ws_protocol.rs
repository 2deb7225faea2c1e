//! WebSocket protocol: command errors, resync, close codes (1001, 1003, 1009, 4001, 4003), the thread's signals.

mod common;

use std::time::{Duration, Instant};

use changerelay_endpoint::{Auth, ToEndpoint};
use common::*;
use serde_json::json;

#[test]
fn errors_keep_the_connection_open() {
    let fake = Fake::start(test_config(Auth::Token));
    fake.publish(ToEndpoint::Tokens(vec![token("s3cret", &["parameters"], true)]));
    std::thread::sleep(Duration::from_millis(50));
    let mut ws = ws_connect(fake.addr, "/ws?token=s3cret");
    ws.send(tungstenite::Message::text("{nope")).unwrap();
    let e = ws_json(&mut ws);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_json")),
        "{e}"
    );
    ws_send(&mut ws, &json!({"op":"dance"}));
    assert_eq!(ws_json(&mut ws)["code"], "unknown_op");
    ws_send(&mut ws, &json!({"op":"subscribe","labels":["nosuch"]}));
    let e = ws_json(&mut ws);
    assert_eq!(e["code"], "forbidden", "outside the token first: {e}");
    let fake_trust = Fake::trust();
    let mut ws2 = ws_connect(fake_trust.addr, "/ws");
    ws_send(&mut ws2, &json!({"op":"subscribe","labels":["nosuch"]}));
    let e = ws_json(&mut ws2);
    assert_eq!(
        (e["code"].as_str(), e["label"].as_str()),
        (Some("unknown_label"), Some("nosuch")),
        "{e}"
    );
    ws_send(
        &mut ws2,
        &json!({"op":"subscribe","labels":["parameters"],"since":"cr1_garbage","changes":true}),
    );
    assert_eq!(ws_json(&mut ws2)["code"], "bad_cursor");
    ws_send(
        &mut ws2,
        &json!({"op":"subscribe","labels":["parameters"],"changes":true,"filter":[1]}),
    );
    assert_eq!(ws_json(&mut ws2)["code"], "bad_filter");
    // Still open and working.
    subscribe(&mut ws2, json!({"op":"subscribe","labels":["parameters"]}));
    assert_eq!(ws_json(&mut ws2)["label"], "parameters");
    subscribe(&mut ws, json!({"op":"subscribe","labels":["parameters"]}));
}

#[test]
fn expired_and_foreign_cursors_ask_for_resync() {
    let fake = Fake::trust();
    let rows = fake.commit_n("parameters", 1, 5, 0);
    fake.world.lock().unwrap().horizon = pos_of(&rows[2].cursor);
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"since":rows[0].cursor,"changes":true,"versions":false}),
    );
    let r = ws_json(&mut ws);
    assert_eq!(
        (r["type"].as_str(), r["reason"].as_str()),
        (Some("resync"), Some("cursor_expired")),
        "{r}"
    );
    assert_eq!(r["labels"], json!(["parameters"]));
    let foreign = changerelay_core::cursor::Cursor {
        system_id: 1,
        timeline: 1,
        event_id: 5,
        pos: 0,
    }
    .encode();
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"since":foreign,"changes":true,"versions":false}),
    );
    assert_eq!(ws_json(&mut ws)["reason"], "cursor_foreign");
    // A good cursor still works afterwards.
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"since":rows[3].cursor,"changes":true,"versions":false}),
    );
    assert_eq!(read_changes(&mut ws, 1)[0]["new"]["id"], 5);
}

#[test]
fn binary_frame_closes_1003() {
    let fake = Fake::trust();
    let mut ws = ws_connect(fake.addr, "/ws");
    ws.send(tungstenite::Message::binary(vec![1u8, 2, 3])).unwrap();
    let (code, _) = ws_close_code(&mut ws, Duration::from_secs(3));
    assert_eq!(code.map(|c| c.0), Some(1003));
}

#[test]
fn oversized_message_closes_1009() {
    let fake = Fake::trust(); // max_client_message 4096
    let mut ws = ws_connect(fake.addr, "/ws");
    let big = format!("{{\"op\":\"subscribe\",\"labels\":[\"{}\"]}}", "x".repeat(10_000));
    ws.send(tungstenite::Message::text(big)).unwrap();
    let mut codes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match ws_next(&mut ws, Duration::from_secs(3)) {
            Got::Json(v) => codes.push(v["code"].as_str().unwrap_or("").to_string()),
            Got::Closed(c) => {
                assert_eq!(c.map(|c| c.0), Some(1009));
                assert_eq!(codes, vec!["too_large"]);
                return;
            }
            Got::Timeout => break,
        }
    }
    panic!("no close 1009");
}

#[test]
fn revoked_token_closes_within_a_second() {
    let fake = Fake::start(test_config(Auth::Token));
    let keep = token("keep", &["parameters"], true);
    fake.publish(ToEndpoint::Tokens(vec![
        token("gone", &["parameters"], true),
        keep.clone(),
    ]));
    std::thread::sleep(Duration::from_millis(50));
    let mut doomed = ws_connect(fake.addr, "/ws?token=gone");
    let mut kept = ws_connect(fake.addr, "/ws?token=keep");
    subscribe(
        &mut doomed,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    subscribe(
        &mut kept,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    let t = Instant::now();
    fake.publish(ToEndpoint::Tokens(vec![keep]));
    let (code, _) = ws_close_code(&mut doomed, Duration::from_secs(1));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(code, Some((4003, "token revoked".to_string())));
    fake.commit_n("parameters", 1, 1, 0);
    assert_eq!(read_changes(&mut kept, 1)[0]["new"]["id"], 1);
}

#[test]
fn slow_client_is_cut_while_a_fast_one_keeps_up() {
    let mut cfg = test_config(Auth::Trust);
    cfg.client_buffer = 256 << 10;
    cfg.checkpoint_every = Duration::from_secs(60);
    let fake = Fake::start(cfg);
    let mut slow = ws_connect(fake.addr, "/ws");
    let mut fast = ws_connect(fake.addr, "/ws");
    let sub = json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false});
    subscribe(&mut slow, sub.clone());
    subscribe(&mut fast, sub);
    // The fast client reads everything on its own thread, until 2 s pass without a message.
    let reader = std::thread::spawn(move || {
        let mut n = 0u64;
        let mut last = 0i64;
        loop {
            match ws_next(&mut fast, Duration::from_secs(2)) {
                Got::Json(v) if v["type"] == "change" => {
                    let id = v["new"]["id"].as_i64().unwrap();
                    assert_eq!(id, last + 1, "in order, none lost");
                    last = id;
                    n += 1;
                }
                Got::Json(_) => {}
                Got::Closed(c) => panic!("fast client closed: {c:?}"),
                Got::Timeout => return n,
            }
        }
    });
    // 8 KiB rows until the slow one is cut (kernel buffers hold a few MB first), bounded.
    let mut sent = 0u64;
    while metric(fake.addr, "changerelay_endpoint_slow_client_disconnects_total") == 0 {
        assert!(sent < 8000, "slow client never cut");
        fake.commit_n("parameters", sent + 1, 10, 8 << 10);
        sent += 10;
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("slow client cut after {sent} rows of 8 KiB");
    // The slow client finally reads: whatever was in flight, then close 4001.
    let (code, _) = ws_close_code(&mut slow, Duration::from_secs(10));
    assert_eq!(
        code,
        Some((
            4001,
            "slow client: send queue exceeded changerelay.client_buffer".to_string()
        ))
    );
    fake.commit_n("parameters", sent + 1, 10, 8 << 10);
    sent += 10;
    let received = reader.join().unwrap();
    assert_eq!(received, sent, "the fast client got every change");
    assert_eq!(
        metric(fake.addr, "changerelay_endpoint_slow_client_disconnects_total"),
        1
    );
}

#[test]
fn shutdown_closes_1001_within_a_second() {
    let fake = Fake::trust();
    let mut a = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut a,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    let mut b = ws_connect(fake.addr, "/ws");
    let mut sse = std::net::TcpStream::connect(fake.addr).unwrap();
    std::io::Write::write_all(
        &mut sse,
        format!("GET /events?labels=parameters HTTP/1.1\r\nHost: {}\r\n\r\n", fake.addr).as_bytes(),
    )
    .unwrap();
    let poll = {
        let addr = fake.addr;
        std::thread::spawn(move || get(addr, "/changes?labels=parameters&wait=60s", &[]))
    };
    std::thread::sleep(Duration::from_millis(200));
    let took = fake.shutdown();
    assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
    for ws in [&mut a, &mut b] {
        let (code, _) = ws_close_code(ws, Duration::from_secs(2));
        assert_eq!(code.map(|c| c.0), Some(1001));
    }
    sse.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut sse, &mut buf).expect("SSE stream ended (EOF)");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    let poll = poll.join().unwrap();
    assert_eq!(poll.status, 503, "{}", poll.body);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(std::net::TcpStream::connect(fake.addr).is_err(), "no longer listening");
}

/// The endpoint thread blocks every signal (Postgres's handlers must only run on the worker's main thread);
/// the caller's mask is unchanged.
#[test]
fn endpoint_thread_blocks_all_signals() {
    fn sig_blocked(task: &str) -> u64 {
        let status = std::fs::read_to_string(format!("{task}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
        u64::from_str_radix(line.trim_start_matches("SigBlk:").trim(), 16).unwrap()
    }
    let before = sig_blocked("/proc/thread-self");
    let (endpoint, _port) = changerelay_endpoint::start(test_config(Auth::Trust)).unwrap();
    assert_eq!(sig_blocked("/proc/thread-self"), before);
    // The new thread names itself once running; other tests' threads come and go meanwhile.
    let find = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| Some(e.ok()?.path()))
            .find(|p| std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.starts_with("changerelay end")))
    };
    assert!(
        wait_until(Duration::from_secs(2), || find().is_some()),
        "the endpoint thread"
    );
    let task = find().unwrap();
    let mask = sig_blocked(task.to_str().unwrap());
    for sig in [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGQUIT,
        libc::SIGALRM,
    ] {
        assert!(mask & (1 << (sig - 1)) != 0, "signal {sig} not blocked: {mask:x}");
    }
    endpoint.shutdown();
}
