//! The fake worker's loop: waits on the wake socket like the real worker, answers requests from the
//! in-memory history (optionally after a delay), publishing each reply under the world lock so replies and
//! batches keep the real worker's order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use changerelay_core::cursor::Cursor;
use changerelay_core::filter::Filter;
use changerelay_endpoint::*;
use serde_json::{json, Value};

use super::{pos_of, World, SYSTEM_ID};

pub fn worker_loop(
    port: WorkerPort,
    world: Arc<Mutex<World>>,
    endpoint: Arc<Mutex<Option<Endpoint>>>,
    stop: Arc<AtomicBool>,
) {
    let mut queue: Vec<(Instant, Request)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut fds = libc::pollfd {
            fd: port.wake_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: (a test) one valid pollfd.
        unsafe { libc::poll(&mut fds, 1, 2) };
        if port.drain_wake() == Wake::Closed {
            // The endpoint thread ended (a test killed it): nothing more to answer.
            std::thread::sleep(std::time::Duration::from_millis(2));
            continue;
        }
        while let Some(r) = port.try_recv() {
            queue.push((Instant::now(), r));
        }
        let mut w = world.lock().unwrap();
        w.max_waiting = w.max_waiting.max(queue.len());
        let delay = w.reply_delay;
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = queue.drain(..).partition(|(t, _)| now >= *t + delay);
        queue = later;
        for (_, req) in due {
            w.requests.push(req.clone());
            let result = answer(&w, &req.kind);
            if let Some(e) = endpoint.lock().unwrap().as_ref() {
                e.publish(ToEndpoint::Reply { id: req.id, result });
            }
        }
    }
}

fn answer(w: &World, kind: &RequestKind) -> Result<Reply, ReplyError> {
    let err = |kind, message: &str| {
        Err(ReplyError {
            kind,
            message: message.into(),
        })
    };
    match kind {
        RequestKind::VersionMap { label } => {
            if !w.labels.contains(label) {
                return err(ReplyErrorKind::UnknownLabel, "unknown label");
            }
            let data: serde_json::Map<String, Value> = w
                .versions
                .get(label)
                .map(|m| {
                    m.iter()
                        .map(|(k, (v, ts))| (k.clone(), json!({"v": v, "ts": ts})))
                        .collect()
                })
                .unwrap_or_else(|| [("all".to_string(), json!({"v": 0, "ts": 0}))].into_iter().collect());
            Ok(Reply::VersionMap {
                json: json!({"label": label, "data": data}).to_string(),
            })
        }
        RequestKind::History {
            since,
            labels,
            max,
            filter,
            max_bytes,
            ..
        } => {
            let c = match Cursor::decode(since) {
                Ok(c) => c,
                Err(e) => return err(ReplyErrorKind::Malformed, &e.0),
            };
            if c.system_id != SYSTEM_ID {
                return err(ReplyErrorKind::Foreign, "cursor belongs to another cluster");
            }
            if c.position() <= w.horizon {
                return err(
                    ReplyErrorKind::Expired,
                    "cursor is older than the history retention window",
                );
            }
            let filter = filter
                .as_ref()
                .map(|f| Filter::parse(&serde_json::from_str(f).unwrap()).unwrap());
            let limit = (*max as usize).min(w.page);
            let rows: Vec<ChangeRow> = w
                .history
                .iter()
                .filter(|r| pos_of(&r.cursor) > c.position() && labels.contains(&r.label))
                .filter(|r| {
                    filter.as_ref().is_none_or(|f| {
                        f.matches(
                            serde_json::from_str::<Value>(r.new.as_deref().unwrap())
                                .unwrap()
                                .as_object(),
                        )
                    })
                })
                .take(limit + 1)
                .cloned()
                .collect();
            // Like the worker: stop once the page reaches max_bytes, but always return at least one row.
            let mut bytes = 0usize;
            let mut fit = 0;
            for r in rows.iter().take(limit) {
                if fit > 0 && bytes >= *max_bytes as usize {
                    break;
                }
                bytes += row_bytes(r);
                fit += 1;
            }
            let more = rows.len() > fit;
            let rows: Vec<ChangeRow> = rows.into_iter().take(fit).collect();
            let head = if more {
                rows.last().unwrap().cursor.clone()
            } else {
                w.head()
            };
            Ok(Reply::History { rows, head, more })
        }
    }
}

/// The bytes a row counts for against `max_bytes`: its text fields.
pub fn row_bytes(r: &ChangeRow) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    r.cursor.len()
        + r.label.len()
        + r.table_name.len()
        + r.op.len()
        + opt(&r.identifier)
        + opt(&r.key)
        + opt(&r.new)
        + opt(&r.old)
        + opt(&r.metadata)
}
