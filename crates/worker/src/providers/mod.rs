//! The built-in handlers that call outside services: `http` (a request template sent to a
//! provider, a fallback chain of providers, or a URL) and `llm.chat` (an OpenAI-compatible chat
//! completion, with model fallbacks, token counts and cost).
//!
//! Every call goes through the dependency's circuit breaker (shared by the fleet): a provider
//! whose breaker is open is skipped for the next one in the chain, and when all are open the
//! task is deferred until the first cooldown ends. A provider's rate limit (`providers.limits`)
//! gives a token before the call or defers the task. Responses: 2xx succeed; 429 is retried no
//! sooner than its `Retry-After`; 5xx, timeouts and connection errors are retryable failures
//! that count against the breaker; other 4xx fail the task.

use crate::{Handler, TaskContext, TaskError};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_config::ProvidersConfig;
use taskfleet_proto::TokenUsage;
use taskfleet_shared_state::{BreakerState, Permit};

/// The HTTP client and provider table behind the `http` and `llm.chat` handlers.
#[derive(Clone)]
pub struct Providers {
    client: reqwest::Client,
    config: Arc<ProvidersConfig>,
}

/// One place a call can go.
#[derive(Debug, Clone)]
struct Target {
    /// Provider name.
    provider: String,
    /// Breaker name.
    breaker: String,
    /// Rate limit taken before the call.
    limit: Option<String>,
    /// Base URL (or the full URL for a plain `url` request).
    url: String,
    /// Model, for `llm.chat`.
    model: Option<String>,
}

/// A provider's answer.
struct Answer {
    status: u16,
    body: Vec<u8>,
    retry_after: Option<Duration>,
}

/// The `http` handler's payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpRequest {
    /// A provider or a chain of providers from the configuration.
    provider: Option<String>,
    /// An absolute URL, when no provider is named.
    url: Option<String>,
    #[serde(default = "default_method")]
    method: String,
    /// Appended to the provider's base URL.
    #[serde(default)]
    path: String,
    #[serde(default)]
    query: BTreeMap<String, String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// A JSON body.
    json: Option<Value>,
    /// A text body.
    body: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}

impl Providers {
    /// A client with pooled keep-alive connections, as configured.
    pub fn new(config: &ProvidersConfig) -> Result<Providers, crate::WorkerError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .timeout(config.request_timeout)
            .user_agent(concat!("taskfleet-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Providers { client, config: Arc::new(config.clone()) })
    }

    /// The `http` handler.
    pub fn http_handler(&self) -> impl Handler {
        let this = self.clone();
        move |ctx: TaskContext, payload: Value| {
            let this = this.clone();
            async move { this.http(ctx, payload).await }
        }
    }

    /// The `llm.chat` handler.
    pub fn llm_chat_handler(&self) -> impl Handler {
        let this = self.clone();
        move |ctx: TaskContext, payload: Value| {
            let this = this.clone();
            async move { this.llm_chat(ctx, payload).await }
        }
    }

    fn provider_target(&self, name: &str) -> Result<Target, TaskError> {
        let url = self.config.urls.get(name).ok_or_else(|| {
            TaskError::fatal(format!("provider {name:?} has no url in providers.urls")).with_code("unknown_provider")
        })?;
        Ok(Target {
            provider: name.to_string(),
            breaker: name.to_string(),
            limit: self.config.limits.get(name).cloned(),
            url: url.trim_end_matches('/').to_string(),
            model: None,
        })
    }

    async fn http(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
        let req: HttpRequest = serde_json::from_value(payload)
            .map_err(|e| TaskError::fatal(format!("http payload: {e}")).with_code("invalid_payload"))?;
        let method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes()).map_err(|_| {
            TaskError::fatal(format!("method {:?} is not valid", req.method)).with_code("invalid_payload")
        })?;
        let targets = match (&req.provider, &req.url) {
            (Some(p), None) => {
                self.config.chain(p).iter().map(|n| self.provider_target(n)).collect::<Result<_, _>>()?
            }
            (None, Some(u)) => {
                let parsed = reqwest::Url::parse(u)
                    .map_err(|e| TaskError::fatal(format!("url {u:?}: {e}")).with_code("invalid_payload"))?;
                let host = parsed.host_str().unwrap_or("unknown").to_string();
                vec![Target { provider: host.clone(), breaker: host, limit: None, url: u.clone(), model: None }]
            }
            _ => return Err(TaskError::fatal("name exactly one of `provider` and `url`").with_code("invalid_payload")),
        };
        let (target, answer) = self
            .call(&ctx, targets, |t| {
                let mut url = format!("{}{}", t.url, req.path);
                if !req.query.is_empty() {
                    let pairs: Vec<String> = req
                        .query
                        .iter()
                        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
                        .collect();
                    url.push(if url.contains('?') { '&' } else { '?' });
                    url.push_str(&pairs.join("&"));
                }
                let mut rb = self.client.request(method.clone(), url);
                for (k, v) in &req.headers {
                    rb = rb.header(k, v);
                }
                if let Some(j) = &req.json {
                    rb = rb.json(j);
                } else if let Some(b) = &req.body {
                    rb = rb.body(b.clone());
                }
                rb
            })
            .await?;
        let body = match serde_json::from_slice::<Value>(&answer.body) {
            Ok(v) => json!({ "json": v }),
            Err(_) => json!({ "body": String::from_utf8_lossy(&answer.body) }),
        };
        let mut out = json!({ "provider": target.provider, "status": answer.status });
        if let (Some(o), Value::Object(b)) = (out.as_object_mut(), body) {
            o.extend(b);
        }
        Ok(out)
    }

    async fn llm_chat(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
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
        let mut targets = Vec::new();
        for m in self.config.model_chain(model) {
            let provider = self.config.models.get(&m).ok_or_else(|| {
                TaskError::fatal(format!("model {m:?} is not in providers.models")).with_code("unknown_model")
            })?;
            let mut t = self.provider_target(provider)?;
            t.breaker = format!("llm:{m}");
            t.model = Some(m);
            targets.push(t);
        }
        let (target, answer) = self
            .call(&ctx, targets, |t| {
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

    /// Calls the first target whose breaker lets the call through.
    async fn call(
        &self,
        ctx: &TaskContext,
        targets: Vec<Target>,
        build: impl Fn(&Target) -> reqwest::RequestBuilder,
    ) -> Result<(Target, Answer), TaskError> {
        let mut soonest: Option<Duration> = None;
        for t in targets {
            let seen = match ctx.breakers() {
                None => BreakerState::Closed,
                Some(b) => match b.check(&t.breaker).await {
                    Permit::Granted(s) => s,
                    Permit::Refused { retry_after } => {
                        tracing::debug!(provider = %t.provider, breaker = %t.breaker, "breaker open, trying the next provider");
                        soonest = Some(soonest.map_or(retry_after, |s| s.min(retry_after)));
                        continue;
                    }
                },
            };
            if let Some(limit) = &t.limit {
                ctx.acquire(limit).await?;
            }
            let mut rb = build(&t).timeout(ctx.remaining().min(self.config.request_timeout));
            if let Some(var) = self.config.api_key_envs.get(&t.provider)
                && let Ok(key) = std::env::var(var)
            {
                rb = rb.bearer_auth(key);
            }
            let result = self.send(rb).await;
            let healthy = match &result {
                Ok(a) => a.status < 500,
                Err(_) => false,
            };
            if let Some(b) = ctx.breakers() {
                b.record(&t.breaker, seen, healthy).await;
            }
            let answer = result?;
            return match answer.status {
                200..=299 => Ok((t, answer)),
                429 => Err(TaskError::retryable(format!("{} answered 429 Too Many Requests", t.provider))
                    .with_code("http_429")
                    .retry_after(answer.retry_after.unwrap_or(Duration::from_secs(1)))),
                s @ 500.. => Err(TaskError::retryable(format!("{} answered {s}: {}", t.provider, answer.excerpt()))
                    .with_code(format!("http_{s}"))),
                s => Err(TaskError::fatal(format!("{} answered {s}: {}", t.provider, answer.excerpt()))
                    .with_code(format!("http_{s}"))),
            };
        }
        let wait = soonest.unwrap_or(Duration::from_secs(1));
        Err(TaskError::deferred(crate::DeferReason::BreakerOpen, "every provider's circuit breaker is open", wait))
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Answer, TaskError> {
        let mut resp = rb.send().await.map_err(|e| {
            let code = if e.is_timeout() { "http_timeout" } else { "http_connect" };
            TaskError::retryable(format!("request failed: {e}")).with_code(code)
        })?;
        let status = resp.status().as_u16();
        // Whole seconds (the HTTP-date form is rare from APIs and is ignored).
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| TaskError::retryable(format!("reading the response: {e}")).with_code("http_read"))?
        {
            if body.len() + chunk.len() > self.config.max_response_bytes {
                return Err(TaskError::fatal(format!(
                    "response larger than providers.max_response_bytes ({})",
                    self.config.max_response_bytes
                ))
                .with_code("response_too_large"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, body, retry_after })
    }
}

/// Percent-encodes a query component (RFC 3986 unreserved characters stay).
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Answer {
    fn excerpt(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned()
    }
}
