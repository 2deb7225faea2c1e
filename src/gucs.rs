//! Settings, all under the reserved prefix `changerelay.`, with typed getters.
//!
//! | setting | default | context |
//! |---|---|---|
//! | `changerelay.enabled` | on | sighup |
//! | `changerelay.database` | postgres | postmaster |
//! | `changerelay.slot_name` | changerelay | postmaster |
//! | `changerelay.max_tracked_rows` | 65536 | postmaster |
//! | `changerelay.max_labels` | 1024 | postmaster |
//! | `changerelay.poll_interval` | 1000 ms | sighup |
//! | `changerelay.batch_changes` | 10000 | sighup |
//! | `changerelay.max_gather` | 3ms | sighup |
//! | `changerelay.history_retention` | 24h | sighup |
//! | `changerelay.max_consumer_lag` | 7d | sighup |
//! | `changerelay.max_value_size` | 16MB | sighup |
//! | `changerelay.decoding_work_mem` | 32MB | sighup |
//! | `changerelay.request_timeout` | 2s | sighup |
//! | `changerelay.listen_addresses` | localhost | postmaster |
//! | `changerelay.port` | 8432 (0: no endpoint) | postmaster |
//! | `changerelay.max_clients` | 512 | postmaster |
//! | `changerelay.max_unauthenticated` | 64 | postmaster |
//! | `changerelay.max_connections_per_address` | 64 | postmaster |
//! | `changerelay.auth_timeout` | 5s | postmaster |
//! | `changerelay.client_buffer` | 4MB | postmaster |
//! | `changerelay.auth` | token | postmaster |
//! | `changerelay.ssl_cert_file` | '' | postmaster |
//! | `changerelay.ssl_key_file` | '' | postmaster |
//! | `changerelay.allow_plaintext_tokens` | off | postmaster |
//! | `changerelay.allowed_origins` | '' | postmaster |
//! | `changerelay.allowed_hosts` | '' | postmaster |
//! | `changerelay.standby_slots` | '' (17+: synchronized_standby_slots) | sighup |
//! | `changerelay.publish_gate` | on | sighup |

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static SLOT_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"changerelay"));
pub static MAX_TRACKED_ROWS: GucSetting<i32> = GucSetting::<i32>::new(65536);
pub static MAX_LABELS: GucSetting<i32> = GucSetting::<i32>::new(1024);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BATCH_CHANGES: GucSetting<i32> = GucSetting::<i32>::new(10000);
pub static MAX_GATHER_MS: GucSetting<i32> = GucSetting::<i32>::new(3);
pub static HISTORY_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(86400);
pub static MAX_CONSUMER_LAG_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86400);
pub static MAX_VALUE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);
pub static DECODING_WORK_MEM_KB: GucSetting<i32> = GucSetting::<i32>::new(32 * 1024);
pub static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static STANDBY_SLOTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PUBLISH_GATE: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Debug builds only: see [`debug_fail_label`].
#[cfg(debug_assertions)]
static DEBUG_FAIL_LABEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static LISTEN_ADDRESSES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"localhost"));
pub static PORT: GucSetting<i32> = GucSetting::<i32>::new(8432);
pub static MAX_CLIENTS: GucSetting<i32> = GucSetting::<i32>::new(512);
pub static MAX_UNAUTHENTICATED: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static MAX_PER_ADDRESS: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static AUTH_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static SSL_CERT_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SSL_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ALLOW_PLAINTEXT_TOKENS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static ALLOWED_ORIGINS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ALLOWED_HOSTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Debug builds only: `GET /debug/panic` kills the endpoint thread (tests).
#[cfg(debug_assertions)]
static DEBUG_ENDPOINT_PANIC: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static CLIENT_BUFFER_KB: GucSetting<i32> = GucSetting::<i32>::new(4096);
pub static AUTH: GucSetting<AuthMode> = GucSetting::<AuthMode>::new(AuthMode::Token);

/// `changerelay.auth`: how endpoint clients authenticate.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuthMode {
    /// A bearer token from `changerelay.create_token()`.
    Token,
    /// No authentication; refused unless every listen address is loopback.
    Trust,
}

/// Defines the settings; called from `_PG_init`. Postmaster-context settings
/// can only be defined while preloading, so those are skipped otherwise.
pub fn define(preloading: bool) {
    GucRegistry::define_bool_guc(
        c"changerelay.enabled",
        c"Whether the relay worker consumes its slot.",
        c"When off, the worker stays connected but stops decoding; changerelay.status() says so.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.poll_interval",
        c"Longest time the relay worker sleeps between looks at its slot.",
        c"Commits wake the worker at once; this is only a fallback (for example with synchronous_commit = off).",
        &POLL_INTERVAL_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"changerelay.batch_changes",
        c"Changes the relay worker decodes per batch (whole transactions are never split).",
        c"",
        &BATCH_CHANGES,
        100,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.max_gather",
        c"Longest the busy relay worker lets commits gather before it decodes the next batch.",
        c"Several commits per apply transaction write a fraction of the WAL of one each, at this much added latency; 0 applies every commit as soon as it is seen.",
        &MAX_GATHER_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"changerelay.history_retention",
        c"How long the relay worker keeps change history.",
        c"Older history is pruned; cursors older than this raise an error telling clients to reload and continue from current_cursor().",
        &HISTORY_RETENTION_S,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"changerelay.max_consumer_lag",
        c"How far behind durable consumers and sinks may keep history beyond changerelay.history_retention.",
        c"History a consumer or sink has not acknowledged or delivered is kept up to this age; older history is pruned all the same and the consumer or sink is marked lagging (a WARNING, status(), consumers(), sinks()).",
        &MAX_CONSUMER_LAG_S,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"changerelay.max_value_size",
        c"Largest column value the output plugin decodes; larger ones are left out.",
        c"A left-out value appears as {\"$changerelay\":\"omitted\",\"bytes\":N}; the change itself is kept. The plugin option max_value_size overrides it per slot.",
        &MAX_VALUE_SIZE_KB,
        1,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"changerelay.decoding_work_mem",
        c"Memory the relay worker's decoding keeps changes in before spilling them to disk.",
        c"The worker's logical_decoding_work_mem. Its own memory stays below this plus about 64 MB, whatever the size of a transaction.",
        &DECODING_WORK_MEM_KB,
        64,
        i32::MAX / 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"changerelay.request_timeout",
        c"Longest time the relay worker spends answering one endpoint request (history page, version map).",
        c"A request past it is cancelled and its client gets an error; decoding is never held up longer.",
        &REQUEST_TIMEOUT_MS,
        10,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"changerelay.standby_slots",
        c"Physical slots of the standbys that must have the relay's history before its slot is confirmed (and, with publish_gate, before clients see it).",
        c"Comma-separated names. Empty: synchronized_standby_slots (PostgreSQL 17 and later), else none. A slot that is missing or invalidated holds everything back (see status()->'ha').",
        &STANDBY_SLOTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"changerelay.publish_gate",
        c"Publish a batch to clients only after its history reached the standby slots.",
        c"Off: clients see changes as soon as they are committed here; after a failover to an asynchronous standby they may then have seen changes the new primary lacks (they get a resync error). Without standby slots it has no effect.",
        &PUBLISH_GATE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    #[cfg(debug_assertions)]
    GucRegistry::define_string_guc(
        c"changerelay.debug_fail_label",
        c"Debug builds only: the relay worker fails to write history of this label.",
        c"Exercises the retry and dead-letter path in tests. Not defined in release builds.",
        &DEBUG_FAIL_LABEL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    if !preloading {
        return;
    }
    GucRegistry::define_string_guc(
        c"changerelay.database",
        c"Database the relay worker serves.",
        c"The extension must be created in this database.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"changerelay.slot_name",
        c"Logical replication slot the relay worker owns.",
        c"Created with the pg_changerelay plugin when missing.",
        &SLOT_NAME,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.max_tracked_rows",
        c"Row versions kept in shared memory (64 bytes each).",
        c"When full, the least recently changed rows are evicted and their label's floor raised, so readers may see a spurious increment but never miss one.",
        &MAX_TRACKED_ROWS,
        0,
        100_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"changerelay.listen_addresses",
        c"Addresses the relay worker's WebSocket/HTTP endpoint listens on.",
        c"Comma-separated host names or IP addresses; localhost means 127.0.0.1 and ::1; * means every address.",
        &LISTEN_ADDRESSES,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.port",
        c"TCP port of the relay worker's WebSocket/HTTP endpoint; 0 turns the endpoint off.",
        c"",
        &PORT,
        0,
        65_535,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.max_clients",
        c"Concurrent connections the endpoint accepts; more are answered 503.",
        c"",
        &MAX_CLIENTS,
        1,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.max_unauthenticated",
        c"Endpoint connections that have not authenticated yet; past it the oldest of them is closed.",
        c"Idle or slow connections can not lock out clients that authenticate at once.",
        &MAX_UNAUTHENTICATED,
        1,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.max_connections_per_address",
        c"Endpoint connections from one client IP address; more are answered 429.",
        c"",
        &MAX_PER_ADDRESS,
        1,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.auth_timeout",
        c"Time an endpoint connection has to authenticate (TLS handshake and request included).",
        c"",
        &AUTH_TIMEOUT_MS,
        100,
        600_000,
        GucContext::Postmaster,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"changerelay.ssl_cert_file",
        c"PEM certificate chain for the endpoint: with ssl_key_file it serves https:// and wss:// only.",
        c"Relative paths are relative to the data directory, as for ssl_cert_file.",
        &SSL_CERT_FILE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"changerelay.ssl_key_file",
        c"PEM private key of changerelay.ssl_cert_file.",
        c"",
        &SSL_KEY_FILE,
        GucContext::Postmaster,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_bool_guc(
        c"changerelay.allow_plaintext_tokens",
        c"Accept token authentication on non-loopback addresses without TLS.",
        c"Tokens then cross the network in clear text: only behind a TLS-terminating proxy on a private network.",
        &ALLOW_PLAINTEXT_TOKENS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"changerelay.allowed_origins",
        c"Browser origins (scheme://host[:port], comma-separated) allowed to use the endpoint besides its own host.",
        c"Protects against cross-site WebSocket hijacking; under auth = trust only loopback origins are accepted.",
        &ALLOWED_ORIGINS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"changerelay.allowed_hosts",
        c"Host header values (name or name:port, comma-separated) the endpoint accepts besides its own addresses.",
        c"Protects against DNS rebinding: requests naming another host are refused.",
        &ALLOWED_HOSTS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    #[cfg(debug_assertions)]
    GucRegistry::define_bool_guc(
        c"changerelay.debug_endpoint_panic",
        c"Debug builds only: GET /debug/panic kills the endpoint thread.",
        c"Tests that the worker notices a dead endpoint and starts it again. Not defined in release builds.",
        &DEBUG_ENDPOINT_PANIC,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.client_buffer",
        c"Bytes queued for one endpoint client before it is disconnected as too slow.",
        c"A slow client is closed with code 4001 and reconnects from its last cursor.",
        &CLIENT_BUFFER_KB,
        64,
        1_048_576,
        GucContext::Postmaster,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_enum_guc(
        c"changerelay.auth",
        c"How endpoint clients authenticate: token or trust.",
        c"trust is refused unless every listen address is a loopback address.",
        &AUTH,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"changerelay.max_labels",
        c"Labels kept in shared memory.",
        c"",
        &MAX_LABELS,
        1,
        65_535,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

fn string(setting: &GucSetting<Option<CString>>, default: &str) -> String {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_string())
}

pub fn enabled() -> bool {
    ENABLED.get()
}

pub fn database() -> String {
    string(&DATABASE, "postgres")
}

pub fn slot_name() -> String {
    string(&SLOT_NAME, "changerelay")
}

pub fn max_tracked_rows() -> usize {
    MAX_TRACKED_ROWS.get().max(0) as usize
}

pub fn max_labels() -> usize {
    MAX_LABELS.get().max(1) as usize
}

pub fn poll_interval() -> std::time::Duration {
    std::time::Duration::from_millis(POLL_INTERVAL_MS.get().max(10) as u64)
}

pub fn batch_changes() -> i32 {
    BATCH_CHANGES.get().max(100)
}

pub fn max_gather() -> std::time::Duration {
    std::time::Duration::from_millis(MAX_GATHER_MS.get().max(0) as u64)
}

pub fn history_retention() -> std::time::Duration {
    std::time::Duration::from_secs(HISTORY_RETENTION_S.get().max(1) as u64)
}

pub fn max_consumer_lag() -> std::time::Duration {
    std::time::Duration::from_secs(MAX_CONSUMER_LAG_S.get().max(1) as u64)
}

/// The label whose history the worker must fail to write (debug builds
/// only; always `None` in release builds).
pub fn debug_fail_label() -> Option<String> {
    #[cfg(debug_assertions)]
    {
        DEBUG_FAIL_LABEL
            .get()
            .map(|c| c.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
    }
    #[cfg(not(debug_assertions))]
    {
        None
    }
}

/// `changerelay.decoding_work_mem`, as a setting value in kB.
pub fn decoding_work_mem_kb() -> i32 {
    DECODING_WORK_MEM_KB.get().max(64)
}

/// `changerelay.standby_slots` as written (see `crate::ha::standby_slot_names`).
pub fn standby_slots() -> String {
    string(&STANDBY_SLOTS, "")
}

pub fn publish_gate() -> bool {
    PUBLISH_GATE.get()
}

pub fn request_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(REQUEST_TIMEOUT_MS.get().max(10) as u64)
}

/// `changerelay.max_value_size` in bytes.
pub fn max_value_size() -> u64 {
    MAX_VALUE_SIZE_KB.get().max(1) as u64 * 1024
}

pub fn listen_addresses() -> String {
    string(&LISTEN_ADDRESSES, "localhost")
}

pub fn port() -> u16 {
    PORT.get().clamp(0, 65_535) as u16
}

pub fn max_clients() -> usize {
    MAX_CLIENTS.get().max(1) as usize
}

pub fn max_unauthenticated() -> usize {
    MAX_UNAUTHENTICATED.get().max(1) as usize
}

pub fn max_connections_per_address() -> usize {
    MAX_PER_ADDRESS.get().max(1) as usize
}

pub fn auth_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(AUTH_TIMEOUT_MS.get().max(100) as u64)
}

/// The endpoint's TLS files, when both are set: (certificate chain, key).
pub fn endpoint_tls() -> Option<(String, String)> {
    let cert = string(&SSL_CERT_FILE, "");
    let key = string(&SSL_KEY_FILE, "");
    (!cert.is_empty() || !key.is_empty()).then_some((cert, key))
}

pub fn allow_plaintext_tokens() -> bool {
    ALLOW_PLAINTEXT_TOKENS.get()
}

fn list(setting: &GucSetting<Option<CString>>) -> Vec<String> {
    string(setting, "")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

pub fn allowed_origins() -> Vec<String> {
    list(&ALLOWED_ORIGINS)
}

pub fn allowed_hosts() -> Vec<String> {
    list(&ALLOWED_HOSTS)
}

/// Debug builds only: whether `GET /debug/panic` kills the endpoint thread.
pub fn debug_endpoint_panic() -> bool {
    #[cfg(debug_assertions)]
    {
        DEBUG_ENDPOINT_PANIC.get()
    }
    #[cfg(not(debug_assertions))]
    {
        false
    }
}

pub fn client_buffer_bytes() -> usize {
    CLIENT_BUFFER_KB.get().max(64) as usize * 1024
}

pub fn auth() -> AuthMode {
    AUTH.get()
}
