//! The outside services taskfleet calls: the built-in `http` (a request template sent to a
//! provider, a fallback chain of providers, or a URL), `llm.chat` (an OpenAI-compatible chat
//! completion, with model fallbacks, token counts and cost) and `llm.embed` (OpenAI-compatible
//! embeddings in adaptive batches) handlers, and the same calls for handlers of your own
//! ([`Providers::chat`], [`Providers::http`], [`Providers::embed`]).
//!
//! Every call goes through the dependency's circuit breaker (shared by the fleet): a provider
//! whose breaker is open is skipped for the next one in the chain. A provider's rate limit
//! (`providers.limits`) gives a token before the call (waiting for a booked slot within the
//! reservation horizon); in a chain, a provider whose limit has no token within the horizon is
//! skipped for the next one whose limit has, so a burst overflows to the fallbacks without any
//! provider exceeding its limit. When every provider is skipped the task is deferred until the
//! soonest of their breaker cooldowns and limit slots; a single provider whose limit has no token
//! defers the task. Responses: 2xx succeed; 429 in a chain moves on to the next provider like a
//! limit without a token (its `Retry-After` is that provider's soonest slot), and a lone
//! provider's 429 is retried no sooner than its `Retry-After`, counting against nothing; 5xx,
//! timeouts and connection errors are retryable failures that count against the breaker; other
//! 4xx fail the task.
//!
//! Where a call may go (see `guard`): a provider's API key is sent only to that provider's
//! configured host (never with a `url` target, and reqwest drops it on a redirect to another
//! host); a payload's `path` is joined as a URL path and cannot change the host; a `url` target
//! must be on `providers.url_hosts`, and it (and any redirect off a provider's host) may not
//! reach loopback, private, link-local, CGNAT, unspecified or multicast addresses unless
//! `providers.allow_private_addresses` lets it, checked after DNS resolution. A request refused
//! by these rules, or that cannot be built from the payload, fails its task (fatal) and counts
//! against no breaker.
//!
//! The inline [`Providers::chat`] and [`Providers::http`] calls also use the fleet's result
//! cache under the `llm.chat` and `http` kinds' policies (`policies.cache`), with single-flight.

mod chat;
mod embed;
mod guard;
mod http;
#[cfg(test)]
mod tests;

use crate::{DeferReason, Handler, TaskContext, TaskError};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_config::ProvidersConfig;
use taskfleet_shared_state::{CacheClaim, Decision, Grant, Permit};
use tracing::Instrument;

pub use embed::{BatchRule, EMBED_BATCH_RETRIES};

/// The HTTP client and provider table behind the `http`, `llm.chat` and `llm.embed` handlers
/// and the inline calls handlers make. Clones share the client and the adaptive embedding batch
/// sizes (the worker binary makes one for the process).
#[derive(Clone)]
pub struct Providers {
    /// For provider targets: a provider's own host resolves to any address.
    client: reqwest::Client,
    /// For `url` targets: every name resolved under the address rules, no proxy.
    url_client: reqwest::Client,
    guard: Arc<guard::Guard>,
    config: Arc<ProvidersConfig>,
    batches: embed::BatchSizes,
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
    /// The provider's configured URL, to whose scheme, host and port alone its API key is sent;
    /// `None` for a `url` target (no key, the `url` client).
    origin: Option<reqwest::Url>,
    /// Model, for `llm.chat` and `llm.embed`.
    model: Option<String>,
}

/// A provider's answer.
struct Answer {
    status: u16,
    body: Vec<u8>,
    retry_after: Option<Duration>,
}

impl Providers {
    /// A client with pooled keep-alive connections, as configured (installing rustls' `ring`
    /// crypto provider when the process has none).
    pub fn new(config: &ProvidersConfig) -> Result<Providers, crate::WorkerError> {
        // The process's TLS crypto provider, unless one is installed already (the worker binary
        // installs it; a program of your own need not).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let guard = Arc::new(guard::Guard::new(config));
        let builder = || {
            reqwest::Client::builder()
                .pool_max_idle_per_host(config.pool_max_idle_per_host)
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_keepalive(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(10))
                .timeout(config.request_timeout)
                .user_agent(concat!("taskfleet-worker/", env!("CARGO_PKG_VERSION")))
        };
        let client = builder().dns_resolver(guard.resolver(true)).redirect(guard.redirect_policy(true)).build()?;
        // No proxy: through one, the name would be resolved where the address rules cannot see.
        let url_client =
            builder().dns_resolver(guard.resolver(false)).redirect(guard.redirect_policy(false)).no_proxy().build()?;
        Ok(Providers {
            client,
            url_client,
            guard,
            config: Arc::new(config.clone()),
            batches: embed::BatchSizes::new(BatchRule::of(config)),
        })
    }

    /// The `http` handler (the task kind's cache policy is applied at admission).
    pub fn http_handler(&self) -> impl Handler {
        let this = self.clone();
        move |ctx: TaskContext, payload: Value| {
            let this = this.clone();
            async move { this.http_uncached(&ctx, payload).await }
        }
    }

    /// The `llm.chat` handler (the task kind's cache policy is applied at admission).
    pub fn llm_chat_handler(&self) -> impl Handler {
        let this = self.clone();
        move |ctx: TaskContext, payload: Value| {
            let this = this.clone();
            async move { this.chat_uncached(&ctx, payload).await }
        }
    }

    /// The `llm.embed` handler: `{"model", "input": [texts]}` →
    /// `{"model", "provider", "embeddings": [[..]], "usage": {"prompt_tokens"}, "cost_usd"}`.
    pub fn llm_embed_handler(&self) -> impl Handler {
        let this = self.clone();
        move |ctx: TaskContext, payload: Value| {
            let this = this.clone();
            async move { this.embed_task(&ctx, payload).await }
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
            origin: Some(reqwest::Url::parse(url).map_err(|e| {
                TaskError::fatal(format!("provider {name:?}: url {url:?}: {e}")).with_code("unknown_provider")
            })?),
            model: None,
        })
    }

    /// The targets of a model and its fallbacks (breaker per model).
    fn model_targets(&self, model: &str) -> Result<Vec<Target>, TaskError> {
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
        Ok(targets)
    }

    /// Runs `compute` for a call that a task of `kind` with `payload` would make, through the
    /// shared result cache under that kind's policy: a stored result is returned with
    /// `"cached": true` (its cost recorded as saved); an identical call running elsewhere is
    /// waited for; otherwise the call runs and its result (with the cost it reports in
    /// `cost_usd`) is stored. Without a policy or Redis the call just runs.
    async fn cached<F>(&self, ctx: &TaskContext, kind: &str, payload: &Value, compute: F) -> Result<Value, TaskError>
    where
        F: std::future::Future<Output = Result<Value, TaskError>>,
    {
        let Some(cache) = ctx.cache() else { return compute.await };
        let Some(key) = cache.key_for(kind, payload) else { return compute.await };
        // The lease lasts `policies.cache_lease` and is renewed while the call runs, so a
        // worker killed mid-call holds its twins up for at most that long.
        let span = tracing::info_span!(parent: &ctx.span, "cache.lookup", kind, inline = true,
                                       result = tracing::field::Empty, waited = false);
        let (claim, waited) =
            cache.claim_or_wait(&key, cache.single_flight_wait().min(ctx.remaining())).instrument(span.clone()).await;
        span.record("waited", waited);
        match claim {
            CacheClaim::Hit(hit) => {
                span.record("result", "hit");
                metrics::counter!("taskfleet_worker_inline_cache_hits_total", "kind" => kind.to_string()).increment(1);
                if let Some(saved) = hit.cost_usd {
                    ctx.record_saved(saved);
                    metrics::counter!("taskfleet_worker_cache_saved_microusd_total", "kind" => kind.to_string())
                        .increment((saved * 1e6).round() as u64);
                }
                let mut result = hit.result;
                if let Some(o) = result.as_object_mut() {
                    o.insert("cached".into(), Value::Bool(true));
                }
                Ok(result)
            }
            CacheClaim::Leader(lease) => {
                span.record("result", "miss");
                let outcome = compute.await;
                // An inline call cannot spawn: a success of an attempt not cancelled is cacheable.
                match &outcome {
                    Ok(result) if !ctx.cancel.is_cancelled() => {
                        let cost = result.get("cost_usd").and_then(Value::as_f64);
                        cache.store(&key, lease, result, cost).await;
                    }
                    _ => cache.release(&key, lease).await,
                }
                outcome
            }
            CacheClaim::Follower | CacheClaim::Unavailable => {
                span.record("result", if claim == CacheClaim::Follower { "wait_expired" } else { "unavailable" });
                compute.await
            }
        }
    }

    /// Calls the first target whose breaker lets the call through and whose rate limit has a
    /// token within the reservation horizon (a lone target's limit defers the task instead). In
    /// a chain, a provider answering 429 is skipped like one whose limit has no token, its
    /// `Retry-After` taken as its soonest slot; a lone provider's 429 is a retryable error no
    /// sooner than its `Retry-After`. A call not made (no token) or answered 429 counts for
    /// nothing at the breaker: a half-open breaker's trial permit is given back.
    async fn call(
        &self,
        ctx: &TaskContext,
        targets: Vec<Target>,
        build: impl Fn(&Target) -> reqwest::RequestBuilder,
    ) -> Result<(Target, Answer), TaskError> {
        let single = targets.len() == 1;
        let mut breaker_open: Option<Duration> = None;
        let mut limited: Option<Duration> = None;
        let soonest = |slot: &mut Option<Duration>, d: Duration| *slot = Some(slot.map_or(d, |s| s.min(d)));
        for t in targets {
            let grant = match ctx.breakers() {
                None => None,
                Some(b) => match b.check(&t.breaker).await {
                    Permit::Granted(g) => Some(g),
                    Permit::Refused { retry_after } => {
                        tracing::debug!(provider = %t.provider, breaker = %t.breaker, "breaker open, trying the next provider");
                        soonest(&mut breaker_open, retry_after);
                        continue;
                    }
                },
            };
            if let Some(limit) = &t.limit {
                let decision = if single {
                    ctx.acquire(limit).await.map(|()| Decision::Allowed)
                } else {
                    ctx.try_acquire(limit).await
                };
                match decision {
                    Err(e) => {
                        give_back(ctx, &t.breaker, grant).await;
                        return Err(e);
                    }
                    Ok(Decision::Denied { retry_after }) => {
                        // No token within the horizon: overflow to the next provider.
                        give_back(ctx, &t.breaker, grant).await;
                        tracing::debug!(provider = %t.provider, limit = %limit, "rate limit has no token, trying the next provider");
                        metrics::counter!("taskfleet_provider_overflow_total", "provider" => t.provider.clone(),
                                          "reason" => "no_token")
                        .increment(1);
                        soonest(&mut limited, retry_after);
                        continue;
                    }
                    Ok(_) => {}
                }
            }
            let (client, request) = build(&t).timeout(ctx.remaining().min(self.config.request_timeout)).build_split();
            let mut request = match request {
                Ok(r) => r,
                Err(e) => {
                    // The payload's fault, not the provider's.
                    give_back(ctx, &t.breaker, grant).await;
                    return Err(TaskError::fatal(format!("cannot build the request: {e}")).with_code("invalid_payload"));
                }
            };
            self.authorize(&t, &mut request);
            let result = self.send(&client, request).await;
            if let Err((refused, _)) = &result
                && let Some(refused) = refused
            {
                // Refused by the address or redirect rules: the payload's fault, not the provider's.
                give_back(ctx, &t.breaker, grant).await;
                return Err(refused.clone().into_task_error());
            }
            let result = result.map_err(|(_, e)| e);
            if let Ok(answer) = &result
                && answer.status == 429
            {
                // The provider is up but limiting us: neither a success nor a failure.
                give_back(ctx, &t.breaker, grant).await;
                let slot = answer.retry_after.unwrap_or(Duration::from_secs(1));
                if single {
                    return Err(TaskError::retryable(format!("{} answered 429 Too Many Requests", t.provider))
                        .with_code("http_429")
                        .retry_after(slot));
                }
                tracing::debug!(provider = %t.provider, retry_after_ms = slot.as_millis() as u64,
                                "provider answered 429, trying the next provider");
                metrics::counter!("taskfleet_provider_overflow_total", "provider" => t.provider.clone(), "reason" => "429")
                    .increment(1);
                soonest(&mut limited, slot);
                continue;
            }
            let healthy = match &result {
                Ok(a) => a.status < 500,
                Err(_) => false,
            };
            if let (Some(b), Some(g)) = (ctx.breakers(), grant) {
                b.record(&t.breaker, g.state, healthy).await;
            }
            let answer = result?;
            return match answer.status {
                200..=299 => Ok((t, answer)),
                s @ 500.. => Err(TaskError::retryable(format!("{} answered {s}: {}", t.provider, answer.excerpt()))
                    .with_code(format!("http_{s}"))),
                s => Err(TaskError::fatal(format!("{} answered {s}: {}", t.provider, answer.excerpt()))
                    .with_code(format!("http_{s}"))),
            };
        }
        if let Some(slot) = limited {
            let wait = breaker_open.map_or(slot, |b| b.min(slot));
            return Err(TaskError::deferred(
                DeferReason::RateLimited,
                "every provider of the chain is rate-limited (or its circuit breaker is open)",
                wait,
            ));
        }
        let wait = breaker_open.unwrap_or(Duration::from_secs(1));
        Err(TaskError::deferred(DeferReason::BreakerOpen, "every provider's circuit breaker is open", wait))
    }

    /// Adds the provider's API key to `request` when it goes to the provider's own configured
    /// scheme, host and port; never for a `url` target.
    fn authorize(&self, t: &Target, request: &mut reqwest::Request) {
        let Some(origin) = &t.origin else { return };
        let Some(var) = self.config.api_key_envs.get(&t.provider) else { return };
        if !guard::same_origin(request.url(), origin) {
            tracing::warn!(provider = %t.provider, "request not to the provider's host: no API key");
            return;
        }
        if let Ok(key) = std::env::var(var)
            && let Ok(mut value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
        {
            value.set_sensitive(true);
            request.headers_mut().insert(reqwest::header::AUTHORIZATION, value);
        }
    }

    /// The client a target's requests go through.
    fn client_for(&self, t: &Target) -> &reqwest::Client {
        if t.origin.is_some() { &self.client } else { &self.url_client }
    }

    /// Sends `request`; a failure the address or redirect rules caused comes with its refusal.
    async fn send(
        &self,
        client: &reqwest::Client,
        request: reqwest::Request,
    ) -> Result<Answer, (Option<guard::Refused>, TaskError)> {
        let mut resp = client.execute(request).await.map_err(|e| {
            if let Some(refused) = guard::Refused::behind(&e) {
                let err = refused.clone().into_task_error();
                return (Some(refused), err);
            }
            let code = if e.is_timeout() { "http_timeout" } else { "http_connect" };
            (None, TaskError::retryable(format!("request failed: {e}")).with_code(code))
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
            .map_err(|e| (None, TaskError::retryable(format!("reading the response: {e}")).with_code("http_read")))?
        {
            if body.len() + chunk.len() > self.config.max_response_bytes {
                return Err((
                    None,
                    TaskError::fatal(format!(
                        "response larger than providers.max_response_bytes ({})",
                        self.config.max_response_bytes
                    ))
                    .with_code("response_too_large"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, body, retry_after })
    }
}

/// Gives a breaker permit back unused (see [`taskfleet_shared_state::Breakers::give_back`]).
async fn give_back(ctx: &TaskContext, breaker: &str, grant: Option<Grant>) {
    if let (Some(b), Some(g)) = (ctx.breakers(), grant) {
        b.give_back(breaker, g).await;
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
