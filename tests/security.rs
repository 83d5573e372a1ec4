//! The `http` handler is not an open proxy, with the real binaries and local mocks of the
//! outside APIs: `url` targets need `providers.url_hosts`; loopback, private and link-local
//! addresses (cloud metadata) are refused for them after DNS resolution and on redirects; a
//! `path` cannot change the host; an API key goes only to its own provider's host; and requests
//! that cannot be built fail their task without counting at any breaker.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use taskfleet_mock_api::{Behaviour, MockApi, MockConfig, RunningMock};
use taskfleet_proto::{RetryBackoff, TaskEnvelope};

const OPENAI_KEY: &str = "sk-openai-e2e-secret";
const LOCALHOST_KEY: &str = "sk-localhost-e2e-secret";

async fn mock(name: &str) -> RunningMock {
    MockApi::start(MockConfig { name: name.into(), behaviour: Behaviour::default(), ..MockConfig::default() })
        .await
        .unwrap()
}

fn http(payload: Value) -> TaskEnvelope {
    let mut t = TaskEnvelope::new("http", payload);
    // A retryable error would show as more attempts; the refusals are fatal at the first.
    t.max_attempts = 3;
    t.retry = Some(RetryBackoff { base_ms: 20, factor: 2.0, max_ms: 100 });
    t
}

/// (state, attempt, error code, error message) of a task.
async fn outcome(pool: &sqlx::PgPool, task: &TaskEnvelope) -> (String, i32, Option<String>, Option<String>) {
    sqlx::query_as("SELECT state, attempt, error->>'code', error->>'message' FROM tasks WHERE id = $1")
        .bind(task.id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Submits `tasks` and checks that each ends `failed` at its first attempt with its code, and a
/// message containing its text.
async fn expect_refused(fleet: &Fleet, tasks: &[(TaskEnvelope, &str, &str)]) {
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let before: i64 = fleet.counts(&pool).await.values().sum();
    let envs: Vec<TaskEnvelope> = tasks.iter().map(|t| t.0.clone()).collect();
    fleet.submit_all(&client, &envs).await;
    fleet.wait_final(&pool, before + tasks.len() as i64, Duration::from_secs(60)).await;
    for (task, code, text) in tasks {
        let (state, attempt, got_code, message) = outcome(&pool, task).await;
        println!("{} -> {state} {got_code:?}: {}", task.payload, message.as_deref().unwrap_or(""));
        assert_eq!(
            (state.as_str(), attempt, got_code.as_deref()),
            ("failed", 1, Some(*code)),
            "{}: {message:?}\n{}",
            task.payload,
            fleet.logs()
        );
        let message = message.unwrap_or_default();
        assert!(message.contains(text), "{}: {message:?} lacks {text:?}", task.payload);
    }
}

/// Without `providers.url_hosts` no `url` is called; `path` tricks and requests that cannot be
/// built fail their tasks; 20 of them leave the provider's breaker (opened by one failure here)
/// closed, so a valid call afterwards succeeds at once, with the key, the only request the
/// provider saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_tricks_fail_their_task_and_never_count_at_a_breaker() {
    let openai = mock("openai").await;
    let mut fleet = Fleet::new("sec-payload");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("openai={}/v1", openai.url()))
        .set("TASKFLEET_PROVIDERS_API_KEY_ENVS", "openai=SECURITY_E2E_OPENAI_KEY")
        .set("SECURITY_E2E_OPENAI_KEY", OPENAI_KEY)
        .set("TASKFLEET_POLICIES_BREAKER_FAILURES", "1")
        .set("TASKFLEET_POLICIES_BREAKER_COOLDOWN", "60s")
        .set("TASKFLEET_POLICIES_BREAKER_MAX_WAIT", "60s");
    fleet.start_coordinator();
    fleet.start_worker(&[]);

    let search_url = format!("{}/v1/search", openai.url());
    let mut tricks = vec![
        (http(json!({ "url": search_url, "query": { "q": "x" } })), "url_not_allowed", "providers.url_hosts is empty"),
        (http(json!({ "url": "http://openai/v1/search" })), "url_not_allowed", "providers.url_hosts is empty"),
    ];
    for (path, why) in [
        (".evil.com/x", "must start with `/`"),
        ("@evil.com/", "must start with `/`"),
        ("/../../x", "`.` or `..` segments"),
        ("//evil.com/x", "must not start with `//`"),
    ] {
        tricks.push((http(json!({ "provider": "openai", "path": path })), "invalid_path", why));
    }
    expect_refused(&fleet, &tricks).await;

    let malformed = [
        (json!({ "provider": "openai", "method": "GE T", "path": "/search" }), "invalid_payload", "method"),
        (
            json!({ "provider": "openai", "path": "/search", "headers": { "bad name": "x" } }),
            "invalid_payload",
            "header name",
        ),
        (
            json!({ "provider": "openai", "path": "/search", "headers": { "x-a": "a\nb" } }),
            "invalid_payload",
            "value is not valid",
        ),
        (json!({ "provider": "openai", "path": "/a\\b" }), "invalid_path", "`\\`"),
        (json!({ "provider": "openai", "path": "http://evil.com/x" }), "invalid_path", "must start with `/`"),
    ];
    let twenty: Vec<(TaskEnvelope, &str, &str)> =
        malformed.iter().cycle().take(20).map(|(p, code, text)| (http(p.clone()), *code, *text)).collect();
    expect_refused(&fleet, &twenty).await;
    assert!(openai.stats().requests.is_empty(), "nothing reached the provider: {:?}", openai.stats().requests);

    // The breaker is closed: a valid call succeeds at its first attempt, long before the cooldown.
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let valid = http(json!({ "provider": "openai", "method": "POST", "path": "/search", "json": { "query": "ok" } }));
    let started = Instant::now();
    fleet.submit_all(&client, std::slice::from_ref(&valid)).await;
    fleet.wait_final(&pool, 27, Duration::from_secs(30)).await;
    let (state, attempt, code, _) = outcome(&pool, &valid).await;
    println!("valid call after 20 malformed: {state} at attempt {attempt} in {:?}", started.elapsed());
    assert_eq!((state.as_str(), attempt, code), ("succeeded", 1, None), "{}", fleet.logs());
    assert!(started.elapsed() < Duration::from_secs(20));
    let stats = openai.stats();
    assert_eq!(stats.count(500), 0);
    assert_eq!(stats.count(200), 1);
    let seen: Vec<(&str, Option<&str>)> =
        stats.requests.iter().map(|r| (r.path.as_str(), r.authorization.as_deref())).collect();
    assert_eq!(seen, [("/v1/search", Some(format!("Bearer {OPENAI_KEY}").as_str()))]);
}

/// With hosts allow-listed by IP address or name, loopback, private and link-local addresses are
/// still refused: IP literals at once, names after DNS resolution, and redirects from the
/// provider to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_after_dns_and_on_redirects() {
    let openai = mock("openai").await;
    let port = openai.addr().port();
    let mut fleet = Fleet::new("sec-private");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("openai={}", openai.url()))
        .set("TASKFLEET_PROVIDERS_API_KEY_ENVS", "openai=SECURITY_E2E_OPENAI_KEY")
        .set("SECURITY_E2E_OPENAI_KEY", OPENAI_KEY)
        .set("TASKFLEET_PROVIDERS_URL_HOSTS", "127.0.0.1,169.254.169.254,10.1.2.3,localhost,[::ffff:127.0.0.1]");
    fleet.start_coordinator();
    fleet.start_worker(&[]);

    let url = |u: String| http(json!({ "url": u, "path": "/v1/search", "query": { "q": "x" } }));
    let redirect = |to: String| http(json!({ "provider": "openai", "path": "/redirect", "query": { "to": to } }));
    let tricks = vec![
        (url(format!("http://127.0.0.1:{port}")), "address_not_allowed", "address 127.0.0.1 is refused"),
        (url("http://169.254.169.254".into()), "address_not_allowed", "address 169.254.169.254 is refused"),
        (url("http://10.1.2.3".into()), "address_not_allowed", "address 10.1.2.3 is refused"),
        (
            url(format!("http://localhost:{port}")),
            "address_not_allowed",
            "localhost resolves only to refused addresses",
        ),
        (url("http://[::ffff:127.0.0.1]".into()), "address_not_allowed", "address [::ffff:7f00:1] is refused"),
        (url("http://[::1]".into()), "url_not_allowed", "[::1] is not in providers.url_hosts"),
        (
            redirect("http://169.254.169.254/latest/meta-data/".into()),
            "address_not_allowed",
            "address 169.254.169.254 is refused",
        ),
        (
            redirect(format!("http://localhost:{port}/v1/search?q=x")),
            "address_not_allowed",
            "localhost resolves only to refused addresses",
        ),
        (
            redirect("http://evil.example/x".into()),
            "redirect_not_allowed",
            "evil.example is not in providers.url_hosts",
        ),
    ];
    expect_refused(&fleet, &tricks).await;
    // The provider saw only the three calls to its `/redirect`, each with its key; nothing else
    // reached it.
    let seen: Vec<(String, Option<String>)> =
        openai.stats().requests.into_iter().map(|r| (r.path, r.authorization)).collect();
    let key = Some(format!("Bearer {OPENAI_KEY}"));
    assert_eq!(seen, vec![("/redirect".to_string(), key); 3]);
}

/// An API key goes only to its provider's host: not to a `url` whose host is named like a
/// provider (`localhost` here, the one such name a test can resolve), and not past a redirect
/// to another host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_go_only_to_their_providers_host() {
    let openai = mock("openai").await;
    let named_localhost = mock("localhost").await;
    let outside = mock("outside").await;
    let outside_port = outside.addr().port();
    let mut fleet = Fleet::new("sec-keys");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("openai={},localhost={}", openai.url(), named_localhost.url()))
        .set("TASKFLEET_PROVIDERS_API_KEY_ENVS", "openai=SECURITY_E2E_OPENAI_KEY,localhost=SECURITY_E2E_LOCAL_KEY")
        .set("SECURITY_E2E_OPENAI_KEY", OPENAI_KEY)
        .set("SECURITY_E2E_LOCAL_KEY", LOCALHOST_KEY)
        .set("TASKFLEET_PROVIDERS_URL_HOSTS", "localhost")
        .set("TASKFLEET_PROVIDERS_ALLOW_PRIVATE_ADDRESSES", "127.0.0.0/8");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let tasks = [
        // A `url` whose host has a provider's name.
        http(json!({ "url": format!("http://localhost:{outside_port}/v1/search"), "query": { "q": "url" } })),
        // A redirect from the provider to another host.
        http(json!({ "provider": "openai", "path": "/redirect",
                     "query": { "to": format!("http://localhost:{outside_port}/v1/search?q=redirected") } })),
        // The providers themselves.
        http(json!({ "provider": "openai", "path": "/v1/search", "query": { "q": "own" } })),
        http(json!({ "provider": "localhost", "path": "/v1/search", "query": { "q": "own" } })),
    ];
    fleet.submit_all(&client, &tasks).await;
    fleet.wait_final(&pool, tasks.len() as i64, Duration::from_secs(60)).await;
    for t in &tasks {
        let (state, _, code, message) = outcome(&pool, t).await;
        assert_eq!(state, "succeeded", "{}: {code:?} {message:?}\n{}", t.payload, fleet.logs());
    }
    let auth = |m: &RunningMock| m.stats().authorizations();
    println!(
        "authorizations seen: openai {:?}, localhost {:?}, outside {:?}",
        auth(&openai),
        auth(&named_localhost),
        auth(&outside)
    );
    assert_eq!(auth(&outside), vec![None, None], "no key reached the outside host");
    assert_eq!(auth(&openai), vec![Some(format!("Bearer {OPENAI_KEY}")); 2]);
    assert_eq!(auth(&named_localhost), vec![Some(format!("Bearer {LOCALHOST_KEY}"))]);
}
