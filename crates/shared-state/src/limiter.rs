//! Fleet-wide rate limits: GCRA (generic cell rate algorithm) in one atomic Redis script, on
//! Redis' clock, so every worker draws from the same budget.
//!
//! A caller may *reserve* a token up to `horizon` ahead: the script books the next free slot
//! and answers how long to wait for it. Waiting callers therefore hold distinct slots instead of
//! all retrying when the next token frees up, so a saturated limit costs about one round trip
//! per call and is still never exceeded. A slot further away than the horizon is refused with
//! the time until it comes within the horizon (bounding how long a reservation can hold back
//! more urgent work).

use crate::{SharedState, SharedStateError, now_us};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use taskfleet_config::RateLimitSpec;

/// KEYS[1]: the limit's theoretical arrival time (TAT, µs). ARGV: emission interval (µs),
/// burst, reservation horizon (µs). Returns {granted (0/1), wait_us}: granted after waiting
/// `wait_us`, or refused for `wait_us`.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - burst * interval - now
if wait > horizon then
  return {0, wait - horizon}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
if wait < 0 then wait = 0 end
return {1, wait}
"#;

/// The answer to a token request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead now.
    Allowed,
    /// A token is booked for this caller: go ahead after `wait` (without asking again).
    Reserved {
        /// Time until the booked slot.
        wait: Duration,
    },
    /// No slot within the horizon: ask again after `retry_after`.
    Denied {
        /// Time until a slot comes within the horizon.
        retry_after: Duration,
    },
}

/// The fleet's named rate limits.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    state: SharedState,
    limits: Arc<BTreeMap<String, RateLimitSpec>>,
    script: Arc<redis::Script>,
    local: Arc<Mutex<HashMap<String, i64>>>,
    local_share: f64,
    horizon: Duration,
}

impl RateLimiter {
    pub(crate) fn new(
        state: SharedState,
        limits: BTreeMap<String, RateLimitSpec>,
        local_share: f64,
        horizon: Duration,
    ) -> Self {
        RateLimiter {
            state,
            limits: Arc::new(limits),
            script: Arc::new(redis::Script::new(GCRA)),
            local: Default::default(),
            local_share,
            horizon,
        }
    }

    /// True when `name` is a configured limit.
    pub fn knows(&self, name: &str) -> bool {
        self.limits.contains_key(name)
    }

    /// Takes one token of limit `name`, fleet-wide; with Redis down, from this worker's share.
    /// The only error is [`SharedStateError::UnknownLimit`]: an outage never fails the call.
    pub async fn acquire(&self, name: &str) -> Result<Decision, SharedStateError> {
        let spec = *self.limits.get(name).ok_or_else(|| SharedStateError::UnknownLimit(name.to_string()))?;
        let interval_us = spec.interval().as_micros().max(1) as i64;
        let horizon_us = self.horizon.as_micros() as i64;
        let key = self.state.key(&["limit", name]);
        let script = self.script.clone();
        let answer = self
            .state
            .run("rate_limit", async move |mut conn| {
                script
                    .key(&key)
                    .arg(interval_us)
                    .arg(spec.burst)
                    .arg(horizon_us)
                    .invoke_async::<(i64, i64)>(&mut conn)
                    .await
            })
            .await;
        let decision = match answer {
            Ok((1, wait_us)) => granted(wait_us),
            Ok((_, wait_us)) => Decision::Denied { retry_after: Duration::from_micros(wait_us.max(1) as u64) },
            Err(_) => self.acquire_local(name, spec),
        };
        let outcome = match decision {
            Decision::Allowed => "allowed",
            Decision::Reserved { .. } => "reserved",
            Decision::Denied { .. } => "denied",
        };
        metrics::counter!("taskfleet_rate_limit_total", "limit" => name.to_string(), "outcome" => outcome).increment(1);
        Ok(decision)
    }

    /// The same algorithm in process, on this worker's share of the limit.
    fn acquire_local(&self, name: &str, spec: RateLimitSpec) -> Decision {
        let interval = (spec.interval().as_micros() as f64 / self.local_share).max(1.0) as i64;
        let burst = ((spec.burst as f64 * self.local_share).floor() as i64).max(1);
        let now = now_us();
        let horizon = self.horizon.as_micros() as i64;
        let Ok(mut tats) = self.local.lock() else { return Decision::Allowed };
        let tat = tats.get(name).copied().unwrap_or(0).max(now);
        let new_tat = tat + interval;
        let wait = new_tat - burst * interval - now;
        if wait > horizon {
            return Decision::Denied { retry_after: Duration::from_micros((wait - horizon) as u64) };
        }
        tats.insert(name.to_string(), new_tat);
        granted(wait)
    }
}

fn granted(wait_us: i64) -> Decision {
    if wait_us <= 0 { Decision::Allowed } else { Decision::Reserved { wait: Duration::from_micros(wait_us as u64) } }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_config::{PoliciesConfig, RedisConfig};

    fn config(prefix: &str, url: &str) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            key_prefix: prefix.into(),
            op_timeout: Duration::from_millis(200),
            ..RedisConfig::default()
        }
    }

    fn policies(spec: &str) -> PoliciesConfig {
        let mut p = PoliciesConfig::default();
        p.rate_limits.insert("api".into(), spec.parse().unwrap());
        p.rate_limit_horizon = Duration::from_millis(500);
        p
    }

    #[tokio::test]
    async fn burst_then_steady_rate_fleet_wide() {
        let prefix = taskfleet_test_support::RedisPrefix::new("limiter");
        let redis = config(&prefix.prefix, &prefix.url);
        // Two workers' limiters on the same Redis share one budget.
        let a = SharedState::connect_and_wait(&redis, Duration::from_secs(5)).await.unwrap();
        let b = SharedState::connect_and_wait(&redis, Duration::from_secs(5)).await.unwrap();
        assert!(a.is_up());
        let la = a.rate_limiter(&policies("10/s burst 5"));
        let lb = b.rate_limiter(&policies("10/s burst 5"));
        let (mut allowed, mut reserved, mut denied) = (0, Vec::new(), 0);
        for i in 0..20 {
            let l = if i % 2 == 0 { &la } else { &lb };
            match l.acquire("api").await.unwrap() {
                Decision::Allowed => allowed += 1,
                Decision::Reserved { wait } => reserved.push(wait),
                Decision::Denied { .. } => denied += 1,
            }
        }
        // The burst goes at once (plus at most one token that came due while the loop ran);
        // the next callers book the following slots, 100 ms apart, up to the 500 ms horizon.
        assert!((5..=6).contains(&allowed), "allowed {allowed}");
        assert!((5..=6).contains(&reserved.len()), "{reserved:?}");
        assert!(reserved.windows(2).all(|w| w[1] > w[0] + Duration::from_millis(90)), "{reserved:?}");
        assert!(reserved.iter().all(|w| *w <= Duration::from_millis(500)), "{reserved:?}");
        assert_eq!(allowed + reserved.len() + denied, 20);
        let Decision::Denied { retry_after } = la.acquire("api").await.unwrap() else { panic!("beyond the horizon") };
        assert!(retry_after <= Duration::from_millis(150), "{retry_after:?}");
        let unknown = la.acquire("nope").await.unwrap_err();
        assert_eq!(unknown.kind(), crate::SharedStateErrorKind::UnknownLimit, "{unknown}");
    }

    #[tokio::test]
    async fn falls_back_to_a_local_share_without_redis() {
        // Nothing listens on port 1.
        let state = SharedState::connect(&config("tf:none:", "redis://127.0.0.1:1")).unwrap();
        let mut p = policies("100/s burst 8");
        p.local_limit_share = 0.25;
        let l = state.rate_limiter(&p);
        let mut allowed = 0;
        for _ in 0..10 {
            if l.acquire("api").await.unwrap() == Decision::Allowed {
                allowed += 1;
            }
        }
        // A quarter of the burst (2) at once; the rest are booked 40 ms apart (a quarter of
        // the rate) or refused beyond the horizon.
        assert_eq!(allowed, 2);
        assert!(!state.is_up());
    }
}
