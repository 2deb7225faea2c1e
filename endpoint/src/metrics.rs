//! Endpoint counters and the Prometheus text exposition of `GET /metrics`.
//!
//! Counters are atomics (relaxed): the endpoint thread bumps most of them, but socket wrappers (which hyper
//! requires to be `Send`) and the worker's [`crate::Endpoint::publish`] (channel gaps) bump some too.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::api::Status;

/// Why a connection was refused or cut; each has a `changerelay_endpoint_refusals_total{reason=..}` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    MaxClients,
    PerAddress,
    /// Evicted (oldest unauthenticated) to make room for a new connection.
    UnauthenticatedLimit,
    AuthTimeout,
    Origin,
    Host,
    SlowClient,
    WriteTimeout,
    PingTimeout,
    /// A one-shot request refused with 429: its token has too many requests queued.
    RequestsPerToken,
    TlsHandshake,
}

const REFUSALS: [(Refusal, &str); 11] = [
    (Refusal::MaxClients, "max_clients"),
    (Refusal::PerAddress, "per_address"),
    (Refusal::UnauthenticatedLimit, "unauthenticated_limit"),
    (Refusal::AuthTimeout, "auth_timeout"),
    (Refusal::Origin, "origin"),
    (Refusal::Host, "host"),
    (Refusal::SlowClient, "slow_client"),
    (Refusal::WriteTimeout, "write_timeout"),
    (Refusal::PingTimeout, "ping_timeout"),
    (Refusal::RequestsPerToken, "requests_per_token"),
    (Refusal::TlsHandshake, "tls_handshake"),
];

#[derive(Default)]
pub(crate) struct Metrics {
    /// Batches the worker published (queued or left out as a gap), and the change rows they carried (a
    /// batch with `rows_omitted` carries none).
    pub batches_received: AtomicU64,
    pub changes_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Batches the worker could not queue (replaced by a gap marker).
    pub channel_gaps: AtomicU64,
    /// Change feeds sent back to the history by a gap or a batch without its rows.
    pub catch_ups: AtomicU64,
    /// Version maps fetched again after a gap.
    pub version_refetches: AtomicU64,
    refusals: [AtomicU64; REFUSALS.len()],
}

pub(crate) fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// The running totals `GET /status` shows.
pub(crate) struct Totals {
    pub batches: u64,
    pub changes: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
}

/// Gauges the hub knows, for [`Metrics::render`].
pub(crate) struct Gauges<'a> {
    pub connections: usize,
    pub unauthenticated: usize,
    pub requests_in_flight: usize,
    pub requests_queued: usize,
    pub status: Option<&'a Status>,
}

impl Metrics {
    pub fn sent(&self, bytes: usize) {
        bump(&self.messages_sent, 1);
        bump(&self.bytes_sent, bytes as u64);
    }

    /// A batch the worker published, with its change rows.
    pub fn received(&self, changes: usize) {
        bump(&self.batches_received, 1);
        bump(&self.changes_received, changes as u64);
    }

    pub fn totals(&self) -> Totals {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            batches: load(&self.batches_received),
            changes: load(&self.changes_received),
            messages_sent: load(&self.messages_sent),
            bytes_sent: load(&self.bytes_sent),
        }
    }

    pub fn refused(&self, why: Refusal) {
        if let Some(i) = REFUSALS.iter().position(|(r, _)| *r == why) {
            bump(&self.refusals[i], 1);
        }
    }

    pub fn refusals(&self, why: Refusal) -> u64 {
        REFUSALS
            .iter()
            .position(|(r, _)| *r == why)
            .map_or(0, |i| self.refusals[i].load(Ordering::Relaxed))
    }

    /// The whole exposition, HELP and TYPE lines included.
    pub fn render(&self, g: &Gauges<'_>) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        metric(
            "changerelay_endpoint_clients",
            "gauge",
            "Open client connections of all kinds.",
            g.connections as u64,
        );
        metric(
            "changerelay_endpoint_unauthenticated_clients",
            "gauge",
            "Open connections that have not authenticated yet.",
            g.unauthenticated as u64,
        );
        metric(
            "changerelay_endpoint_worker_requests_in_flight",
            "gauge",
            "Requests sent to the relay worker and not answered yet.",
            g.requests_in_flight as u64,
        );
        metric(
            "changerelay_endpoint_worker_requests_queued",
            "gauge",
            "Requests waiting for a per-token or global request slot.",
            g.requests_queued as u64,
        );
        let counters = [
            (
                "batches_received",
                "Batches the relay worker published (those left out as gaps included).",
                load(&self.batches_received),
            ),
            (
                "changes_received",
                "Change rows in the batches the relay worker published (a batch sent without its rows counts none).",
                load(&self.changes_received),
            ),
            (
                "messages_sent",
                "Messages (WebSocket messages, SSE events, HTTP responses) sent.",
                load(&self.messages_sent),
            ),
            ("bytes_sent", "Payload bytes sent to clients.", load(&self.bytes_sent)),
            (
                "slow_client_disconnects",
                "Clients cut because their send queue exceeded client_buffer.",
                self.refusals(Refusal::SlowClient),
            ),
            (
                "auth_failures",
                "Requests refused for a missing or unknown token.",
                load(&self.auth_failures),
            ),
            (
                "rejected_connections",
                "Connections refused with 503 because max_clients were open.",
                self.refusals(Refusal::MaxClients),
            ),
            (
                "channel_gaps",
                "Batches the worker could not queue for the endpoint (subscribers caught up from history).",
                load(&self.channel_gaps),
            ),
            (
                "catch_ups",
                "Change feeds sent back to the history by a gap or a batch without its rows.",
                load(&self.catch_ups),
            ),
            (
                "version_refetches",
                "Version maps fetched again after a gap.",
                load(&self.version_refetches),
            ),
        ];
        for (name, help, value) in counters {
            metric(&format!("changerelay_endpoint_{name}_total"), "counter", help, value);
        }
        let name = "changerelay_endpoint_refusals_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections or requests refused or cut, by reason.\n# TYPE {name} counter"
        );
        for (i, (_, reason)) in REFUSALS.iter().enumerate() {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", load(&self.refusals[i]));
        }
        let (lag, last, consuming) = g
            .status
            .map_or((0, 0, 0), |s| (s.lag_bytes, s.last_event_id, u64::from(s.consuming)));
        let mut metric = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        metric(
            "changerelay_worker_lag_bytes",
            "WAL bytes the relay worker is behind.",
            lag,
        );
        metric(
            "changerelay_worker_last_event_id",
            "Event id (commit LSN) of the last applied change.",
            last,
        );
        metric(
            "changerelay_worker_consuming",
            "1 while the relay worker consumes its slot.",
            consuming,
        );
        out
    }
}
