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
//! runs without the cache (`outcome="bypass"`).

use crate::attempt::{Attempt, Runtime};
use crate::execute::Executed;
use crate::providers::Providers;
use crate::{DeferReason, Disposition, TaskContext, TaskError, Usage};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use taskfleet_config::{Config, SemanticCacheSpec};
use taskfleet_proto::{EventKind, TaskEvent, Timings, TokenUsage, now_ms};
pub use taskfleet_shared_state::SemanticHit;
use taskfleet_shared_state::{SemanticKey, SemanticLookup, SemanticStore, SharedState};
use tracing::Instrument;

/// Embeddings remembered per model and text, so that a store after a lookup of the same text
/// does not embed it again.
const MEMO_ENTRIES: usize = 4096;

/// Recent embeddings by model and text.
type Memo = HashMap<(String, String), Arc<Vec<f32>>>;

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
    /// The configured policies over `state`. Builds an HTTP client only when there is a policy.
    pub(crate) fn new(state: &SharedState, cfg: &Config) -> Result<SemanticCache, crate::WorkerError> {
        let providers = match cfg.policies.semantic_cache.is_empty() {
            true => None,
            false => Some(Providers::new(&cfg.providers)?),
        };
        Ok(SemanticCache {
            store: state.semantic(cfg.policies.cache_max_bytes),
            policies: Arc::new(cfg.policies.semantic_cache.clone()),
            providers,
            memo: Default::default(),
        })
    }

    /// The policy named `name` (a kind, or a name handlers use).
    pub fn policy(&self, name: &str) -> Option<&SemanticCacheSpec> {
        self.policies.get(name)
    }

    fn key(name: &str, spec: &SemanticCacheSpec) -> SemanticKey {
        SemanticKey { name: name.to_string(), model: spec.model.clone(), ttl: spec.ttl }
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
            memo.insert((model.to_string(), text.to_string()), vector.clone());
        }
        Ok(Embedded { vector, tokens, cost_usd })
    }

    /// The memoised embedding of `text`, or a fresh one.
    async fn vector(&self, ctx: &TaskContext, model: &str, text: &str) -> Result<Embedded, TaskError> {
        let known = self.memo.lock().ok().and_then(|m| m.get(&(model.to_string(), text.to_string())).cloned());
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
        let embedded = self.embed(ctx, &spec.model, text).await;
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
        if let Ok(result) = &executed.outcome
            && !cancelled
            && executed.effects.spawn.is_none()
        {
            let cost = executed.usage.cost_usd;
            if let Err(e) = self.cache.store.store(&self.key, &self.vector, result, cost).await {
                tracing::debug!(error = %e, policy = %self.key.name, "semantic cache store skipped");
            }
        }
        let usage = &mut executed.usage;
        let tokens = usage.tokens.get_or_insert(TokenUsage { prompt: 0, completion: 0 });
        tokens.prompt += self.tokens;
        if let Some(c) = self.cost_usd {
            *usage.cost_usd.get_or_insert(0.0) += c;
        }
    }
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
    let deadline = Instant::now() + attempt.timeout();
    let ctx = TaskContext::detached(&env.kind, Some(rt.policies.shared.clone()), span.clone(), deadline);
    let (embedded, found) = cache.lookup(&ctx, &env.kind, spec, text).instrument(span.clone()).await;
    let Ok(embedded) = embedded else {
        span.record("result", "unavailable");
        return Admitted::Bypass;
    };
    match found {
        SemanticLookup::Hit(hit) => {
            span.record("result", "hit");
            span.record("similarity", hit.similarity as f64);
            attempt.span.record("cache_hit", true);
            Admitted::Hit(Box::new(hit_event(rt, attempt, hit, &embedded)))
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

/// The `succeeded` event of a hit at admission, as an exact-cache hit's, with the lookup's usage.
fn hit_event(rt: &Runtime, attempt: &Attempt, hit: SemanticHit, embedded: &Embedded) -> TaskEvent {
    let kind = attempt.env.kind.clone();
    metrics::counter!("taskfleet_worker_cache_hits_total", "kind" => kind.clone()).increment(1);
    if let Some(saved) = hit.cost_usd {
        metrics::counter!("taskfleet_worker_cache_saved_microusd_total", "kind" => kind)
            .increment((saved * 1e6).round() as u64);
    }
    rt.worker.stats.finished.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("taskfleet_worker_attempts_total", "outcome" => "cache_hit").increment(1);
    let now = now_ms();
    let mut ev = attempt.event(EventKind::Succeeded);
    ev.cache_hit = true;
    ev.result = Some(hit.result);
    ev.saved_usd = hit.cost_usd;
    ev.tokens = Some(TokenUsage { prompt: embedded.tokens, completion: 0 });
    ev.cost_usd = embedded.cost_usd;
    ev.at = now;
    ev.timings = Some(Timings {
        created_at: attempt.env.created_at,
        received_at: attempt.received_at,
        started_at: now,
        finished_at: now,
    });
    ev
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
        let key = SemanticKey { name: "probe".into(), model: "m".into(), ttl: Duration::from_secs(1) };
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
}
