//! The messages exchanged between the relay worker and the endpoint.
//!
//! The worker publishes [`ToEndpoint`] values in commit order on one channel; the endpoint asks the worker for
//! anything that needs the database with a [`Request`] and gets the answer back as [`ToEndpoint::Reply`] on the
//! same ordered channel. JSON fields hold JSON texts produced by Postgres and are embedded verbatim.

/// A question for the worker's main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Echoed back in [`ToEndpoint::Reply`].
    pub id: u64,
    pub kind: RequestKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// The full version map of a label: answer with [`Reply::VersionMap`].
    VersionMap { label: String },
    /// Changes strictly after `since` (a cursor the endpoint decoded successfully), at most `max`, in commit
    /// order, of these labels, filtered by `filter` (JSON text of a tenant filter): answer with [`Reply::History`].
    History {
        since: String,
        labels: Vec<String>,
        max: u32,
        filter: Option<String>,
    },
}

/// Everything the worker tells the endpoint, in one ordered stream.
#[derive(Debug, Clone)]
pub enum ToEndpoint {
    Status(Status),
    /// Full replacement of the accepted tokens.
    Tokens(Vec<Token>),
    /// A committed batch the worker applied, in commit order.
    Batch(Batch),
    /// The answer to [`Request`] `id`.
    Reply {
        id: u64,
        result: Result<Reply, ReplyError>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub consuming: bool,
    pub state: String,
    pub last_event_id: u64,
    pub lag_bytes: u64,
    /// Cursor after everything applied.
    pub head: String,
    /// Every known label.
    pub labels: Vec<String>,
}

/// An accepted access token. Only its SHA-256 is known to the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub sha256: [u8; 32],
    /// Labels this token may read.
    pub labels: Vec<String>,
    /// Whether the token may read changes (rows); false: versions only.
    pub rows: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Cursor after this batch.
    pub head: String,
    pub changes: Vec<ChangeRow>,
    pub versions: Vec<VersionDelta>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionDelta {
    pub label: String,
    /// JSON object of the moved entries only: `{"all":{"v":..,"ts":..},"<identifier>":{"v":..,"ts":..}}`.
    pub data: String,
}

/// One change of the history, as `changerelay.changes()` returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeRow {
    /// Position after this row.
    pub cursor: String,
    pub event_id: u64,
    pub seq: i32,
    pub ts: i64,
    pub xid: i64,
    pub label: String,
    pub table_name: String,
    pub op: String,
    pub identifier: Option<String>,
    /// JSON texts.
    pub key: Option<String>,
    pub new: Option<String>,
    pub old: Option<String>,
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `{"label":..,"data":{..}}`, sent to clients verbatim.
    VersionMap { json: String },
    /// `head`: the cursor of the read point. `more`: `max` rows were returned, ask again from the last row's cursor.
    History {
        rows: Vec<ChangeRow>,
        head: String,
        more: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError {
    pub kind: ReplyErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyErrorKind {
    /// The cursor is not a cursor.
    Malformed,
    /// The cursor belongs to another cluster (or timeline).
    Foreign,
    /// The history after the cursor was pruned (or the cursor is ahead of the server).
    Expired,
    UnknownLabel,
    Internal,
}
