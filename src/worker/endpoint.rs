//! The relay worker's side of its WebSocket/HTTP endpoint.
//!
//! The endpoint (crate `changerelay-endpoint`) runs on a thread of its own
//! and never calls Postgres. This module, on the worker's main thread:
//! starts it from the settings; publishes each applied batch (history rows
//! and moved versions), the worker's status and the tokens; and answers the
//! endpoint's requests (version maps, history after a cursor), each in a
//! subtransaction so that nothing a client asks for can stop the worker.
//! Ordering contract: a batch is published before any request that arrives
//! after it is answered, because both happen on this thread in that order.

use super::persist::Fresh;
use crate::gucs::{self, AuthMode};
use crate::shmem::{self, WorkerState};
use crate::sql::cursors::{self, CursorProblem};
use crate::sql::history;
use crate::sql::{select_all, versions};
use changerelay_core::apply::VersionUpdates;
use changerelay_core::cursor::Cursor;
use changerelay_core::filter::Filter;
use changerelay_core::history::ChangeView;
use changerelay_endpoint as ep;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Time a loop turn spends answering requests before decoding again.
const TURN_BUDGET: Duration = Duration::from_millis(20);
/// Status is republished at least this often (lag moves without batches).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Tokens are reloaded at least this often.
const TOKENS_EVERY: Duration = Duration::from_secs(1);

/// (consuming, state, last event id, head event id, labels generation).
type StatusKey = (bool, u32, u64, u64, u64);

pub struct Link {
    endpoint: ep::Endpoint,
    port: ep::WorkerPort,
    /// The token generation last loaded, when, and what was published.
    tokens_seen: Option<(u64, Instant, Vec<ep::Token>)>,
    /// What the last published status showed (see `publish_status`), and when.
    last_status: Option<(StatusKey, Instant)>,
    /// Bumped whenever `labels` is reloaded.
    labels_generation: u64,
    labels: Vec<String>,
    labels_stale: bool,
    /// The cursor after everything applied; None until first read.
    head: Option<Cursor>,
    /// Requests taken from the endpoint, not answered yet.
    backlog: std::collections::VecDeque<ep::Request>,
}

/// Starts the endpoint when `changerelay.port` is not 0. Failures are
/// logged and leave the worker running without an endpoint.
pub fn start() -> Option<Link> {
    let port = gucs::port();
    if port == 0 {
        set_endpoint_state(EndpointState::Off);
        return None;
    }
    let listen = match ep::listen::resolve(&gucs::listen_addresses(), port) {
        Ok(l) => l,
        Err(e) => return failed(&e, "Fix changerelay.listen_addresses and restart the server."),
    };
    let auth = match gucs::auth() {
        AuthMode::Token => ep::Auth::Token,
        AuthMode::Trust if ep::listen::all_loopback(&listen) => ep::Auth::Trust,
        AuthMode::Trust => {
            return failed(
                "changerelay.auth = trust is refused because changerelay.listen_addresses is not loopback only",
                "Use changerelay.auth = token, or listen on localhost only.",
            )
        }
    };
    let tls = match gucs::endpoint_tls() {
        None => None,
        Some((cert, key)) if cert.is_empty() || key.is_empty() => {
            return failed(
                "changerelay.ssl_cert_file and changerelay.ssl_key_file must be set together",
                "Set both (PEM files), or neither for plain HTTP on loopback.",
            )
        }
        Some((cert, key)) => Some(ep::TlsFiles {
            cert_chain: cert.into(),
            private_key: key.into(),
        }),
    };
    let config = ep::Config {
        listen,
        max_clients: gucs::max_clients(),
        max_unauthenticated: gucs::max_unauthenticated(),
        max_per_address: gucs::max_connections_per_address(),
        auth_timeout: gucs::auth_timeout(),
        client_buffer: gucs::client_buffer_bytes(),
        auth,
        tls,
        allow_plain_token_auth_on_network: gucs::allow_plaintext_tokens(),
        allowed_origins: gucs::allowed_origins(),
        allowed_hosts: gucs::allowed_hosts(),
        debug_panic_path: gucs::debug_endpoint_panic(),
        ..ep::Config::default()
    };
    match ep::start(config) {
        Ok((endpoint, port)) => {
            let addrs: Vec<String> = endpoint.local_addrs().iter().map(ToString::to_string).collect();
            log!("pg_changerelay relay: endpoint listening on {}", addrs.join(", "));
            set_endpoint_state(EndpointState::Listening);
            Some(Link {
                endpoint,
                port,
                tokens_seen: None,
                last_status: None,
                labels_generation: 0,
                labels: Vec::new(),
                labels_stale: true,
                head: None,
                backlog: std::collections::VecDeque::new(),
            })
        }
        Err(e) => failed(
            &e,
            "Check changerelay.listen_addresses, changerelay.port and the TLS settings; the worker decodes on.",
        ),
    }
}

fn failed(message: &str, hint: &str) -> Option<Link> {
    warning!("pg_changerelay relay: endpoint not started: {message}. {hint}");
    set_endpoint_state(EndpointState::Failed);
    None
}

#[derive(Clone, Copy)]
pub enum EndpointState {
    Off = 0,
    Listening = 1,
    Failed = 2,
}

pub fn set_endpoint_state(state: EndpointState) {
    if let Some(s) = shmem::shared() {
        s.status.endpoint.store(state as u32, Ordering::Release);
    }
}

impl Link {
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.port.wake_fd()
    }

    pub fn shutdown(self) {
        set_endpoint_state(EndpointState::Off);
        self.endpoint.shutdown();
    }

    /// Publishes a committed, applied batch. `fresh`: its history rows not
    /// published before (a batch decoded again after a restart has none),
    /// moved into the message rather than copied; `None` when the batch had
    /// too many to publish.
    pub fn publish_batch(&mut self, fresh: Option<Fresh>, updates: &VersionUpdates) {
        let (system_id, timeline) = cursors::cluster();
        let rows_omitted = fresh.is_none();
        let fresh = fresh.unwrap_or_default();
        let metadata: std::collections::HashMap<u64, String> = fresh.metadata.into_iter().collect();
        let changes = fresh
            .rows
            .into_iter()
            .filter_map(|r| match r.view() {
                Ok(mut view) => {
                    view.metadata = metadata.get(&r.event_id).cloned();
                    Some(change_row(view, system_id, timeline))
                }
                Err(e) => {
                    warning!(
                        "pg_changerelay relay: a history row of event {} is undecodable: {e}",
                        r.event_id
                    );
                    None
                }
            })
            .collect();
        let deltas = updates.deltas();
        let whole: Vec<String> = deltas
            .iter()
            .filter(|d| d.whole_label)
            .map(|d| d.label.clone())
            .collect();
        let maps = if whole.is_empty() {
            Vec::new()
        } else {
            BackgroundWorker::transaction(move || {
                whole
                    .iter()
                    .filter_map(|l| versions::version_map_for_endpoint(l, true).map(|m| (l.clone(), m)))
                    .collect::<Vec<_>>()
            })
        };
        let versions = deltas
            .into_iter()
            .map(|d| {
                let data = maps
                    .iter()
                    .find(|(l, _)| *l == d.label)
                    .map(|(_, (_, data))| data.clone())
                    .unwrap_or(d.data);
                ep::VersionDelta { label: d.label, data }
            })
            .collect();
        if updates.labels.keys().any(|l| !self.labels.contains(l)) {
            self.labels_stale = true;
        }
        if let Some(c) = updates.last_commit {
            self.head = Some(Cursor {
                system_id,
                timeline,
                event_id: c.event_id.max(self.head.map_or(0, |h| h.event_id)),
                pos: Cursor::END,
            });
        }
        let head = self.head.map(|h| h.encode()).unwrap_or_default();
        self.endpoint.publish(ep::ToEndpoint::Batch(ep::Batch {
            head,
            changes,
            versions,
            rows_omitted,
        }));
    }

    /// Between batches: reloads labels and tokens when they changed,
    /// publishes the status, answers pending requests. False when the
    /// endpoint thread has ended (the caller drops the link and starts a new
    /// endpoint).
    /// `decoded`: where decoding has read up to; requests yield to decoding
    /// as soon as WAL past it is flushed.
    pub fn tick(&mut self, installed: bool, decoded: u64) -> bool {
        if !self.endpoint.is_running() {
            return false;
        }
        if installed && (self.labels_stale || self.head.is_none()) {
            let (labels, head) = BackgroundWorker::transaction(|| (load_labels(), cursors::current_now()));
            self.labels = labels;
            self.labels_generation += 1;
            // None until the publish gate knows what the standbys have.
            self.head = head.or(self.head);
            self.labels_stale = false;
        }
        self.refresh_tokens(installed);
        self.publish_status();
        if self.port.drain_wake() == ep::Wake::Closed {
            return false;
        }
        while let Some(r) = self.port.try_recv() {
            self.backlog.push_back(r);
        }
        if self.backlog.is_empty() {
            return true;
        }
        if !installed {
            while let Some(r) = self.backlog.pop_front() {
                self.reply(
                    r.id,
                    Err(internal("pg_changerelay is not installed in this database yet")),
                );
            }
            return true;
        }
        // Requests get a slice of each turn, each under a time limit, and
        // give way as soon as there is WAL to decode (at least one request is
        // answered per turn), so that live changes are never queued behind
        // them; the rest wait for the next turn.
        let labels = self.labels.clone();
        let limit = gucs::request_timeout();
        let turn_ends = Instant::now() + TURN_BUDGET;
        let backlog = std::panic::AssertUnwindSafe(&mut self.backlog);
        let replies = BackgroundWorker::transaction(move || {
            let backlog = backlog;
            let mut replies = Vec::new();
            while let Some(r) = backlog.0.pop_front() {
                let result = guarded(|| crate::txn::with_statement_timeout(limit, || answer(&r.kind, &labels)));
                replies.push((r.id, result));
                // SAFETY: reading the WAL flush position from shared memory.
                let new_wal = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) } > decoded;
                if new_wal || Instant::now() >= turn_ends {
                    break;
                }
            }
            replies
        });
        for (id, result) in replies {
            self.reply(id, result);
        }
        if !self.backlog.is_empty() {
            // SAFETY: setting our own latch makes the next wait return at once.
            unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
        }
        true
    }

    fn reply(&self, id: u64, result: Result<ep::Reply, ep::ReplyError>) {
        self.endpoint.publish(ep::ToEndpoint::Reply { id, result });
    }

    /// Reloads the tokens when a commit changed them, and at least every
    /// [`TOKENS_EVERY`] (privileges of their creators change without
    /// touching the table); publishes them when they differ.
    fn refresh_tokens(&mut self, installed: bool) {
        let generation = shmem::shared().map_or(0, |s| s.status.tokens_generation.load(Ordering::Acquire));
        let due = match &self.tokens_seen {
            Some((g, at, _)) => *g != generation || at.elapsed() >= TOKENS_EVERY,
            None => true,
        };
        if !due {
            return;
        }
        let tokens = if installed {
            BackgroundWorker::transaction(load_tokens)
        } else {
            Vec::new()
        };
        let changed = self.tokens_seen.as_ref().is_none_or(|(_, _, last)| *last != tokens);
        if changed {
            self.endpoint.publish(ep::ToEndpoint::Tokens(tokens.clone()));
        }
        self.tokens_seen = Some((generation, Instant::now(), tokens));
    }

    /// Publishes the status when what clients see of it changed (state,
    /// applied position, labels), and every second for the lag. Runs every
    /// loop turn, so the message is only built when it is due.
    fn publish_status(&mut self) {
        let Some(shared) = shmem::shared() else { return };
        let st = &shared.status;
        let state = WorkerState::from_u32(st.state.load(Ordering::Acquire));
        let consuming = state == WorkerState::Streaming && gucs::enabled();
        let last_event_id = st.last_event_id.load(Ordering::Acquire);
        let key = (
            consuming,
            state as u32,
            last_event_id,
            self.head.map_or(0, |h| h.event_id),
            self.labels_generation,
        );
        let due = match &self.last_status {
            Some((last, at)) => *last != key || at.elapsed() >= STATUS_EVERY,
            None => true,
        };
        if !due {
            return;
        }
        // SAFETY: reading the WAL flush position from shared memory.
        let flushed = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
        self.endpoint.publish(ep::ToEndpoint::Status(ep::Status {
            consuming,
            state: state.as_str().to_string(),
            last_event_id,
            lag_bytes: flushed.saturating_sub(st.confirmed_lsn.load(Ordering::Acquire)),
            head: self.head.map(|h| h.encode()).unwrap_or_default(),
            labels: self.labels.clone(),
        }));
        self.last_status = Some((key, Instant::now()));
    }
}

/// Runs `f` in a subtransaction; a Postgres error becomes an `Internal`
/// reply instead of ending the worker. The client is told what kind of
/// failure it was, the server log gets the error itself (it may name
/// tables or values the client has no business seeing).
fn guarded(f: impl FnOnce() -> Result<ep::Reply, ep::ReplyError>) -> Result<ep::Reply, ep::ReplyError> {
    let mut reply_error = None;
    let result = crate::txn::try_subtransaction(|| match f() {
        Ok(reply) => Ok(reply),
        // A refusal (bad cursor, unknown label) is an answer: keep the
        // subtransaction's work, there is none to undo.
        Err(e) if e.kind != ep::ReplyErrorKind::Internal => {
            reply_error = Some(e);
            Err(String::new())
        }
        Err(e) => Err(e.message),
    });
    match (result, reply_error) {
        (Ok(reply), _) => Ok(reply),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => {
            let cancelled = e.contains("statement timeout");
            log!("pg_changerelay relay: an endpoint request failed: {e}");
            Err(internal(if cancelled {
                "the request took longer than changerelay.request_timeout"
            } else {
                "the request failed on the server (see its log)"
            }))
        }
    }
}

fn internal(message: &str) -> ep::ReplyError {
    ep::ReplyError {
        kind: ep::ReplyErrorKind::Internal,
        message: message.to_string(),
    }
}

fn answer(kind: &ep::RequestKind, labels: &[String]) -> Result<ep::Reply, ep::ReplyError> {
    match kind {
        ep::RequestKind::VersionMap { label } => {
            match versions::version_map_for_endpoint(label, labels.contains(label)) {
                Some((json, _)) => Ok(ep::Reply::VersionMap { json }),
                None => Err(ep::ReplyError {
                    kind: ep::ReplyErrorKind::UnknownLabel,
                    message: format!("label \"{label}\" is not tracked"),
                }),
            }
        }
        ep::RequestKind::History {
            since,
            labels: wanted,
            max,
            filter,
            max_bytes,
            role,
        } => {
            let read = || read_history(since, wanted, *max, *max_bytes, filter.as_deref());
            if *role == 0 {
                read()
            } else {
                // A token reads with its creator's privileges (grants and
                // row-level security apply).
                crate::sql::access::as_role(pg_sys::Oid::from(*role), read)
            }
        }
    }
}

fn read_history(
    since: &str,
    labels: &[String],
    max: u32,
    max_bytes: u32,
    filter: Option<&str>,
) -> Result<ep::Reply, ep::ReplyError> {
    let after = cursors::validate_cursor(since).map_err(|p| {
        let kind = match p {
            CursorProblem::Malformed(_) => ep::ReplyErrorKind::Malformed,
            CursorProblem::Foreign { .. } => ep::ReplyErrorKind::Foreign,
            CursorProblem::Expired { .. } | CursorProblem::Ahead => ep::ReplyErrorKind::Expired,
            CursorProblem::Gap { .. } => ep::ReplyErrorKind::Gap,
            CursorProblem::Diverged { .. } => ep::ReplyErrorKind::Diverged,
        };
        ep::ReplyError {
            kind,
            message: p.message(),
        }
    })?;
    let filter = match filter {
        None => None,
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|e| e.to_string())
                .and_then(|v| Filter::parse(&v))
                .map_err(|e| ep::ReplyError {
                    kind: ep::ReplyErrorKind::Malformed,
                    message: format!("invalid filter: {e}"),
                })?,
        ),
    };
    if let Some(label) = history::without_history(labels).first() {
        return Err(ep::ReplyError {
            kind: ep::ReplyErrorKind::NoHistory,
            message: format!(
                "{}: it is tracked with history => false (versions only)",
                history::no_history_message(label)
            ),
        });
    }
    let max = max.clamp(1, ep::MAX_HISTORY_ROWS);
    let req = history::Request {
        after,
        labels: Some(labels.to_vec()),
        max_events: max as i32,
        filter,
        max_bytes: max_bytes.max(1) as usize,
        upto: cursors::published_cap(),
        until: None,
    };
    let rows = history::read_rows(&req).map_err(|e| internal(&e))?;
    let bytes: usize = rows.iter().map(history::text_bytes).sum();
    let more = rows.len() as u32 >= max || bytes >= req.max_bytes;
    let (system_id, timeline) = cursors::cluster();
    let head = match rows.last() {
        Some(r) if more => history::cursor_after(r).encode(),
        // Before the publish gate knows what the standbys have (just after a
        // server start), nothing was read: the read point is `since`.
        _ => cursors::current_now().unwrap_or(after).encode(),
    };
    let rows = rows.into_iter().map(|v| change_row(v, system_id, timeline)).collect();
    Ok(ep::Reply::History { rows, head, more })
}

/// The endpoint's shape of a history row.
pub(super) fn change_row(v: ChangeView, system_id: u64, timeline: u32) -> ep::ChangeRow {
    ep::ChangeRow {
        cursor: Cursor {
            system_id,
            timeline,
            event_id: v.event_id,
            pos: v.pos,
        }
        .encode(),
        event_id: v.event_id,
        seq: v.seq as i32,
        ts: v.ts,
        xid: i64::from(v.xid),
        label: v.label,
        table_name: v.table_name,
        op: v.op.to_string(),
        identifier: v.identifier,
        key: v.key,
        new: v.new,
        old: v.old,
        metadata: v.metadata,
        relid: v.relid,
        audience: None,
    }
}

/// Every label that is tracked or has versions.
fn load_labels() -> Vec<String> {
    select_all(
        "SELECT label FROM changerelay.tracked_tables UNION SELECT label FROM changerelay.label_versions ORDER BY 1",
        &[],
        |r| Ok(r.get::<String>(1)?.unwrap_or_default()),
    )
    .unwrap_or_else(|e| {
        warning!("pg_changerelay relay: could not read labels: {e}");
        Vec::new()
    })
}

/// The tokens, each narrowed to the labels its creator may read now (a
/// creator that lost SELECT, or a label that gained a table the creator can
/// not read, takes the label out; a dropped creator, every label) and, since
/// version maps are per label, without labels whose row-level security
/// would hide rows from the creator (create_token() refuses those).
fn load_tokens() -> Vec<ep::Token> {
    select_all(
        "SELECT t.name, t.secret_sha256, e.labels, t.rows_allowed, t.creator,
                ARRAY(SELECT tt.rel::oid FROM changerelay.tracked_tables tt WHERE tt.label = ANY (e.labels))
           FROM changerelay.tokens t,
                LATERAL (SELECT ARRAY(SELECT l FROM pg_catalog.unnest(t.labels) AS l
                                       WHERE coalesce(changerelay.label_readable(l, t.creator), false)
                                         AND NOT changerelay.label_row_security_applies(l, t.creator)) AS labels) e
          ORDER BY t.name",
        &[],
        |r| {
            let hash = r.get::<Vec<u8>>(2)?.unwrap_or_default();
            Ok(ep::Token {
                name: r.get::<String>(1)?.unwrap_or_default(),
                sha256: hash.try_into().unwrap_or([0u8; 32]),
                labels: r.get::<Vec<String>>(3)?.unwrap_or_default(),
                rows: r.get::<bool>(4)?.unwrap_or(false),
                role: r.get::<pg_sys::Oid>(5)?.map_or(0, |o| o.to_u32()),
                readable: r
                    .get::<Vec<pg_sys::Oid>>(6)?
                    .unwrap_or_default()
                    .into_iter()
                    .map(|o| o.to_u32())
                    .collect(),
            })
        },
    )
    .unwrap_or_else(|e| {
        warning!("pg_changerelay relay: could not read tokens (no token is accepted until they load): {e}");
        Vec::new()
    })
}
