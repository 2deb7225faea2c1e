//! Endpoint counters and the Prometheus text exposition of `GET /metrics`.
//!
//! Everything runs on the endpoint's single thread, so the counters are plain `Cell`s.

use std::cell::Cell;
use std::fmt::Write;

use crate::api::Status;

#[derive(Default)]
pub(crate) struct Metrics {
    pub messages_sent: Cell<u64>,
    pub bytes_sent: Cell<u64>,
    pub slow_disconnects: Cell<u64>,
    pub auth_failures: Cell<u64>,
    pub rejected: Cell<u64>,
}

pub(crate) fn bump(c: &Cell<u64>, by: u64) {
    c.set(c.get().wrapping_add(by));
}

impl Metrics {
    pub fn sent(&self, bytes: usize) {
        bump(&self.messages_sent, 1);
        bump(&self.bytes_sent, bytes as u64);
    }

    /// The whole exposition, HELP and TYPE lines included.
    pub fn render(&self, clients: usize, status: Option<&Status>) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        metric(
            "changerelay_endpoint_clients",
            "gauge",
            "Open client connections of all kinds.",
            clients as u64,
        );
        let counters = [
            (
                "messages_sent",
                "Messages (WebSocket messages, SSE events, HTTP responses) sent.",
                &self.messages_sent,
            ),
            ("bytes_sent", "Payload bytes sent to clients.", &self.bytes_sent),
            (
                "slow_client_disconnects",
                "Clients cut because their send queue exceeded client_buffer.",
                &self.slow_disconnects,
            ),
            (
                "auth_failures",
                "Requests refused for a missing or unknown token.",
                &self.auth_failures,
            ),
            (
                "rejected_connections",
                "Connections refused with 503 because max_clients were open.",
                &self.rejected,
            ),
        ];
        for (name, help, cell) in counters {
            metric(
                &format!("changerelay_endpoint_{name}_total"),
                "counter",
                help,
                cell.get(),
            );
        }
        let (lag, last, consuming) =
            status.map_or((0, 0, 0), |s| (s.lag_bytes, s.last_event_id, u64::from(s.consuming)));
        metric(
            "changerelay_worker_lag_bytes",
            "gauge",
            "WAL bytes the relay worker is behind.",
            lag,
        );
        metric(
            "changerelay_worker_last_event_id",
            "gauge",
            "Event id (commit LSN) of the last applied change.",
            last,
        );
        metric(
            "changerelay_worker_consuming",
            "gauge",
            "1 while the relay worker consumes its slot.",
            consuming,
        );
        out
    }
}
