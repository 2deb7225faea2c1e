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
    ///
    /// `max` is at most [`MAX_HISTORY_ROWS`]. `max_bytes` is a byte budget for the page: stop reading once the
    /// rows returned so far reach it (the sum of the lengths of their text fields), but always return at least
    /// one row when there is one, however large; `more` then says whether rows were left. `role` is the OID of
    /// the token's creator (0 under `Auth::Trust`): read the history as that role, so its table privileges and
    /// row-level security apply, and fill in [`ChangeRow::relid`] and [`ChangeRow::audience`].
    History {
        since: String,
        labels: Vec<String>,
        max: u32,
        filter: Option<String>,
        max_bytes: u32,
        role: u32,
    },
}

/// Most rows the endpoint asks for in one history request (and returns in one long-poll answer).
pub const MAX_HISTORY_ROWS: u32 = 1000;

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
    /// OID of the role that created the token: history is read as this role, and a row whose
    /// [`ChangeRow::audience`] is `Some` goes to this token only when it lists this role.
    pub role: u32,
    /// OIDs of the tables whose rows this token may receive (the worker computes them from the creator's
    /// privileges); a change of any other table is never sent to it. Order does not matter.
    pub readable: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Cursor after this batch.
    pub head: String,
    pub changes: Vec<ChangeRow>,
    pub versions: Vec<VersionDelta>,
    /// The batch had changes but the worker left them out of `changes` (a huge transaction): every change
    /// subscriber catches up from the history instead, from its own cursor. `versions` are still delivered.
    pub rows_omitted: bool,
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
    /// OID of the table the change belongs to: it goes only to tokens whose [`Token::readable`] holds it.
    pub relid: u32,
    /// `Some(roles)`: row-level security allows this row only to these roles (OIDs, evaluated by the worker);
    /// it goes only to tokens whose [`Token::role`] is listed. `None`: no per-row restriction.
    pub audience: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `{"label":..,"data":{..}}`, sent to clients verbatim.
    VersionMap { json: String },
    /// `head`: the cursor of the read point. `more`: rows were left (`max` rows or `max_bytes` reached): ask again
    /// from the last row's cursor.
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
    /// The relay lost changes after the cursor (its slot was lost, invalidated or ahead of the history, or the
    /// server was promoted without it): the client must reload.
    Gap,
    /// The cursor is on a timeline that diverged from the server's (a failover to a standby that lacked changes
    /// the cursor may have seen): the client must reload.
    Diverged,
    UnknownLabel,
    /// A label tracked with `history => false`: it has versions, no changes.
    NoHistory,
    Internal,
}
