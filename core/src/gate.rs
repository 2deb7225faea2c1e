//! Holding back what the standbys do not have yet.
//!
//! Each write of the relay worker (a batch's history, or a mark of how far
//! it decoded) ends at a commit record; until every standby the worker
//! waits for has flushed the WAL up to there, the write could vanish in a
//! failover. Two things wait for that:
//!
//! * confirming the slot ([`ConfirmQueue`]): a failover slot synchronised to
//!   a standby must never be ahead of the history that standby has, or the
//!   promoted server would skip changes it never recorded;
//! * publishing to clients ([`PublishQueue`], the *publish gate*): a client
//!   must never see a change that a promoted standby would not have.
//!
//! Both queues are bounded: past [`MAX_PENDING`] entries the newest ones are
//! merged, which only ever delays (never advances) what they release.

use std::collections::VecDeque;
use std::time::Instant;

/// Entries a queue keeps before it merges the newest ones.
pub const MAX_PENDING: usize = 64;

/// Slot positions waiting for the standbys: `(end, need)` means the slot
/// may be confirmed up to `end` once the standbys flushed WAL up to `need`.
#[derive(Debug, Default)]
pub struct ConfirmQueue {
    pending: VecDeque<(u64, u64)>,
}

impl ConfirmQueue {
    /// Queues `end`, recorded by a write whose commit record ends at `need`.
    /// Ends and needs are expected in increasing order.
    pub fn push(&mut self, end: u64, need: u64) {
        let full = self.pending.len() >= MAX_PENDING;
        if let Some(last) = self.pending.back_mut() {
            if full || last.1 >= need {
                last.0 = last.0.max(end);
                last.1 = last.1.max(need);
                return;
            }
        }
        self.pending.push_back((end, need));
    }

    /// Takes every position whose write the standbys have (`flushed`: the
    /// oldest flush position among them, `None` when one of them is missing
    /// or invalid) and returns the furthest, to confirm.
    pub fn ready(&mut self, flushed: Option<u64>) -> Option<u64> {
        let flushed = flushed?;
        let mut out = None;
        while let Some(&(end, need)) = self.pending.front() {
            if need > flushed {
                break;
            }
            out = Some(end);
            self.pending.pop_front();
        }
        out
    }

    /// The WAL position the oldest entry waits for.
    pub fn waiting_for(&self) -> Option<u64> {
        self.pending.front().map(|e| e.1)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Batches waiting for the standbys before clients may see them.
#[derive(Debug)]
pub struct PublishQueue<T> {
    pending: VecDeque<Held<T>>,
}

#[derive(Debug)]
struct Held<T> {
    need: u64,
    since: Instant,
    item: T,
}

impl<T> Default for PublishQueue<T> {
    fn default() -> Self {
        PublishQueue {
            pending: VecDeque::new(),
        }
    }
}

impl<T> PublishQueue<T> {
    /// Queues `item`, whose write's commit record ends at `need`. When the
    /// queue is full, `merge` folds it into the newest entry (which then
    /// waits for the later `need`).
    pub fn push(&mut self, need: u64, item: T, merge: impl FnOnce(&mut T, T)) {
        if self.pending.len() >= MAX_PENDING {
            if let Some(last) = self.pending.back_mut() {
                last.need = last.need.max(need);
                merge(&mut last.item, item);
                return;
            }
        }
        self.pending.push_back(Held {
            need,
            since: Instant::now(),
            item,
        });
    }

    /// Takes, in order, the items the standbys have (see
    /// [`ConfirmQueue::ready`] for `flushed`).
    pub fn ready(&mut self, flushed: Option<u64>) -> Vec<T> {
        let mut out = Vec::new();
        let Some(flushed) = flushed else { return out };
        while self.pending.front().is_some_and(|h| h.need <= flushed) {
            if let Some(h) = self.pending.pop_front() {
                out.push(h.item);
            }
        }
        out
    }

    /// Takes everything (the gate was turned off).
    pub fn drain(&mut self) -> Vec<T> {
        self.pending.drain(..).map(|h| h.item).collect()
    }

    /// The oldest held item: what it waits for and since when.
    pub fn oldest(&self) -> Option<(u64, Instant)> {
        self.pending.front().map(|h| (h.need, h.since))
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_what_the_standbys_have() {
        let mut q = ConfirmQueue::default();
        q.push(100, 150);
        q.push(200, 250);
        q.push(300, 350);
        assert_eq!(q.ready(None), None, "a missing standby holds everything");
        assert_eq!(q.ready(Some(149)), None);
        assert_eq!(q.waiting_for(), Some(150));
        assert_eq!(q.ready(Some(260)), Some(200));
        assert_eq!(q.len(), 1);
        assert_eq!(q.ready(Some(1000)), Some(300));
        assert!(q.is_empty() && q.ready(Some(2000)).is_none());
    }

    #[test]
    fn a_full_confirm_queue_merges_into_its_newest_entry() {
        let mut q = ConfirmQueue::default();
        for i in 0..(MAX_PENDING as u64 + 10) {
            q.push(i * 10, i * 10 + 5);
        }
        assert_eq!(q.len(), MAX_PENDING);
        // The merged entry is released only once its latest need is met.
        let last_need = (MAX_PENDING as u64 + 9) * 10 + 5;
        assert_eq!(q.ready(Some(last_need - 1)), Some((MAX_PENDING as u64 - 2) * 10));
        assert_eq!(q.ready(Some(last_need)), Some((MAX_PENDING as u64 + 9) * 10));
    }

    #[test]
    fn idle_marks_needing_no_more_than_the_last_write_merge() {
        let mut q = ConfirmQueue::default();
        q.push(100, 150);
        q.push(120, 150);
        assert_eq!(q.len(), 1);
        assert_eq!(q.ready(Some(150)), Some(120));
    }

    #[test]
    fn publishes_in_order_once_flushed() {
        let mut q: PublishQueue<&str> = PublishQueue::default();
        q.push(10, "a", |_, _| unreachable!());
        q.push(20, "b", |_, _| unreachable!());
        assert!(q.ready(None).is_empty());
        assert_eq!(q.ready(Some(15)), vec!["a"]);
        assert_eq!(q.oldest().map(|o| o.0), Some(20));
        assert_eq!(q.ready(Some(20)), vec!["b"]);
        assert!(q.oldest().is_none());
    }

    #[test]
    fn a_full_publish_queue_merges_and_drains() {
        let mut q: PublishQueue<Vec<u32>> = PublishQueue::default();
        for i in 0..(MAX_PENDING as u32 + 3) {
            q.push(u64::from(i), vec![i], |into, more| into.extend(more));
        }
        assert_eq!(q.len(), MAX_PENDING);
        let all: Vec<u32> = q.drain().into_iter().flatten().collect();
        assert_eq!(
            all,
            (0..(MAX_PENDING as u32 + 3)).collect::<Vec<_>>(),
            "nothing lost, order kept"
        );
    }
}
