//! The semantic cache as the worker applies it: a policy (`policies.semantic_cache`) names the
//! payload field whose string is the key text and the embedding model; the text is embedded
//! with [`Providers::embed`] (the model's provider, its circuit breaker `llm:<model>` and its
//! rate limit if it has one) and looked up in the fleet's
//! [`SemanticStore`]. At admission a hit finishes the task like an exact-cache hit; a miss runs
//! the handler and stores its result when the attempt succeeds ([`Pending`]). Handlers whose
//! result comes later (a spawn's join) use [`TaskContext::semantic_lookup`] and
//! [`TaskContext::semantic_store`] instead.
//!
//! The embedding's tokens and cost (`providers.prices` of the model, prompt price) are the
//! attempt's: a hit costs its lookup, a miss the lookup and the handler. An unreachable
//! embedding provider, a refused token or an open breaker never fail an admission: the task
//! runs without the cache (`outcome="bypass"`), and so does a lookup at admission that takes
//! longer than `policies.semantic_lookup_timeout`.
//!
//! Embeddings are remembered per model and text (by SHA-256, a bounded number of them): a
//! store after a lookup, a deferred task admitted again, or another task of the same text on
//! this worker reuses the vector instead of paying for it again.

use crate::attempt::{Attempt, Runtime};
use crate::execute::Executed;
use crate::providers::Providers;
use crate::{DeferReason, Disposition, TaskContext, TaskError, Usage};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskfleet_config::{Config, SemanticCacheSpec};
use taskfleet_proto::{TaskEvent, TokenUsage};
pub use taskfleet_shared_state::SemanticHit;
use taskfleet_shared_state::{SemanticKey, SemanticLookup, SemanticStore, SharedState};
use tracing::Instrument;

/// Embeddings remembered per model and text, so that a store after a lookup of the same text
/// (or a lookup of a text embedded before) does not embed it again.
const MEMO_ENTRIES: usize = 4096;

/// Recent embeddings by [`memo_key`]: the key is a fixed 32 bytes however long the text.
type Memo = HashMap<[u8; 32], Arc<Vec<f32>>>;

/// SHA-256 of `model` (length-prefixed, so no (model, text) pair collides with another's
/// concatenation) and `text`.
fn memo_key(model: &str, text: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((model.len() as u64).to_le_bytes());
    h.update(model.as_bytes());
    h.update(text.as_bytes());
    h.finalize().into()
}

/// An embedding and what it cost.
#[derive(Debug, Clone)]
struct Embedded {
    vector: Arc<Vec<f32>>,
    tokens: u64,
    cost_usd: Option<f64>,
}

/// The semantic cache policies, the embedding calls and the fleet's store; cheap to clone.
#[derive(Clone)]
pub struct SemanticCache {
    store: SemanticStore,
    policies: Arc<BTreeMap<String, SemanticCacheSpec>>,
    /// The embedding calls ([`Providers::embed`]: breaker `llm:<model>`, the provider's rate
    /// limit, price); built only when a policy is configured.
    providers: Option<Providers>,
    memo: Arc<Mutex<Memo>>,
}

impl std::fmt::Debug for SemanticCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemanticCache").field("policies", &self.policies).finish()
    }
}

/// Why an embedding was not had, for `taskfleet_semantic_embed_failures_total{reason}`.
fn failure_reason(e: &TaskError) -> &'static str {
    match e.disposition {
        Disposition::Defer { reason: DeferReason::RateLimited, .. } => "rate_limited",
        Disposition::Defer { .. } => "breaker_open",
        _ => "failed",
    }
}

impl SemanticCache {
    /// The configured policies over `state`, embedding with the worker's `providers` (its HTTP
    /// client and adaptive batch sizes), kept only when there is a policy.
    pub(crate) fn new(state: &SharedState, cfg: &Config, providers: &Providers) -> SemanticCache {
        let providers = (!cfg.policies.semantic_cache.is_empty()).then(|| providers.clone());
        SemanticCache {
            store: state.semantic(cfg.policies.cache_max_bytes),
            policies: Arc::new(cfg.policies.semantic_cache.clone()),
            providers,
            memo: Default::default(),
        }
    }

    /// The policy named `name` (a kind, or a name handlers use).
    pub fn policy(&self, name: &str) -> Option<&SemanticCacheSpec> {
        self.policies.get(name)
    }

    fn key(name: &str, spec: &SemanticCacheSpec) -> SemanticKey {
        SemanticKey { name: name.to_string(), model: spec.model.clone(), ttl: spec.ttl, max_entries: spec.max_entries }
    }

    /// Embeds `text` with `model` as a call of `ctx` (its tokens and cost go into `ctx`'s usage,
    /// and are returned too), and remembers the vector for a store of the same text.
    async fn embed(&self, ctx: &TaskContext, model: &str, text: &str) -> Result<Embedded, TaskError> {
        let Some(providers) = &self.providers else {
            return Err(TaskError::fatal("no semantic cache policy configured").with_code("unknown_semantic_policy"));
        };
        let before = ctx.usage();
        let mut vectors = providers.embed(ctx, model, &[text.to_string()]).await?;
        let vector = Arc::new(vectors.pop().unwrap_or_default());
        let after = ctx.usage();
        let prompt = |u: &Usage| u.tokens.map_or(0, |t| t.prompt);
        let tokens = prompt(&after).saturating_sub(prompt(&before));
        let cost_usd = after.cost_usd.map(|c| c - before.cost_usd.unwrap_or(0.0));
        if let Ok(mut memo) = self.memo.lock() {
            if memo.len() >= MEMO_ENTRIES {
                memo.clear();
            }
            memo.insert(memo_key(model, text), vector.clone());
        }
        Ok(Embedded { vector, tokens, cost_usd })
    }

    /// The memoised embedding of `text` (which costs nothing), or a fresh one.
    async fn vector(&self, ctx: &TaskContext, model: &str, text: &str) -> Result<Embedded, TaskError> {
        let known = self.memo.lock().ok().and_then(|m| m.get(&memo_key(model, text)).cloned());
        match known {
            Some(vector) => Ok(Embedded { vector, tokens: 0, cost_usd: None }),
            None => self.embed(ctx, model, text).await,
        }
    }

    /// Embeds and looks up `text` under the policy `name` as a call of `ctx`; counts the
    /// outcome and its time.
    async fn lookup(
        &self,
        ctx: &TaskContext,
        name: &str,
        spec: &SemanticCacheSpec,
        text: &str,
    ) -> (Result<Embedded, TaskError>, SemanticLookup) {
        let started = Instant::now();
        let embedded = self.vector(ctx, &spec.model, text).await;
        let found = match &embedded {
            Ok(e) => self.store.lookup(&Self::key(name, spec), &e.vector, spec.threshold).await,
            Err(e) => {
                metrics::counter!("taskfleet_semantic_embed_failures_total", "model" => spec.model.clone(),
                                  "reason" => failure_reason(e))
                .increment(1);
                tracing::warn!(policy = name, model = %spec.model, error = %e,
                               "embedding unavailable: running without the semantic cache");
                SemanticLookup::Unavailable
            }
        };
        let outcome = match &found {
            SemanticLookup::Hit(_) => "hit",
            SemanticLookup::Miss => "miss",
            SemanticLookup::Unavailable => "bypass",
        };
        metrics::counter!("taskfleet_semantic_cache_lookups_total", "kind" => name.to_string(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("taskfleet_semantic_cache_lookup_seconds", "kind" => name.to_string())
            .record(started.elapsed().as_secs_f64());
        (embedded, found)
    }
}

impl SemanticCache {
    /// [`lookup`](Self::lookup) for at most `limit`; `None` (counted and logged as a bypass)
    /// past it.
    async fn lookup_within(
        &self,
        ctx: &TaskContext,
        name: &str,
        spec: &SemanticCacheSpec,
        text: &str,
        limit: Duration,
    ) -> Option<(Result<Embedded, TaskError>, SemanticLookup)> {
        let found = tokio::time::timeout(limit, self.lookup(ctx, name, spec, text)).await.ok();
        if found.is_none() {
            metrics::counter!("taskfleet_semantic_cache_lookups_total", "kind" => name.to_string(),
                              "outcome" => "bypass")
            .increment(1);
            tracing::warn!(policy = name, model = %spec.model, ?limit,
                           "semantic cache lookup exceeded policies.semantic_lookup_timeout: running without the cache");
        }
        found
    }
}

/// A miss at admission: the attempt's result goes into the cache if it succeeds.
pub(crate) struct Pending {
    cache: SemanticCache,
    key: SemanticKey,
    vector: Arc<Vec<f32>>,
    /// The lookup's own tokens and cost, added to the attempt's usage.
    tokens: u64,
    cost_usd: Option<f64>,
}

impl Pending {
    /// Stores a successful result (of a task not cancelled, that spawned nothing: a spawn's
    /// result comes from its join) with the handler's cost, then adds the lookup's tokens and
    /// cost to the attempt's usage.
    pub async fn settle(self, executed: &mut Executed, cancelled: bool) {
        if let Some(result) = executed.cacheable_result(cancelled) {
            let cost = executed.usage.cost_usd;
            if let Err(e) = self.cache.store.store(&self.key, &self.vector, result, cost).await {
                tracing::debug!(error = %e, policy = %self.key.name, "semantic cache store skipped");
            }
        }
        executed.usage.add(&self.usage());
    }

    /// The lookup's own tokens and cost.
    pub fn usage(&self) -> Usage {
        lookup_usage(self.tokens, self.cost_usd)
    }
}

/// A lookup's usage: its prompt tokens (0 for a remembered embedding) and cost.
fn lookup_usage(tokens: u64, cost_usd: Option<f64>) -> Usage {
    Usage { tokens: Some(TokenUsage { prompt: tokens, completion: 0 }), cost_usd, ..Usage::default() }
}

/// What the semantic cache says at admission.
pub(crate) enum Admitted {
    /// A stored result: this `succeeded` event finishes the task.
    Hit(Box<TaskEvent>),
    /// Run the handler, then settle this.
    Miss(Box<Pending>),
    /// No policy, no key text, or the cache is unreachable: run without it.
    Bypass,
}

/// Looks the task up when its kind has a semantic policy.
pub(crate) async fn admit(rt: &Runtime, attempt: &Attempt) -> Admitted {
    let cache = &rt.policies.semantic;
    let env = &attempt.env;
    let Some(spec) = cache.policy(&env.kind) else { return Admitted::Bypass };
    let Some(text) = env.payload.get(&spec.field).and_then(Value::as_str) else {
        metrics::counter!("taskfleet_semantic_cache_lookups_total", "kind" => env.kind.clone(), "outcome" => "bypass")
            .increment(1);
        tracing::debug!(kind = %env.kind, field = %spec.field, "no key text: running without the semantic cache");
        return Admitted::Bypass;
    };
    let span = tracing::info_span!(parent: &attempt.span, "semantic_cache.lookup", kind = %env.kind,
                                   result = tracing::field::Empty, similarity = tracing::field::Empty);
    let limit = rt.policies.semantic_lookup_timeout;
    let deadline = Instant::now() + attempt.timeout().min(limit);
    let ctx = TaskContext::detached(&env.kind, Some(rt.policies.shared.clone()), span.clone(), deadline);
    let Some((embedded, found)) =
        cache.lookup_within(&ctx, &env.kind, spec, text, limit).instrument(span.clone()).await
    else {
        span.record("result", "timeout");
        return Admitted::Bypass;
    };
    let Ok(embedded) = embedded else {
        span.record("result", "unavailable");
        return Admitted::Bypass;
    };
    match found {
        SemanticLookup::Hit(hit) => {
            span.record("result", "hit");
            span.record("similarity", hit.similarity as f64);
            attempt.span.record("cache_hit", true);
            let usage = lookup_usage(embedded.tokens, embedded.cost_usd);
            Admitted::Hit(Box::new(crate::admit::cache_hit_event(rt, attempt, hit.result, hit.cost_usd, usage)))
        }
        SemanticLookup::Miss => {
            span.record("result", "miss");
            attempt.span.record("cache_hit", false);
            let key = SemanticCache::key(&env.kind, spec);
            let Embedded { vector, tokens, cost_usd } = embedded;
            Admitted::Miss(Box::new(Pending { cache: cache.clone(), key, vector, tokens, cost_usd }))
        }
        // Redis unreachable: the lookup's cost is the attempt's all the same.
        SemanticLookup::Unavailable => {
            span.record("result", "unavailable");
            let Embedded { vector, tokens, cost_usd } = embedded;
            let key = SemanticCache::key(&env.kind, spec);
            Admitted::Miss(Box::new(Pending { cache: cache.clone(), key, vector, tokens, cost_usd }))
        }
    }
}

/// [`TaskContext::semantic_lookup`]: the embedding is a call of `ctx` (its usage is `ctx`'s); a
/// hit marks the attempt as served by the cache, saving the stored result's cost.
pub(crate) async fn lookup_for(ctx: &TaskContext, name: &str, text: &str) -> Result<Option<SemanticHit>, TaskError> {
    let Some(cache) = ctx.shared.as_ref().map(|s| &s.semantic) else { return Ok(None) };
    let spec = policy_of(cache, name)?;
    let (embedded, found) = cache.lookup(ctx, name, spec, text).await;
    embedded?;
    Ok(match found {
        SemanticLookup::Hit(hit) => {
            ctx.record_cache_hit(hit.cost_usd);
            Some(hit)
        }
        SemanticLookup::Miss | SemanticLookup::Unavailable => None,
    })
}

/// [`TaskContext::semantic_store`].
pub(crate) async fn store_for(
    ctx: &TaskContext,
    name: &str,
    text: &str,
    result: &Value,
    cost_usd: Option<f64>,
) -> Result<(), TaskError> {
    let Some(cache) = ctx.shared.as_ref().map(|s| &s.semantic) else { return Ok(()) };
    let spec = policy_of(cache, name)?;
    let embedded = cache.vector(ctx, &spec.model, text).await?;
    if let Err(e) = cache.store.store(&SemanticCache::key(name, spec), &embedded.vector, result, cost_usd).await {
        // Redis is an accelerator: a result that is not stored is recomputed next time.
        tracing::debug!(error = %e, policy = name, "semantic cache store skipped");
    }
    Ok(())
}

fn policy_of<'a>(cache: &'a SemanticCache, name: &str) -> Result<&'a SemanticCacheSpec, TaskError> {
    cache.policy(name).ok_or_else(|| {
        TaskError::fatal(format!("no semantic cache policy {name:?} in policies.semantic_cache"))
            .with_code("unknown_semantic_policy")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::Policies;
    use serde_json::json;
    use std::time::Duration;
    use taskfleet_config::RedisConfig;
    use taskfleet_mock_api::{Control, EMBEDDINGS_ENDPOINT, MockApi, MockConfig, RunningMock};

    /// A context whose shared state (in the local Redis, under a fresh prefix) has the policy
    /// `docs = "1h by q threshold 0.8 model emb"` served by the mock.
    async fn context(mock: &RunningMock) -> TaskContext {
        let mut cfg = Config {
            redis: RedisConfig {
                url: std::env::var("TASKFLEET_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
                key_prefix: format!("taskfleet-test:{}:", uuid::Uuid::now_v7()),
                ..RedisConfig::default()
            },
            ..Config::default()
        };
        cfg.providers.urls.insert("mock".into(), format!("{}/v1", mock.url()));
        cfg.providers.models.insert("emb".into(), "mock".into());
        cfg.providers.prices.insert("emb".into(), "0.02/0".parse().unwrap());
        cfg.policies.breaker_failures = 2;
        cfg.policies.semantic_cache.insert("docs".into(), "1h by q threshold 0.8 model emb".parse().unwrap());
        let probe = SharedState::connect_and_wait(&cfg.redis, Duration::from_secs(5)).await.unwrap();
        assert!(probe.is_up(), "these tests need Redis at {}", cfg.redis.url);
        let policies = Policies::connect(&cfg, &Default::default(), Default::default()).unwrap();
        let key = SemanticKey { name: "probe".into(), model: "m".into(), ttl: Duration::from_secs(1), max_entries: 1 };
        let deadline = Instant::now() + Duration::from_secs(5);
        while policies.semantic.store.lookup(&key, &[1.0], 0.5).await == SemanticLookup::Unavailable {
            assert!(Instant::now() < deadline, "Redis did not come up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut ctx = TaskContext::for_test("custom");
        ctx.shared = Some(policies.shared.clone());
        ctx
    }

    #[tokio::test]
    async fn handlers_look_up_and_store_by_meaning_and_pay_for_the_embeddings() {
        let mock = MockApi::start(MockConfig { name: "emb".into(), ..MockConfig::default() }).await.unwrap();
        let ctx = context(&mock).await;
        let text = "How do I cook fresh pasta at home?";
        assert_eq!(ctx.semantic_lookup("docs", text).await, Ok(None));
        let after_lookup = ctx.usage();
        assert!(after_lookup.tokens.is_some_and(|t| t.prompt > 0) && after_lookup.cost_usd.is_some_and(|c| c > 0.0));
        // The store reuses the lookup's embedding of the same text.
        ctx.semantic_store("docs", text, &json!({"answer": "boil water"}), Some(0.5)).await.unwrap();
        assert_eq!(ctx.usage(), after_lookup);
        assert_eq!(mock.stats().by_endpoint[EMBEDDINGS_ENDPOINT], 1);

        let hit = ctx.semantic_lookup("docs", "how to cook fresh pasta at home").await.unwrap().expect("a hit");
        assert_eq!((hit.result, hit.cost_usd), (json!({"answer": "boil water"}), Some(0.5)));
        assert!(hit.similarity >= 0.8 && hit.similarity < 1.0, "{}", hit.similarity);
        assert_eq!(ctx.semantic_lookup("docs", "Quarterly revenue of semiconductor vendors").await, Ok(None));
        let unknown = ctx.semantic_lookup("nope", text).await.unwrap_err();
        assert_eq!(unknown.code, "unknown_semantic_policy");

        // A failing provider: the embedding call's own error (the call retries a failed batch
        // within the attempt, so breaker_failures 2 opens the breaker), then a deferral that
        // keeps further calls off the provider.
        mock.control(&Control { error_rate: Some(1.0), ..Control::default() }).unwrap();
        let before = mock.stats().by_endpoint[EMBEDDINGS_ENDPOINT];
        let e = ctx.semantic_lookup("docs", "something else").await.unwrap_err();
        assert!(e.is_retryable() || matches!(e.disposition, crate::Disposition::Defer { .. }), "{e:?}");
        let e = ctx.semantic_lookup("docs", "something else").await.unwrap_err();
        assert!(matches!(e.disposition, crate::Disposition::Defer { reason: DeferReason::BreakerOpen, .. }), "{e:?}");
        assert_eq!(mock.stats().by_endpoint[EMBEDDINGS_ENDPOINT] - before, 2, "no call while the breaker is open");
        // Outside a worker there is no cache.
        assert_eq!(TaskContext::for_test("x").semantic_lookup("docs", text).await, Ok(None));
    }

    #[test]
    fn memo_keys_are_fixed_size_and_tell_model_from_text() {
        assert_ne!(memo_key("a", "bc"), memo_key("ab", "c"));
        assert_eq!(memo_key("m", "some text"), memo_key("m", "some text"));
        assert_ne!(memo_key("m", "some text"), memo_key("n", "some text"));
        assert_eq!(memo_key("m", &"long ".repeat(10_000)).len(), 32);
    }

    /// A text embedded once (a lookup of a deferred task admitted again, or another task of
    /// the same text) is looked up with the remembered vector: no second embedding call, and
    /// nothing charged for it.
    #[tokio::test]
    async fn lookups_reuse_a_remembered_embedding() {
        let mock = MockApi::start(MockConfig { name: "emb".into(), ..MockConfig::default() }).await.unwrap();
        let ctx = context(&mock).await;
        let cache = &ctx.shared.as_ref().unwrap().semantic;
        let spec = cache.policy("docs").unwrap().clone();
        let text = "Which trains run to the coast on Sundays?";
        let (first, found) = cache.lookup(&ctx, "docs", &spec, text).await;
        let first = first.unwrap();
        assert_eq!(found, SemanticLookup::Miss);
        assert!(first.tokens > 0 && first.cost_usd.is_some_and(|c| c > 0.0), "{first:?}");
        let after_first = ctx.usage();
        let (again, found) = cache.lookup(&ctx, "docs", &spec, text).await;
        let again = again.unwrap();
        assert_eq!(found, SemanticLookup::Miss);
        assert_eq!((again.tokens, again.cost_usd), (0, None));
        assert_eq!(again.vector, first.vector);
        assert_eq!(ctx.usage(), after_first, "the second lookup cost nothing");
        assert_eq!(mock.stats().by_endpoint[EMBEDDINGS_ENDPOINT], 1);
    }

    /// A lookup slower than its limit gives up at the limit (the admission then runs the task
    /// without the cache) instead of holding the delivery for the embedding's request timeout.
    #[tokio::test]
    async fn a_slow_lookup_gives_up_at_its_limit() {
        let mock = MockApi::start(MockConfig { name: "emb".into(), ..MockConfig::default() }).await.unwrap();
        let ctx = context(&mock).await;
        let cache = &ctx.shared.as_ref().unwrap().semantic;
        let spec = cache.policy("docs").unwrap().clone();
        mock.control(&Control { latency_ms: Some(3_000), ..Control::default() }).unwrap();
        let started = Instant::now();
        let found = cache.lookup_within(&ctx, "docs", &spec, "slow text", Duration::from_millis(200)).await;
        assert!(found.is_none(), "the lookup did not time out");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(1_500), "{took:?}");
        // Within its limit, the same lookup answers.
        mock.control(&Control { latency_ms: Some(0), ..Control::default() }).unwrap();
        let found = cache.lookup_within(&ctx, "docs", &spec, "fast text", Duration::from_secs(5)).await;
        assert!(matches!(found, Some((Ok(_), SemanticLookup::Miss))), "{found:?}");
    }
}
