//! What the relay worker does with its slot when it starts, and the gaps in
//! the change history it must make explicit.
//!
//! The worker's slot and its history (in the same database, replicated with
//! it) must agree: the slot may be confirmed only up to what the history
//! covers (`decoded_upto`, written in the same transaction as each batch's
//! history). When they do not, changes were lost between them, and the only
//! honest answer is a *gap*: a new slot from now on, and every cursor from
//! before it refused with an error naming the reason, so clients reload.
//! Nothing here talks to Postgres; the worker feeds it what it read.

use serde_json::Value;

/// The worker's slot as `pg_replication_slots` shows it, from the
/// `to_jsonb()` of its row (columns differ between majors: 15 has no
/// `invalidation_reason`, `failover` or `synced`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotInfo {
    pub plugin: String,
    pub temporary: bool,
    pub confirmed_flush: Option<u64>,
    pub restart_lsn: Option<u64>,
    pub wal_status: Option<String>,
    pub invalidation_reason: Option<String>,
    /// 17+: a failover slot (synchronised to standbys).
    pub failover: Option<bool>,
    /// 17+: this copy was synchronised from a primary.
    pub synced: Option<bool>,
}

impl SlotInfo {
    /// Reads a `to_jsonb(pg_replication_slots)` row.
    pub fn from_json(v: &Value) -> SlotInfo {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let lsn = |k: &str| v.get(k).and_then(Value::as_str).and_then(crate::lsn::parse_lsn);
        let flag = |k: &str| v.get(k).and_then(Value::as_bool);
        SlotInfo {
            plugin: text("plugin").unwrap_or_default(),
            temporary: flag("temporary").unwrap_or(false),
            confirmed_flush: lsn("confirmed_flush_lsn"),
            restart_lsn: lsn("restart_lsn"),
            wal_status: text("wal_status"),
            invalidation_reason: text("invalidation_reason"),
            failover: flag("failover"),
            synced: flag("synced"),
        }
    }

    /// Why the slot can no longer be decoded, if it can not: PostgreSQL
    /// invalidated it (17+ say why; 15 shows `wal_status = lost`, and an
    /// invalidated slot there has no `restart_lsn` any more).
    pub fn invalidated(&self) -> Option<String> {
        if let Some(reason) = &self.invalidation_reason {
            return Some(reason.clone());
        }
        if self.wal_status.as_deref() == Some("lost") || self.restart_lsn.is_none() {
            return Some("wal_removed".into());
        }
        None
    }
}

/// What the history says about where it stands, read from
/// `changerelay.history_horizon` (and whether history exists at all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryMark {
    /// The position decoding reached when the history was last written;
    /// `None` before the first write (a new install, or an update from
    /// 0.1.0, which did not record it).
    pub decoded_upto: Option<u64>,
    /// The timeline the history was last written on.
    pub timeline: Option<u32>,
    /// The history has something to lose: rows, applied transactions or a
    /// recorded position.
    pub has_history: bool,
}

/// Why old cursors can not be served any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapReason {
    /// The slot was dropped (or never existed here) while history existed.
    SlotMissing,
    /// PostgreSQL invalidated the slot (`wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`, `idle_timeout`).
    SlotInvalidated(String),
    /// The slot was confirmed past what the history covers: the changes in
    /// between were consumed without being recorded.
    SlotAheadOfHistory { confirmed: u64, decoded_upto: u64 },
    /// This server was promoted (its timeline moved on since the history was
    /// written) and has no usable copy of the slot: PostgreSQL 15 and 16 have
    /// no failover slots; on 17+ it was not synchronised here (or only as a
    /// temporary, not yet sync-ready copy).
    PromotedWithoutSlot { from_tli: u32, to_tli: u32 },
}

impl GapReason {
    /// The code kept in `changerelay.history_gaps.reason` and shown in
    /// `status()->'ha'`.
    pub fn code(&self) -> &'static str {
        match self {
            GapReason::SlotMissing => "slot_missing",
            GapReason::SlotInvalidated(_) => "slot_invalidated",
            GapReason::SlotAheadOfHistory { .. } => "slot_ahead_of_history",
            GapReason::PromotedWithoutSlot { .. } => "promoted_without_slot",
        }
    }

    /// A sentence for the log and the gap's record.
    pub fn detail(&self, slot: &str) -> String {
        use crate::lsn::lsn_to_string as l;
        match self {
            GapReason::SlotMissing => format!("replication slot \"{slot}\" does not exist any more"),
            GapReason::SlotInvalidated(why) => {
                format!("replication slot \"{slot}\" was invalidated by PostgreSQL ({why})")
            }
            GapReason::SlotAheadOfHistory { confirmed, decoded_upto } => format!(
                "replication slot \"{slot}\" is confirmed up to {} but the history only covers up to {}",
                l(*confirmed),
                l(*decoded_upto)
            ),
            GapReason::PromotedWithoutSlot { from_tli, to_tli } => format!(
                "this server was promoted (timeline {from_tli} -> {to_tli}) without a usable copy of replication slot \"{slot}\""
            ),
        }
    }
}

/// The message of the `72000` error a cursor from before a gap gets.
pub fn gap_message(code: &str) -> &'static str {
    match code {
        "slot_missing" => "cursor predates a gap in the change history: the relay's replication slot was lost",
        "slot_invalidated" => {
            "cursor predates a gap in the change history: the relay's replication slot was invalidated"
        }
        "slot_ahead_of_history" => {
            "cursor predates a gap in the change history: the relay's replication slot was confirmed beyond the history"
        }
        "promoted_without_slot" => {
            "cursor predates a gap in the change history: this server was promoted without the relay's replication slot"
        }
        _ => "cursor predates a gap in the change history",
    }
}

/// What to do with the slot before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotAction {
    /// Decode from it.
    Use,
    /// Create it: nothing is lost (no history yet).
    Create,
    /// Drop the unusable slot and create a new one: nothing is lost (no
    /// history yet).
    Replace,
    /// Record a gap, then drop the slot if it exists and create a new one.
    Gap(GapReason),
}

/// Decides what to do with the worker's slot (`None`: it does not exist) on
/// a server now on timeline `current_tli`. `history`: `None` when the
/// extension is not installed in this version yet (then nothing can be
/// recorded or lost, and a missing slot is simply created).
pub fn decide(slot: Option<&SlotInfo>, history: Option<&HistoryMark>, current_tli: u32) -> SlotAction {
    let promoted_from = history
        .and_then(|h| h.timeline)
        .filter(|&tli| tli != current_tli && tli != 0);
    let at_stake = history.is_some_and(|h| h.has_history);
    let unusable = |missing_reason: GapReason| match promoted_from {
        Some(from_tli) => GapReason::PromotedWithoutSlot {
            from_tli,
            to_tli: current_tli,
        },
        None => missing_reason,
    };
    let Some(slot) = slot else {
        return if at_stake {
            SlotAction::Gap(unusable(GapReason::SlotMissing))
        } else {
            SlotAction::Create
        };
    };
    if let Some(why) = slot.invalidated() {
        // An invalid slot can not be decoded whatever the history holds.
        return if at_stake {
            SlotAction::Gap(GapReason::SlotInvalidated(why))
        } else {
            SlotAction::Replace
        };
    }
    if slot.temporary {
        // A synchronised copy that never became sync-ready, or someone
        // else's session slot: it goes away, it must not be relied on.
        return if at_stake {
            SlotAction::Gap(unusable(GapReason::SlotMissing))
        } else {
            SlotAction::Replace
        };
    }
    if let (Some(h), Some(confirmed)) = (history, slot.confirmed_flush) {
        if let Some(decoded_upto) = h.decoded_upto {
            if confirmed > decoded_upto {
                return SlotAction::Gap(GapReason::SlotAheadOfHistory {
                    confirmed,
                    decoded_upto,
                });
            }
        }
    }
    SlotAction::Use
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slot(confirmed: u64) -> SlotInfo {
        SlotInfo {
            plugin: "pg_changerelay".into(),
            confirmed_flush: Some(confirmed),
            restart_lsn: Some(confirmed.saturating_sub(0x10)),
            wal_status: Some("reserved".into()),
            ..SlotInfo::default()
        }
    }

    fn mark(decoded_upto: Option<u64>, timeline: Option<u32>, has_history: bool) -> HistoryMark {
        HistoryMark {
            decoded_upto,
            timeline,
            has_history,
        }
    }

    #[test]
    fn reads_slot_rows_of_every_major() {
        let v15 = json!({"slot_name":"changerelay","plugin":"pg_changerelay","temporary":false,
            "restart_lsn":"0/1A2B3C","confirmed_flush_lsn":"0/1A2B40","wal_status":"reserved","safe_wal_size":null});
        let s = SlotInfo::from_json(&v15);
        assert_eq!(s.confirmed_flush, Some(0x1A2B40));
        assert_eq!((s.failover, s.synced, s.invalidated()), (None, None, None));
        let lost15 =
            json!({"plugin":"pg_changerelay","restart_lsn":null,"confirmed_flush_lsn":"0/1A2B40","wal_status":"lost"});
        assert_eq!(SlotInfo::from_json(&lost15).invalidated(), Some("wal_removed".into()));
        let v17 = json!({"plugin":"pg_changerelay","temporary":false,"restart_lsn":"0/10","confirmed_flush_lsn":"0/20",
            "wal_status":"lost","invalidation_reason":"rows_removed","failover":true,"synced":true});
        let s = SlotInfo::from_json(&v17);
        assert_eq!((s.failover, s.synced), (Some(true), Some(true)));
        assert_eq!(s.invalidated(), Some("rows_removed".into()), "the reason 17 gives wins");
    }

    #[test]
    fn a_missing_slot_is_created_unless_history_is_at_stake() {
        assert_eq!(decide(None, None, 1), SlotAction::Create, "extension not installed");
        assert_eq!(decide(None, Some(&mark(None, None, false)), 1), SlotAction::Create);
        assert_eq!(
            decide(None, Some(&mark(Some(0x100), Some(1), true)), 1),
            SlotAction::Gap(GapReason::SlotMissing)
        );
    }

    #[test]
    fn a_missing_slot_after_promotion_says_so() {
        assert_eq!(
            decide(None, Some(&mark(Some(0x100), Some(1), true)), 2),
            SlotAction::Gap(GapReason::PromotedWithoutSlot { from_tli: 1, to_tli: 2 })
        );
        let mut temp = slot(0x80);
        temp.temporary = true;
        assert_eq!(
            decide(Some(&temp), Some(&mark(Some(0x100), Some(1), true)), 2),
            SlotAction::Gap(GapReason::PromotedWithoutSlot { from_tli: 1, to_tli: 2 }),
            "a synced copy that never became sync-ready"
        );
    }

    #[test]
    fn an_invalidated_slot_is_always_a_gap() {
        let mut s = slot(0x100);
        s.wal_status = Some("lost".into());
        assert_eq!(decide(Some(&s), None, 1), SlotAction::Replace, "nothing recorded yet");
        assert_eq!(
            decide(Some(&s), Some(&mark(Some(0x100), Some(1), true)), 1),
            SlotAction::Gap(GapReason::SlotInvalidated("wal_removed".into()))
        );
        s.invalidation_reason = Some("idle_timeout".into());
        assert_eq!(
            decide(Some(&s), Some(&mark(Some(0x100), Some(1), true)), 1),
            SlotAction::Gap(GapReason::SlotInvalidated("idle_timeout".into()))
        );
    }

    #[test]
    fn a_slot_confirmed_beyond_the_history_is_a_gap() {
        let h = mark(Some(0x100), Some(1), true);
        assert_eq!(decide(Some(&slot(0x100)), Some(&h), 1), SlotAction::Use);
        assert_eq!(
            decide(Some(&slot(0x80)), Some(&h), 1),
            SlotAction::Use,
            "behind: decoded again"
        );
        assert_eq!(
            decide(Some(&slot(0x101)), Some(&h), 1),
            SlotAction::Gap(GapReason::SlotAheadOfHistory {
                confirmed: 0x101,
                decoded_upto: 0x100
            })
        );
        // A synced slot after promotion, behind the replicated history: fine.
        let mut synced = slot(0xF0);
        synced.synced = Some(true);
        synced.failover = Some(true);
        assert_eq!(decide(Some(&synced), Some(&h), 2), SlotAction::Use);
        // Unknown position (an update from 0.1.0): nothing to compare.
        assert_eq!(
            decide(Some(&slot(0x999)), Some(&mark(None, None, true)), 1),
            SlotAction::Use
        );
    }

    #[test]
    fn every_reason_has_a_distinct_message() {
        let codes = [
            "slot_missing",
            "slot_invalidated",
            "slot_ahead_of_history",
            "promoted_without_slot",
        ];
        let messages: std::collections::BTreeSet<_> = codes.iter().map(|c| gap_message(c)).collect();
        assert_eq!(messages.len(), codes.len());
        for (reason, code) in [
            (GapReason::SlotMissing, codes[0]),
            (GapReason::SlotInvalidated("x".into()), codes[1]),
            (
                GapReason::SlotAheadOfHistory {
                    confirmed: 2,
                    decoded_upto: 1,
                },
                codes[2],
            ),
            (GapReason::PromotedWithoutSlot { from_tli: 1, to_tli: 2 }, codes[3]),
        ] {
            assert_eq!(reason.code(), code);
            assert!(reason.detail("changerelay").contains("changerelay"));
        }
    }
}
