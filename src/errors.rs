//! Raising Postgres errors with a SQLSTATE, a message, a detail and a hint.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises an ERROR; never returns.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, detail: Option<String>, hint: impl Into<String>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "pg_changerelay");
    if let Some(detail) = detail {
        report = report.set_detail(detail);
    }
    let hint: String = hint.into();
    if !hint.is_empty() {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// One line for the log: SQLSTATE, message and detail of a caught error.
pub fn describe(e: &pgrx::pg_sys::panic::CaughtError) -> String {
    use pgrx::pg_sys::panic::CaughtError;
    let report = match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => r,
    };
    let mut text = format!("{} (SQLSTATE {:?})", report.message(), report.sql_error_code());
    if let Some(detail) = report.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    text
}
