//! Faults under load. While tasks are submitted steadily (100/s: half 1 s `sleep` tasks, a
//! quarter `http` probes that call a counter in this test, a quarter `echo` tasks that go through
//! the shared result cache and a kind rate limit), each phase injects one fault in the middle of
//! its load window and restarts the component: a worker SIGKILL, a coordinator SIGKILL, a
//! nats-server SIGKILL, an immediate stop of Postgres (a private cluster, [`PgCluster`]: never
//! the shared server) and a SIGKILL of Redis (a private `redis-server` without persistence). A
//! warm-up phase without a fault comes first. After the load stops and every task is final (or the drain times out),
//! every column is computed from Postgres (`tasks`, `task_attempts`), from the commit
//! notifications on `<prefix>.committed.<queue>` and from the probe counter:
//!
//! * **lost**: acknowledged submissions without a row, or without a final state after the drain;
//! * **not succeeded**: final but not `succeeded` (no handler of this workload ever fails);
//! * **two final states**: more than one attempt row with a final outcome, an attempt row with
//!   a final outcome that finished after the task's `finished_at`, or commit notifications with
//!   two different states;
//! * **dead w/o handler failure**: `dead` with fewer than `max_attempts` handler failures
//!   (attempt rows that failed, other than `attempts_exhausted` or `deliveries_exhausted`);
//! * **ran after final**: an attempt row that started after the task's `finished_at`;
//! * **ran twice**: more than one attempt row, a first recorded attempt above 1 (an earlier
//!   delivery, which may have run the handler, left no row), or a probe called more than once;
//! * **in flight at fault**: submissions acknowledged when the fault struck and not final in
//!   Postgres just before it (written or not);
//! * **resumed after**: from the component's restart to the first commit notification of a task
//!   submitted after the restart (the worst round; measured, not asserted);
//! * **in flight final after**: from the restart until the final states of all the tasks in
//!   flight at the fault were written (`updated_at`; the worst round; "never" if one of them
//!   never ended; measured, not asserted).
//!
//! Asserted for every phase: lost, not succeeded, two final states, dead w/o handler failure and
//! ran after final are 0; **ran twice is at most the tasks in flight at the phase's faults**
//! (summed over rounds; 0 for the warm-up), since at-least-once delivery may re-run only work
//! that was under way when something died. **submitted** counts the submissions JetStream
//! acknowledged during the phase; every other column counts a task against the last fault it
//! was in flight for, or, if none, against the phase of its submission.
//!
//! Environment (defaults in brackets):
//! * `FAULT_ROUNDS` [1]: rounds of every fault phase (the warm-up runs once);
//! * `TASKFLEET_FAULT_PHASES` [`worker,coordinator,nats,postgres,redis`]: the faults to inject;
//! * `TASKFLEET_FAULT_PHASE_SECS` [3]: load seconds per phase, the fault in the middle;
//! * `TASKFLEET_FAULT_SETTLE_SECS` [10 + 2 × ack_wait]: after a phase, how long the load may go
//!   on until the tasks in flight at its fault are final, before the next fault;
//! * `TASKFLEET_FAULT_RATE` [100]: tasks submitted per second;
//! * `TASKFLEET_FAULT_SLEEP_MS` [1000]: length of the `sleep` tasks;
//! * `TASKFLEET_FAULT_ACK_WAIT` [`2s`]: the fleet's `ack_wait` (its own default is `30s`);
//! * `TASKFLEET_FAULT_DOWN_SECS` [5]: how long a killed component stays down (longer than the
//!   short ack_wait, as real outages are); `TASKFLEET_FAULT_PG_DOWN_SECS` [the same] for Postgres
//!   (120 for the two-minute outage);
//! * `TASKFLEET_FAULT_DRAIN_SECS` [60 + 2 × ack_wait]: how long to wait for every final state.

use futures::StreamExt;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskfleet_bus::{decode_message, send_submission};
use taskfleet_e2e::Fleet;
use taskfleet_proto::{CommittedBatch, DEFAULT_MAX_ATTEMPTS, MAX_MESSAGE_BYTES, Priority, TaskEnvelope};
use taskfleet_test_support::{PgCluster, RedisServer};
use uuid::Uuid;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    Worker,
    Coordinator,
    Nats,
    Postgres,
    Redis,
}

impl Fault {
    const INJECTED: [Fault; 5] = [Fault::Worker, Fault::Coordinator, Fault::Nats, Fault::Postgres, Fault::Redis];

    fn name(self) -> &'static str {
        match self {
            Fault::None => "none (warm-up)",
            Fault::Worker => "worker SIGKILL",
            Fault::Coordinator => "coordinator SIGKILL",
            Fault::Nats => "nats-server SIGKILL",
            Fault::Postgres => "Postgres immediate stop",
            Fault::Redis => "Redis SIGKILL",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Worker => "worker",
            Fault::Coordinator => "coordinator",
            Fault::Nats => "nats",
            Fault::Postgres => "postgres",
            Fault::Redis => "redis",
        }
    }
}

/// One load window, with its fault injected in the middle.
struct Window {
    fault: Fault,
    /// Acknowledged submissions not final in Postgres just before the fault (written or not):
    /// the tasks this fault may re-run. Empty for the warm-up.
    in_flight: Vec<Uuid>,
    /// When the component was back: monotonic, and milliseconds since the epoch.
    restarted: Option<(Instant, f64)>,
}

/// Commit notifications: when each arrived, and the task and state it announced.
type Commits = Arc<Mutex<Vec<(Instant, Uuid, &'static str)>>>;

/// A `tasks` row as read: id, state, max_attempts, finished_at and, once final, when the final
/// state was written (ms).
type TaskTuple = (Uuid, String, i32, Option<f64>, Option<f64>);

/// A `task_attempts` row as read: task, attempt, outcome, error code, start and end (ms).
type AttemptTuple = (Uuid, i32, String, Option<String>, Option<f64>, Option<f64>);

/// A task's row in `tasks`.
struct TaskRow {
    state: String,
    max_attempts: i32,
    finished_ms: Option<f64>,
}

/// One row of `task_attempts`.
struct AttemptRow {
    attempt: i32,
    outcome: String,
    code: Option<String>,
    started_ms: Option<f64>,
    finished_ms: Option<f64>,
}

/// What went wrong with one task; each flag is one column.
#[derive(Default, Debug, PartialEq)]
struct Verdict {
    lost: bool,
    not_succeeded: bool,
    two_final: bool,
    dead_without_failure: bool,
    ran_after_final: bool,
    ran_twice: bool,
}

const FINAL: [&str; 4] = ["succeeded", "failed", "dead", "cancelled"];

/// Judges one acknowledged task from its row, its attempt rows, the distinct states its commit
/// notifications announced and how often its probe was called (0 for tasks that are no probe).
fn judge(task: Option<&TaskRow>, attempts: &[AttemptRow], notified: usize, probe_runs: u32) -> Verdict {
    let ran_twice = attempts.len() > 1 || attempts.iter().any(|a| a.attempt > 1) || probe_runs > 1;
    let Some(t) = task else { return Verdict { lost: true, ran_twice, ..Verdict::default() } };
    let is_final = FINAL.contains(&t.state.as_str());
    // Timestamps are milliseconds from the worker's clock; allow rounding.
    let after_final = |ms: Option<f64>| matches!((ms, t.finished_ms), (Some(a), Some(f)) if a > f + 1.0);
    let final_rows: Vec<&AttemptRow> = attempts.iter().filter(|a| FINAL.contains(&a.outcome.as_str())).collect();
    // The coordinator stores the effective budget; 0 would mean the default.
    let max_attempts = if t.max_attempts > 0 { t.max_attempts as usize } else { DEFAULT_MAX_ATTEMPTS as usize };
    let handler_failures = attempts
        .iter()
        .filter(|a| matches!(a.outcome.as_str(), "retrying" | "failed" | "dead"))
        .filter(|a| !matches!(a.code.as_deref(), Some("attempts_exhausted" | "deliveries_exhausted")))
        .count();
    Verdict {
        lost: !is_final,
        not_succeeded: is_final && t.state != "succeeded",
        two_final: final_rows.len() > 1 || notified > 1 || final_rows.iter().any(|a| after_final(a.finished_ms)),
        dead_without_failure: t.state == "dead" && handler_failures < max_attempts,
        ran_after_final: is_final && attempts.iter().any(|a| after_final(a.started_ms)),
        ran_twice,
    }
}

/// One task's row, attempts (times in ms relative to the task's `finished_at`), commit
/// notifications and probe calls, for failure messages.
fn describe_task(
    id: Uuid,
    tasks: &HashMap<Uuid, TaskRow>,
    attempts: &HashMap<Uuid, Vec<AttemptRow>>,
    notified: &HashMap<Uuid, BTreeSet<&str>>,
    probe_runs: &HashMap<String, u32>,
) -> String {
    let Some(t) = tasks.get(&id) else { return format!("{id}: no row") };
    let rel = |ms: Option<f64>| match (ms, t.finished_ms) {
        (Some(a), Some(f)) => format!("{:+.0}", a - f),
        (Some(_), None) => "?".into(),
        (None, _) => "-".into(),
    };
    let mut rows: Vec<&AttemptRow> = attempts.get(&id).map(|a| a.iter().collect()).unwrap_or_default();
    rows.sort_by_key(|a| a.attempt);
    let rows: Vec<String> = rows
        .iter()
        .map(|a| {
            let code = a.code.as_deref().map(|c| format!(" {c}")).unwrap_or_default();
            format!("#{} {}{code} {}..{} ms", a.attempt, a.outcome, rel(a.started_ms), rel(a.finished_ms))
        })
        .collect();
    format!(
        "{id}: {} (max_attempts {}), attempts [{}], notified {:?}, probe calls {}",
        t.state,
        t.max_attempts,
        rows.join(", "),
        notified.get(&id).cloned().unwrap_or_default(),
        probe_runs.get(&id.to_string()).copied().unwrap_or(0)
    )
}

/// The largest of per-round seconds (`None`: never happened), as a table cell.
fn worst(rounds: impl Iterator<Item = Option<f64>>) -> String {
    let all: Vec<Option<f64>> = rounds.collect();
    if all.is_empty() {
        return "–".into();
    }
    match all.into_iter().collect::<Option<Vec<f64>>>() {
        Some(v) => format!("{:.1} s", v.into_iter().fold(0.0, f64::max)),
        None => "never".into(),
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// `2s`, `500ms`, `30` (seconds).
fn parse_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.trim().parse::<f64>().ok().map(|v| v / 1000.0);
    }
    s.strip_suffix('s').unwrap_or(s).trim().parse().ok()
}

/// A counter of calls per task id on `GET /run/<id>`: how often `http` probe handlers ran.
async fn probe_server(runs: Arc<Mutex<HashMap<String, u32>>>) -> String {
    use axum::extract::{Path, State};
    type Runs = Arc<Mutex<HashMap<String, u32>>>;
    let count = |State(runs): State<Runs>, Path(id): Path<String>| async move {
        *runs.lock().expect("probe counter").entry(id).or_default() += 1;
        "ok"
    };
    let app = axum::Router::new().route("/run/{id}", axum::routing::get(count)).with_state(runs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind probe");
    let addr = listener.local_addr().expect("probe address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// The `i`th task of the load: sleeps, probes and cached, rate-limited echoes.
fn load_task(i: usize, probe: &str, sleep_ms: u64) -> TaskEnvelope {
    let priority = Priority::ALL[(i / 4) % 4];
    let task = match i % 4 {
        1 => {
            let id = Uuid::now_v7();
            let mut t = TaskEnvelope::new("http", serde_json::json!({ "url": format!("{probe}/run/{id}") }));
            t.id = id;
            t
        }
        // Repeated payloads: cache hits once the first of each is stored.
        3 => TaskEnvelope::new("echo", serde_json::json!({ "text": format!("t{}", i % 16) })),
        _ => TaskEnvelope::new("sleep", serde_json::json!({ "ms": sleep_ms, "i": i })),
    };
    task.with_priority(priority)
}

/// Ids of the tasks final in Postgres.
async fn final_ids(pool: &sqlx::PgPool) -> HashSet<Uuid> {
    for _ in 0..20 {
        let q = "SELECT id FROM tasks WHERE state IN ('succeeded', 'failed', 'dead', 'cancelled')";
        if let Ok(ids) = sqlx::query_scalar::<_, Uuid>(q).fetch_all(pool).await {
            return ids.into_iter().collect();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("Postgres does not answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_nothing_and_end_each_task_once() {
    let rounds = env_num("FAULT_ROUNDS", 1) as usize;
    let rate = env_num("TASKFLEET_FAULT_RATE", 100).max(1) as f64;
    let sleep_ms = env_num("TASKFLEET_FAULT_SLEEP_MS", 1000);
    let phase_secs = env_num("TASKFLEET_FAULT_PHASE_SECS", 3).max(1) as f64;
    let ack_wait = std::env::var("TASKFLEET_FAULT_ACK_WAIT").unwrap_or_else(|_| "2s".into());
    let ack_wait_s = parse_secs(&ack_wait).expect("TASKFLEET_FAULT_ACK_WAIT like 2s or 30s");
    let down = Duration::from_secs(env_num("TASKFLEET_FAULT_DOWN_SECS", 5));
    let pg_down = Duration::from_secs(env_num("TASKFLEET_FAULT_PG_DOWN_SECS", down.as_secs()));
    let drain = Duration::from_secs(env_num("TASKFLEET_FAULT_DRAIN_SECS", 60 + 2 * ack_wait_s.ceil() as u64));
    let settle = Duration::from_secs(env_num("TASKFLEET_FAULT_SETTLE_SECS", 10 + 2 * ack_wait_s.ceil() as u64));
    let selected =
        std::env::var("TASKFLEET_FAULT_PHASES").unwrap_or_else(|_| "worker,coordinator,nats,postgres,redis".into());
    let faults: Vec<Fault> =
        Fault::INJECTED.into_iter().filter(|f| selected.split(',').any(|s| s.trim() == f.key())).collect();
    assert!(!faults.is_empty(), "TASKFLEET_FAULT_PHASES={selected:?} names no fault");

    let pg = PgCluster::start().expect("private Postgres cluster");
    let mut redis = RedisServer::start();
    let mut fleet = Fleet::new("faults");
    assert!(fleet.env.nats.is_private(), "the fault test restarts its own nats-server; unset TASKFLEET_TEST_NATS_URL");
    fleet
        .use_database(&pg.url)
        .set("TASKFLEET_REDIS_URL", &redis.url)
        .set("TASKFLEET_NATS_ACK_WAIT", &ack_wait)
        .set("TASKFLEET_COORDINATOR_RESCUE_INTERVAL", "1s")
        .set("TASKFLEET_COORDINATOR_RESCUE_IDLE", &format!("{}ms", (ack_wait_s * 3000.0) as u64))
        .set("TASKFLEET_WORKER_STARTED_EVENT_DELAY", "200ms")
        .set("TASKFLEET_POLICIES_CACHE", "echo=10m")
        .set("TASKFLEET_POLICIES_SINGLE_FLIGHT_WAIT", "2s")
        .set("TASKFLEET_POLICIES_RATE_LIMITS", "echo=500/s burst 50")
        .set("TASKFLEET_POLICIES_KIND_LIMITS", "echo=echo")
        // The probes are `url` targets on this machine.
        .set("TASKFLEET_PROVIDERS_URL_HOSTS", "127.0.0.1")
        .set("TASKFLEET_PROVIDERS_ALLOW_PRIVATE_ADDRESSES", "127.0.0.1");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_worker(&[]);
    let pool = fleet.env.pg_pool().await;
    let client = fleet.nats().await;

    // Commit notifications, with the time they arrived.
    let commits: Commits = Arc::default();
    let mut sub = client.subscribe(fleet.subjects().committed_all()).await.expect("subscribe to commits");
    let listener = {
        let commits = commits.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(batch) = decode_message::<CommittedBatch>(&msg, MAX_MESSAGE_BYTES) {
                    let now = Instant::now();
                    let mut c = commits.lock().expect("commits");
                    c.extend(batch.tasks.iter().map(|t| (now, t.id, t.state.as_str())));
                }
            }
        })
    };
    let probe_runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let probe = probe_server(probe_runs.clone()).await;

    // Steady load at `rate` tasks/s. A submission counts once JetStream acknowledged it, in the
    // window current at that moment; a failed publish is retried with the same id.
    let js = async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client.clone());
    let subjects = fleet.subjects();
    let stop = Arc::new(AtomicBool::new(false));
    let window = Arc::new(AtomicUsize::new(0));
    let acked: Arc<Mutex<Vec<(Uuid, usize, Instant)>>> = Arc::default();
    let loader = {
        let (stop, window, acked) = (stop.clone(), window.clone(), acked.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let (mut next, mut pending) = (0usize, Vec::<TaskEnvelope>::new());
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                if stopping && pending.is_empty() {
                    break;
                }
                while !stopping && (next as f64) < start.elapsed().as_secs_f64() * rate {
                    pending.push(load_task(next, &probe, sleep_ms));
                    next += 1;
                }
                let mut sent = Vec::new();
                for env in std::mem::take(&mut pending) {
                    let submission = send_submission(&js, &subjects, &env, async_nats::HeaderMap::new()).await.ok();
                    sent.push((env, submission));
                }
                for (env, submission) in sent {
                    let stored = match submission {
                        Some(submission) => submission.stored().await.is_ok(),
                        None => false,
                    };
                    if stored {
                        acked.lock().expect("acked").push((env.id, window.load(Ordering::Relaxed), Instant::now()));
                    } else {
                        pending.push(env);
                    }
                }
                let pause = if pending.is_empty() { 10 } else { 200 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        })
    };

    let half = Duration::from_secs_f64(phase_secs / 2.0);
    let started = Instant::now();
    let plan = std::iter::once(Fault::None).chain((0..rounds).flat_map(|_| faults.iter().copied()));
    let mut windows: Vec<Window> = Vec::new();
    for fault in plan {
        window.store(windows.len(), Ordering::Relaxed);
        tokio::time::sleep(half).await;
        // Final before the fault, and acknowledged by the time it struck: in flight.
        let finals = final_ids(&pool).await;
        match fault {
            Fault::None => {}
            Fault::Worker => fleet.workers.remove(0).kill(),
            Fault::Coordinator => fleet.coordinator.as_mut().expect("coordinator").kill(),
            Fault::Nats => fleet.env.nats.kill(),
            Fault::Postgres => tokio::task::block_in_place(|| pg.stop_immediate()).expect("stop Postgres"),
            Fault::Redis => redis.kill(),
        }
        let in_flight: Vec<Uuid> = match fault {
            Fault::None => Vec::new(),
            _ => acked.lock().expect("acked").iter().map(|a| a.0).filter(|id| !finals.contains(id)).collect(),
        };
        match fault {
            Fault::None => {}
            Fault::Worker => tokio::task::block_in_place(|| fleet.start_worker(&[])),
            Fault::Coordinator => {
                tokio::time::sleep(down).await;
                tokio::task::block_in_place(|| fleet.start_coordinator());
            }
            Fault::Nats => {
                tokio::time::sleep(down).await;
                tokio::task::block_in_place(|| fleet.env.nats.restart());
            }
            Fault::Postgres => {
                tokio::time::sleep(pg_down).await;
                tokio::task::block_in_place(|| pg.start_again()).expect("start Postgres again");
            }
            Fault::Redis => {
                tokio::time::sleep(down).await;
                tokio::task::block_in_place(|| redis.restart());
            }
        }
        let restarted = (fault != Fault::None).then(|| (Instant::now(), taskfleet_test_support::now_ms() as f64));
        tokio::time::sleep(half).await;
        // Let this fault's tasks end before the next fault, so that each fault's effects are its own.
        let deadline = Instant::now() + settle;
        let q =
            "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state IN ('succeeded', 'failed', 'dead', 'cancelled')";
        while Instant::now() < deadline {
            let done: i64 = sqlx::query_scalar(q).bind(&in_flight).fetch_one(&pool).await.unwrap_or(-1);
            if done == in_flight.len() as i64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        windows.push(Window { fault, in_flight, restarted });
    }
    stop.store(true, Ordering::Relaxed);
    loader.await.expect("loader");
    let load_time = started.elapsed();

    // Drain: wait for every acknowledged task to be final, then a little longer for late runs.
    let acked = acked.lock().expect("acked").clone();
    let drain_started = Instant::now();
    let drained = loop {
        let q = "SELECT count(*) FROM tasks WHERE state IN ('succeeded', 'failed', 'dead', 'cancelled')";
        let done: i64 = sqlx::query_scalar(q).fetch_one(&pool).await.unwrap_or(0);
        if done >= acked.len() as i64 {
            break true;
        }
        if drain_started.elapsed() > drain {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drain_time = drain_started.elapsed();
    tokio::time::sleep(Duration::from_secs_f64(ack_wait_s + 2.0)).await;
    listener.abort();

    // `updated_at` of a final task is when its final state was written (never overwritten).
    let rows: Vec<TaskTuple> = sqlx::query_as(
        "SELECT id, state, max_attempts, (extract(epoch FROM finished_at) * 1000)::float8,
                CASE WHEN state IN ('succeeded', 'failed', 'dead', 'cancelled')
                     THEN (extract(epoch FROM updated_at) * 1000)::float8 END
         FROM tasks",
    )
    .fetch_all(&pool)
    .await
    .expect("read tasks");
    let unexpected = rows.len() as i64 - acked.len() as i64;
    let recorded_ms: HashMap<Uuid, Option<f64>> = rows.iter().map(|r| (r.0, r.4)).collect();
    let tasks: HashMap<Uuid, TaskRow> = rows
        .into_iter()
        .map(|(id, state, max_attempts, finished_ms, _)| (id, TaskRow { state, max_attempts, finished_ms }))
        .collect();
    let attempt_rows: Vec<AttemptTuple> = sqlx::query_as(
        "SELECT task_id, attempt, outcome, error->>'code', (extract(epoch FROM started_at) * 1000)::float8,
                (extract(epoch FROM finished_at) * 1000)::float8
         FROM task_attempts",
    )
    .fetch_all(&pool)
    .await
    .expect("read attempts");
    let mut attempts: HashMap<Uuid, Vec<AttemptRow>> = HashMap::new();
    for (id, attempt, outcome, code, started_ms, finished_ms) in attempt_rows {
        attempts.entry(id).or_default().push(AttemptRow { attempt, outcome, code, started_ms, finished_ms });
    }
    let commits = commits.lock().expect("commits").clone();
    let mut notified: HashMap<Uuid, BTreeSet<&str>> = HashMap::new();
    let mut first_commit: HashMap<Uuid, Instant> = HashMap::new();
    for (at, id, state) in &commits {
        notified.entry(*id).or_default().insert(*state);
        first_commit.entry(*id).or_insert(*at);
    }
    let probe_runs = probe_runs.lock().expect("probe counter").clone();

    // Each task counts against the last fault it was in flight for, else its submission's phase.
    let mut home: HashMap<Uuid, usize> = acked.iter().map(|a| (a.0, a.1)).collect();
    for (w, window) in windows.iter().enumerate() {
        home.extend(window.in_flight.iter().map(|id| (*id, w)));
    }
    // One row per fault: sums over its rounds.
    let order: Vec<Fault> = std::iter::once(Fault::None).chain(faults.iter().copied()).collect();
    let mut table = format!(
        "Faults under load ({rounds} round(s), {phase_secs} s phases, {rate} tasks/s, {sleep_ms} ms sleeps, \
         ack_wait {ack_wait}, down {} s, Postgres down {} s):\n\n\
         | fault | rounds | submitted | in flight at fault | lost | not succeeded | two final states \
         | dead w/o handler failure | ran after final | ran twice (budget) | resumed after | in flight final after |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        down.as_secs(),
        pg_down.as_secs()
    );
    let mut failures = Vec::new();
    let mut notes = String::new();
    for fault in order {
        let idx: Vec<usize> = (0..windows.len()).filter(|&w| windows[w].fault == fault).collect();
        let budget: i64 = idx.iter().map(|&w| windows[w].in_flight.len() as i64).sum();
        let submitted = acked.iter().filter(|a| idx.contains(&a.1)).count();
        let mut sum = [0i64; 6];
        let mut examples: [Vec<Uuid>; 6] = Default::default();
        for (id, _) in home.iter().filter(|(_, w)| idx.contains(w)) {
            let probe = probe_runs.get(&id.to_string()).copied().unwrap_or(0);
            let n = notified.get(id).map_or(0, BTreeSet::len);
            let v = judge(tasks.get(id), attempts.get(id).map_or(&[], Vec::as_slice), n, probe);
            let flags = [v.lost, v.not_succeeded, v.two_final, v.dead_without_failure, v.ran_after_final, v.ran_twice];
            for ((s, e), f) in sum.iter_mut().zip(examples.iter_mut()).zip(flags) {
                *s += f as i64;
                if f && e.len() < 3 {
                    e.push(*id);
                }
            }
        }
        // Per round: the first commit of a task submitted after the restart, and the last final
        // state written of the tasks in flight at the fault; the worst round.
        let resumed = worst(idx.iter().filter_map(|&w| {
            let (r, _) = windows[w].restarted?;
            let firsts = acked.iter().filter(|a| a.2 >= r).filter_map(|a| first_commit.get(&a.0));
            Some(firsts.min().map(|t| t.duration_since(r).as_secs_f64()))
        }));
        let in_flight_done = worst(idx.iter().filter_map(|&w| {
            let (_, r_ms) = windows[w].restarted?;
            let ends: Option<Vec<f64>> =
                windows[w].in_flight.iter().map(|id| recorded_ms.get(id).copied().flatten()).collect();
            Some(ends.map(|e| (e.into_iter().fold(r_ms, f64::max) - r_ms) / 1000.0))
        }));
        let [lost, not_ok, two, dead, after, twice] = sum;
        let in_flight = if fault == Fault::None { "–".to_string() } else { budget.to_string() };
        table.push_str(&format!(
            "| {} | {} | {submitted} | {in_flight} | {lost} | {not_ok} | {two} | {dead} | {after} \
             | {twice} (≤ {budget}) | {resumed} | {in_flight_done} |\n",
            fault.name(),
            idx.len()
        ));
        let describe = |ids: &[Uuid]| -> String {
            ids.iter()
                .map(|id| format!("\n      {}", describe_task(*id, &tasks, &attempts, &notified, &probe_runs)))
                .collect()
        };
        for (k, what) in [
            (0, "lost"),
            (1, "not succeeded"),
            (2, "with two final states"),
            (3, "dead without a handler failure"),
            (4, "ran after their final state"),
        ] {
            if sum[k] > 0 {
                failures.push(format!("{}: {} tasks {what}, e.g.{}", fault.name(), sum[k], describe(&examples[k])));
            }
        }
        if twice > 0 {
            notes.push_str(&format!("{} ran twice, e.g.{}\n", fault.name(), describe(&examples[5])));
        }
        if twice > budget {
            failures.push(format!(
                "{}: {twice} tasks ran twice, more than the {budget} in flight at the fault(s), e.g.{}",
                fault.name(),
                describe(&examples[5])
            ));
        }
    }
    let drained = if drained {
        format!("all final {:.1} s", drain_time.as_secs_f64())
    } else {
        format!("NOT all final after {drain:?}")
    };
    table.push_str(&format!(
        "\n{} acknowledged submissions in {:.0} s of load; drain: {drained}; {} commit notifications; \
         {} probe calls for {} probes.\n",
        acked.len(),
        load_time.as_secs_f64(),
        commits.len(),
        probe_runs.values().sum::<u32>(),
        probe_runs.len()
    ));
    println!("{table}\n{notes}");
    if unexpected != 0 {
        failures.push(format!("{unexpected} rows more than acknowledged submissions"));
    }
    assert!(failures.is_empty(), "{table}\nFAILED:\n  {}\n\n{}", failures.join("\n  "), fleet.logs());
}

#[cfg(test)]
mod judge_tests {
    use super::*;

    fn row(state: &str, finished_ms: f64) -> TaskRow {
        TaskRow { state: state.into(), max_attempts: 3, finished_ms: Some(finished_ms) }
    }

    fn attempt(attempt: i32, outcome: &str, code: Option<&str>, started: f64, finished: f64) -> AttemptRow {
        AttemptRow {
            attempt,
            outcome: outcome.into(),
            code: code.map(str::to_string),
            started_ms: Some(started),
            finished_ms: Some(finished),
        }
    }

    #[test]
    fn a_clean_task_passes() {
        let v = judge(Some(&row("succeeded", 120.0)), &[attempt(1, "succeeded", None, 100.0, 120.0)], 1, 1);
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn missing_or_unfinished_tasks_are_lost() {
        assert!(judge(None, &[], 0, 0).lost);
        let queued = TaskRow { state: "queued".into(), max_attempts: 3, finished_ms: None };
        assert!(judge(Some(&queued), &[], 0, 0).lost);
    }

    /// The chaos run's pattern: deliveries without a recorded attempt exhaust the budget, the
    /// task is `dead`, and then attempts 1–3 run and succeed after it.
    #[test]
    fn dead_by_lost_deliveries_then_rerun_is_caught() {
        let attempts = [
            attempt(4, "dead", Some("attempts_exhausted"), 100.0, 100.0),
            attempt(1, "succeeded", None, 500.0, 520.0),
            attempt(2, "succeeded", None, 600.0, 620.0),
        ];
        let v = judge(Some(&row("dead", 100.0)), &attempts, 1, 0);
        assert_eq!(
            v,
            Verdict {
                lost: false,
                not_succeeded: true,
                two_final: true,
                dead_without_failure: true,
                ran_after_final: true,
                ran_twice: true
            }
        );
    }

    #[test]
    fn dead_after_real_handler_failures_is_allowed() {
        let attempts = [
            attempt(1, "retrying", Some("boom"), 0.0, 1.0),
            attempt(2, "retrying", Some("boom"), 2.0, 3.0),
            attempt(3, "dead", Some("boom"), 4.0, 5.0),
        ];
        let v = judge(Some(&row("dead", 5.0)), &attempts, 1, 0);
        assert!(!v.dead_without_failure && !v.two_final && !v.ran_after_final, "{v:?}");
    }

    #[test]
    fn redeliveries_probes_and_notifications_count() {
        let ok = row("succeeded", 20.0);
        assert!(judge(Some(&ok), &[attempt(2, "succeeded", None, 10.0, 20.0)], 1, 0).ran_twice);
        assert!(judge(Some(&ok), &[attempt(1, "succeeded", None, 10.0, 20.0)], 1, 2).ran_twice);
        assert!(judge(Some(&ok), &[attempt(1, "succeeded", None, 10.0, 20.0)], 2, 1).two_final);
    }

    #[test]
    fn worst_round_is_shown() {
        assert_eq!(worst([Some(0.5), Some(2.25)].into_iter()), "2.2 s");
        assert_eq!(worst([Some(0.5), None].into_iter()), "never");
        assert_eq!(worst(std::iter::empty()), "–");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_secs("2s"), Some(2.0));
        assert_eq!(parse_secs("500ms"), Some(0.5));
        assert_eq!(parse_secs("30"), Some(30.0));
        assert_eq!(parse_secs("x"), None);
    }
}
