//! The per-component sections of [`crate::Config`] (the connections to NATS, Postgres and Redis
//! are in `connections.rs`). The doc comment of each field is its reference documentation;
//! defaults are the `Default` impls.

use crate::{AlertRule, AlertSetting, ConfigError, NatsConfig};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use taskfleet_proto::{validate_name, validate_queue};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs and traces. Trace export follows the OpenTelemetry variables
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Log filter in `tracing_subscriber::EnvFilter` syntax, e.g. `info,taskfleet_worker=debug`.
    pub log: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { log: "info".into(), log_format: LogFormat::Text }
    }
}

/// The coordinator service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Address of the HTTP API (`/healthz`, `/readyz`, `/metrics`, `/v1/tasks`).
    pub http_addr: String,
    /// Bearer token the HTTP API's task routes (`/v1/...`: payloads, results, counts) require,
    /// sent as `Authorization: Bearer <token>`; at least 16 printable characters, no spaces.
    /// Prefer `api_token_file` (or the environment, from a Secret). With neither set, those
    /// routes answer only to loopback peers (403 to anyone else). `/healthz`, `/readyz` and
    /// `/metrics` never need it.
    pub api_token: Secret,
    /// File whose content (surrounding whitespace trimmed) is `api_token`; read at start. Set
    /// this or `api_token`, not both.
    pub api_token_file: String,
    /// Task kinds accepted at intake; empty accepts any kind (workers then reject kinds they do
    /// not know).
    pub kinds: Vec<String>,
    /// Queues accepted at intake (`TASKFLEET_COORDINATOR_QUEUES=default,llm`); empty accepts any
    /// valid queue name. A submission to another queue is rejected (`unknown_queue`).
    pub queues: Vec<String>,
    /// Replies (`Taskfleet-Reply-To`) go only to subjects starting with this prefix; a
    /// submission naming another subject is rejected (`invalid_reply_to`) and gets no reply.
    /// `$…` subjects and the fleet's own subjects are refused whatever the prefix.
    pub reply_prefix: String,
    /// Largest accepted submission body (and payload), in bytes.
    pub max_body_bytes: usize,
    /// Most submissions taken from JetStream and written to Postgres in one batch.
    pub submit_batch_size: usize,
    /// Most body bytes of the submissions pulled at once and of one Postgres batch (a batch
    /// is cut by whichever of this and `submit_batch_size` comes first), bounding the
    /// coordinator's memory under large submissions. At least `max_body_bytes`.
    pub submit_batch_max_bytes: usize,
    /// Most submission batches whose post-commit stage (dispatch, acknowledgements, replies) runs
    /// at once, overlapping the Postgres write of the next batch.
    pub intake_pipeline_depth: usize,
    /// Most events written to Postgres in one batch.
    pub event_batch_size: usize,
    /// Attempts of a task that names no `max_attempts` and whose kind has no entry below.
    pub max_attempts: u32,
    /// Attempts by kind, for tasks that name no `max_attempts`, e.g.
    /// `TASKFLEET_COORDINATOR_KIND_MAX_ATTEMPTS=llm.chat=5,http=4`.
    pub kind_max_attempts: std::collections::BTreeMap<String, u32>,
    /// How often the rescuer looks for tasks whose dispatch was lost. One coordinator replica
    /// runs it at a time (Postgres advisory lock).
    #[serde(with = "humantime_serde")]
    pub rescue_interval: Duration,
    /// Margin of the rescuer: a task is dispatched again only when it was dispatched, and last
    /// touched, this long before the moment up to which its lane's messages are all settled
    /// in JetStream and every event is recorded. It covers the time between a dispatch's
    /// commit and its publish (retried for a few seconds while NATS is unreachable).
    #[serde(with = "humantime_serde")]
    pub rescue_idle: Duration,
    /// Longest sleep of the loop that dispatches due retries and deferrals (it wakes sooner
    /// for the earliest one it knows of, and when this coordinator records a retry).
    #[serde(with = "humantime_serde")]
    pub promote_interval: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            http_addr: "0.0.0.0:8080".into(),
            api_token: Secret::default(),
            api_token_file: String::new(),
            kinds: Vec::new(),
            queues: Vec::new(),
            reply_prefix: "_INBOX".into(),
            max_body_bytes: 512 * 1024,
            submit_batch_size: 1000,
            submit_batch_max_bytes: 16 << 20,
            intake_pipeline_depth: 2,
            event_batch_size: 1000,
            max_attempts: taskfleet_proto::DEFAULT_MAX_ATTEMPTS,
            kind_max_attempts: Default::default(),
            rescue_interval: Duration::from_secs(5),
            rescue_idle: Duration::from_secs(10),
            promote_interval: Duration::from_secs(1),
        }
    }
}

/// Fewest characters of `coordinator.api_token`.
pub const MIN_API_TOKEN_LEN: usize = 16;

/// A secret string (a token): serialized and compared as itself, but `Debug` shows `***`, so a
/// logged configuration never carries it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must use it (never a log line).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.0.is_empty() { "" } else { crate::REDACTED };
        std::fmt::Debug::fmt(shown, f)
    }
}

/// Why `token` cannot be `field`'s API token (without quoting it), or `Ok`.
fn check_api_token(field: &'static str, token: &str) -> Result<(), ConfigError> {
    if token.chars().count() < MIN_API_TOKEN_LEN {
        return invalid(
            field,
            format!("the token has {} characters; it needs at least {MIN_API_TOKEN_LEN}", token.chars().count()),
        );
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return invalid(
            field,
            "the token must be printable ASCII without spaces (it travels in an HTTP header)".into(),
        );
    }
    Ok(())
}

impl CoordinatorConfig {
    /// The HTTP API's token: `api_token`, else the content of `api_token_file` (surrounding
    /// whitespace trimmed; the file is read now), else none: the task routes then answer only
    /// to loopback peers. A file that cannot be read, or a token that is too short, is an error.
    pub fn effective_api_token(&self) -> Result<Option<Secret>, ConfigError> {
        if !self.api_token.is_empty() && !self.api_token_file.is_empty() {
            return Err(ConfigError::Invalid {
                field: "coordinator.api_token",
                message: "set api_token or api_token_file, not both".into(),
            });
        }
        if !self.api_token.is_empty() {
            check_api_token("coordinator.api_token", self.api_token.expose())?;
            return Ok(Some(self.api_token.clone()));
        }
        if self.api_token_file.is_empty() {
            return Ok(None);
        }
        let token = std::fs::read_to_string(&self.api_token_file).map_err(|e| ConfigError::Invalid {
            field: "coordinator.api_token_file",
            message: format!("cannot read {:?}: {e}", self.api_token_file),
        })?;
        let token = token.trim();
        check_api_token("coordinator.api_token_file", token)?;
        Ok(Some(Secret::from(token)))
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        // The file is read by `effective_api_token`, where the coordinator starts: other
        // binaries loading the same configuration need not see it.
        if !self.api_token.is_empty() && !self.api_token_file.is_empty() {
            return invalid("coordinator.api_token", "set api_token or api_token_file, not both".into());
        }
        if !self.api_token.is_empty() {
            check_api_token("coordinator.api_token", self.api_token.expose())?;
        }
        for kind in &self.kinds {
            validate_name("kinds", kind, true)
                .map_err(|e| ConfigError::Invalid { field: "coordinator.kinds", message: e.to_string() })?;
        }
        if !(1..=10_000).contains(&self.submit_batch_size) || !(1..=10_000).contains(&self.event_batch_size) {
            return invalid("coordinator.submit_batch_size", "batch sizes must be in 1..=10000".into());
        }
        if !(1..=16).contains(&self.intake_pipeline_depth) {
            return invalid("coordinator.intake_pipeline_depth", "must be in 1..=16".into());
        }
        if !(1..=1000).contains(&self.max_attempts) || self.kind_max_attempts.values().any(|n| !(1..=1000).contains(n))
        {
            return invalid("coordinator.max_attempts", "attempt limits must be in 1..=1000".into());
        }
        if self.rescue_interval < Duration::from_millis(100) {
            return invalid("coordinator.rescue_interval", "must be at least 100ms".into());
        }
        if self.rescue_idle < Duration::from_secs(1) {
            return invalid("coordinator.rescue_idle", "must be at least 1s".into());
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.promote_interval) {
            return invalid("coordinator.promote_interval", "must be between 10ms and 60s".into());
        }
        if self.max_body_bytes < 256 {
            return invalid("coordinator.max_body_bytes", "must be at least 256".into());
        }
        if !(self.max_body_bytes..=256 << 20).contains(&self.submit_batch_max_bytes) {
            return invalid(
                "coordinator.submit_batch_max_bytes",
                format!(
                    "{} must be between max_body_bytes ({}) and 256 MiB",
                    self.submit_batch_max_bytes, self.max_body_bytes
                ),
            );
        }
        for q in &self.queues {
            validate_queue("queues", q)
                .map_err(|e| ConfigError::Invalid { field: "coordinator.queues", message: e.to_string() })?;
        }
        let p = &self.reply_prefix;
        let plain = p.chars().all(|c| c.is_ascii_graphic() && c != '*' && c != '>') && !p.contains("..");
        if p.is_empty() || p.len() > 128 || !plain || p.starts_with('$') || p.starts_with('.') {
            return invalid(
                "coordinator.reply_prefix",
                format!("{p:?} must be 1..=128 printable characters without wildcards, not starting with '$' or '.'"),
            );
        }
        Ok(())
    }
}

/// Runs, spawns and loops. A submission or spawn over a limit is refused with an error that
/// names the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowsConfig {
    /// Tasks a run may ever have, spawned children and loop iterations included.
    pub max_tasks_per_run: u32,
    /// Children one spawn may add.
    pub max_children_per_spawn: u32,
    /// How deep spawns may nest: a run's own task spawns at depth 1, its children at depth 2.
    pub max_spawn_depth: u32,
    /// Parents' outcomes travel with a step's dispatch up to this many bytes in all; beyond it
    /// (a join of thousands of children) the worker reads them from the coordinator
    /// (`task.parents`) before the step starts.
    pub inline_parents_bytes: usize,
    /// Largest checkpoint a step may save, bytes of JSON. A dispatch carries the payload (up to
    /// `coordinator.max_body_bytes`), the checkpoint and the inline parents' outcomes: keep
    /// the three under the NATS server's `max_payload` (1 MiB by default).
    pub max_checkpoint_bytes: usize,
}

impl Default for WorkflowsConfig {
    fn default() -> Self {
        WorkflowsConfig {
            max_tasks_per_run: 100_000,
            max_children_per_spawn: 10_000,
            max_spawn_depth: 8,
            inline_parents_bytes: 256 << 10,
            max_checkpoint_bytes: 128 << 10,
        }
    }
}

impl WorkflowsConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1_000_000).contains(&self.max_tasks_per_run) {
            return invalid("workflows.max_tasks_per_run", "must be in 1..=1000000".into());
        }
        if !(1..=100_000).contains(&self.max_children_per_spawn) {
            return invalid("workflows.max_children_per_spawn", "must be in 1..=100000".into());
        }
        if !(1..=64).contains(&self.max_spawn_depth) {
            return invalid("workflows.max_spawn_depth", "must be in 1..=64".into());
        }
        if !(1024..=16 << 20).contains(&self.inline_parents_bytes) {
            return invalid("workflows.inline_parents_bytes", "must be between 1 KiB and 16 MiB".into());
        }
        if !(1024..=16 << 20).contains(&self.max_checkpoint_bytes) {
            return invalid("workflows.max_checkpoint_bytes", "must be between 1 KiB and 16 MiB".into());
        }
        Ok(())
    }
}

/// How strongly a worker prefers each priority when several have work: out of
/// `critical + high + normal + low` consecutive picks, each priority gets its weight's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityWeights {
    /// Weight of critical tasks.
    pub critical: u32,
    /// Weight of high tasks.
    pub high: u32,
    /// Weight of normal tasks.
    pub normal: u32,
    /// Weight of low tasks.
    pub low: u32,
}

impl PriorityWeights {
    /// Weights indexed by `Priority::index`.
    pub fn as_array(&self) -> [u32; 4] {
        [self.critical, self.high, self.normal, self.low]
    }
}

impl Default for PriorityWeights {
    fn default() -> Self {
        PriorityWeights { critical: 16, high: 8, normal: 4, low: 1 }
    }
}

/// Worker processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Address of the worker's HTTP endpoints (`/healthz`, `/readyz`, `/metrics`).
    pub http_addr: String,
    /// Queues this worker takes tasks from.
    pub queues: Vec<String>,
    /// Handlers running at once in this process.
    pub max_concurrent_tasks: usize,
    /// Tasks of each queue and priority pulled ahead of free slots; 0 means the same as
    /// `max_concurrent_tasks`. Prefetched tasks are held by this worker, so keep it modest
    /// when tasks are slow.
    pub prefetch: usize,
    /// Share of picks each priority gets when several have work.
    pub priority_weights: PriorityWeights,
    /// On SIGTERM, how long running tasks may finish before the rest are handed back.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Most events in one published batch.
    pub event_batch_size: usize,
    /// How long events wait for others to share their batch when several are already waiting
    /// (a lone event is published at once).
    #[serde(with = "humantime_serde")]
    pub event_linger: Duration,
    /// A `started` event is sent only for attempts still running after this long; shorter
    /// attempts report start and end in their final event.
    #[serde(with = "humantime_serde")]
    pub started_event_delay: Duration,
    /// This worker's id in events; empty means `<hostname>-<pid>`.
    pub id: String,
    /// Retry backoff ceiling after the first failure (tasks and kinds may set their own).
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Growth of the backoff ceiling per attempt.
    pub retry_factor: f64,
    /// Largest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How often the worker reports its in-flight count, CPU and memory to the aggregator.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Registers the test handlers `sleep` (waits `ms`) and `fanout` (submits children without
    /// a join) in `taskfleet-worker`. Off in production: without it such tasks fail with
    /// `unknown_kind`. The dev fleet (`make dev`) and the end-to-end tests turn it on.
    pub test_handlers: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            http_addr: "0.0.0.0:8081".into(),
            queues: vec!["default".into()],
            max_concurrent_tasks: 64,
            prefetch: 0,
            priority_weights: PriorityWeights::default(),
            drain_timeout: Duration::from_secs(30),
            event_batch_size: 500,
            event_linger: Duration::from_millis(2),
            started_event_delay: Duration::from_secs(1),
            id: String::new(),
            retry_base: Duration::from_secs(1),
            retry_factor: 2.0,
            retry_max: Duration::from_secs(300),
            status_interval: Duration::from_secs(5),
            test_handlers: false,
        }
    }
}

impl WorkerConfig {
    pub(crate) fn validate(&self, _nats: &NatsConfig) -> Result<(), ConfigError> {
        if self.queues.is_empty() {
            return invalid("worker.queues", "name at least one queue".into());
        }
        for q in &self.queues {
            validate_queue("queues", q)
                .map_err(|e| ConfigError::Invalid { field: "worker.queues", message: e.to_string() })?;
        }
        if !(1..=100_000).contains(&self.max_concurrent_tasks) {
            return invalid(
                "worker.max_concurrent_tasks",
                format!("{} is outside 1..=100000", self.max_concurrent_tasks),
            );
        }
        if self.priority_weights.as_array().contains(&0) {
            return invalid(
                "worker.priority_weights",
                "every weight must be at least 1, or that priority would starve".into(),
            );
        }
        if !(1..=10_000).contains(&self.event_batch_size) {
            return invalid("worker.event_batch_size", "must be in 1..=10000".into());
        }
        if !(1.0..=100.0).contains(&self.retry_factor) || self.retry_base > self.retry_max {
            return invalid("worker.retry_factor", "needs 1 <= retry_factor <= 100 and retry_base <= retry_max".into());
        }
        Ok(())
    }

    /// Effective prefetch per queue and priority.
    pub fn effective_prefetch(&self) -> usize {
        if self.prefetch == 0 { self.max_concurrent_tasks } else { self.prefetch }
    }
}

/// The metrics aggregator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Address of the aggregator's HTTP endpoints (`/` dashboard, `/metrics`, `/v1/stats`).
    pub http_addr: String,
    /// The sliding window of the live figures (throughput, percentiles, rates).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How often the aggregator appends its per-minute rollups to Postgres (and acknowledges
    /// the events they hold).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// How much history the dashboard shows (reloaded from the rollups after a restart).
    #[serde(with = "humantime_serde")]
    pub history: Duration,
    /// Alert rules, `METRIC < or > THRESHOLD`, by name; `off` disables a default rule. Metrics:
    /// `p50_ms`, `p95_ms`, `p99_ms`, `max_ms` (end to end), `queue_wait_p95_ms`, `run_p95_ms`,
    /// `error_rate`, `retry_rate`, `cache_hit_rate`, `throughput_per_s`, `utilization` (0..1),
    /// `memory_percent`, `cpu_percent` (the highest worker's).
    pub alert_rules: std::collections::BTreeMap<String, AlertSetting>,
    /// How often alert rules are evaluated.
    #[serde(with = "humantime_serde")]
    pub alert_interval: Duration,
    /// Final states the window must hold before latency and rate rules are evaluated.
    pub alert_min_samples: u64,
    /// A worker that has not reported for this long is no longer counted.
    #[serde(with = "humantime_serde")]
    pub worker_timeout: Duration,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        let rules = [
            ("low_cache_hit_rate", "cache_hit_rate", false, 0.5),
            ("high_p95_latency", "p95_ms", true, 5000.0),
            ("high_error_rate", "error_rate", true, 0.05),
            ("high_memory", "memory_percent", true, 80.0),
        ];
        AggregatorConfig {
            http_addr: "0.0.0.0:9090".into(),
            window: Duration::from_secs(60),
            flush_interval: Duration::from_secs(10),
            history: Duration::from_secs(3600),
            alert_rules: rules
                .into_iter()
                .map(|(name, metric, above, threshold)| {
                    (name.to_string(), AlertSetting::On(AlertRule { metric: metric.to_string(), above, threshold }))
                })
                .collect(),
            alert_interval: Duration::from_secs(5),
            alert_min_samples: 20,
            worker_timeout: Duration::from_secs(20),
        }
    }
}

impl AggregatorConfig {
    /// The alert rules that are not `off`, by name.
    pub fn enabled_alert_rules(&self) -> impl Iterator<Item = (&str, &AlertRule)> {
        self.alert_rules.iter().filter_map(|(name, setting)| match setting {
            AlertSetting::On(rule) => Some((name.as_str(), rule)),
            AlertSetting::Off => None,
        })
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.window < Duration::from_secs(5) || self.flush_interval < Duration::from_millis(100) {
            return invalid("aggregator.window", "window must be at least 5s and flush_interval at least 100ms".into());
        }
        Ok(())
    }
}

pub(crate) fn invalid(field: &'static str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { field, message })
}

#[cfg(test)]
mod tests {
    use crate::{Config, CoordinatorConfig};

    fn load(pairs: &[(&str, &str)]) -> Result<Config, crate::ConfigError> {
        Config::load_from(None, pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    const TOKEN: &str = "s3cr3t-api-token-0123456789";

    #[test]
    fn api_token_from_the_environment_is_checked_and_never_shown() {
        let c = load(&[("TASKFLEET_COORDINATOR_API_TOKEN", TOKEN)]).unwrap();
        assert_eq!(c.coordinator.effective_api_token().unwrap().map(|t| t.expose().to_string()), Some(TOKEN.into()));
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains(TOKEN) && shown.contains(r#"api_token: "***""#), "{shown}");
        assert!(format!("{:?}", CoordinatorConfig::default()).contains(r#"api_token: """#));
        assert_eq!(CoordinatorConfig::default().effective_api_token().unwrap(), None);

        for bad in ["short-token", "a token with spaces in it", "tab\tseparated-token-xyz"] {
            let e = load(&[("TASKFLEET_COORDINATOR_API_TOKEN", bad)]).expect_err(bad).to_string();
            assert!(e.contains("coordinator.api_token"), "{bad:?}: {e}");
            assert!(!e.contains(bad), "the error quotes the token: {e}");
        }
        let e = load(&[("TASKFLEET_COORDINATOR_API_TOKEN", TOKEN), ("TASKFLEET_COORDINATOR_API_TOKEN_FILE", "/x")])
            .expect_err("both set")
            .to_string();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn api_token_file_is_read_trimmed_and_checked() {
        let path = std::env::temp_dir().join(format!("taskfleet-config-{}-api-token", std::process::id()));
        std::fs::write(&path, format!("  {TOKEN}\n")).unwrap();
        let file = path.display().to_string();
        let c = load(&[("TASKFLEET_COORDINATOR_API_TOKEN_FILE", &file)]).unwrap();
        assert_eq!(c.coordinator.effective_api_token().unwrap().map(|t| t.expose().to_string()), Some(TOKEN.into()));

        std::fs::write(&path, "tooshort\n").unwrap();
        let e = c.coordinator.effective_api_token().expect_err("short").to_string();
        assert!(
            e.contains("coordinator.api_token_file") && e.contains("at least 16") && !e.contains("tooshort"),
            "{e}"
        );
        let missing = CoordinatorConfig { api_token_file: format!("{file}.missing"), ..c.coordinator };
        assert!(missing.effective_api_token().expect_err("missing").to_string().contains("cannot read"));
        let _ = std::fs::remove_file(path);
    }
}
