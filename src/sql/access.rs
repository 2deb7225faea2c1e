//! Who may read what.
//!
//! * A label is readable by a role that can SELECT every table tracked
//!   under it; a label with no tracked table only by superusers (so
//!   untracking a label's last table does not open its versions to PUBLIC).
//! * History rows are readable with SELECT on their own table (the policy
//!   on `changerelay.history`), and, where the table has row-level security
//!   that applies to the reader, only if its policies show the row image:
//!   the policies' USING expressions are evaluated on the image, as the
//!   reader ([`hide_by_row_security`]).
//! * Row identifiers in version listings are shown, for a label with such a
//!   table, only when the reader can see a row with that identifier now
//!   ([`visible_identifiers`]).
//! * Tokens act with their creator's privileges: the relay worker runs their
//!   requests as that role ([`as_role`]).

use crate::errors::raise;
use crate::sql::{select_all, select_one};
use crate::txn::try_subtransaction;
use changerelay_core::history::ChangeView;
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;

extension_sql!(
    r#"
-- Whether role (default: the current role) may read label: it can SELECT
-- every table tracked under it, and there is at least one (superusers: always).
CREATE FUNCTION changerelay.label_readable(label text, role oid DEFAULT NULL) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(r.rolsuper, false) OR (
           EXISTS (SELECT 1 FROM changerelay.tracked_tables t WHERE t.label = $1)
           AND NOT EXISTS (SELECT 1 FROM changerelay.tracked_tables t
                            WHERE t.label = $1
                              AND NOT coalesce(has_table_privilege(r.oid, t.rel, 'SELECT'), false)))
      FROM pg_roles r
     WHERE r.oid = coalesce($2, (SELECT oid FROM pg_roles WHERE rolname = current_user))
$$;
-- Whether row-level security of a table tracked under label hides rows from
-- role: RLS on, role neither superuser nor BYPASSRLS, and not the owner
-- unless FORCE. Endpoint tokens can not carry such labels (their version
-- maps are per label).
CREATE FUNCTION changerelay.label_row_security_applies(label text, role oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (
        SELECT 1 FROM changerelay.tracked_tables t
          JOIN pg_class c ON c.oid = t.rel
          JOIN pg_roles r ON r.oid = $2
         WHERE t.label = $1 AND c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls)
           AND (c.relforcerowsecurity OR NOT pg_has_role(r.oid, c.relowner, 'USAGE')))
$$;
"#,
    name = "access_functions",
    requires = ["tracking_tables"]
);

/// Errors unless the current role may read `label` (see the module notes).
pub fn check_label_access(label: &str) {
    // SAFETY: reading the session's role on the main thread.
    if unsafe { pg_sys::superuser() } {
        return;
    }
    let facts = select_all(
        "SELECT count(*), string_agg(rel::text, ', ' ORDER BY rel::text)
                FILTER (WHERE NOT coalesce(pg_catalog.has_table_privilege(rel, 'SELECT'), false))
           FROM changerelay.tracked_tables WHERE label = $1",
        &[label.into()],
        |r| Ok((r.get::<i64>(1)?.unwrap_or(0), r.get::<String>(2)?)),
    )
    .ok()
    .and_then(|v| v.into_iter().next());
    match facts {
        Some((0, _)) | None => raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for label \"{label}\""),
            Some("No table is tracked under this label; only superusers may read its versions and history.".into()),
            "Track a table under the label, or ask a superuser.",
        ),
        Some((_, Some(tables))) => raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for label \"{label}\""),
            Some(format!("The current role cannot SELECT from {tables}.")),
            format!("GRANT SELECT ON {tables} TO the role, or ask for other labels."),
        ),
        Some((_, None)) => {}
    }
}

/// The role OID of the current user.
pub fn current_role() -> pg_sys::Oid {
    // SAFETY: reading the session's user id.
    unsafe { pg_sys::GetUserId() }
}

/// Runs `f` with `role`'s privileges, the way SECURITY DEFINER functions
/// switch (SetUserIdAndSecContext, no SET ROLE possible inside), and
/// switches back whatever happens.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::Oid::INVALID;
    let mut saved_context = 0i32;
    // SAFETY: reading and setting this backend's user id; the finally block
    // restores it on every path (an error also restores it at abort).
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(role, saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    PgTryBuilder::new(AssertUnwindSafe(f))
        .finally(|| {
            // SAFETY: restoring what was read above.
            unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
        })
        .execute()
}

/// The owner of the extension (a superuser), for writes a role may ask for
/// only through the extension's functions.
pub fn extension_owner() -> pg_sys::Oid {
    select_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_changerelay'",
        &[],
    )
    .ok()
    .flatten()
    .unwrap_or(pg_sys::BOOTSTRAP_SUPERUSERID.into())
}

/// Row-level security of one table, as it applies to the current role.
struct Policies {
    /// `schema.table`, quoted.
    qualified: String,
    /// The table's name, quoted: the policies' expressions refer to it.
    alias: String,
    /// The combined USING expression (permissive ones OR'ed, restrictive
    /// ones AND'ed; `false` when no permissive policy applies).
    predicate: String,
}

/// For those of `relids` whose row-level security applies to the current
/// role (not a superuser, not BYPASSRLS, not the owner unless FORCE), the
/// policies to evaluate.
fn applicable_policies(relids: &[u32]) -> Result<BTreeMap<u32, Policies>, String> {
    let oids: Vec<pg_sys::Oid> = relids.iter().map(|r| pg_sys::Oid::from(*r)).collect();
    select_all(
        "SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), pg_catalog.format('%I', c.relname),
                '(' || coalesce((SELECT pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' OR ')
                                   FROM pg_catalog.pg_policy p
                                  WHERE p.polrelid = c.oid AND p.polpermissive AND p.polqual IS NOT NULL
                                    AND p.polcmd = ANY (ARRAY['r', '*']::\"char\"[])
                                    AND (0::oid = ANY (p.polroles)
                                         OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p.polroles) AS pr(r)
                                                     WHERE pg_catalog.pg_has_role(pr.r, 'USAGE')))), 'false') || ')'
                || coalesce((SELECT pg_catalog.string_agg(' AND (' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', '')
                               FROM pg_catalog.pg_policy p
                              WHERE p.polrelid = c.oid AND NOT p.polpermissive AND p.polqual IS NOT NULL
                                AND p.polcmd = ANY (ARRAY['r', '*']::\"char\"[])
                                AND (0::oid = ANY (p.polroles)
                                     OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p.polroles) AS pr(r)
                                                 WHERE pg_catalog.pg_has_role(pr.r, 'USAGE')))), '')
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = ANY ($1) AND c.relrowsecurity
            AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(c.relowner, 'USAGE'))
            AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles
                             WHERE rolname = current_user AND (rolsuper OR rolbypassrls))",
        &[oids.into()],
        |r| {
            Ok((
                r.get::<pg_sys::Oid>(1)?.map_or(0, |o| o.to_u32()),
                Policies {
                    qualified: r.get::<String>(2)?.unwrap_or_default(),
                    alias: r.get::<String>(3)?.unwrap_or_default(),
                    predicate: r.get::<String>(4)?.unwrap_or_else(|| "false".into()),
                },
            ))
        },
    )
    .map(|v| v.into_iter().collect())
    .map_err(|e| e.to_string())
}

/// The image a policy is checked on: the new row, or for a delete the old
/// row (REPLICA IDENTITY FULL) or the key.
fn image(v: &ChangeView) -> Option<&String> {
    if v.op == "delete" {
        v.old.as_ref().or(v.key.as_ref())
    } else {
        v.new.as_ref()
    }
}

/// Removes from `views` the rows the current role may not see under the
/// row-level security of their tables. A truncate carries no row and stays;
/// a row whose image can not be checked (a value the table's types refuse,
/// a policy that raises an error) is hidden.
pub fn hide_by_row_security(views: &mut Vec<ChangeView>) -> Result<(), String> {
    if views.is_empty() {
        return Ok(());
    }
    // SAFETY: reading the session's role.
    if unsafe { pg_sys::superuser() } {
        return Ok(());
    }
    let relids: BTreeSet<u32> = views.iter().map(|v| v.relid).collect();
    let policies = applicable_policies(&relids.into_iter().collect::<Vec<_>>())?;
    if policies.is_empty() {
        return Ok(());
    }
    let mut hidden: BTreeSet<usize> = BTreeSet::new();
    for (relid, p) in &policies {
        let rows: Vec<(usize, &String)> = views
            .iter()
            .enumerate()
            .filter(|(_, v)| v.relid == *relid && v.op != "truncate")
            .filter_map(|(i, v)| match image(v) {
                Some(img) => Some((i, img)),
                None => {
                    hidden.insert(i);
                    None
                }
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let visible = visible_images(p, &rows.iter().map(|(_, img)| img.as_str()).collect::<Vec<_>>());
        for (k, (i, _)) in rows.iter().enumerate() {
            if !visible.contains(&k) {
                hidden.insert(*i);
            }
        }
    }
    let mut i = 0;
    views.retain(|_| {
        let keep = !hidden.contains(&i);
        i += 1;
        keep
    });
    Ok(())
}

/// Indexes of the `images` (row JSON) the policies show; one query for all,
/// then one per row if that fails.
fn visible_images(p: &Policies, images: &[&str]) -> BTreeSet<usize> {
    let all = format!(
        "SELECT (u.i - 1)::int4 FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS u(j, i),
                LATERAL pg_catalog.jsonb_populate_record(NULL::{}, u.j::pg_catalog.jsonb) AS {}
          WHERE {}",
        p.qualified, p.alias, p.predicate
    );
    let texts: Vec<&str> = images.to_vec();
    let together = try_subtransaction(|| {
        select_all(&all, &[texts.clone().into()], |r| Ok(r.get::<i32>(1)?.unwrap_or(-1))).map_err(|e| e.to_string())
    });
    if let Ok(idx) = together {
        return idx.into_iter().filter(|i| *i >= 0).map(|i| i as usize).collect();
    }
    let one = format!(
        "SELECT true FROM pg_catalog.jsonb_populate_record(NULL::{}, $1::pg_catalog.jsonb) AS {} WHERE {}",
        p.qualified, p.alias, p.predicate
    );
    images
        .iter()
        .enumerate()
        .filter(|(_, img)| {
            try_subtransaction(|| select_one::<bool>(&one, &[(**img).into()]).map_err(|e| e.to_string()))
                .ok()
                .flatten()
                .unwrap_or(false)
        })
        .map(|(i, _)| i)
        .collect()
}

/// For a label with a table whose row-level security applies to the
/// current role: the identifiers among `ids` of rows it can see now.
/// `None`: no such table, every identifier may be shown.
pub fn visible_identifiers(label: &str, ids: &[String]) -> Result<Option<BTreeSet<String>>, String> {
    // SAFETY: reading the session's role.
    if unsafe { pg_sys::superuser() } {
        return Ok(None);
    }
    let tables = select_all(
        "SELECT t.rel::oid, coalesce(t.identifier,
                    (SELECT a.attname::text FROM pg_catalog.pg_index i
                       JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                      WHERE i.indrelid = t.rel AND i.indisprimary AND i.indnatts = 1))
           FROM changerelay.tracked_tables t WHERE t.label = $1",
        &[label.into()],
        |r| Ok((r.get::<pg_sys::Oid>(1)?.map_or(0, |o| o.to_u32()), r.get::<String>(2)?)),
    )
    .map_err(|e| e.to_string())?;
    let relids: Vec<u32> = tables.iter().map(|(r, _)| *r).collect();
    let policies = applicable_policies(&relids)?;
    if policies.is_empty() {
        return Ok(None);
    }
    // Rows are visible through a plain query as the current role: row-level
    // security applies to it by itself.
    let mut parts = Vec::new();
    for (relid, column) in &tables {
        let Some(column) = column else { continue };
        let name = select_one::<String>(
            "SELECT pg_catalog.format('SELECT %I::pg_catalog.text AS id FROM %s', $2::text, $1::oid::regclass)",
            &[pg_sys::Oid::from(*relid).into(), column.as_str().into()],
        )
        .map_err(|e| e.to_string())?;
        if let Some(q) = name {
            parts.push(q);
        }
    }
    if parts.is_empty() {
        return Ok(Some(BTreeSet::new()));
    }
    let sql = format!(
        "SELECT x FROM pg_catalog.unnest($1::pg_catalog.text[]) AS x WHERE x IN ({})",
        parts.join(" UNION ALL ")
    );
    let shown = select_all(&sql, &[ids.to_vec().into()], |r| {
        Ok(r.get::<String>(1)?.unwrap_or_default())
    })
    .map_err(|e| e.to_string())?;
    Ok(Some(shown.into_iter().collect()))
}
