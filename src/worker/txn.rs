//! Transactions the relay worker runs without letting an error end it.

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
