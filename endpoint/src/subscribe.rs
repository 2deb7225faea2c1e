//! Starting subscriptions: WebSocket `subscribe`/`unsubscribe` commands, SSE streams and long-polls.
//!
//! Everything a client may get wrong is checked here, before anything is asked of the worker: the JSON, the
//! labels (allowed to the token, known to the worker), the cursor, the filter, and the per-connection limits.

use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::api::MAX_HISTORY_ROWS;
use crate::auth::Principal;
use crate::batch::Pos;
use crate::fanout::{history_request, page_bytes};
use crate::feed::{Feed, Phase};
use crate::hub::{ClientId, Hub, Kind, LongPoll, PollOutcome, WsSubs};
use crate::messages;
use crate::params::{parse_filter_value, parse_since, valid_label, MAX_LABELS};
use crate::requests::{Bucket, Waiting};

/// Per WebSocket connection: labels with versions, and change feeds.
const MAX_VERSION_LABELS: usize = 1024;
const MAX_FEEDS: usize = 64;
/// Requests one WebSocket connection may have outstanding at the worker.
const MAX_OUTSTANDING: usize = 1024;

struct CmdError {
    code: &'static str,
    message: String,
    label: Option<String>,
}

fn err(code: &'static str, message: impl Into<String>) -> CmdError {
    CmdError {
        code,
        message: message.into(),
        label: None,
    }
}

fn err_label(code: &'static str, message: impl Into<String>, label: &str) -> CmdError {
    CmdError {
        code,
        message: message.into(),
        label: Some(label.to_string()),
    }
}

impl Hub {
    pub(crate) fn become_ws(&mut self, id: ClientId) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.kind = Kind::Ws(WsSubs::default());
        }
    }

    /// Handles one text message of a WebSocket client; errors are answered on its outbox.
    pub(crate) fn ws_command(&mut self, id: ClientId, text: &str) {
        let Some(outbox) = self.clients.get(&id).map(|c| c.outbox.clone()) else {
            return;
        };
        let result = match serde_json::from_str::<Value>(text) {
            Err(e) => Err(err("bad_json", format!("message is not JSON: {e}"))),
            Ok(Value::Object(cmd)) => match cmd.get("op").and_then(Value::as_str) {
                Some("subscribe") => self.ws_subscribe(id, &cmd),
                Some("unsubscribe") => self.ws_unsubscribe(id, &cmd),
                Some(op) => Err(err(
                    "unknown_op",
                    format!("unknown op {op:?}: use \"subscribe\" or \"unsubscribe\""),
                )),
                None => Err(err(
                    "bad_json",
                    "message needs \"op\": \"subscribe\" or \"unsubscribe\"",
                )),
            },
            Ok(_) => Err(err("bad_json", "messages must be JSON objects")),
        };
        if let Err(e) = result {
            outbox.data(messages::error(e.code, &e.message, e.label.as_deref()).into());
        }
    }

    fn ws_subscribe(&mut self, id: ClientId, cmd: &Map<String, Value>) -> Result<(), CmdError> {
        let labels = labels_of(cmd)?;
        let flag = |name: &str, default: bool| match cmd.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(err("bad_json", format!("\"{name}\" must be true or false"))),
        };
        let (versions, changes) = (flag("versions", true)?, flag("changes", false)?);
        if !versions && !changes {
            return Err(err(
                "bad_json",
                "subscribe needs \"versions\": true or \"changes\": true",
            ));
        }
        let who = self
            .clients
            .get(&id)
            .and_then(|c| c.who.clone())
            .ok_or_else(|| err("internal", "not authorised"))?;
        if let Some(l) = labels.iter().find(|l| !who.allows(l)) {
            return Err(err_label(
                "forbidden",
                format!("this token may not read label {l:?}"),
                l,
            ));
        }
        if changes && !who.rows {
            return Err(err("forbidden", "this token may read versions only, not changes"));
        }
        if let Some(l) = labels
            .iter()
            .find(|l| self.known_labels().is_some_and(|k| !k.contains(l)))
        {
            return Err(err_label("unknown_label", format!("unknown label {l:?}"), l));
        }
        let since = match cmd.get("since") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(parse_since(s).map_err(|m| err("bad_cursor", m))?),
            Some(_) => return Err(err("bad_cursor", "\"since\" must be a cursor string or null")),
        };
        let filter = match cmd.get("filter") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_filter_value(v).map_err(|m| err("bad_filter", m))?),
        };
        let head = self.head.clone();
        let Some(Kind::Ws(ws)) = self.clients.get(&id).map(|c| &c.kind) else {
            return Ok(());
        };
        if versions && ws.versions.len() + labels.len() > MAX_VERSION_LABELS {
            return Err(err(
                "too_large",
                format!("at most {MAX_VERSION_LABELS} labels with versions per connection"),
            ));
        }
        if changes && ws.feeds.len() >= MAX_FEEDS {
            return Err(err(
                "too_large",
                format!("at most {MAX_FEEDS} change subscriptions per connection"),
            ));
        }
        let outstanding = self.clients.get(&id).map_or(0, |c| c.outstanding);
        let needed = if versions { labels.len() } else { 0 } + usize::from(changes && since.is_some());
        if outstanding + needed > MAX_OUTSTANDING {
            return Err(err(
                "busy",
                "too many requests outstanding on this connection; wait for their answers",
            ));
        }
        let start = if changes { since.clone().or(head) } else { head };
        self.push(
            id,
            messages::subscribed("subscribed", &labels, Some(start.as_ref().map(|(c, _)| c.as_str()))),
        );
        if versions {
            for l in &labels {
                self.ask_version_map(id, l);
            }
        }
        if changes {
            let fid = self.with_ws(id, |ws| {
                drop_labels(ws, &labels, false);
                ws.next_feed += 1;
                ws.next_feed
            });
            let Some(fid) = fid else { return Ok(()) };
            let mut feed = Feed::new(labels, filter, start);
            if let Some((s, _)) = since {
                let kind = history_request(&feed, s, &who, MAX_HISTORY_ROWS, page_bytes(&self.cfg));
                let bucket = self.bucket_of(id);
                let rid = self
                    .request(kind, Waiting::Feed { client: id, feed: fid }, bucket)
                    .map_err(|m| err("internal", m))?;
                feed.phase = Phase::History(rid);
            }
            self.with_ws(id, |ws| ws.feeds.insert(fid, feed));
        }
        Ok(())
    }

    fn ws_unsubscribe(&mut self, id: ClientId, cmd: &Map<String, Value>) -> Result<(), CmdError> {
        let labels = labels_of(cmd)?;
        self.with_ws(id, |ws| drop_labels(ws, &labels, true));
        self.push(id, messages::subscribed("unsubscribed", &labels, None));
        Ok(())
    }

    fn push(&self, id: ClientId, text: String) {
        if let Some(c) = self.clients.get(&id) {
            c.outbox.data(text.into());
        }
    }

    fn with_ws<T>(&mut self, id: ClientId, f: impl FnOnce(&mut WsSubs) -> T) -> Option<T> {
        match self.clients.get_mut(&id).map(|c| &mut c.kind) {
            Some(Kind::Ws(ws)) => Some(f(ws)),
            _ => None,
        }
    }

    /// Starts a change feed for an SSE client (`poll` None) or a long-poll (`poll`: its `max` rows and
    /// deadline; its answer is bounded by `client_buffer` bytes); `Err` when the worker cannot be asked.
    pub(crate) fn start_feed(
        &mut self,
        id: ClientId,
        who: &Principal,
        feed: (Vec<String>, Option<(changerelay_core::filter::Filter, String)>),
        since: Option<(String, Pos)>,
        poll: Option<(u32, Instant)>,
    ) -> Result<Option<oneshot::Receiver<PollOutcome>>, String> {
        let mut f = Feed::new(feed.0, feed.1, since.clone().or_else(|| self.head.clone()));
        let max_bytes = self.cfg.client_buffer;
        if let Some((s, _)) = since {
            let kind = match poll {
                Some((max, _)) => history_request(&f, s, who, max, max_bytes),
                None => history_request(&f, s, who, MAX_HISTORY_ROWS, page_bytes(&self.cfg)),
            };
            let bucket = who.token_key().map_or(Bucket::Client(id), Bucket::Token);
            let rid = self.request(kind, Waiting::Feed { client: id, feed: 0 }, bucket)?;
            f.phase = Phase::History(rid);
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return Ok(None);
        };
        Ok(match poll {
            None => {
                c.kind = Kind::Sse(f);
                None
            }
            Some((max, deadline)) => {
                let (tx, rx) = oneshot::channel();
                c.kind = Kind::LongPoll(LongPoll {
                    feed: f,
                    max,
                    max_bytes,
                    deadline,
                    done: Some(tx),
                });
                Some(rx)
            }
        })
    }
}

/// The `labels` of a command: a non-empty array of valid labels, de-duplicated.
fn labels_of(cmd: &Map<String, Value>) -> Result<Vec<String>, CmdError> {
    let Some(Value::Array(items)) = cmd.get("labels") else {
        return Err(err("bad_json", "\"labels\" must be an array of label names"));
    };
    if items.len() > MAX_LABELS {
        return Err(err(
            "too_large",
            format!("at most {MAX_LABELS} labels per subscription"),
        ));
    }
    let mut labels: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let Some(l) = item.as_str() else {
            return Err(err("bad_json", "\"labels\" must be an array of strings"));
        };
        if !valid_label(l) {
            return Err(err_label("unknown_label", format!("invalid label {l:?}"), l));
        }
        if !labels.iter().any(|x| x == l) {
            labels.push(l.to_string());
        }
    }
    if labels.is_empty() {
        return Err(err("bad_json", "\"labels\" must name at least one label"));
    }
    Ok(labels)
}

/// Removes labels from a connection's change feeds (and, when `versions`, from its version subscriptions);
/// a feed left without labels ends.
fn drop_labels(ws: &mut WsSubs, labels: &[String], versions: bool) {
    if versions {
        for l in labels {
            ws.versions.remove(l);
        }
    }
    for feed in ws.feeds.values_mut() {
        feed.labels.retain(|l| !labels.contains(l));
    }
    ws.feeds.retain(|_, f| !f.labels.is_empty());
}
