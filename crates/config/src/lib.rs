//! Configuration of every taskfleet service: one root [`Config`] made of per-component
//! sections, loaded as defaults → TOML file → `TASKFLEET_*` environment, then validated.
//!
//! The file is named by `TASKFLEET_CONFIG` (or passed to [`Config::load_from`]); unknown keys in
//! it are errors, so a typo fails at start-up instead of being ignored. Every field can be set by
//! the environment variable `TASKFLEET_<SECTION>_<FIELD>` (upper case), e.g.
//! `TASKFLEET_WORKER_MAX_CONCURRENT_TASKS=32`; where a field name is unique across sections the
//! short form `TASKFLEET_<FIELD>` works too (`TASKFLEET_MAX_CONCURRENT_TASKS=32`). Lists are
//! comma-separated (`TASKFLEET_WORKER_QUEUES=default,llm`), maps are `key=value` pairs
//! (`TASKFLEET_PRIORITY_WEIGHTS=critical=16,high=8,normal=4,low=1`), durations are humantime
//! strings (`30s`, `250ms`). Any other `TASKFLEET_*` variable is an error, except those other
//! parts of the project read (the mock API's, the tests'). Values in small text formats (rate
//! limits, cache policies, chains, prices, alert rules) are parsed once, at load, into typed
//! values ([`RateLimitSpec`], [`CacheSpec`], …); an error names the variable or file key that
//! set the value.

mod connections;
mod loader;
mod policies;
mod redact;
#[cfg(test)]
mod reference;
mod sections;
mod specs;

pub use connections::*;
pub use loader::{ConfigError, Origin};
pub use policies::*;
pub use redact::{REDACTED, redact_url, redact_urls};
pub use sections::*;
pub use specs::*;

use serde::{Deserialize, Serialize};

/// The whole fleet's configuration; each binary reads the sections it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection, subject names and JetStream limits.
    pub nats: NatsConfig,
    /// Postgres connection.
    pub database: DatabaseConfig,
    /// Redis connection.
    pub redis: RedisConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// The coordinator service.
    pub coordinator: CoordinatorConfig,
    /// Runs, spawns and loops: their limits, enforced by the coordinator.
    pub workflows: WorkflowsConfig,
    /// Worker processes.
    pub worker: WorkerConfig,
    /// The metrics aggregator.
    pub aggregator: AggregatorConfig,
    /// Rate limits, result cache and circuit breakers shared through Redis.
    pub policies: PoliciesConfig,
    /// Outside services called by the built-in `http` and `llm.chat` handlers.
    pub providers: ProvidersConfig,
}

impl Config {
    /// Loads from the file named by `TASKFLEET_CONFIG` (if set) and the process environment.
    pub fn load() -> Result<Config, ConfigError> {
        let file = std::env::var_os("TASKFLEET_CONFIG").map(std::path::PathBuf::from);
        Config::load_from(file.as_deref(), std::env::vars())
    }

    /// Loads from an optional TOML file and the given environment variables, then validates.
    pub fn load_from(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let config = loader::load(file, env)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks cross-field rules that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.database.validate()?;
        self.redis.validate()?;
        self.coordinator.validate()?;
        self.workflows.validate()?;
        self.worker.validate(&self.nats)?;
        self.policies.validate()?;
        self.aggregator.validate()?;
        self.providers.validate(&self.policies)?;
        let own = format!("{}.", self.nats.subject_prefix);
        if self.coordinator.reply_prefix.starts_with(&own) || own.starts_with(&self.coordinator.reply_prefix) {
            return Err(ConfigError::Invalid {
                field: "coordinator.reply_prefix",
                message: format!("{:?} overlaps the fleet's own subjects ({own}…)", self.coordinator.reply_prefix),
            });
        }
        Ok(())
    }

    /// The subject and stream names of this fleet.
    pub fn subjects(&self) -> taskfleet_proto::Subjects {
        taskfleet_proto::Subjects::new(&self.nats.subject_prefix, &self.nats.stream_prefix)
    }
}
