//! The worker → endpoint channel: bounded, never blocks the worker, loses nothing a client needs.
//!
//! Batches are counted in bytes (their text fields plus a fixed cost per row and delta) against
//! `worker_channel_bytes`. A batch that does not fit is not queued: a gap marker takes its place (consecutive
//! gaps merge), holding the batch's head and the labels whose versions it moved. When the endpoint thread
//! reaches the marker, every live change feed catches up from the history at its own cursor and every version
//! subscription of those labels fetches its map again (see `Hub::on_gap`). Status messages replace a status at
//! the tail of the queue, a token list replaces a queued token list (both are full states), and replies are
//! always queued: their number is bounded by the outstanding-request limits.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::api::{Batch, ToEndpoint};
use crate::metrics::{bump, Metrics};

/// What the endpoint thread receives.
#[derive(Debug)]
pub(crate) enum Inbound {
    Msg(ToEndpoint),
    /// Batches were left out: catch up from the history; `head` is the newest left-out batch's head.
    Gap {
        head: String,
        labels: BTreeSet<String>,
    },
}

struct Queue {
    items: VecDeque<(Inbound, usize)>,
    batch_bytes: usize,
}

pub(crate) struct Inbox {
    queue: Mutex<Queue>,
    ready: Notify,
    limit: usize,
    metrics: Arc<Metrics>,
}

const ROW_COST: usize = 128;

/// The bytes a batch holds (what it costs in the channel).
pub(crate) fn batch_bytes(b: &Batch) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let rows: usize = b
        .changes
        .iter()
        .map(|r| {
            ROW_COST
                + r.cursor.len()
                + r.label.len()
                + r.table_name.len()
                + r.op.len()
                + opt(&r.identifier)
                + opt(&r.key)
                + opt(&r.new)
                + opt(&r.old)
                + opt(&r.metadata)
                + r.audience.as_ref().map_or(0, |a| a.len() * 4)
        })
        .sum();
    let deltas: usize = b.versions.iter().map(|d| ROW_COST + d.label.len() + d.data.len()).sum();
    ROW_COST + b.head.len() + rows + deltas
}

impl Inbox {
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Inbox {
        Inbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                batch_bytes: 0,
            }),
            ready: Notify::new(),
            limit,
            metrics,
        }
    }

    /// Queues a message from the worker; never blocks for longer than the queue's lock.
    pub fn publish(&self, msg: ToEndpoint) {
        // Sized before taking the lock, so the endpoint thread never waits for it.
        let bytes = match &msg {
            ToEndpoint::Batch(b) => {
                self.metrics.received(b.changes.len());
                batch_bytes(b)
            }
            _ => 0,
        };
        {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            match msg {
                ToEndpoint::Batch(b) => {
                    if q.batch_bytes + bytes <= self.limit {
                        q.batch_bytes += bytes;
                        q.items.push_back((Inbound::Msg(ToEndpoint::Batch(b)), bytes));
                    } else {
                        bump(&self.metrics.channel_gaps, 1);
                        let labels = b.versions.into_iter().map(|d| d.label).collect();
                        push_gap(&mut q.items, b.head, labels);
                    }
                }
                ToEndpoint::Status(s) => match q.items.back_mut() {
                    Some((Inbound::Msg(ToEndpoint::Status(old)), _)) => *old = s,
                    _ => q.items.push_back((Inbound::Msg(ToEndpoint::Status(s)), 0)),
                },
                ToEndpoint::Tokens(t) => {
                    let queued = q
                        .items
                        .iter_mut()
                        .find(|(m, _)| matches!(m, Inbound::Msg(ToEndpoint::Tokens(_))));
                    match queued {
                        Some((Inbound::Msg(ToEndpoint::Tokens(old)), _)) => *old = t,
                        _ => q.items.push_back((Inbound::Msg(ToEndpoint::Tokens(t)), 0)),
                    }
                }
                reply @ ToEndpoint::Reply { .. } => q.items.push_back((Inbound::Msg(reply), 0)),
            }
        }
        self.ready.notify_one();
    }

    /// The next message, waiting for one.
    pub async fn recv(&self) -> Inbound {
        loop {
            {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some((item, bytes)) = q.items.pop_front() {
                    q.batch_bytes -= bytes;
                    return item;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// Appends a gap, merging it with a gap at the tail (or just before a trailing status, which then stays last).
fn push_gap(items: &mut VecDeque<(Inbound, usize)>, head: String, labels: BTreeSet<String>) {
    let n = items.len();
    let at = match items.back() {
        Some((Inbound::Gap { .. }, _)) => Some(n - 1),
        Some((Inbound::Msg(ToEndpoint::Status(_)), _))
            if n >= 2 && matches!(items.get(n - 2), Some((Inbound::Gap { .. }, _))) =>
        {
            Some(n - 2)
        }
        _ => None,
    };
    if let Some((Inbound::Gap { head: h, labels: l }, _)) = at.and_then(|i| items.get_mut(i)) {
        *h = head;
        l.extend(labels);
        return;
    }
    items.push_back((Inbound::Gap { head, labels }, 0));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Status, VersionDelta};

    fn batch(head: &str, pad: usize, label: &str) -> ToEndpoint {
        ToEndpoint::Batch(Batch {
            head: head.into(),
            versions: vec![VersionDelta {
                label: label.into(),
                data: "x".repeat(pad),
            }],
            ..Batch::default()
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn overflow_becomes_one_gap_and_statuses_coalesce() {
        let inbox = Inbox::new(10_000, Arc::new(Metrics::default()));
        inbox.publish(batch("h1", 5000, "a"));
        inbox.publish(batch("h2", 6000, "b")); // does not fit
        inbox.publish(ToEndpoint::Status(Status::default()));
        inbox.publish(batch("h3", 6000, "c")); // merges into the gap before the status
        inbox.publish(ToEndpoint::Status(Status {
            head: "s2".into(),
            ..Status::default()
        }));
        inbox.publish(ToEndpoint::Tokens(vec![]));
        inbox.publish(ToEndpoint::Reply {
            id: 1,
            result: Err(crate::api::ReplyError {
                kind: crate::api::ReplyErrorKind::Internal,
                message: String::new(),
            }),
        });
        assert!(matches!(inbox.recv().await, Inbound::Msg(ToEndpoint::Batch(b)) if b.head == "h1"));
        match inbox.recv().await {
            Inbound::Gap { head, labels } => {
                assert_eq!(head, "h3");
                assert_eq!(labels.into_iter().collect::<Vec<_>>(), vec!["b", "c"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(inbox.recv().await, Inbound::Msg(ToEndpoint::Status(s)) if s.head == "s2"));
        assert!(matches!(inbox.recv().await, Inbound::Msg(ToEndpoint::Tokens(_))));
        assert!(matches!(
            inbox.recv().await,
            Inbound::Msg(ToEndpoint::Reply { id: 1, .. })
        ));
        // Drained: room again.
        inbox.publish(batch("h4", 9000, "d"));
        assert!(matches!(inbox.recv().await, Inbound::Msg(ToEndpoint::Batch(_))));
    }
}
