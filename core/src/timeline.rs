//! Whether a cursor issued on one timeline is still a valid position on
//! this server's timeline.
//!
//! A cursor carries the timeline of the server that issued it. A promoted
//! standby starts a new timeline at its *switch point*: the WAL before it is
//! shared with the old timeline, the WAL after it is not. Transactions the
//! old primary committed past that point (and never sent) do not exist here.
//! So a cursor of an ancestor timeline is valid exactly when its event (a
//! commit LSN) lies before the point where that timeline ended in this
//! server's history; otherwise the client may have seen changes this server
//! never had, and must resync.
//!
//! The history is PostgreSQL's timeline history of the current timeline
//! (`pg_wal/<TLI>.history`, `readTimeLineHistory()`): one entry per
//! timeline, newest first, each with the WAL range `[begin, end)` it owns;
//! the current timeline's `end` is open (0).

/// One timeline of a server's history: it owns the WAL in `[begin, end)`;
/// `end == 0` means it is still open (the current timeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineEntry {
    pub tli: u32,
    pub begin: u64,
    pub end: u64,
}

/// Why a cursor's timeline does not fit this server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineProblem {
    /// The cursor's timeline ended at `switchpoint` on the way to this
    /// server's, and the cursor's event is at or past it.
    Diverged { switchpoint: u64 },
    /// The cursor's timeline is not in this server's history at all (a
    /// sibling timeline: another standby was promoted from the same one).
    NotInHistory,
    /// The cursor comes from a newer timeline than this server's, which this
    /// server does not descend from (a primary that kept running after its
    /// standby was promoted).
    Newer,
}

/// Checks a cursor `(cursor_tli, event_id)` against a server on `current`
/// whose timeline history is `history` (any order; entries for other
/// timelines are ignored). `newer_history` is the history of the cursor's
/// timeline when the cursor is newer and this server has it (a standby that
/// received the new timeline's history file but has not replayed the
/// switch yet); `None` otherwise.
pub fn check(
    cursor_tli: u32,
    event_id: u64,
    current: u32,
    history: &[TimelineEntry],
    newer_history: Option<&[TimelineEntry]>,
) -> Result<(), TimelineProblem> {
    if cursor_tli == current {
        return Ok(());
    }
    if cursor_tli > current {
        // Valid only when this server's timeline is an ancestor of the
        // cursor's and the event is before the point where ours ended there.
        let Some(theirs) = newer_history else {
            return Err(TimelineProblem::Newer);
        };
        return match ended_at(current, theirs) {
            Some(switchpoint) if event_id < switchpoint => Ok(()),
            _ => Err(TimelineProblem::Newer),
        };
    }
    match ended_at(cursor_tli, history) {
        Some(switchpoint) if event_id < switchpoint => Ok(()),
        Some(switchpoint) => Err(TimelineProblem::Diverged { switchpoint }),
        None => Err(TimelineProblem::NotInHistory),
    }
}

/// Where `tli` ended in `history`: its switch point. `None` when it is not
/// an ancestor there (absent, or still open).
pub fn ended_at(tli: u32, history: &[TimelineEntry]) -> Option<u64> {
    history.iter().find(|e| e.tli == tli && e.end != 0).map(|e| e.end)
}

/// The timeline history file's text (`<parent tli>\t<X/Y switch point>\t<reason>`
/// lines, as PostgreSQL writes `pg_wal/<TLI>.history`) turned into entries,
/// newest first, ending with `current`'s open entry. Lines that do not parse
/// are skipped (PostgreSQL itself rejects such a file; this reader is for
/// files PostgreSQL wrote).
pub fn parse_history(text: &str, current: u32) -> Vec<TimelineEntry> {
    let mut ancestors: Vec<(u32, u64)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(tli), Some(lsn)) = (fields.next(), fields.next()) else {
            continue;
        };
        if let (Ok(tli), Some(lsn)) = (tli.parse::<u32>(), crate::lsn::parse_lsn(lsn)) {
            ancestors.push((tli, lsn));
        }
    }
    let mut out = Vec::with_capacity(ancestors.len() + 1);
    let mut begin = 0;
    for (tli, end) in &ancestors {
        out.push(TimelineEntry {
            tli: *tli,
            begin,
            end: *end,
        });
        begin = *end;
    }
    out.push(TimelineEntry {
        tli: current,
        begin,
        end: 0,
    });
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 ended at 0x100, 2 ended at 0x200, 3 is current.
    fn history() -> Vec<TimelineEntry> {
        parse_history(
            "1\t0/100\tno recovery target specified\n2\t0/200\tno recovery target specified\n",
            3,
        )
    }

    #[test]
    fn parses_postgres_history_files() {
        assert_eq!(
            history(),
            vec![
                TimelineEntry {
                    tli: 3,
                    begin: 0x200,
                    end: 0
                },
                TimelineEntry {
                    tli: 2,
                    begin: 0x100,
                    end: 0x200
                },
                TimelineEntry {
                    tli: 1,
                    begin: 0,
                    end: 0x100
                },
            ]
        );
        assert_eq!(
            parse_history("", 1),
            vec![TimelineEntry {
                tli: 1,
                begin: 0,
                end: 0
            }]
        );
        assert_eq!(parse_history("garbage\n1 nope\n", 2).len(), 1);
    }

    #[test]
    fn same_timeline_is_always_valid() {
        assert_eq!(check(3, u64::MAX, 3, &history(), None), Ok(()));
        assert_eq!(check(1, 5, 1, &[], None), Ok(()));
    }

    #[test]
    fn an_ancestor_is_valid_only_before_its_switch_point() {
        let h = history();
        assert_eq!(check(1, 0xFF, 3, &h, None), Ok(()));
        assert_eq!(
            check(1, 0x100, 3, &h, None),
            Err(TimelineProblem::Diverged { switchpoint: 0x100 })
        );
        assert_eq!(check(2, 0x1FF, 3, &h, None), Ok(()));
        assert_eq!(
            check(2, 0x250, 3, &h, None),
            Err(TimelineProblem::Diverged { switchpoint: 0x200 })
        );
        // A cursor on timeline 1 past 0x100 may have seen what 1 wrote after
        // the switch, even below timeline 2's end.
        assert_eq!(
            check(1, 0x150, 3, &h, None),
            Err(TimelineProblem::Diverged { switchpoint: 0x100 })
        );
    }

    #[test]
    fn a_sibling_timeline_is_not_in_history() {
        // This server went 1 -> 3; another standby went 1 -> 2.
        let h = parse_history("1\t0/100\tx\n", 3);
        assert_eq!(check(2, 0x50, 3, &h, None), Err(TimelineProblem::NotInHistory));
    }

    #[test]
    fn a_newer_timeline_is_valid_only_below_where_ours_ended_there() {
        // This server is still on 1 (an old primary, or a standby that has not
        // replayed the switch); the cursor comes from 2, which began at 0x100.
        let theirs = parse_history("1\t0/100\tx\n", 2);
        assert_eq!(check(2, 0x80, 1, &[], Some(&theirs)), Ok(()));
        assert_eq!(check(2, 0x100, 1, &[], Some(&theirs)), Err(TimelineProblem::Newer));
        assert_eq!(check(2, 0x80, 1, &[], None), Err(TimelineProblem::Newer));
        // A newer timeline that does not descend from ours.
        let other = parse_history("4\t0/100\tx\n", 5);
        assert_eq!(check(5, 0x80, 1, &[], Some(&other)), Err(TimelineProblem::Newer));
    }
}
