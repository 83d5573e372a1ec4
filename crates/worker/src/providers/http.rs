//! The `http` kind and [`Providers::http`]: a request template sent to a provider, a chain of
//! providers, or a URL.

use super::{Providers, Target, encode_component, guard};
use crate::{TaskContext, TaskError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

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
    /// Joined to the provider's base URL as a path (see `guard::join_path`).
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
    /// Sends a request as the `http` kind does: `request` is that kind's payload
    /// (`{"provider" | "url", "method", "path", "query", "headers", "json" | "body"}`) and the
    /// result has its shape (`{"provider", "status", "json" | "body"}`). It goes through the
    /// provider's (or chain's) breakers and rate limits, and the shared result cache under the
    /// `http` kind's policy (`policies.cache`), keyed as an `http` task with this payload would
    /// be; a cached result has `"cached": true` added.
    pub async fn http(&self, ctx: &TaskContext, request: Value) -> Result<Value, TaskError> {
        let payload = request.clone();
        self.cached(ctx, "http", &payload, self.http_uncached(ctx, request)).await
    }

    /// The `http` call without the cache.
    pub(super) async fn http_uncached(&self, ctx: &TaskContext, payload: Value) -> Result<Value, TaskError> {
        let req: HttpRequest = serde_json::from_value(payload)
            .map_err(|e| TaskError::fatal(format!("http payload: {e}")).with_code("invalid_payload"))?;
        let method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes()).map_err(|_| {
            TaskError::fatal(format!("method {:?} is not valid", req.method)).with_code("invalid_payload")
        })?;
        // Everything the payload decides is checked here, before any breaker or limit is
        // consulted: a request that cannot be built is the payload's fault, never a provider's.
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &req.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                TaskError::fatal(format!("header name {k:?} is not valid")).with_code("invalid_payload")
            })?;
            if name == reqwest::header::HOST {
                return Err(TaskError::fatal("the Host header cannot be set").with_code("invalid_payload"));
            }
            let value = reqwest::header::HeaderValue::from_str(v).map_err(|_| {
                TaskError::fatal(format!("header {k:?}: value is not valid")).with_code("invalid_payload")
            })?;
            headers.append(name, value);
        }
        let query = (!req.query.is_empty()).then(|| {
            req.query
                .iter()
                .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
                .collect::<Vec<_>>()
                .join("&")
        });
        let with_query = |url: reqwest::Url| {
            let mut url = url.to_string();
            if let Some(q) = &query {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str(q);
            }
            url
        };
        let targets: Vec<Target> = match (&req.provider, &req.url) {
            (Some(p), None) => {
                let mut targets = Vec::new();
                for name in self.config.chain(p) {
                    let mut t = self.provider_target(&name)?;
                    t.url = with_query(guard::join_path(&t.url, &req.path)?);
                    targets.push(t);
                }
                targets
            }
            (None, Some(u)) => {
                let parsed = reqwest::Url::parse(u)
                    .map_err(|e| TaskError::fatal(format!("url {u:?}: {e}")).with_code("invalid_payload"))?;
                self.guard.check_url(&parsed, "url").map_err(guard::Refused::into_task_error)?;
                let url = guard::join_path(parsed.as_str(), &req.path)?;
                let host = parsed.host_str().unwrap_or("unknown").to_string();
                // Its own breaker (`url:<host>`), and no API key whatever the host is called.
                vec![Target {
                    provider: host.clone(),
                    breaker: format!("url:{host}"),
                    limit: None,
                    url: with_query(url),
                    origin: None,
                    model: None,
                }]
            }
            _ => return Err(TaskError::fatal("name exactly one of `provider` and `url`").with_code("invalid_payload")),
        };
        let (target, answer) = self
            .call(ctx, targets, |t| {
                let mut rb = self.client_for(t).request(method.clone(), &t.url).headers(headers.clone());
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
}
