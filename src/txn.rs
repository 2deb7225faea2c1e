//! Transactions and subtransactions whose errors come back as values.

use pgrx::pg_sys;
use pgrx::PgTryBuilder;
use std::panic::AssertUnwindSafe;

/// Runs `f` in a transaction of its own and commits it. A Postgres error
/// (raised inside `f` or at commit), an `Err` from `f`, or a Rust panic
/// rolls the transaction back and comes back as text, so the worker goes on
/// (pg_cron's launcher treats its job transactions the same way).
pub fn try_transaction<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
    // SAFETY: the worker's main thread, between transactions.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(AssertUnwindSafe(|| {
        let r = f();
        if r.is_ok() {
            // SAFETY: pops the snapshot pushed above and commits; an error
            // at commit is caught like any other.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
        }
        r
    }))
    .catch_others(|e| Err(crate::errors::describe(&e)))
    .execute();
    if result.is_err() {
        // SAFETY: leaves the failed (or still open) transaction the way
        // Postgres' own error recovery does; releases its locks, snapshots
        // and memory. Safe to call whatever state the transaction is in.
        unsafe {
            pg_sys::AbortCurrentTransaction();
            pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        }
    }
    result
}

/// Runs `f` in a subtransaction of the current transaction. A Postgres
/// error (or an `Err`, or a panic) rolls the subtransaction back and comes
/// back as text; the transaction goes on as PL/pgSQL's exception blocks do.
pub fn try_subtransaction<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
    // SAFETY: inside a transaction; the subtransaction is released or rolled
    // back before returning, and the memory context and resource owner are
    // restored as PL/pgSQL does.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let result = PgTryBuilder::new(AssertUnwindSafe(f))
            .catch_others(|e| Err(crate::errors::describe(&e)))
            .execute();
        if result.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

// The server's timeout API (utils/timeout.h, not in pgrx's bindings).
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}

/// `STATEMENT_TIMEOUT` of `TimeoutId` (the fourth, in every supported major).
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;

/// Runs `f` under a statement timeout of `limit`: past it, the statement
/// under way is cancelled with the usual "canceling statement due to
/// statement timeout" error (for the caller to catch, in a
/// subtransaction). `statement_timeout` itself only covers statements a
/// client sends, never a background worker's.
pub fn with_statement_timeout<R>(limit: std::time::Duration, f: impl FnOnce() -> R) -> R {
    let ms = limit.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_int;
    // SAFETY: the timeout is registered for every backend with a database
    // connection (InitPostgres), background workers included; it is
    // disabled again on every path, and a cancel it may have raised after
    // `f` returned is withdrawn so it can not hit the worker's next step.
    unsafe { enable_timeout_after(STATEMENT_TIMEOUT, ms) };
    PgTryBuilder::new(AssertUnwindSafe(f))
        .finally(|| {
            // SAFETY: as above.
            unsafe {
                disable_timeout(STATEMENT_TIMEOUT, false);
                pg_sys::QueryCancelPending = 0;
            }
        })
        .execute()
}
