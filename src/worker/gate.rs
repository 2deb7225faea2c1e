//! The worker's waits for its standbys (README: High availability).
//!
//! Every write of the worker ends at a commit record. The slot is confirmed
//! past a write's position only once every standby slot has flushed WAL up
//! to that record (so a synchronised failover slot is never ahead of the
//! history its standby has), and with the publish gate on, a batch reaches
//! clients (shared memory, `watch()`, readers' cap, the endpoint) only then
//! too. Without standby slots both happen at once. Standby slots are read
//! from shared memory every loop turn; while a batch waits the worker polls
//! them every 0.1 ms at first, backing off to 100 ms (see [`Gate::sleep`]).

use super::persist::{Applied, Fresh, PUBLISH_BYTES, PUBLISH_ROWS};
use crate::ha::{self, Standby};
use crate::shmem;
use changerelay_core::gate::{ConfirmQueue, PublishQueue};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Whether readers must hold back what the standbys may not have: the gate
/// is on and there are standby slots. From the postmaster (shared memory
/// set-up) and the worker.
pub fn configured() -> bool {
    crate::gucs::publish_gate() && !ha::standby_slot_names().0.is_empty()
}

/// What waits for the standbys before clients see it.
#[derive(Default)]
pub struct Held {
    /// The newest event of the history the worker found at start (visible
    /// once the standbys have everything written before).
    pub newest: u64,
    pub applied: Option<Applied>,
}

impl Held {
    /// Folds a later held item into this one (a full queue).
    fn absorb(&mut self, later: Held) {
        self.newest = self.newest.max(later.newest);
        self.applied = match (self.applied.take(), later.applied) {
            (Some(mut a), Some(b)) => {
                a.updates.absorb(b.updates);
                a.fresh = match (a.fresh, b.fresh) {
                    (Some(mut x), Some(y))
                        if x.rows.len() + y.rows.len() <= PUBLISH_ROWS && bytes(&x) + bytes(&y) <= PUBLISH_BYTES =>
                    {
                        x.rows.extend(y.rows);
                        x.metadata.extend(y.metadata);
                        Some(x)
                    }
                    // Too many to keep: clients read them from history.
                    _ => None,
                };
                Some(a)
            }
            (a, b) => a.or(b),
        };
    }
}

fn bytes(f: &Fresh) -> usize {
    f.rows.iter().map(|r| r.frame.len()).sum()
}

/// What the standbys now have.
pub struct Release {
    /// Confirm the slot up to here.
    pub confirm: Option<u64>,
    /// Publish these, in order.
    pub publish: Vec<Held>,
}

#[derive(Default)]
pub struct Gate {
    confirms: ConfirmQueue,
    held: PublishQueue<Held>,
    gate_on: bool,
    /// Standby slot problems already logged, by slot name.
    reported: HashMap<String, &'static str>,
}

impl Gate {
    /// Whether batches wait for the standbys (as of the last turn).
    pub fn is_on(&self) -> bool {
        self.gate_on
    }

    /// The slot may be confirmed up to `end` once the standbys flushed WAL
    /// up to `need` (the end of the commit that recorded `end`).
    pub fn confirm_after(&mut self, end: u64, need: u64) {
        self.confirms.push(end, need);
    }

    /// Holds `item` until the standbys flushed WAL up to `need`.
    pub fn hold(&mut self, need: u64, item: Held) {
        self.held.push(need, item, Held::absorb);
    }

    /// Reads the standby slots and releases what they have. Call every
    /// loop turn (also when disabled: readers wait for the start marker).
    pub fn turn(&mut self) -> Release {
        let (names, _) = ha::standby_slot_names();
        let standbys = ha::standbys(&names);
        self.report(&standbys);
        let flushed = ha::flushed_by_all(&standbys);
        self.gate_on = crate::gucs::publish_gate() && !names.is_empty();
        let publish = if self.gate_on {
            self.held.ready(flushed)
        } else {
            self.held.drain()
        };
        let confirm = self.confirms.ready(flushed);
        if let Some(s) = shmem::shared() {
            let st = &s.status;
            st.gate_active.store(self.gate_on, Ordering::Release);
            st.standby_flushed_lsn.store(flushed.unwrap_or(0), Ordering::Release);
            match self.held.oldest() {
                Some((need, since)) => {
                    let waited = since.elapsed().as_micros() as i64;
                    st.gate_held_since_us.store(now_us() - waited, Ordering::Release);
                    st.gate_waiting_lsn.store(need, Ordering::Release);
                }
                None => {
                    st.gate_held_since_us.store(0, Ordering::Release);
                    st.gate_waiting_lsn.store(0, Ordering::Release);
                }
            }
            st.confirm_waiting_lsn
                .store(self.confirms.waiting_for().unwrap_or(0), Ordering::Release);
        }
        Release { confirm, publish }
    }

    /// How long the worker may sleep: `default`, or less while something
    /// waits for the standbys (0.1 ms for the first 5 ms of a wait, when a
    /// streaming standby's flush is due, 1 ms up to 50 ms, 10 ms up to a
    /// second, then 100 ms). Slot confirmations alone wait 10 ms at most.
    pub fn sleep(&self, default: Duration) -> Duration {
        let oldest = match (self.held.oldest(), self.confirms.is_empty()) {
            (Some((_, since)), _) => since,
            (None, false) => Instant::now() - Duration::from_millis(50),
            (None, true) => return default,
        };
        let waited = oldest.elapsed();
        let step = if waited < Duration::from_millis(5) {
            Duration::from_micros(100)
        } else if waited < Duration::from_millis(50) {
            Duration::from_millis(1)
        } else if waited < Duration::from_secs(1) {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(100)
        };
        step.min(default)
    }

    /// Logs a standby slot problem once (WARNING), and when it is over.
    fn report(&mut self, standbys: &[(String, Standby)]) {
        for (name, state) in standbys {
            let problem = match state {
                Standby::Missing => Some("does not exist"),
                Standby::Logical => Some("is a logical slot, not a standby's"),
                Standby::Invalidated => Some("has been invalidated"),
                Standby::Streaming { .. } => None,
            };
            match (problem, self.reported.get(name).copied()) {
                (Some(p), last) if last != Some(p) => {
                    warning!(
                        "pg_changerelay relay: standby slot \"{name}\" {p}: the relay's slot is not confirmed and \
                         (with changerelay.publish_gate) no change is published until it is fixed. Create the \
                         slot or amend changerelay.standby_slots (or synchronized_standby_slots)"
                    );
                    self.reported.insert(name.clone(), p);
                }
                (None, Some(_)) => {
                    log!("pg_changerelay relay: standby slot \"{name}\" is usable again");
                    self.reported.remove(name);
                }
                _ => {}
            }
        }
        self.reported.retain(|n, _| standbys.iter().any(|(s, _)| s == n));
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
