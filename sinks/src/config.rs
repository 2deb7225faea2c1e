//! A sink's kind, URL and options, checked when the sink is created (`changerelay.create_sink()` calls
//! [`Target::parse`] in the creating session, so a malformed URL or option is an error there, not a failure
//! found later by the worker).

use std::time::Duration;

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Nats,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }
}

/// Where and how a sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    pub url: String,
    /// Redis: a label's stream is `key_prefix` + label (default `changerelay:`).
    pub key_prefix: String,
    /// Redis: trim each stream to about this many entries (`XADD … MAXLEN ~ n`); none by default.
    pub maxlen: Option<u64>,
    /// NATS: the JetStream stream (default `CHANGERELAY`), created with file storage when missing.
    pub stream: String,
    /// NATS: a label's subject is `subject_prefix.label` (default `changerelay`).
    pub subject_prefix: String,
    /// Changes per write (default 500).
    pub batch: usize,
    /// Longest wait for the broker to connect or answer (default 10 s).
    pub timeout: Duration,
}

const OPTIONS: &str = "key_prefix, maxlen (redis); stream, subject_prefix (nats); batch, timeout_ms (both)";

impl Target {
    /// Checks `kind`, `url` and `options` (a JSON object, or null) and fills in the defaults.
    pub fn parse(kind: &str, url: &str, options: &Value) -> Result<Target, String> {
        let kind = match kind {
            "redis" => Kind::Redis,
            "nats" => Kind::Nats,
            other => return Err(format!("unknown sink kind \"{other}\": use \"redis\" or \"nats\"")),
        };
        check_url(kind, url)?;
        let mut t = Target {
            kind,
            url: url.to_string(),
            key_prefix: "changerelay:".into(),
            maxlen: None,
            stream: "CHANGERELAY".into(),
            subject_prefix: "changerelay".into(),
            batch: 500,
            timeout: Duration::from_secs(10),
        };
        let options = match options {
            Value::Null => return Ok(t),
            Value::Object(map) => map,
            _ => return Err("options must be a JSON object".into()),
        };
        for (name, value) in options {
            match (kind, name.as_str()) {
                (Kind::Redis, "key_prefix") => t.key_prefix = text(name, value, 200)?,
                (Kind::Redis, "maxlen") => t.maxlen = Some(number(name, value, 1, u64::MAX)?),
                (Kind::Nats, "stream") => {
                    t.stream = text(name, value, 200)?;
                    if t.stream.is_empty() || t.stream.contains(['.', '*', '>', ' ', '\t', '/', '\\']) {
                        return Err(format!(
                            "option stream \"{}\" is not a JetStream stream name (no '.', '*', '>', '/', spaces)",
                            t.stream
                        ));
                    }
                }
                (Kind::Nats, "subject_prefix") => {
                    t.subject_prefix = text(name, value, 200)?;
                    let p = &t.subject_prefix;
                    if p.is_empty() || p.contains(['*', '>', ' ', '\t']) || p.starts_with('.') || p.ends_with('.') {
                        return Err(format!("option subject_prefix \"{p}\" is not a NATS subject"));
                    }
                }
                (_, "batch") => t.batch = number(name, value, 1, 10_000)? as usize,
                (_, "timeout_ms") => t.timeout = Duration::from_millis(number(name, value, 100, 600_000)?),
                _ => {
                    return Err(format!(
                        "unknown option \"{name}\" for a {} sink (options: {OPTIONS})",
                        kind.as_str()
                    ))
                }
            }
        }
        Ok(t)
    }

    /// Where a label's changes go: the Redis stream key or the NATS subject.
    pub fn destination(&self, label: &str) -> String {
        match self.kind {
            Kind::Redis => format!("{}{label}", self.key_prefix),
            Kind::Nats => format!("{}.{label}", self.subject_prefix),
        }
    }

    /// The URL without its password, for messages.
    pub fn shown_url(&self) -> String {
        redact(&self.url)
    }
}

fn check_url(kind: Kind, url: &str) -> Result<(), String> {
    let shown = redact(url);
    match kind {
        Kind::Redis => {
            if !(url.starts_with("redis://") || url.starts_with("redis+unix://") || url.starts_with("unix://")) {
                return Err(format!(
                    "invalid redis URL \"{shown}\": use redis://[user:password@]host[:port][/db] \
                     (rediss:// is not supported: this build has no TLS for Redis)"
                ));
            }
            redis::Client::open(url).map_err(|e| format!("invalid redis URL \"{shown}\": {e}"))?;
        }
        Kind::Nats => {
            if !url.starts_with("nats://") {
                return Err(format!(
                    "invalid nats URL \"{shown}\": use nats://[user:password@]host[:port]"
                ));
            }
            let host = url["nats://".len()..].rsplit('@').next().unwrap_or("");
            if host.is_empty() || host.starts_with(':') {
                return Err(format!("invalid nats URL \"{shown}\": no host"));
            }
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("invalid nats URL \"{shown}\": {e}"))?;
        }
    }
    Ok(())
}

/// `scheme://user:secret@host` becomes `scheme://user:***@host`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((cred, host)) => {
            let user = cred.split_once(':').map_or(cred, |(u, _)| u);
            let masked = if cred.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_string()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => url.to_string(),
    }
}

fn text(name: &str, v: &Value, max: usize) -> Result<String, String> {
    match v.as_str() {
        Some(s) if s.len() <= max && !s.chars().any(char::is_control) => Ok(s.to_string()),
        _ => Err(format!(
            "option {name} must be a string of at most {max} printable characters"
        )),
    }
}

fn number(name: &str, v: &Value, min: u64, max: u64) -> Result<u64, String> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("option {name} must be a whole number from {min} to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_options() {
        let t = Target::parse("redis", "redis://127.0.0.1:6379", &Value::Null).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.key_prefix.as_str(), t.maxlen, t.batch), ("changerelay:", None, 500));
        assert_eq!(t.destination("orders"), "changerelay:orders");
        let n = Target::parse(
            "nats",
            "nats://127.0.0.1:4222",
            &json!({"stream": "CDC", "subject_prefix": "app.cdc", "batch": 50}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((n.stream.as_str(), n.batch), ("CDC", 50));
        assert_eq!(n.destination("orders"), "app.cdc.orders");
    }

    #[test]
    fn refuses_what_it_can_not_use() {
        let bad = [
            ("kafka", "kafka://x", Value::Null, "unknown sink kind"),
            ("redis", "http://x", Value::Null, "invalid redis URL"),
            ("redis", "rediss://x", Value::Null, "rediss:// is not supported"),
            ("redis", "redis://[::1", Value::Null, "invalid redis URL"),
            ("nats", "127.0.0.1:4222", Value::Null, "invalid nats URL"),
            ("nats", "nats://", Value::Null, "invalid nats URL"),
            ("redis", "redis://x", json!([1]), "JSON object"),
            (
                "redis",
                "redis://x",
                json!({"stream": "S"}),
                "unknown option \"stream\"",
            ),
            ("redis", "redis://x", json!({"batch": 0}), "batch must be"),
            (
                "nats",
                "nats://x",
                json!({"stream": "a.b"}),
                "not a JetStream stream name",
            ),
            (
                "nats",
                "nats://x",
                json!({"subject_prefix": "a.>"}),
                "not a NATS subject",
            ),
        ];
        for (kind, url, options, expected) in bad {
            match Target::parse(kind, url, &options) {
                Ok(t) => panic!("{kind} {url} {options} accepted: {t:?}"),
                Err(e) => assert!(e.contains(expected), "{kind} {url} {options}: {e}"),
            }
        }
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        let e = Target::parse("nats", "http://u:secret@h", &Value::Null)
            .err()
            .unwrap_or_default();
        assert!(e.contains("http://u:***@h") && !e.contains("secret"), "{e}");
    }
}
