//! WebSocket feeds: version snapshots and deltas, changes from history into live, reconnects, filters.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[test]
fn version_snapshot_then_increments() {
    let fake = Fake::trust();
    fake.commit_n("parameters", 1, 3, 0);
    let mut ws = ws_connect(fake.addr, "/ws");
    let sub = subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"versions":true,"changes":false}),
    );
    assert_eq!(sub["labels"], json!(["parameters"]));
    let snapshot = ws_json(&mut ws);
    assert_eq!(snapshot["label"], "parameters");
    let all_v = snapshot["data"]["all"]["v"].as_u64().unwrap();
    assert_eq!(all_v, 1000 + 3 * 16);
    assert_eq!(snapshot["data"].as_object().unwrap().len(), 4, "{snapshot}");
    fake.commit_n("flags", 10, 1, 0); // another label: nothing for us
    let rows = fake.commit_n("parameters", 7, 1, 0);
    let delta = ws_json(&mut ws);
    assert_eq!(delta["label"], "parameters", "{delta}");
    let data = delta["data"].as_object().unwrap();
    assert_eq!(data.len(), 2, "only moved entries: {delta}");
    assert_eq!(data["all"]["v"].as_u64(), Some(rows[0].event_id));
    assert_eq!(data["7"]["v"].as_u64(), Some(rows[0].event_id));
}

#[test]
fn deltas_while_the_snapshot_is_outstanding_are_not_sent_again() {
    let fake = Fake::trust();
    fake.commit_n("parameters", 1, 1, 0);
    fake.world.lock().unwrap().reply_delay = Duration::from_millis(300);
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(&mut ws, json!({"op":"subscribe","labels":["parameters"]}));
    let during = fake.commit_n("parameters", 2, 1, 0); // before the worker answers
    let snapshot = ws_json(&mut ws);
    assert_eq!(
        snapshot["data"]["all"]["v"].as_u64(),
        Some(during[0].event_id),
        "{snapshot}"
    );
    assert!(
        snapshot["data"].get("1").is_some() && snapshot["data"].get("2").is_some(),
        "a full map"
    );
    let after = fake.commit_n("parameters", 3, 1, 0);
    let delta = ws_json(&mut ws);
    assert_eq!(
        delta["data"]["all"]["v"].as_u64(),
        Some(after[0].event_id),
        "the next message is the later delta"
    );
    assert!(delta["data"].get("2").is_none());
}

#[test]
fn changes_from_cursor_through_history_into_live_exactly_once() {
    let fake = Fake::trust();
    fake.world.lock().unwrap().reply_delay = Duration::from_millis(15);
    let early = fake.commit_n("parameters", 1, 30, 0);
    fake.commit_n("flags", 100, 5, 0);
    let since = early[9].cursor.clone();
    let mut ws = ws_connect(fake.addr, "/ws");
    // Keep committing while the history is read page by page (7 rows per reply, 15 ms each).
    let writer = {
        let f = fake.handle();
        std::thread::spawn(move || {
            for i in 0..60u64 {
                f.commit_n(if i % 3 == 0 { "flags" } else { "parameters" }, 1000 + i, 1, 0);
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let sub = subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"since":since,"versions":false,"changes":true}),
    );
    assert_eq!(sub["cursor"], since.as_str());
    writer.join().unwrap();
    let expected: Vec<(u64, i64)> = {
        let w = fake.world.lock().unwrap();
        w.history
            .iter()
            .filter(|r| r.label == "parameters" && pos_of(&r.cursor) > pos_of(&since))
            .map(|r| (r.event_id, i64::from(r.seq)))
            .collect()
    };
    assert_eq!(expected.len(), 20 + 40);
    let got = read_changes(&mut ws, expected.len());
    assert_eq!(
        ids(&got),
        expected,
        "every change after the cursor, once, in commit order"
    );
    // Nothing more: the next message is a checkpoint at the head.
    let cp = ws_json(&mut ws);
    assert_eq!(cp["type"], "checkpoint", "{cp}");
    assert_eq!(pos_of(cp["cursor"].as_str().unwrap()), pos_of(&fake.head()));
    // History was read in several pages.
    let pages = fake.world.lock().unwrap().requests.len();
    assert!(pages >= 3, "{pages} history requests");
    let first = &got[0];
    assert_eq!(first["label"], "parameters");
    assert_eq!(first["table"], "public.parameters");
    assert_eq!(first["op"], "insert");
    assert_eq!(first["new"]["id"], 11);
    assert_eq!(first["key"], json!({"id": 11}));
    assert_eq!(first["metadata"], json!({"actor": "test"}));
    assert_eq!(first["old"], Value::Null);
}

#[test]
fn reconnect_with_last_cursor_resumes() {
    let fake = Fake::trust();
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"since":null,"changes":true,"versions":false}),
    );
    fake.commit_n("parameters", 1, 5, 0);
    let first = read_changes(&mut ws, 5);
    let last = first[4]["cursor"].as_str().unwrap().to_string();
    drop(ws);
    fake.commit_n("parameters", 6, 4, 0);
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"since":last,"changes":true,"versions":false}),
    );
    fake.commit_n("parameters", 10, 2, 0);
    let rest = read_changes(&mut ws, 6);
    let got: Vec<i64> = rest.iter().map(|c| c["new"]["id"].as_i64().unwrap()).collect();
    assert_eq!(got, vec![6, 7, 8, 9, 10, 11]);
}

#[test]
fn live_rows_are_filtered_per_subscription() {
    let fake = Fake::trust();
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false,"filter":{"tenant":"t1"}}),
    );
    fake.commit_n("parameters", 1, 6, 0);
    let got = read_changes(&mut ws, 3);
    let ids: Vec<i64> = got.iter().map(|c| c["new"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![2, 4, 6]);
}

#[test]
fn catching_up_on_more_than_client_buffer_is_not_cut() {
    let mut cfg = test_config(changerelay_endpoint::Auth::Trust);
    cfg.client_buffer = 64 << 10;
    let fake = Fake::start(cfg);
    fake.world.lock().unwrap().page = 100; // ~200 KiB pages: more than the whole buffer
    let big_map: Vec<Value> = (0..2000).map(|i| json!({"id": i})).collect();
    fake.commit("flags", &big_map); // a ~90 KiB version map
    let rows = fake.commit_n("parameters", 1, 400, 2 << 10); // ~800 KiB of history
    let mut ws = ws_connect(fake.addr, "/ws");
    subscribe(&mut ws, json!({"op":"subscribe","labels":["flags"],"versions":true}));
    let snapshot = ws_json(&mut ws);
    assert_eq!(snapshot["data"].as_object().unwrap().len(), 2001);
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"since":rows[0].cursor,"changes":true,"versions":false}),
    );
    let got = read_changes(&mut ws, 399);
    assert_eq!(got[398]["new"]["id"], 400);
    assert_eq!(
        metric(fake.addr, "changerelay_endpoint_slow_client_disconnects_total"),
        0
    );
    fake.commit_n("parameters", 401, 1, 0);
    assert_eq!(read_changes(&mut ws, 1)[0]["new"]["id"], 401);
}
