//! A sink against an in-memory broker that fails on demand and a fake worker that answers reads from a
//! vector: every change lands once, in order, through connection failures, refused writes and restarts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc as tmpsc;

use crate::api::*;
use crate::broker::{Broker, BrokerError, ErrorKind, Written};
use crate::config::Target;
use crate::outbox::Outbox;

#[derive(Default)]
struct Fake {
    streams: HashMap<String, Vec<(u64, u32)>>,
    /// Connections to refuse before one succeeds.
    refuse_connects: usize,
    /// Rows to accept before the next write fails (then the count is cleared).
    fail_after: Option<usize>,
    duplicates_seen: usize,
    /// Rows asked for by each write, in order.
    write_sizes: Vec<usize>,
}

thread_local! {
    static FAKE: RefCell<Fake> = RefCell::new(Fake::default());
}

struct FakeBroker;

impl Broker for FakeBroker {
    async fn connect(_: &Target, _: u64) -> Result<Self, BrokerError> {
        FAKE.with_borrow_mut(|f| {
            if f.refuse_connects > 0 {
                f.refuse_connects -= 1;
                return Err(BrokerError::new(ErrorKind::Unreachable, "connection refused"));
            }
            Ok(FakeBroker)
        })
    }

    async fn last(&mut self, destination: &str) -> Result<Option<(u64, u32)>, BrokerError> {
        Ok(FAKE.with_borrow(|f| f.streams.get(destination).and_then(|s| s.last().copied())))
    }

    async fn write(&mut self, rows: &[SinkRow]) -> Written {
        FAKE.with_borrow_mut(|f| {
            let mut w = Written::default();
            f.write_sizes.push(rows.len());
            for row in rows {
                if f.fail_after == Some(0) {
                    f.fail_after = None;
                    w.error = Some(BrokerError::new(ErrorKind::Refused, "OOM command not allowed"));
                    return w;
                }
                if let Some(n) = f.fail_after.as_mut() {
                    *n -= 1;
                }
                let stream = f.streams.entry(format!("changerelay:{}", row.label)).or_default();
                if stream.last().is_some_and(|l| *l >= row.id()) {
                    w.duplicates += 1;
                    f.duplicates_seen += 1;
                } else {
                    stream.push(row.id());
                }
                w.done += 1;
            }
            w
        })
    }
}

fn row(event_id: u64, pos: u32, label: &str) -> SinkRow {
    SinkRow {
        label: label.into(),
        event_id,
        pos,
        seq: pos,
        json: format!("{{\"event_id\":{event_id},\"seq\":{pos}}}").into(),
    }
}

/// `n` rows, 3 per transaction, alternating labels a and b.
fn history(n: usize) -> Vec<SinkRow> {
    (0..n)
        .map(|i| {
            row(
                1000 + (i / 3) as u64 * 10,
                (i % 3) as u32,
                if i % 2 == 0 { "a" } else { "b" },
            )
        })
        .collect()
}

fn config(start: Position, live: bool) -> SinkConfig {
    let mut target = Target::parse("redis", "redis://127.0.0.1:1", &serde_json::json!({"batch": 40}))
        .unwrap_or_else(|e| panic!("{e}"));
    target.timeout = Duration::from_secs(1);
    SinkConfig {
        id: 1,
        name: "s".into(),
        target,
        labels: vec!["a".into(), "b".into()],
        start,
        system_id: 7,
        live,
        paused: None,
    }
}

/// Runs a sink over `stored` (history the worker can read) and then `batches` (committed live, each also
/// appended to the history), answering its reads like the worker; returns its last report.
fn run(cfg: SinkConfig, stored: Vec<SinkRow>, batches: Vec<Vec<SinkRow>>, expired_below: Option<u64>) -> Report {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (tx, rx) = std::sync::mpsc::channel();
        let (w, _r) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        w.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
        let outbox = Rc::new(Outbox::new(tx, w));
        let (live_tx, live_rx) = tmpsc::channel(64);
        let task = tokio::task::spawn_local(crate::sink::run::<FakeBroker>(cfg, live_rx, outbox.clone()));
        let history = Rc::new(RefCell::new(stored));
        let head = |h: &[SinkRow]| h.last().map_or(0, |r| r.event_id);
        let mut last_report = None;
        let mut batches = batches.into_iter();
        for turn in 0..20_000 {
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    FromSinks::Read { id, after, max, .. } => {
                        let h = history.borrow();
                        let result = match expired_below {
                            Some(horizon) if after.0 < horizon => Err(PageError::Expired { horizon }),
                            _ => {
                                let rows: Vec<SinkRow> = h
                                    .iter()
                                    .filter(|r| r.position() > after)
                                    .take(max as usize)
                                    .cloned()
                                    .collect();
                                let more = rows.len() == max as usize;
                                let head = if more {
                                    rows.last().map_or(after, SinkRow::position)
                                } else {
                                    (head(&h), END)
                                };
                                Ok(Page { rows, head, more })
                            }
                        };
                        outbox.answer(id, result);
                    }
                    FromSinks::Report(r) => last_report = Some(r),
                }
            }
            if turn % 50 == 49 {
                if let Some(rows) = batches.next() {
                    let after = head(&history.borrow());
                    history.borrow_mut().extend(rows.iter().cloned());
                    let b = LiveBatch {
                        after,
                        head: head(&history.borrow()),
                        rows: Some(rows),
                    };
                    let _ = live_tx.send(Arc::new(b)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        last_report.unwrap_or_else(|| panic!("no report"))
    })
}

fn stored(label: &str) -> Vec<(u64, u32)> {
    FAKE.with_borrow(|f| {
        f.streams
            .get(&format!("changerelay:{label}"))
            .cloned()
            .unwrap_or_default()
    })
}

fn expected(rows: &[SinkRow], label: &str) -> Vec<(u64, u32)> {
    rows.iter().filter(|r| &*r.label == label).map(SinkRow::id).collect()
}

#[test]
fn every_change_once_in_order_through_failures() {
    for live in [true, false] {
        FAKE.with_borrow_mut(|f| {
            *f = Fake {
                refuse_connects: 2,
                fail_after: Some(150),
                ..Fake::default()
            }
        });
        let all = history(600);
        let (old, new) = all.split_at(450);
        let batches: Vec<Vec<SinkRow>> = new.chunks(30).map(<[SinkRow]>::to_vec).collect();
        let report = run(config((0, END), live), old.to_vec(), batches, None);
        for label in ["a", "b"] {
            assert_eq!(stored(label), expected(&all, label), "label {label}, live {live}");
        }
        let last = all.last().map(SinkRow::position).unwrap_or_default();
        assert_eq!(report.delivered, (last.0, END), "live {live}");
        assert_eq!((report.written, report.state), (600, State::Streaming), "live {live}");
        assert_eq!(report.error, None);
    }
}

#[test]
fn a_restart_resumes_after_what_the_broker_holds() {
    let all = history(300);
    // A previous worker wrote the first 200 rows but recorded only the first 50 as delivered.
    FAKE.with_borrow_mut(|f| {
        *f = Fake::default();
        for r in &all[..200] {
            f.streams
                .entry(format!("changerelay:{}", r.label))
                .or_default()
                .push(r.id());
        }
    });
    let report = run(config(all[49].position(), true), all.clone(), vec![], None);
    for label in ["a", "b"] {
        assert_eq!(stored(label), expected(&all, label));
    }
    assert_eq!(report.written, 100, "only what the broker lacked was written");
    assert_eq!(
        FAKE.with_borrow(|f| f.duplicates_seen),
        0,
        "nothing was even tried twice"
    );
}

#[test]
fn history_pruned_before_delivery_is_reported_and_skipped() {
    FAKE.with_borrow_mut(|f| *f = Fake::default());
    let all = history(90);
    let horizon = all[44].event_id;
    let report = run(config((0, END), true), all.clone(), vec![], Some(horizon));
    let after: Vec<SinkRow> = all.iter().filter(|r| r.event_id > horizon).cloned().collect();
    assert_eq!(stored("a"), expected(&after, "a"));
    assert!(
        report.error.as_deref().is_some_and(|e| e.contains("pruned")),
        "{report:?}"
    );
}

#[test]
fn after_a_refusal_one_change_is_written_at_a_time_until_one_goes_through() {
    FAKE.with_borrow_mut(|f| {
        *f = Fake {
            fail_after: Some(5),
            ..Fake::default()
        }
    });
    let all = history(300);
    let report = run(config((0, END), false), all.clone(), Vec::new(), None);
    for label in ["a", "b"] {
        assert_eq!(stored(label), expected(&all, label), "label {label}");
    }
    assert_eq!((report.written, report.state), (300, State::Streaming));
    let sizes = FAKE.with_borrow(|f| f.write_sizes.clone());
    let refused = sizes
        .iter()
        .position(|&n| n > 5)
        .unwrap_or_else(|| panic!("no batch: {sizes:?}"));
    assert_eq!(
        sizes.get(refused + 1),
        Some(&1),
        "the retry writes one change: {sizes:?}"
    );
    assert!(
        sizes[refused + 2..].iter().any(|&n| n > 1),
        "then batches again: {sizes:?}"
    );
}
