//! The server over real HTTP, on 127.0.0.1:0.

use super::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn start(behaviour: Behaviour) -> (RunningMock, reqwest::Client) {
    // reqwest is built with `rustls-no-provider`: the process picks the crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder().build().expect("HTTP client");
    let mock =
        MockApi::start(MockConfig { name: "test-llm".to_string(), seed: 42, behaviour, ..MockConfig::default() })
            .await
            .expect("mock starts");
    (mock, client)
}

fn chat_body(text: &str) -> Value {
    json!({"model": "gpt-test", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": text},
    ], "max_tokens": 100, "temperature": 0.2})
}

async fn post(client: &reqwest::Client, url: String, body: &Value) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let response = client.post(url).json(body).send().await.expect("request sent");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body)
}

#[tokio::test]
async fn chat_completion_round_trip_with_usage() {
    let (mock, client) = start(Behaviour::default()).await;
    let url = format!("{}/v1/chat/completions", mock.url());
    let (status, _, body) = post(&client, url.clone(), &chat_body("What is 2+2?")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reply: ChatResponse = serde_json::from_value(body.clone()).expect("OpenAI shape");
    assert_eq!(reply.object, "chat.completion");
    assert_eq!(reply.model, "gpt-test");
    assert!(reply.created > 0);
    assert_eq!(reply.choices.len(), 1);
    assert_eq!(reply.choices[0].index, 0);
    assert_eq!(reply.choices[0].message.role, "assistant");
    assert_eq!(reply.choices[0].message.content, "[test-llm] echo: What is 2+2?");
    assert_eq!(reply.choices[0].finish_reason, "stop");
    let expected_prompt = count_tokens("You are terse.") + count_tokens("What is 2+2?");
    assert_eq!(reply.usage.prompt_tokens, expected_prompt);
    assert_eq!(reply.usage.completion_tokens, count_tokens("[test-llm] echo: What is 2+2?"));
    assert_eq!(reply.usage.total_tokens, reply.usage.prompt_tokens + reply.usage.completion_tokens);
    assert_eq!(body["usage"]["total_tokens"], json!(reply.usage.total_tokens), "raw JSON field names");

    let (_, _, again) = post(&client, url, &chat_body("What is 2+2?")).await;
    assert_eq!(again["choices"], body["choices"], "same input, same content");
    assert_ne!(again["id"], body["id"], "but a fresh id per answer");
    mock.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn malformed_requests_get_400_with_an_openai_error() {
    let (mock, client) = start(Behaviour::default()).await;
    let url = format!("{}/v1/chat/completions", mock.url());
    let raw = client.post(&url).body("{not json").send().await.expect("sent");
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let body: Value = raw.json().await.expect("JSON error body");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));

    for bad in [
        json!({"messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "m"}),
        json!({"model": "m", "messages": []}),
        json!({"model": "m", "messages": [{"content": "no role"}]}),
    ] {
        let (status, _, body) = post(&client, url.clone(), &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{bad}");
    }
    let (status, _, _) = post(&client, format!("{}/v1/search", mock.url()), &json!({"max_results": 2})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let missing_q = client.get(format!("{}/v1/search", mock.url())).send().await.expect("sent");
    assert_eq!(missing_q.status(), StatusCode::BAD_REQUEST);
    assert_eq!(mock.stats().count(400), 7);
}

#[tokio::test]
async fn error_rate_one_answers_500() {
    let (mock, client) = start(Behaviour { error_rate: 1.0, ..Behaviour::default() }).await;
    for _ in 0..5 {
        let (status, _, body) = post(&client, format!("{}/v1/chat/completions", mock.url()), &chat_body("x")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["type"], "server_error");
    }
    let stats = mock.stats();
    assert_eq!((stats.count(500), stats.count(200)), (5, 0));
    assert!(stats.accepted_ms.is_empty());
}

#[tokio::test]
async fn rate_429_one_answers_429_with_retry_after() {
    let (mock, client) =
        start(Behaviour { rate_429: 1.0, error_rate: 1.0, retry_after_s: 7, ..Behaviour::default() }).await;
    let (status, headers, body) = post(&client, format!("{}/v1/chat/completions", mock.url()), &chat_body("x")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "429 wins over 500");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("7"));
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let search = client.get(format!("{}/v1/search?q=x", mock.url())).send().await.expect("sent");
    assert_eq!(search.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(mock.stats().count(429), 2);
}

#[tokio::test]
async fn control_changes_behaviour_at_run_time() {
    let (mock, client) = start(Behaviour::default()).await;
    let chat = format!("{}/v1/chat/completions", mock.url());
    let control = format!("{}/control", mock.url());
    assert_eq!(post(&client, chat.clone(), &chat_body("a")).await.0, StatusCode::OK);

    // Open a client's circuit breaker over HTTP…
    let (status, _, body) = post(&client, control.clone(), &json!({"error_rate": 1, "latency_ms": 30})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["error_rate"], 1.0);
    assert_eq!(body["retry_after_s"], 1, "fields not given are kept");
    let started = Instant::now();
    assert_eq!(post(&client, chat.clone(), &chat_body("b")).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(started.elapsed() >= Duration::from_millis(30), "latency applies to errors too");

    // …and heal it from Rust.
    let healed = mock.control(&Control { error_rate: Some(0.0), latency_ms: Some(0), ..Control::default() });
    assert_eq!(healed.expect("valid").error_rate, 0.0);
    assert_eq!(post(&client, chat.clone(), &chat_body("c")).await.0, StatusCode::OK);

    // Bad changes are refused and change nothing.
    for bad in [json!({"error_rate": 2}), json!({"rate_429": -0.1}), json!({"eror_rate": 1}), json!("nope")] {
        let (status, _, body) = post(&client, control.clone(), &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    assert!(mock.control(&Control { error_rate: Some(f64::NAN), ..Control::default() }).is_err());
    let current: Behaviour = client.get(&control).send().await.expect("sent").json().await.expect("behaviour as JSON");
    assert_eq!(current, Behaviour::default());
    assert_eq!(mock.behaviour(), current);
}

#[tokio::test]
async fn latency_is_applied() {
    let (mock, client) = start(Behaviour { latency_ms: 80, jitter_ms: 20, ..Behaviour::default() }).await;
    let started = Instant::now();
    let response = client.get(format!("{}/v1/search?q=slow", mock.url())).send().await.expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(80));
}

#[tokio::test]
async fn search_is_deterministic_over_get_and_post() {
    let (mock, client) = start(Behaviour::default()).await;
    let url = format!("{}/v1/search", mock.url());
    let (status, _, posted) = post(&client, url.clone(), &json!({"query": "rust tokio", "max_results": 3})).await;
    assert_eq!(status, StatusCode::OK);
    let got: Value = client
        .get(format!("{url}?q=rust%20tokio&max_results=3"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON");
    assert_eq!(posted, got);
    let parsed: SearchResponse = serde_json::from_value(posted).expect("search shape");
    assert_eq!(parsed.provider, "test-llm");
    assert_eq!(parsed.query, "rust tokio");
    assert_eq!(parsed.results.len(), 3);
    assert!(
        parsed.results.iter().all(|r| !r.title.is_empty() && r.url.starts_with("https://") && !r.snippet.is_empty())
    );
    let bad = client.get(format!("{url}?q=x&max_results=many")).send().await.expect("sent");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn stats_count_and_reset() {
    let (mock, client) = start(Behaviour::default()).await;
    let base = mock.url();
    assert_eq!(client.get(format!("{base}/healthz")).send().await.expect("sent").text().await.expect("text"), "ok");
    post(&client, format!("{base}/v1/chat/completions"), &chat_body("one")).await;
    post(&client, format!("{base}/v1/chat/completions"), &json!({"model": "m"})).await;
    client.get(format!("{base}/v1/search?q=two")).send().await.expect("sent");
    mock.control(&Control { rate_429: Some(1.0), ..Control::default() }).expect("valid");
    post(&client, format!("{base}/v1/search"), &json!({"query": "three"})).await;

    let stats: Stats = client.get(format!("{base}/stats")).send().await.expect("sent").json().await.expect("stats");
    assert_eq!(stats.provider, "test-llm");
    assert_eq!(stats.total, 4, "healthz, stats and control are not counted");
    assert_eq!(stats.by_endpoint[CHAT_ENDPOINT], 2);
    assert_eq!(stats.by_endpoint[SEARCH_ENDPOINT], 2);
    assert_eq!((stats.count(200), stats.count(400), stats.count(429), stats.count(500)), (2, 1, 1, 0));
    assert_eq!(stats.accepted_ms.len(), 2);
    assert!(stats.accepted_ms[0] <= stats.accepted_ms[1] && stats.accepted_ms[1] <= stats.uptime_ms);
    assert_eq!(stats.max_in_window(60_000.0), 2);

    let before: Stats =
        client.post(format!("{base}/stats/reset")).send().await.expect("sent").json().await.expect("stats");
    assert_eq!(before.total, 4, "reset answers the counters as they were");
    let after = mock.stats();
    assert_eq!((after.total, after.count(200), after.accepted_ms.len()), (0, 0, 0));
}

#[tokio::test]
async fn server_side_limit_answers_429() {
    // Two at once, then one every 5 s: the five requests below take far less than that.
    let (mock, client) = start(Behaviour { limit_per_s: 0.2, limit_burst: 2.0, ..Behaviour::default() }).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = client.get(format!("{}/v1/search?q=x", mock.url())).send().await.expect("sent");
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("5"));
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 3, "{statuses:?}");
    mock.control(&Control { limit_per_s: Some(0.0), ..Control::default() }).expect("valid");
    let response = client.get(format!("{}/v1/search?q=x", mock.url())).send().await.expect("sent");
    assert_eq!(response.status(), StatusCode::OK, "limit lifted");
}

#[tokio::test]
async fn same_seed_same_answers() {
    let behaviour = Behaviour { error_rate: 0.5, ..Behaviour::default() };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (mock, client) = start(behaviour).await;
        let mut statuses = Vec::new();
        for _ in 0..20 {
            let response = client.get(format!("{}/v1/search?q=x", mock.url())).send().await.expect("sent");
            statuses.push(response.status().as_u16());
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].contains(&200) && runs[0].contains(&500), "{:?}", runs[0]);
}

#[tokio::test]
async fn invalid_config_and_shutdown() {
    let bad = MockConfig { behaviour: Behaviour { error_rate: 1.5, ..Behaviour::default() }, ..MockConfig::default() };
    assert!(matches!(MockApi::start(bad).await, Err(MockError::Invalid { field: "error_rate", .. })));

    let (mock, client) = start(Behaviour::default()).await;
    let url = format!("{}/healthz", mock.url());
    assert!(client.get(&url).send().await.is_ok());
    let handle = mock.handle();
    mock.shutdown().await.expect("clean shutdown");
    let fresh = reqwest::Client::builder().build().expect("HTTP client");
    assert!(fresh.get(&url).send().await.is_err(), "nothing listens any more");
    assert_eq!(handle.name(), "test-llm", "a handle outlives the server");

    let (mock, _) = start(Behaviour::default()).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(mock.run_until(async move {
        let _ = rx.await;
    }));
    let _ = tx.send(());
    running.await.expect("joined").expect("clean stop");
}

#[tokio::test]
async fn embeddings_round_trip_and_refusals() {
    let (mock, client) = start(Behaviour::default()).await;
    let url = format!("{}/v1/embeddings", mock.url());
    let body = json!({"model": "embed-test", "input": ["cook fresh pasta", "cooking fresh pasta"], "dimensions": 64});
    let (status, _, body) = post(&client, url.clone(), &body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reply: EmbeddingResponse = serde_json::from_value(body).expect("OpenAI shape");
    assert_eq!(reply.data.len(), 2);
    assert_eq!(reply.data[1].index, 1);
    assert_eq!(reply.data[0].embedding.len(), 64);
    assert_eq!(reply.data[0].embedding, embed("cook fresh pasta", 64), "the documented vector");
    let (status, _, body) = post(&client, url, &json!({"model": "embed-test", "input": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let stats = mock.handle().stats();
    assert_eq!(stats.by_endpoint.get(EMBEDDINGS_ENDPOINT), Some(&2));
    mock.shutdown().await.expect("stops");
}

#[tokio::test]
async fn answered_tokens_are_billed_by_model_and_records_counted() {
    let (mock, client) = start(Behaviour::default()).await;
    let (_, _, a) = post(&client, format!("{}/v1/chat/completions", mock.url()), &chat_body("first")).await;
    let (_, _, b) = post(&client, format!("{}/v1/chat/completions", mock.url()), &chat_body("second one")).await;
    let emb = json!({"model": "emb-test", "input": ["one text", "another"]});
    let (_, _, e) = post(&client, format!("{}/v1/embeddings", mock.url()), &emb).await;
    let (status, _, stored) =
        post(&client, format!("{}/v1/records", mock.url()), &json!({"records": [{"a": 1}, {"b": 2}, 3]})).await;
    assert_eq!((status, stored), (StatusCode::OK, json!({"stored": 3})));
    mock.control(&Control { error_rate: Some(1.0), ..Control::default() }).expect("control");
    let (failed, _, _) = post(&client, format!("{}/v1/chat/completions", mock.url()), &chat_body("unbilled")).await;
    assert_eq!(failed, StatusCode::INTERNAL_SERVER_ERROR);

    let stats = mock.stats();
    let sum = |field: &str| a["usage"][field].as_u64().unwrap() + b["usage"][field].as_u64().unwrap();
    assert_eq!(stats.tokens["gpt-test"], Billed { prompt: sum("prompt_tokens"), completion: sum("completion_tokens") });
    assert_eq!(
        stats.tokens["emb-test"],
        Billed { prompt: e["usage"]["prompt_tokens"].as_u64().unwrap(), completion: 0 }
    );
    assert_eq!(stats.records, 3);
    mock.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn records_authorization_headers_and_redirects() {
    let (mock, _) = start(Behaviour::default()).await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let url = format!("{}/v1/search", mock.url());
    let r = client.post(&url).bearer_auth("sk-one").json(&json!({ "query": "q" })).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    client.get(format!("{url}?q=x")).send().await.unwrap();
    let r = client.get(format!("{}/redirect?to=http://10.0.0.1/x", mock.url())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()[reqwest::header::LOCATION], "http://10.0.0.1/x");
    let r = client.get(format!("{}/redirect", mock.url())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // The mock's own routes are not noted.
    client.get(format!("{}/healthz", mock.url())).send().await.unwrap();
    let stats = mock.stats();
    assert_eq!(stats.authorizations(), vec![Some("Bearer sk-one".to_string()), None, None, None]);
    let paths: Vec<&str> = stats.requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/v1/search", "/v1/search", "/redirect", "/redirect"]);
    assert_eq!(stats.requests[0].method, "POST");
    mock.shutdown().await.unwrap();
}
