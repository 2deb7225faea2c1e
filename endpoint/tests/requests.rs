//! Requests to the worker are limited per token (and in total): more wait their turn, one-shot HTTP requests
//! past a deep queue get 429.

mod common;

use std::time::Duration;

use changerelay_endpoint::{Auth, ToEndpoint};
use common::*;
use serde_json::json;

#[test]
fn one_token_has_at_most_four_requests_at_the_worker_and_all_are_answered() {
    let fake = Fake::start(test_config(Auth::Token));
    fake.publish(ToEndpoint::Tokens(vec![token("t", &["parameters"], true)]));
    fake.wait_token("t");
    let rows = fake.commit_n("parameters", 1, 3, 0);
    fake.world.lock().unwrap().reply_delay = Duration::from_millis(150);
    let mut clients: Vec<Ws> = (0..12).map(|_| ws_connect(fake.addr, "/ws?token=t")).collect();
    for ws in clients.iter_mut() {
        ws_send(
            ws,
            &json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false,"since":rows[0].cursor}),
        );
    }
    for ws in clients.iter_mut() {
        assert_eq!(ws_json_skip_checkpoints(ws)["type"], "subscribed");
        let got = read_changes(ws, 2);
        assert_eq!(ids(&got).len(), 2);
    }
    let most = fake.world.lock().unwrap().max_waiting;
    assert!(
        (1..=4).contains(&most),
        "the worker held {most} requests of one token at once"
    );
}

#[test]
fn one_shot_requests_past_a_deep_queue_get_429() {
    let fake = Fake::start(test_config(Auth::Token));
    fake.publish(ToEndpoint::Tokens(vec![token("t", &["parameters"], true)]));
    fake.wait_token("t");
    let rows = fake.commit_n("parameters", 1, 1, 0);
    fake.world.lock().unwrap().reply_delay = Duration::from_millis(400);
    let polls: Vec<_> = (0..30)
        .map(|_| {
            let (addr, since) = (fake.addr, rows[0].cursor.clone());
            std::thread::spawn(move || {
                get(
                    addr,
                    &format!("/changes?labels=parameters&since={since}&wait=0s"),
                    &[("Authorization", "Bearer t")],
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = polls.into_iter().map(|p| p.join().unwrap()).collect();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!((1..=10).contains(&refused), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert_eq!(
        metric(
            fake.addr,
            "changerelay_endpoint_refusals_total{reason=\"requests_per_token\"}"
        ),
        refused as u64
    );
}
