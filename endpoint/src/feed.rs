//! A change feed: one subscriber's way from a cursor through history to live batches.
//!
//! A feed starting at a cursor asks the worker for history (phase `History`), batches are ignored meanwhile
//! (the worker answers after publishing them, so the history covers them), and each reply with `more` leads to
//! the next request from the last row's cursor. After the last reply the feed is live from the reply's head.
//! Every row is delivered only when its position is past the last one delivered, so nothing is sent twice or
//! out of order. A feed starting "now" is live at once from the newest head the hub has seen.

use changerelay_core::filter::Filter;

use crate::api::ChangeRow;
use crate::batch::{position, Pos, PreparedBatch, PreparedRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the reply to this request.
    History(u64),
    /// More history to read from `resume_from` once the client's queue has drained.
    Paused,
    Live,
}

pub(crate) struct Feed {
    pub labels: Vec<String>,
    pub filter: Option<Filter>,
    /// The filter as JSON text, for history requests.
    pub filter_text: Option<String>,
    pub phase: Phase,
    /// Position of the last row delivered or point covered.
    pub last: Option<Pos>,
    /// Cursor text of `last`: where the subscriber may resume without missing anything.
    pub cursor: Option<String>,
    /// Something was sent since the last checkpoint tick.
    pub busy: bool,
    /// Where the next history request starts while `Paused`.
    pub resume_from: Option<String>,
}

/// What a history reply led to.
pub(crate) struct HistoryStep {
    /// Ask again from this cursor (the reply had `more`).
    pub next: Option<String>,
    /// The taker refused a row (no room): the feed is `Paused` at the last row taken.
    pub stalled: bool,
}

impl Feed {
    pub fn new(labels: Vec<String>, filter: Option<(Filter, String)>, start: Option<(String, Pos)>) -> Feed {
        let (filter, filter_text) = filter.map_or((None, None), |(f, t)| (Some(f), Some(t)));
        let (cursor, last) = start.map_or((None, None), |(c, p)| (Some(c), Some(p)));
        Feed {
            labels,
            filter,
            filter_text,
            phase: Phase::Live,
            last,
            cursor,
            busy: false,
            resume_from: None,
        }
    }

    fn past(&self, pos: Pos) -> bool {
        self.last.is_none_or(|last| pos > last)
    }

    /// Moves the covered point forward (never back).
    pub fn advance(&mut self, cursor: &str, pos: Option<Pos>) {
        if let Some(pos) = pos {
            if self.past(pos) {
                self.last = Some(pos);
                self.cursor = Some(cursor.to_string());
            }
        }
    }

    /// Whether a row is for this feed and not delivered yet.
    fn wants(&self, row: &ChangeRow, pos: Pos) -> bool {
        self.past(pos) && self.labels.contains(&row.label)
    }

    /// Takes a history reply (the caller checked it answers this feed's outstanding request). `take` gets each
    /// row for this feed that `allow` lets through, in order; when it refuses one (no room), the feed pauses
    /// at the last row taken and reads on from there later.
    pub fn take_history(
        &mut self,
        rows: Vec<ChangeRow>,
        head: &str,
        more: bool,
        allow: impl Fn(&ChangeRow) -> bool,
        mut take: impl FnMut(&ChangeRow) -> bool,
    ) -> HistoryStep {
        let next = if more {
            rows.last().map(|r| r.cursor.clone())
        } else {
            None
        };
        let mut delivered = 0;
        for row in &rows {
            let Some(pos) = position(&row.cursor) else { continue };
            // (A label unsubscribed while the request was out is no longer wanted.)
            if !self.wants(row, pos) || !allow(row) {
                continue;
            }
            if !take(row) {
                self.busy |= delivered > 0;
                self.phase = Phase::Paused;
                self.resume_from = self.cursor.clone();
                return HistoryStep {
                    next: None,
                    stalled: true,
                };
            }
            self.last = Some(pos);
            self.cursor = Some(row.cursor.clone());
            delivered += 1;
        }
        self.busy |= delivered > 0;
        match &next {
            Some(c) => self.advance(c, position(c)),
            None => {
                self.phase = Phase::Live;
                self.advance(head, position(head));
            }
        }
        HistoryStep { next, stalled: false }
    }

    /// Hands the live rows of a batch for this feed that `allow` lets through to `take`, advancing past them
    /// (and past the batch's head when all were taken). `take` refusing a row stops there, before it. Nothing
    /// while history is outstanding.
    pub fn live_rows(
        &mut self,
        batch: &PreparedBatch,
        allow: impl Fn(&ChangeRow) -> bool,
        mut take: impl FnMut(&PreparedRow) -> bool,
    ) {
        if self.phase != Phase::Live {
            return;
        }
        for i in batch.rows_for(&self.labels) {
            let Some(r) = batch.rows.get(i) else { continue };
            let Some(pos) = r.pos else { continue };
            if !self.past(pos) || !allow(&r.row) || self.filter.as_ref().is_some_and(|f| !r.matches(f)) {
                continue;
            }
            if !take(r) {
                self.busy = true;
                return;
            }
            self.busy = true;
            self.last = Some(pos);
            self.cursor = Some(r.row.cursor.clone());
        }
        self.advance(&batch.head, batch.head_pos);
    }

    /// Sends a live feed back to the history from its cursor (rows were left out of the channel): the request
    /// to send, or `None` when the feed is not live or has no cursor yet.
    pub fn catch_up(&mut self) -> Option<String> {
        if self.phase != Phase::Live {
            return None;
        }
        self.cursor.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Batch, ChangeRow};
    use changerelay_core::cursor::Cursor;

    fn cur(e: u64, p: u32) -> String {
        Cursor {
            system_id: 1,
            timeline: 1,
            event_id: e,
            pos: p,
        }
        .encode()
    }

    fn row(e: u64, p: u32, label: &str) -> ChangeRow {
        ChangeRow {
            cursor: cur(e, p),
            event_id: e,
            seq: p as i32,
            label: label.into(),
            ..ChangeRow::default()
        }
    }

    fn live(f: &mut Feed, b: &PreparedBatch, max: usize) -> Vec<u32> {
        let mut out = Vec::new();
        f.live_rows(
            b,
            |_| true,
            |r| {
                if out.len() == max {
                    return false;
                }
                out.push(r.row.seq as u32);
                true
            },
        );
        out
    }

    #[test]
    fn a_refused_history_row_pauses_at_the_last_taken() {
        let start = (cur(10, Cursor::END), (10, Cursor::END));
        let mut f = Feed::new(vec!["a".into()], None, Some(start));
        f.phase = Phase::History(1);
        let mut n = 0;
        let step = f.take_history(
            vec![row(11, 0, "a"), row(12, 0, "a"), row(13, 0, "a")],
            &cur(13, 0),
            true,
            |r| r.event_id != 11,
            |_| {
                n += 1;
                n < 2
            },
        );
        assert!(step.stalled && step.next.is_none());
        assert_eq!(f.phase, Phase::Paused);
        assert_eq!(
            f.resume_from,
            Some(cur(12, 0)),
            "11 was not allowed, 12 taken, 13 refused"
        );
    }

    #[test]
    fn history_then_live_never_repeats_or_goes_back() {
        let start = (cur(10, Cursor::END), (10, Cursor::END));
        let mut f = Feed::new(vec!["a".into()], None, Some(start));
        f.phase = Phase::History(1);
        // A batch while history is outstanding is ignored.
        let early = PreparedBatch::new(Batch {
            head: cur(20, Cursor::END),
            changes: vec![row(20, 0, "a")],
            ..Batch::default()
        });
        assert!(live(&mut f, &early, usize::MAX).is_empty());
        // First page: more to come; a row at or before the cursor is dropped.
        let mut got = Vec::new();
        let step = f.take_history(
            vec![row(10, 3, "a"), row(20, 0, "a"), row(20, 1, "b")],
            &cur(20, 1),
            true,
            |_| true,
            |r| {
                got.push(r.event_id);
                true
            },
        );
        assert_eq!(got, vec![20], "only (20,0); (20,1) is another label");
        assert_eq!(step.next, Some(cur(20, 1)));
        // Last page overlaps the first; then live from its head.
        let mut got = Vec::new();
        f.take_history(
            vec![row(20, 0, "a"), row(30, 0, "a")],
            &cur(30, Cursor::END),
            false,
            |_| true,
            |r| {
                got.push(r.event_id);
                true
            },
        );
        assert_eq!(got, vec![30]);
        assert_eq!(f.phase, Phase::Live);
        assert_eq!(f.last, Some((30, Cursor::END)));
        let dup = PreparedBatch::new(Batch {
            head: cur(30, Cursor::END),
            changes: vec![row(30, 0, "a")],
            ..Batch::default()
        });
        assert!(
            live(&mut f, &dup, usize::MAX).is_empty(),
            "already delivered by history"
        );
        let batch = PreparedBatch::new(Batch {
            head: cur(40, Cursor::END),
            changes: vec![row(40, 0, "a"), row(40, 1, "b"), row(40, 2, "a")],
            ..Batch::default()
        });
        let got = live(&mut f, &batch, 1);
        assert_eq!(got, vec![0], "max 1");
        assert_eq!(
            f.cursor.as_deref(),
            Some(cur(40, 0).as_str()),
            "stops at the last row taken"
        );
        assert_eq!(live(&mut f, &batch, 5), vec![2], "the rest: (40,2)");
        assert_eq!(
            f.cursor.as_deref(),
            Some(cur(40, Cursor::END).as_str()),
            "then the batch head"
        );
    }
}
