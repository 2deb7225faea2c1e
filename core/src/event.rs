//! The event model: what one output message of the plugin says.
//!
//! Strings are `Cow` so the plugin can borrow them from Postgres memory while
//! encoding, and the binary decoder can hand back owned copies.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// One output message of the plugin.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Event<'a> {
    Begin(TxnHeader),
    Change(Change<'a>),
    Truncate(Truncate<'a>),
    Message(Message<'a>),
    Metadata(MetadataEvent<'a>),
    Commit(Commit<'a>),
}

/// What every record of one transaction shares.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnHeader {
    pub xid: u32,
    /// LSN of the commit record.
    pub event_id: u64,
    /// Commit time in microseconds since the Unix epoch.
    pub commit_us: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Change<'a> {
    pub txn: TxnHeader,
    pub seq: u32,
    pub op: Op,
    pub schema: Cow<'a, str>,
    pub table: Cow<'a, str>,
    /// Replica identity columns; `None` when the table has no identity.
    pub key: Option<Row<'a>>,
    pub new: Option<Row<'a>>,
    pub old: Option<Row<'a>>,
    /// Columns whose TOASTed value did not change and so was not decoded.
    pub unchanged_toast: Vec<Cow<'a, str>>,
    /// With the `tracked` option: how the relay worker files this change.
    pub tracking: Option<Tracking<'a>>,
}

/// Where a change of a tracked table lands in the version map.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Tracking<'a> {
    /// OID of the table (for privilege checks on its history).
    pub relid: u32,
    pub label: Cow<'a, str>,
    /// The row's identifier (the value of the identifier column, as text).
    pub identifier: Option<Cow<'a, str>>,
    /// For an update that changed the identifier: the old one.
    pub old_identifier: Option<Cow<'a, str>>,
    /// The row's identifier could not be read (a delete whose old row does
    /// not carry the identifier column): every row of the label must move.
    pub unknown_identifier: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Truncate<'a> {
    pub txn: TxnHeader,
    pub seq: u32,
    /// Schema-qualified names.
    pub tables: Vec<Cow<'a, str>>,
    pub cascade: bool,
    pub restart_identity: bool,
    /// With the `tracked` option: the truncated tracked tables.
    pub tracked: Vec<TruncatedTable<'a>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTable<'a> {
    pub relid: u32,
    /// Schema-qualified name.
    pub table: Cow<'a, str>,
    pub label: Cow<'a, str>,
}

impl Truncate<'_> {
    /// Labels of the truncated tracked tables, each once, in order.
    pub fn labels(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for t in &self.tracked {
            if !out.contains(&t.label.as_ref()) {
                out.push(&t.label);
            }
        }
        out
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Message<'a> {
    /// Present for transactional messages.
    pub txn: Option<TxnHeader>,
    pub lsn: u64,
    pub prefix: Cow<'a, str>,
    pub content: MessageContent<'a>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum MessageContent<'a> {
    Text(Cow<'a, str>),
    /// Content that is not valid UTF-8.
    Bytes(Cow<'a, [u8]>),
}

/// A `changerelay.metadata` message: `json` is one JSON object, verbatim.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MetadataEvent<'a> {
    pub txn: TxnHeader,
    pub json: Cow<'a, str>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Commit<'a> {
    pub txn: TxnHeader,
    /// Change records (insert/update/delete/truncate) this stream emitted.
    pub changes: u32,
    /// The transaction's metadata objects merged, later keys winning.
    pub metadata: Option<Cow<'a, str>>,
}

pub type Row<'a> = Vec<Column<'a>>;

impl<'a> Scalar<'a> {
    /// The text an identifier column's value is filed under (`None` for NULL).
    pub fn identifier_text(&self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Null => None,
            Scalar::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            Scalar::Int(i) => Some(Cow::Owned(i.to_string())),
            Scalar::Float4(f) => Some(Cow::Owned(f.to_string())),
            Scalar::Float(f) => Some(Cow::Owned(f.to_string())),
            Scalar::Numeric(t) | Scalar::Json(t) | Scalar::Text(t) => Some(t.clone()),
            Scalar::Omitted(_) => None,
            Scalar::Date(_) | Scalar::Timestamp(_) | Scalar::TimestampTz(_) | Scalar::Uuid(_) => {
                Some(Cow::Owned(self.typed_text().unwrap_or_default()))
            }
        }
    }

    /// The text of a date, timestamp or uuid, as Postgres writes it in ISO
    /// style and UTC; `None` for other scalars.
    pub fn typed_text(&self) -> Option<String> {
        let mut out = String::with_capacity(32);
        self.write_typed_text(&mut out).then_some(out)
    }

    /// Writes what [`Scalar::typed_text`] returns; false (nothing written) for other scalars.
    pub fn write_typed_text(&self, out: &mut impl crate::pgtext::TextOut) -> bool {
        match self {
            Scalar::Date(d) => crate::pgtext::write_date(*d, out),
            Scalar::Timestamp(us) => crate::pgtext::write_timestamp(*us, false, out),
            Scalar::TimestampTz(us) => crate::pgtext::write_timestamp(*us, true, out),
            Scalar::Uuid(b) => crate::pgtext::write_uuid(b, out),
            _ => return false,
        }
        true
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Column<'a> {
    pub name: Cow<'a, str>,
    pub value: Value<'a>,
}

/// A column value typed as far as JSON can carry it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Scalar(Scalar<'a>),
    /// An array: `dims` are the lengths of each dimension (empty for an
    /// empty array), `elems` the elements in row-major order. Elements are
    /// scalars, so a frame can not nest deeper than this.
    Array {
        dims: Vec<u32>,
        elems: Vec<Scalar<'a>>,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// float4, kept as f32 so it prints as Postgres prints it.
    /// Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity".
    Float4(f32),
    Float(f64),
    /// numeric, as its exact text.
    Numeric(Cow<'a, str>),
    /// json or jsonb text, embedded as JSON.
    Json(Cow<'a, str>),
    /// Any other type: its text output.
    Text(Cow<'a, str>),
    /// A value left out because it is larger than the plugin's
    /// `max_value_size`: its size in bytes (as stored, before any output
    /// conversion). JSON shows it as [`OMITTED_MARKER`]. Added last, so
    /// frames written before it existed still decode.
    Omitted(u64),
    /// date: days since 2000-01-01 (`i32::MIN`/`MAX` are -infinity/infinity).
    Date(i32),
    /// timestamp without time zone: microseconds since 2000-01-01 00:00.
    Timestamp(i64),
    /// timestamptz: microseconds since 2000-01-01 00:00 UTC.
    TimestampTz(i64),
    Uuid([u8; 16]),
}

/// The key of the object that stands in for a value the plugin left out:
/// `{"$changerelay":"omitted","bytes":N}`.
pub const OMITTED_MARKER: &str = "$changerelay";

impl<'a> Value<'a> {
    pub const NULL: Value<'static> = Value::Scalar(Scalar::Null);
}

/// Most dimensions a Postgres array can have (MAXDIM).
pub const MAX_ARRAY_DIMS: usize = 6;
