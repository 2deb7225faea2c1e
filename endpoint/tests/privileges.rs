//! Privileges the worker computes and the endpoint enforces: readable tables, row audiences (RLS), the role
//! history is read as, and token changes closing connections within a second.

mod common;

use std::time::{Duration, Instant};

use changerelay_endpoint::{RequestKind, ToEndpoint, Token};
use common::*;
use serde_json::json;
use sha2::{Digest, Sha256};

fn tok(secret: &str, labels: &[&str], rows: bool, role: u32, readable: &[&str]) -> Token {
    Token {
        name: secret.into(),
        sha256: Sha256::digest(secret.as_bytes()).into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        rows,
        role,
        readable: readable.iter().map(|l| relid(l)).collect(),
    }
}

fn ids_of(v: &serde_json::Value) -> Vec<i64> {
    v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["new"]["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn rows_go_only_to_tokens_that_may_read_their_table_and_are_in_their_audience() {
    let fake = Fake::start(test_config(changerelay_endpoint::Auth::Token));
    let both = ["parameters", "flags"];
    fake.publish(ToEndpoint::Tokens(vec![
        tok("a", &both, true, ROLE, &["parameters"]), // may not read the flags table
        tok("b", &both, true, ROLE + 1, &both),
    ]));
    fake.wait_token("a");
    let start = fake.head();
    let sub = json!({"op":"subscribe","labels":both,"changes":true,"versions":false});
    let mut a = ws_connect(fake.addr, "/ws?token=a");
    subscribe(&mut a, sub.clone());
    let mut b = ws_connect(fake.addr, "/ws?token=b");
    subscribe(&mut b, sub);
    fake.commit("flags", &[json!({"id": 1})]);
    fake.commit("parameters", &[json!({"id": 2, "audience": [ROLE]})]); // RLS: only role a
    fake.commit("parameters", &[json!({"id": 3})]);
    let live = |ws: &mut Ws, n| {
        read_changes(ws, n)
            .iter()
            .map(|c| c["new"]["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(live(&mut a, 2), vec![2, 3], "a: not the flags table");
    assert_eq!(live(&mut b, 2), vec![1, 3], "b: not the row outside its audience");
    // The same from the history, read as each token's role.
    let poll = |secret: &str| {
        let r = get(
            fake.addr,
            &format!("/changes?labels=parameters,flags&since={start}&wait=0s"),
            &[("Authorization", &format!("Bearer {secret}"))],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        ids_of(&r.json())
    };
    assert_eq!(poll("a"), vec![2, 3]);
    assert_eq!(poll("b"), vec![1, 3]);
    let roles: Vec<u32> = fake
        .world
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter_map(|r| match &r.kind {
            RequestKind::History { role, .. } => Some(*role),
            _ => None,
        })
        .collect();
    assert!(roles.contains(&ROLE) && roles.contains(&(ROLE + 1)), "{roles:?}");
}

#[test]
fn tokens_that_lose_labels_or_rows_close_within_a_second_and_new_privileges_apply() {
    let fake = Fake::start(test_config(changerelay_endpoint::Auth::Token));
    let both = ["parameters", "flags"];
    fake.publish(ToEndpoint::Tokens(vec![
        tok("labels", &both, true, ROLE, &both),
        tok("rows", &["parameters"], true, ROLE, &both),
        tok("tables", &["parameters"], true, ROLE, &both),
    ]));
    fake.wait_token("tables");
    let mut loses_label = ws_connect(fake.addr, "/ws?token=labels");
    subscribe(
        &mut loses_label,
        json!({"op":"subscribe","labels":["flags"],"changes":true,"versions":false}),
    );
    let mut loses_rows = ws_connect(fake.addr, "/ws?token=rows");
    subscribe(
        &mut loses_rows,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    let mut loses_table = ws_connect(fake.addr, "/ws?token=tables");
    subscribe(
        &mut loses_table,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    let t = Instant::now();
    fake.publish(ToEndpoint::Tokens(vec![
        tok("labels", &["parameters"], true, ROLE, &both),
        tok("rows", &["parameters"], false, ROLE, &both),
        tok("tables", &["parameters"], true, ROLE, &["flags"]), // may no longer read the parameters table
    ]));
    for ws in [&mut loses_label, &mut loses_rows] {
        let (code, _) = ws_close_code(ws, Duration::from_secs(1));
        assert_eq!(code, Some((4003, "token revoked".to_string())));
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Still connected, but the table is no longer readable: nothing arrives, the next checkpoint does.
    fake.commit_n("parameters", 1, 1, 0);
    match ws_next(&mut loses_table, Duration::from_secs(3)) {
        Got::Json(v) => assert_eq!(v["type"], "checkpoint", "{v}"),
        Got::Closed(c) => panic!("closed: {c:?}"),
        Got::Timeout => panic!("no checkpoint"),
    }
}
