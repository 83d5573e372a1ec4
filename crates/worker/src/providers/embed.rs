//! The `llm.embed` kind and [`Providers::embed`]: OpenAI-compatible embeddings
//! (`POST {base}/embeddings`) in batches whose size adapts per provider and model.
//!
//! The size starts at `providers.embed_batch_start`, grows by `embed_batch_step` after each
//! successful batch up to `embed_batch_max`, and halves (down to `embed_batch_min`) after a
//! failed one (5xx, timeout, connection error, 429). The sizes are shared by every task of the
//! process (every clone of one [`Providers`]) and exported as `taskfleet_embed_batch_size{model}`.
//! A failed batch is retried in smaller batches up to [`EMBED_BATCH_RETRIES`] times within the
//! attempt (no sooner than a 429's `Retry-After`, and only while the attempt has time left);
//! a batch still failing then ends the attempt with the retryable error, and the task's retry
//! policy takes over.

use super::Providers;
use crate::{Disposition, TaskContext, TaskError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use taskfleet_config::ProvidersConfig;
use taskfleet_proto::TokenUsage;

/// Times a failed embeddings batch is retried (each time at the halved size) within one attempt.
pub const EMBED_BATCH_RETRIES: u32 = 2;

/// The adaptive batch size rule: start, step, bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRule {
    /// Size of the first batch.
    pub start: usize,
    /// Added after a successful batch.
    pub step: usize,
    /// Largest size.
    pub max: usize,
    /// Smallest size.
    pub min: usize,
}

impl BatchRule {
    /// The rule of the `providers.embed_batch_*` settings.
    pub fn of(config: &ProvidersConfig) -> BatchRule {
        BatchRule {
            start: config.embed_batch_start,
            step: config.embed_batch_step,
            max: config.embed_batch_max,
            min: config.embed_batch_min.max(1),
        }
    }

    /// The size after a batch of size `size` succeeded.
    pub fn after_success(&self, size: usize) -> usize {
        size.saturating_add(self.step).min(self.max).max(self.min)
    }

    /// The size after a batch of size `size` failed.
    pub fn after_failure(&self, size: usize) -> usize {
        (size / 2).max(self.min)
    }
}

/// The current batch size per (provider, model), shared by clones.
#[derive(Clone, Debug)]
pub(super) struct BatchSizes {
    rule: BatchRule,
    sizes: Arc<Mutex<HashMap<(String, String), usize>>>,
}

impl BatchSizes {
    pub(super) fn new(rule: BatchRule) -> BatchSizes {
        BatchSizes { rule, sizes: Default::default() }
    }

    /// The current size for `key`.
    pub(super) fn current(&self, key: &(String, String)) -> usize {
        self.sizes.lock().ok().and_then(|s| s.get(key).copied()).unwrap_or(self.rule.start)
    }

    /// Applies a batch's outcome to `key`'s size and returns the new size.
    fn update(&self, key: &(String, String), succeeded: bool) -> usize {
        let Ok(mut sizes) = self.sizes.lock() else { return self.rule.start };
        let size = sizes.entry(key.clone()).or_insert(self.rule.start);
        *size = if succeeded { self.rule.after_success(*size) } else { self.rule.after_failure(*size) };
        let new = *size;
        drop(sizes);
        metrics::gauge!("taskfleet_embed_batch_size", "model" => key.1.clone()).set(new as f64);
        new
    }
}

/// The `llm.embed` kind's payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedRequest {
    model: String,
    input: Vec<String>,
}

/// What embedding a list of texts produced.
struct Embedded {
    vectors: Vec<Vec<f32>>,
    /// Provider and model of the last batch.
    provider: String,
    model: String,
    prompt_tokens: u64,
    cost_usd: Option<f64>,
}

/// One batch's answer.
struct Batch {
    vectors: Vec<Vec<f32>>,
    provider: String,
    model: String,
    prompt_tokens: u64,
}

/// The part of an OpenAI embeddings response read.
#[derive(Deserialize)]
struct Reply {
    data: Vec<ReplyVector>,
    #[serde(default)]
    usage: Option<ReplyUsage>,
}

#[derive(Deserialize)]
struct ReplyVector {
    index: usize,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct ReplyUsage {
    #[serde(default)]
    prompt_tokens: u64,
}

impl Providers {
    /// Embeds `texts` with `model` (a model in `providers.models` whose provider answers
    /// OpenAI's `POST {base}/embeddings`; its `providers.model_fallbacks` chain applies) in
    /// batches of the current adaptive size for that provider and model (see the module
    /// documentation). Each batch goes through breakers and rate limits like any call, and
    /// records its tokens and cost on the attempt ([`TaskContext::record_usage`]). Returns one
    /// vector per text, in input order.
    pub async fn embed(&self, ctx: &TaskContext, model: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, TaskError> {
        self.embed_all(ctx, model, texts).await.map(|e| e.vectors)
    }

    /// The current batch size of `model` (of its own provider) in this process.
    pub fn embed_batch_size(&self, model: &str) -> usize {
        let provider = self.config.models.get(model).cloned().unwrap_or_default();
        self.batches.current(&(provider, model.to_string()))
    }

    /// The `llm.embed` handler's body.
    pub(super) async fn embed_task(&self, ctx: &TaskContext, payload: Value) -> Result<Value, TaskError> {
        let req: EmbedRequest = serde_json::from_value(payload)
            .map_err(|e| TaskError::fatal(format!("llm.embed payload: {e}")).with_code("invalid_payload"))?;
        let e = self.embed_all(ctx, &req.model, &req.input).await?;
        Ok(json!({
            "model": e.model,
            "provider": e.provider,
            "embeddings": e.vectors,
            "usage": { "prompt_tokens": e.prompt_tokens, "total_tokens": e.prompt_tokens },
            "cost_usd": e.cost_usd,
        }))
    }

    async fn embed_all(&self, ctx: &TaskContext, model: &str, texts: &[String]) -> Result<Embedded, TaskError> {
        let targets = self.model_targets(model)?;
        let provider = targets.first().map(|t| t.provider.clone()).unwrap_or_default();
        let key = (provider.clone(), model.to_string());
        let mut out = Embedded {
            vectors: Vec::with_capacity(texts.len()),
            provider,
            model: model.to_string(),
            prompt_tokens: 0,
            cost_usd: None,
        };
        let mut start = 0;
        let mut failures = 0u32;
        while start < texts.len() {
            let size = self.batches.current(&key).max(1);
            let end = start.saturating_add(size).min(texts.len());
            match self.embed_batch(ctx, targets.clone(), &texts[start..end]).await {
                Ok(batch) => {
                    self.batches.update(&key, true);
                    let cost = self.config.price(&batch.model).map(|p| p.cost_usd(batch.prompt_tokens, 0));
                    ctx.record_usage(Some(TokenUsage { prompt: batch.prompt_tokens, completion: 0 }), cost);
                    metrics::counter!("taskfleet_llm_tokens_total", "model" => batch.model.clone(), "type" => "prompt")
                        .increment(batch.prompt_tokens);
                    if let Some(c) = cost {
                        *out.cost_usd.get_or_insert(0.0) += c;
                        metrics::counter!("taskfleet_llm_cost_microusd_total", "model" => batch.model.clone())
                            .increment((c * 1e6).round() as u64);
                    }
                    out.prompt_tokens += batch.prompt_tokens;
                    out.vectors.extend(batch.vectors);
                    out.provider = batch.provider;
                    out.model = batch.model;
                    start = end;
                    failures = 0;
                }
                Err(e) => {
                    let Disposition::Retry { not_before } = e.disposition else { return Err(e) };
                    let smaller = self.batches.update(&key, false);
                    failures += 1;
                    tracing::debug!(model, size, smaller, failures, error = %e, "embeddings batch failed");
                    if failures > EMBED_BATCH_RETRIES {
                        return Err(e);
                    }
                    let pause = not_before.unwrap_or(Duration::from_millis(50 * u64::from(failures)));
                    if pause >= ctx.remaining() {
                        return Err(e);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = ctx.cancel.cancelled() => return Err(e),
                    }
                }
            }
        }
        Ok(out)
    }

    /// One embeddings request.
    async fn embed_batch(
        &self,
        ctx: &TaskContext,
        targets: Vec<super::Target>,
        texts: &[String],
    ) -> Result<Batch, TaskError> {
        let (target, answer) = self
            .call(ctx, targets, |t| {
                let body = json!({ "model": t.model.clone().unwrap_or_default(), "input": texts });
                self.client.post(format!("{}/embeddings", t.url)).json(&body)
            })
            .await?;
        let bad = |m: String| TaskError::retryable(m).with_code("bad_response");
        let reply: Reply = serde_json::from_slice(&answer.body)
            .map_err(|e| bad(format!("{} embeddings answer: {e}", target.provider)))?;
        if reply.data.len() != texts.len() {
            return Err(bad(format!(
                "{} returned {} vectors for {} texts",
                target.provider,
                reply.data.len(),
                texts.len()
            )));
        }
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        for v in reply.data {
            match slots.get_mut(v.index) {
                Some(slot @ None) => *slot = Some(v.embedding),
                _ => return Err(bad(format!("{} returned a bad or repeated index {}", target.provider, v.index))),
            }
        }
        let vectors = slots.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| bad("missing vector".into()))?;
        Ok(Batch {
            vectors,
            provider: target.provider,
            model: target.model.unwrap_or_default(),
            prompt_tokens: reply.usage.map_or(0, |u| u.prompt_tokens),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: BatchRule = BatchRule { start: 10, step: 5, max: 100, min: 5 };

    #[test]
    fn grows_by_step_up_to_max_and_halves_down_to_min() {
        let mut size = RULE.start;
        let mut seen = vec![size];
        for _ in 0..25 {
            size = RULE.after_success(size);
            seen.push(size);
        }
        assert_eq!(&seen[..5], &[10, 15, 20, 25, 30]);
        assert_eq!(*seen.last().unwrap(), 100, "capped at max");
        assert_eq!(RULE.after_failure(100), 50);
        assert_eq!(RULE.after_failure(15), 7);
        assert_eq!(RULE.after_failure(9), 5, "not below min");
        assert_eq!(RULE.after_failure(5), 5);
        assert_eq!(RULE.after_success(5), 10);
    }

    #[test]
    fn the_default_rule_is_10_5_100_5() {
        assert_eq!(BatchRule::of(&ProvidersConfig::default()), RULE);
    }

    #[test]
    fn sizes_are_shared_by_clones_and_kept_per_provider_and_model() {
        let sizes = BatchSizes::new(RULE);
        let other = sizes.clone();
        let a = ("p".to_string(), "m".to_string());
        let b = ("p".to_string(), "n".to_string());
        assert_eq!(sizes.update(&a, true), 15);
        assert_eq!(other.current(&a), 15);
        assert_eq!(other.current(&b), 10);
        assert_eq!(other.update(&a, false), 7);
        assert_eq!(sizes.current(&a), 7);
    }
}
