//! The whole path of a task on real NATS, Postgres and the real binaries.

use std::time::Duration;
use taskfleet_e2e::Fleet;
use taskfleet_proto::{Priority, TaskEnvelope};

/// 10,000 tasks across all four priorities, two workers: every task reaches exactly one final
/// state, with exactly one recorded attempt, and its result is its payload. Then the CLI
/// submits, waits, shows and lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_reach_one_final_state_each() {
    let mut fleet = Fleet::new("ten_thousand");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let envs: Vec<TaskEnvelope> = (0..10_000)
        .map(|i| TaskEnvelope::new("echo", serde_json::json!({ "i": i })).with_priority(Priority::ALL[i % 4]))
        .collect();
    fleet.submit_all(&client, &envs).await;
    let counts = fleet.wait_final(&pool, 10_000, Duration::from_secs(180)).await;
    assert_eq!(counts.get("succeeded"), Some(&10_000), "{counts:?}");
    assert_eq!(counts.values().sum::<i64>(), 10_000, "no extra rows: {counts:?}");

    let per_priority: Vec<(String, i64)> =
        sqlx::query_as("SELECT priority, count(*) FROM tasks GROUP BY priority ORDER BY priority")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(per_priority.iter().all(|(_, n)| *n == 2_500), "{per_priority:?}");
    let attempts: (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT task_id) FROM task_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, (10_000, 10_000), "one attempt per task");
    let wrong: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE result IS DISTINCT FROM payload OR finished_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(wrong, 0, "every result is the echoed payload and every task has a finish time");
    let workers: i64 = sqlx::query_scalar("SELECT count(DISTINCT worker) FROM tasks").fetch_one(&pool).await.unwrap();
    assert_eq!(workers, 2, "both workers took tasks");

    // The CLI: submit and wait, then status and ls.
    let out =
        fleet.cli(&["submit", "--kind", "echo", "--payload", r#"{"from":"cli"}"#, "--priority", "high", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "submit --wait failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let id = stdout.lines().next().unwrap_or_default().trim().to_string();
    assert!(stdout.contains(r#""state": "succeeded""#) && stdout.contains(r#""from": "cli""#), "{stdout}");
    let status = fleet.cli(&["status", &id]);
    assert!(String::from_utf8_lossy(&status.stdout).contains(r#""priority": "high""#));
    let wait = fleet.cli(&["wait", &id, "--timeout", "10s"]);
    assert!(wait.status.success());
    let ls = fleet.cli(&["ls", "--state", "succeeded", "--limit", "3"]);
    let ls_out = String::from_utf8_lossy(&ls.stdout);
    assert!(ls_out.lines().count() == 4 && ls_out.contains(&id), "newest first:\n{ls_out}");
    let missing = fleet.cli(&["status", &uuid::Uuid::now_v7().to_string()]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no task"));
}

/// A worker busy with a backlog of low-priority tasks picks a critical task submitted behind
/// them before the rest of the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_task_overtakes_a_low_priority_backlog() {
    let mut fleet = Fleet::new("priority");
    fleet.start_coordinator();
    const PREFETCH: i64 = 8;
    fleet.start_worker(&[("TASKFLEET_MAX_CONCURRENT_TASKS", "1"), ("TASKFLEET_WORKER_PREFETCH", "8")]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let backlog: Vec<TaskEnvelope> = (0..1_000)
        .map(|i| TaskEnvelope::new("sleep", serde_json::json!({ "ms": 5, "i": i })).with_priority(Priority::Low))
        .collect();
    fleet.submit_all(&client, &backlog).await;
    // Let the worker get into the backlog.
    loop {
        let done = fleet.counts(&pool).await.get("succeeded").copied().unwrap_or(0);
        if done >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let critical = TaskEnvelope::new("sleep", serde_json::json!({ "ms": 5 })).with_priority(Priority::Critical);
    fleet.submit_all(&client, std::slice::from_ref(&critical)).await;
    fleet.wait_final(&pool, 1_001, Duration::from_secs(120)).await;

    // Measured from the dispatch (the commit just before the task is published to workers), so
    // that the coordinator's intake latency on a busy machine does not count against priority.
    let (dispatched, started): (i64, i64) = sqlx::query_as(
        "SELECT (extract(epoch FROM dispatched_at) * 1000)::int8, (extract(epoch FROM started_at) * 1000)::int8 FROM tasks WHERE id = $1",
    )
    .bind(critical.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let overtaken_by: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE priority = 'low' AND started_at > to_timestamp($1 / 1000.0) AND started_at < to_timestamp($2 / 1000.0)",
    )
    .bind(dispatched)
    .bind(started)
    .fetch_one(&pool)
    .await
    .unwrap();
    let after: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE priority = 'low' AND started_at > to_timestamp($1 / 1000.0)",
    )
    .bind(started)
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!(
        "critical task: {overtaken_by} low tasks started between its dispatch and start, {} ms wait, {after} low tasks after it",
        started - dispatched
    );
    // Only low tasks that started while the critical one was on its way to the worker may
    // start first; the buffered ones wait behind it.
    assert!(
        overtaken_by <= PREFETCH + 1,
        "{overtaken_by} low tasks started between the critical task's dispatch and start"
    );
    assert!(after > 500, "the critical task ran ahead of the backlog: only {after} low tasks started after it");
    assert!(started - dispatched < 1_000, "critical task waited {} ms after dispatch", started - dispatched);
}
