//! `changerelay.track()`, `untrack()` and `tracked()`, and the tables that
//! hold tracking state and persisted versions.

use crate::errors::raise;
use crate::sql::require_preloaded;
use changerelay_core::versions::valid_label;
use pgrx::prelude::*;

extension_sql!(
    r#"
-- Which tables the relay worker follows. A user_catalog_table, so the output
-- plugin reads it under the decoding snapshot: tracking changes take effect
-- exactly at their place in the commit order. pg_dump keeps its rows.
-- history: whether the label's changes are kept in changerelay.history (false:
-- versions only); the same for every table of a label.
CREATE TABLE changerelay.tracked_tables (
    rel regclass PRIMARY KEY,
    label text NOT NULL CHECK (label ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    identifier text,
    history boolean NOT NULL DEFAULT true
) WITH (user_catalog_table = true);
ALTER TABLE changerelay.tracked_tables REPLICA IDENTITY FULL;
SELECT pg_catalog.pg_extension_config_dump('changerelay.tracked_tables', '');
COMMENT ON TABLE changerelay.tracked_tables IS 'Tables followed by the pg_changerelay relay worker; change with changerelay.track()/untrack().';

-- Versions as of the relay worker's last version checkpoint (see
-- history_horizon.versions_exact); loaded into shared memory at start.
CREATE TABLE changerelay.label_versions (
    label text PRIMARY KEY,
    v bigint NOT NULL,
    ts bigint NOT NULL,
    floor_v bigint NOT NULL DEFAULT 0,
    floor_ts bigint NOT NULL DEFAULT 0
);
CREATE TABLE changerelay.row_versions (
    label text NOT NULL,
    identifier text NOT NULL,
    v bigint NOT NULL,
    ts bigint NOT NULL,
    PRIMARY KEY (label, identifier)
);
-- Row versions written at version checkpoints since row_versions was last
-- compacted: one entry per checkpoint, packed (rows: how many it holds);
-- row_versions and then the entries in id order give the versions.
CREATE TABLE changerelay.version_log (
    id bigint PRIMARY KEY,
    rows int NOT NULL,
    entries bytea NOT NULL
);
ALTER TABLE changerelay.version_log ALTER COLUMN entries SET STORAGE EXTERNAL;
GRANT USAGE ON SCHEMA changerelay TO PUBLIC;
REVOKE ALL ON changerelay.tracked_tables, changerelay.label_versions, changerelay.row_versions,
              changerelay.version_log FROM PUBLIC;
GRANT SELECT ON changerelay.tracked_tables, changerelay.label_versions TO PUBLIC;
"#,
    name = "tracking_tables",
    bootstrap
);

extension_sql!(
    r#"
REVOKE EXECUTE ON FUNCTION changerelay.track(regclass, text, text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION changerelay.untrack(regclass) FROM PUBLIC;
"#,
    name = "tracking_grants",
    finalize
);

struct RelFacts {
    name: String,
    relname: String,
    relkind: String,
    persistence: String,
    replident: String,
}

fn rel_facts(rel: pg_sys::Oid) -> RelFacts {
    let row = Spi::connect(|client| {
        let t = client.select(
            "SELECT c.oid::regclass::text, c.relname::text, c.relkind::text, c.relpersistence::text, c.relreplident::text
               FROM pg_catalog.pg_class c WHERE c.oid = $1",
            Some(1),
            &[rel.into()],
        )?;
        if t.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        let r = t.first();
        Ok(Some(RelFacts {
            name: r.get::<String>(1)?.unwrap_or_default(),
            relname: r.get::<String>(2)?.unwrap_or_default(),
            relkind: r.get::<String>(3)?.unwrap_or_default(),
            persistence: r.get::<String>(4)?.unwrap_or_default(),
            replident: r.get::<String>(5)?.unwrap_or_default(),
        }))
    });
    match row {
        Ok(Some(f)) => f,
        Ok(None) => raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", rel.to_u32()),
            None,
            "Pass a table name, for example changerelay.track('public.settings').",
        ),
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("could not read pg_class: {e}"),
            None,
            "",
        ),
    }
}

/// Columns of `rel`'s indexes matching `filter` (a condition on pg_index `i`).
fn index_columns(rel: pg_sys::Oid, filter: &str) -> Vec<String> {
    let sql = format!(
        "SELECT a.attname::text FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
          WHERE i.indrelid = $1 AND {filter} ORDER BY a.attnum"
    );
    crate::sql::select_all(&sql, &[rel.into()], |r| {
        r.get::<String>(1).map(|v| v.unwrap_or_default())
    })
    .unwrap_or_default()
}

/// Columns of the replica identity (or every column with REPLICA IDENTITY FULL: `None`).
fn identity_columns(rel: pg_sys::Oid, replident: &str) -> Option<Vec<String>> {
    match replident {
        "f" => None,
        "d" => Some(primary_key_columns(rel)),
        "i" => Some(index_columns(rel, "i.indisreplident")),
        _ => Some(Vec::new()),
    }
}

fn primary_key_columns(rel: pg_sys::Oid) -> Vec<String> {
    index_columns(rel, "i.indisprimary")
}

fn column_exists(rel: pg_sys::Oid, column: &str) -> bool {
    crate::sql::select_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                         WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
        &[rel.into(), column.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Starts tracking a table under a label (default: the table's name).
/// `identifier` names the column whose value identifies a row in the version
/// map (default: the single-column primary key; none: only `all` is kept).
/// `history` false keeps the label's versions only, no change history.
#[pg_extern(sql = r#"
CREATE FUNCTION changerelay.track(rel regclass, label text DEFAULT NULL, identifier text DEFAULT NULL,
                                  history boolean DEFAULT true)
RETURNS void VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn track(rel: Option<pg_sys::Oid>, label: Option<&str>, identifier: Option<&str>, history: Option<bool>) {
    let history = history.unwrap_or(true);
    require_preloaded();
    crate::sql::require_primary("track a table");
    let Some(rel) = rel else {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "the table to track must not be NULL",
            None,
            "Pass a table name, for example changerelay.track('public.settings').",
        )
    };
    let facts = rel_facts(rel);
    match facts.relkind.as_str() {
        "r" => {}
        "p" => raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{}\" is a partitioned table", facts.name),
            Some("Logical decoding reports changes of partitioned tables under their partitions.".into()),
            "Track each partition, under the same label: changerelay.track('part_1', 'label').",
        ),
        _ => raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{}\" is not a table", facts.name),
            None,
            "Only ordinary tables can be tracked.",
        ),
    }
    match facts.persistence.as_str() {
        "u" => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("\"{}\" is an unlogged table", facts.name),
            Some("Changes to unlogged tables are not written to WAL, so they are never decoded.".into()),
            format!("Make it logged first: ALTER TABLE {} SET LOGGED.", facts.name),
        ),
        "t" => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("\"{}\" is a temporary table", facts.name),
            Some("Changes to temporary tables are never decoded.".into()),
            "Track a permanent table.",
        ),
        _ => {}
    }
    let label = label.unwrap_or(&facts.relname);
    if !valid_label(label) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid label \"{label}\""),
            Some("Labels are 1 to 64 characters from A-Z, a-z, 0-9, _ . : -".into()),
            "Pass a label explicitly: changerelay.track('my table', 'my_label').",
        );
    }
    let identifier = match identifier {
        Some(col) => {
            if !column_exists(rel, col) {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                    format!("column \"{col}\" of relation \"{}\" does not exist", facts.name),
                    None,
                    "Name the column whose value identifies a row, or pass NULL to keep only the label's \"all\" version.",
                );
            }
            if let Some(identity) = identity_columns(rel, &facts.replident) {
                if !identity.iter().any(|c| c == col) {
                    raise(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("column \"{col}\" is not part of the replica identity of \"{}\"", facts.name),
                        Some("Deletes and key changes would not say which row they touched.".into()),
                        format!(
                            "Use a key column, or make the old row carry every column: ALTER TABLE {} REPLICA IDENTITY FULL.",
                            facts.name
                        ),
                    );
                }
            }
            Some(col.to_string())
        }
        None => {
            let pk = primary_key_columns(rel);
            (pk.len() == 1).then(|| pk[0].clone())
        }
    };
    let existing = crate::sql::select_one::<String>(
        "SELECT (SELECT label FROM changerelay.tracked_tables WHERE rel = $1::oid::regclass)",
        &[rel.into()],
    )
    .ok()
    .flatten();
    if let Some(existing) = existing {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("table \"{}\" is already tracked under label \"{existing}\"", facts.name),
            None,
            format!(
                "To change its label or identifier, call changerelay.untrack('{}') first.",
                facts.name
            ),
        );
    }
    let policy = crate::sql::select_one::<bool>(
        "SELECT bool_and(history) FROM changerelay.tracked_tables WHERE label = $1",
        &[label.into()],
    )
    .ok()
    .flatten();
    if let Some(keeps) = policy.filter(|keeps| *keeps != history) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            if keeps {
                format!("label \"{label}\" keeps history")
            } else {
                format!("label \"{label}\" keeps versions only (no history)")
            },
            Some("Every table of a label has the same history setting.".into()),
            format!("Pass history => {keeps}, or track the table under another label."),
        );
    }
    if let Err(e) = Spi::run_with_args(
        "INSERT INTO changerelay.tracked_tables (rel, label, identifier, history)
         VALUES ($1::oid::regclass, $2, $3, $4)",
        &[rel.into(), label.into(), identifier.into(), history.into()],
    ) {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("could not record tracking: {e}"),
            None,
            "",
        );
    }
}

/// Stops tracking a table. Its label keeps its versions.
#[pg_extern(sql = r#"
CREATE FUNCTION changerelay.untrack(rel regclass)
RETURNS void VOLATILE STRICT LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn untrack(rel: pg_sys::Oid) {
    require_preloaded();
    crate::sql::require_primary("untrack a table");
    let removed = Spi::get_one_with_args::<String>(
        "WITH gone AS (DELETE FROM changerelay.tracked_tables WHERE rel = $1::oid::regclass RETURNING label)
         SELECT (SELECT label FROM gone LIMIT 1)",
        &[rel.into()],
    );
    match removed {
        Ok(Some(_)) => {}
        Ok(None) => {
            let name = crate::sql::select_one::<String>("SELECT $1::oid::regclass::text", &[rel.into()])
                .ok()
                .flatten()
                .unwrap_or_default();
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("table \"{name}\" is not tracked"),
                None,
                "changerelay.tracked() lists the tracked tables.",
            )
        }
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("could not remove tracking: {e}"),
            None,
            "",
        ),
    }
}

/// The tracked tables: label, table and identifier column.
#[pg_extern(stable)]
fn tracked() -> TableIterator<
    'static,
    (
        name!(label, String),
        name!(table_name, String),
        name!(identifier, Option<String>),
    ),
> {
    require_preloaded();
    let rows = crate::sql::select_all(
        "SELECT label, rel::text, identifier FROM changerelay.tracked_tables ORDER BY label, rel::text",
        &[],
        |r| {
            Ok((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<String>(3)?,
            ))
        },
    );
    match rows {
        Ok(rows) => TableIterator::new(rows),
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("could not read tracked tables: {e}"),
            None,
            "",
        ),
    }
}
