//! Reading versions: `version()`, `versions()`, `version_map()`, `status()`.
//!
//! Reads come from shared memory. Until the relay worker has loaded the
//! persisted versions after a restart, they come from those tables instead,
//! so a reader never sees a version go back.

use crate::shmem::{self, WorkerState};
use crate::sql::{label_known, require_preloaded, unknown_label};
use changerelay_core::versions::{row_hash, Lookup, Version};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

fn loaded() -> bool {
    shmem::shared().is_some_and(|s| s.status.loaded.load(Ordering::Acquire))
}

/// When the version tables are not exact (the relay worker writes versions
/// at checkpoints, and the server stopped after versions moved since the
/// last one): the floor every label is raised to, the end of WAL now. No
/// commit before the restart is newer, so a reader sees a spurious
/// increment, never a version going back. `None` when the tables are exact.
pub fn floor_if_inexact() -> Result<Option<Version>, pgrx::spi::Error> {
    Spi::connect(|c| {
        let t = c.select(
            "SELECT ((CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
                          ELSE pg_catalog.pg_current_wal_insert_lsn() END) - '0/0'::pg_catalog.pg_lsn)::int8,
                    (extract(epoch FROM pg_catalog.clock_timestamp()) * 1000)::int8
               FROM changerelay.history_horizon WHERE NOT versions_exact",
            Some(1),
            &[],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        let v = r.get::<i64>(1)?.unwrap_or(0).max(0);
        let ts = r.get::<i64>(2)?.unwrap_or(0);
        Ok(Some(Version { v: v as u64, ts }))
    })
}

/// Versions of a label read from the persisted tables: (all, floor, rows),
/// floored when the tables are not exact ([`floor_if_inexact`]).
///
/// Not on a hot standby: there the tables are the primary's last version
/// checkpoint, replayed, and a floor at the replay position would go back
/// once the next checkpoint arrives. So a standby shows the checkpointed
/// versions as they are: behind the primary by at most one checkpoint
/// interval (plus replication lag), never backwards; after a promotion the
/// new primary's floors are raised past everything a standby showed.
fn persisted(label: &str, ident: Option<&str>) -> (Option<Version>, Version, Vec<(String, Version)>) {
    let (all, floor, rows) = persisted_as_written(label, ident);
    if crate::ha::in_recovery() {
        return (all, floor, rows);
    }
    match floor_if_inexact() {
        Ok(Some(f)) if all.is_some() || label_known(label) => {
            (Some(all.unwrap_or_default().max(f)), floor.max(f), rows)
        }
        _ => (all, floor, rows),
    }
}

fn persisted_as_written(label: &str, ident: Option<&str>) -> (Option<Version>, Version, Vec<(String, Version)>) {
    // Rows before the label's floor: a compaction of the version log that
    // commits in between drops rows and raises their floor in one
    // transaction, and the floor read after it covers the rows it dropped.
    let rows = Spi::connect(|c| {
        let t = c.select(
            "SELECT identifier, v, ts FROM changerelay.row_versions
              WHERE label = $1 AND ($2::text IS NULL OR identifier = $2) ORDER BY identifier",
            None,
            &[label.into(), ident.into()],
        )?;
        t.map(|r| {
            Ok::<_, pgrx::spi::Error>((
                r.get::<String>(1)?.unwrap_or_default(),
                Version {
                    v: r.get::<i64>(2)?.unwrap_or(0) as u64,
                    ts: r.get::<i64>(3)?.unwrap_or(0),
                },
            ))
        })
        .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_default();
    let rows = with_logged(label, ident, rows);
    let head = Spi::connect(|c| {
        let t = c.select(
            "SELECT v, ts, floor_v, floor_ts FROM changerelay.label_versions WHERE label = $1",
            Some(1),
            &[label.into()],
        )?;
        if t.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        let r = t.first();
        let v = |i| r.get::<i64>(i).map(|x| x.unwrap_or(0));
        Ok(Some((
            Version {
                v: v(1)? as u64,
                ts: v(2)?,
            },
            Version {
                v: v(3)? as u64,
                ts: v(4)?,
            },
        )))
    })
    .ok()
    .flatten();
    match head {
        Some((all, floor)) => (Some(all), floor, rows),
        None => (None, Version::default(), rows),
    }
}

/// `rows` of `label` (only `ident`'s, when given) with the newer versions
/// of the version log merged in, in identifier order (the log holds the
/// row versions written at checkpoints, compacted now and then; see
/// `worker::checkpoint`).
fn with_logged(label: &str, ident: Option<&str>, rows: Vec<(String, Version)>) -> Vec<(String, Version)> {
    let entries = crate::sql::select_all("SELECT entries FROM changerelay.version_log ORDER BY id", &[], |r| {
        r.get::<Vec<u8>>(1).map(Option::unwrap_or_default)
    })
    .unwrap_or_default();
    if entries.is_empty() {
        return rows;
    }
    let mut merged: std::collections::BTreeMap<String, Version> = rows.into_iter().collect();
    for entry in entries {
        for ((l, id), v) in changerelay_core::version_log::unpack_entry(&entry).unwrap_or_default() {
            if l == label && ident.is_none_or(|i| i == id) {
                let slot = merged.entry(id).or_default();
                *slot = slot.max(v);
            }
        }
    }
    merged.into_iter().collect()
}

/// A label's versions: the `all` version and every row version kept.
struct LabelVersions {
    all: Option<Version>,
    rows: Vec<(String, Version)>,
}

/// A label's versions from shared memory (loaded by the worker); None when
/// the map has no such label. No privilege check: callers do that.
fn from_shared_memory(label: &str) -> Option<LabelVersions> {
    // Copy under the shared lock; long identifiers are resolved after.
    let (all, idx, salt, rows) = shmem::with_map(|m| {
        let idx = m.find_label(label)?;
        let all = m.label(idx).map(|l| l.all);
        let salt = m.header.salt;
        let rows: Vec<(Vec<u8>, bool, u64, Version)> = m
            .rows(idx)
            .map(|(e, v)| (e.ident().to_vec(), e.is_truncated(), e.hash, v))
            .collect();
        Some((all, idx, salt, rows))
    })
    .flatten()?;
    let mut long_names: Option<Vec<(String, Version)>> = None;
    let mut out = Vec::with_capacity(rows.len());
    for (ident, truncated, hash, v) in rows {
        if truncated {
            let names = long_names.get_or_insert_with(|| persisted(label, None).2);
            if let Some((name, _)) = names.iter().find(|(n, _)| row_hash(salt, idx, n.as_bytes()) == hash) {
                out.push((name.clone(), v));
            }
        } else {
            out.push((String::from_utf8_lossy(&ident).into_owned(), v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Some(LabelVersions {
        all: all.filter(Version::is_set),
        rows: out,
    })
}

fn label_versions(label: &str) -> LabelVersions {
    require_preloaded();
    // Row identifiers are row data: only for roles that can read the tables,
    // and under row-level security only those of rows the role can see.
    crate::sql::check_label_access(label);
    let mut lv = all_label_versions(label);
    let ids: Vec<String> = lv.rows.iter().map(|(id, _)| id.clone()).collect();
    match crate::sql::access::visible_identifiers(label, &ids) {
        Ok(None) => {}
        Ok(Some(shown)) => lv.rows.retain(|(id, _)| shown.contains(id)),
        Err(e) => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("could not check row-level security for label \"{label}\": {e}"),
            None,
            "Check the policies of the label's tables.",
        ),
    }
    lv
}

fn all_label_versions(label: &str) -> LabelVersions {
    if loaded() {
        return match from_shared_memory(label) {
            Some(lv) => lv,
            None if label_known(label) => LabelVersions {
                all: None,
                rows: Vec::new(),
            },
            None => unknown_label(label),
        };
    }
    let (all, floor, rows) = persisted(label, None);
    if all.is_none() && rows.is_empty() && !label_known(label) {
        unknown_label(label);
    }
    LabelVersions {
        all,
        rows: rows.into_iter().map(|(n, v)| (n, v.max(floor))).collect(),
    }
}

/// The version of a label (`identifier` NULL: its `all` version) or of one
/// row of it. NULL for a row never seen; an error for an unknown label.
#[pg_extern(stable, parallel_safe)]
fn version(label: &str, identifier: default!(Option<&str>, "NULL")) -> Option<i64> {
    require_preloaded();
    // SAFETY: reading the session's role.
    if !unsafe { pg_sys::superuser() } {
        // Whether a row exists is row data too.
        crate::sql::check_label_access(label);
        if let Some(id) = identifier {
            let hidden = crate::sql::access::visible_identifiers(label, &[id.to_string()])
                .map(|shown| shown.is_some_and(|s| !s.contains(id)))
                .unwrap_or(true);
            if hidden {
                return None;
            }
        }
    }
    if loaded() {
        let found = shmem::with_map(|m| match identifier {
            None => match m.all(label) {
                Some(v) => Lookup::Found(v),
                None => Lookup::UnknownLabel,
            },
            Some(id) => m.lookup(label, id.as_bytes()),
        });
        return match found {
            Some(Lookup::Found(v)) if v.is_set() => Some(v.v as i64),
            Some(Lookup::Found(_)) | Some(Lookup::Unseen) => None,
            Some(Lookup::UnknownLabel) | None => {
                if label_known(label) {
                    None
                } else {
                    unknown_label(label)
                }
            }
        };
    }
    let (all, floor, rows) = persisted(label, identifier);
    match identifier {
        None if all.is_some() => all.map(|v| v.v as i64),
        None if label_known(label) => None,
        None => unknown_label(label),
        Some(_) => match rows.first() {
            Some((_, v)) => Some(v.max(floor).v as i64),
            None if floor.is_set() => Some(floor.v as i64),
            None if all.is_some() || label_known(label) => None,
            None => unknown_label(label),
        },
    }
}

/// Every version of a label: the `all` row first, then each row identifier.
#[pg_extern(stable, parallel_safe)]
fn versions(label: &str) -> TableIterator<'static, (name!(identifier, String), name!(v, i64), name!(ts, i64))> {
    let lv = label_versions(label);
    let mut out = Vec::with_capacity(lv.rows.len() + 1);
    if let Some(all) = lv.all {
        out.push(("all".to_string(), all.v as i64, all.ts));
    }
    out.extend(lv.rows.into_iter().map(|(id, v)| (id, v.v as i64, v.ts)));
    TableIterator::new(out)
}

/// The version map message applications parse:
/// `{"label":"parameters","data":{"all":{"v":…,"ts":…},"WAFCONFIG":{"v":…,"ts":…}}}`.
#[pg_extern(stable, parallel_safe)]
fn version_map(label: &str) -> JsonB {
    let lv = label_versions(label);
    let text = changerelay_core::versions::map_json(label, lv.all, lv.rows.iter().map(|(id, v)| (id.as_str(), *v)));
    // The same text the endpoint sends; it is valid JSON by construction.
    JsonB(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The version map message for the relay worker's endpoint, as text:
/// (whole message, its `data` object). No privilege checks (tokens scope
/// labels there). `known`: the label is tracked, so a label the map has not
/// seen yet gets an empty map. None: an unknown label. Needs a transaction
/// (long identifiers are resolved from `row_versions`).
pub fn version_map_for_endpoint(label: &str, known: bool) -> Option<(String, String)> {
    let lv = match from_shared_memory(label) {
        Some(lv) => lv,
        None if known => LabelVersions {
            all: None,
            rows: Vec::new(),
        },
        None => return None,
    };
    let rows = || lv.rows.iter().map(|(id, v)| (id.as_str(), *v));
    Some((
        changerelay_core::versions::map_json(label, lv.all, rows()),
        changerelay_core::versions::data_json(lv.all, rows()),
    ))
}

/// The relay worker's state, its slot's progress, the map's fill and where
/// this server stands in a replicated cluster (`ha`).
#[pg_extern(volatile)]
fn status() -> JsonB {
    require_preloaded();
    let Some(shared) = shmem::shared() else {
        unreachable!("checked by require_preloaded")
    };
    let st = &shared.status;
    let state = WorkerState::from_u32(st.state.load(Ordering::Acquire));
    let pid = st.pid.load(Ordering::Acquire);
    let slot = crate::gucs::slot_name();
    let row = crate::sql::select_one::<JsonB>(
        "SELECT pg_catalog.to_jsonb(s) || pg_catalog.jsonb_build_object('lag_bytes',
                (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
                      ELSE pg_catalog.pg_current_wal_lsn() END - s.confirmed_flush_lsn)::int8)
           FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = $1",
        &[slot.as_str().into()],
    )
    .ok()
    .flatten()
    .map(|j| j.0)
    .unwrap_or(Value::Null);
    let field = |k: &str| row.get(k).cloned().unwrap_or(Value::Null);
    let (used, labels, evictions) = shmem::with_map(|m| {
        (
            m.header.used,
            m.labels.iter().filter(|l| l.in_use).count(),
            m.header.evictions,
        )
    })
    .unwrap_or((0, 0, 0));
    let last_ts = st.last_commit_ts.load(Ordering::Acquire);
    // Names only (no filters, no URLs): whoever may call status() may see them. The tables are missing
    // while the extension waits for ALTER EXTENSION UPDATE from 0.1.0.
    let (consumers, sinks) = crate::sql::access::as_role(crate::sql::access::extension_owner(), || {
        let q = |table: &str, sql: &str| {
            let exists =
                crate::sql::select_one::<bool>("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[table.into()])
                    .ok()
                    .flatten()
                    .unwrap_or(false);
            if !exists {
                return Value::Null;
            }
            crate::sql::select_one::<JsonB>(sql, &[])
                .ok()
                .flatten()
                .map_or(Value::Null, |j| j.0)
        };
        (
            q(
                "changerelay.consumers",
                "SELECT pg_catalog.json_build_object('count', count(*),
                      'lagging', coalesce(pg_catalog.jsonb_agg(name ORDER BY name) FILTER (WHERE lagging_since IS NOT NULL), '[]'))::jsonb
                 FROM changerelay.consumers",
            ),
            q(
                "changerelay.sinks",
                "SELECT pg_catalog.json_build_object('count', count(*),
                      'lagging', coalesce(pg_catalog.jsonb_agg(name ORDER BY name) FILTER (WHERE lagging_since IS NOT NULL), '[]'),
                      'not_streaming', coalesce(pg_catalog.jsonb_agg(name ORDER BY name) FILTER (WHERE state <> 'streaming'), '[]'))::jsonb
                 FROM changerelay.sinks",
            ),
        )
    });
    let mut sinks = sinks;
    if let Some(o) = sinks.as_object_mut() {
        o.insert(
            "thread_restarts".into(),
            Value::from(st.sinks_restarts.load(Ordering::Relaxed)),
        );
    }
    JsonB(json!({
        "consumers": consumers,
        "sinks": sinks,
        "enabled": crate::gucs::enabled(),
        "worker": {
            "pid": if pid > 0 { Value::from(pid) } else { Value::Null },
            "state": state.as_str(),
            "database": crate::gucs::database(),
            "dead_letters": st.dead_letters.load(Ordering::Relaxed),
            "apply_retries": st.apply_retries.load(Ordering::Relaxed),
        },
        "slot": {
            "name": slot,
            "confirmed_lsn": field("confirmed_flush_lsn"),
            "lag_bytes": field("lag_bytes"),
            "wal_status": field("wal_status"),
            "safe_wal_size": field("safe_wal_size"),
            "invalidation_reason": field("invalidation_reason"),
            "failover": field("failover"),
            "synced": field("synced"),
            "temporary": field("temporary"),
        },
        "last_event_id": st.last_event_id.load(Ordering::Acquire),
        "last_commit_ts": if last_ts > 0 { Value::from(last_ts) } else { Value::Null },
        "last_commit_time": if last_ts > 0 { Value::from(changerelay_core::time::iso8601(last_ts * 1000)) } else { Value::Null },
        "batches": st.batches.load(Ordering::Relaxed),
        "changes": st.changes.load(Ordering::Relaxed),
        "versions_loaded": st.loaded.load(Ordering::Acquire),
        "tracked_rows": {
            "used": used,
            "capacity": shared.n_entries,
            "bytes_per_row": shmem::BYTES_PER_ROW,
            "evictions": evictions,
        },
        "labels": { "used": labels, "capacity": shared.n_labels },
        "endpoint": {
            "port": crate::gucs::port(),
            "state": match st.endpoint.load(Ordering::Acquire) {
                1 => "listening",
                2 => "failed (see the server log)",
                _ => "off",
            },
            "restarts": st.endpoint_restarts.load(Ordering::Relaxed),
        },
        "ha": super::ha_status::ha(&row),
    }))
}
