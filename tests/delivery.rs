//! Delivery guarantees with the real binaries: retries and dead letters, replay, timeouts,
//! cancellation, idempotency, redelivery after a worker dies, graceful shutdown.

use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use taskfleet_proto::{Priority, RetryBackoff, TaskEnvelope};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn task_row(pool: &sqlx::PgPool, id: uuid::Uuid) -> (String, i32, Option<serde_json::Value>) {
    sqlx::query_as("SELECT state, attempt, error FROM tasks WHERE id = $1").bind(id).fetch_one(pool).await.unwrap()
}

async fn wait_state(fleet: &Fleet, pool: &sqlx::PgPool, id: uuid::Uuid, state: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let s: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .unwrap()
            .unwrap_or_else(|| "not yet recorded".into());
        if s == state {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} is {s}, not {state}, after {timeout:?}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A task that keeps failing retryably is retried with backoff, every attempt is recorded with
/// its error, it ends `dead` and in the dead-letter stream, and `replay` runs it again with a
/// fresh budget. A fatal error is not retried; a timeout is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_dead_letters_replay_and_timeouts() {
    let mut fleet = Fleet::new("retries");
    fleet
        .set("TASKFLEET_WORKER_RETRY_BASE", "50ms")
        .set("TASKFLEET_WORKER_RETRY_MAX", "200ms")
        .set("TASKFLEET_COORDINATOR_KIND_MAX_ATTEMPTS", "sleep=2");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let mut flaky = TaskEnvelope::new("sleep", serde_json::json!({ "fail": "retryable" }));
    flaky.max_attempts = 3;
    let mut fatal = TaskEnvelope::new("sleep", serde_json::json!({ "fail": "fatal" }));
    fatal.max_attempts = 3;
    let mut slow = TaskEnvelope::new("sleep", serde_json::json!({ "ms": 5_000 }));
    slow.max_attempts = 2;
    slow.timeout_ms = 300;
    slow.retry = Some(RetryBackoff { base_ms: 10, factor: 2.0, max_ms: 20 });
    // No max_attempts of its own: the coordinator's limit for the kind (2) applies.
    let by_kind = TaskEnvelope::new("sleep", serde_json::json!({ "fail": "retryable" }));
    fleet.submit_all(&client, &[flaky.clone(), fatal.clone(), slow.clone(), by_kind.clone()]).await;
    fleet.wait_final(&pool, 4, Duration::from_secs(60)).await;
    let (state, attempt, _) = task_row(&pool, by_kind.id).await;
    assert_eq!((state.as_str(), attempt), ("dead", 2), "the kind's attempt limit applies");

    let (state, attempt, error) = task_row(&pool, flaky.id).await;
    assert_eq!((state.as_str(), attempt), ("dead", 3));
    assert_eq!(error.unwrap()["code"], "requested_failure");
    let attempts: Vec<(i32, String, serde_json::Value)> =
        sqlx::query_as("SELECT attempt, outcome, error FROM task_attempts WHERE task_id = $1 ORDER BY attempt")
            .bind(flaky.id)
            .fetch_all(&pool)
            .await
            .unwrap();
    let outcomes: Vec<(i32, &str)> = attempts.iter().map(|(a, o, _)| (*a, o.as_str())).collect();
    assert_eq!(outcomes, vec![(1, "retrying"), (2, "retrying"), (3, "dead")]);
    assert!(attempts.iter().all(|(_, _, e)| e["message"].as_str().is_some_and(|m| m.contains("asked to fail"))));

    let (state, attempt, _) = task_row(&pool, fatal.id).await;
    assert_eq!((state.as_str(), attempt), ("failed", 1), "fatal errors are not retried");
    let (state, attempt, error) = task_row(&pool, slow.id).await;
    assert_eq!((state.as_str(), attempt, error.unwrap()["code"].as_str()), ("dead", 2, Some("timeout")));

    // The dead tasks are in the dead-letter stream and in `dead ls`.
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = js.get_stream(fleet.subjects().dead_stream()).await.unwrap();
        if stream.info().await.unwrap().state.messages == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "dead-letter stream does not hold the three dead tasks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead_ls = stdout(&fleet.cli(&["dead", "ls"]));
    assert!(dead_ls.contains(&flaky.id.to_string()) && dead_ls.contains("timeout"), "{dead_ls}");

    // Replay: three more attempts, numbered on from the first three.
    let out = fleet.cli(&["replay", &flaky.id.to_string()]);
    assert!(out.status.success() && stdout(&out).contains(&flaky.id.to_string()), "{}", stdout(&out));
    wait_state(&fleet, &pool, flaky.id, "dead", Duration::from_secs(30)).await;
    let (_, attempt, _) = task_row(&pool, flaky.id).await;
    assert_eq!(attempt, 6);
    let replay_missing = fleet.cli(&["replay", &fatal.id.to_string()]);
    assert_eq!(replay_missing.status.code(), Some(1), "a failed (not dead) task is not replayed");
}

/// `cancel` stops a queued task before it runs and a running one through its cancellation
/// token; both end `cancelled`, and a dependent of the cancelled task is cancelled too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running_tasks() {
    let mut fleet = Fleet::new("cancel");
    fleet.start_coordinator();
    fleet.start_worker(&[("TASKFLEET_MAX_CONCURRENT_TASKS", "1"), ("TASKFLEET_WORKER_STARTED_EVENT_DELAY", "100ms")]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let running = TaskEnvelope::new("sleep", serde_json::json!({ "ms": 60_000 })).with_priority(Priority::Critical);
    let queued = TaskEnvelope::new("sleep", serde_json::json!({ "ms": 10 })).with_priority(Priority::Low);
    let mut dependent = TaskEnvelope::new("echo", serde_json::json!(1));
    dependent.depends_on = vec![queued.id];
    fleet.submit_all(&client, std::slice::from_ref(&running)).await;
    wait_state(&fleet, &pool, running.id, "running", Duration::from_secs(20)).await;
    fleet.submit_all(&client, &[queued.clone(), dependent.clone()]).await;
    wait_state(&fleet, &pool, dependent.id, "pending", Duration::from_secs(20)).await;

    let out = fleet.cli(&["cancel", &queued.id.to_string()]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("was queued"), "{}", stdout(&out));
    let t0 = Instant::now();
    let out = fleet.cli(&["cancel", &running.id.to_string()]);
    assert!(stdout(&out).contains("was running"), "{}", stdout(&out));
    // The worker stops the running handler and records the cancelled attempt.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let outcome: Option<String> = sqlx::query_scalar("SELECT outcome FROM task_attempts WHERE task_id = $1")
            .bind(running.id)
            .fetch_optional(&pool)
            .await
            .unwrap();
        if outcome.as_deref() == Some("cancelled") {
            break;
        }
        assert!(Instant::now() < deadline, "running task not stopped\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("running task stopped {:?} after cancel", t0.elapsed());
    // The slot is free again: a new task runs, while the cancelled queued one never started.
    let out = fleet.cli(&["submit", "--kind", "echo", "--wait", "--wait-timeout", "20s"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let (state, _, _) = task_row(&pool, queued.id).await;
    assert_eq!(state, "cancelled");
    let started: Option<i64> =
        sqlx::query_scalar("SELECT count(*) FROM task_attempts WHERE task_id = $1 AND outcome <> 'cancelled'")
            .bind(queued.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(started, Some(0), "the cancelled queued task never ran");
    assert_eq!(task_row(&pool, dependent.id).await.0, "cancelled");
    assert_eq!(task_row(&pool, running.id).await.0, "cancelled");
    let again = fleet.cli(&["cancel", &running.id.to_string()]);
    assert_eq!(again.status.code(), Some(1), "cancelling a final task changes nothing");
}

/// The same idempotency key creates one task: within the dedup window JetStream drops the
/// resend, after it Postgres' unique key answers with the existing task's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_creates_one_task() {
    let mut fleet = Fleet::new("idempotency");
    // Long enough for a second CLI process to start and log in on a loaded machine.
    fleet.set("TASKFLEET_NATS_DEDUP_WINDOW", "4s");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let first = fleet.cli(&["submit", "--kind", "echo", "--key", "invoice-7", "--confirm"]);
    let first_out = stdout(&first);
    assert!(first.status.success(), "{first_out}");
    let id = first_out.lines().next().unwrap().trim().to_string();
    let resend = fleet.cli(&["submit", "--kind", "echo", "--key", "invoice-7"]);
    let resend_err = String::from_utf8_lossy(&resend.stderr);
    assert!(resend_err.contains("duplicate"), "dropped by JetStream within the window: {resend_err}");
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let late = fleet.cli(&["submit", "--kind", "echo", "--key", "invoice-7", "--confirm"]);
    let late_out = stdout(&late);
    assert!(late_out.contains(r#""duplicate":true"#) && late_out.contains(&id), "existing id returned: {late_out}");
    let pool = fleet.env.pg_pool().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 1);
}

/// A worker killed (SIGKILL) mid-task stops heartbeating; JetStream redelivers its tasks after
/// `ack_wait` to another worker, and each still ends with one final state, having used up no
/// attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_tasks_are_redelivered() {
    let mut fleet = Fleet::new("worker_kill");
    fleet.set("TASKFLEET_NATS_ACK_WAIT", "2s").set("TASKFLEET_COORDINATOR_RESCUE_IDLE", "10s");
    fleet.start_coordinator();
    fleet.start_worker(&[("TASKFLEET_WORKER_STARTED_EVENT_DELAY", "100ms")]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    // Longer than ack_wait: only heartbeats keep them from being redelivered while they run.
    let tasks: Vec<TaskEnvelope> =
        (0..8).map(|i| TaskEnvelope::new("sleep", serde_json::json!({ "ms": 4_000, "i": i }))).collect();
    fleet.submit_all(&client, &tasks).await;
    for t in &tasks {
        wait_state(&fleet, &pool, t.id, "running", Duration::from_secs(20)).await;
    }
    fleet.workers[0].kill();
    let killed_at = Instant::now();
    fleet.start_worker(&[]);
    fleet.wait_final(&pool, 8, Duration::from_secs(60)).await;
    // The lost run used up no attempt: the redelivery runs attempt 1 again, and it is the only
    // attempt recorded.
    let rows: Vec<(String, i32)> = sqlx::query_as("SELECT state, attempt FROM tasks").fetch_all(&pool).await.unwrap();
    assert!(rows.iter().all(|(s, a)| s == "succeeded" && *a == 1), "{rows:?}");
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM task_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, 8);
    let first_restart: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM min(started_at))::float8 FROM task_attempts")
            .fetch_one(&pool)
            .await
            .unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let redelivered_after = first_restart - (now - killed_at.elapsed().as_secs_f64());
    eprintln!("redelivery after a worker kill: {redelivered_after:.2}s (ack_wait 2s)");
    assert!((1.0..6.0).contains(&redelivered_after), "redelivered {redelivered_after:.2}s after the kill");
}

/// SIGTERM drains a worker: running tasks finish, it exits cleanly, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker() {
    let mut fleet = Fleet::new("drain");
    fleet.start_coordinator();
    fleet.start_worker(&[("TASKFLEET_MAX_CONCURRENT_TASKS", "2"), ("TASKFLEET_WORKER_STARTED_EVENT_DELAY", "100ms")]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let tasks: Vec<TaskEnvelope> =
        (0..6).map(|i| TaskEnvelope::new("sleep", serde_json::json!({ "ms": 1_500, "i": i }))).collect();
    fleet.submit_all(&client, &tasks).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.counts(&pool).await.get("running").copied().unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let code = fleet.workers[0].terminate(Duration::from_secs(20));
    assert_eq!(code, Some(0), "worker exits cleanly\n{}", fleet.logs());
    // The two running tasks finished during the drain (their events were flushed before the
    // exit; the coordinator records them a moment later); the buffered ones went back at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let done = fleet.counts(&pool).await.get("succeeded").copied().unwrap_or(0);
        if done >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "running tasks finished during the drain: {done}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.start_worker(&[]);
    let counts = fleet.wait_final(&pool, 6, Duration::from_secs(30)).await;
    assert_eq!(counts.get("succeeded"), Some(&6));
    let max_attempt: i32 = sqlx::query_scalar("SELECT max(attempt) FROM tasks").fetch_one(&pool).await.unwrap();
    assert!(max_attempt <= 2, "handed-back tasks are redelivered, not lost");
}

/// Dispatch messages lost from JetStream (here: purged) are found by the rescuer, which
/// dispatches the tasks again; every task still ends with one final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescuer_redispatches_lost_tasks() {
    let mut fleet = Fleet::new("rescuer");
    fleet
        .set("TASKFLEET_NATS_ACK_WAIT", "2s")
        .set("TASKFLEET_COORDINATOR_RESCUE_INTERVAL", "500ms")
        .set("TASKFLEET_COORDINATOR_RESCUE_IDLE", "3s");
    fleet.start_coordinator();
    // A worker creates the lane consumers, then leaves: the tasks wait in the stream.
    fleet.start_worker(&[]);
    fleet.workers[0].terminate(Duration::from_secs(10));
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let tasks: Vec<TaskEnvelope> =
        (0..50).map(|i| TaskEnvelope::new("echo", serde_json::json!(i)).with_priority(Priority::ALL[i % 4])).collect();
    fleet.submit_all(&client, &tasks).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.counts(&pool).await.get("queued").copied().unwrap_or(0) < 50 {
        assert!(Instant::now() < deadline, "tasks not queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(fleet.subjects().dispatch_stream()).await.unwrap();
    stream.purge().await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0, "every dispatch message is gone");

    fleet.start_worker(&[]);
    let counts = fleet.wait_final(&pool, 50, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&50), "{counts:?}");
    let redispatched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE dispatches = 2").fetch_one(&pool).await.unwrap();
    assert_eq!(redispatched, 50, "each lost task was dispatched exactly once more");
}

/// Two coordinator replicas share intake and event recording through the durable consumers;
/// one of them runs the rescuer; every task ends once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_the_work() {
    let mut fleet = Fleet::new("two_coordinators");
    fleet.set("TASKFLEET_COORDINATOR_RESCUE_INTERVAL", "200ms");
    fleet.start_coordinator();
    let first = fleet.coordinator.take().unwrap();
    fleet.coordinator_http = format!("127.0.0.1:{}", taskfleet_test_support::free_port());
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let tasks: Vec<TaskEnvelope> = (0..3_000).map(|i| TaskEnvelope::new("echo", serde_json::json!(i))).collect();
    fleet.submit_all(&client, &tasks).await;
    let counts = fleet.wait_final(&pool, 3_000, Duration::from_secs(120)).await;
    assert_eq!(counts.get("succeeded"), Some(&3_000), "{counts:?}");
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM task_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, 3_000);
    let logs = [first.log(), fleet.coordinator.as_ref().unwrap().log()];
    let leaders = logs.iter().filter(|l| l.contains("now runs the rescuer")).count();
    assert_eq!(leaders, 1, "exactly one replica runs the rescuer");
    let intake: Vec<bool> = logs.iter().map(|l| !l.contains("coordinator loop failed")).collect();
    assert_eq!(intake, vec![true, true]);
}

/// Large results are never thrown away: 40 `echo` tasks of 300 KB each fill event batches far
/// beyond one NATS message, and every task succeeds with its one attempt (batches are cut by
/// bytes below the server's `max_payload`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_are_recorded_once() {
    let mut fleet = Fleet::new("large_results");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let text = "x".repeat(300_000);
    let tasks: Vec<TaskEnvelope> =
        (0..40).map(|i| TaskEnvelope::new("echo", serde_json::json!({ "i": i, "text": text }))).collect();
    fleet.submit_all(&client, &tasks).await;
    let counts = fleet.wait_final(&pool, 40, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&40), "{counts:?}");
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM task_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, 40, "each ran once");
    let sizes: Vec<i32> =
        sqlx::query_scalar("SELECT length(result->>'text') FROM tasks").fetch_all(&pool).await.unwrap();
    assert!(sizes.iter().all(|n| *n == 300_000), "results kept whole");
    assert!(!fleet.logs().contains("max payload"), "{}", fleet.logs());
}
