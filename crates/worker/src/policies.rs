//! The fleet-wide policies as this worker applies them: the shared result cache, rate limits,
//! breakers, deferral bounds and retry backoff.

use crate::handler::Shared;
use crate::providers::Providers;
use crate::semantic::SemanticCache;
use crate::{RetryPolicy, WorkerError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_config::{CacheSpec, Config};
use taskfleet_proto::TaskEnvelope;
use taskfleet_shared_state::{ResultCache, SharedState};

/// What every attempt consults before and after it runs.
pub(crate) struct Policies {
    /// The fleet's result cache.
    pub cache: ResultCache,
    /// The semantic cache (also given to handlers).
    pub semantic: SemanticCache,
    /// Rate limits and breakers in Redis, also given to handlers.
    pub shared: Arc<Shared>,
    kind_limits: HashMap<String, Vec<String>>,
    /// Deferrals up to this long wait in memory; longer ones go back to the coordinator.
    pub defer_hold_max: Duration,
    /// Longest semantic cache lookup at admission; past it the task runs without the cache.
    pub semantic_lookup_timeout: Duration,
    /// How long a task may be deferred for open breakers before an attempt fails.
    pub breaker_max_wait: Duration,
    retry_default: RetryPolicy,
    retry_by_kind: HashMap<String, RetryPolicy>,
}

impl Policies {
    /// [`connect_with`](Self::connect_with) an HTTP client of its own, built from the
    /// configuration.
    #[cfg(test)]
    pub fn connect(
        cfg: &Config,
        cache_by_kind: &HashMap<String, CacheSpec>,
        retry_by_kind: HashMap<String, RetryPolicy>,
    ) -> Result<Policies, WorkerError> {
        Self::connect_with(cfg, cache_by_kind, retry_by_kind, &Providers::new(&cfg.providers)?)
    }

    /// Connects to the shared state with the configured policies and the builder's per-kind
    /// cache and retry policies; the semantic cache embeds with `providers` (the worker's).
    pub fn connect_with(
        cfg: &Config,
        cache_by_kind: &HashMap<String, CacheSpec>,
        retry_by_kind: HashMap<String, RetryPolicy>,
        providers: &Providers,
    ) -> Result<Policies, WorkerError> {
        let state = SharedState::connect(&cfg.redis)?;
        let mut cache = state.cache(&cfg.policies);
        for (kind, spec) in cache_by_kind {
            cache = cache.with_policy(kind.clone(), spec.clone());
        }
        let limiter = state.rate_limiter(&cfg.policies);
        let semantic = SemanticCache::new(&state, cfg, providers);
        let kind_limits = cfg.policies.kind_limits.iter().map(|(k, limits)| (k.clone(), limits.0.clone())).collect();
        Ok(Policies {
            semantic: semantic.clone(),
            shared: Arc::new(Shared {
                limiter,
                breakers: state.breakers(&cfg.policies),
                cache: cache.clone(),
                semantic,
            }),
            cache,
            kind_limits,
            defer_hold_max: cfg.policies.defer_hold_max,
            semantic_lookup_timeout: cfg.policies.semantic_lookup_timeout,
            breaker_max_wait: cfg.policies.breaker_max_wait,
            retry_default: RetryPolicy {
                base: cfg.worker.retry_base,
                factor: cfg.worker.retry_factor,
                max: cfg.worker.retry_max,
            },
            retry_by_kind,
        })
    }

    /// The limits a task takes a token from: its kind's, then its own.
    pub fn limits_for(&self, env: &TaskEnvelope) -> Vec<String> {
        let mut out = self.kind_limits.get(&env.kind).cloned().unwrap_or_default();
        for l in &env.limits {
            if !out.contains(l) {
                out.push(l.clone());
            }
        }
        out
    }

    /// The backoff for a task: its own, else its kind's, else the default.
    pub fn retry_for(&self, env: &TaskEnvelope) -> RetryPolicy {
        if let Some(r) = env.retry {
            return RetryPolicy {
                base: Duration::from_millis(r.base_ms),
                factor: r.factor,
                max: Duration::from_millis(r.max_ms),
            };
        }
        self.retry_by_kind.get(&env.kind).copied().unwrap_or(self.retry_default)
    }
}
