//! Pruning the change history.
//!
//! History older than `changerelay.history_retention` goes, except what a
//! durable consumer has not acknowledged or a sink has not delivered: that is
//! kept up to `changerelay.max_consumer_lag`. Past it, history is pruned all
//! the same and the consumer or sink is marked lagging (`lagging_since`, a
//! WARNING): a lagging consumer's `consume()` then fails until it is created
//! again; a lagging sink's position moves to the horizon and it delivers on
//! from there, its gap shown in `sinks()`. Pruning deletes rows and raises the
//! horizon in one transaction, which makes older cursors expire.

use crate::gucs;
use crate::sql::{select_one, write_all};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// What a consumer's or sink's position `(event_id, pos)` keeps: every event
/// after `event_id - 1`, or after `event_id` once past its end.
const HOLD: &str = "CASE WHEN pos >= 4294967295 THEN event_id ELSE event_id - 1 END";

/// Prunes at most every tenth of the retention (between 1 s and 1 min).
/// Writes (and so takes a transaction id) only when there is something to
/// prune.
pub fn maybe_prune(last: &mut Option<Instant>) {
    let retention = gucs::history_retention();
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    if last.is_some_and(|t| t.elapsed() < every) {
        return;
    }
    *last = Some(Instant::now());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let cutoff = now_ms - retention.as_millis() as i64;
    let lag_cutoff = now_ms - gucs::max_consumer_lag().as_millis().min(i64::MAX as u128) as i64;
    let plan = BackgroundWorker::transaction(move || {
        let newest_old = |before: i64| {
            select_one::<i64>(
                "SELECT max(last_event_id) FROM changerelay.history WHERE ts < $1",
                &[before.into()],
            )
        };
        let cut = newest_old(cutoff)?;
        let held = select_one::<i64>(
            &format!(
                "SELECT min(hold) FROM (SELECT {HOLD} AS hold FROM changerelay.consumers WHERE lagging_since IS NULL
                                        UNION ALL SELECT {HOLD} FROM changerelay.sinks) h"
            ),
            &[],
        )?;
        let forced = newest_old(lag_cutoff.min(cutoff))?;
        let horizon = select_one::<i64>("SELECT event_id FROM changerelay.history_horizon", &[])?.unwrap_or(0);
        Ok::<_, pgrx::spi::Error>((cut, held, forced, horizon))
    });
    let (cut, held, forced, horizon) = match plan {
        Ok((Some(cut), held, forced, horizon)) => (cut, held, forced, horizon),
        Ok(_) => return,
        Err(e) => {
            warning!("pg_changerelay relay: could not plan pruning: {e}");
            return;
        }
    };
    let cut = match held {
        Some(h) => cut.min(h).max(forced.unwrap_or(i64::MIN)),
        None => cut,
    };
    if cut <= horizon {
        return;
    }
    let done = BackgroundWorker::transaction(move || {
        // A chunk goes once its last change is at or before the cut (one
        // that spans it stays whole; the horizon hides what it holds before).
        Spi::run_with_args(
            "DELETE FROM changerelay.history WHERE event_id <= $1 AND last_event_id <= $1",
            &[cut.into()],
        )?;
        Spi::run_with_args(
            "DELETE FROM changerelay.history_metadata WHERE event_id <= $1",
            &[cut.into()],
        )?;
        Spi::run_with_args(
            "UPDATE changerelay.history_horizon SET event_id = greatest(event_id, $1)",
            &[cut.into()],
        )?;
        let consumers = write_all(
            &format!(
                "UPDATE changerelay.consumers SET lagging_since = pg_catalog.now()
                  WHERE lagging_since IS NULL AND {HOLD} < $1 RETURNING name"
            ),
            &[cut.into()],
            |r| Ok(r.get::<String>(1)?.unwrap_or_default()),
        )?;
        let sinks = write_all(
            &format!(
                "UPDATE changerelay.sinks SET lagging_since = pg_catalog.now(), event_id = $1, pos = 4294967295
                  WHERE {HOLD} < $1 RETURNING name"
            ),
            &[cut.into()],
            |r| Ok(r.get::<String>(1)?.unwrap_or_default()),
        )?;
        Ok::<_, pgrx::spi::Error>((consumers, sinks))
    });
    match done {
        Ok((consumers, sinks)) => {
            for name in consumers {
                warning!(
                    "pg_changerelay relay: consumer \"{name}\" fell behind changerelay.max_consumer_lag; history after \
                     its position was pruned and it is marked lagging (drop it and create it again)"
                );
            }
            for name in sinks {
                warning!(
                    "pg_changerelay relay: sink \"{name}\" fell behind changerelay.max_consumer_lag; history it had \
                     not delivered up to event {cut} was pruned and it goes on after it (marked lagging)"
                );
            }
        }
        Err(e) => error!("pg_changerelay relay: could not prune history: {e}"),
    }
}
