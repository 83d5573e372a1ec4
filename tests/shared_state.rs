//! The fleet's shared state in Redis with the real binaries and a local mock of the outside
//! APIs: fleet-wide rate limits (overshoot with 8 workers), circuit breakers with provider and
//! model fallbacks, `Retry-After` on 429, the result cache with single-flight, and Redis down.

use serde_json::json;
use std::time::{Duration, Instant};
use taskfleet_e2e::{Fleet, search};
use taskfleet_mock_api::{Behaviour, Control, MockApi, MockConfig, RunningMock};
use taskfleet_proto::{RetryBackoff, TaskEnvelope};

async fn mock(name: &str, behaviour: Behaviour) -> RunningMock {
    MockApi::start(MockConfig { name: name.into(), behaviour, ..MockConfig::default() }).await.unwrap()
}

fn chat(model: &str, prompt: &str) -> TaskEnvelope {
    let mut t =
        TaskEnvelope::new("llm.chat", json!({ "model": model, "messages": [{ "role": "user", "content": prompt }] }));
    t.max_attempts = 5;
    t.retry = Some(RetryBackoff { base_ms: 20, factor: 2.0, max_ms: 100 });
    t
}

/// (outcome, usage) of every attempt of every task, in task order.
async fn attempts(pool: &sqlx::PgPool) -> Vec<(uuid::Uuid, i32, String, Option<serde_json::Value>)> {
    sqlx::query_as("SELECT task_id, attempt, outcome, usage FROM task_attempts ORDER BY task_id, attempt")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn results(pool: &sqlx::PgPool) -> Vec<serde_json::Value> {
    sqlx::query_scalar("SELECT result FROM tasks WHERE state = 'succeeded' ORDER BY id").fetch_all(pool).await.unwrap()
}

/// A failing model opens its breaker after 3 failures; tasks then go to the fallback model,
/// whose tokens and cost are counted. Once the first model heals, a trial after the cooldown
/// closes its breaker and tasks go back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_fallback_takes_over_and_recovers() {
    let primary = mock("primary", Behaviour { error_rate: 1.0, ..Behaviour::default() }).await;
    let backup = mock("backup", Behaviour::default()).await;
    let mut fleet = Fleet::new("breaker");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("primary={}/v1,backup={}/v1", primary.url(), backup.url()))
        .set("TASKFLEET_PROVIDERS_MODELS", "model-a=primary,model-b=backup")
        .set("TASKFLEET_PROVIDERS_MODEL_FALLBACKS", "model-a=model-a>model-b")
        .set("TASKFLEET_PROVIDERS_PRICES", "model-a=1/2,model-b=0.5/1.5")
        .set("TASKFLEET_POLICIES_BREAKER_FAILURES", "3")
        .set("TASKFLEET_POLICIES_BREAKER_COOLDOWN", "1s")
        .set("TASKFLEET_POLICIES_BREAKER_SUCCESSES", "1")
        .set("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "2");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let first: Vec<TaskEnvelope> = (0..20).map(|i| chat("model-a", &format!("question {i}"))).collect();
    fleet.submit_all(&client, &first).await;
    let counts = fleet.wait_final(&pool, 20, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&20), "{counts:?}");
    let failed_calls = primary.stats().count(500);
    println!(
        "model-a failing: {failed_calls} calls to it before its breaker opened; backup served {}",
        backup.stats().count(200)
    );
    // The breaker opened at the third failure; calls already in flight (2 slots) may add one.
    assert!((3..=4).contains(&failed_calls), "{failed_calls} calls to the failing model");
    assert_eq!(backup.stats().count(200), 20);
    for r in results(&pool).await {
        assert_eq!(r["model"], "model-b", "{r}");
        assert_eq!(r["provider"], "backup");
    }
    // Tokens and cost of the fallback model, from its price.
    let used: Vec<_> = attempts(&pool).await.into_iter().filter(|a| a.2 == "succeeded").collect();
    assert_eq!(used.len(), 20);
    for (_, _, _, usage) in &used {
        let u = usage.as_ref().expect("usage recorded");
        let (p, c) = (u["prompt_tokens"].as_f64().unwrap(), u["completion_tokens"].as_f64().unwrap());
        assert!(p > 0.0 && c > 0.0, "{u}");
        let cost = u["cost_usd"].as_f64().unwrap();
        assert!((cost - (0.5 * p + 1.5 * c) / 1e6).abs() < 1e-12, "{u}");
    }

    // The primary heals; after the cooldown one trial call closes the breaker.
    primary.control(&Control { error_rate: Some(0.0), ..Control::default() }).unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let second: Vec<TaskEnvelope> = (0..10).map(|i| chat("model-a", &format!("later {i}"))).collect();
    fleet.submit_all(&client, &second).await;
    fleet.wait_final(&pool, 30, Duration::from_secs(60)).await;
    // The first call after the cooldown is the one trial; a task checking at the same moment
    // (2 slots) still goes to the fallback.
    let served = primary.stats().count(200);
    assert!((9..=10).contains(&served), "the healed model serves again: {served} of 10");
}

/// Every provider of a chain down for good: tasks wait for a breaker to close for at most
/// `breaker_max_wait` per attempt, then fail that attempt, and end `dead` instead of waiting
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_that_stays_down_ends_its_tasks() {
    let closed = format!("http://127.0.0.1:{}", taskfleet_test_support::free_port());
    let mut fleet = Fleet::new("alldown");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("a={closed},b={closed}"))
        .set("TASKFLEET_PROVIDERS_CHAINS", "search=a>b")
        .set("TASKFLEET_POLICIES_BREAKER_FAILURES", "1")
        .set("TASKFLEET_POLICIES_BREAKER_COOLDOWN", "10s")
        .set("TASKFLEET_POLICIES_BREAKER_MAX_WAIT", "1s");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let tasks: Vec<TaskEnvelope> = (0..5)
        .map(|i| {
            let mut t = search(&format!("q{i}"));
            t.max_attempts = 2;
            t
        })
        .collect();
    let started = Instant::now();
    fleet.submit_all(&client, &tasks).await;
    let counts = fleet.wait_final(&pool, 5, Duration::from_secs(60)).await;
    println!("every provider down: 5 tasks final in {:?}: {counts:?}", started.elapsed());
    assert_eq!(counts.get("dead"), Some(&5), "{counts:?}");
    let codes: Vec<String> = sqlx::query_scalar("SELECT error->>'code' FROM tasks").fetch_all(&pool).await.unwrap();
    assert!(codes.iter().all(|c| c == "breaker_open" || c == "http_connect"), "{codes:?}");
}

/// A 429 with `Retry-After: 1` is retried no sooner than a second later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let api = mock("limited", Behaviour { rate_429: 1.0, retry_after_s: 1, ..Behaviour::default() }).await;
    let mut fleet = Fleet::new("retryafter");
    fleet.set("TASKFLEET_PROVIDERS_URLS", &format!("search={}", api.url()));
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let task = search("busy");
    fleet.submit_all(&client, std::slice::from_ref(&task)).await;
    // Let the first attempt meet the 429, then let the API answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.stats().count(429) == 0 {
        assert!(Instant::now() < deadline, "no call reached the API\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.control(&Control { rate_429: Some(0.0), ..Control::default() }).unwrap();
    fleet.wait_final(&pool, 1, Duration::from_secs(30)).await;
    let rows: Vec<(i32, String, Option<serde_json::Value>, f64)> = sqlx::query_as(
        "SELECT a.attempt, a.outcome, a.error,
                extract(epoch FROM (SELECT started_at FROM task_attempts b WHERE b.task_id = a.task_id AND b.attempt = 2)
                                   - a.finished_at)::float8
         FROM task_attempts a WHERE a.task_id = $1 ORDER BY attempt",
    )
    .bind(task.id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].1, "retrying");
    assert_eq!(rows[0].2.as_ref().unwrap()["code"], "http_429");
    assert_eq!(rows[1].1, "succeeded");
    let gap = rows[0].3;
    println!("429 with Retry-After: 1 → next attempt {gap:.3} s later");
    assert!(gap >= 0.99, "retried after {gap} s");
}

/// A repeated-query workload: 10 distinct prompts, each submitted 5 times at once and then
/// again. The API is called once per distinct prompt (single-flight for the simultaneous
/// copies, cache hits after); the hits report what they saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_runs_identical_tasks_once() {
    let api = mock("llm", Behaviour { latency_ms: 300, ..Behaviour::default() }).await;
    let mut fleet = Fleet::new("cache");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("llm={}/v1", api.url()))
        .set("TASKFLEET_PROVIDERS_MODELS", "model-a=llm")
        .set("TASKFLEET_PROVIDERS_PRICES", "model-a=1/2")
        .set("TASKFLEET_POLICIES_CACHE", "llm.chat=10m by model+messages");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let round = || -> Vec<TaskEnvelope> { (0..50).map(|i| chat("model-a", &format!("prompt {}", i % 10))).collect() };
    fleet.submit_all(&client, &round()).await;
    fleet.wait_final(&pool, 50, Duration::from_secs(60)).await;
    assert_eq!(api.stats().count(200), 10, "one call per distinct prompt");
    fleet.submit_all(&client, &round()).await;
    let counts = fleet.wait_final(&pool, 100, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&100), "{counts:?}");
    assert_eq!(api.stats().count(200), 10, "the second round is served from the cache");

    let all = attempts(&pool).await;
    let hits = all.iter().filter(|a| a.3.as_ref().is_some_and(|u| u["cache_hit"] == true)).count();
    let paid: f64 = all.iter().filter_map(|a| a.3.as_ref().and_then(|u| u["cost_usd"].as_f64())).sum();
    let saved: f64 = all.iter().filter_map(|a| a.3.as_ref().and_then(|u| u["saved_usd"].as_f64())).sum();
    println!(
        "repeated queries: 100 tasks, 10 calls, {hits} cache hits ({}% hit rate), 90 calls saved, \
         paid ${paid:.6}, saved ${saved:.6}",
        hits
    );
    assert_eq!(hits, 90);
    assert!(saved > 8.9 * paid && saved < 9.1 * paid, "saved {saved} vs paid {paid}");
    // Identical prompts give identical results, whoever computed them.
    let rows: Vec<(serde_json::Value, serde_json::Value)> =
        sqlx::query_as("SELECT payload, result FROM tasks").fetch_all(&pool).await.unwrap();
    let mut by_prompt = std::collections::HashMap::new();
    for (payload, result) in rows {
        let prev = by_prompt.entry(payload.to_string()).or_insert_with(|| result.clone());
        assert_eq!(*prev, result);
    }
}

/// Redis killed: tasks still run (cache bypassed, local rate limit share), and when Redis is
/// back the shared cache is used again without restarting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_while_redis_is_down() {
    let mut redis = taskfleet_test_support::RedisServer::start();
    let api = mock("llm", Behaviour::default()).await;
    let mut fleet = Fleet::new("redisdown");
    fleet
        .set("TASKFLEET_REDIS_URL", &redis.url)
        .set("TASKFLEET_PROVIDERS_URLS", &format!("llm={}/v1", api.url()))
        .set("TASKFLEET_PROVIDERS_MODELS", "model-a=llm")
        .set("TASKFLEET_PROVIDERS_LIMITS", "llm=llm")
        .set("TASKFLEET_POLICIES_RATE_LIMITS", "llm=1000/s burst 100")
        .set("TASKFLEET_POLICIES_CACHE", "llm.chat=10m");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    fleet.submit_all(&client, &[chat("model-a", "warm")]).await;
    fleet.wait_final(&pool, 1, Duration::from_secs(30)).await;

    redis.kill();
    let during: Vec<TaskEnvelope> = (0..20).map(|i| chat("model-a", &format!("down {}", i % 2))).collect();
    fleet.submit_all(&client, &during).await;
    let counts = fleet.wait_final(&pool, 21, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&21), "{counts:?}");
    // No cache: every task called the API.
    assert_eq!(api.stats().count(200), 21);
    let log = fleet.logs();
    assert!(log.contains("Redis unreachable"), "the outage is logged\n{log}");

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut total = 21;
    for round in 0.. {
        // The same prompt twice, one after the other: the second is a hit once Redis is back.
        let before = api.stats().count(200);
        for _ in 0..2 {
            fleet.submit_all(&client, &[chat("model-a", &format!("after {round}"))]).await;
            total += 1;
            fleet.wait_final(&pool, total, Duration::from_secs(30)).await;
        }
        if api.stats().count(200) == before + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the cache did not come back\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(fleet.logs().contains("Redis reachable"), "the recovery is logged");
}

/// A worker SIGKILLed while it computes a cacheable task holds its single-flight lease no
/// longer than `cache_lease` (the lease is renewed only while its holder lives): an identical
/// task submitted after the kill waits for the lease to lapse, then runs itself, instead of
/// waiting out `single_flight_wait` for a result that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leaseholder_stalls_its_twins_no_longer_than_the_lease() {
    const LEASE: Duration = Duration::from_secs(3);
    const RUN: Duration = Duration::from_secs(10);
    let mut fleet = Fleet::new("cachelease");
    fleet
        .set("TASKFLEET_POLICIES_CACHE", "sleep=1h")
        .set("TASKFLEET_POLICIES_CACHE_LEASE", "3s")
        .set("TASKFLEET_POLICIES_SINGLE_FLIGHT_WAIT", "60s")
        .set("TASKFLEET_NATS_ACK_WAIT", "3s");
    fleet.start_coordinator();
    fleet.start_worker(&[("TASKFLEET_WORKER_ID", "w0")]);
    fleet.start_worker(&[("TASKFLEET_WORKER_ID", "w1")]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let sleep = || {
        let mut t = TaskEnvelope::new("sleep", json!({ "ms": RUN.as_millis() as u64 }));
        t.timeout_ms = 120_000;
        t
    };

    // The first copy runs; once it has run for a while (its lease renewed), its worker dies.
    let first = sleep();
    fleet.submit_all(&client, std::slice::from_ref(&first)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let holder: String = loop {
        let w: Option<(String, Option<String>)> = sqlx::query_as("SELECT state, worker FROM tasks WHERE id = $1")
            .bind(first.id)
            .fetch_optional(&pool)
            .await
            .unwrap();
        if let Some(("running", Some(w))) = w.as_ref().map(|(s, w)| (s.as_str(), w.clone())) {
            break w;
        }
        assert!(Instant::now() < deadline, "the first copy did not start\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(LEASE + Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    fleet.workers[if holder == "w0" { 0 } else { 1 }].kill();

    // Its twin, submitted now, runs on the surviving worker once the dead holder's lease lapses.
    let twin = sleep();
    fleet.submit_all(&client, std::slice::from_ref(&twin)).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let (worker, cache_hit) = loop {
        let row: Option<(String, Option<String>, Option<serde_json::Value>)> = sqlx::query_as(
            "SELECT t.state, t.worker, (SELECT usage FROM task_attempts a WHERE a.task_id = t.id ORDER BY attempt DESC LIMIT 1)
             FROM tasks t WHERE id = $1",
        )
        .bind(twin.id)
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let Some((state, worker, usage)) = row
            && state == "succeeded"
        {
            break (worker, usage.is_some_and(|u| u["cache_hit"] == true));
        }
        assert!(Instant::now() < deadline, "the twin did not finish\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let recovered = killed_at.elapsed();
    // The dead task's own redelivery (after ack_wait) competes for the lapsed lease too: one of
    // the two runs the sleep, the other gets its result.
    fleet.wait_final(&pool, 2, Duration::from_secs(60)).await;
    let counts = fleet.counts(&pool).await;
    println!(
        "leaseholder SIGKILLed: its twin finished {recovered:?} after the kill (cache_lease {LEASE:?}, run {RUN:?}, \
         single_flight_wait 60 s; on {worker:?}, cache hit {cache_hit}); {counts:?}"
    );
    assert_eq!(counts.get("succeeded"), Some(&2), "{counts:?}");
    assert_ne!(worker.as_deref(), Some(holder.as_str()));
    // At most the lease's lapse, one run and slack for polling and reporting; the old lease
    // (the task's timeout) would have held the twin for the whole 60 s wait.
    assert!(recovered < LEASE + RUN + Duration::from_secs(5), "the twin finished {recovered:?} after the kill");
}

/// A cacheable kind whose attempt spawns children: the attempt's own return value is interim
/// (the task's result is the join's), so the exact cache stores nothing for it, and an
/// identical task later spawns and joins again instead of taking the interim value as a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawning_attempts_interim_result_is_not_cached() {
    let mut fleet = Fleet::new("cachespawn");
    fleet.set("TASKFLEET_POLICIES_CACHE", "spawn=1h");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    for round in 0..2 {
        let spec = json!({"nodes": [{"name": "fan", "kind": "spawn", "payload": {"count": 2}}]});
        let (run, tasks) = fleet.submit_run(&client, spec).await;
        let view = fleet.wait_run(&client, run, Duration::from_secs(60)).await;
        assert_eq!(view["state"], "succeeded", "{view}");
        let (result, usage): (serde_json::Value, Option<serde_json::Value>) = sqlx::query_as(
            "SELECT t.result, (SELECT usage FROM task_attempts a WHERE a.task_id = t.id ORDER BY attempt DESC LIMIT 1)
             FROM tasks t WHERE id = $1",
        )
        .bind(tasks["fan"])
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(result["results"].as_array().map(Vec::len), Some(2), "round {round}: the join's result: {result}");
        assert!(!usage.is_some_and(|u| u["cache_hit"] == true), "round {round}: an interim result was a cache hit");
    }
}
