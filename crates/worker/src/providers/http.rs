//! The `http` kind and [`Providers::http`]: a request template sent to a provider, a chain of
//! providers, or a URL.

use super::{Providers, Target, encode_component};
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
            .call(ctx, targets, |t| {
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
}
