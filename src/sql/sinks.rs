//! Sinks, managed with SQL the way pg_cron manages jobs: `create_sink()`,
//! `drop_sink()`, `sinks()`.
//!
//! A sink is a row of `changerelay.sinks`; any committed change of the table
//! moves a generation counter (a trigger), and the relay worker starts or
//! stops the sink on its sinks thread at once, without a restart. The worker
//! records each sink's delivered position, state and last error in the same
//! row (at most every second); retention keeps the history a sink has not
//! delivered, up to `changerelay.max_consumer_lag`. A sink reads with the
//! privileges of the role that created it: it can only be made for labels
//! that role may read, without row-level security, and it pauses (visible in
//! `sinks()`) if that stops being true.

use crate::errors::raise;
use crate::sql::access::{as_role, current_role, extension_owner};
use crate::sql::tokens::{check_name, require_admin};
use crate::sql::{cursors, history, require_preloaded, select_all, select_one, write_one};
use changerelay_core::cursor::Cursor;
use changerelay_sinks::Target;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;

extension_sql!(
    r#"
-- Sinks into Redis Streams and NATS JetStream. Everything of the sink's labels
-- at or before (event_id, pos) is in the broker; the relay worker writes the
-- position, state, counters and last error.
CREATE TABLE changerelay.sinks (
    id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    name text PRIMARY KEY,
    kind text NOT NULL,
    url text NOT NULL,
    labels text[] NOT NULL,
    options jsonb NOT NULL DEFAULT '{}',
    event_id bigint NOT NULL,
    pos bigint NOT NULL,
    state text NOT NULL DEFAULT 'starting',
    changes_written bigint NOT NULL DEFAULT 0,
    duplicates bigint NOT NULL DEFAULT 0,
    delivered_at timestamptz,
    last_error text,
    last_error_at timestamptz,
    -- Set when history it had not delivered was pruned (changerelay.max_consumer_lag).
    lagging_since timestamptz,
    creator oid NOT NULL,
    created_by name NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('changerelay.sinks', '');
-- The URL may hold a password: superusers only (sinks() shows it masked).
REVOKE ALL ON changerelay.sinks FROM PUBLIC;
"#,
    name = "sink_tables",
    requires = ["tracking_tables"]
);

extension_sql!(
    r#"
REVOKE EXECUTE ON FUNCTION changerelay.create_sink(text, text, text, text[], jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION changerelay.drop_sink(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION changerelay.sinks() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION changerelay.create_sink(text, text, text, text[], jsonb) TO changerelay_admin;
GRANT EXECUTE ON FUNCTION changerelay.drop_sink(text) TO changerelay_admin;
GRANT EXECUTE ON FUNCTION changerelay.sinks() TO changerelay_admin;
REVOKE EXECUTE ON FUNCTION changerelay.sinks_changed() FROM PUBLIC;
CREATE TRIGGER sinks_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON changerelay.sinks
    FOR EACH STATEMENT EXECUTE FUNCTION changerelay.sinks_changed();
"#,
    name = "sink_grants",
    requires = [
        "sink_tables",
        "token_tables",
        create_sink,
        drop_sink,
        sinks,
        sinks_changed
    ]
);

/// Trigger on `changerelay.sinks`: whatever changed the table, the worker
/// reloads the sinks when the transaction commits. (Its own position updates
/// count too, and cost a reload of a few rows.)
#[pg_trigger]
fn sinks_changed<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::pgbox::AllocatedByPostgres>>, std::convert::Infallible> {
    crate::shmem::sinks_changed_at_commit();
    Ok(None)
}

fn spi<T>(r: Result<T, pgrx::spi::Error>) -> T {
    r.unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("pg_changerelay sinks: {e}"),
            None,
            "Retry; if it persists, check the server log.",
        )
    })
}

/// Creates a sink: every change of `labels` from now on goes, exactly once and
/// in commit order per label, into the broker at `url` (`kind` `redis` or
/// `nats`; `options` in the README).
#[pg_extern(volatile)]
fn create_sink(name: &str, kind: &str, url: &str, labels: Vec<String>, options: default!(Option<JsonB>, "'{}'")) {
    let options = options.unwrap_or_else(|| JsonB(serde_json::json!({})));
    require_preloaded();
    require_admin("sinks");
    check_name("sink name", name);
    if let Err(e) = Target::parse(kind, url, &options.0) {
        let hint = if e.starts_with("unknown sink kind") {
            "Sinks write to Redis Streams (kind 'redis', url redis://host:port) or NATS JetStream (kind 'nats', url nats://host:port)."
        } else {
            "See the README's Sinks section for URLs and options."
        };
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e, None, hint);
    }
    if labels.is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "a sink needs at least one label",
            None,
            "Pass the labels it delivers, for example ARRAY['parameters'].",
        );
    }
    for label in &labels {
        check_name("label", label);
    }
    history::check_labels(&labels);
    let creator = current_role();
    for label in &labels {
        let limited = spi(select_one::<bool>(
            "SELECT changerelay.label_row_security_applies($1, $2)",
            &[label.as_str().into(), creator.into()],
        ))
        .unwrap_or(true);
        if limited {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("label \"{label}\" has a table whose row-level security applies to the current role"),
                Some("A sink delivers every change of its labels; some would be hidden from its creator.".into()),
                "Create the sink as a role that bypasses the policies, or read the label with changerelay.consume().",
            );
        }
    }
    let from = cursors::current();
    as_role(extension_owner(), || {
        let exists = spi(select_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM changerelay.sinks WHERE name = $1)",
            &[name.into()],
        ))
        .unwrap_or(false);
        if exists {
            raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("sink \"{name}\" already exists"),
                None,
                "Drop it first with changerelay.drop_sink(), or choose another name.",
            );
        }
        spi(Spi::run_with_args(
            "INSERT INTO changerelay.sinks (name, kind, url, labels, options, event_id, pos, creator, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = $8))",
            &[
                name.into(),
                kind.into(),
                url.into(),
                labels.into(),
                options.into(),
                (from.event_id as i64).into(),
                i64::from(from.pos).into(),
                creator.into(),
            ],
        ));
    });
}

/// Drops a sink; the worker stops it at once. What it wrote stays in the broker.
#[pg_extern(volatile)]
fn drop_sink(name: &str) {
    require_preloaded();
    require_admin("sinks");
    let gone = as_role(extension_owner(), || {
        spi(write_one::<String>(
            "DELETE FROM changerelay.sinks WHERE name = $1 RETURNING name",
            &[name.into()],
        ))
    });
    if gone.is_none() {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("sink \"{name}\" does not exist"),
            None,
            "changerelay.sinks() lists them.",
        );
    }
}

/// Every sink with its state, delivered position (a cursor), lag in bytes of
/// WAL (the newest event applied minus the position), counters, last error and
/// whether history it had not delivered was pruned.
// pgrx spells the SQL row type out in the signature.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn sinks() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(kind, String),
        name!(url, String),
        name!(labels, Vec<String>),
        name!(options, Option<JsonB>),
        name!(state, String),
        name!(position, String),
        name!(lag_bytes, i64),
        name!(changes_written, i64),
        name!(duplicates, i64),
        name!(delivered_at, Option<TimestampWithTimeZone>),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(lagging, bool),
        name!(created_by, String),
        name!(created_at, Option<TimestampWithTimeZone>),
    ),
> {
    require_preloaded();
    require_admin("sinks");
    let (system_id, timeline) = cursors::cluster();
    let head = cursors::head_event() as i64;
    let rows = as_role(extension_owner(), || {
        spi(select_all(
            "SELECT name, kind, url, labels, options, state, event_id, pos, changes_written, duplicates,
                    delivered_at, last_error, last_error_at, lagging_since IS NOT NULL, created_by::text, created_at
               FROM changerelay.sinks ORDER BY name",
            &[],
            |r| {
                let kind = r.get::<String>(2)?.unwrap_or_default();
                let url = r.get::<String>(3)?.unwrap_or_default();
                let options = r.get::<JsonB>(5)?;
                let shown = Target::parse(
                    &kind,
                    &url,
                    &options.as_ref().map_or(serde_json::Value::Null, |o| o.0.clone()),
                )
                .map_or_else(|_| "(invalid)".to_string(), |t| t.shown_url());
                let e = r.get::<i64>(7)?.unwrap_or(0);
                Ok((
                    r.get::<String>(1)?.unwrap_or_default(),
                    kind,
                    shown,
                    r.get::<Vec<String>>(4)?.unwrap_or_default(),
                    options,
                    r.get::<String>(6)?.unwrap_or_default(),
                    Cursor {
                        system_id,
                        timeline,
                        event_id: e.max(0) as u64,
                        pos: r.get::<i64>(8)?.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32,
                    }
                    .encode(),
                    head.saturating_sub(e).max(0),
                    r.get::<i64>(9)?.unwrap_or(0),
                    r.get::<i64>(10)?.unwrap_or(0),
                    r.get::<TimestampWithTimeZone>(11)?,
                    r.get::<String>(12)?,
                    r.get::<TimestampWithTimeZone>(13)?,
                    r.get::<bool>(14)?.unwrap_or(false),
                    r.get::<String>(15)?.unwrap_or_default(),
                    r.get::<TimestampWithTimeZone>(16)?,
                ))
            },
        ))
    });
    TableIterator::new(rows)
}
