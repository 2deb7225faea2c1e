//! NATS JetStream: one stream (file storage, created when missing, capturing `subject_prefix.>`), each change a
//! message on `subject_prefix.<label>` with header `Nats-Msg-Id: <system_id>:<event_id>:<seq>`.
//!
//! JetStream drops a message whose id it saw within the stream's duplicate window (2 minutes by default), and
//! a sink resumes after the last message of each subject, so a change is stored once even when a retry comes
//! later than the window. Messages are published in order on one connection and their acknowledgements
//! awaited in order; a change larger than the server or the stream accepts stops the batch before it is sent,
//! so a refusal can not leave a later change stored before an earlier one. A refusal for a stream limit
//! (messages, bytes) can, when the limit changes while publishes are in flight: every acknowledgement is
//! awaited, such a gap is reported, and the sink writes one change at a time after a refusal until a write
//! goes through, so that raising a limit resumes delivery without one.

use async_nats::jetstream::{self, context::Context, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;

use crate::api::SinkRow;
use crate::broker::{parse_id, Broker, BrokerError, ErrorKind, Written};
use crate::config::Target;

pub struct NatsBroker {
    /// Kept so the connection lives as long as the broker.
    _client: Client,
    js: Context,
    stream: stream::Stream,
    target: Target,
    system_id: u64,
    /// The largest message the server and the stream accept.
    max_message: usize,
}

fn unreachable(target: &Target, what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::new(
        ErrorKind::Unreachable,
        format!("nats {}: {what}: {e}", target.shown_url()),
    )
}

fn refused(target: &Target, what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::new(ErrorKind::Refused, format!("nats {}: {what}: {e}", target.shown_url()))
}

impl Broker for NatsBroker {
    async fn connect(target: &Target, system_id: u64) -> Result<Self, BrokerError> {
        let options = ConnectOptions::new()
            .connection_timeout(target.timeout)
            .request_timeout(Some(target.timeout))
            .name("pg_changerelay sink");
        let client = async_nats::connect_with_options(target.url.as_str(), options)
            .await
            .map_err(|e| unreachable(target, "could not connect", e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(target.timeout);
        let config = stream::Config {
            name: target.stream.clone(),
            subjects: vec![format!("{}.>", target.subject_prefix)],
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let mut stream = js.get_or_create_stream(config).await.map_err(|e| {
            use async_nats::jetstream::context::CreateStreamErrorKind as K;
            match e.kind() {
                K::TimedOut => unreachable(target, "JetStream did not answer", e),
                K::JetStreamUnavailable => refused(target, "JetStream is not enabled on the server (-js)", e),
                _ => refused(target, &format!("could not get or create stream {}", target.stream), e),
            }
        })?;
        let stream_limit = stream
            .info()
            .await
            .map(|i| i.config.max_message_size)
            .map_err(|e| unreachable(target, "stream info", e))?;
        let server_limit = client.server_info().max_payload;
        let max_message = match usize::try_from(stream_limit) {
            Ok(n) if n > 0 => n.min(server_limit),
            _ => server_limit,
        };
        Ok(NatsBroker {
            _client: client,
            js,
            stream,
            target: target.clone(),
            system_id,
            max_message,
        })
    }

    async fn last(&mut self, destination: &str) -> Result<Option<(u64, u32)>, BrokerError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
        let message = match self.stream.get_last_raw_message_by_subject(destination).await {
            Ok(m) => m,
            Err(e) if e.kind() == K::NoMessageFound => return Ok(None),
            Err(e) => return Err(unreachable(&self.target, &format!("last message of {destination}"), e)),
        };
        let id = message.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string());
        let foreign = |why: String| {
            BrokerError::new(
                ErrorKind::Foreign,
                format!("subject {destination} holds messages pg_changerelay of this cluster did not write: {why}"),
            )
        };
        match id {
            Some(id) => parse_id(&id, Some(self.system_id)).map(Some).map_err(foreign),
            None => Err(foreign(format!("message {} has no Nats-Msg-Id", message.sequence))),
        }
    }

    async fn write(&mut self, rows: &[SinkRow]) -> Written {
        let mut out = Written::default();
        let mut acks = Vec::with_capacity(rows.len());
        let mut stop = None;
        for row in rows {
            let id = format!("{}:{}:{}", self.system_id, row.event_id, row.seq);
            let subject = self.target.destination(&row.label);
            // Headers and subject count against the limit too.
            if row.json.len() + id.len() + subject.len() + 64 > self.max_message {
                stop = Some(refused(
                    &self.target,
                    &format!("change {id} of label {}", row.label),
                    format_args!(
                        "{} bytes, more than the {} bytes a message may have (max_payload, the stream's max_msg_size)",
                        row.json.len(),
                        self.max_message
                    ),
                ));
                break;
            }
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let payload = Bytes::copy_from_slice(row.json.as_bytes());
            match self.js.publish_with_headers(subject, headers, payload).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    stop = Some(unreachable(&self.target, "publish", e));
                    break;
                }
            }
        }
        // Every acknowledgement is awaited, also after a refusal: a later message stored anyway (a limit
        // raised, or space freed, while the publishes were in flight) leaves the refused ones behind the
        // subject's last message, which the sink must report rather than skip silently.
        let mut failed = false;
        for (i, ack) in acks.into_iter().enumerate() {
            match ack.await {
                Ok(a) if !failed => {
                    out.done += 1;
                    if a.duplicate {
                        out.duplicates += 1;
                    }
                }
                Ok(a) => {
                    if !a.duplicate && out.stored_after_refusal.is_none() {
                        let first = &rows[out.done];
                        out.stored_after_refusal = Some(format!(
                            "nats {}: change {}:{} of label {} was refused, then change {}:{} was stored after it \
                             (stream sequence {}): the stream misses the refused changes",
                            self.target.shown_url(),
                            first.event_id,
                            first.seq,
                            first.label,
                            rows[i].event_id,
                            rows[i].seq,
                            a.sequence
                        ));
                    }
                }
                Err(e) if !failed => {
                    use async_nats::jetstream::context::PublishErrorKind as K;
                    let error = match e.kind() {
                        K::TimedOut | K::BrokenPipe => unreachable(&self.target, "no acknowledgement", e),
                        K::StreamNotFound => refused(
                            &self.target,
                            "publish",
                            format_args!("no JetStream stream captures {}.*", self.target.subject_prefix),
                        ),
                        _ => refused(&self.target, "publish refused", e),
                    };
                    failed = true;
                    out.error = Some(error);
                }
                Err(_) => {}
            }
        }
        if out.error.is_none() {
            out.error = stop;
        }
        out
    }
}
