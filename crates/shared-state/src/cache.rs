//! The shared result cache with single-flight.
//!
//! A kind's cache policy names a TTL and the payload fields that make the key. Before running a
//! task the worker *claims* its key in one script call: a stored result is a hit; otherwise the
//! first claimant takes a lease (a lock lasting `policies.cache_lease`) and runs the task, and
//! any identical task arriving meanwhile waits for that result instead of running again. The
//! leader renews the lease every third of `cache_lease` while it computes ([`CacheLease`]), and
//! stores the result and drops the lease in one call; a leader that fails drops the lease, and a
//! leader that dies stops renewing, so its lease lapses within `cache_lease` and a waiter then
//! runs the task itself.
use crate::SharedState;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_config::{CacheSpec, PoliciesConfig};

/// With ARGV[3], first deletes the stored value if it is still ARGV[3] (an entry the caller
/// could not read), so that the claim takes a real lease instead of leading without one.
const CLAIM: &str = r#"
if ARGV[3] and redis.call('GET', KEYS[1]) == ARGV[3] then redis.call('DEL', KEYS[1]) end
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end
return {3, ''}
"#;

const STORE: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

/// Where a task's result lives in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// Task kind.
    pub kind: String,
    /// SHA-256 of the canonical JSON of the key fields, hex.
    pub hash: String,
    /// How long a stored result lives.
    pub ttl: Duration,
}

impl CacheKey {
    /// The key of `payload` under `spec`: the named fields (a missing field counts as null) or
    /// the whole payload, canonicalised (object keys sorted) so field order does not matter.
    pub fn new(kind: &str, payload: &Value, spec: &CacheSpec) -> CacheKey {
        let mut hasher = Sha256::new();
        let mut buf = String::new();
        if spec.key_fields.is_empty() {
            canonical(payload, &mut buf);
        } else {
            for field in &spec.key_fields {
                buf.push_str(&serde_json::to_string(field).unwrap_or_default());
                buf.push('=');
                canonical(payload.get(field).unwrap_or(&Value::Null), &mut buf);
                buf.push(';');
            }
        }
        hasher.update(buf.as_bytes());
        CacheKey { kind: kind.to_string(), hash: hex::encode(hasher.finalize()), ttl: spec.ttl }
    }
}

/// Writes JSON with object keys in sorted order.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A result found in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedResult {
    /// The handler's output.
    pub result: Value,
    /// What computing it cost, in US dollars (saved by this hit).
    pub cost_usd: Option<f64>,
}

/// The outcome of claiming a key.
#[derive(Debug, PartialEq)]
pub enum CacheClaim {
    /// A result is stored: use it.
    Hit(CachedResult),
    /// Nobody runs this yet: run it, then [`ResultCache::store`] (or `release`) with this lease.
    Leader(CacheLease),
    /// An identical task is running elsewhere: wait for its result.
    Follower,
    /// Redis is unreachable: run without the cache.
    Unavailable,
}

/// A single-flight lease this process holds: while it lives, a background task renews it every
/// third of `policies.cache_lease` (a `PEXPIRE` only while the lease is still this owner's).
/// [`ResultCache::store`] and [`ResultCache::release`] take it and stop the renewals; dropping
/// it stops them too, so a lease forgotten by its holder lapses like a dead holder's.
///
/// One small task per held lease rather than renewals on the worker's heartbeat loop: leases are
/// also taken by inline calls (`Providers::chat`/`http`) deep inside handlers, which know the
/// cache but not the worker's loops; the heartbeat's period follows `ack_wait`, not the lease;
/// and a spawned timer costs no Redis call until its first renewal, so a task that ends within a
/// third of the lease (most cached calls) makes none.
pub struct CacheLease {
    owner: String,
    renewal: tokio::task::AbortHandle,
}

impl CacheLease {
    /// The lease's owner token (the value of the lease key in Redis).
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

impl Drop for CacheLease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl std::fmt::Debug for CacheLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLease").field("owner", &self.owner).finish()
    }
}

impl PartialEq for CacheLease {
    fn eq(&self, other: &Self) -> bool {
        self.owner == other.owner
    }
}

/// The shared result cache.
#[derive(Clone, Debug)]
pub struct ResultCache {
    state: SharedState,
    policies: Arc<BTreeMap<String, CacheSpec>>,
    max_bytes: usize,
    wait: Duration,
    lease: Duration,
    claim: Arc<redis::Script>,
    store: Arc<redis::Script>,
    release: Arc<redis::Script>,
    renew: Arc<redis::Script>,
}

impl ResultCache {
    pub(crate) fn new(state: SharedState, policies: &PoliciesConfig) -> Self {
        ResultCache {
            state,
            policies: Arc::new(policies.cache.clone()),
            max_bytes: policies.cache_max_bytes,
            wait: policies.single_flight_wait,
            lease: policies.cache_lease.max(Duration::from_millis(3)),
            claim: Arc::new(redis::Script::new(CLAIM)),
            store: Arc::new(redis::Script::new(STORE)),
            release: Arc::new(redis::Script::new(RELEASE)),
            renew: Arc::new(redis::Script::new(RENEW)),
        }
    }

    /// Adds or replaces the policy of one kind (e.g. from a worker's builder).
    pub fn with_policy(mut self, kind: impl Into<String>, spec: CacheSpec) -> Self {
        Arc::make_mut(&mut self.policies).insert(kind.into(), spec);
        self
    }

    /// The key of a task, if its kind is cacheable.
    pub fn key_for(&self, kind: &str, payload: &Value) -> Option<CacheKey> {
        self.policies.get(kind).map(|spec| CacheKey::new(kind, payload, spec))
    }

    /// Longest wait for an identical task's result.
    pub fn single_flight_wait(&self) -> Duration {
        self.wait
    }

    fn keys(&self, key: &CacheKey) -> (String, String) {
        (self.state.key(&["cache", &key.kind, &key.hash]), self.state.key(&["cache-lease", &key.kind, &key.hash]))
    }

    /// How long a lease lasts unless renewed (`policies.cache_lease`).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Looks the key up and, on a miss, tries to become the one that computes it (a lease of
    /// `policies.cache_lease`, renewed while the returned [`CacheLease`] lives). One round trip;
    /// two when the stored entry is unreadable (e.g. written by another version): it is deleted
    /// and the key claimed again, so the caller leads with a real lease.
    pub async fn claim(&self, key: &CacheKey) -> CacheClaim {
        let mut answer = self.claim_once(key, None).await;
        if let Ok((_, (1, bytes))) = &answer
            && decode(bytes).is_none()
        {
            metrics::counter!("taskfleet_cache_unreadable_total", "kind" => key.kind.clone()).increment(1);
            tracing::debug!(kind = %key.kind, "unreadable cache entry: deleting it and claiming again");
            let unreadable = bytes.clone();
            answer = self.claim_once(key, Some(unreadable)).await;
        }
        let claim = match answer {
            Ok((_, (1, bytes))) => match decode(&bytes) {
                Some(hit) => CacheClaim::Hit(hit),
                // Unreadable again (another writer of another version): run without the cache.
                None => CacheClaim::Unavailable,
            },
            Ok((owner, (2, _))) => CacheClaim::Leader(self.renewed(key, owner)),
            Ok(_) => CacheClaim::Follower,
            Err(_) => CacheClaim::Unavailable,
        };
        let outcome = match &claim {
            CacheClaim::Hit(_) => "hit",
            CacheClaim::Leader(_) => "miss",
            CacheClaim::Follower => "wait",
            CacheClaim::Unavailable => "bypass",
        };
        metrics::counter!("taskfleet_cache_lookups_total", "kind" => key.kind.clone(), "outcome" => outcome)
            .increment(1);
        claim
    }

    /// One run of the claim script with a fresh owner token (deleting the value first if it is
    /// still `discard`): the owner and the script's answer.
    async fn claim_once(
        &self,
        key: &CacheKey,
        discard: Option<Vec<u8>>,
    ) -> Result<(String, (i64, Vec<u8>)), crate::SharedStateError> {
        let (value_key, lease_key) = self.keys(key);
        let owner = format!("{:016x}", rand_u64());
        let lease_ms = self.lease.as_millis().max(1) as u64;
        let script = self.claim.clone();
        let owner_arg = owner.clone();
        let answer = self
            .state
            .run("cache_claim", async move |mut conn| {
                let mut invocation = script.key(&value_key);
                invocation.key(&lease_key).arg(&owner_arg).arg(lease_ms);
                if let Some(discard) = &discard {
                    invocation.arg(discard.as_slice());
                }
                invocation.invoke_async::<(i64, Vec<u8>)>(&mut conn).await
            })
            .await?;
        Ok((owner, answer))
    }

    /// [`claim`](Self::claim), and when an identical task holds the lease,
    /// [`wait_for`](Self::wait_for) its result for up to `max_wait`; the claim and whether it
    /// waited.
    pub async fn claim_or_wait(&self, key: &CacheKey, max_wait: Duration) -> (CacheClaim, bool) {
        match self.claim(key).await {
            CacheClaim::Follower => (self.wait_for(key, max_wait).await, true),
            claim => (claim, false),
        }
    }

    /// The lease `owner` just took, with its renewals started: every third of the lease, while
    /// the returned value lives and the lease is still `owner`'s.
    fn renewed(&self, key: &CacheKey, owner: String) -> CacheLease {
        let (_, lease_key) = self.keys(key);
        let (state, script, kind) = (self.state.clone(), self.renew.clone(), key.kind.clone());
        let (every, lease_ms, token) = (self.lease / 3, self.lease.as_millis().max(1) as u64, owner.clone());
        let renewal = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (script, lease_key, token) = (script.clone(), lease_key.clone(), token.clone());
                let renewed = state
                    .run("cache_renew", async move |mut conn| {
                        script.key(&lease_key).arg(&token).arg(lease_ms).invoke_async::<i64>(&mut conn).await
                    })
                    .await;
                match renewed {
                    Ok(1) => {}
                    // Lapsed (this process stalled for a whole lease) and maybe taken by another:
                    // stop; the result is still stored when it comes.
                    Ok(_) => {
                        metrics::counter!("taskfleet_cache_lease_lost_total", "kind" => kind.clone()).increment(1);
                        tracing::debug!(kind = %kind, "single-flight lease lapsed before it was renewed");
                        return;
                    }
                    // Redis unreachable: try again at the next tick.
                    Err(_) => {}
                }
            }
        })
        .abort_handle();
        CacheLease { owner, renewal }
    }

    /// Waits (polling, 5 ms doubling to 100 ms) until the key holds a result or its lease is
    /// free to take (stored, released, or lapsed unrenewed), for at most `max_wait`. Returns
    /// `Follower` if the wait ran out.
    pub async fn wait_for(&self, key: &CacheKey, max_wait: Duration) -> CacheClaim {
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut pause = Duration::from_millis(5);
        loop {
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
            match self.claim(key).await {
                CacheClaim::Follower if tokio::time::Instant::now() < deadline => {}
                other => return other,
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Stores a result and drops `lease` (stopping its renewals). Results larger than
    /// `policies.cache_max_bytes` are not stored (the lease is still dropped).
    pub async fn store(&self, key: &CacheKey, lease: CacheLease, result: &Value, cost_usd: Option<f64>) {
        let bytes =
            serde_json::to_vec(&serde_json::json!({ "result": result, "cost_usd": cost_usd })).unwrap_or_default();
        if bytes.len() > self.max_bytes {
            metrics::counter!("taskfleet_cache_too_large_total", "kind" => key.kind.clone()).increment(1);
            self.release(key, lease).await;
            return;
        }
        let (value_key, lease_key) = self.keys(key);
        let ttl_ms = key.ttl.as_millis().max(1) as u64;
        let script = self.store.clone();
        let owner = lease.owner.clone();
        drop(lease);
        let _ = self
            .state
            .run("cache_store", async move |mut conn| {
                script
                    .key(&value_key)
                    .key(&lease_key)
                    .arg(bytes)
                    .arg(ttl_ms)
                    .arg(&owner)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
    }

    /// Drops `lease` (stopping its renewals) without storing anything (the task failed, was
    /// deferred, or spawned children whose join gives its result).
    pub async fn release(&self, key: &CacheKey, lease: CacheLease) {
        let (_, lease_key) = self.keys(key);
        let script = self.release.clone();
        let owner = lease.owner.clone();
        drop(lease);
        let _ = self
            .state
            .run("cache_release", async move |mut conn| {
                script.key(&lease_key).arg(&owner).invoke_async::<i64>(&mut conn).await
            })
            .await;
    }
}

fn decode(bytes: &[u8]) -> Option<CachedResult> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    Some(CachedResult { result: v.get("result")?.clone(), cost_usd: v.get("cost_usd").and_then(Value::as_f64) })
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(crate::now_us());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use taskfleet_config::RedisConfig;

    fn spec(fields: &[&str]) -> CacheSpec {
        CacheSpec { ttl: Duration::from_secs(60), key_fields: fields.iter().map(|f| f.to_string()).collect() }
    }

    #[test]
    fn keys_ignore_field_order_and_other_fields() {
        let s = spec(&["model", "messages"]);
        let a = CacheKey::new(
            "llm.chat",
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "x"}),
            &s,
        );
        let b = CacheKey::new("llm.chat", &json!({"messages": [{"content": "hi", "role": "user"}], "model": "m"}), &s);
        let c = CacheKey::new("llm.chat", &json!({"model": "n", "messages": [{"role": "user", "content": "hi"}]}), &s);
        assert_eq!(a, b);
        assert_ne!(a.hash, c.hash);
        let whole = spec(&[]);
        assert_ne!(CacheKey::new("k", &json!({"a": 1}), &whole), CacheKey::new("k", &json!({"a": 2}), &whole));
    }

    fn redis_config(prefix: &taskfleet_test_support::RedisPrefix) -> RedisConfig {
        RedisConfig {
            url: prefix.url.clone(),
            key_prefix: prefix.prefix.clone(),
            op_timeout: Duration::from_millis(500),
            ..RedisConfig::default()
        }
    }

    /// A cache with an `llm.chat` policy and leases of `lease`.
    async fn cache_of(redis: &RedisConfig, lease: Duration) -> (ResultCache, PoliciesConfig) {
        let state = SharedState::connect_and_wait(redis, Duration::from_secs(5)).await.unwrap();
        let mut policies = PoliciesConfig { cache_lease: lease, ..PoliciesConfig::default() };
        policies.cache.insert("llm.chat".into(), "1m by prompt".parse().unwrap());
        (state.cache(&policies), policies)
    }

    #[tokio::test]
    async fn single_flight_hit_and_release() {
        let prefix = taskfleet_test_support::RedisPrefix::new("cache");
        let redis = redis_config(&prefix);
        let (cache, policies) = cache_of(&redis, Duration::from_secs(5)).await;
        let key = cache.key_for("llm.chat", &json!({"prompt": "hello"})).unwrap();
        assert!(cache.key_for("echo", &json!({})).is_none());

        let CacheClaim::Leader(owner) = cache.claim(&key).await else { panic!("not leader") };
        assert_eq!(cache.claim(&key).await, CacheClaim::Follower);
        // A waiter gets the leader's result as soon as it is stored.
        let waiter = {
            let (cache, key) = (cache.clone(), key.clone());
            tokio::spawn(async move { cache.wait_for(&key, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        cache.store(&key, owner, &json!({"text": "hi"}), Some(0.002)).await;
        let expected = CachedResult { result: json!({"text": "hi"}), cost_usd: Some(0.002) };
        assert_eq!(waiter.await.unwrap(), CacheClaim::Hit(expected.clone()));
        assert_eq!(cache.claim(&key).await, CacheClaim::Hit(expected));

        // A failed leader releases its lease: the next claimant leads.
        let other = cache.key_for("llm.chat", &json!({"prompt": "other"})).unwrap();
        let CacheClaim::Leader(owner) = cache.claim(&other).await else { panic!() };
        cache.release(&other, owner).await;
        assert!(matches!(cache.claim(&other).await, CacheClaim::Leader(_)));

        // Redis unreachable: bypass.
        let down = RedisConfig { url: "redis://127.0.0.1:1".into(), ..redis };
        let cache = SharedState::connect(&down).unwrap().cache(&policies);
        assert_eq!(cache.claim(&key).await, CacheClaim::Unavailable);
    }

    /// An entry the cache cannot read (e.g. written by another version) is deleted and the key
    /// claimed again: the caller leads with a real lease (an identical claim waits) and stores
    /// a readable result.
    #[tokio::test]
    async fn an_unreadable_entry_is_replaced_under_a_real_lease() {
        let prefix = taskfleet_test_support::RedisPrefix::new("cache-unreadable");
        let (cache, _) = cache_of(&redis_config(&prefix), Duration::from_secs(5)).await;
        let key = cache.key_for("llm.chat", &json!({"prompt": "garbled"})).unwrap();
        let (value_key, _) = cache.keys(&key);
        let set: Result<(), _> = cache
            .state
            .run("test_set", async move |mut conn| {
                redis::cmd("SET").arg(&value_key).arg("not json {").query_async(&mut conn).await
            })
            .await;
        set.unwrap();
        let CacheClaim::Leader(lease) = cache.claim(&key).await else { panic!("not leader") };
        assert_eq!(cache.claim(&key).await, CacheClaim::Follower, "the leader holds a real lease");
        // A follower with a short wait gives up: the lease is renewed, not lapsed.
        assert_eq!(cache.claim_or_wait(&key, Duration::from_millis(50)).await, (CacheClaim::Follower, true));
        cache.store(&key, lease, &json!({"text": "fresh"}), None).await;
        let fresh = CachedResult { result: json!({"text": "fresh"}), cost_usd: None };
        assert_eq!(cache.claim_or_wait(&key, Duration::from_secs(1)).await, (CacheClaim::Hit(fresh), false));
    }

    /// A leader that dies (stops renewing without releasing) loses its lease within
    /// `cache_lease`, and a waiter leads; a leader that lives keeps its lease for as long as it
    /// computes, however many lease periods that is.
    #[tokio::test]
    async fn a_dead_leaders_lease_lapses_a_live_one_is_renewed() {
        let prefix = taskfleet_test_support::RedisPrefix::new("cache-lease");
        let lease = Duration::from_millis(300);
        let (cache, _) = cache_of(&redis_config(&prefix), lease).await;

        // The leader dies: its renewals stop (dropping the lease stops them, as the death of its
        // process would) and nobody releases the lease.
        let key = cache.key_for("llm.chat", &json!({"prompt": "dies"})).unwrap();
        let CacheClaim::Leader(dead) = cache.claim(&key).await else { panic!("not leader") };
        let died = tokio::time::Instant::now();
        drop(dead);
        assert_eq!(cache.claim(&key).await, CacheClaim::Follower);
        let CacheClaim::Leader(next) = cache.wait_for(&key, Duration::from_secs(10)).await else {
            panic!("the waiter did not take over")
        };
        let waited = died.elapsed();
        assert!(waited <= lease + Duration::from_millis(150), "took over after {waited:?}");
        cache.release(&key, next).await;

        // A live leader renews: after five lease periods an identical claim still waits.
        let key = cache.key_for("llm.chat", &json!({"prompt": "lives"})).unwrap();
        let CacheClaim::Leader(live) = cache.claim(&key).await else { panic!("not leader") };
        for _ in 0..5 {
            tokio::time::sleep(lease).await;
            assert_eq!(cache.claim(&key).await, CacheClaim::Follower);
        }
        cache.store(&key, live, &json!("done"), None).await;
        assert!(matches!(cache.claim(&key).await, CacheClaim::Hit(_)));
    }
}
