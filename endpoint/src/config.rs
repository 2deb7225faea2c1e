//! Endpoint configuration: what the worker derives from its settings and passes to [`crate::start`].
//!
//! Every field says its default (from [`Config::default`]) and unit. [`Config::validate`] (run by `start`)
//! refuses combinations that would be unsafe or could not work.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    /// Every address is bound; failing to bind any of them fails [`crate::start`]. Default: 127.0.0.1, port 0
    /// (an ephemeral port; the worker sets the real addresses).
    pub listen: Vec<SocketAddr>,
    /// Open connections of all kinds, authenticated or not. Beyond it a new connection gets HTTP 503 with
    /// `Retry-After` (plain HTTP) or is closed (TLS). Each costs one file descriptor of the worker process.
    /// Default 512.
    pub max_clients: usize,
    /// Of those, connections that have not authenticated yet (no request on them presented a valid token, or
    /// under trust, asked for a feed or versions). When full, the OLDEST of them is closed to make room, so
    /// idle connections cannot lock out clients that authenticate at once. Default 64.
    pub max_unauthenticated: usize,
    /// Open connections from one remote IP address; beyond it a new one gets 429 (plain) or is closed (TLS).
    /// Default 64.
    pub max_per_address: usize,
    /// A connection must have authenticated within this time of being accepted (TLS handshake and request
    /// head included), else it is closed (after the response in progress, if any). Default 5 s.
    pub auth_timeout: Duration,
    /// Bytes queued for one client before it is cut as slow; also the byte bound of one long-poll answer and
    /// of the history pages read for a client. A single message larger than this still goes out when the
    /// client's queue is at most half full. Default 4 MiB.
    pub client_buffer: usize,
    pub auth: Auth,
    /// How often idle change subscribers get a checkpoint. Default 5 s.
    pub checkpoint_every: Duration,
    /// Largest WebSocket message (and frame) a client may send, in bytes. Default 64 KiB.
    pub max_client_message: usize,
    /// A request head must arrive within this; it also closes keep-alive connections idle for that long.
    /// Default 5 s.
    pub header_timeout: Duration,
    /// The server pings every WebSocket client this often. Default 30 s.
    pub ping_interval: Duration,
    /// A WebSocket client that sends nothing (no pong, no other frame) for this long after a ping is closed
    /// with 1011. Default 10 s.
    pub pong_timeout: Duration,
    /// A client whose socket accepts no bytes for this long while the server has bytes for it is cut
    /// (connection closed). Default 10 s.
    pub write_timeout: Duration,
    /// TLS for every listener (https:// and wss:// only). Default: none.
    pub tls: Option<TlsFiles>,
    /// Token authentication on a non-loopback address without TLS sends tokens in clear text: refused unless
    /// this is set (for a TLS-terminating proxy on a private network). Default false.
    pub allow_plain_token_auth_on_network: bool,
    /// Browser origins (`scheme://host[:port]`, e.g. `https://app.example.com`) allowed to open WebSockets and
    /// read feeds, besides the server's own host. Empty: only same-host origins (and requests without
    /// `Origin`). Under trust only loopback origins are accepted whatever this says. Default empty.
    pub allowed_origins: Vec<String>,
    /// Extra `Host` header values accepted besides the listen addresses, the connection's local address and
    /// `localhost:<port>`: `name` (any port) or `name:port`. Under trust they must be loopback. Default empty.
    pub allowed_hosts: Vec<String>,
    /// Bytes of batches the worker may have queued for the endpoint thread. A batch that does not fit is
    /// replaced by a gap marker and every subscriber catches up from the history (nothing is lost). Status,
    /// token and reply messages are never dropped. Default 32 MiB.
    pub worker_channel_bytes: usize,
    /// Requests one token (under trust: one connection) may have outstanding at the worker; more wait in a
    /// queue. Default 4.
    pub max_requests_per_token: usize,
    /// Requests all clients together may have outstanding at the worker; more wait in a queue. Default 64.
    pub max_worker_requests: usize,
    /// Test hook: `GET /debug/panic` panics the endpoint thread (to test that the worker notices and
    /// restarts it). Never set it in production. Default false.
    pub debug_panic_path: bool,
}

/// PEM files for TLS, read at [`crate::start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub private_key: PathBuf,
}

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Bearer tokens from [`crate::ToEndpoint::Tokens`].
    Token,
    /// Everything is allowed to everyone (loopback development set-ups): every listen address, allowed host
    /// and allowed origin must be loopback.
    Trust,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            max_clients: 512,
            max_unauthenticated: 64,
            max_per_address: 64,
            auth_timeout: Duration::from_secs(5),
            client_buffer: 4 << 20,
            auth: Auth::Token,
            checkpoint_every: Duration::from_secs(5),
            max_client_message: 64 << 10,
            header_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            tls: None,
            allow_plain_token_auth_on_network: false,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            worker_channel_bytes: 32 << 20,
            max_requests_per_token: 4,
            max_worker_requests: 64,
            debug_panic_path: false,
        }
    }
}

/// `scheme://host[:port]` split into (scheme, host, port); host lower-cased, IPv6 in brackets.
pub(crate) fn parse_origin(origin: &str) -> Option<(String, String, Option<u16>)> {
    let (scheme, rest) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (host, port) = split_host_port(rest)?;
    Some((scheme, host, port))
}

/// `host[:port]` (IPv6 as `[..]`) into a lower-cased host and its port; `None` when malformed.
pub(crate) fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if s.is_empty() || s.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", h.to_ascii_lowercase()), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_ascii_lowercase(), Some(p)),
            Some(_) => return None,
            None => (s.to_ascii_lowercase(), None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    if host.is_empty() || host == "[]" {
        return None;
    }
    Some((host, port))
}

/// Whether a host (as [`split_host_port`] returns it) names this machine's loopback.
pub(crate) fn loopback_host(host: &str) -> bool {
    if host == "localhost" {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err("endpoint: no listen address".into());
        }
        if self.max_clients == 0 {
            return Err("endpoint: max_clients must be at least 1".into());
        }
        if self.max_unauthenticated == 0 || self.max_per_address == 0 {
            return Err("endpoint: max_unauthenticated and max_per_address must be at least 1".into());
        }
        if self.client_buffer < 1024 {
            return Err("endpoint: client_buffer must be at least 1024 bytes".into());
        }
        if self.checkpoint_every < Duration::from_millis(10) {
            return Err("endpoint: checkpoint_every must be at least 10ms".into());
        }
        if self.max_client_message < 256 {
            return Err("endpoint: max_client_message must be at least 256 bytes".into());
        }
        for (name, d) in [
            ("header_timeout", self.header_timeout),
            ("auth_timeout", self.auth_timeout),
            ("ping_interval", self.ping_interval),
            ("pong_timeout", self.pong_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if d < Duration::from_millis(10) {
                return Err(format!("endpoint: {name} must be at least 10ms"));
            }
        }
        if self.worker_channel_bytes < (64 << 10) {
            return Err("endpoint: worker_channel_bytes must be at least 64 KiB".into());
        }
        if self.max_requests_per_token == 0 || self.max_worker_requests == 0 {
            return Err("endpoint: max_requests_per_token and max_worker_requests must be at least 1".into());
        }
        for o in &self.allowed_origins {
            let Some((_, host, _)) = parse_origin(o) else {
                return Err(format!(
                    "endpoint: allowed origin {o:?} is not scheme://host[:port] (http or https, no path)"
                ));
            };
            if self.auth == Auth::Trust && !loopback_host(&host) {
                return Err(format!(
                    "endpoint: allowed origin {o:?} is refused under trust authentication (loopback origins only)"
                ));
            }
        }
        for h in &self.allowed_hosts {
            let Some((host, _)) = split_host_port(h) else {
                return Err(format!("endpoint: allowed host {h:?} is not host or host:port"));
            };
            if self.auth == Auth::Trust && !loopback_host(&host) {
                return Err(format!(
                    "endpoint: allowed host {h:?} is refused under trust authentication (loopback hosts only)"
                ));
            }
        }
        let network = self.listen.iter().find(|a| !a.ip().is_loopback());
        match (self.auth, network) {
            (Auth::Trust, Some(a)) => {
                return Err(format!(
                    "endpoint: trust authentication is refused on the non-loopback address {a}"
                ))
            }
            (Auth::Token, Some(a)) if self.tls.is_none() && !self.allow_plain_token_auth_on_network => {
                return Err(format!(
                    "endpoint: token authentication without TLS is refused on the non-loopback address {a} \
                     (tokens would cross the network in clear text): configure TLS, or allow plain token \
                     authentication on the network explicitly"
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins_parse() {
        assert_eq!(
            parse_origin("HTTPS://App.Example.com:8443"),
            Some(("https".into(), "app.example.com".into(), Some(8443)))
        );
        assert_eq!(parse_origin("http://[::1]:3000").map(|o| o.1), Some("[::1]".into()));
        assert!(parse_origin("null").is_none() && parse_origin("ftp://x").is_none());
        assert!(parse_origin("http://x/path").is_none() && parse_origin("http://x:99999").is_none());
        assert_eq!(split_host_port("localhost"), Some(("localhost".into(), None)));
        assert!(split_host_port("::1").is_none() && split_host_port("").is_none());
        assert!(loopback_host("[::1]") && loopback_host("127.0.0.9") && !loopback_host("10.0.0.1"));
    }

    #[test]
    fn network_rules() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.listen = vec!["0.0.0.0:1".parse().unwrap()];
        assert!(c.validate().unwrap_err().contains("without TLS"));
        c.allow_plain_token_auth_on_network = true;
        assert!(c.validate().is_ok());
        c.auth = Auth::Trust;
        assert!(c.validate().unwrap_err().contains("trust"));
        c.listen = vec!["127.0.0.1:1".parse().unwrap()];
        c.allowed_origins = vec!["https://app.example.com".into()];
        assert!(c.validate().unwrap_err().contains("loopback origins"));
    }
}
