//! Per-relation cache for the output plugin: qualified names, whether the
//! `tables` option includes the relation, identity columns and each column's
//! output function, so a change costs no catalog lookups.
//!
//! Entries are marked stale by a relcache invalidation callback and rebuilt on
//! next use (never freed inside the callback, which can run in the middle of a
//! change). Each entry's output functions live in their own memory context,
//! a child of the decoding context, deleted when the entry is rebuilt.

use super::tracked::{TrackedSet, CONFIG_LABEL_COLUMN};
use changerelay_core::tables::TableFilter;
use pgrx::pg_sys;
use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

/// How a column's value becomes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// Written from its stored digits (its output function where they can not be read).
    Numeric,
    /// json: its stored text is its output.
    Json,
    /// jsonb: written from its stored form (its output function where that can not be read).
    Jsonb,
    Date,
    Timestamp,
    TimestampTz,
    Uuid,
    Array,
    /// text, varchar, char(n): the value's own bytes are its text output.
    Varlena,
    Text,
}

pub struct ElemInfo {
    pub typid: pg_sys::Oid,
    pub typlen: i16,
    pub byval: bool,
    pub align: std::ffi::c_char,
    pub kind: Kind,
    pub out: Box<pg_sys::FmgrInfo>,
}

pub struct ColumnInfo {
    pub name: String,
    pub dropped: bool,
    pub varlena: bool,
    pub kind: Kind,
    pub out: Box<pg_sys::FmgrInfo>,
    pub elem: Option<ElemInfo>,
}

/// How changes of a relation are filed in the version map (`tracked` option).
pub enum RelTracking {
    /// A tracked table: its label and the column identifying a row.
    Table { label: String, ident_attr: Option<usize> },
    /// `changerelay.tracked_tables` itself: the label is in each row.
    Config { label_attr: Option<usize> },
}

pub struct RelInfo {
    valid: bool,
    generation: u64,
    /// Attributes in the descriptor this entry was built from.
    natts: usize,
    pub relid: u32,
    cxt: pg_sys::MemoryContext,
    pub schema: String,
    pub table: String,
    pub included: bool,
    pub columns: Vec<ColumnInfo>,
    /// Indexes into `columns` of the replica identity (or primary key).
    pub key_attrs: Vec<usize>,
    /// Columns to read from an old tuple when the full old row is not wanted:
    /// the key, plus the identifier column when the old row carries it.
    pub old_attrs: Vec<usize>,
    pub replident_full: bool,
    pub tracking: Option<RelTracking>,
}

impl RelInfo {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// Hashes relation OIDs for the cache looked up with every change: a
/// multiply-shift of the 32-bit OID, cheaper than the default SipHash (no
/// untrusted keys reach this map).
#[derive(Default, Clone, Copy)]
pub struct BuildOidHasher;

#[derive(Default)]
pub struct OidHasher(u64);

impl std::hash::BuildHasher for BuildOidHasher {
    type Hasher = OidHasher;
    fn build_hasher(&self) -> OidHasher {
        OidHasher(0)
    }
}

impl std::hash::Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub struct RelationCache {
    parent: pg_sys::MemoryContext,
    map: HashMap<pg_sys::Oid, RelInfo, BuildOidHasher>,
    /// Present with the `tracked` option.
    tracked: Option<TrackedSet>,
}

/// The cache the invalidation callback marks; null when no decoding runs.
static ACTIVE: AtomicPtr<RelationCache> = AtomicPtr::new(std::ptr::null_mut());
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

impl RelationCache {
    pub fn new(parent: pg_sys::MemoryContext, tracked: bool) -> Self {
        RelationCache {
            parent,
            map: HashMap::default(),
            tracked: tracked.then(TrackedSet::new),
        }
    }

    /// Forces the tracked set to be reloaded before the next change (after
    /// a change to `changerelay.tracked_tables`).
    pub fn tracked_changed(&mut self) {
        if let Some(t) = &mut self.tracked {
            t.stale = true;
        }
    }

    /// Makes this cache the one relcache invalidations mark. `self` must not
    /// move afterwards (it lives inside the boxed plugin state).
    pub fn activate(&mut self) {
        ACTIVE.store(self, Ordering::Release);
        if !CALLBACK_REGISTERED.swap(true, Ordering::AcqRel) {
            // SAFETY: registering a callback with a function of the right
            // signature; it stays valid for the life of the backend.
            unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0usize)) };
        }
    }

    /// Stops this cache from receiving invalidations (it is being dropped).
    pub fn deactivate(&mut self) {
        let me: *mut RelationCache = self;
        let _ = ACTIVE.compare_exchange(me, std::ptr::null_mut(), Ordering::AcqRel, Ordering::Acquire);
    }

    /// The cached entry for `rel`, built or rebuilt when missing or stale.
    ///
    /// # Safety
    /// `rel` must be the open relation passed to a decoding callback, and the
    /// current memory context must be one that is reset after the callback.
    pub unsafe fn get(&mut self, rel: pg_sys::Relation, filter: Option<&TableFilter>) -> &RelInfo {
        // SAFETY: `rel` is open for the duration of the callback.
        let (relid, natts) = unsafe { ((*rel).rd_id, (*(*rel).rd_att).natts as usize) };
        let generation = match &mut self.tracked {
            Some(t) => {
                // SAFETY: forwarded from the caller (inside a decoding callback).
                unsafe { t.refresh() };
                t.generation
            }
            None => 0,
        };
        let fresh = self
            .map
            .get(&relid)
            .is_some_and(|info| info.valid && info.generation == generation && info.natts == natts);
        if !fresh {
            if let Some(old) = self.map.remove(&relid) {
                // SAFETY: nothing refers to the stale entry's functions any more.
                unsafe { pg_sys::MemoryContextDelete(old.cxt) };
            }
            // SAFETY: forwarded from the caller.
            let mut info = unsafe { build(rel, self.parent, filter, self.tracked.as_ref()) };
            info.generation = generation;
            self.map.insert(relid, info);
        }
        match self.map.get(&relid) {
            Some(info) => info,
            None => unreachable!("entry inserted above"),
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let cache = ACTIVE.load(Ordering::Acquire);
    if cache.is_null() {
        return;
    }
    // SAFETY: ACTIVE is cleared before the cache is dropped, and callbacks run
    // on the main thread only, so the pointer is live and not aliased mutably
    // by code running right now (entries are only marked, never removed here).
    let cache = unsafe { &mut *cache };
    // Any relcache invalidation may be the tracking table appearing or
    // disappearing (CREATE/DROP EXTENSION): reload the tracked set.
    cache.tracked_changed();
    // Any relcache invalidation may be the tracking table appearing or
    // disappearing (CREATE/DROP EXTENSION): reload the tracked set.
    cache.tracked_changed();
    if relid == pg_sys::InvalidOid {
        cache.map.values_mut().for_each(|info| info.valid = false);
    } else if let Some(info) = cache.map.get_mut(&relid) {
        info.valid = false;
    }
}

/// Builds the entry for `rel`. Relations left out (by `tables` or, with
/// `tracked`, by not being tracked) get no column information at all, so
/// their changes cost no catalog lookups.
///
/// # Safety
/// As for [`RelationCache::get`].
unsafe fn build(
    rel: pg_sys::Relation,
    parent: pg_sys::MemoryContext,
    filter: Option<&TableFilter>,
    tracked: Option<&TrackedSet>,
) -> RelInfo {
    // SAFETY: `rel` and its rd_rel/rd_att are valid while the relation is open;
    // the catalog lookups run under the decoding snapshot set up by Postgres.
    unsafe {
        let cxt = pg_sys::AllocSetContextCreateInternal(
            parent,
            c"pg_changerelay relation".as_ptr(),
            pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
            pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
            pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
        );
        let relid = (*rel).rd_id;
        let form = (*rel).rd_rel;
        let natts = (*(*rel).rd_att).natts as usize;
        let schema = cstr_to_string(pg_sys::get_namespace_name((*form).relnamespace));
        let table = cstr_to_string((*form).relname.data.as_ptr());
        let plan = tracked.map(|t| tracking_plan(relid, t));
        let included = filter.is_none_or(|f| f.matches(&schema, &table)) && !matches!(plan, Some(None));
        let replident = (*form).relreplident as u8;
        let mut info = RelInfo {
            valid: true,
            generation: 0,
            natts,
            relid: relid.to_u32(),
            cxt,
            schema,
            table,
            included,
            columns: Vec::new(),
            key_attrs: Vec::new(),
            old_attrs: Vec::new(),
            replident_full: replident == pg_sys::REPLICA_IDENTITY_FULL,
            tracking: None,
        };
        if !included {
            return info;
        }
        let tupdesc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        for i in 0..tupdesc.len() {
            let Some(att) = tupdesc.get(i) else { continue };
            info.columns.push(column_info(att, cxt));
        }
        info.key_attrs = key_attributes(rel, replident, &info.columns);
        info.old_attrs = info.key_attrs.clone();
        if let Some(Some(plan)) = plan {
            resolve_tracking(&mut info, plan);
        }
        info
    }
}

/// Where a relation's changes go, by column name (resolved after the
/// columns are known). `None`: not tracked.
enum TrackingPlan {
    Table { label: String, identifier: Option<String> },
    Config,
}

fn tracking_plan(relid: pg_sys::Oid, tracked: &TrackedSet) -> Option<TrackingPlan> {
    if relid == tracked.config_relid && tracked.config_relid != pg_sys::InvalidOid {
        Some(TrackingPlan::Config)
    } else {
        tracked.tables.get(&relid).map(|t| TrackingPlan::Table {
            label: t.label.clone(),
            identifier: t.identifier.clone(),
        })
    }
}

/// Records where an included relation's changes go.
fn resolve_tracking(info: &mut RelInfo, plan: TrackingPlan) {
    let column = |name: &str| info.columns.iter().position(|c| !c.dropped && c.name == name);
    let (tracking, extra) = match plan {
        TrackingPlan::Config => {
            let a = column(CONFIG_LABEL_COLUMN);
            (RelTracking::Config { label_attr: a }, a)
        }
        TrackingPlan::Table { label, identifier } => {
            let a = identifier.as_deref().and_then(column);
            (RelTracking::Table { label, ident_attr: a }, a)
        }
    };
    // The old row carries every column with REPLICA IDENTITY FULL.
    if let Some(a) = extra {
        if info.replident_full && !info.old_attrs.contains(&a) {
            info.old_attrs.push(a);
        }
    }
    info.tracking = Some(tracking);
}

/// # Safety
/// `att` must be a live attribute of an open relation.
unsafe fn column_info(att: &pg_sys::FormData_pg_attribute, cxt: pg_sys::MemoryContext) -> ColumnInfo {
    // SAFETY: NameData is NUL-terminated.
    let name = unsafe { cstr_to_string(att.attname.data.as_ptr()) };
    if att.attisdropped {
        return ColumnInfo {
            name,
            dropped: true,
            varlena: false,
            kind: Kind::Text,
            out: Box::new(pg_sys::FmgrInfo::default()),
            elem: None,
        };
    }
    // SAFETY: catalog lookups for a type that exists (the column uses it).
    let (out, kind) = unsafe { output_function(att.atttypid, cxt) };
    let elem = if kind == Kind::Array {
        // SAFETY: as above.
        unsafe { element_info(att.atttypid, cxt) }
    } else {
        None
    };
    // A true array whose element type could not be described falls back to text.
    let kind = if kind == Kind::Array && elem.is_none() {
        Kind::Text
    } else {
        kind
    };
    ColumnInfo {
        name,
        dropped: false,
        varlena: att.attlen == -1,
        kind,
        out,
        elem,
    }
}

/// # Safety
/// `typid` must name an existing type.
unsafe fn output_function(typid: pg_sys::Oid, cxt: pg_sys::MemoryContext) -> (Box<pg_sys::FmgrInfo>, Kind) {
    let mut foid = pg_sys::InvalidOid;
    let mut is_varlena = false;
    let mut out = Box::new(pg_sys::FmgrInfo::default());
    // SAFETY: out-parameters point to locals; the FmgrInfo is boxed so its
    // address is stable, and its extra state is allocated in `cxt`.
    unsafe {
        pg_sys::getTypeOutputInfo(typid, &mut foid, &mut is_varlena);
        pg_sys::fmgr_info_cxt(foid, &mut *out, cxt);
    }
    // SAFETY: as above.
    let base = unsafe { pg_sys::getBaseType(typid) };
    let kind = match base {
        pg_sys::BOOLOID => Kind::Bool,
        pg_sys::INT2OID => Kind::Int2,
        pg_sys::INT4OID => Kind::Int4,
        pg_sys::INT8OID => Kind::Int8,
        pg_sys::FLOAT4OID => Kind::Float4,
        pg_sys::FLOAT8OID => Kind::Float8,
        pg_sys::NUMERICOID => Kind::Numeric,
        pg_sys::JSONOID => Kind::Json,
        pg_sys::JSONBOID => Kind::Jsonb,
        pg_sys::DATEOID => Kind::Date,
        pg_sys::TIMESTAMPOID => Kind::Timestamp,
        pg_sys::TIMESTAMPTZOID => Kind::TimestampTz,
        pg_sys::UUIDOID => Kind::Uuid,
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Kind::Varlena,
        // SAFETY: as above.
        _ if unsafe { pg_sys::get_element_type(base) } != pg_sys::InvalidOid => Kind::Array,
        _ => Kind::Text,
    };
    (out, kind)
}

/// # Safety
/// `array_typid` must name an existing array type (or a domain over one).
unsafe fn element_info(array_typid: pg_sys::Oid, cxt: pg_sys::MemoryContext) -> Option<ElemInfo> {
    // SAFETY: catalog lookups for existing types; out-parameters are locals.
    unsafe {
        let typid = pg_sys::get_element_type(pg_sys::getBaseType(array_typid));
        if typid == pg_sys::InvalidOid {
            return None;
        }
        let (mut typlen, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        pg_sys::get_typlenbyvalalign(typid, &mut typlen, &mut byval, &mut align);
        let (out, kind) = output_function(typid, cxt);
        let kind = if kind == Kind::Array { Kind::Text } else { kind };
        Some(ElemInfo {
            typid,
            typlen,
            byval,
            align,
            kind,
            out,
        })
    }
}

/// Identity columns: the replica identity index for DEFAULT/INDEX, else the
/// primary key, else (FULL without a key) every column.
///
/// # Safety
/// `rel` must be open.
unsafe fn key_attributes(rel: pg_sys::Relation, replident: u8, columns: &[ColumnInfo]) -> Vec<usize> {
    // SAFETY: `rel` is open; the bitmaps are allocated in the current context.
    let bitmap = unsafe {
        let identity = match replident {
            pg_sys::REPLICA_IDENTITY_DEFAULT | pg_sys::REPLICA_IDENTITY_INDEX => {
                pg_sys::RelationGetIdentityKeyBitmap(rel)
            }
            _ => std::ptr::null_mut(),
        };
        if identity.is_null() {
            pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY)
        } else {
            identity
        }
    };
    let mut attrs = Vec::new();
    let mut member = -1;
    loop {
        // SAFETY: bms_next_member accepts a null set.
        member = unsafe { pg_sys::bms_next_member(bitmap, member) };
        if member < 0 {
            break;
        }
        let attnum = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
        if attnum >= 1 {
            attrs.push((attnum - 1) as usize);
        }
    }
    if attrs.is_empty() && replident == pg_sys::REPLICA_IDENTITY_FULL {
        attrs = (0..columns.len()).filter(|&i| !columns[i].dropped).collect();
    }
    attrs
}

/// # Safety
/// `p` must be null or a NUL-terminated string.
pub unsafe fn cstr_to_string(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: forwarded from the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
