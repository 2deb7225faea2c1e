//! Test support: a fake relay worker (answers requests from an in-memory history and publishes status,
//! tokens and batches, in the order the real worker guarantees) and small blocking HTTP/WebSocket clients.
#![allow(dead_code)]

mod clients;
mod worker;
pub use clients::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use changerelay_core::cursor::Cursor;
use changerelay_endpoint::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const SYSTEM_ID: u64 = 7_300_000_000_000_000_001;
pub const LABELS: [&str; 3] = ["parameters", "flags", "other"];

pub fn cursor(event_id: u64, pos: u32) -> String {
    Cursor {
        system_id: SYSTEM_ID,
        timeline: 1,
        event_id,
        pos,
    }
    .encode()
}

pub fn pos_of(c: &str) -> (u64, u32) {
    Cursor::decode(c).unwrap().position()
}

pub fn token(secret: &str, labels: &[&str], rows: bool) -> Token {
    Token {
        name: format!("tok-{secret}"),
        sha256: Sha256::digest(secret.as_bytes()).into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        rows,
        role: ROLE,
        readable: (0..LABELS.len() as u32).map(relid_of_index).collect(),
    }
}

/// The role of test tokens.
pub const ROLE: u32 = 16_384;

fn relid_of_index(i: u32) -> u32 {
    20_000 + i
}

/// The table OID the fake worker gives a label's rows.
pub fn relid(label: &str) -> u32 {
    LABELS
        .iter()
        .position(|l| *l == label)
        .map_or(29_999, |i| relid_of_index(i as u32))
}

/// Everything the fake worker knows.
pub struct World {
    pub history: Vec<ChangeRow>,
    pub versions: BTreeMap<String, BTreeMap<String, (u64, i64)>>,
    pub event_id: u64,
    /// Cursors at or before this position are expired.
    pub horizon: (u64, u32),
    pub labels: Vec<String>,
    pub consuming: bool,
    /// History rows per reply at most (smaller than the endpoint's max, to exercise `more`).
    pub page: usize,
    pub reply_delay: Duration,
    pub requests: Vec<Request>,
    /// Most requests the fake worker held unanswered at once.
    pub max_waiting: usize,
}

impl World {
    pub fn head(&self) -> String {
        cursor(self.event_id, Cursor::END)
    }
}

/// What a test (or a writer thread) needs to act as the worker.
#[derive(Clone)]
pub struct Handle {
    pub endpoint: Arc<Mutex<Option<Endpoint>>>,
    pub addr: SocketAddr,
    pub world: Arc<Mutex<World>>,
}

pub struct Fake {
    pub h: Handle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::ops::Deref for Fake {
    type Target = Handle;
    fn deref(&self) -> &Handle {
        &self.h
    }
}

impl Fake {
    pub fn start(config: Config) -> Fake {
        let (endpoint, port) = start(config).expect("endpoint starts");
        let addr = endpoint.local_addrs()[0];
        let world = Arc::new(Mutex::new(World {
            history: Vec::new(),
            versions: BTreeMap::new(),
            event_id: 1000,
            horizon: (0, 0),
            labels: LABELS.iter().map(|s| s.to_string()).collect(),
            consuming: true,
            page: 7,
            reply_delay: Duration::ZERO,
            requests: Vec::new(),
            max_waiting: 0,
        }));
        let endpoint = Arc::new(Mutex::new(Some(endpoint)));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, e, s) = (world.clone(), endpoint.clone(), stop.clone());
        let thread = std::thread::spawn(move || worker::worker_loop(port, w, e, s));
        let fake = Fake {
            h: Handle { endpoint, addr, world },
            stop,
            thread: Some(thread),
        };
        fake.publish_status();
        fake
    }

    /// Trust auth, small limits suitable for tests.
    pub fn trust() -> Fake {
        Fake::start(test_config(Auth::Trust))
    }
}

impl Handle {
    pub fn publish(&self, msg: ToEndpoint) {
        if let Some(e) = self.endpoint.lock().unwrap().as_ref() {
            e.publish(msg);
        }
    }

    pub fn publish_status(&self) {
        let w = self.world.lock().unwrap();
        self.publish(ToEndpoint::Status(Status {
            consuming: w.consuming,
            state: if w.consuming {
                "streaming".into()
            } else {
                "disabled".into()
            },
            last_event_id: w.event_id,
            lag_bytes: 123,
            head: w.head(),
            labels: w.labels.clone(),
        }));
    }

    /// Commits one transaction of `rows` (new rows as JSON) in `label` and publishes its batch.
    pub fn commit(&self, label: &str, rows: &[Value]) -> Vec<ChangeRow> {
        self.commit_with(label, rows, false)
    }

    /// Like [`Handle::commit`], but the published batch leaves its rows out (`rows_omitted`), as the worker
    /// does for a huge transaction: subscribers must fetch them from the history.
    pub fn commit_omitted(&self, label: &str, rows: &[Value]) -> Vec<ChangeRow> {
        self.commit_with(label, rows, true)
    }

    fn commit_with(&self, label: &str, rows: &[Value], omitted: bool) -> Vec<ChangeRow> {
        let mut w = self.world.lock().unwrap();
        w.event_id += 16;
        let event_id = w.event_id;
        let ts = 1_700_000_000_000 + event_id as i64;
        let mut changes = Vec::new();
        let mut moved = serde_json::Map::new();
        for (i, new) in rows.iter().enumerate() {
            let ident = new["id"].to_string();
            let row = ChangeRow {
                cursor: cursor(event_id, i as u32),
                event_id,
                seq: i as i32,
                ts,
                xid: 700 + event_id as i64,
                label: label.into(),
                table_name: format!("public.{label}"),
                op: "insert".into(),
                identifier: Some(ident.clone()),
                key: Some(json!({"id": new["id"]}).to_string()),
                new: Some(new.to_string()),
                old: None,
                metadata: Some(json!({"actor": "test"}).to_string()),
                relid: relid(label),
                audience: new
                    .get("audience")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_u64).map(|r| r as u32).collect()),
            };
            w.versions
                .entry(label.into())
                .or_default()
                .insert(ident.clone(), (event_id, ts));
            moved.insert(ident, json!({"v": event_id, "ts": ts}));
            changes.push(row);
        }
        w.versions
            .entry(label.into())
            .or_default()
            .insert("all".into(), (event_id, ts));
        moved.insert("all".into(), json!({"v": event_id, "ts": ts}));
        w.history.extend(changes.iter().cloned());
        let batch = Batch {
            head: w.head(),
            changes: if omitted { Vec::new() } else { changes.clone() },
            versions: vec![VersionDelta {
                label: label.into(),
                data: Value::Object(moved).to_string(),
            }],
            rows_omitted: omitted,
        };
        // Published under the lock: replies (computed under it too) keep the worker's ordering.
        if let Some(e) = self.endpoint.lock().unwrap().as_ref() {
            e.publish(ToEndpoint::Batch(batch));
        }
        changes
    }

    /// Commits `n` one-row transactions numbered from `first`.
    pub fn commit_n(&self, label: &str, first: u64, n: u64, pad: usize) -> Vec<ChangeRow> {
        (first..first + n)
            .flat_map(|i| {
                self.commit(
                    label,
                    &[json!({"id": i, "tenant": if i % 2 == 0 { "t1" } else { "t2" }, "pad": "x".repeat(pad)})],
                )
            })
            .collect()
    }

    pub fn head(&self) -> String {
        self.world.lock().unwrap().head()
    }

    /// Waits until the endpoint accepts `secret` (the token list published before reached it).
    pub fn wait_token(&self, secret: &str) {
        let auth = format!("Bearer {secret}");
        assert!(
            clients::wait_until(Duration::from_secs(3), || {
                clients::get(self.addr, "/changes?wait=0s&max=1", &[("Authorization", &auth)]).status != 401
            }),
            "token {secret} never accepted"
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Shuts the endpoint down, returning how long it took.
    pub fn shutdown(&self) -> Duration {
        let e = self.endpoint.lock().unwrap().take();
        let t = Instant::now();
        if let Some(e) = e {
            e.shutdown();
        }
        t.elapsed()
    }
}

impl Fake {
    pub fn handle(&self) -> Handle {
        self.h.clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shutdown();
    }
}

pub fn test_config(auth: Auth) -> Config {
    Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        max_clients: 64,
        client_buffer: 1 << 20,
        auth,
        checkpoint_every: Duration::from_millis(300),
        max_client_message: 4096,
        header_timeout: Duration::from_millis(500),
        ..Config::default()
    }
}
