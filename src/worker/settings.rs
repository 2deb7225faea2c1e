//! Settings the relay worker runs under, whatever its database says.
//!
//! The worker connects as the bootstrap superuser, and connecting applies
//! the database's own settings (`ALTER DATABASE … SET`), which a database
//! owner who is not a superuser may write. A `search_path` putting the
//! owner's schema first would let an operator of theirs run as superuser
//! inside the worker's queries; `default_transaction_read_only = on` would
//! make every apply fail; planner or memory settings could slow it down.
//! So, before its first query, the worker:
//! 1. pins `search_path` to `pg_catalog, pg_temp` (through the C API: no
//!    query runs under the database's path, and every name the worker
//!    writes is schema-qualified or in `pg_catalog`);
//! 2. puts every setting that came from `ALTER DATABASE` / `ALTER ROLE` back
//!    to the server's configuration (or built-in) value;
//! 3. pins what its correctness depends on (below).

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::ffi::CString;

/// What the worker's correctness depends on.
const PINNED: &[(&str, &str)] = &[
    ("search_path", "pg_catalog, pg_temp"),
    ("default_transaction_read_only", "off"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_deferrable", "off"),
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    // Output functions the plugin calls in this process (the types it does
    // not write itself: ranges of timestamptz, for one, follow TimeZone).
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
    ("xmloption", "content"),
];

/// Settings derived from the worker's own reloadable settings; again after
/// each SIGHUP.
pub fn apply_reloadable() {
    set(
        "logical_decoding_work_mem",
        &format!("{}kB", crate::gucs::decoding_work_mem_kb()),
    );
}

fn set(name: &str, value: &str) {
    let (Ok(n), Ok(v)) = (CString::new(name), CString::new(value)) else {
        return;
    };
    // SAFETY: main thread, outside any transaction or inside one; a session
    // level setting (as SET would make), which every later transaction of
    // this process uses. A name this server does not know is skipped.
    unsafe {
        if pg_sys::GetConfigOption(n.as_ptr(), true, false).is_null() {
            return;
        }
        pg_sys::SetConfigOption(
            n.as_ptr(),
            v.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

/// Applies the three steps above; from the worker's start, right after it
/// connected.
pub fn pin() {
    set("search_path", "pg_catalog, pg_temp");
    set("default_transaction_read_only", "off");
    let overridden = BackgroundWorker::transaction(|| {
        crate::sql::select_all(
            "SELECT s.name, coalesce(
                    (SELECT f.setting FROM pg_catalog.pg_file_settings f
                      WHERE f.name OPERATOR(pg_catalog.=) s.name AND f.applied
                      ORDER BY f.seqno DESC LIMIT 1),
                    s.boot_val)
               FROM pg_catalog.pg_settings s
              WHERE s.source OPERATOR(pg_catalog.=) ANY (ARRAY['database', 'database user', 'user'])",
            &[],
            |r| Ok((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?)),
        )
    });
    match overridden {
        Ok(list) => {
            for (name, value) in list {
                if let Some(value) = value {
                    log!("pg_changerelay relay: ignoring the database's setting of \"{name}\"");
                    set(&name, &value);
                }
            }
        }
        Err(e) => warning!("pg_changerelay relay: could not read the database's settings: {e}"),
    }
    for (name, value) in PINNED {
        set(name, value);
    }
    apply_reloadable();
    // SAFETY: reading a setting's current value (a static C string).
    let sync = unsafe { pg_sys::GetConfigOption(c"synchronous_commit".as_ptr(), true, false) };
    // SAFETY: a non-null result is a NUL-terminated string.
    if !sync.is_null() && unsafe { std::ffi::CStr::from_ptr(sync) }.to_bytes() == b"off" {
        // History must be durable before the slot moves past it.
        set("synchronous_commit", "local");
    }
}
