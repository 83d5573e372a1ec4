//! The `llm.chat` kind and [`Providers::chat`]: an OpenAI-compatible chat completion.

use super::Providers;
use crate::{TaskContext, TaskError};
use serde_json::{Map, Value, json};
use taskfleet_proto::TokenUsage;

impl Providers {
    /// A chat completion as the `llm.chat` kind makes it: `request` is that kind's payload
    /// (`{"model", "messages", ...}`, other fields passed through) and the result has its shape
    /// (`{"model", "provider", "content", "finish_reason", "usage", "cost_usd"}`). It goes
    /// through the model chain (`providers.model_fallbacks`), breakers and rate limits; tokens
    /// and cost are recorded on the attempt ([`TaskContext::record_usage`]). It consults the
    /// shared result cache under the `llm.chat` kind's policy (`policies.cache`), keyed as an
    /// `llm.chat` task with this payload would be, with single-flight: a cached result has
    /// `"cached": true` added, records no tokens or cost, and records its cost as saved
    /// ([`TaskContext::record_saved`]).
    pub async fn chat(&self, ctx: &TaskContext, request: Value) -> Result<Value, TaskError> {
        let payload = request.clone();
        self.cached(ctx, "llm.chat", &payload, self.chat_uncached(ctx, request)).await
    }

    /// The `llm.chat` call without the cache.
    pub(super) async fn chat_uncached(&self, ctx: &TaskContext, payload: Value) -> Result<Value, TaskError> {
        let Value::Object(request) = payload else {
            return Err(TaskError::fatal("llm.chat payload must be an object").with_code("invalid_payload"));
        };
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| TaskError::fatal("llm.chat payload needs a `model`").with_code("invalid_payload"))?;
        if !request.get("messages").is_some_and(Value::is_array) {
            return Err(TaskError::fatal("llm.chat payload needs `messages`").with_code("invalid_payload"));
        }
        let targets = self.model_targets(model)?;
        let (target, answer) = self
            .call(ctx, targets, |t| {
                let mut body: Map<String, Value> = request.clone();
                body.insert("model".into(), Value::String(t.model.clone().unwrap_or_default()));
                body.remove("stream");
                self.client.post(format!("{}/chat/completions", t.url)).json(&body)
            })
            .await?;
        let reply: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| TaskError::retryable(format!("completion is not JSON: {e}")).with_code("bad_response"))?;
        let model = target.model.unwrap_or_default();
        let usage = reply.get("usage");
        let tokens = TokenUsage {
            prompt: usage.and_then(|u| u.get("prompt_tokens")).and_then(Value::as_u64).unwrap_or(0),
            completion: usage.and_then(|u| u.get("completion_tokens")).and_then(Value::as_u64).unwrap_or(0),
        };
        let cost = self.config.price(&model).map(|price| price.cost_usd(tokens.prompt, tokens.completion));
        ctx.record_usage(Some(tokens), cost);
        if let Some(c) = cost {
            metrics::counter!("taskfleet_llm_cost_microusd_total", "model" => model.clone())
                .increment((c * 1e6).round() as u64);
        }
        metrics::counter!("taskfleet_llm_tokens_total", "model" => model.clone(), "type" => "prompt")
            .increment(tokens.prompt);
        metrics::counter!("taskfleet_llm_tokens_total", "model" => model.clone(), "type" => "completion")
            .increment(tokens.completion);
        let choice = reply.get("choices").and_then(|c| c.get(0));
        Ok(json!({
            "model": model,
            "provider": target.provider,
            "content": choice.and_then(|c| c.pointer("/message/content")).cloned().unwrap_or(Value::Null),
            "finish_reason": choice.and_then(|c| c.get("finish_reason")).cloned().unwrap_or(Value::Null),
            "usage": { "prompt_tokens": tokens.prompt, "completion_tokens": tokens.completion },
            "cost_usd": cost,
        }))
    }
}
