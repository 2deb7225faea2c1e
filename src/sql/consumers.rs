//! Durable consumers: named positions in the change history that several
//! readers share, with leases (`create_consumer()`, `consume()`, `ack()`,
//! `drop_consumer()`, `consumers()`).
//!
//! A consumer's position (everything at or before it is acknowledged) and
//! its leases live in tables, so they survive restarts and replicate to
//! standbys. `consume()` leases the next range of history (or a range whose
//! lease expired, first) to the caller: ranges never overlap, so readers of
//! one consumer never get the same change while a lease holds. `ack()`
//! acknowledges a lease up to a cursor, and the position moves over every
//! acknowledged range that follows it. A range left unacknowledged past its
//! visibility timeout is leased again, whole, to the next reader; an ack for
//! a lease that expired is refused, so a change is acknowledged once.
//!
//! Readers read as the consumer's creator (grants and row-level security
//! apply) and must be members of that role. The tables are written as the
//! extension's owner, through these functions only. Every statement here
//! goes through SPI's writing path (`write_all`/`write_one`), which takes a
//! new snapshot per statement: a read-only one would not see the writes made
//! earlier in the same call.

use crate::errors::raise;
use crate::sql::access::{as_role, current_role, extension_owner};
use crate::sql::history::{self, interval_ms, tuple, ChangeTuple, Request};
use crate::sql::tokens::{check_name, require_admin};
use crate::sql::{cursors, require_preloaded, write_all, write_one};
use changerelay_core::cursor::Cursor;
use changerelay_core::filter::Filter;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::JsonB;

extension_sql!(
    r#"
-- Durable consumers: everything at or before (event_id, pos) is acknowledged.
CREATE TABLE changerelay.consumers (
    name text PRIMARY KEY,
    labels text[] NOT NULL,
    filter jsonb,
    event_id bigint NOT NULL,
    pos bigint NOT NULL,
    creator oid NOT NULL,
    created_by name NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set when history after its position was pruned (changerelay.max_consumer_lag).
    lagging_since timestamptz
);
-- Ranges (after, upto] of history past a consumer's position: leased (lease,
-- expires_at) or acknowledged (lease NULL), tiling the history after it.
CREATE TABLE changerelay.consumer_leases (
    consumer text NOT NULL REFERENCES changerelay.consumers ON DELETE CASCADE,
    after_event bigint NOT NULL,
    after_pos bigint NOT NULL,
    upto_event bigint NOT NULL,
    upto_pos bigint NOT NULL,
    lease bigint,
    expires_at timestamptz,
    PRIMARY KEY (consumer, after_event, after_pos)
);
CREATE SEQUENCE changerelay.consumer_lease_ids;
SELECT pg_catalog.pg_extension_config_dump('changerelay.consumers', '');
REVOKE ALL ON changerelay.consumers, changerelay.consumer_leases, changerelay.consumer_lease_ids FROM PUBLIC;
"#,
    name = "consumer_tables",
    requires = ["tracking_tables"]
);

extension_sql!(
    r#"
REVOKE EXECUTE ON FUNCTION changerelay.create_consumer(text, text[], jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION changerelay.drop_consumer(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION changerelay.create_consumer(text, text[], jsonb) TO changerelay_admin;
GRANT EXECUTE ON FUNCTION changerelay.drop_consumer(text) TO changerelay_admin;
"#,
    name = "consumer_grants",
    requires = [create_consumer, drop_consumer, "token_tables"]
);

type Position = (u64, u32);

fn pos_in(v: i64) -> u32 {
    v.clamp(0, i64::from(u32::MAX)) as u32
}

/// Runs `f` as the extension's owner (the tables are not the caller's).
fn owned<R>(f: impl FnOnce() -> R) -> R {
    as_role(extension_owner(), f)
}

fn spi<T>(r: Result<T, pgrx::spi::Error>) -> T {
    r.unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("pg_changerelay consumers: {e}"),
            None,
            "Retry; if it persists, check the server log.",
        )
    })
}

struct Consumer {
    name: String,
    labels: Vec<String>,
    filter: Option<Filter>,
    position: Position,
    creator: pg_sys::Oid,
}

fn unknown(name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("consumer \"{name}\" does not exist"),
        None,
        "changerelay.consumers() lists them; changerelay.create_consumer() makes one.",
    )
}

/// Locks the consumer's row for the rest of the transaction (readers of one
/// consumer take turns here) and checks the caller may use it.
fn lock(name: &str) -> Consumer {
    let row = owned(|| {
        spi(write_all(
            "SELECT labels, filter::text, event_id, pos, creator, lagging_since IS NOT NULL
               FROM changerelay.consumers WHERE name = $1 FOR UPDATE",
            &[name.into()],
            |r| {
                Ok((
                    r.get::<Vec<String>>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?,
                    r.get::<i64>(3)?.unwrap_or(0),
                    r.get::<i64>(4)?.unwrap_or(0),
                    r.get::<pg_sys::Oid>(5)?.unwrap_or(pg_sys::Oid::INVALID),
                    r.get::<bool>(6)?.unwrap_or(false),
                ))
            },
        ))
        .into_iter()
        .next()
    });
    let Some((labels, filter, event_id, pos, creator, lagging)) = row else {
        unknown(name)
    };
    // SAFETY: reading the session's role.
    let superuser = unsafe { pg_sys::superuser() };
    let member = superuser
        || spi(write_one::<bool>(
            "SELECT pg_catalog.pg_has_role($1, 'MEMBER')",
            &[creator.into()],
        ))
        .unwrap_or(false);
    if !member {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for consumer \"{name}\""),
            Some("A consumer is read by members of the role that created it.".into()),
            "GRANT the creating role (changerelay.consumers() shows it) to this role.",
        );
    }
    if lagging {
        raise(
            PgSqlErrorCode::ERRCODE_SNAPSHOT_TOO_OLD,
            format!("consumer \"{name}\" fell behind changerelay.max_consumer_lag"),
            Some("History after its position was pruned; its changes from then on can not be delivered.".into()),
            "Reload the state you derive from its changes, then drop the consumer and create it again (it starts from now).",
        );
    }
    let filter = filter
        .and_then(|f| serde_json::from_str(&f).ok())
        .and_then(|v| Filter::parse(&v).ok());
    Consumer {
        name: name.to_string(),
        labels,
        filter,
        position: (event_id.max(0) as u64, pos_in(pos)),
        creator,
    }
}

/// The consumer's rows after `after` (up to `upto`), at most `max`, read as
/// its creator; and the position the read covers.
fn read(c: &Consumer, after: Position, upto: Option<Position>, max: i32) -> (Vec<ChangeTuple>, Position) {
    let (system_id, timeline) = cursors::cluster();
    let req = Request {
        after: Cursor {
            system_id,
            timeline,
            event_id: after.0,
            pos: after.1,
        },
        labels: Some(c.labels.clone()),
        max_events: max,
        filter: c.filter.clone(),
        max_bytes: usize::MAX,
        upto: cursors::published_cap(),
        until: upto,
    };
    match as_role(c.creator, || history::read_page(&req)) {
        Ok((rows, at)) => (rows.into_iter().map(tuple).collect(), at),
        Err(e) => {
            if let Err(p) = cursors::not_expired(&req.after) {
                p.raise()
            }
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                e,
                None,
                "Retry; if it persists, check the server log.",
            )
        }
    }
}

/// Moves the position over every acknowledged range that follows it.
fn advance(c: &mut Consumer) {
    owned(|| loop {
        let next = spi(write_all(
            "DELETE FROM changerelay.consumer_leases
              WHERE consumer = $1 AND after_event = $2 AND after_pos = $3 AND lease IS NULL
          RETURNING upto_event, upto_pos",
            &[
                c.name.as_str().into(),
                (c.position.0 as i64).into(),
                i64::from(c.position.1).into(),
            ],
            |r| Ok((r.get::<i64>(1)?.unwrap_or(0), r.get::<i64>(2)?.unwrap_or(0))),
        ));
        let Some((e, p)) = next.into_iter().next() else {
            break;
        };
        c.position = (e.max(0) as u64, pos_in(p));
        spi(Spi::run_with_args(
            "UPDATE changerelay.consumers SET event_id = $2, pos = $3 WHERE name = $1",
            &[c.name.as_str().into(), e.into(), p.into()],
        ));
    });
}

/// Records the range (after, upto]: leased until `visibility_ms` from now, or
/// acknowledged (`None`). Returns the lease id.
fn record(c: &Consumer, after: Position, upto: Position, visibility_ms: Option<i64>) -> Option<i64> {
    owned(|| {
        spi(write_one::<i64>(
            "INSERT INTO changerelay.consumer_leases AS l (consumer, after_event, after_pos, upto_event, upto_pos, lease, expires_at)
             SELECT $1, $2, $3, $4, $5, CASE WHEN $6::int8 IS NULL THEN NULL ELSE pg_catalog.nextval('changerelay.consumer_lease_ids') END,
                    pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => $6::float8 / 1000)
             RETURNING lease",
            &[
                c.name.as_str().into(),
                (after.0 as i64).into(),
                i64::from(after.1).into(),
                (upto.0 as i64).into(),
                i64::from(upto.1).into(),
                visibility_ms.into(),
            ],
        ))
    })
}

/// Creates a durable consumer of `labels` (with an optional tenant filter)
/// that starts from now.
#[pg_extern(volatile)]
fn create_consumer(name: &str, labels: Vec<String>, filter: default!(Option<JsonB>, "NULL")) {
    require_preloaded();
    require_admin("consumers");
    check_name("consumer name", name);
    if labels.is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "a consumer needs at least one label",
            None,
            "Pass the labels it reads, for example ARRAY['parameters'].",
        );
    }
    history::check_labels(&labels);
    let filter_text = history::parse_filter(filter.as_ref()).and(filter.map(|f| f.0.to_string()));
    let exists = owned(|| {
        spi(write_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM changerelay.consumers WHERE name = $1)",
            &[name.into()],
        ))
    })
    .unwrap_or(false);
    if exists {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("consumer \"{name}\" already exists"),
            None,
            "Drop it first with changerelay.drop_consumer(), or choose another name.",
        );
    }
    let from = cursors::current();
    let creator = current_role();
    owned(|| {
        spi(Spi::run_with_args(
            "INSERT INTO changerelay.consumers (name, labels, filter, event_id, pos, creator, created_by)
             VALUES ($1, $2, $3::jsonb, $4, $5, $6, (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = $6))",
            &[
                name.into(),
                labels.into(),
                filter_text.into(),
                (from.event_id as i64).into(),
                i64::from(from.pos).into(),
                creator.into(),
            ],
        ))
    });
}

/// Drops a consumer, its position and its leases.
#[pg_extern(volatile)]
fn drop_consumer(name: &str) {
    require_preloaded();
    require_admin("consumers");
    let gone = owned(|| {
        spi(write_one::<String>(
            "DELETE FROM changerelay.consumers WHERE name = $1 RETURNING name",
            &[name.into()],
        ))
    });
    if gone.is_none() {
        unknown(name);
    }
}

/// Leases the consumer's next changes to the caller: at most `max_events`,
/// for `visibility` (then they go to the next reader unless acknowledged).
/// Changes of an expired lease come first. Empty when nothing is waiting.
// pgrx spells the SQL row type out in the signature.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn consume(
    name: &str,
    max_events: default!(i32, 100),
    visibility: default!(Interval, "'30 seconds'"),
) -> TableIterator<
    'static,
    (
        name!(lease, i64),
        name!(cursor, String),
        name!(event_id, i64),
        name!(seq, i32),
        name!(ts, i64),
        name!(xid, i64),
        name!(label, String),
        name!(table_name, String),
        name!(op, String),
        name!(identifier, Option<String>),
        name!(key, Option<crate::sql::jsonb::JsonbText>),
        name!(new, Option<crate::sql::jsonb::JsonbText>),
        name!(old, Option<crate::sql::jsonb::JsonbText>),
        name!(metadata, Option<crate::sql::jsonb::JsonbText>),
    ),
> {
    require_preloaded();
    if !(1..=history::MAX_EVENTS).contains(&max_events) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "max_events must be between 1 and {}, not {max_events}",
                history::MAX_EVENTS
            ),
            None,
            "Pass how many changes to lease at most.",
        );
    }
    let visibility_ms = interval_ms(&visibility);
    if visibility_ms <= 0 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "visibility must be positive",
            None,
            "Pass how long the changes stay leased, for example '30 seconds'.",
        );
    }
    let mut c = lock(name);
    let leased = |rows: Vec<ChangeTuple>, lease: i64| {
        TableIterator::new(rows.into_iter().map(move |t| {
            (
                lease, t.0, t.1, t.2, t.3, t.4, t.5, t.6, t.7, t.8, t.9, t.10, t.11, t.12,
            )
        }))
    };
    loop {
        let expired = owned(|| {
            spi(write_all(
                "SELECT after_event, after_pos, upto_event, upto_pos FROM changerelay.consumer_leases
                  WHERE consumer = $1 AND lease IS NOT NULL AND expires_at <= pg_catalog.clock_timestamp()
                  ORDER BY after_event, after_pos LIMIT 1",
                &[name.into()],
                |r| {
                    let n = |i| r.get::<i64>(i).map(|v| v.unwrap_or(0));
                    Ok((
                        (n(1)?.max(0) as u64, pos_in(n(2)?)),
                        (n(3)?.max(0) as u64, pos_in(n(4)?)),
                    ))
                },
            ))
            .into_iter()
            .next()
        });
        let Some((after, upto)) = expired else { break };
        // The publish gate may hold back part of the range (after a server
        // start, until the standbys have it): only what was read is leased
        // again, the rest stays expired.
        let capped = cursors::published_cap().is_some_and(|cap| cap < upto.0);
        let (rows, covered) = read(&c, after, Some(upto), max_events);
        if capped && rows.is_empty() {
            return leased(Vec::new(), 0);
        }
        let cut = match rows.last() {
            Some(last) if rows.len() as i32 >= max_events => (last.1 as u64, row_pos(&last.0)),
            _ if capped => covered.min(upto),
            _ => upto,
        };
        let lease = owned(|| {
            spi(write_one::<i64>(
                "UPDATE changerelay.consumer_leases
                    SET upto_event = $4, upto_pos = $5,
                        lease = CASE WHEN $7 THEN NULL ELSE pg_catalog.nextval('changerelay.consumer_lease_ids') END,
                        expires_at = pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => $6::float8 / 1000)
                  WHERE consumer = $1 AND after_event = $2 AND after_pos = $3 RETURNING lease",
                &[
                    name.into(),
                    (after.0 as i64).into(),
                    i64::from(after.1).into(),
                    (cut.0 as i64).into(),
                    i64::from(cut.1).into(),
                    visibility_ms.into(),
                    rows.is_empty().into(),
                ],
            ))
        });
        if cut < upto {
            // The rest of the expired range stays expired, for the next reader.
            owned(|| {
                spi(Spi::run_with_args(
                    "INSERT INTO changerelay.consumer_leases VALUES ($1, $2, $3, $4, $5, 0, '-infinity')",
                    &[
                        name.into(),
                        (cut.0 as i64).into(),
                        i64::from(cut.1).into(),
                        (upto.0 as i64).into(),
                        i64::from(upto.1).into(),
                    ],
                ))
            });
        }
        match lease {
            Some(lease) => return leased(rows, lease),
            // Nothing of it is there any more (privileges changed): acknowledged as read.
            None => advance(&mut c),
        }
    }
    let frontier = owned(|| {
        spi(write_all(
            "SELECT upto_event, upto_pos FROM changerelay.consumer_leases WHERE consumer = $1
              ORDER BY upto_event DESC, upto_pos DESC LIMIT 1",
            &[name.into()],
            |r| Ok((r.get::<i64>(1)?.unwrap_or(0), r.get::<i64>(2)?.unwrap_or(0))),
        ))
        .into_iter()
        .next()
    })
    .map_or(c.position, |(e, p)| (e.max(0) as u64, pos_in(p)));
    let (rows, covered) = read(&c, frontier, None, max_events);
    if covered <= frontier {
        return leased(Vec::new(), 0);
    }
    let visibility = (!rows.is_empty()).then_some(visibility_ms);
    let lease = record(&c, frontier, covered, visibility);
    if rows.is_empty() {
        // Only changes the filter leaves out: acknowledged as read.
        advance(&mut c);
    }
    leased(rows, lease.unwrap_or(0))
}

/// The history position of a change's cursor.
fn row_pos(cursor: &str) -> u32 {
    Cursor::decode(cursor).map_or(0, |c| c.pos)
}

/// Acknowledges the changes of the lease holding `cursor`, up to and
/// including it. `lease` (from `consume()`), when given, must be that lease:
/// it makes sure a reader whose lease expired and went to another reader
/// does not acknowledge that reader's changes.
#[pg_extern(volatile)]
fn ack(name: &str, cursor: &str, lease: default!(Option<i64>, "NULL")) {
    require_preloaded();
    let mut c = lock(name);
    let at = cursors::check_cursor(cursor).position();
    let held = owned(|| {
        spi(write_all(
            "SELECT after_event, after_pos, upto_event, upto_pos, lease, expires_at <= pg_catalog.clock_timestamp(),
                    expires_at::text
               FROM changerelay.consumer_leases
              WHERE consumer = $1 AND (after_event, after_pos) < ($2, $3) AND (upto_event, upto_pos) >= ($2, $3)",
            &[name.into(), (at.0 as i64).into(), i64::from(at.1).into()],
            |r| {
                let n = |i| r.get::<i64>(i).map(|v| v.unwrap_or(0));
                Ok((
                    (n(1)?.max(0) as u64, pos_in(n(2)?)),
                    (n(3)?.max(0) as u64, pos_in(n(4)?)),
                    r.get::<i64>(5)?,
                    r.get::<bool>(6)?.unwrap_or(true),
                    r.get::<String>(7)?.unwrap_or_default(),
                ))
            },
        ))
        .into_iter()
        .next()
    });
    let not_leased = |detail: String| -> ! {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("cursor is not in a lease of consumer \"{name}\""),
            Some(detail),
            "Acknowledge the cursors consume() returned, once, before their visibility timeout.",
        )
    };
    let Some((after, upto, held_by, expired, expires_at)) = held else {
        not_leased("Its changes were acknowledged already, or never delivered.".into())
    };
    let Some(held_by) = held_by else {
        not_leased("Its changes were acknowledged already.".into())
    };
    if lease.is_some_and(|l| l != held_by) {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("lease {} of consumer \"{name}\" is over", lease.unwrap_or(0)),
            Some("Its visibility timeout passed and its changes were leased to another reader.".into()),
            "Raise the visibility interval of consume() if processing a batch takes longer.",
        );
    }
    if expired {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("the lease of consumer \"{name}\" holding this cursor expired at {expires_at}"),
            Some("Its changes are delivered again to the next reader.".into()),
            "Raise the visibility interval of consume() if processing a batch takes longer.",
        );
    }
    owned(|| {
        if at < upto {
            // The rest of the lease stays the reader's until it expires.
            spi(Spi::run_with_args(
                "INSERT INTO changerelay.consumer_leases
                 SELECT consumer, $4, $5, upto_event, upto_pos, lease, expires_at FROM changerelay.consumer_leases
                  WHERE consumer = $1 AND after_event = $2 AND after_pos = $3",
                &[
                    name.into(),
                    (after.0 as i64).into(),
                    i64::from(after.1).into(),
                    (at.0 as i64).into(),
                    i64::from(at.1).into(),
                ],
            ));
        }
        spi(Spi::run_with_args(
            "UPDATE changerelay.consumer_leases SET upto_event = $4, upto_pos = $5, lease = NULL, expires_at = NULL
              WHERE consumer = $1 AND after_event = $2 AND after_pos = $3",
            &[
                name.into(),
                (after.0 as i64).into(),
                i64::from(after.1).into(),
                (at.0 as i64).into(),
                i64::from(at.1).into(),
            ],
        ));
    });
    advance(&mut c);
}

/// Every consumer: labels, filter, position (a cursor), what is leased, and
/// whether it fell behind `changerelay.max_consumer_lag`.
// pgrx spells the SQL row type out in the signature.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn consumers() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(labels, Vec<String>),
        name!(filter, Option<JsonB>),
        name!(position, String),
        name!(lag_bytes, i64),
        name!(leases, i64),
        name!(lagging, bool),
        name!(created_by, String),
        name!(created_at, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    require_preloaded();
    let (system_id, timeline) = cursors::cluster();
    let head = cursors::head_event();
    let caller = current_role();
    let rows = owned(|| {
        spi(write_all(
            "SELECT c.name, c.labels, c.filter, c.event_id, c.pos,
                    (SELECT count(*) FROM changerelay.consumer_leases l WHERE l.consumer = c.name AND l.lease IS NOT NULL),
                    c.lagging_since IS NOT NULL, c.created_by::text, c.created_at
               FROM changerelay.consumers c
              WHERE pg_catalog.pg_has_role($1, c.creator, 'MEMBER')
                 OR pg_catalog.pg_has_role($1, 'changerelay_admin', 'MEMBER')
              ORDER BY c.name",
            &[caller.into()],
            |r| {
                let e = r.get::<i64>(4)?.unwrap_or(0);
                Ok((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<Vec<String>>(2)?.unwrap_or_default(),
                    r.get::<JsonB>(3)?,
                    Cursor {
                        system_id,
                        timeline,
                        event_id: e.max(0) as u64,
                        pos: pos_in(r.get::<i64>(5)?.unwrap_or(0)),
                    }
                    .encode(),
                    (head as i64).saturating_sub(e).max(0),
                    r.get::<i64>(6)?.unwrap_or(0),
                    r.get::<bool>(7)?.unwrap_or(false),
                    r.get::<String>(8)?.unwrap_or_default(),
                    r.get::<pgrx::datum::TimestampWithTimeZone>(9)?,
                ))
            },
        ))
    });
    TableIterator::new(rows)
}
