//! pg_changerelay: realtime change feeds out of PostgreSQL.
//!
//! This crate is the thin Postgres-facing layer. Everything that can be
//! written without Postgres (event model, encoders, option parsing) lives in
//! the `changerelay-core` crate and is tested with plain `cargo test`.
//!
//! * [`plugin`]: the logical decoding output plugin `pg_changerelay`.
//! * [`sql`]: SQL functions in schema `changerelay`.
#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

mod compat;
mod errors;
mod gucs;
mod ha;
mod plugin;
mod shmem;
mod sql;
mod txn;
mod worker;

::pgrx::pg_module_magic!(name, version);

/// Prefix of every setting this extension defines.
pub const GUC_PREFIX: &std::ffi::CStr = c"changerelay";

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a postmaster global from _PG_init.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::define(preloading);
    // SAFETY: _PG_init, main thread.
    unsafe { compat::reserve_guc_prefix(GUC_PREFIX) };
    if preloading {
        shmem::install(gucs::max_labels(), gucs::max_tracked_rows());
        shmem::register_wakeup();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    // The SQL functions' #[pg_test]s live next to them in `sql`.
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // No endpoint: #[pg_test]s need none, and it would take the default port.
        vec![
            "wal_level = logical",
            "shared_preload_libraries = 'pg_changerelay'",
            "changerelay.port = 0",
        ]
    }
}
