//! The providers against the mock API: adaptive embedding batches, the inline cache, and
//! overflow to a chain's fallbacks on rate limits (the last two with the local Redis).

use super::*;
use crate::Disposition;
use crate::policies::Policies;
use serde_json::json;
use taskfleet_config::{PoliciesConfig, RedisConfig};
use taskfleet_mock_api::{Behaviour, Control, EMBEDDINGS_ENDPOINT, MockApi, MockConfig, RunningMock};
use taskfleet_proto::TokenUsage;
use taskfleet_shared_state::{CacheKey, SharedState};

async fn mock(name: &str, behaviour: Behaviour) -> RunningMock {
    MockApi::start(MockConfig { name: name.into(), behaviour, ..MockConfig::default() }).await.unwrap()
}

fn embed_config(mock: &RunningMock) -> ProvidersConfig {
    let mut c = ProvidersConfig::default();
    c.urls.insert("emb".into(), format!("{}/v1", mock.url()));
    c.models.insert("emb-a".into(), "emb".into());
    c.prices.insert("emb-a".into(), "0.02/0".parse().unwrap());
    c
}

fn embeddings_requests(mock: &RunningMock) -> u64 {
    mock.stats().by_endpoint.get(EMBEDDINGS_ENDPOINT).copied().unwrap_or(0)
}

/// A context with the fleet's shared state in the local Redis, under a fresh key prefix.
async fn shared_context(policies: &PoliciesConfig) -> TaskContext {
    let cfg = taskfleet_config::Config {
        redis: RedisConfig {
            url: std::env::var("TASKFLEET_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            key_prefix: format!("taskfleet-test:{}:", uuid::Uuid::now_v7()),
            ..RedisConfig::default()
        },
        policies: policies.clone(),
        ..taskfleet_config::Config::default()
    };
    // Wait for the connection (the policies connect in the background).
    let probe = SharedState::connect_and_wait(&cfg.redis, Duration::from_secs(5)).await.unwrap();
    assert!(probe.is_up(), "these tests need Redis at {}", cfg.redis.url);
    let policies = Policies::connect(&cfg, &Default::default(), Default::default()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while policies.cache.claim(&CacheKey::new("probe", &json!(null), &"1s".parse().unwrap())).await
        == CacheClaim::Unavailable
    {
        assert!(std::time::Instant::now() < deadline, "Redis did not come up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ctx = TaskContext::for_test("custom");
    ctx.shared = Some(policies.shared.clone());
    ctx
}

#[tokio::test]
async fn embeds_250_texts_in_order_in_growing_batches() {
    let api = mock("emb", Behaviour::default()).await;
    let providers = Providers::new(&embed_config(&api)).unwrap();
    let ctx = TaskContext::for_test("custom");
    let texts: Vec<String> = (0..250).map(|i| format!("text number {i} about topic {}", i % 7)).collect();
    let vectors = providers.embed(&ctx, "emb-a", &texts).await.unwrap();
    assert_eq!(vectors.len(), 250);
    for (text, v) in texts.iter().zip(&vectors) {
        assert_eq!(*v, taskfleet_mock_api::embed(text, taskfleet_mock_api::DEFAULT_DIMENSIONS), "{text}");
    }
    // 10 + 15 + 20 + 25 + 30 + 35 + 40 + 45 = 220, then the last 30 in a batch of up to 50.
    assert_eq!(embeddings_requests(&api), 9);
    assert_eq!(providers.embed_batch_size("emb-a"), 55);
    let tokens: u64 = texts.iter().map(|t| u64::from(taskfleet_mock_api::count_tokens(t))).sum();
    let usage = ctx.usage();
    assert_eq!(usage.tokens, Some(TokenUsage { prompt: tokens, completion: 0 }));
    assert!((usage.cost_usd.unwrap() - tokens as f64 * 0.02 / 1e6).abs() < 1e-12);
}

#[tokio::test]
async fn a_failing_batch_halves_the_size_and_is_retried() {
    let api = mock("emb", Behaviour { error_rate: 1.0, ..Behaviour::default() }).await;
    let providers = Providers::new(&embed_config(&api)).unwrap();
    let ctx = TaskContext::for_test("custom");
    let texts: Vec<String> = (0..30).map(|i| format!("text {i}")).collect();
    let err = providers.embed(&ctx, "emb-a", &texts).await.unwrap_err();
    assert!(matches!(err.disposition, Disposition::Retry { .. }), "{err:?}");
    assert_eq!(err.code, "http_500");
    // The first try and two retries; 10 → 5 → 5 (the minimum) → 5.
    assert_eq!(embeddings_requests(&api), 1 + u64::from(embed::EMBED_BATCH_RETRIES));
    assert_eq!(providers.embed_batch_size("emb-a"), 5);

    // Healed: the size grows again from where it was (5, 10, 15).
    api.control(&Control { error_rate: Some(0.0), ..Control::default() }).unwrap();
    let before = embeddings_requests(&api);
    let vectors = providers.embed(&ctx, "emb-a", &texts).await.unwrap();
    assert_eq!(vectors.len(), 30);
    assert_eq!(embeddings_requests(&api) - before, 3);
    assert_eq!(providers.embed_batch_size("emb-a"), 20);
}

#[tokio::test]
async fn a_failure_in_the_middle_is_retried_smaller_and_keeps_the_order() {
    let api = mock("emb", Behaviour { latency_ms: 20, ..Behaviour::default() }).await;
    let providers = Providers::new(&embed_config(&api)).unwrap();
    let ctx = TaskContext::for_test("custom");
    let texts: Vec<String> = (0..100).map(|i| format!("again {i}")).collect();
    let task = {
        let (providers, ctx, texts) = (providers.clone(), ctx.clone(), texts.clone());
        tokio::spawn(async move { providers.embed(&ctx, "emb-a", &texts).await })
    };
    // After two good batches (10, 15), fail one, then heal.
    while api.stats().count(200) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    api.control(&Control { error_rate: Some(1.0), ..Control::default() }).unwrap();
    while api.stats().count(500) < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    api.control(&Control { error_rate: Some(0.0), ..Control::default() }).unwrap();
    let out = task.await.unwrap().unwrap();
    assert_eq!(out.len(), 100);
    for (text, v) in texts.iter().zip(&out) {
        assert_eq!(*v, taskfleet_mock_api::embed(text, taskfleet_mock_api::DEFAULT_DIMENSIONS), "{text}");
    }
    assert!(api.stats().count(500) >= 1);
}

#[tokio::test]
async fn a_4xx_batch_fails_without_shrinking() {
    let api = mock("emb", Behaviour::default()).await;
    let providers = Providers::new(&embed_config(&api)).unwrap();
    let ctx = TaskContext::for_test("custom");
    // The mock answers 400 to an empty model name: a fatal error, not a batch-size problem.
    let mut config = embed_config(&api);
    config.models.insert(String::new(), "emb".into());
    let blank = Providers::new(&config).unwrap();
    let err = blank.embed(&ctx, "", &["x".to_string()]).await.unwrap_err();
    assert_eq!(err.disposition, Disposition::Fatal, "{err:?}");
    assert_eq!(blank.embed_batch_size(""), 10);
    assert!(providers.embed(&ctx, "emb-a", &[]).await.unwrap().is_empty());
    let err = providers.embed(&ctx, "nope", &["x".to_string()]).await.unwrap_err();
    assert_eq!(err.code, "unknown_model");
}

#[tokio::test]
async fn the_embed_kind_answers_vectors_usage_and_cost() {
    let api = mock("emb", Behaviour::default()).await;
    let providers = Providers::new(&embed_config(&api)).unwrap();
    let out = providers
        .llm_embed_handler()
        .call(TaskContext::for_test("llm.embed"), json!({ "model": "emb-a", "input": ["a cat", "a dog"] }))
        .await
        .unwrap();
    assert_eq!(out["model"], "emb-a");
    assert_eq!(out["provider"], "emb");
    assert_eq!(out["embeddings"].as_array().map(Vec::len), Some(2));
    assert!(out["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(out["cost_usd"].as_f64().unwrap() > 0.0);
    let bad = providers.llm_embed_handler().call(TaskContext::for_test("llm.embed"), json!({ "input": [] })).await;
    assert_eq!(bad.unwrap_err().code, "invalid_payload");
}

#[tokio::test]
async fn inline_chat_uses_the_shared_cache_and_records_the_saving() {
    let api = mock("llm", Behaviour { latency_ms: 200, ..Behaviour::default() }).await;
    let mut config = ProvidersConfig::default();
    config.urls.insert("llm".into(), format!("{}/v1", api.url()));
    config.models.insert("model-a".into(), "llm".into());
    config.prices.insert("model-a".into(), "1/2".parse().unwrap());
    let providers = Providers::new(&config).unwrap();
    let mut policies = PoliciesConfig::default();
    policies.cache.insert("llm.chat".into(), "1m by model+messages".parse().unwrap());
    let ctx = shared_context(&policies).await;
    let request = json!({ "model": "model-a", "messages": [{ "role": "user", "content": "hello" }] });

    // Two at once: single-flight, one call.
    let (first, second) = tokio::join!(providers.chat(&ctx, request.clone()), providers.chat(&ctx, request.clone()));
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(api.stats().count(200), 1);
    let cost = first["cost_usd"].as_f64().or_else(|| second["cost_usd"].as_f64()).unwrap();
    assert_eq!(
        [&first, &second].iter().filter(|r| r["cached"] == true).count(),
        1,
        "one computed, one cached: {first} {second}"
    );

    // Later: a hit, same shape plus `cached`, no tokens or cost, the saving recorded.
    let later = TaskContext { usage: Default::default(), ..ctx.clone() };
    let third = providers.chat(&later, request.clone()).await.unwrap();
    assert_eq!(api.stats().count(200), 1);
    assert_eq!(third["cached"], true);
    assert_eq!(third["content"], first["content"]);
    let usage = later.usage();
    assert_eq!((usage.tokens, usage.cost_usd), (None, None));
    assert!((usage.saved_usd.unwrap() - cost).abs() < 1e-12);

    // Another field that is not part of the key still hits; another message does not.
    let mut other = request.clone();
    other["temperature"] = json!(0.5);
    assert_eq!(providers.chat(&later, other).await.unwrap()["cached"], true);
    let mut other = request;
    other["messages"][0]["content"] = json!("bye");
    assert!(providers.chat(&later, other).await.unwrap().get("cached").is_none());
    assert_eq!(api.stats().count(200), 2);
}

#[tokio::test]
async fn inline_http_without_a_policy_is_not_cached() {
    let api = mock("search", Behaviour::default()).await;
    let mut config = ProvidersConfig::default();
    config.urls.insert("search".into(), api.url());
    let providers = Providers::new(&config).unwrap();
    let ctx = shared_context(&PoliciesConfig::default()).await;
    let request = json!({ "provider": "search", "method": "POST", "path": "/v1/search", "json": { "query": "q" } });
    for _ in 0..2 {
        let out = providers.http(&ctx, request.clone()).await.unwrap();
        assert_eq!(out["status"], 200);
        assert!(out.get("cached").is_none());
    }
    assert_eq!(api.stats().count(200), 2);
}

/// Three providers a>b>c at 5/s each and 30 calls at once: a's limit overflows to b and c, no
/// provider gets more than its limit allows in any second, and every call succeeds (calls that
/// find every limit empty are deferred and tried again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_overflows_to_its_fallbacks_within_their_limits() {
    let mocks = [
        mock("a", Behaviour::default()).await,
        mock("b", Behaviour::default()).await,
        mock("c", Behaviour::default()).await,
    ];
    let mut config = ProvidersConfig::default();
    let mut policies = PoliciesConfig::default();
    for (name, m) in ["a", "b", "c"].iter().zip(&mocks) {
        config.urls.insert(name.to_string(), m.url());
        config.limits.insert(name.to_string(), name.to_string());
        policies.rate_limits.insert(name.to_string(), "5/s".parse().unwrap());
    }
    config.chains.insert("search".into(), "a>b>c".parse().unwrap());
    let providers = Providers::new(&config).unwrap();
    let ctx = shared_context(&policies).await;
    let calls = (0..30).map(|i| {
        let (providers, ctx) = (providers.clone(), ctx.clone());
        tokio::spawn(async move {
            let request =
                json!({ "provider": "search", "method": "POST", "path": "/v1/search", "json": { "query": format!("q{i}") } });
            let mut deferrals = 0;
            loop {
                match providers.http(&ctx, request.clone()).await {
                    Ok(out) => return (out, deferrals),
                    Err(TaskError { disposition: Disposition::Defer { reason, delay }, .. }) => {
                        assert_eq!(reason, DeferReason::RateLimited);
                        deferrals += 1;
                        tokio::time::sleep(delay).await;
                    }
                    Err(e) => panic!("call {i}: {e}"),
                }
            }
        })
    });
    let outcomes = futures::future::join_all(calls).await;
    let mut by_provider = std::collections::BTreeMap::<String, usize>::new();
    for o in outcomes {
        let (out, _) = o.unwrap();
        assert_eq!(out["status"], 200);
        *by_provider.entry(out["provider"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(by_provider.values().sum::<usize>(), 30);
    for m in &mocks {
        let stats = m.stats();
        // 5/s burst 1: at most 5 + 1 arrivals in any second.
        assert!(stats.max_in_window(1000.0) <= 6, "{}: {:?}", stats.provider, stats.accepted_ms);
        assert!(stats.count(200) > 0, "{} got no calls: {by_provider:?}", stats.provider);
    }
}

/// The provider's API key in these tests: `PATH`, the one variable surely set.
const KEY_VAR: &str = "PATH";

fn bearer() -> Option<String> {
    Some(format!("Bearer {}", std::env::var(KEY_VAR).unwrap()))
}

async fn call_http(providers: &Providers, ctx: &TaskContext, request: Value) -> Result<Value, TaskError> {
    providers.http_handler().call(ctx.clone(), request).await
}

#[tokio::test]
async fn url_targets_follow_the_allow_list_and_the_address_rules() {
    let a = mock("localhost", Behaviour::default()).await;
    let b = mock("other", Behaviour::default()).await;
    let port_b = b.addr().port();
    let mut config = ProvidersConfig::default();
    // A provider named like the host of a `url` target, with a key.
    config.urls.insert("localhost".into(), a.url());
    config.api_key_envs.insert("localhost".into(), KEY_VAR.into());
    let ctx = TaskContext::for_test("http");
    let search = |url: String| json!({ "url": url, "path": "/v1/search", "query": { "q": "x" } });

    let none = Providers::new(&config).unwrap();
    let e = call_http(&none, &ctx, search(format!("http://127.0.0.1:{port_b}"))).await.unwrap_err();
    assert_eq!((e.code.as_str(), e.disposition), ("url_not_allowed", Disposition::Fatal), "{e:?}");
    assert!(e.message.contains("providers.url_hosts is empty"), "{e:?}");

    config.url_hosts = vec!["localhost".into(), "127.0.0.1".into(), "169.254.169.254".into(), "10.1.2.3".into()];
    let strict = Providers::new(&config).unwrap();
    for url in [format!("http://127.0.0.1:{port_b}"), "http://169.254.169.254".into(), "http://10.1.2.3".into()] {
        let e = call_http(&strict, &ctx, search(url.clone())).await.unwrap_err();
        assert_eq!((e.code.as_str(), e.disposition), ("address_not_allowed", Disposition::Fatal), "{url}");
        assert!(e.message.contains("is refused"), "{e:?}");
    }
    let e = call_http(&strict, &ctx, search(format!("http://localhost:{port_b}"))).await.unwrap_err();
    assert_eq!((e.code.as_str(), e.disposition), ("address_not_allowed", Disposition::Fatal), "{e:?}");
    assert!(e.message.contains("localhost resolves only to refused addresses"), "{e:?}");
    let e = call_http(&strict, &ctx, search("http://not-listed.example".into())).await.unwrap_err();
    assert_eq!(e.code, "url_not_allowed");
    assert!(b.stats().requests.is_empty(), "nothing reached the mock: {:?}", b.stats().requests);

    // Loopback allowed: `localhost` is called, without the key of the provider named `localhost`.
    config.allow_private_addresses = vec!["127.0.0.1/32".into()];
    let open = Providers::new(&config).unwrap();
    let out = call_http(&open, &ctx, search(format!("http://localhost:{port_b}"))).await.unwrap();
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(b.stats().authorizations(), vec![None]);
    // The provider itself gets its key.
    let out = call_http(&open, &ctx, json!({ "provider": "localhost", "path": "/v1/search", "query": { "q": "x" } }))
        .await
        .unwrap();
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(a.stats().authorizations(), vec![bearer()]);
}

#[tokio::test]
async fn redirects_off_the_providers_host_follow_the_url_rules_and_lose_the_key() {
    let a = mock("a", Behaviour::default()).await;
    let b = mock("b", Behaviour::default()).await;
    let mut config = ProvidersConfig::default();
    config.urls.insert("a".into(), a.url());
    config.api_key_envs.insert("a".into(), KEY_VAR.into());
    config.url_hosts = vec!["localhost".into(), "169.254.169.254".into()];
    let ctx = TaskContext::for_test("http");
    let via = |to: &str| json!({ "provider": "a", "path": "/redirect", "query": { "to": to } });
    let target_b = format!("http://localhost:{}/v1/search?q=x", b.addr().port());

    let strict = Providers::new(&config).unwrap();
    for (to, code) in [
        ("http://169.254.169.254/latest/meta-data/", "address_not_allowed"),
        (target_b.as_str(), "address_not_allowed"),
        ("http://evil.example/x", "redirect_not_allowed"),
    ] {
        let e = call_http(&strict, &ctx, via(to)).await.unwrap_err();
        assert_eq!((e.code.as_str(), e.disposition), (code, Disposition::Fatal), "{to}: {e:?}");
    }
    // Redirects on the provider's own host are followed, five at most.
    let mut to = format!("{}/v1/search?q=x", a.url());
    // The call's own `/redirect` and four more: five redirects.
    for _ in 0..4 {
        to = format!("{}/redirect?to={}", a.url(), encode_component(&to));
    }
    assert_eq!(call_http(&strict, &ctx, via(&to)).await.unwrap()["status"], 200);
    let e = call_http(&strict, &ctx, via(&format!("{}/redirect?to={}", a.url(), encode_component(&to)))).await;
    assert_eq!(e.unwrap_err().code, "too_many_redirects");

    config.allow_private_addresses = vec!["127.0.0.0/8".into()];
    let open = Providers::new(&config).unwrap();
    a.reset_stats();
    let out = call_http(&open, &ctx, via(&target_b)).await.unwrap();
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(a.stats().authorizations(), vec![bearer()]);
    assert_eq!(b.stats().authorizations(), vec![None], "the key is dropped on a redirect to another host");
}

/// Requests that cannot be built from the payload fail their task and never reach the provider
/// or count at its breaker (one failure opens it here).
#[tokio::test]
async fn malformed_requests_never_reach_the_provider_or_its_breaker() {
    let api = mock("p", Behaviour::default()).await;
    let mut config = ProvidersConfig::default();
    config.urls.insert("p".into(), format!("{}/v1", api.url()));
    config.api_key_envs.insert("p".into(), KEY_VAR.into());
    let policies = PoliciesConfig { breaker_failures: 1, ..PoliciesConfig::default() };
    let ctx = shared_context(&policies).await;
    let providers = Providers::new(&config).unwrap();
    let bad = [
        (json!({ "provider": "p", "method": "GE T" }), "invalid_payload"),
        (json!({ "provider": "p", "headers": { "bad name": "x" } }), "invalid_payload"),
        (json!({ "provider": "p", "headers": { "x-a": "a\nb" } }), "invalid_payload"),
        (json!({ "provider": "p", "headers": { "host": "evil.com" } }), "invalid_payload"),
        (json!({ "provider": "p", "path": ".evil.com/x" }), "invalid_path"),
        (json!({ "provider": "p", "path": "@evil.com/" }), "invalid_path"),
        (json!({ "provider": "p", "path": "/../../x" }), "invalid_path"),
        (json!({ "provider": "p", "path": "//evil.com/x" }), "invalid_path"),
        (json!({ "provider": "p", "path": "/a\\b" }), "invalid_path"),
        (json!({ "url": "http://p/v1/search" }), "url_not_allowed"),
    ];
    for (request, code) in bad.iter().cycle().take(20) {
        let e = call_http(&providers, &ctx, request.clone()).await.unwrap_err();
        assert_eq!((e.code.as_str(), e.disposition), (*code, Disposition::Fatal), "{request}: {e:?}");
    }
    assert!(api.stats().requests.is_empty(), "{:?}", api.stats().requests);
    let out = call_http(&providers, &ctx, json!({ "provider": "p", "path": "/search", "query": { "q": "x" } }))
        .await
        .unwrap();
    assert_eq!(out["status"], 200);
    let seen = api.stats().requests;
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].path.as_str(), seen[0].authorization.clone()), ("/v1/search", bearer()));
}
