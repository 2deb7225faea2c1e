//! The messages exchanged between the relay worker and the sinks thread.
//!
//! The worker sends [`ToSinks`] (the sinks to run, each committed batch, answers to reads) and receives
//! [`FromSinks`] (reads of history, progress reports). A position is `(event_id, pos)`, the order of the change
//! history; [`END`] as `pos` means "after the whole transaction".

use std::sync::Arc;

use crate::config::Target;

/// A position in the change history: `(event_id, pos)`.
pub type Position = (u64, u32);

/// `pos` of a position after every row of its transaction.
pub const END: u32 = u32::MAX;

/// One change to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkRow {
    pub label: Arc<str>,
    pub event_id: u64,
    /// Position in the history (orders rows; part of the cursor).
    pub pos: u32,
    /// Position of the change in its transaction: with `event_id`, the change's identity in the broker.
    pub seq: u32,
    /// The change object as the endpoint sends it (with its cursor).
    pub json: Arc<str>,
}

impl SinkRow {
    pub fn position(&self) -> Position {
        (self.event_id, self.pos)
    }

    /// The change's identity, `(event_id, seq)`.
    pub fn id(&self) -> (u64, u32) {
        (self.event_id, self.seq)
    }
}

/// A sink as the worker knows it from `changerelay.sinks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Row id in `changerelay.sinks`: a sink dropped and created again under the same name is another sink.
    pub id: i64,
    pub name: String,
    pub target: Target,
    pub labels: Vec<String>,
    /// Where delivery resumes (the position the worker recorded last); the broker's last entry decides what
    /// after it is already there.
    pub start: Position,
    /// This cluster's system identifier (NATS message ids; foreign streams are recognised by it).
    pub system_id: u64,
    /// Whether committed batches may be handed to this sink as they are (its creator reads every table of its
    /// labels without row-level security); otherwise it reads everything through the worker.
    pub live: bool,
    /// Why the sink may not deliver now (its creator lost the right to read a label): it waits, reporting this.
    pub paused: Option<String>,
}

/// A committed batch: the rows of every label some sink wants, with event ids in `(after, head]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveBatch {
    pub after: u64,
    pub head: u64,
    /// `None`: the batch was too large to hand over; sinks read it from the history.
    pub rows: Option<Vec<SinkRow>>,
}

/// What the worker tells the sinks thread.
#[derive(Debug, Clone)]
pub enum ToSinks {
    /// Every sink to run (a full replacement).
    Configs(Vec<SinkConfig>),
    Batch(Arc<LiveBatch>),
    /// The answer to [`FromSinks::Read`] `id`.
    Page {
        id: u64,
        result: Result<Page, PageError>,
    },
}

/// Rows of a sink's labels after a position, in history order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub rows: Vec<SinkRow>,
    /// How far the read reached: the last row's position when `more`, otherwise the position after everything
    /// applied (later rows arrive in later batches).
    pub head: Position,
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    /// History after the position was pruned (past `changerelay.max_consumer_lag`): continue from `horizon`.
    Expired { horizon: u64 },
    /// Anything else; the read is tried again later.
    Failed(String),
}

/// What the sinks thread asks the worker, or tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromSinks {
    /// Rows of `labels` after `after`, at most `max`, read as the sink's creator.
    Read {
        id: u64,
        sink: String,
        labels: Vec<String>,
        after: Position,
        max: u32,
    },
    Report(Report),
}

/// A sink's progress and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub sink: String,
    pub sink_id: i64,
    pub state: State,
    /// Every change of the sink's labels at or before this position is in the broker.
    pub delivered: Position,
    /// Changes written since the thread started, and writes the broker rejected as already there.
    pub written: u64,
    pub duplicates: u64,
    /// The last error, while it lasts (cleared once a write succeeds).
    pub error: Option<String>,
}

/// What a sink is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    /// Delivering, or caught up and waiting for changes.
    Streaming,
    /// A failure; trying again after a backoff.
    Retrying,
    /// Its creator may not read a label; waiting for that to change.
    Paused,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Streaming => "streaming",
            State::Retrying => "retrying",
            State::Paused => "paused",
        }
    }
}
