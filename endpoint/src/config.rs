//! Endpoint configuration: what the worker derives from its settings and passes to [`crate::start`].

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    /// Every address is bound; failing to bind any of them fails [`crate::start`].
    pub listen: Vec<SocketAddr>,
    /// Concurrent connections of all kinds; beyond it new ones get HTTP 503 with `Retry-After`.
    pub max_clients: usize,
    /// Bytes queued for one client before it is cut as slow.
    pub client_buffer: usize,
    pub auth: Auth,
    /// How often idle change subscribers get a checkpoint.
    pub checkpoint_every: Duration,
    /// Largest WebSocket message (and frame) a client may send.
    pub max_client_message: usize,
    /// The whole request head must arrive within this.
    pub header_timeout: Duration,
}

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Bearer tokens from [`crate::ToEndpoint::Tokens`].
    Token,
    /// Everything is allowed to everyone (loopback development set-ups).
    Trust,
}

impl Default for Config {
    /// Loopback on an ephemeral port (the worker sets the real address from its settings), token auth.
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            max_clients: 1024,
            client_buffer: 4 << 20,
            auth: Auth::Token,
            checkpoint_every: Duration::from_secs(5),
            max_client_message: 64 << 10,
            header_timeout: Duration::from_secs(5),
        }
    }
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err("endpoint: no listen address".into());
        }
        if self.max_clients == 0 {
            return Err("endpoint: max_clients must be at least 1".into());
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
        if self.header_timeout.is_zero() {
            return Err("endpoint: header_timeout must be positive".into());
        }
        Ok(())
    }
}
