//! HTTP feeds: long-poll (immediate, waiting, refusals) and Server-Sent Events (resume, checkpoints, resync).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[test]
fn long_poll_returns_at_once_or_waits() {
    let fake = Fake::trust();
    let rows = fake.commit_n("parameters", 1, 4, 0);
    fake.commit_n("flags", 50, 2, 0);
    // Rows exist after the cursor: immediate.
    let t = Instant::now();
    let r = get(
        fake.addr,
        &format!("/changes?labels=parameters&since={}&wait=30s&max=2", rows[0].cursor),
        &[],
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let v = r.json();
    let got: Vec<i64> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![2, 3]);
    assert_eq!(v["cursor"], rows[2].cursor.as_str());
    // Nothing after the last: waits, then a commit from elsewhere releases it.
    let since = rows[3].cursor.clone();
    let h = fake.handle();
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        h.commit_n("flags", 90, 1, 0); // not ours: keeps waiting
        std::thread::sleep(Duration::from_millis(100));
        h.commit_n("parameters", 5, 1, 0)
    });
    let t = Instant::now();
    let r = get(
        fake.addr,
        &format!("/changes?labels=parameters&since={since}&wait=10s"),
        &[],
    );
    let took = t.elapsed();
    let new = committer.join().unwrap();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let v = r.json();
    assert_eq!(v["changes"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["changes"][0]["new"]["id"], 5);
    assert_eq!(v["cursor"], new[0].cursor.as_str());
    // Nothing at all: empty after `wait`, with a cursor that resumes at the same place.
    let t = Instant::now();
    let r = get(
        fake.addr,
        &format!("/changes?labels=parameters&since={}&wait=500ms", new[0].cursor),
        &[],
    );
    assert!(t.elapsed() >= Duration::from_millis(450), "{:?}", t.elapsed());
    let v = r.json();
    assert_eq!(v["changes"], json!([]));
    assert!(pos_of(v["cursor"].as_str().unwrap()) >= pos_of(&new[0].cursor));
    // From now (no since): only what commits after.
    let h = fake.handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        h.commit_n("parameters", 6, 1, 0);
    });
    let v = get(fake.addr, "/changes?labels=parameters&wait=5s", &[]).json();
    assert_eq!(v["changes"][0]["new"]["id"], 6, "{v}");
}

#[test]
fn long_poll_refuses_bad_parameters() {
    let fake = Fake::trust();
    let rows = fake.commit_n("parameters", 1, 3, 0);
    for q in [
        "since=cr1_nope",
        "wait=abc",
        "wait=5h",
        "max=0",
        "max=10001",
        "filter=%7Bnot",
        "filter=%5B1%5D",
        "labels=a%20b",
    ] {
        let r = get(fake.addr, &format!("/changes?{q}"), &[]);
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        let v = r.json();
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "{q}"
        );
    }
    assert_eq!(get(fake.addr, "/changes?labels=nosuch", &[]).status, 404);
    fake.world.lock().unwrap().horizon = pos_of(&rows[1].cursor);
    let r = get(
        fake.addr,
        &format!("/changes?labels=parameters&since={}", rows[0].cursor),
        &[],
    );
    assert_eq!(r.status, 410);
    assert_eq!(r.json()["reason"], "cursor_expired");
    let foreign = changerelay_core::cursor::Cursor {
        system_id: 9,
        timeline: 1,
        event_id: 5,
        pos: 0,
    }
    .encode();
    let r = get(fake.addr, &format!("/changes?labels=parameters&since={foreign}"), &[]);
    assert_eq!((r.status, r.json()["reason"].as_str()), (410, Some("cursor_foreign")));
    fake.world.lock().unwrap().horizon = (0, 0);
    let f = "%7B%22tenant%22%3A%22t1%22%7D";
    let r = get(
        fake.addr,
        &format!("/changes?labels=parameters&since={}&filter={f}&wait=0s", rows[0].cursor),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["changes"].as_array().unwrap().len(), 1, "only tenant t1: {v}");
    assert_eq!(v["changes"][0]["new"]["id"], 2);
}

/// Reads SSE events (id, event, data) until `n` non-checkpoint events arrived.
fn sse_events(reader: &mut BufReader<TcpStream>, n: usize) -> Vec<(Option<String>, String, String)> {
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (None, String::new(), String::new());
    while out.len() < n {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
        let line = line.trim_end_matches('\n');
        if line.is_empty() {
            if !event.is_empty() && event != "checkpoint" {
                out.push((id.take(), std::mem::take(&mut event), std::mem::take(&mut data)));
            }
            id = None;
            event.clear();
            data.clear();
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = v.to_string();
        }
    }
    out
}

fn sse_open(addr: std::net::SocketAddr, path: &str, headers: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n").as_bytes())
        .unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" {
            return r;
        }
        if l.to_ascii_lowercase().starts_with("content-type") {
            assert!(l.contains("text/event-stream"), "{l}");
        }
    }
}

fn new_ids(events: &[(Option<String>, String, String)]) -> Vec<i64> {
    events
        .iter()
        .map(|(_, _, d)| serde_json::from_str::<Value>(d).unwrap()["new"]["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn sse_resumes_from_last_event_id() {
    let fake = Fake::trust();
    let rows = fake.commit_n("parameters", 1, 6, 0);
    // Last-Event-ID wins over since.
    let path = format!("/events?labels=parameters&since={}", rows[0].cursor);
    let mut r = sse_open(fake.addr, &path, &format!("Last-Event-ID: {}\r\n", rows[3].cursor));
    fake.commit_n("parameters", 7, 1, 0);
    let ev = sse_events(&mut r, 3);
    assert_eq!(new_ids(&ev), vec![5, 6, 7]);
    assert!(ev.iter().all(|(_, e, _)| e == "change"));
    assert_eq!(
        ev[0].0.as_deref(),
        Some(rows[4].cursor.as_str()),
        "id is the change's cursor"
    );
    // Reconnect with the last id seen: nothing repeated.
    let last = ev[2].0.clone().unwrap();
    drop(r);
    fake.commit_n("parameters", 8, 2, 0);
    let mut r = sse_open(
        fake.addr,
        "/events?labels=parameters",
        &format!("Last-Event-ID: {last}\r\n"),
    );
    let ev = sse_events(&mut r, 2);
    assert_eq!(new_ids(&ev), vec![8, 9]);
    // Idle: a checkpoint whose id is the head.
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut checkpoint_id = None;
    while Instant::now() < deadline && checkpoint_id.is_none() {
        line.clear();
        r.read_line(&mut line).unwrap();
        if let Some(id) = line.trim_end().strip_prefix("id: ") {
            checkpoint_id = Some(id.to_string());
        }
    }
    assert_eq!(checkpoint_id.map(|c| pos_of(&c)), Some(pos_of(&fake.head())));
    // An expired cursor: a resync event, then the stream ends.
    fake.world.lock().unwrap().horizon = pos_of(&rows[2].cursor);
    let mut r = sse_open(
        fake.addr,
        "/events?labels=parameters",
        &format!("Last-Event-ID: {}\r\n", rows[0].cursor),
    );
    let ev = sse_events(&mut r, 1);
    assert_eq!(ev[0].1, "resync");
    assert!(ev[0].2.contains("cursor_expired"));
    let mut rest = String::new();
    r.read_to_string(&mut rest).expect("ends");
}

#[test]
fn an_sse_client_that_goes_away_is_noticed() {
    let fake = Fake::trust();
    let r = sse_open(fake.addr, "/events?labels=parameters", "");
    assert_eq!(
        metric(fake.addr, "changerelay_endpoint_clients"),
        2,
        "the stream and the metrics request"
    );
    drop(r);
    // Noticed at the latest when the next checkpoint (300 ms) fails to write.
    assert!(wait_until(Duration::from_secs(3), || metric(
        fake.addr,
        "changerelay_endpoint_clients"
    ) == 1));
}
