//! The metrics aggregator with the real binaries: live figures from task events and worker
//! reports, alerts published on `<prefix>.alerts`, rollups in Postgres that survive a restart
//! without counting anything twice.

use futures::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use taskfleet_proto::{Alert, AlertState, RetryBackoff, TaskEnvelope};

async fn wait_stats(fleet: &Fleet, what: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = fleet.stats();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "aggregator never showed {what}: {s:#}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_figures_alerts_and_restart() {
    let mut fleet = Fleet::new("aggregator");
    fleet
        .set("TASKFLEET_AGGREGATOR_FLUSH_INTERVAL", "500ms")
        .set("TASKFLEET_AGGREGATOR_ALERT_INTERVAL", "500ms")
        .set("TASKFLEET_AGGREGATOR_ALERT_RULES", "high_error_rate=error_rate > 0.05,slow=p95_ms > 60000")
        .set("TASKFLEET_WORKER_STATUS_INTERVAL", "300ms");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_aggregator();
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let mut alerts = client.subscribe(fleet.subjects().alerts()).await.unwrap();

    // 180 successes and 20 fatal failures: a 10% error rate.
    let mut tasks: Vec<TaskEnvelope> = (0..180).map(|i| TaskEnvelope::new("sleep", json!({ "ms": i % 5 }))).collect();
    for _ in 0..20 {
        let mut t = TaskEnvelope::new("sleep", json!({ "fail": "fatal" }));
        t.retry = Some(RetryBackoff { base_ms: 1, factor: 1.0, max_ms: 1 });
        tasks.push(t);
    }
    fleet.submit_all(&client, &tasks).await;
    fleet.wait_final(&pool, 200, Duration::from_secs(60)).await;

    let s = wait_stats(&fleet, "200 final states and the worker", Duration::from_secs(20), |s| {
        s["fleet"]["completed_total"] == 200 && s["fleet"]["workers"] == 1
    })
    .await;
    let f = &s["fleet"];
    println!("fleet figures: {f:#}");
    assert_eq!(f["succeeded_total"], 180);
    assert_eq!(f["failed_total"], 20);
    assert_eq!(f["error_rate"], 0.1);
    assert!(f["throughput_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(f["end_to_end_ms"]["count"], 200);
    assert!(f["end_to_end_ms"]["p95"].as_f64().unwrap() >= f["end_to_end_ms"]["p50"].as_f64().unwrap());
    assert!(f["queue_wait_ms"]["p99"].is_number() && f["run_ms"]["max"].is_number());
    assert_eq!(f["cache_hit_rate"], Value::Null, "no cacheable kind ran");
    assert_eq!(s["series"][0]["kind"], "sleep");
    let w = &s["workers"][0];
    assert!(w["rss_bytes"].as_u64().unwrap() > 0 && w["memory_percent"].as_f64().unwrap() > 0.0, "{w}");
    assert_eq!(w["max_concurrent"], 64);
    assert_eq!(f["capacity"], 64);

    // The error-rate rule fired, on the subject and in the snapshot; the latency rule did not.
    let alert = tokio::time::timeout(Duration::from_secs(10), alerts.next()).await.expect("an alert").unwrap();
    let alert: Alert = serde_json::from_slice(&alert.payload).unwrap();
    assert_eq!((alert.rule.as_str(), alert.state), ("high_error_rate", AlertState::Firing));
    assert_eq!(alert.value, 0.1);
    let s =
        wait_stats(&fleet, "the alert", Duration::from_secs(5), |s| s["alerts"][0]["rule"] == "high_error_rate").await;
    assert_eq!(s["alerts"].as_array().unwrap().len(), 1);

    // Rollups are in Postgres; a restarted aggregator starts from them and counts nothing twice.
    let rolled: i64 = wait_rollups(&pool, 200).await;
    assert_eq!(rolled, 200);
    if let Some(mut a) = fleet.aggregator.take() {
        a.terminate(Duration::from_secs(10));
    }
    fleet.start_aggregator();
    let more: Vec<TaskEnvelope> = (0..50).map(|_| TaskEnvelope::new("echo", json!({}))).collect();
    fleet.submit_all(&client, &more).await;
    fleet.wait_final(&pool, 250, Duration::from_secs(60)).await;
    let s = wait_stats(&fleet, "250 final states after the restart", Duration::from_secs(20), |s| {
        s["fleet"]["completed_total"] == 250
    })
    .await;
    assert!(!s["history"].as_array().unwrap().is_empty(), "history restored");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.stats()["fleet"]["completed_total"], 250, "nothing counted twice");
    assert_eq!(wait_rollups(&pool, 250).await, 250);
}

async fn wait_rollups(pool: &sqlx::PgPool, n: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sum: Option<i64> =
            sqlx::query_scalar("SELECT sum(finals)::int8 FROM metric_rollups").fetch_one(pool).await.unwrap();
        let sum = sum.unwrap_or(0);
        if sum >= n || Instant::now() > deadline {
            return sum;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs by name in `/v1/stats` `runs` and in `taskfleet top`: two `research` runs succeed, a
/// `quorum` run fails, a `slow` one is seen running (from the poll of running runs), then ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_by_name() {
    let mut fleet = Fleet::new("aggregator-runs");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_aggregator();
    let client = fleet.nats().await;
    let research = || {
        json!({"name": "research", "nodes": [
            {"name": "search", "kind": "echo", "payload": {"q": "rust"}},
            {"name": "write", "kind": "collect", "depends_on": ["search"]}
        ]})
    };
    let (slow, _) = fleet
        .submit_run(
            &client,
            json!({"name": "slow", "nodes": [{"name": "nap", "kind": "sleep", "payload": {"ms": 4000}}]}),
        )
        .await;
    let mut ids = Vec::new();
    for spec in [research(), research()] {
        ids.push(fleet.submit_run(&client, spec).await.0);
    }
    let quorum = json!({"name": "quorum", "nodes": [
        {"name": "vote", "kind": "sleep", "payload": {"fail": "fatal"}},
        {"name": "tally", "kind": "collect", "depends_on": ["vote"]}
    ]});
    ids.push(fleet.submit_run(&client, quorum).await.0);
    for id in &ids {
        fleet.wait_run(&client, *id, Duration::from_secs(60)).await;
    }
    let run = |s: &Value, name: &str| {
        s["runs"].as_array().and_then(|r| r.iter().find(|r| r["name"] == name)).cloned().unwrap_or(Value::Null)
    };
    let s = wait_stats(&fleet, "the runs by name, slow one running", Duration::from_secs(20), |s| {
        run(s, "research")["succeeded_total"] == 2
            && run(s, "quorum")["failed_total"] == 1
            && run(s, "slow")["running"] == 1
    })
    .await;
    println!("runs: {:#}", s["runs"]);
    let r = run(&s, "research");
    assert_eq!(
        (r["started"].as_u64(), r["started_total"].as_u64(), r["succeeded"].as_u64()),
        (Some(2), Some(2), Some(2))
    );
    assert_eq!((r["running"].as_u64(), r["failed_total"].as_u64()), (Some(0), Some(0)));
    assert_eq!(r["duration_ms"]["count"], 2);
    assert!(r["duration_ms"]["p95"].as_f64().is_some_and(|p| p >= r["duration_ms"]["p50"].as_f64().unwrap_or(0.0)));
    assert!(r["attempts_total"].as_u64().is_some_and(|a| a >= 4), "{r}");
    let q = run(&s, "quorum");
    assert_eq!(
        (q["started_total"].as_u64(), q["failed"].as_u64(), q["succeeded_total"].as_u64()),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(run(&s, "slow")["started_total"], 1);

    // `taskfleet top --once` shows them.
    let addr = format!("http://{}", fleet.aggregator_http);
    let out = fleet.cli(&["top", "--once", "--aggregator", &addr]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "taskfleet top failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let row = |name: &str| stdout.lines().find(|l| l.split_whitespace().next() == Some(name)).map(str::to_string);
    let research_row = row("research").unwrap_or_else(|| panic!("no research row in:\n{stdout}"));
    assert_eq!(research_row.split_whitespace().nth(3), Some("2"), "2 succeeded: {research_row}");
    assert!(row("quorum").is_some(), "no quorum row in:\n{stdout}");

    // The slow run ends: no longer running, succeeded.
    fleet.wait_run(&client, slow, Duration::from_secs(60)).await;
    wait_stats(&fleet, "the slow run ended", Duration::from_secs(20), |s| {
        run(s, "slow")["running"] == 0 && run(s, "slow")["succeeded_total"] == 1
    })
    .await;
}
