//! The version map: per-label and per-row version counters in a fixed-size
//! open-addressing hash table that lives in shared memory.
//!
//! The layout types are `#[repr(C)]` plain data so the FFI layer can place
//! them in shared memory; this module only sees slices and never touches
//! Postgres. Locking is the caller's business: mutation needs the map's lock
//! exclusively, reads need it shared.
//!
//! Guarantees:
//! * versions never go backwards (`bump` keeps the maximum);
//! * when the table fills up, the least recently changed entries (smallest
//!   `v`) are evicted and their label's *floor* raised to their version, so a
//!   lookup of an evicted row answers a version at least as new as its true
//!   one: a reader may see a spurious increment, never miss one.

use std::hash::{Hash, Hasher};

/// Bytes of an identifier stored inline; longer ones are stored truncated
/// and flagged (lookups use the full hash, so they stay exact).
pub const IDENT_INLINE: usize = 36;
/// Longest label, in bytes.
pub const LABEL_MAX: usize = 64;
/// Entries are evicted when the table is this full (numerator over 8)...
const HIGH_WATER_EIGHTHS: usize = 7;
/// ...down to this (numerator over 8).
const LOW_WATER_EIGHTHS: usize = 6;

/// The most rows a map of `slots` entries holds: one more and it evicts.
pub fn most_held(slots: usize) -> usize {
    slots * HIGH_WATER_EIGHTHS / 8
}

/// Label syntax: `[A-Za-z0-9_.:-]{1,64}`.
pub fn valid_label(label: &str) -> bool {
    (1..=LABEL_MAX).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// A version: commit LSN of the last change and its commit time (ms).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Version {
    pub v: u64,
    pub ts: i64,
}

impl Version {
    pub fn is_set(&self) -> bool {
        self.v != 0
    }

    /// The newer of two versions.
    pub fn max(self, other: Version) -> Version {
        if other.v > self.v {
            other
        } else {
            self
        }
    }
}

/// One row's version: 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// 0 marks an empty slot.
    pub hash: u64,
    pub version: Version,
    pub label: u16,
    /// Identifier length, saturated at 255.
    pub ident_len: u8,
    pub flags: u8,
    pub ident: [u8; IDENT_INLINE],
}

pub const ENTRY_TRUNCATED: u8 = 1;

const _: () = assert!(std::mem::size_of::<Entry>() == 64);

impl Entry {
    pub const EMPTY: Entry = Entry {
        hash: 0,
        version: Version { v: 0, ts: 0 },
        label: 0,
        ident_len: 0,
        flags: 0,
        ident: [0; IDENT_INLINE],
    };

    /// The identifier as stored (truncated when `is_truncated`).
    pub fn ident(&self) -> &[u8] {
        &self.ident[..usize::from(self.ident_len).min(IDENT_INLINE)]
    }

    pub fn is_truncated(&self) -> bool {
        self.flags & ENTRY_TRUNCATED != 0
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LabelSlot {
    pub name: [u8; LABEL_MAX],
    pub name_len: u8,
    pub in_use: bool,
    _pad: [u8; 6],
    /// The label's `all` version.
    pub all: Version,
    /// Every row of the label is at least this new (evictions, truncate).
    pub floor: Version,
    /// Entries of this label in the table.
    pub rows: u64,
}

impl LabelSlot {
    pub const EMPTY: LabelSlot = LabelSlot {
        name: [0; LABEL_MAX],
        name_len: 0,
        in_use: false,
        _pad: [0; 6],
        all: Version { v: 0, ts: 0 },
        floor: Version { v: 0, ts: 0 },
        rows: 0,
    };

    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..usize::from(self.name_len).min(LABEL_MAX)]).unwrap_or("")
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MapHeader {
    /// Random per-cluster salt mixed into every hash.
    pub salt: u64,
    pub used: u64,
    pub evictions: u64,
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No such label.
    UnknownLabel,
    /// The label exists; the row was never seen (and nothing was evicted).
    Unseen,
    Found(Version),
}

/// Read access to a map.
pub struct VersionMap<'a> {
    pub header: &'a MapHeader,
    pub labels: &'a [LabelSlot],
    pub entries: &'a [Entry],
}

/// Write access to a map.
pub struct VersionMapMut<'a> {
    pub header: &'a mut MapHeader,
    pub labels: &'a mut [LabelSlot],
    pub entries: &'a mut [Entry],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapError {
    LabelTooLong,
    TooManyLabels(usize),
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapError::LabelTooLong => write!(f, "label longer than {LABEL_MAX} bytes"),
            MapError::TooManyLabels(n) => write!(f, "more than {n} labels"),
        }
    }
}

/// The `data` object of a version map message, `{"all":{"v":…,"ts":…},"<identifier>":{…}}`, with `all` first
/// and `v` before `ts`, as applications expect it.
pub fn data_json<'a>(all: Option<Version>, rows: impl IntoIterator<Item = (&'a str, Version)>) -> String {
    let mut out = String::from("{");
    let mut entry = |id: &str, v: Version| {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::from(id).to_string());
        out.push_str(&format!(":{{\"v\":{},\"ts\":{}}}", v.v, v.ts));
    };
    if let Some(all) = all {
        entry("all", all);
    }
    for (id, v) in rows {
        entry(id, v);
    }
    out.push('}');
    out
}

/// A whole version map message: `{"label":"parameters","data":{…}}`.
pub fn map_json<'a>(label: &str, all: Option<Version>, rows: impl IntoIterator<Item = (&'a str, Version)>) -> String {
    format!(
        "{{\"label\":{},\"data\":{}}}",
        serde_json::Value::from(label),
        data_json(all, rows)
    )
}

/// Hash of a row identifier within a label; never 0.
pub fn row_hash(salt: u64, label: u16, ident: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    salt.hash(&mut h);
    label.hash(&mut h);
    ident.hash(&mut h);
    h.finish().max(1)
}

fn probe_start(hash: u64, len: usize) -> usize {
    (hash % len as u64) as usize
}

/// Slot index of `(label, ident)`, or of the empty slot where it belongs.
fn find_slot(entries: &[Entry], hash: u64, label: u16, ident: &[u8]) -> Option<(usize, bool)> {
    let len = entries.len();
    if len == 0 {
        return None;
    }
    let mut i = probe_start(hash, len);
    for _ in 0..len {
        let e = &entries[i];
        if e.hash == 0 {
            return Some((i, false));
        }
        if e.hash == hash && e.label == label && stored_matches(e, ident) {
            return Some((i, true));
        }
        i = if i + 1 == len { 0 } else { i + 1 };
    }
    None
}

fn stored_matches(e: &Entry, ident: &[u8]) -> bool {
    let n = ident.len().min(IDENT_INLINE);
    usize::from(e.ident_len) == ident.len().min(255) && e.ident() == &ident[..n]
}

impl<'a> VersionMap<'a> {
    pub fn find_label(&self, name: &str) -> Option<u16> {
        self.labels
            .iter()
            .position(|l| l.in_use && l.name() == name)
            .map(|i| i as u16)
    }

    pub fn label(&self, idx: u16) -> Option<&LabelSlot> {
        self.labels.get(usize::from(idx)).filter(|l| l.in_use)
    }

    /// The `all` version of a label (`None` when the label is unknown).
    pub fn all(&self, label: &str) -> Option<Version> {
        self.find_label(label).and_then(|i| self.label(i)).map(|l| l.all)
    }

    /// The version of one row of a label.
    pub fn lookup(&self, label: &str, ident: &[u8]) -> Lookup {
        let Some(idx) = self.find_label(label) else {
            return Lookup::UnknownLabel;
        };
        let floor = self.labels[usize::from(idx)].floor;
        let hash = row_hash(self.header.salt, idx, ident);
        match find_slot(self.entries, hash, idx, ident) {
            Some((i, true)) => Lookup::Found(self.entries[i].version.max(floor)),
            _ if floor.is_set() => Lookup::Found(floor),
            _ => Lookup::Unseen,
        }
    }

    /// Every row entry of a label, with the floor applied.
    pub fn rows(&self, label: u16) -> impl Iterator<Item = (&Entry, Version)> + '_ {
        let floor = self.labels.get(usize::from(label)).map(|l| l.floor).unwrap_or_default();
        self.entries
            .iter()
            .filter(move |e| e.hash != 0 && e.label == label)
            .map(move |e| (e, e.version.max(floor)))
    }
}

impl<'a> VersionMapMut<'a> {
    pub fn view(&self) -> VersionMap<'_> {
        VersionMap {
            header: self.header,
            labels: self.labels,
            entries: self.entries,
        }
    }

    /// Empties the map and sets its salt.
    pub fn reset(&mut self, salt: u64) {
        *self.header = MapHeader {
            salt,
            used: 0,
            evictions: 0,
        };
        self.labels.fill(LabelSlot::EMPTY);
        self.entries.fill(Entry::EMPTY);
    }

    /// The index of `name`, adding the label when new.
    pub fn ensure_label(&mut self, name: &str) -> Result<u16, MapError> {
        if name.len() > LABEL_MAX {
            return Err(MapError::LabelTooLong);
        }
        if let Some(i) = self.view().find_label(name) {
            return Ok(i);
        }
        let max = self.labels.len().min(usize::from(u16::MAX));
        let free = self.labels[..max]
            .iter()
            .position(|l| !l.in_use)
            .ok_or(MapError::TooManyLabels(max))?;
        let slot = &mut self.labels[free];
        *slot = LabelSlot::EMPTY;
        slot.name[..name.len()].copy_from_slice(name.as_bytes());
        slot.name_len = name.len() as u8;
        slot.in_use = true;
        Ok(free as u16)
    }

    /// Moves a label's `all` version forward (never back).
    pub fn bump_all(&mut self, label: u16, version: Version) {
        if let Some(l) = self.labels.get_mut(usize::from(label)) {
            l.all = l.all.max(version);
        }
    }

    /// Moves every row of a label forward: truncate, or an evicted batch.
    pub fn raise_floor(&mut self, label: u16, version: Version) {
        if let Some(l) = self.labels.get_mut(usize::from(label)) {
            l.floor = l.floor.max(version);
        }
    }

    /// Moves one row's version forward (never back), evicting old entries
    /// first when the table is full.
    pub fn bump_row(&mut self, label: u16, ident: &[u8], version: Version) {
        let len = self.entries.len();
        if len == 0 {
            // No room at all: the floor alone keeps the never-miss promise.
            self.raise_floor(label, version);
            return;
        }
        let hash = row_hash(self.header.salt, label, ident);
        if let Some((i, true)) = find_slot(self.entries, hash, label, ident) {
            let e = &mut self.entries[i];
            e.version = e.version.max(version);
            return;
        }
        if (self.header.used as usize + 1) * 8 > len * HIGH_WATER_EIGHTHS {
            self.evict((len * LOW_WATER_EIGHTHS / 8).min(len.saturating_sub(1)));
        }
        match find_slot(self.entries, hash, label, ident) {
            Some((i, false)) => {
                let mut e = Entry::EMPTY;
                e.hash = hash;
                e.version = version;
                e.label = label;
                e.ident_len = ident.len().min(255) as u8;
                let n = ident.len().min(IDENT_INLINE);
                e.ident[..n].copy_from_slice(&ident[..n]);
                if ident.len() > IDENT_INLINE {
                    e.flags |= ENTRY_TRUNCATED;
                }
                self.entries[i] = e;
                self.header.used += 1;
                if let Some(l) = self.labels.get_mut(usize::from(label)) {
                    l.rows += 1;
                }
            }
            Some((i, true)) => {
                let e = &mut self.entries[i];
                e.version = e.version.max(version);
            }
            None => self.raise_floor(label, version),
        }
    }

    /// Evicts the least recently changed entries until at most `keep` remain,
    /// raising each evicted entry's label floor to its version.
    pub fn evict(&mut self, keep: usize) {
        let used = self.header.used as usize;
        if used <= keep {
            return;
        }
        let drop_count = used - keep;
        let mut vs: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| e.hash != 0)
            .map(|e| e.version.v)
            .collect();
        let (_, cutoff, _) = vs.select_nth_unstable(drop_count - 1);
        let cutoff = *cutoff;
        // Everything at or below the cutoff goes (ties may evict a few more).
        let mut survivors = Vec::with_capacity(keep + 16);
        for e in self.entries.iter_mut() {
            if e.hash == 0 {
                continue;
            }
            if e.version.v <= cutoff {
                if let Some(l) = self.labels.get_mut(usize::from(e.label)) {
                    l.floor = l.floor.max(e.version);
                    l.rows = l.rows.saturating_sub(1);
                }
                self.header.evictions += 1;
            } else {
                survivors.push(*e);
            }
            *e = Entry::EMPTY;
        }
        self.header.used = 0;
        for e in survivors {
            if let Some((i, false)) = find_slot(self.entries, e.hash, e.label, e.ident()) {
                self.entries[i] = e;
                self.header.used += 1;
            }
        }
    }

    /// Forgets a label and its rows (its slot can be reused).
    pub fn drop_label(&mut self, label: u16) {
        if let Some(l) = self.labels.get_mut(usize::from(label)) {
            *l = LabelSlot::EMPTY;
        }
        let keep: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.hash != 0 && e.label != label)
            .copied()
            .collect();
        self.entries.fill(Entry::EMPTY);
        self.header.used = 0;
        for e in keep {
            if let Some((i, false)) = find_slot(self.entries, e.hash, e.label, e.ident()) {
                self.entries[i] = e;
                self.header.used += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Owned {
        header: MapHeader,
        labels: Vec<LabelSlot>,
        entries: Vec<Entry>,
    }

    impl Owned {
        fn new(labels: usize, entries: usize) -> Self {
            let mut o = Owned {
                header: MapHeader::default(),
                labels: vec![LabelSlot::EMPTY; labels],
                entries: vec![Entry::EMPTY; entries],
            };
            o.map().reset(0x5eed);
            o
        }
        fn map(&mut self) -> VersionMapMut<'_> {
            VersionMapMut {
                header: &mut self.header,
                labels: &mut self.labels,
                entries: &mut self.entries,
            }
        }
    }

    fn ver(v: u64) -> Version {
        Version { v, ts: v as i64 * 10 }
    }

    #[test]
    fn label_syntax() {
        assert!(valid_label("parameters") && valid_label("a.b:c-d_1") && valid_label(&"x".repeat(64)));
        assert!(!valid_label("") && !valid_label("has space") && !valid_label(&"x".repeat(65)) && !valid_label("é"));
    }

    #[test]
    fn versions_only_move_forward() {
        let mut o = Owned::new(4, 64);
        let mut m = o.map();
        let l = m.ensure_label("parameters").unwrap_or(u16::MAX);
        assert_eq!(m.view().lookup("parameters", b"WAFCONFIG"), Lookup::Unseen);
        assert_eq!(m.view().lookup("nope", b"x"), Lookup::UnknownLabel);
        m.bump_row(l, b"WAFCONFIG", ver(10));
        m.bump_all(l, ver(10));
        m.bump_row(l, b"WAFCONFIG", ver(5));
        m.bump_all(l, ver(5));
        assert_eq!(m.view().lookup("parameters", b"WAFCONFIG"), Lookup::Found(ver(10)));
        assert_eq!(m.view().all("parameters"), Some(ver(10)));
        m.bump_row(l, b"WAFCONFIG", ver(11));
        assert_eq!(m.view().lookup("parameters", b"WAFCONFIG"), Lookup::Found(ver(11)));
        assert_eq!(m.ensure_label("parameters"), Ok(l));
    }

    #[test]
    fn truncate_moves_every_row() {
        let mut o = Owned::new(4, 64);
        let mut m = o.map();
        let l = m.ensure_label("t").unwrap_or(u16::MAX);
        m.bump_row(l, b"a", ver(3));
        m.raise_floor(l, ver(7));
        assert_eq!(m.view().lookup("t", b"a"), Lookup::Found(ver(7)));
        assert_eq!(m.view().lookup("t", b"never"), Lookup::Found(ver(7)));
        m.bump_row(l, b"a", ver(9));
        assert_eq!(m.view().lookup("t", b"a"), Lookup::Found(ver(9)));
        let rows: Vec<_> = m.view().rows(l).map(|(e, v)| (e.ident().to_vec(), v)).collect();
        assert_eq!(rows, vec![(b"a".to_vec(), ver(9))]);
    }

    #[test]
    fn a_full_map_never_reports_an_older_version() {
        // 100 slots, 1000 distinct rows changed in random-ish order, each several times.
        let mut o = Owned::new(4, 100);
        let mut m = o.map();
        let l = m.ensure_label("p").unwrap_or(u16::MAX);
        let mut truth = std::collections::HashMap::new();
        let mut v = 0u64;
        let mut x = 12345u64;
        for _ in 0..5000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = format!("row-{}", (x >> 33) % 1000);
            v += 1;
            m.bump_row(l, id.as_bytes(), ver(v));
            truth.insert(id, v);
            assert!(m.header.used as usize <= 100 * HIGH_WATER_EIGHTHS / 8 + 1);
        }
        for (id, true_v) in &truth {
            match m.view().lookup("p", id.as_bytes()) {
                Lookup::Found(got) => assert!(got.v >= *true_v, "{id}: {} < {}", got.v, true_v),
                other => panic!("{id}: {other:?}"),
            }
        }
        assert!(m.header.evictions > 0);
        // Recent rows are still exact.
        let last = truth.iter().max_by_key(|(_, v)| **v).map(|(k, v)| (k.clone(), *v));
        if let Some((id, v)) = last {
            assert_eq!(m.view().lookup("p", id.as_bytes()), Lookup::Found(ver(v)));
        }
    }

    #[test]
    fn long_identifiers_are_exact_by_hash() {
        let mut o = Owned::new(2, 16);
        let mut m = o.map();
        let l = m.ensure_label("x").unwrap_or(u16::MAX);
        let a = "a".repeat(40);
        let b = format!("{}b", "a".repeat(39));
        m.bump_row(l, a.as_bytes(), ver(1));
        m.bump_row(l, b.as_bytes(), ver(2));
        assert_eq!(m.view().lookup("x", a.as_bytes()), Lookup::Found(ver(1)));
        assert_eq!(m.view().lookup("x", b.as_bytes()), Lookup::Found(ver(2)));
        assert!(m.view().rows(l).all(|(e, _)| e.is_truncated()));
    }

    #[test]
    fn labels_are_bounded_and_reusable() {
        let mut o = Owned::new(2, 16);
        let mut m = o.map();
        assert!(m.ensure_label("a").is_ok() && m.ensure_label("b").is_ok());
        assert_eq!(m.ensure_label("c"), Err(MapError::TooManyLabels(2)));
        assert_eq!(m.ensure_label(&"x".repeat(65)), Err(MapError::LabelTooLong));
        let a = m.ensure_label("a").unwrap_or(u16::MAX);
        m.bump_row(a, b"1", ver(1));
        m.drop_label(a);
        assert_eq!(m.header.used, 0);
        assert!(m.ensure_label("c").is_ok());
    }

    #[test]
    fn labels_do_not_share_rows() {
        let mut o = Owned::new(4, 32);
        let mut m = o.map();
        let a = m.ensure_label("a").unwrap_or(u16::MAX);
        let b = m.ensure_label("b").unwrap_or(u16::MAX);
        m.bump_row(a, b"1", ver(5));
        assert_eq!(m.view().lookup("b", b"1"), Lookup::Unseen);
        m.bump_row(b, b"1", ver(6));
        assert_eq!(m.view().lookup("a", b"1"), Lookup::Found(ver(5)));
    }
}
