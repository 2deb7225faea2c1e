//! The fan-out load client of `make bench` (bench/wl_fanout.py): opens N
//! WebSocket subscriptions to one label of the relay worker's endpoint,
//! prints `ready` once every one is subscribed, counts every message until
//! standard input closes and then QUIET seconds pass without one, and
//! prints one JSON object: messages, the time of the last, and (value of
//! column `n`, arrival) samples from the first SAMPLED subscribers for
//! latency, on the system-wide monotonic clock Python's time.monotonic()
//! reads too.
//!
//! changerelay-fanout PORT TOKEN LABEL SUBSCRIBERS [THREADS]
//!
//! One thread per core (default 2) runs a share of the subscribers; each
//! message is only scanned for its type and, on sampled subscribers, its
//! value, never parsed whole: the client must stay far cheaper than the
//! server it measures.

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Seconds without a message, after standard input closed, before the end.
const QUIET: f64 = 3.0;
/// Subscribers whose messages are sampled for latency.
const SAMPLED: usize = 50;

/// CLOCK_MONOTONIC in seconds, as Python's time.monotonic().
fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[derive(Default)]
struct Shared {
    messages: AtomicU64,
    /// Time of the last message, in microseconds of `monotonic()`.
    last_us: AtomicU64,
    done: AtomicBool,
    samples: Mutex<Vec<(i64, f64)>>,
}

/// The number after `"n":` in a change message's `new` row, if any.
fn value_of_n(text: &str) -> Option<i64> {
    let at = text.find("\"new\":")?;
    let rest = &text[at..];
    let n = rest.find("\"n\":")?;
    let digits: String = rest[n + 4..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

async fn subscriber(
    i: usize,
    port: u16,
    token: Arc<str>,
    label: Arc<str>,
    shared: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    connecting: Arc<tokio::sync::Semaphore>,
) {
    let url = format!("ws://127.0.0.1:{port}/ws?token={token}");
    // A few connect at a time: the endpoint admits only
    // changerelay.max_unauthenticated (64) handshakes at once.
    let permit = connecting.acquire_owned().await;
    let connect = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let sub = serde_json::json!({"op": "subscribe", "labels": [&*label], "since": null,
                                     "versions": false, "changes": true});
        ws.send(Message::text(sub.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        // The first message answers the subscription.
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("subscribed") => Ok(ws),
            other => Err(format!("subscriber {i}: no subscription: {other:?}")),
        }
    };
    let connected = connect.await;
    drop(permit);
    let mut ws = match connected {
        Ok(ws) => {
            let _ = ready.send(Ok(())).await;
            ws
        }
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return;
        }
    };
    drop(ready);
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
        match next {
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.contains("\"type\":\"checkpoint\"") {
                    continue;
                }
                let now = monotonic();
                shared.messages.fetch_add(1, Ordering::Relaxed);
                shared.last_us.fetch_max((now * 1e6) as u64, Ordering::Relaxed);
                if i < SAMPLED {
                    if let Some(n) = value_of_n(&t) {
                        if let Ok(mut s) = shared.samples.lock() {
                            s.push((n, now));
                        }
                    }
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return,
            Err(_) => {
                let last = shared.last_us.load(Ordering::Relaxed) as f64 * 1e-6;
                if shared.done.load(Ordering::Relaxed) && monotonic() - last.max(0.0) > QUIET {
                    let _ = ws.close(None).await;
                    return;
                }
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: changerelay-fanout PORT TOKEN LABEL SUBSCRIBERS [THREADS]");
        std::process::exit(2);
    }
    let port: u16 = args[1].parse().unwrap_or(8432);
    let token: Arc<str> = args[2].as_str().into();
    let label: Arc<str> = args[3].as_str().into();
    let subscribers: usize = args[4].parse().unwrap_or(1);
    let threads: usize = args.get(5).and_then(|t| t.parse().ok()).unwrap_or(2).max(1);
    let shared = Arc::new(Shared::default());
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(subscribers.max(1));
    let mut handles = Vec::new();
    let connecting = Arc::new(tokio::sync::Semaphore::new(32));
    for t in 0..threads {
        let (shared, token, label, ready) = (shared.clone(), token.clone(), label.clone(), ready_tx.clone());
        let connecting = connecting.clone();
        handles.push(std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("no runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for i in (t..subscribers).step_by(threads) {
                    tasks.push(tokio::spawn(subscriber(
                        i,
                        port,
                        token.clone(),
                        label.clone(),
                        shared.clone(),
                        ready.clone(),
                        connecting.clone(),
                    )));
                }
                drop(ready);
                for task in tasks {
                    let _ = task.await;
                }
            });
        }));
    }
    drop(ready_tx);
    let mut ok = 0usize;
    while let Some(r) = ready_rx.blocking_recv() {
        match r {
            Ok(()) => ok += 1,
            Err(e) => eprintln!("{e}"),
        }
        if ok == subscribers {
            break;
        }
    }
    println!("ready {ok}");
    let _ = std::io::stdout().flush();
    // The driver closes standard input when the writer is done.
    for _ in std::io::stdin().lock().lines() {}
    shared.done.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let samples = shared.samples.lock().map(|s| s.clone()).unwrap_or_default();
    let out = serde_json::json!({
        "subscribed": ok,
        "messages": shared.messages.load(Ordering::Relaxed),
        "last": shared.last_us.load(Ordering::Relaxed) as f64 * 1e-6,
        "arrivals": samples,
    });
    println!("{out}");
}
