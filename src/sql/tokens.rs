//! Access tokens for the relay worker's endpoint: `create_token()`,
//! `revoke_token()`, `tokens()`.
//!
//! A token's secret is shown once; only its SHA-256 is stored. Tokens are
//! managed by superusers and members of `changerelay_admin`, through these
//! functions only: the admin role has no write privilege on the table, the
//! functions write it as the extension's owner after their checks. A token
//! acts with the privileges of the role that created it: it can only be
//! created for labels that role may read, and the relay worker narrows it
//! again to what the role may read whenever it serves it. Any committed
//! change of the table (these functions, DELETE, TRUNCATE, a restore) bumps
//! a generation counter through a trigger; the worker also reloads tokens
//! every second, so a revoked token's connections close within a second.

use crate::errors::raise;
use crate::sql::{access, require_preloaded, select_one};
use changerelay_core::versions::valid_label;
use pgrx::prelude::*;

extension_sql!(
    r#"
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'changerelay_admin') THEN
        CREATE ROLE changerelay_admin NOLOGIN;
    END IF;
END
$$;

-- Access tokens for the endpoint; only the SHA-256 of each secret is kept.
CREATE TABLE changerelay.tokens (
    name text PRIMARY KEY,
    secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
    labels text[] NOT NULL,
    rows_allowed boolean NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by name NOT NULL DEFAULT current_user,
    -- The role whose privileges bound what the token may read.
    creator oid NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('changerelay.tokens', '');
REVOKE ALL ON changerelay.tokens FROM PUBLIC;
GRANT SELECT (name, labels, rows_allowed, created_at, created_by) ON changerelay.tokens TO changerelay_admin;
"#,
    name = "token_tables",
    requires = ["tracking_tables"]
);

extension_sql!(
    r#"
REVOKE EXECUTE ON FUNCTION changerelay.create_token(text, text[], boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION changerelay.revoke_token(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION changerelay.create_token(text, text[], boolean) TO changerelay_admin;
GRANT EXECUTE ON FUNCTION changerelay.revoke_token(text) TO changerelay_admin;
REVOKE EXECUTE ON FUNCTION changerelay.tokens_changed() FROM PUBLIC;
CREATE TRIGGER tokens_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON changerelay.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION changerelay.tokens_changed();
"#,
    name = "token_grants",
    requires = [create_token, revoke_token, tokens_changed]
);

/// Trigger on `changerelay.tokens`: whatever changed the table, the token
/// generation moves when the transaction commits.
#[pg_trigger]
fn tokens_changed<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::pgbox::AllocatedByPostgres>>, std::convert::Infallible> {
    crate::shmem::tokens_changed_at_commit();
    Ok(None)
}

/// Errors unless the role may manage `what` (tokens, consumers, sinks):
/// superusers and members of changerelay_admin.
pub(crate) fn require_admin(what: &str) {
    // SAFETY: reading the session's role on the main thread.
    if unsafe { pg_sys::superuser() } {
        return;
    }
    let member = select_one::<bool>(
        "SELECT pg_catalog.pg_has_role(current_user, 'changerelay_admin', 'MEMBER')",
        &[],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !member {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to manage pg_changerelay {what}"),
            None,
            format!("pg_changerelay {what} are managed by superusers and members of changerelay_admin: GRANT changerelay_admin TO the role."),
        );
    }
}

pub(crate) fn check_name(what: &str, value: &str) {
    if !valid_label(value) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid {what} \"{value}\""),
            None,
            "Use 1 to 64 characters from A-Z, a-z, 0-9, '_', '.', ':' and '-'.",
        );
    }
}

/// 32 bytes from the server's strong random source, as `crt_` + base64url.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    // SAFETY: the buffer is 32 writable bytes.
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "could not generate a random token secret",
            None,
            "Check the server's random source (OpenSSL or /dev/urandom).",
        );
    }
    let mut secret = String::from("crt_");
    changerelay_core::cursor::base64url_encode(&bytes, &mut secret);
    secret
}

/// Creates a token for the endpoint and returns its secret, once. `rows`
/// false: versions only; true: change payloads too.
#[pg_extern(volatile)]
fn create_token(name: &str, labels: Vec<String>, rows: default!(bool, false)) -> String {
    require_preloaded();
    crate::sql::require_primary("create a token");
    require_admin("tokens");
    check_name("token name", name);
    if labels.is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "a token needs at least one label",
            None,
            "Pass the labels the token may read, for example ARRAY['parameters'].",
        );
    }
    for label in &labels {
        check_name("label", label);
    }
    // A token reads with its creator's privileges: it may only be made for
    // labels the creator can read (checked again whenever it is served).
    // SAFETY: reading the session's role.
    if !unsafe { pg_sys::superuser() } {
        for label in &labels {
            if !crate::sql::label_known(label) {
                crate::sql::unknown_label(label);
            }
            crate::sql::check_label_access(label);
        }
    }
    let creator = access::current_role();
    for label in &labels {
        let limited = select_one::<bool>(
            "SELECT changerelay.label_row_security_applies($1, $2)",
            &[label.as_str().into(), creator.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(true);
        if limited {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("label \"{label}\" has a table whose row-level security applies to the current role"),
                Some("The endpoint's version maps are per label and would show identifiers of rows the role may not see.".into()),
                "Read this label with changerelay.changes()/watch() and versions() in SQL (row-level security applies), \
                 or create the token as a role that bypasses the policies.",
            );
        }
    }
    let exists = select_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM changerelay.tokens WHERE name = $1)",
        &[name.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if exists {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("token \"{name}\" already exists"),
            None,
            "Revoke it first with changerelay.revoke_token(), or choose another name.",
        );
    }
    let secret = new_secret();
    let inserted = access::as_role(access::extension_owner(), || {
        Spi::run_with_args(
            "INSERT INTO changerelay.tokens (name, secret_sha256, labels, rows_allowed, created_by, creator)
             VALUES ($1, pg_catalog.sha256(pg_catalog.convert_to($2, 'UTF8')), $3, $4,
                     (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = $5), $5)",
            &[
                name.into(),
                secret.as_str().into(),
                labels.into(),
                rows.into(),
                creator.into(),
            ],
        )
    });
    if let Err(e) = inserted {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("could not store the token: {e}"),
            None,
            "Retry; if it persists, check the server log.",
        );
    }
    secret
}

/// Revokes a token; the endpoint closes its connections within a second.
#[pg_extern(volatile)]
fn revoke_token(name: &str) {
    require_preloaded();
    crate::sql::require_primary("revoke a token");
    require_admin("tokens");
    let deleted = access::as_role(access::extension_owner(), || {
        Spi::connect_mut(|c| {
            c.update("DELETE FROM changerelay.tokens WHERE name = $1", None, &[name.into()])
                .map(|t| t.len())
        })
    });
    match deleted {
        Ok(n) if n > 0 => {}
        Ok(_) => raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("token \"{name}\" does not exist"),
            None,
            "changerelay.tokens() lists the tokens.",
        ),
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("could not revoke the token: {e}"),
            None,
            "",
        ),
    }
}

/// The tokens, without their secrets.
// pgrx spells the SQL row type out in the signature.
#[allow(clippy::type_complexity)]
#[pg_extern(stable)]
fn tokens() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(labels, Vec<String>),
        name!(rows, bool),
        name!(created_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(created_by, String),
    ),
> {
    require_preloaded();
    require_admin("tokens");
    let rows = crate::sql::select_all(
        "SELECT name, labels, rows_allowed, created_at, created_by::text FROM changerelay.tokens ORDER BY name",
        &[],
        |r| {
            Ok((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<Vec<String>>(2)?.unwrap_or_default(),
                r.get::<bool>(3)?.unwrap_or(false),
                r.get::<pgrx::datum::TimestampWithTimeZone>(4)?,
                r.get::<String>(5)?.unwrap_or_default(),
            ))
        },
    );
    match rows {
        Ok(rows) => TableIterator::new(rows),
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("could not read tokens: {e}"),
            None,
            "",
        ),
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    #[pg_test]
    fn create_token_returns_a_secret_once_and_stores_its_hash() {
        let secret: String =
            one("SELECT changerelay.create_token('svc', ARRAY['parameters'], true)").unwrap_or_default();
        assert!(secret.starts_with("crt_") && secret.len() == 47, "{secret}");
        let matches: Option<bool> = one(&format!(
            "SELECT secret_sha256 = sha256(convert_to('{secret}', 'UTF8')) FROM changerelay.tokens WHERE name = 'svc'"
        ));
        assert_eq!(matches, Some(true));
        let listed: Option<String> =
            one("SELECT name || ':' || array_to_string(labels, ',') || ':' || rows FROM changerelay.tokens()");
        assert_eq!(listed.as_deref(), Some("svc:parameters:true"));
        let other: String = one("SELECT changerelay.create_token('svc2', ARRAY['a'])").unwrap_or_default();
        assert_ne!(other, secret);
    }

    #[pg_test(error = "token \"svc\" already exists")]
    fn create_token_refuses_a_duplicate_name() {
        Spi::run("SELECT changerelay.create_token('svc', ARRAY['a'])").unwrap_or_else(|e| panic!("{e}"));
        Spi::run("SELECT changerelay.create_token('svc', ARRAY['b'])").unwrap_or_else(|e| panic!("{e}"));
    }

    #[pg_test(error = "invalid label \"no spaces\"")]
    fn create_token_checks_labels() {
        Spi::run("SELECT changerelay.create_token('svc', ARRAY['no spaces'])").unwrap_or_else(|e| panic!("{e}"));
    }

    #[pg_test(error = "a token needs at least one label")]
    fn create_token_needs_a_label() {
        Spi::run("SELECT changerelay.create_token('svc', ARRAY[]::text[])").unwrap_or_else(|e| panic!("{e}"));
    }

    #[pg_test]
    fn revoke_token_deletes_it() {
        Spi::run("SELECT changerelay.create_token('svc', ARRAY['a'])").unwrap_or_else(|e| panic!("{e}"));
        Spi::run("SELECT changerelay.revoke_token('svc')").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one::<i64>("SELECT count(*) FROM changerelay.tokens"), Some(0));
    }

    #[pg_test(error = "token \"nope\" does not exist")]
    fn revoke_token_names_an_unknown_token() {
        Spi::run("SELECT changerelay.revoke_token('nope')").unwrap_or_else(|e| panic!("{e}"));
    }

    #[pg_test(error = "permission denied to manage pg_changerelay tokens")]
    fn tokens_need_changerelay_admin() {
        Spi::run("CREATE ROLE cr_plain_user").unwrap_or_else(|e| panic!("{e}"));
        Spi::run("GRANT EXECUTE ON FUNCTION changerelay.create_token(text, text[], boolean) TO cr_plain_user")
            .unwrap_or_else(|e| panic!("{e}"));
        Spi::run("SET LOCAL ROLE cr_plain_user").unwrap_or_else(|e| panic!("{e}"));
        Spi::run("SELECT changerelay.create_token('svc', ARRAY['a'])").unwrap_or_else(|e| panic!("{e}"));
    }
}
