//! Writing a batch: versions and history in one transaction, with the event
//! id applied through.
//!
//! The statements are prepared once per worker process (SPI_keepplan) and
//! reused for every batch: with a commit per batch, parsing and planning
//! them again each time was a large part of a small batch's cost. The plan
//! cache re-plans them by itself if the tables change.

use changerelay_core::apply::{HistoryRow, VersionUpdates};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use std::panic::AssertUnwindSafe;

/// History rows inserted per statement (bounds the argument arrays).
const HISTORY_CHUNK: usize = 5000;

const APPLIED: &str = "SELECT applied FROM changerelay.history_horizon";
const LABELS: &str = "INSERT INTO changerelay.label_versions AS t (label, v, ts, floor_v, floor_ts)
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])
     ON CONFLICT (label) DO UPDATE SET
        v = greatest(t.v, excluded.v),
        ts = CASE WHEN excluded.v > t.v THEN excluded.ts ELSE t.ts END,
        floor_v = greatest(t.floor_v, excluded.floor_v),
        floor_ts = CASE WHEN excluded.floor_v > t.floor_v THEN excluded.floor_ts ELSE t.floor_ts END";
const ROWS: &str = "INSERT INTO changerelay.row_versions AS t (label, identifier, v, ts)
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])
     ON CONFLICT (label, identifier) DO UPDATE SET
        v = greatest(t.v, excluded.v),
        ts = CASE WHEN excluded.v > t.v THEN excluded.ts ELSE t.ts END";
const HISTORY: &str = "INSERT INTO changerelay.history
        (event_id, pos, seq, ts, xid, relid, label, table_name, op, identifier, key, new, old, metadata)
     SELECT e, p, s, t, x, r::oid, l, tn, o, i, k::jsonb, n::jsonb, ol::jsonb, m::jsonb
       FROM unnest($1::int8[], $2::int4[], $3::int4[], $4::int8[], $5::int8[], $6::int8[], $7::text[],
                   $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[])
            AS u(e, p, s, t, x, r, l, tn, o, i, k, n, ol, m)";
const HORIZON: &str = "UPDATE changerelay.history_horizon SET applied = $1";

struct Statements {
    applied: OwnedPreparedStatement,
    labels: OwnedPreparedStatement,
    rows: OwnedPreparedStatement,
    history: OwnedPreparedStatement,
    horizon: OwnedPreparedStatement,
}

fn oids(types: &[pg_sys::Oid]) -> Vec<PgOid> {
    types.iter().map(|t| PgOid::from(*t)).collect()
}

impl Statements {
    fn prepare(c: &SpiClient<'_>) -> Result<Statements, pgrx::spi::Error> {
        use pg_sys::{INT4ARRAYOID as I4S, INT8ARRAYOID as I8S, INT8OID as I8, TEXTARRAYOID as TS};
        Ok(Statements {
            applied: c.prepare(APPLIED, &[])?.keep(),
            labels: c.prepare_mut(LABELS, &oids(&[TS, I8S, I8S, I8S, I8S]))?.keep(),
            rows: c.prepare_mut(ROWS, &oids(&[TS, TS, I8S, I8S]))?.keep(),
            history: c
                .prepare_mut(
                    HISTORY,
                    &oids(&[I8S, I4S, I4S, I8S, I8S, I8S, TS, TS, TS, TS, TS, TS, TS, TS]),
                )?
                .keep(),
            horizon: c.prepare_mut(HORIZON, &oids(&[I8]))?.keep(),
        })
    }
}

#[derive(Default)]
pub struct Persister {
    statements: Option<Statements>,
}

impl Persister {
    /// Writes the batch's versions and history in one transaction, together
    /// with the event id it has applied through, and returns the history rows
    /// written. Transactions at or below that mark were applied before (the
    /// batch is being decoded again after a crash or restart): their history
    /// is skipped, their versions are harmless to apply again (they only move
    /// forward). A row already there means the mark is wrong: that is an error
    /// (the worker restarts), never a silent skip. The batch's history rows
    /// are moved out of `u`, not copied.
    pub fn persist(&mut self, u: &mut VersionUpdates) -> Vec<HistoryRow> {
        let history = std::mem::take(&mut u.history);
        let u = &*u;
        let statements = AssertUnwindSafe(&mut self.statements);
        let result = BackgroundWorker::transaction(move || {
            let statements = statements;
            Spi::connect_mut(|c| {
                if statements.0.is_none() {
                    *statements.0 = Some(Statements::prepare(c)?);
                }
                let Some(st) = statements.0.as_ref() else {
                    unreachable!("prepared above")
                };
                write_batch(c, st, u, history)
            })
        });
        match result {
            Ok(fresh) => fresh,
            Err(e) => error!("pg_changerelay relay: could not persist versions: {e}"),
        }
    }
}

fn write_batch(
    c: &mut SpiClient<'_>,
    st: &Statements,
    u: &VersionUpdates,
    history: Vec<HistoryRow>,
) -> Result<Vec<HistoryRow>, pgrx::spi::Error> {
    // Only this process writes the mark, so no row lock is needed.
    let applied = c
        .select(&st.applied, Some(1), &[])?
        .first()
        .get_one::<i64>()?
        .unwrap_or(0);
    let mut labels: Vec<String> = Vec::new();
    let (mut lv, mut lts, mut fv, mut fts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for label in u
        .labels
        .keys()
        .chain(u.floors.keys().filter(|l| !u.labels.contains_key(*l)))
    {
        let all = u.labels.get(label).copied().unwrap_or_default();
        let floor = u.floors.get(label).copied().unwrap_or_default();
        labels.push(label.clone());
        lv.push(all.v as i64);
        lts.push(all.ts);
        fv.push(floor.v as i64);
        fts.push(floor.ts);
    }
    c.update(
        &st.labels,
        None,
        &[labels.into(), lv.into(), lts.into(), fv.into(), fts.into()],
    )?;
    if !u.rows.is_empty() {
        let (mut rl, mut ri, mut rv, mut rts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((label, id), v) in &u.rows {
            rl.push(label.clone());
            ri.push(id.clone());
            rv.push(v.v as i64);
            rts.push(v.ts);
        }
        c.update(&st.rows, None, &[rl.into(), ri.into(), rv.into(), rts.into()])?;
    }
    let fresh: Vec<HistoryRow> = history.into_iter().filter(|r| r.event_id as i64 > applied).collect();
    for chunk in fresh.chunks(HISTORY_CHUNK) {
        insert_history(c, &st.history, chunk)?;
    }
    let through = u.last_commit.map(|c| c.event_id as i64).unwrap_or(0);
    if through > applied {
        c.update(&st.horizon, None, &[through.into()])?;
    }
    Ok(fresh)
}

fn insert_history(
    c: &mut SpiClient<'_>,
    statement: &OwnedPreparedStatement,
    rows: &[HistoryRow],
) -> Result<(), pgrx::spi::Error> {
    let col = |f: &dyn Fn(&HistoryRow) -> Option<String>| rows.iter().map(f).collect::<Vec<Option<String>>>();
    let event_ids: Vec<i64> = rows.iter().map(|r| r.event_id as i64).collect();
    let pos: Vec<i32> = rows.iter().map(|r| r.pos as i32).collect();
    let seq: Vec<i32> = rows.iter().map(|r| r.seq as i32).collect();
    let ts: Vec<i64> = rows.iter().map(|r| r.ts).collect();
    let xid: Vec<i64> = rows.iter().map(|r| i64::from(r.xid)).collect();
    let relid: Vec<i64> = rows.iter().map(|r| i64::from(r.relid)).collect();
    let label: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    let table: Vec<String> = rows.iter().map(|r| r.table_name.clone()).collect();
    let op: Vec<String> = rows.iter().map(|r| r.op.to_string()).collect();
    c.update(
        statement,
        None,
        &[
            event_ids.into(),
            pos.into(),
            seq.into(),
            ts.into(),
            xid.into(),
            relid.into(),
            label.into(),
            table.into(),
            op.into(),
            col(&|r| r.identifier.clone()).into(),
            col(&|r| r.key.clone()).into(),
            col(&|r| r.new.clone()).into(),
            col(&|r| r.old.clone()).into(),
            col(&|r| r.metadata.clone()).into(),
        ],
    )?;
    Ok(())
}
