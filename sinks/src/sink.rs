//! One sink: connect, find where each destination stands, then deliver every change of its labels in
//! history order, exactly once; on any failure back off (1 s doubling to 30 s) and start again from the
//! broker's last entries.
//!
//! Rows come from committed batches while the sink keeps up (a batch is usable when the sink has read
//! everything up to where the batch starts) and otherwise from the history, read by the worker. A row is
//! skipped when its destination already holds it or a later change (`(event_id, seq)` at or below the
//! destination's last); the broker rejects any that slip through as duplicates.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::api::{LiveBatch, PageError, Position, Report, SinkConfig, SinkRow, State, END};
use crate::broker::{Broker, BrokerError, ErrorKind};
use crate::outbox::Outbox;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Committed batches a sink keeps while it writes (older ones are read from the history instead).
const KEPT_BATCHES: usize = 8;

struct Progress {
    cfg: SinkConfig,
    /// Everything up to here is in the broker.
    delivered: Position,
    /// Everything up to here is in the broker or in `pending`.
    read_at: Position,
    pending: VecDeque<SinkRow>,
    /// The newest event the worker is known to have applied (`u64::MAX`: not known, read to find out).
    head: u64,
    batches: VecDeque<Arc<LiveBatch>>,
    /// Per label, the last `(event_id, seq)` its destination holds.
    last: HashMap<String, (u64, u32)>,
    written: u64,
    duplicates: u64,
    error: Option<String>,
    /// History pruned before it was delivered: reported until the sink is created again.
    gap: Option<String>,
    /// `delivered` as last reported.
    reported: Position,
    /// After a refusal, one row per write until one goes through: a pipelined write could otherwise store
    /// a later row while the limit that refused an earlier one is being raised.
    careful: bool,
    out: Rc<Outbox>,
}

impl Progress {
    fn report(&mut self, state: State) {
        self.reported = self.delivered;
        self.out.report(Report {
            sink: self.cfg.name.clone(),
            sink_id: self.cfg.id,
            state,
            delivered: self.delivered,
            written: self.written,
            duplicates: self.duplicates,
            error: self.error.clone().or_else(|| self.gap.clone()),
        });
    }

    /// Queues the rows of this sink's labels after `read_at` that their destinations do not hold yet.
    fn take(&mut self, rows: &[SinkRow]) {
        for row in rows {
            if row.position() <= self.read_at || !self.cfg.labels.iter().any(|l| **l == *row.label) {
                continue;
            }
            if self.last.get(&*row.label).is_some_and(|l| row.id() <= *l) {
                continue;
            }
            self.pending.push_back(row.clone());
        }
    }

    /// After a write: drops the rows done and moves `delivered`.
    fn written(&mut self, done: usize, duplicates: usize) {
        for row in self.pending.drain(..done) {
            self.last.insert(row.label.to_string(), row.id());
            self.delivered = row.position();
        }
        if self.pending.is_empty() {
            self.delivered = self.read_at;
        }
        self.written += (done - duplicates) as u64;
        self.duplicates += duplicates as u64;
    }

    fn keep(&mut self, batch: Arc<LiveBatch>) {
        self.head = if self.head == u64::MAX {
            batch.head
        } else {
            self.head.max(batch.head)
        };
        self.batches.push_back(batch);
        if self.batches.len() > KEPT_BATCHES {
            self.batches.pop_front();
        }
    }

    /// Fills `pending`: from a usable batch, else from the history, else waits for the next batch.
    async fn fill(&mut self, live: &mut mpsc::Receiver<Arc<LiveBatch>>) -> Result<(), BrokerError> {
        loop {
            while let Ok(b) = live.try_recv() {
                self.keep(b);
            }
            while self.batches.front().is_some_and(|b| (b.head, END) <= self.read_at) {
                self.batches.pop_front();
            }
            let usable = self.cfg.live && self.batches.front().is_some_and(|b| (b.after, END) <= self.read_at);
            if usable {
                if let Some(batch) = self.batches.pop_front() {
                    if let Some(rows) = &batch.rows {
                        self.take(rows);
                        self.read_at = (batch.head, END);
                    }
                }
            } else if self.head == u64::MAX || (self.head, END) > self.read_at {
                self.read().await?;
            } else {
                // Caught up: nothing to write until the next batch.
                self.delivered = self.read_at;
                if self.reported != self.delivered || self.error.is_some() {
                    self.error = None;
                    self.report(State::Streaming);
                }
                match live.recv().await {
                    Some(b) => self.keep(b),
                    None => std::future::pending::<()>().await,
                }
            }
            if !self.pending.is_empty() {
                return Ok(());
            }
            self.delivered = self.read_at;
        }
    }

    async fn read(&mut self) -> Result<(), BrokerError> {
        let max = (self.cfg.target.batch * 2).min(1000) as u32;
        match self.out.read(&self.cfg.name, &self.cfg.labels, self.read_at, max).await {
            Ok(page) => {
                self.take(&page.rows);
                self.read_at = self.read_at.max(page.head);
                if !page.more {
                    self.head = page.head.0;
                }
                Ok(())
            }
            Err(PageError::Expired { horizon }) => {
                let from = self.read_at;
                self.read_at = (horizon, END);
                self.delivered = self.read_at;
                self.gap = Some(format!(
                    "history after event {} up to event {horizon} was pruned before this sink delivered it \
                     (changerelay.max_consumer_lag); delivery goes on after it",
                    from.0
                ));
                self.report(State::Streaming);
                Ok(())
            }
            Err(PageError::Failed(why)) => Err(BrokerError::new(
                ErrorKind::Unreachable,
                format!("could not read the history: {why}"),
            )),
        }
    }
}

/// Delivers on one connection until something fails.
async fn deliver<B: Broker>(
    broker: &mut B,
    p: &mut Progress,
    live: &mut mpsc::Receiver<Arc<LiveBatch>>,
) -> Result<Infallible, BrokerError> {
    // Whatever was missed meanwhile, the history has: read it before trusting batches again.
    p.head = u64::MAX;
    for label in p.cfg.labels.clone() {
        match broker.last(&p.cfg.target.destination(&label)).await? {
            Some(id) => {
                p.last.insert(label, id);
            }
            None => {
                p.last.remove(&label);
            }
        }
    }
    let last = p.last.clone();
    p.pending.retain(|r| last.get(&*r.label).is_none_or(|l| r.id() > *l));
    // Connected; `streaming` once a write succeeds or there is nothing to write.
    p.report(State::Connecting);
    loop {
        if p.pending.is_empty() {
            p.fill(live).await?;
        }
        let n = p.pending.len().min(if p.careful { 1 } else { p.cfg.target.batch });
        let rows: Vec<SinkRow> = p.pending.iter().take(n).cloned().collect();
        let w = broker.write(&rows).await;
        p.written(w.done, w.duplicates);
        if let Some(gap) = w.stored_after_refusal {
            p.gap = Some(gap);
        }
        if let Some(e) = w.error {
            p.careful |= e.kind == ErrorKind::Refused;
            return Err(e);
        }
        p.careful = false;
        if p.error.take().is_some() || w.done > 0 {
            p.report(State::Streaming);
        }
    }
}

/// Runs the sink until its task is dropped.
pub(crate) async fn run<B: Broker>(cfg: SinkConfig, mut live: mpsc::Receiver<Arc<LiveBatch>>, out: Rc<Outbox>) {
    let mut p = Progress {
        delivered: cfg.start,
        read_at: cfg.start,
        pending: VecDeque::new(),
        head: u64::MAX,
        batches: VecDeque::new(),
        last: HashMap::new(),
        written: 0,
        duplicates: 0,
        error: cfg.paused.clone(),
        gap: None,
        reported: cfg.start,
        careful: false,
        cfg,
        out,
    };
    if p.cfg.paused.is_some() {
        p.report(State::Paused);
        // A new configuration (the worker restarts the task) is what ends the pause.
        return std::future::pending().await;
    }
    let mut backoff = FIRST_BACKOFF;
    loop {
        p.report(State::Connecting);
        let before = p.written + p.duplicates;
        let failure = match B::connect(&p.cfg.target, p.cfg.system_id).await {
            Ok(mut broker) => match deliver(&mut broker, &mut p, &mut live).await {
                Ok(never) => match never {},
                Err(e) => e,
            },
            Err(e) => e,
        };
        if p.written + p.duplicates > before {
            backoff = FIRST_BACKOFF;
        }
        p.error = Some(format!("{} (retrying in {} s)", failure.message, backoff.as_secs()));
        p.report(State::Retrying);
        // Batches that arrive meanwhile are kept (the newest few); the history has the rest.
        let wake = tokio::time::sleep(backoff);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                () = &mut wake => break,
                b = live.recv() => match b {
                    Some(b) => p.keep(b),
                    None => std::future::pending::<()>().await,
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
