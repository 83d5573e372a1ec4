//! The connection sections of [`crate::Config`]: NATS (servers, names, JetStream limits),
//! Postgres and Redis. Their URLs may carry credentials, so their `Debug` redacts them. The doc
//! comment of each field is its reference documentation; defaults are the `Default` impls.

use crate::sections::invalid;
use crate::{ConfigError, redact_url, redact_urls};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// JetStream storage backend for taskfleet's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Disk (the default): survives a nats-server restart.
    File,
    /// Memory: faster, lost on restart. For benchmarks and throwaway fleets.
    Memory,
}

/// NATS connection, subject names and JetStream limits.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Seed servers, comma-separated (`nats://a:4222,nats://b:4222`): each a `nats://`,
    /// `tls://`, `ws://` or `wss://` URL or a bare `host:port`, credentials as
    /// `user:password@` or `token@` (percent-encode a comma in them). The client connects to
    /// any of them and learns the rest of the cluster from it. Logs show the servers with
    /// credentials redacted.
    pub url: String,
    /// Prefix of every subject (`<prefix>.submit.<queue>` …). Fleets or tests sharing a server
    /// use different prefixes.
    pub subject_prefix: String,
    /// Prefix of every stream name (`<prefix>_SUBMIT`, `_DISPATCH`, `_EVENTS`).
    pub stream_prefix: String,
    /// Stream storage: `file` or `memory`.
    pub storage: StorageKind,
    /// Stream replicas (3 in production clusters).
    pub replicas: usize,
    /// Window in which JetStream drops a resubmission with the same `Nats-Msg-Id`.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// How long JetStream waits for a worker's ack (or heartbeat) before redelivering a task.
    /// Workers heartbeat every third of it, so it can stay short.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries of one dispatch message that may end without an outcome (its worker lost, its
    /// event not publishable, a drain) before the task ends `dead` with `deliveries_exhausted`.
    /// Handler attempts do not count here (that is `max_attempts`): retries and deferrals are
    /// new dispatch messages. A budget against a task that kills every worker that runs it.
    pub max_deliver: i64,
    /// Dispatched tasks of one queue and priority that may be delivered and unacknowledged at
    /// once, across the whole fleet.
    pub max_ack_pending: i64,
    /// How long task events are kept in their stream (for consumers that were down).
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// How long dead tasks' envelopes are kept in the dead-letter stream.
    #[serde(with = "humantime_serde")]
    pub dead_max_age: Duration,
    /// How long a cancelled task id stays in the cancellation bucket workers watch (longer than
    /// any task waits in a queue).
    #[serde(with = "humantime_serde")]
    pub cancel_max_age: Duration,
    /// Largest size of each stream, in bytes (the cancellation bucket gets a sixteenth). Full
    /// work queues (submissions, dispatch) refuse new messages; the event and dead-letter
    /// streams drop their oldest. An alert fires at 80%.
    pub stream_max_bytes: u64,
    /// User name to connect as: the fleet's NATS roles are `coordinator`, `worker`,
    /// `aggregator`, `client` and `admin` (`taskfleet nats-permissions` prints what each may
    /// do). Empty: no user (or the one in `url`).
    pub user: String,
    /// Password of `user`. Prefer `password_file` (or the environment, from a Secret).
    pub password: String,
    /// File whose content (trailing newline trimmed) is the password of `user`; read at start.
    pub password_file: String,
    /// A NATS `.creds` file (JWT and nkey seed), instead of user and password.
    pub creds_file: String,
    /// A file holding an nkey seed (`SU…`), instead of user and password.
    pub nkey_file: String,
    /// PEM file of the CA that signed the servers' certificates; setting it requires TLS.
    pub tls_ca_file: String,
    /// PEM certificate presented to the servers (mutual TLS), with `tls_key_file`.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// Prefix of this process's reply inboxes. Empty: `_INBOX_<user>` when `user` is set (so
    /// each role's permissions can keep its replies to itself), else `_INBOX`.
    pub inbox_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "taskfleet".into(),
            stream_prefix: "TASKFLEET".into(),
            storage: StorageKind::File,
            replicas: 1,
            dedup_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            max_ack_pending: 20_000,
            events_max_age: Duration::from_secs(24 * 3600),
            dead_max_age: Duration::from_secs(14 * 24 * 3600),
            cancel_max_age: Duration::from_secs(7 * 24 * 3600),
            stream_max_bytes: 1 << 30,
            user: String::new(),
            password: String::new(),
            password_file: String::new(),
            creds_file: String::new(),
            nkey_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            inbox_prefix: String::new(),
        }
    }
}

impl NatsConfig {
    /// The seed servers of [`NatsConfig::url`]: its comma-separated entries, trimmed
    /// (validation guarantees none is empty).
    pub fn servers(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).collect()
    }

    /// The prefix of this process's inboxes (see [`NatsConfig::inbox_prefix`]).
    pub fn effective_inbox_prefix(&self) -> String {
        match (self.inbox_prefix.is_empty(), self.user.is_empty()) {
            (false, _) => self.inbox_prefix.clone(),
            (true, false) => format!("_INBOX_{}", self.user),
            (true, true) => "_INBOX".into(),
        }
    }

    /// The password of [`NatsConfig::user`]: `password`, else the content of `password_file`
    /// (trailing whitespace trimmed), else none.
    pub fn effective_password(&self) -> Result<Option<String>, ConfigError> {
        if !self.password.is_empty() {
            return Ok(Some(self.password.clone()));
        }
        if self.password_file.is_empty() {
            return Ok(None);
        }
        match std::fs::read_to_string(&self.password_file) {
            Ok(pw) => Ok(Some(pw.trim_end().to_string())),
            Err(e) => Err(ConfigError::Invalid {
                field: "nats.password_file",
                message: format!("cannot read {:?}: {e}", self.password_file),
            }),
        }
    }

    /// [`NatsConfig::url`] fit for a log line: the servers with credentials redacted.
    pub fn redacted_url(&self) -> String {
        redact_urls(&self.url)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let servers = self.servers();
        for (i, server) in servers.iter().enumerate() {
            if let Err(why) = check_nats_server(server) {
                let which =
                    if servers.len() > 1 { format!(" (entry {} of {})", i + 1, servers.len()) } else { String::new() };
                return invalid(
                    "nats.url",
                    format!(
                        "{:?}{which} {why}; expected comma-separated nats://, tls://, ws:// or wss:// URLs or host:port",
                        redact_url(server)
                    ),
                );
            }
        }
        let token_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !self.subject_prefix.split('.').all(token_ok) {
            return invalid(
                "nats.subject_prefix",
                format!("{:?} must be dot-separated tokens of [A-Za-z0-9_-]", self.subject_prefix),
            );
        }
        if !token_ok(&self.stream_prefix) {
            return invalid("nats.stream_prefix", format!("{:?} must be [A-Za-z0-9_-]+", self.stream_prefix));
        }
        if self.ack_wait < Duration::from_secs(1) {
            return invalid("nats.ack_wait", "must be at least 1s".into());
        }
        if self.max_deliver < 1 || self.max_ack_pending < 1 {
            return invalid("nats.max_deliver", "max_deliver and max_ack_pending must be positive".into());
        }
        if self.stream_max_bytes < 1 << 20 || self.stream_max_bytes > i64::MAX as u64 {
            return invalid("nats.stream_max_bytes", "must be at least 1 MiB".into());
        }
        if !(1..=5).contains(&self.replicas) {
            return invalid("nats.replicas", format!("{} is outside 1..=5", self.replicas));
        }
        self.validate_credentials()
    }

    fn validate_credentials(&self) -> Result<(), ConfigError> {
        let ways = [!self.user.is_empty(), !self.creds_file.is_empty(), !self.nkey_file.is_empty()];
        if ways.iter().filter(|w| **w).count() > 1 {
            return invalid("nats.user", "set one of user (with a password), creds_file and nkey_file".into());
        }
        if self.user.is_empty() && (!self.password.is_empty() || !self.password_file.is_empty()) {
            return invalid("nats.password", "a password needs nats.user".into());
        }
        if !self.user.is_empty() && self.effective_password()?.is_none() {
            return invalid("nats.user", format!("user {:?} needs nats.password or nats.password_file", self.user));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return invalid("nats.tls_cert_file", "tls_cert_file and tls_key_file go together".into());
        }
        let files = [
            ("nats.creds_file", &self.creds_file),
            ("nats.nkey_file", &self.nkey_file),
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ];
        for (field, path) in files {
            if !path.is_empty() && std::fs::metadata(path).is_err() {
                return invalid(field, format!("{path:?} is not a readable file"));
            }
        }
        let p = &self.inbox_prefix;
        if !p.is_empty() && (p.contains(['*', '>', '.', ' ']) || p.starts_with('$')) {
            return invalid("nats.inbox_prefix", format!("{p:?} must be one subject token, not starting with '$'"));
        }
        Ok(())
    }
}

/// Why `server`, one entry of `nats.url`, is not a NATS server address (the checks of
/// async-nats's `ServerAddr`, done here so that a bad entry stops the service at start).
fn check_nats_server(server: &str) -> Result<(), String> {
    if server.is_empty() {
        return Err("is empty (a stray comma?)".into());
    }
    if server.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace".into());
    }
    let rest = match server.split_once("://") {
        Some((scheme, rest)) => {
            if !["nats", "tls", "ws", "wss"].iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
                return Err(format!("has the scheme {scheme:?}"));
            }
            rest
        }
        None => server,
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = if let Some(v6) = host_port.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else { return Err("has an unclosed '[' in its host".into()) };
        if host.is_empty() || !host.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return Err(format!("has the invalid IPv6 host [{host}]"));
        }
        match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(format!("has {after:?} after its IPv6 host")),
        }
    } else {
        let (host, port) = match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '%')) {
            return Err(format!("has the invalid host {host:?}"));
        }
        port
    };
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err(format!("has the port {port:?}, not a number in 1..=65535"));
    }
    Ok(())
}

impl std::fmt::Debug for NatsConfig {
    /// Like the derived `Debug`, with credentials in `url` redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.redacted_url())
            .field("subject_prefix", &self.subject_prefix)
            .field("stream_prefix", &self.stream_prefix)
            .field("storage", &self.storage)
            .field("replicas", &self.replicas)
            .field("dedup_window", &self.dedup_window)
            .field("ack_wait", &self.ack_wait)
            .field("max_deliver", &self.max_deliver)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("events_max_age", &self.events_max_age)
            .field("dead_max_age", &self.dead_max_age)
            .field("cancel_max_age", &self.cancel_max_age)
            .field("stream_max_bytes", &self.stream_max_bytes)
            .field("user", &self.user)
            .field("password", &if self.password.is_empty() { "" } else { "***" })
            .field("password_file", &self.password_file)
            .field("creds_file", &self.creds_file)
            .field("nkey_file", &self.nkey_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

/// Postgres connection.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connection URL. TLS: `?sslmode=verify-full&sslrootcert=/path/ca.crt` (the server's
    /// certificate must chain to that CA and name the URL's host; `require` encrypts without
    /// checking, `prefer` is the default); a client certificate with `sslcert=` and `sslkey=`.
    pub url: String,
    /// Schema that holds taskfleet's tables (created if missing when migrations run).
    pub schema: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Whether the coordinator and the aggregator create the schema and apply pending
    /// migrations at start. Off: migrations are a separate step (`taskfleet migrate`, run by a
    /// role that may change the schema), and the services only check that the schema is at the
    /// latest migration, refusing to start when it is behind, so their own role needs no DDL
    /// rights (SELECT, INSERT, UPDATE, DELETE on the tables, USAGE on the schema and sequences).
    pub migrate_on_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/test".into(),
            schema: "taskfleet".into(),
            max_connections: 8,
            migrate_on_start: true,
        }
    }
}

impl std::fmt::Debug for DatabaseConfig {
    /// Like the derived `Debug`, with credentials in `url` redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.redacted_url())
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

impl DatabaseConfig {
    /// [`DatabaseConfig::url`] fit for a log line: its password redacted.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let ok = !self.schema.is_empty()
            && self.schema.len() <= 63
            && self.schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !self.schema.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return invalid("database.schema", format!("{:?} must be a lowercase SQL identifier", self.schema));
        }
        if self.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1".into());
        }
        Ok(())
    }
}

/// Redis connection.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Connection URL: `redis://[user:password@]host:6379[/db]`, or `rediss://…` for TLS (the
    /// server's certificate is checked against the system's roots, or `ca_file`).
    pub url: String,
    /// PEM file of the CA certificates trusted for a `rediss://` server, instead of the system's
    /// roots (a private CA, e.g. cert-manager's `ca.crt`). Empty: the system's roots. Read at start.
    pub ca_file: String,
    /// Prefix of every key taskfleet writes.
    pub key_prefix: String,
    /// Longest wait for one Redis command; past it the worker treats Redis as down for that call
    /// and falls back (cache bypassed, local rate limit share, local breaker).
    #[serde(with = "humantime_serde")]
    pub op_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            ca_file: String::new(),
            key_prefix: "taskfleet:".into(),
            op_timeout: Duration::from_millis(250),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    /// Like the derived `Debug`, with credentials in `url` redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("ca_file", &self.ca_file)
            .field("key_prefix", &self.key_prefix)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// [`RedisConfig::url`] fit for a log line: its password redacted.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Whether [`RedisConfig::url`] asks for TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.url.get(..9).is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"))
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.ca_file.is_empty() {
            return Ok(());
        }
        if !self.is_tls() {
            return invalid(
                "redis.ca_file",
                format!("is set, but redis.url {:?} is not rediss://", self.redacted_url()),
            );
        }
        if let Err(e) = std::fs::metadata(&self.ca_file) {
            return invalid("redis.ca_file", format!("cannot read {:?}: {e}", self.ca_file));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{DatabaseConfig, NatsConfig, RedisConfig};
    use crate::ConfigError;

    fn nats(url: &str) -> Result<(), ConfigError> {
        NatsConfig { url: url.into(), ..NatsConfig::default() }.validate()
    }

    #[test]
    fn nats_url_takes_a_list_of_seed_servers() {
        for url in [
            "nats://127.0.0.1:4222",
            "nats://a:4222,nats://b:4222",
            " nats://a:4222 , tls://b:4222,ws://c:8080/ws,wss://d ",
            "a:4222,b:4222",
            "localhost",
            "nats://user:p%2Cw@a:4222,nats://tok@b",
            "nats://[::1]:4222,[fe80::1]",
            "NATS://A.example.com:4222",
        ] {
            nats(url).unwrap_or_else(|e| panic!("{url:?}: {e}"));
        }
        let cfg = NatsConfig { url: " nats://a:4222 ,b:4222".into(), ..NatsConfig::default() };
        assert_eq!(cfg.servers(), ["nats://a:4222", "b:4222"]);
    }

    #[test]
    fn a_malformed_nats_server_is_an_error_naming_nats_url() {
        for (url, why) in [
            ("nats://a:4222,,nats://b:4222", "\"\" (entry 2 of 3) is empty"),
            ("nats://a:4222,", "(entry 2 of 2) is empty"),
            ("http://a:4222", "has the scheme \"http\""),
            ("nats://a:42x22", "has the port \"42x22\""),
            ("nats://a:99999", "not a number in 1..=65535"),
            ("nats://:4222", "has no host"),
            ("nats://a b:4222", "contains whitespace"),
            ("nats://a/b:4222,nats://h^st", "has the invalid host \"h^st\""),
            ("nats://[::1:4222", "unclosed '['"),
            ("nats://user:hunter2@a:x", "\"nats://user:***@a:x\" has the port \"x\""),
        ] {
            let e = nats(url).expect_err(url).to_string();
            assert!(e.starts_with("invalid configuration: nats.url: "), "{url:?}: {e}");
            assert!(e.contains(why), "{url:?}: {e}");
            assert!(!e.contains("hunter2"), "{url:?}: {e}");
        }
    }

    #[test]
    fn redis_ca_file_needs_a_rediss_url_and_a_readable_file() {
        let ca = tempfile_path("redis-ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write CA file");
        let tls = RedisConfig { url: "rediss://cache:6380".into(), ca_file: ca.clone(), ..RedisConfig::default() };
        assert!(tls.is_tls() && tls.validate().is_ok());
        let plain = RedisConfig { url: "redis://cache:6379".into(), ..tls.clone() };
        let e = plain.validate().expect_err("a CA file without TLS").to_string();
        assert!(e.contains("redis.ca_file") && e.contains("not rediss://"), "{e}");
        let missing = RedisConfig { ca_file: format!("{ca}.missing"), ..tls };
        assert!(missing.validate().expect_err("a missing file").to_string().contains("cannot read"));
        assert!(RedisConfig::default().validate().is_ok() && !RedisConfig::default().is_tls());
        let _ = std::fs::remove_file(ca);
    }

    /// A path in the temporary directory unique to this process.
    fn tempfile_path(name: &str) -> String {
        std::env::temp_dir().join(format!("taskfleet-config-{}-{name}", std::process::id())).display().to_string()
    }

    #[test]
    fn debug_of_url_sections_redacts_credentials() {
        let nats = NatsConfig { url: "nats://u:hunter2@a:4222,nats://tok3n@b".into(), ..NatsConfig::default() };
        let db = DatabaseConfig { url: "postgres://app:hunter2@db/fleet".into(), ..DatabaseConfig::default() };
        let redis = RedisConfig { url: "redis://:hunter2@cache:6379".into(), ..RedisConfig::default() };
        let config = crate::Config { nats, database: db, redis, ..crate::Config::default() };
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains("hunter2") && !shown.contains("tok3n"), "{shown}");
        assert!(shown.contains(r#"url: "nats://u:***@a:4222,nats://***@b""#), "{shown}");
        assert!(shown.contains(r#"url: "postgres://app:***@db/fleet""#), "{shown}");
        assert!(shown.contains(r#"url: "redis://:***@cache:6379""#), "{shown}");
        assert!(shown.contains("subject_prefix") && shown.contains("stream_max_bytes") && shown.contains("op_timeout"));
    }
}
