//! The fleet's shared state in Redis: what every worker must see the same.
//!
//! - [`ResultCache`]: results of cacheable task kinds, with single-flight (identical tasks
//!   running at the same time run once; the others wait for that result).
//! - [`RateLimiter`]: named fleet-wide rate limits, one atomic GCRA script call per token.
//! - [`Breakers`]: circuit breakers per dependency, state kept in Redis.
//! - [`SemanticStore`]: the semantic cache's entries (embeddings and results) in Redis Streams,
//!   searched in each worker's memory ([`VectorIndex`]).
//!
//! Redis is an accelerator, not a source of truth. Every call has a timeout
//! (`redis.op_timeout`); when Redis does not answer, the call falls back (the cache is bypassed,
//! each worker enforces `policies.local_limit_share` of every limit itself, breakers keep local
//! state), the fallback is counted in `taskfleet_redis_fallback_total{op}` and logged once per
//! outage, and the connection is re-established in the background.

mod breaker;
mod cache;
mod limiter;
mod semantic;

pub use breaker::{BreakerSettings, BreakerState, Breakers, Grant, Permit};
pub use cache::{CacheClaim, CacheKey, CacheLease, CachedResult, ResultCache};
pub use limiter::{Decision, RateLimiter};
pub use semantic::{SemanticHit, SemanticKey, SemanticLookup, SemanticStore, VectorIndex, cosine, dot};

use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use taskfleet_config::{PoliciesConfig, RedisConfig};

/// Why a shared-state call failed. Calls on the hot path fall back instead of returning the
/// [`SharedStateErrorKind::Unavailable`] ones.
#[derive(Debug, thiserror::Error)]
pub enum SharedStateError {
    /// Not connected yet, or the connection is being re-established.
    #[error("redis is not connected")]
    NotConnected,
    /// The command did not answer within `redis.op_timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection broke.
    #[error("redis: {0}")]
    Redis(#[source] redis::RedisError),
    /// `redis.url` is not a Redis URL.
    #[error("invalid redis url: {0}")]
    Url(#[source] redis::RedisError),
    /// `redis.ca_file` cannot be read.
    #[error("cannot read redis.ca_file {0:?}: {1}")]
    CaFile(String, #[source] std::io::Error),
    /// A rate limit that `policies.rate_limits` does not define.
    #[error("no rate limit named {0:?} in policies.rate_limits")]
    UnknownLimit(String),
}

/// What a [`SharedStateError`] means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedStateErrorKind {
    /// Redis is down or slow: the same call may succeed later; meanwhile, fall back.
    Unavailable,
    /// The configuration is unusable: fix it (retrying fails the same way).
    Config,
    /// A task asked for a rate limit that is not configured: the task cannot run.
    UnknownLimit,
}

impl SharedStateError {
    /// What the failure means for the caller.
    pub fn kind(&self) -> SharedStateErrorKind {
        match self {
            SharedStateError::NotConnected | SharedStateError::Timeout(_) | SharedStateError::Redis(_) => {
                SharedStateErrorKind::Unavailable
            }
            SharedStateError::Url(_) | SharedStateError::CaFile(..) => SharedStateErrorKind::Config,
            SharedStateError::UnknownLimit(_) => SharedStateErrorKind::UnknownLimit,
        }
    }
}

/// A handle on the shared state; cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedState {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Option<ConnectionManager>>,
    prefix: String,
    op_timeout: Duration,
    up: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState").field("prefix", &self.prefix).field("up", &self.up).finish()
    }
}

impl SharedState {
    /// Starts connecting to Redis in the background and returns at once: until the first
    /// connection is made every call falls back, so a worker starts (and runs tasks) with Redis
    /// down.
    pub fn connect(config: &RedisConfig) -> Result<SharedState, SharedStateError> {
        // Commands are small and latency-bound: no Nagle delay (redis-rs leaves it on).
        let info =
            redis::IntoConnectionInfo::into_connection_info(config.url.as_str()).map_err(SharedStateError::Url)?;
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let info = info.set_tcp_settings(tcp);
        let client = if config.ca_file.is_empty() {
            redis::Client::open(info)
        } else {
            let root_cert =
                std::fs::read(&config.ca_file).map_err(|e| SharedStateError::CaFile(config.ca_file.clone(), e))?;
            redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) })
        }
        .map_err(SharedStateError::Url)?;
        let state = SharedState {
            inner: Arc::new(Inner {
                conn: Mutex::new(None),
                prefix: config.key_prefix.clone(),
                op_timeout: config.op_timeout,
                up: AtomicBool::new(false),
            }),
        };
        let weak = Arc::downgrade(&state.inner);
        let timeout = config.op_timeout.max(Duration::from_millis(50));
        tokio::spawn(async move {
            let settings = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout * 4))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(2));
            let mut wait = Duration::from_millis(100);
            loop {
                let Some(inner) = weak.upgrade() else { return };
                match ConnectionManager::new_with_config(client.clone(), settings.clone()).await {
                    Ok(conn) => {
                        if let Ok(mut slot) = inner.conn.lock() {
                            *slot = Some(conn);
                        }
                        inner.mark_up();
                        return;
                    }
                    Err(e) => {
                        if wait == Duration::from_millis(100) {
                            tracing::warn!(error = %e, "cannot connect to Redis yet; running on local fallbacks");
                        }
                    }
                }
                drop(inner);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        });
        Ok(state)
    }

    /// Connects and waits up to `wait` for the first connection (tests, tools).
    pub async fn connect_and_wait(config: &RedisConfig, wait: Duration) -> Result<SharedState, SharedStateError> {
        let state = SharedState::connect(config)?;
        let deadline = tokio::time::Instant::now() + wait;
        while !state.is_up() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(state)
    }

    /// True while the last Redis call succeeded.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// The key prefix of this fleet.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The result cache.
    pub fn cache(&self, policies: &PoliciesConfig) -> ResultCache {
        ResultCache::new(self.clone(), policies)
    }

    /// The semantic cache's store, with results up to `max_bytes` (`policies.cache_max_bytes`).
    /// Create one per process and clone it: clones share the in-memory indexes.
    pub fn semantic(&self, max_bytes: usize) -> SemanticStore {
        SemanticStore::new(self.clone(), max_bytes)
    }

    /// The fleet's rate limits as configured.
    pub fn rate_limiter(&self, policies: &PoliciesConfig) -> RateLimiter {
        RateLimiter::new(
            self.clone(),
            policies.rate_limits.clone(),
            policies.local_limit_share,
            policies.rate_limit_horizon,
        )
    }

    /// The fleet's circuit breakers as configured.
    pub fn breakers(&self, policies: &PoliciesConfig) -> Breakers {
        Breakers::new(self.clone(), BreakerSettings::from(policies))
    }

    /// Runs one command (or script invocation) with the op timeout; marks Redis down or up.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, SharedStateError> {
        let conn = self.inner.conn.lock().ok().and_then(|c| c.clone());
        let Some(conn) = conn else {
            self.inner.fell_back(op, &SharedStateError::NotConnected);
            return Err(SharedStateError::NotConnected);
        };
        let result = match tokio::time::timeout(self.inner.op_timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(SharedStateError::Redis(e)),
            Err(_) => Err(SharedStateError::Timeout(self.inner.op_timeout)),
        };
        match &result {
            Ok(_) => self.inner.mark_up(),
            Err(e) => self.inner.fell_back(op, e),
        }
        result
    }

    /// The longest wait for one Redis command (`redis.op_timeout`).
    pub(crate) fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    pub(crate) fn key(&self, parts: &[&str]) -> String {
        let mut k = self.inner.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }
}

impl Inner {
    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("Redis reachable: shared cache, rate limits and breakers in use");
            metrics::gauge!("taskfleet_redis_up").set(1.0);
        }
    }

    fn fell_back(&self, op: &'static str, error: &SharedStateError) {
        metrics::counter!("taskfleet_redis_fallback_total", "op" => op).increment(1);
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(%error, op, "Redis unreachable: cache bypassed, local rate limit shares and breakers until it is back");
            metrics::gauge!("taskfleet_redis_up").set(0.0);
        } else {
            tracing::debug!(%error, op, "Redis call fell back");
        }
    }
}

/// Microseconds since the Unix epoch (for local fallbacks; Redis scripts use Redis' clock).
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_url_is_a_config_error_and_an_outage_is_not() {
        let cfg = RedisConfig {
            url: "http://127.0.0.1:1".into(),
            key_prefix: "tf:".into(),
            op_timeout: Duration::from_millis(50),
            ..RedisConfig::default()
        };
        assert_eq!(SharedState::connect(&cfg).map(|_| ()).unwrap_err().kind(), SharedStateErrorKind::Config);
        // Nothing listens on port 1.
        let down = SharedState::connect(&RedisConfig { url: "redis://127.0.0.1:1".into(), ..cfg }).unwrap();
        let e =
            down.run("ping", async |mut c| redis::cmd("PING").query_async::<String>(&mut c).await).await.unwrap_err();
        assert_eq!(e.kind(), SharedStateErrorKind::Unavailable, "{e}");
    }
}
