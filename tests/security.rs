//! The `http` handler is not an open proxy, with the real binaries and local mocks of the
//! outside APIs: `url` targets need `providers.url_hosts`; loopback, private and link-local
//! addresses (cloud metadata) are refused for them after DNS resolution and on redirects; a
//! `path` cannot change the host; an API key goes only to its own provider's host; and requests
//! that cannot be built fail their task without counting at any breaker. And each NATS role
//! (client, worker, aggregator) is refused what its permissions do not grant.

use futures::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use taskfleet_bus::send_submission;
use taskfleet_e2e::Fleet;
use taskfleet_mock_api::{Behaviour, MockApi, MockConfig, RunningMock};
use taskfleet_proto::{AGGREGATOR_CONSUMER, Priority, RetryBackoff, Role, TaskEnvelope};
use taskfleet_test_support::role_password;

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

/// The task's state, once the coordinator has recorded it.
async fn state(pool: &sqlx::PgPool, task: &TaskEnvelope) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1").bind(task.id).fetch_optional(pool).await.unwrap()
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

/// A connection as one role of the fleet, with every error the server reported to it.
struct Login {
    role: Role,
    client: async_nats::Client,
    errors: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Login {
    async fn new(fleet: &Fleet, role: Role) -> Login {
        let (tx, errors) = tokio::sync::mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::with_user_and_password(role.as_str().into(), role_password(role))
            .custom_inbox_prefix(role.inbox_prefix())
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(fleet.env.nats.url.as_str())
            .await
            .unwrap_or_else(|e| panic!("log in as {}: {e}", role.as_str()));
        Login { role, client, errors }
    }

    /// Publishes `body` to `subject` and expects the server to refuse it.
    async fn publish_refused(&mut self, subject: &str, body: Vec<u8>) {
        self.client.publish(subject.to_string(), body.into()).await.expect("publish");
        self.client.flush().await.expect("flush");
        self.refused("Publish", subject).await;
    }

    /// Sends a request to `subject` and expects the server to refuse it (so it gets no answer).
    async fn request_refused(&mut self, subject: &str, body: Vec<u8>) {
        let asking = self.client.request(subject.to_string(), body.into());
        let answer = tokio::time::timeout(Duration::from_secs(2), asking).await;
        assert!(!matches!(answer, Ok(Ok(_))), "{} got an answer on {subject}", self.role.as_str());
        self.refused("Publish", subject).await;
    }

    /// Subscribes to `subject` and expects the server to refuse the subscription.
    async fn subscribe_refused(&mut self, subject: &str) {
        let _sub = self.client.subscribe(subject.to_string()).await.expect("subscribe");
        self.client.flush().await.expect("flush");
        self.refused("Subscription", subject).await;
    }

    /// Waits for the server's `Permissions Violation for <what> to "<subject>"`.
    async fn refused(&mut self, what: &str, subject: &str) {
        let wanted = format!("Permissions Violation for {what} to \"{subject}\"");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.errors.recv()).await {
                Ok(Some(e)) if e.contains(&wanted) => {
                    println!("{}: {what} to {subject} refused: {e}", self.role.as_str());
                    return;
                }
                Ok(Some(_)) => continue,
                _ => panic!("{} was not refused: no {wanted:?} within 5 s", self.role.as_str()),
            }
        }
    }

    /// A JetStream API request this role may make: answered, without an error.
    async fn js_api_ok(&mut self, subject: &str) {
        let answer = tokio::time::timeout(Duration::from_secs(5), self.client.request(subject.to_string(), "".into()))
            .await
            .unwrap_or_else(|_| panic!("{} got no answer on {subject}", self.role.as_str()))
            .expect("request");
        let reply: Value = serde_json::from_slice(&answer.payload).expect("JSON reply");
        assert!(reply.get("error").is_none(), "{} on {subject}: {reply}", self.role.as_str());
        assert!(self.errors.try_recv().is_err(), "{} was refused on {subject}", self.role.as_str());
    }
}

/// Each role, logged in with its own credentials, is refused everything outside its
/// permissions, and nothing it tried had an effect: a running task is not cancelled, no stream,
/// consumer or cancellation entry is made. What each role may do still works (the client's
/// submission, the worker's and the aggregator's consumer lookups, the admin's cancel), and no
/// process logged a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_nats_role_is_refused_outside_its_permissions() {
    let mut fleet = Fleet::new("roles");
    assert!(fleet.env.nats.has_authorization(), "the test server runs with authorization");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_aggregator();
    let s = fleet.subjects();
    let pool = fleet.env.pg_pool().await;
    let (dispatch, events) = (s.dispatch_stream(), s.events_stream());
    let consumer = s.dispatch_consumer("default", Priority::Normal);

    // The client may submit: a task that runs for a minute unless cancelled.
    let mut client = Login::new(&fleet, Role::Client).await;
    let task = TaskEnvelope::new("sleep", json!({ "ms": 60_000 }));
    let js = async_nats::jetstream::new(client.client.clone());
    send_submission(&js, &s, &task, async_nats::HeaderMap::new())
        .await
        .expect("client submits")
        .stored()
        .await
        .expect("the client's submission is stored");
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&pool, &task).await.as_deref() != Some("running") {
        assert!(Instant::now() < deadline, "the task never ran\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = serde_json::to_vec(&json!({ "id": task.id })).expect("encode");
    let succeeded = serde_json::to_vec(&json!({ "task_id": task.id, "kind": "succeeded" })).expect("encode");

    // The client: no events, no dispatches, no API beyond run.submit, no JetStream API, and it
    // cannot read the event stream.
    client.publish_refused(&s.events("default", Priority::Normal), succeeded.clone()).await;
    client
        .publish_refused(&s.dispatch("default", Priority::Critical), serde_json::to_vec(&task).expect("encode"))
        .await;
    client.request_refused(&s.api("task.cancel"), cancel.clone()).await;
    client.request_refused(&s.api("task.get"), cancel.clone()).await;
    client.request_refused("$JS.API.STREAM.CREATE.EVIL_CLIENT", b"{}".to_vec()).await;
    client.subscribe_refused(&s.events_all()).await;

    // The worker: no streams, no consumers (creating one would read outside its subscriptions),
    // no cancel or replay, no writes to the cancellation bucket, no purges.
    let mut worker = Login::new(&fleet, Role::Worker).await;
    worker.js_api_ok(&format!("$JS.API.CONSUMER.INFO.{dispatch}.{consumer}")).await;
    let stream = json!({ "name": "EVIL_WORKER", "subjects": ["evil.>"] }).to_string().into_bytes();
    worker.request_refused("$JS.API.STREAM.CREATE.EVIL_WORKER", stream).await;
    let evil_consumer = json!({ "stream_name": dispatch, "config": { "name": "evil", "ack_policy": "none" } });
    worker
        .request_refused(&format!("$JS.API.CONSUMER.CREATE.{dispatch}.evil"), evil_consumer.to_string().into_bytes())
        .await;
    worker.request_refused(&format!("$JS.API.STREAM.PURGE.{dispatch}"), b"{}".to_vec()).await;
    worker.request_refused(&s.api("task.cancel"), cancel.clone()).await;
    worker.request_refused(&s.api("task.replay"), cancel.clone()).await;
    worker.publish_refused(&format!("$KV.{}.{}", s.cancel_bucket(), task.id), b"cancel".to_vec()).await;
    worker.subscribe_refused(&s.submit_all()).await;

    // The aggregator: only its own consumer of the event stream.
    let mut aggregator = Login::new(&fleet, Role::Aggregator).await;
    aggregator.js_api_ok(&format!("$JS.API.CONSUMER.INFO.{events}.{AGGREGATOR_CONSUMER}")).await;
    aggregator.request_refused(&format!("$JS.API.CONSUMER.MSG.NEXT.{dispatch}.{consumer}"), b"1".to_vec()).await;
    aggregator.publish_refused(&s.events("default", Priority::Normal), succeeded).await;
    aggregator.request_refused(&s.api("task.cancel"), cancel.clone()).await;
    aggregator.subscribe_refused(&s.dispatch_all()).await;

    // None of it had an effect.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(outcome(&pool, &task).await.0, "running", "{}", fleet.logs());
    let admin = fleet.nats().await;
    let admin_js = async_nats::jetstream::new(admin.clone());
    for name in ["EVIL_CLIENT", "EVIL_WORKER"] {
        assert!(admin_js.get_stream(name).await.is_err(), "stream {name} exists");
    }
    let dispatch_stream = admin_js.get_stream(&dispatch).await.expect("dispatch stream");
    assert!(dispatch_stream.consumer_info("evil").await.is_err(), "the worker made a consumer");
    let bucket = admin_js.get_key_value(s.cancel_bucket()).await.expect("cancellation bucket");
    assert!(bucket.get(task.id.to_string()).await.expect("read bucket").is_none(), "the worker wrote the bucket");

    // The admin may cancel: the task ends cancelled.
    let reply = fleet.api(&admin, "task.cancel", &json!({ "id": task.id })).await;
    assert!(reply.get("error").is_none(), "admin cancel: {reply}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&pool, &task).await.as_deref() != Some("cancelled") {
        assert!(Instant::now() < deadline, "the admin's cancel did not end the task\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let logs = fleet.logs();
    for role in Role::ALL {
        assert!(!logs.contains(&role_password(role)), "a process logged the {} password", role.as_str());
    }
}

/// The known gap of `MSG.NEXT`: a worker may name any reply subject for the message it pulls,
/// and the server delivers the dispatch there, as itself. Pointed at the API's `task.cancel`,
/// the delivery arrives on the API's subscription, but keeps its dispatch subject and has
/// JetStream's ack subject as its reply: the API takes it for no request and does not answer it
/// (an answer would acknowledge it), so the task is not cancelled and its delivery comes back
/// after the consumer's ack wait, to a real worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_redirected_to_the_api_is_not_taken_as_a_request() {
    let mut fleet = Fleet::new("redirect");
    // The consumers' ack wait, and a rescuer that would re-dispatch the task only much later.
    fleet.set("TASKFLEET_NATS_ACK_WAIT", "3s").set("TASKFLEET_COORDINATOR_RESCUE_IDLE", "120s");
    fleet.start_coordinator();
    let s = fleet.subjects();
    let pool = fleet.env.pg_pool().await;
    let mut worker = Login::new(&fleet, Role::Worker).await;
    let opened = fleet.api(&worker.client, "queue.open", &json!({ "queues": ["default"] })).await;
    assert!(opened.get("error").is_none(), "queue.open: {opened}");
    let task = TaskEnvelope::new("echo", json!({ "redirected": true }));
    fleet.submit_all(&fleet.nats().await, std::slice::from_ref(&task)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&pool, &task).await.as_deref() != Some("queued") {
        assert!(Instant::now() < deadline, "the task was never queued\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let admin = fleet.nats().await;
    let mut seen = admin.subscribe(s.api("task.cancel")).await.expect("subscribe");
    admin.flush().await.expect("flush");
    let next = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        s.dispatch_stream(),
        s.dispatch_consumer("default", Priority::Normal)
    );
    worker
        .client
        .publish_with_reply(
            next,
            s.api("task.cancel"),
            // Waits up to 10 s for the dispatch, which may still be on its way.
            json!({ "batch": 1, "expires": 10_000_000_000u64 }).to_string().into(),
        )
        .await
        .expect("publish MSG.NEXT");
    worker.client.flush().await.expect("flush");
    let redirected = tokio::time::timeout(Duration::from_secs(15), seen.next())
        .await
        .expect("the dispatch was delivered to the API subject")
        .expect("subscription open");
    println!(
        "redirected: {} bytes on {} with reply {:?}",
        redirected.payload.len(),
        redirected.subject,
        redirected.reply
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(worker.errors.try_recv().is_err(), "MSG.NEXT is within the worker's permissions");
    assert_eq!(state(&pool, &task).await.as_deref(), Some("queued"), "{}", fleet.logs());

    fleet.start_worker(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(&pool, &task).await.as_deref() != Some("succeeded") {
        assert!(Instant::now() < deadline, "the task never ran\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
