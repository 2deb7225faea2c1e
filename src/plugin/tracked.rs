//! The `tracked` option: which tables the relay worker follows, read from
//! `changerelay.tracked_tables` under the decoding (historic) snapshot.
//!
//! The table is a `user_catalog_table`, so logical decoding can read it as of
//! each change: tracking changes take effect exactly at their place in the
//! commit order, also within one transaction. The set is reloaded after any
//! relcache invalidation, after each decoded change to the table itself, and
//! whenever the catalog snapshot differs from the one it was read under:
//! transactions are replayed in commit order but each sees the catalog as of
//! its own start, so one that began before a `track()` committed must not
//! leave its older view cached for the transactions after it.

use pgrx::pg_sys;
use std::collections::HashMap;

pub const CONFIG_SCHEMA: &std::ffi::CStr = c"changerelay";
pub const CONFIG_TABLE: &std::ffi::CStr = c"tracked_tables";
/// Column of `tracked_tables` holding the label.
pub const CONFIG_LABEL_COLUMN: &str = "label";

#[derive(PartialEq, Eq)]
pub struct TrackedTable {
    pub label: String,
    pub identifier: Option<String>,
}

#[derive(Default)]
pub struct TrackedSet {
    pub stale: bool,
    /// Bumped on every reload; relation entries built under an older
    /// generation are rebuilt.
    pub generation: u64,
    /// OID of `changerelay.tracked_tables` (InvalidOid: extension absent).
    pub config_relid: pg_sys::Oid,
    pub tables: HashMap<pg_sys::Oid, TrackedTable>,
    /// The catalog snapshot the set was read under (address, xmin, xmax, xcnt).
    seen_under: (usize, u32, u32, u32),
}

impl TrackedSet {
    pub fn new() -> Self {
        TrackedSet {
            stale: true,
            ..Default::default()
        }
    }

    /// Reloads the set if it is stale.
    ///
    /// # Safety
    /// Must run inside a decoding callback (historic snapshot active).
    pub unsafe fn refresh(&mut self) {
        // SAFETY: forwarded from the caller.
        let key = unsafe { snapshot_key() };
        if !self.stale && key == self.seen_under {
            return;
        }
        // SAFETY: forwarded from the caller.
        let (relid, tables) = unsafe { load() };
        // Relation entries are rebuilt only when what they depend on changed.
        if relid != self.config_relid || tables != self.tables {
            self.generation += 1;
        }
        self.config_relid = relid;
        self.tables = tables;
        self.seen_under = key;
        self.stale = false;
    }
}

/// Identifies the current (historic) catalog snapshot.
///
/// # Safety
/// Must run inside a decoding callback.
unsafe fn snapshot_key() -> (usize, u32, u32, u32) {
    // SAFETY: during decoding the catalog snapshot is the historic snapshot
    // set up for the transaction being replayed; it is live while we read it.
    unsafe {
        let snap = pg_sys::GetCatalogSnapshot(pg_sys::InvalidOid);
        if snap.is_null() {
            return (0, 0, 0, 0);
        }
        (
            snap as usize,
            (*snap).xmin.into_inner(),
            (*snap).xmax.into_inner(),
            (*snap).xcnt,
        )
    }
}

/// # Safety
/// Must run inside a decoding callback.
unsafe fn load() -> (pg_sys::Oid, HashMap<pg_sys::Oid, TrackedTable>) {
    let mut tables = HashMap::new();
    // SAFETY: catalog lookups and a catalog-snapshot scan of a user catalog
    // table, as output plugins are allowed to do; the tuple values are copied
    // out before the scan ends.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(CONFIG_SCHEMA.as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return (pg_sys::InvalidOid, tables);
        }
        let relid = pg_sys::get_relname_relid(CONFIG_TABLE.as_ptr(), nsp);
        if relid == pg_sys::InvalidOid {
            return (pg_sys::InvalidOid, tables);
        }
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let tupdesc = (*rel).rd_att;
        let natts = (*tupdesc).natts as usize;
        if natts >= 3 {
            let scan = pg_sys::systable_beginscan(
                rel,
                pg_sys::InvalidOid,
                false,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
            );
            let mut values = vec![pg_sys::Datum::from(0usize); natts];
            let mut nulls = vec![true; natts];
            loop {
                let tuple = pg_sys::systable_getnext(scan);
                if tuple.is_null() {
                    break;
                }
                pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
                if nulls[0] || nulls[1] {
                    continue;
                }
                let table = pg_sys::Oid::from(values[0].value() as u32);
                let label = text_datum(values[1]);
                let identifier = (!nulls[2]).then(|| text_datum(values[2]));
                tables.insert(table, TrackedTable { label, identifier });
            }
            pg_sys::systable_endscan(scan);
        }
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        (relid, tables)
    }
}

/// # Safety
/// `d` must be a non-null text datum.
unsafe fn text_datum(d: pg_sys::Datum) -> String {
    // SAFETY: text_to_cstring detoasts and returns a palloc'd copy.
    unsafe { super::relations::cstr_to_string(pg_sys::text_to_cstring(d.cast_mut_ptr())) }
}
