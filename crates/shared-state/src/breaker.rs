//! Circuit breakers per dependency, their state shared through Redis.
//!
//! Closed: calls go through; `failures` failures within `window` open it. Open: calls are
//! refused until `cooldown` has passed, then the breaker is half-open. Half-open: up to
//! `successes` trial calls go through at a time; that many successes close it, one failure
//! opens it again. Successes in the closed state write nothing, so a healthy dependency costs
//! one round trip per call (the check). A trial permit the caller did not use (the call went to
//! another provider, or was answered 429) is given back with [`Breakers::give_back`], so the
//! next trial need not wait for the permit to expire after a cooldown.
//!
//! The Redis scripts and the local fallback implement the same state machine; the tests run
//! the same scenario against both.

use crate::{SharedState, now_us};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use taskfleet_config::PoliciesConfig;

/// KEYS[1]: breaker hash. ARGV: cooldown ms, trial calls. Returns {state, wait_ms, epoch};
/// state 0 closed, 1 open, 2 half-open (this call is a trial, taken in the half-open period
/// that began at `epoch`, ms).
const CHECK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'trials')
local state = s[1] or 'closed'
if state == 'closed' then return {0, 0} end
local cooldown = tonumber(ARGV[1])
local opened = tonumber(s[2] or '0')
if state == 'open' then
  if now - opened < cooldown then return {1, cooldown - (now - opened)} end
  redis.call('HSET', KEYS[1], 'state', 'half', 'opened_at', now, 'trials', 1, 'successes', 0)
  return {2, 0, now}
end
-- half-open: a bounded number of trials; trials lost with their workers expire after a cooldown
local trials = tonumber(s[3] or '0')
if trials < tonumber(ARGV[2]) or now - opened >= cooldown then
  if now - opened >= cooldown then
    redis.call('HSET', KEYS[1], 'opened_at', now, 'trials', 1)
    return {2, 0, now}
  end
  redis.call('HINCRBY', KEYS[1], 'trials', 1)
  return {2, 0, opened}
end
return {1, math.max(1, cooldown - (now - opened))}
"#;

/// KEYS[1]: breaker hash. ARGV: the epoch of an unused trial permit. Gives the permit back if
/// the breaker is still in the half-open period it was taken in (not reopened, closed, or
/// restarted after the trials expired). Returns 1 if it was given back.
const GIVE_BACK: &str = r#"
local s = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'trials')
if s[1] ~= 'half' or tonumber(s[2] or '0') ~= tonumber(ARGV[1]) or tonumber(s[3] or '0') < 1 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'trials', -1)
return 1
"#;

/// KEYS[1]: breaker hash. ARGV: ok (1/0), failures to open, window ms, successes to close.
/// Returns the state after the call: 0 closed, 1 open, 2 half-open.
const RECORD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'state', 'failures', 'window_start', 'successes')
local state = s[1] or 'closed'
local ok = ARGV[1] == '1'
if state == 'half' then
  if ok then
    local n = redis.call('HINCRBY', KEYS[1], 'successes', 1)
    if n >= tonumber(ARGV[4]) then
      redis.call('DEL', KEYS[1])
      return 0
    end
    redis.call('HINCRBY', KEYS[1], 'trials', -1)
    return 2
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
  return 1
end
if state == 'open' or ok then return state == 'open' and 1 or 0 end
local window = tonumber(ARGV[3])
local start = tonumber(s[3] or '0')
local failures = tonumber(s[2] or '0')
if now - start > window then start = now; failures = 0 end
failures = failures + 1
if failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'failures', 0, 'window_start', now)
  redis.call('PEXPIRE', KEYS[1], 86400000)
  return 1
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', failures, 'window_start', start)
redis.call('PEXPIRE', KEYS[1], window * 2)
return 0
"#;

/// A breaker's thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Failures within `window` that open the breaker.
    pub failures: u32,
    /// Window of the failure count.
    pub window: Duration,
    /// Time open before trial calls.
    pub cooldown: Duration,
    /// Trial successes that close it.
    pub successes: u32,
}

impl From<&PoliciesConfig> for BreakerSettings {
    fn from(p: &PoliciesConfig) -> Self {
        BreakerSettings {
            failures: p.breaker_failures,
            window: p.breaker_window,
            cooldown: p.breaker_cooldown,
            successes: p.breaker_successes,
        }
    }
}

/// A breaker's state as seen by one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused.
    Open,
    /// Trial calls go through.
    HalfOpen,
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Go ahead; report the outcome with [`Breakers::record`] passing [`Grant::state`], or, if
    /// the call is not made after all, give the grant back with [`Breakers::give_back`].
    Granted(Grant),
    /// The breaker is open: do not call before this delay.
    Refused {
        /// Time until the breaker lets trial calls through.
        retry_after: Duration,
    },
}

/// A call's permission to go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The state it was granted in: `HalfOpen` for a trial call.
    pub state: BreakerState,
    /// A trial's half-open period (when it began, ms); 0 when closed.
    epoch: i64,
}

impl Grant {
    fn closed() -> Grant {
        Grant { state: BreakerState::Closed, epoch: 0 }
    }

    fn trial(epoch: i64) -> Grant {
        Grant { state: BreakerState::HalfOpen, epoch }
    }
}

impl Permit {
    /// The state the call was granted in; `None` if it was refused.
    pub fn granted(&self) -> Option<BreakerState> {
        match self {
            Permit::Granted(g) => Some(g.state),
            Permit::Refused { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Local {
    state: BreakerState,
    failures: u32,
    window_start: i64,
    opened_at: i64,
    trials: u32,
    successes: u32,
}

impl Default for Local {
    fn default() -> Self {
        Local { state: BreakerState::Closed, failures: 0, window_start: 0, opened_at: 0, trials: 0, successes: 0 }
    }
}

/// The fleet's circuit breakers, one per dependency name.
#[derive(Clone, Debug)]
pub struct Breakers {
    state: SharedState,
    settings: BreakerSettings,
    check: Arc<redis::Script>,
    record: Arc<redis::Script>,
    give_back: Arc<redis::Script>,
    local: Arc<Mutex<HashMap<String, Local>>>,
}

impl Breakers {
    pub(crate) fn new(state: SharedState, settings: BreakerSettings) -> Self {
        Breakers {
            state,
            settings,
            check: Arc::new(redis::Script::new(CHECK)),
            record: Arc::new(redis::Script::new(RECORD)),
            give_back: Arc::new(redis::Script::new(GIVE_BACK)),
            local: Default::default(),
        }
    }

    /// Asks whether a call to `dependency` may go ahead.
    pub async fn check(&self, dependency: &str) -> Permit {
        let key = self.state.key(&["breaker", dependency]);
        let script = self.check.clone();
        let (cooldown, trials) = (self.settings.cooldown.as_millis() as u64, self.settings.successes);
        let answer = self
            .state
            .run("breaker_check", async move |mut conn| {
                script.key(&key).arg(cooldown).arg(trials).invoke_async::<Vec<i64>>(&mut conn).await
            })
            .await;
        let permit = match answer.as_deref() {
            Ok([0, ..]) => Permit::Granted(Grant::closed()),
            Ok([2, _, epoch]) => Permit::Granted(Grant::trial(*epoch)),
            Ok([_, wait, ..]) => Permit::Refused { retry_after: Duration::from_millis((*wait).max(1) as u64) },
            Ok(_) => Permit::Refused { retry_after: self.settings.cooldown.max(Duration::from_millis(1)) },
            Err(_) => self.check_local(dependency),
        };
        if let Permit::Refused { .. } = permit {
            metrics::counter!("taskfleet_breaker_refused_total", "dependency" => dependency.to_string()).increment(1);
        }
        permit
    }

    /// Reports a call's outcome. `seen` is the state its permit was granted in: a success seen
    /// closed changes nothing and costs no round trip.
    pub async fn record(&self, dependency: &str, seen: BreakerState, ok: bool) -> BreakerState {
        if ok && seen == BreakerState::Closed {
            return BreakerState::Closed;
        }
        let key = self.state.key(&["breaker", dependency]);
        let script = self.record.clone();
        let s = self.settings;
        let answer = self
            .state
            .run("breaker_record", async move |mut conn| {
                script
                    .key(&key)
                    .arg(if ok { 1 } else { 0 })
                    .arg(s.failures)
                    .arg(s.window.as_millis() as u64)
                    .arg(s.successes)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        let after = match answer {
            Ok(0) => BreakerState::Closed,
            Ok(1) => BreakerState::Open,
            Ok(_) => BreakerState::HalfOpen,
            Err(_) => self.record_local(dependency, ok),
        };
        if after != seen {
            tracing::info!(dependency, from = ?seen, to = ?after, "circuit breaker changed state");
            let state = match after {
                BreakerState::Closed => 0.0,
                BreakerState::HalfOpen => 1.0,
                BreakerState::Open => 2.0,
            };
            metrics::gauge!("taskfleet_breaker_state", "dependency" => dependency.to_string()).set(state);
        }
        after
    }

    /// Gives back a permit whose call was not made (its provider's rate limit had no token, or
    /// it answered 429): a trial permit becomes free at once for the next call, if the breaker
    /// is still in the half-open period it was granted in. A closed grant costs nothing.
    pub async fn give_back(&self, dependency: &str, grant: Grant) {
        if grant.state != BreakerState::HalfOpen {
            return;
        }
        let key = self.state.key(&["breaker", dependency]);
        let script = self.give_back.clone();
        let answer = self
            .state
            .run("breaker_give_back", async move |mut conn| {
                script.key(&key).arg(grant.epoch).invoke_async::<i64>(&mut conn).await
            })
            .await;
        if answer.is_err() {
            self.give_back_local(dependency, grant.epoch);
        }
    }

    fn give_back_local(&self, dependency: &str, epoch: i64) {
        let Ok(mut all) = self.local.lock() else { return };
        if let Some(b) = all.get_mut(dependency)
            && b.state == BreakerState::HalfOpen
            && b.opened_at == epoch
        {
            b.trials = b.trials.saturating_sub(1);
        }
    }

    fn check_local(&self, dependency: &str) -> Permit {
        let now = now_us() / 1000;
        let cooldown = self.settings.cooldown.as_millis() as i64;
        let Ok(mut all) = self.local.lock() else { return Permit::Granted(Grant::closed()) };
        let b = all.entry(dependency.to_string()).or_default();
        match b.state {
            BreakerState::Closed => Permit::Granted(Grant::closed()),
            BreakerState::Open if now - b.opened_at < cooldown => {
                Permit::Refused { retry_after: Duration::from_millis((cooldown - (now - b.opened_at)) as u64) }
            }
            BreakerState::Open => {
                *b = Local { state: BreakerState::HalfOpen, opened_at: now, trials: 1, ..Local::default() };
                Permit::Granted(Grant::trial(now))
            }
            BreakerState::HalfOpen if b.trials < self.settings.successes || now - b.opened_at >= cooldown => {
                if now - b.opened_at >= cooldown {
                    b.opened_at = now;
                    b.trials = 1;
                } else {
                    b.trials += 1;
                }
                Permit::Granted(Grant::trial(b.opened_at))
            }
            BreakerState::HalfOpen => {
                Permit::Refused { retry_after: Duration::from_millis((cooldown - (now - b.opened_at)).max(1) as u64) }
            }
        }
    }

    fn record_local(&self, dependency: &str, ok: bool) -> BreakerState {
        let now = now_us() / 1000;
        let Ok(mut all) = self.local.lock() else { return BreakerState::Closed };
        let b = all.entry(dependency.to_string()).or_default();
        match (b.state, ok) {
            (BreakerState::HalfOpen, true) => {
                b.successes += 1;
                if b.successes >= self.settings.successes {
                    *b = Local::default();
                } else {
                    b.trials = b.trials.saturating_sub(1);
                }
            }
            (BreakerState::HalfOpen, false) => {
                b.state = BreakerState::Open;
                b.opened_at = now;
            }
            (BreakerState::Open, _) | (BreakerState::Closed, true) => {}
            (BreakerState::Closed, false) => {
                if now - b.window_start > self.settings.window.as_millis() as i64 {
                    b.window_start = now;
                    b.failures = 0;
                }
                b.failures += 1;
                if b.failures >= self.settings.failures {
                    *b = Local { state: BreakerState::Open, opened_at: now, window_start: now, ..Local::default() };
                }
            }
        }
        b.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_config::RedisConfig;

    async fn scenario(breakers: &Breakers) {
        let dep = "search-api";
        // Closed: failures below the threshold keep it closed.
        for _ in 0..2 {
            assert_eq!(breakers.check(dep).await, Permit::Granted(Grant::closed()));
            assert_eq!(breakers.record(dep, BreakerState::Closed, false).await, BreakerState::Closed);
        }
        // The third failure opens it.
        assert_eq!(breakers.record(dep, BreakerState::Closed, false).await, BreakerState::Open);
        let Permit::Refused { retry_after } = breakers.check(dep).await else {
            panic!("open breaker let a call through")
        };
        assert!(retry_after <= Duration::from_millis(200), "{retry_after:?}");
        // After the cooldown: two trials at a time, a third is refused.
        tokio::time::sleep(retry_after + Duration::from_millis(20)).await;
        assert_eq!(breakers.check(dep).await.granted(), Some(BreakerState::HalfOpen));
        assert_eq!(breakers.check(dep).await.granted(), Some(BreakerState::HalfOpen));
        assert!(matches!(breakers.check(dep).await, Permit::Refused { .. }));
        // A failed trial opens it again.
        assert_eq!(breakers.record(dep, BreakerState::HalfOpen, false).await, BreakerState::Open);
        assert!(matches!(breakers.check(dep).await, Permit::Refused { .. }));
        tokio::time::sleep(Duration::from_millis(220)).await;
        // Two successful trials close it.
        assert_eq!(breakers.check(dep).await.granted(), Some(BreakerState::HalfOpen));
        assert_eq!(breakers.record(dep, BreakerState::HalfOpen, true).await, BreakerState::HalfOpen);
        assert_eq!(breakers.check(dep).await.granted(), Some(BreakerState::HalfOpen));
        assert_eq!(breakers.record(dep, BreakerState::HalfOpen, true).await, BreakerState::Closed);
        assert_eq!(breakers.check(dep).await, Permit::Granted(Grant::closed()));
    }

    /// A half-open breaker's trial permit given back unused is granted again at once; a
    /// permit of an earlier half-open period is not given back twice.
    async fn give_back_scenario(breakers: &Breakers) {
        let dep = "chat-api";
        for _ in 0..3 {
            breakers.record(dep, BreakerState::Closed, false).await;
        }
        let Permit::Refused { retry_after } = breakers.check(dep).await else { panic!("not open") };
        tokio::time::sleep(retry_after + Duration::from_millis(20)).await;
        let Permit::Granted(first) = breakers.check(dep).await else { panic!("no trial") };
        let Permit::Granted(second) = breakers.check(dep).await else { panic!("no second trial") };
        assert_eq!((first.state, second.state), (BreakerState::HalfOpen, BreakerState::HalfOpen));
        assert!(matches!(breakers.check(dep).await, Permit::Refused { .. }), "both trials are out");
        // The first trial's provider had no token: its permit is given back and the next call
        // is a trial at once, long before the permits would expire.
        breakers.give_back(dep, first).await;
        let Permit::Granted(again) = breakers.check(dep).await else { panic!("the given-back permit was not granted") };
        assert_eq!(again.state, BreakerState::HalfOpen);
        assert!(matches!(breakers.check(dep).await, Permit::Refused { .. }), "one permit given back, one granted");
        // The trials fail: the breaker reopens, then half-opens anew. A permit of the earlier
        // half-open period changes nothing.
        assert_eq!(breakers.record(dep, BreakerState::HalfOpen, false).await, BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(220)).await;
        let Permit::Granted(_) = breakers.check(dep).await else { panic!("no trial after reopening") };
        let Permit::Granted(_) = breakers.check(dep).await else { panic!("no second trial after reopening") };
        breakers.give_back(dep, second).await;
        assert!(matches!(breakers.check(dep).await, Permit::Refused { .. }), "a stale permit was given back");
        // A closed grant costs nothing and changes nothing.
        breakers.give_back("healthy", Grant::closed()).await;
        assert_eq!(breakers.check("healthy").await, Permit::Granted(Grant::closed()));
    }

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failures: 3,
            window: Duration::from_secs(10),
            cooldown: Duration::from_millis(200),
            successes: 2,
        }
    }

    #[tokio::test]
    async fn shared_state_machine_in_redis() {
        let prefix = taskfleet_test_support::RedisPrefix::new("breaker");
        let redis = RedisConfig {
            url: prefix.url.clone(),
            key_prefix: prefix.prefix.clone(),
            op_timeout: Duration::from_millis(500),
            ..RedisConfig::default()
        };
        let a = SharedState::connect_and_wait(&redis, Duration::from_secs(5)).await.unwrap();
        let breakers = Breakers::new(a, settings());
        scenario(&breakers).await;
        give_back_scenario(&breakers).await;
        // Another worker sees the state the first one wrote.
        let b = Breakers::new(SharedState::connect_and_wait(&redis, Duration::from_secs(5)).await.unwrap(), settings());
        for _ in 0..3 {
            breakers.record("other", BreakerState::Closed, false).await;
        }
        assert!(matches!(b.check("other").await, Permit::Refused { .. }));
    }

    #[tokio::test]
    async fn same_state_machine_locally() {
        let redis = RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            key_prefix: "tf:none:".into(),
            op_timeout: Duration::from_millis(100),
            ..RedisConfig::default()
        };
        let breakers = Breakers::new(SharedState::connect(&redis).unwrap(), settings());
        scenario(&breakers).await;
        give_back_scenario(&breakers).await;
    }
}
