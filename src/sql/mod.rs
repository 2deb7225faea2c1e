//! SQL functions in schema `changerelay`.

pub mod access;
pub mod consumers;
pub mod cursors;
mod ha_status;
pub mod history;
pub mod jsonb;
pub mod metadata;
pub mod sinks;
pub mod tokens;
mod tracking;
mod upgrade;
pub mod versions;

use crate::errors::raise;
use pgrx::PgSqlErrorCode;

/// Errors unless the library was loaded through `shared_preload_libraries`
/// (the relay worker and the shared version map exist only then).
pub fn require_preloaded() {
    if crate::shmem::shared().is_none() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_changerelay must be loaded via shared_preload_libraries",
            Some("The relay worker and its shared-memory version map are set up when the server starts.".into()),
            "Add pg_changerelay to shared_preload_libraries in postgresql.conf and restart the server.",
        );
    }
}

/// Errors on a hot standby: `what` writes, and a standby is read-only.
pub fn require_primary(what: &str) {
    if crate::ha::in_recovery() {
        raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {what} on a standby"),
            Some("A hot standby answers changes(), watch(), version(), versions(), version_map() and status() from the replicated history; everything that writes belongs on the primary.".into()),
            "Run it on the primary.",
        );
    }
}

/// Runs a read-only query and returns the first column of its first row
/// (`None` for no row or NULL). Unlike `Spi::get_one`, it never marks the
/// transaction as writing, so it takes no transaction id.
pub fn select_one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Result<Option<T>, pgrx::spi::Error> {
    pgrx::Spi::connect(|client| {
        let table = client.select(sql, Some(1), args)?;
        if table.is_empty() {
            Ok(None)
        } else {
            table.first().get::<T>(1)
        }
    })
}

pub use access::check_label_access;

/// Runs a read-only query and maps every row with `f`.
pub fn select_all<T>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
    mut f: impl FnMut(&pgrx::spi::SpiHeapTupleData<'_>) -> Result<T, pgrx::spi::Error>,
) -> Result<Vec<T>, pgrx::spi::Error> {
    pgrx::Spi::connect(|client| client.select(sql, None, args)?.map(|row| f(&row)).collect())
}

/// Runs a statement that writes or locks (`UPDATE … RETURNING`, `FOR
/// UPDATE`) and maps every row it returns with `f`.
pub fn write_all<T>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
    mut f: impl FnMut(&pgrx::spi::SpiHeapTupleData<'_>) -> Result<T, pgrx::spi::Error>,
) -> Result<Vec<T>, pgrx::spi::Error> {
    pgrx::Spi::connect_mut(|client| client.update(sql, None, args)?.map(|row| f(&row)).collect())
}

/// [`write_all`]'s first column of its first row.
pub fn write_one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Result<Option<T>, pgrx::spi::Error> {
    pgrx::Spi::connect_mut(|client| {
        let table = client.update(sql, None, args)?;
        if table.is_empty() {
            Ok(None)
        } else {
            table.first().get::<T>(1)
        }
    })
}

/// Whether `label` is tracked now or has versions from before.
pub fn label_known(label: &str) -> bool {
    select_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM changerelay.tracked_tables WHERE label = $1)
             OR EXISTS (SELECT 1 FROM changerelay.label_versions WHERE label = $1)",
        &[label.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Raises the error for a label that is not tracked.
pub fn unknown_label(label: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("label \"{label}\" is not tracked"),
        None,
        "changerelay.tracked() lists the labels; changerelay.track() adds one.",
    )
}
