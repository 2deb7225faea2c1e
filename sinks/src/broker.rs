//! What a sink needs of a broker, whichever it is: connect, find the last change a destination holds, and
//! write changes in order so that one already there is rejected instead of added again.

use std::future::Future;

use crate::api::SinkRow;
use crate::config::Target;

/// Why a broker operation failed. Every failure is retried after a backoff; the kind only decides what
/// `changerelay.sinks()` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Could not connect, or the connection broke or timed out.
    Unreachable,
    /// The broker answered but refused the write (read-only, out of memory, a stream limit, a message too
    /// large, no stream for the subject).
    Refused,
    /// The destination holds changes of another cluster (another system identifier).
    Foreign,
}

impl BrokerError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> BrokerError {
        BrokerError {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What one write did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Rows handled, from the first: added, or found already there. Rows after them were not written.
    pub done: usize,
    /// Of those, rows the broker already had.
    pub duplicates: usize,
    /// Why the write stopped before the end, if it did.
    pub error: Option<BrokerError>,
    /// Rows after the refused one that the broker stored anyway (its limits changed while a pipelined write
    /// was in flight): the refused rows are now behind their destination's last entry, a gap to report.
    pub stored_after_refusal: Option<String>,
}

/// A connected broker.
pub trait Broker: Sized {
    fn connect(target: &Target, system_id: u64) -> impl Future<Output = Result<Self, BrokerError>>;

    /// The `(event_id, seq)` of the last change `destination` holds, if any.
    fn last(&mut self, destination: &str) -> impl Future<Output = Result<Option<(u64, u32)>, BrokerError>>;

    /// Writes `rows` in order (each to its label's destination), stopping at the first row the broker refuses.
    /// A broker that pipelines may store a later row after a refused one only when its limits change while
    /// the write is in flight; it says so in `stored_after_refusal`.
    fn write(&mut self, rows: &[SinkRow]) -> impl Future<Output = Written>;
}

/// `<event_id>-<seq>` (a Redis stream entry id) or `<system_id>:<event_id>:<seq>` (a NATS message id) back
/// to `(event_id, seq)`; the system id must be ours.
pub fn parse_id(text: &str, system_id: Option<u64>) -> Result<(u64, u32), String> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    let (sys, e, s) = match (parts.as_slice(), system_id) {
        ([e, s], None) => (None, *e, *s),
        ([sys, e, s], Some(_)) => (Some(*sys), *e, *s),
        _ => return Err(format!("\"{text}\" is not an id pg_changerelay writes")),
    };
    let number = |t: &str| {
        t.parse::<u64>()
            .map_err(|_| format!("\"{text}\" is not an id pg_changerelay writes"))
    };
    if let (Some(sys), Some(ours)) = (sys, system_id) {
        let theirs = number(sys)?;
        if theirs != ours {
            return Err(format!("system {theirs} wrote it; this is system {ours}"));
        }
    }
    let seq = u32::try_from(number(s)?).map_err(|_| format!("\"{text}\": sequence out of range"))?;
    Ok((number(e)?, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_foreign_ones_are_named() {
        assert_eq!(parse_id("23803720-3", None), Ok((23_803_720, 3)));
        assert_eq!(parse_id("7:23803720:3", Some(7)), Ok((23_803_720, 3)));
        assert!(parse_id("8:1:0", Some(7)).is_err_and(|e| e.contains("system 8")));
        for bad in ["", "1", "a-b", "1-2-3", "1-99999999999"] {
            assert!(parse_id(bad, None).is_err(), "{bad}");
        }
    }
}
