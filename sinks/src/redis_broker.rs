//! Redis Streams: one stream per label, each change an entry with id `<event_id>-<seq>` and one field,
//! `change`, its JSON.
//!
//! A stream only accepts ids above its last one, so a change written again is refused ("equal or smaller
//! than the target stream top item") rather than added twice, and ids are strictly increasing. A batch is
//! written by one Lua script: Redis runs it atomically, in order, and it stops at the first refusal other
//! than that one, so nothing is ever written after a change that was not.

use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use redis::{AsyncConnectionConfig, Client, RedisError, Value};

use crate::api::SinkRow;
use crate::broker::{parse_id, Broker, BrokerError, ErrorKind, Written};
use crate::config::Target;

/// KEYS: the streams. ARGV[1]: MAXLEN (0: none); then per change: its key's index in KEYS, its id, its JSON.
/// Returns {added, already there} or, when a write is refused, {added, already there, the error}.
const WRITE: &str = r"
local added, dups = 0, 0
local maxlen = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local key = KEYS[tonumber(ARGV[i])]
  local r
  if maxlen > 0 then
    r = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, ARGV[i + 1], 'change', ARGV[i + 2])
  else
    r = redis.pcall('XADD', key, ARGV[i + 1], 'change', ARGV[i + 2])
  end
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'equal or smaller than the target stream top item', 1, true) then
      dups = dups + 1
    else
      return {added, dups, r.err}
    end
  else
    added = added + 1
  end
end
return {added, dups}
";

pub struct RedisBroker {
    conn: MultiplexedConnection,
    target: Target,
    system_id: u64,
    script: redis::Script,
}

fn failure(e: &RedisError, target: &Target) -> BrokerError {
    let kind = if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        ErrorKind::Unreachable
    } else {
        ErrorKind::Refused
    };
    BrokerError::new(kind, format!("redis {}: {e}", target.shown_url()))
}

impl Broker for RedisBroker {
    async fn connect(target: &Target, system_id: u64) -> Result<Self, BrokerError> {
        let client = Client::open(target.url.as_str()).map_err(|e| failure(&e, target))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(target.timeout))
            .set_response_timeout(Some(target.timeout));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| failure(&e, target))?;
        Ok(RedisBroker {
            conn,
            target: target.clone(),
            system_id,
            script: redis::Script::new(WRITE),
        })
    }

    async fn last(&mut self, destination: &str) -> Result<Option<(u64, u32)>, BrokerError> {
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(destination)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| failure(&e, &self.target))?;
        let Some(entry) = reply.ids.first() else {
            return Ok(None);
        };
        let foreign = |why: String| {
            BrokerError::new(
                ErrorKind::Foreign,
                format!("stream {destination} holds entries pg_changerelay of this cluster did not write: {why}"),
            )
        };
        let id = parse_id(&entry.id, None).map_err(foreign)?;
        // The entry id carries no system id: the cursor in the change does.
        let change: Option<String> = entry.get("change");
        let system = change
            .as_deref()
            .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
            .and_then(|v| v.get("cursor").and_then(|c| c.as_str()).map(str::to_string))
            .and_then(|c| changerelay_core::cursor::Cursor::decode(&c).ok())
            .map(|c| c.system_id);
        match system {
            Some(s) if s == self.system_id => Ok(Some(id)),
            Some(s) => Err(foreign(format!(
                "its last entry {} is of system {s}; this is system {}",
                entry.id, self.system_id
            ))),
            None => Err(foreign(format!(
                "its last entry {} has no change with a cursor",
                entry.id
            ))),
        }
    }

    async fn write(&mut self, rows: &[SinkRow]) -> Written {
        let mut keys: Vec<String> = Vec::new();
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(self.target.maxlen.unwrap_or(0));
        for row in rows {
            let key = self.target.destination(&row.label);
            let index = match keys.iter().position(|k| *k == key) {
                Some(i) => i,
                None => {
                    keys.push(key);
                    keys.len() - 1
                }
            };
            invocation
                .arg(index + 1)
                .arg(format!("{}-{}", row.event_id, row.seq))
                .arg(row.json.as_ref());
        }
        for key in &keys {
            invocation.key(key);
        }
        let reply: Vec<Value> = match invocation.invoke_async(&mut self.conn).await {
            Ok(v) => v,
            Err(e) => {
                return Written {
                    error: Some(failure(&e, &self.target)),
                    ..Written::default()
                }
            }
        };
        let number = |i: usize| {
            reply
                .get(i)
                .cloned()
                .and_then(|v| redis::from_redis_value::<u64>(v).ok())
                .unwrap_or(0) as usize
        };
        let (added, duplicates) = (number(0), number(1));
        let error = reply
            .get(2)
            .cloned()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .map(|e| {
                BrokerError::new(
                    ErrorKind::Refused,
                    format!("redis {} refused a write: {e}", self.target.shown_url()),
                )
            });
        Written {
            done: (added + duplicates).min(rows.len()),
            duplicates,
            error,
            stored_after_refusal: None,
        }
    }
}
