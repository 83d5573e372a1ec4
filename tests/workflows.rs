//! Workflows end to end, on real NATS and Postgres with the real binaries: results flow along
//! a DAG with per-edge failure policies, a spawn's join fires once with every child's result,
//! loops, early stop, checkpoints across a worker kill, cancel and resume, the run timeout and
//! the limits.

use serde_json::{Value, json};
use std::time::Duration;
use taskfleet_e2e::Fleet;
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts recorded for a task.
async fn attempts(pool: &sqlx::PgPool, task: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM task_attempts WHERE task_id = $1")
        .bind(task)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Polls one value about `task` (`sql`, with the task id as `$1`) every 20 ms until `done`
/// holds, failing with `what` and the fleet's logs after 20 s.
async fn until<T>(fleet: &Fleet, pool: &sqlx::PgPool, sql: &str, task: Uuid, what: &str, done: impl Fn(&T) -> bool)
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value: T = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(task).fetch_one(pool).await.unwrap();
        if done(&value) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A task's stored result.
async fn result(pool: &sqlx::PgPool, task: Uuid) -> Value {
    let result: Option<Value> =
        sqlx::query_scalar("SELECT result FROM tasks WHERE id = $1").bind(task).fetch_one(pool).await.unwrap();
    result.unwrap_or(Value::Null)
}

/// The view of one task of a run by node name (the first task with that node).
fn task<'a>(view: &'a Value, node: &str) -> &'a Value {
    view["tasks"].as_array().and_then(|t| t.iter().find(|t| t["node"] == node)).unwrap_or(&Value::Null)
}

/// A diamond passes each parent's result to the join in `depends_on` order; a failed parent
/// cancels a `fail` dependent and is handed as an outcome to a `continue` dependent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_flow_along_the_dag_with_each_edges_failure_policy() {
    let mut fleet = Fleet::new("wf_dag");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let (run, tasks) = fleet
        .submit_run(
            &client,
            json!({"name": "diamond", "nodes": [
                {"name": "d", "kind": "collect", "depends_on": ["c", "b"]},
                {"name": "a", "kind": "echo", "payload": {"topic": "rust"}},
                {"name": "b", "kind": "echo", "payload": {"from": "b"}, "depends_on": ["a"]},
                {"name": "c", "kind": "echo", "payload": {"from": "c"}, "depends_on": ["a"]}
            ]}),
        )
        .await;
    let view = fleet.wait_run(&client, run, RUN_TIMEOUT).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["output"], json!({"d": {"results": [{"from": "c"}, {"from": "b"}], "failed": 0}}), "{view}");
    assert_eq!(view["totals"]["tasks"], 4);
    assert_eq!(attempts(&pool, tasks["d"]).await, 1);

    let (run, tasks) = fleet
        .submit_run(
            &client,
            json!({"nodes": [
                {"name": "flaky", "kind": "sleep", "payload": {"fail": "fatal"}},
                {"name": "tolerant", "kind": "collect", "depends_on": [{"node": "flaky", "on_failure": "continue"}]},
                {"name": "strict", "kind": "echo", "depends_on": ["flaky"]},
                {"name": "after_strict", "kind": "echo", "depends_on": ["strict"]}
            ]}),
        )
        .await;
    let view = fleet.wait_run(&client, run, RUN_TIMEOUT).await;
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(task(&view, "tolerant")["state"], "succeeded", "{view}");
    let tolerant = result(&pool, tasks["tolerant"]).await;
    assert_eq!(tolerant, json!({"results": [null], "failed": 1}));
    for node in ["strict", "after_strict"] {
        assert_eq!(task(&view, node)["state"], "cancelled", "{node}: {view}");
        assert_eq!(task(&view, node)["error"]["code"], "dependency_failed", "{node}: {view}");
        assert_eq!(attempts(&pool, tasks[node]).await, 0, "{node} never ran");
    }
    assert_eq!(view["error"]["code"], "step_failed", "{view}");

    let refused =
        fleet.api(&client, "run.submit", &json!({"nodes": [{"name": "a", "kind": "echo", "depends_on": ["a"]}]})).await;
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("cycle")), "{refused}");
    let refused = fleet
        .api(
            &client,
            "run.submit",
            &json!({"nodes": [{"name": "a", "kind": "echo", "depends_on": ["b"]}, {"name": "b", "kind": "echo", "depends_on": ["a"]}]}),
        )
        .await;
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("cycle")), "{refused}");
    let refused =
        fleet.api(&client, "run.submit", &json!({"nodes": [{"name": "a", "kind": "echo", "depends_on": ["x"]}]})).await;
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("unknown node")), "{refused}");

    // The CLI: a YAML run submitted and waited for, then drawn.
    let file = std::env::temp_dir().join(format!("wf_dag_{}.yaml", Uuid::now_v7()));
    std::fs::write(
        &file,
        "name: cli-run\nnodes:\n  - {name: fetch, kind: echo, payload: {doc: 7}}\n  - {name: digest, kind: collect, depends_on: [fetch]}\n",
    )
    .unwrap();
    let out = fleet.cli(&["run", "submit", file.to_str().unwrap_or_default(), "--wait", "--timeout", "30s"]);
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "run submit --wait: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let run_id = stdout.lines().next().unwrap_or_default().trim().to_string();
    assert!(stdout.contains(r#""doc""#) && stdout.contains('7'), "the output is printed: {stdout}");
    let shown = fleet.cli(&["run", "show", &run_id]);
    let drawn = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success() && drawn.contains("cli-run") && drawn.contains("digest"), "{drawn}");
    assert!(drawn.lines().any(|l| l.contains("digest") && l.contains("succeeded")), "{drawn}");
    let listed = fleet.cli(&["run", "ls", "--state", "succeeded"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.lines().nth(1).is_some_and(|l| l.starts_with(&run_id) && l.contains("2/2")),
        "newest first:\n{listed}"
    );
}

/// A spawned fan-out: the spawner holds no worker while 300 children run, the join fires
/// exactly once with all their results (fetched from the coordinator, as they are over the
/// inline limit), and the spawner ends with the join's result. Spawns over a limit fail the
/// spawner with `spawn_refused`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawn_joins_all_its_children_once() {
    let mut fleet = Fleet::new("wf_spawn");
    fleet.set("TASKFLEET_WORKFLOWS_INLINE_PARENTS_BYTES", "4096");
    fleet.set("TASKFLEET_WORKFLOWS_MAX_CHILDREN_PER_SPAWN", "300");
    fleet.set("TASKFLEET_WORKFLOWS_MAX_SPAWN_DEPTH", "1");
    fleet.set("TASKFLEET_WORKFLOWS_MAX_TASKS_PER_RUN", "400");
    fleet.start_coordinator();
    // One slot: a spawner that held its slot while waiting would starve its own children.
    fleet.start_worker(&[("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "1")]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let (run, tasks) = fleet
        .submit_run(
            &client,
            json!({"nodes": [
                {"name": "research", "kind": "spawn", "payload": {"count": 300, "payload": {"q": "x"}}},
                {"name": "write", "kind": "collect", "depends_on": ["research"]}
            ]}),
        )
        .await;
    let view = fleet.wait_run(&client, run, RUN_TIMEOUT).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let joined = result(&pool, tasks["research"]).await;
    let results = joined["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 300, "{joined}");
    assert!(results.iter().enumerate().all(|(i, r)| r["i"] == i as u64), "children's results in spawn order");
    let joins: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, state FROM tasks WHERE completes = $1")
        .bind(tasks["research"])
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(joins.len(), 1);
    assert_eq!(attempts(&pool, joins[0].0).await, 1, "the join ran once");
    let write = result(&pool, tasks["write"]).await;
    assert_eq!(
        write["results"][0]["results"].as_array().map(Vec::len),
        Some(300),
        "the dependent sees the joined result"
    );
    assert_eq!(view["totals"]["tasks"], 303, "{}", view["totals"]);

    let (run, tasks) = fleet
        .submit_run(&client, json!({"nodes": [{"name": "big", "kind": "spawn", "payload": {"count": 301}}]}))
        .await;
    let view = fleet.wait_run(&client, run, RUN_TIMEOUT).await;
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(task(&view, "big")["error"]["code"], "spawn_refused", "{view}");
    let children: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE spawned_by = $1")
        .bind(tasks["big"])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(children, 0, "a refused spawn writes nothing");

    // Spawns nest one deep here: a child that spawns again is refused, which fails the join.
    let (run, tasks) = fleet
        .submit_run(
            &client,
            json!({"nodes": [{"name": "outer", "kind": "spawn", "payload": {"count": 2, "kind": "spawn"}}]}),
        )
        .await;
    let view = fleet.wait_run(&client, run, RUN_TIMEOUT).await;
    assert_eq!(view["state"], "failed", "{view}");
    let codes: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT node, error->>'code' FROM tasks WHERE spawned_by = $1 OR id = $1 ORDER BY node")
            .bind(tasks["outer"])
            .fetch_all(&pool)
            .await
            .unwrap();
    let code = |node: &str| codes.iter().find(|c| c.0.as_deref() == Some(node)).and_then(|c| c.1.clone());
    assert_eq!(code("0").as_deref(), Some("spawn_refused"), "{codes:?}");
    assert_eq!(code("join").as_deref(), Some("dependency_failed"), "{codes:?}");
    assert_eq!(code("outer").as_deref(), Some("dependency_failed"), "the spawner takes its join's outcome: {codes:?}");
    // A run over the task limit is refused whole.
    let nodes: Vec<Value> = (0..401).map(|i| json!({"name": format!("n{i}"), "kind": "echo"})).collect();
    let refused = fleet.api(&client, "run.submit", &json!({ "nodes": nodes })).await;
    assert!(
        refused["error"]["message"].as_str().is_some_and(|m| m.contains("workflows.max_tasks_per_run")),
        "{refused}"
    );
}

/// A loop repeats its step, each iteration a task of its own that sees the previous one's
/// result, until the predicate holds or its iterations run out; its dependent sees the last
/// iteration's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_repeat_until_their_predicate_holds() {
    let mut fleet = Fleet::new("wf_loop");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let (run, tasks) = fleet
        .submit_run(
            &client,
            json!({"nodes": [
                {"name": "draft", "kind": "echo", "payload": {"text": "v0"}},
                {"name": "improve", "kind": "counter", "depends_on": ["draft"],
                 "loop": {"until": "n >= 3", "max_iterations": 10}},
                {"name": "capped", "kind": "counter", "loop": {"until": "n >= 100", "max_iterations": 2}},
                {"name": "publish", "kind": "collect", "depends_on": ["improve", "capped"]}
            ]}),
        )
        .await;
    let view = fleet.wait_run(&client, run, RUN_TIMEOUT).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let iterations: Vec<(i32, String, Value)> = sqlx::query_as(
        "SELECT iteration, state, result FROM tasks WHERE run_id = $1 AND node = 'improve' ORDER BY iteration",
    )
    .bind(run)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(iterations.iter().map(|i| i.0).collect::<Vec<_>>(), [1, 2, 3], "{iterations:?}");
    assert!(iterations.iter().all(|i| i.1 == "succeeded"), "{iterations:?}");
    assert_eq!(iterations[0].2["n"], 3, "the loop's first task ends with the last iteration's result");
    assert_eq!(iterations[2].2["parents"], 1, "every iteration sees the loop's parents");
    let publish = result(&pool, tasks["publish"]).await;
    assert_eq!(
        (publish["results"][0]["n"].clone(), publish["results"][1]["n"].clone()),
        (json!(3), json!(2)),
        "{publish}"
    );
}

/// A step that stops its run ends it at once with its output: every unfinished task is
/// cancelled, the running one through the cancellation path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_stops_its_run_early() {
    let mut fleet = Fleet::new("wf_stop");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let (run, tasks) = fleet
        .submit_run(
            &client,
            json!({"nodes": [
                {"name": "slow", "kind": "sleep", "payload": {"ms": 60000}},
                {"name": "after_slow", "kind": "echo", "depends_on": ["slow"]},
                {"name": "warmup", "kind": "sleep", "payload": {"ms": 300}},
                {"name": "good_enough", "kind": "stop", "payload": {"score": 0.95}, "depends_on": ["warmup"]}
            ]}),
        )
        .await;
    let view = fleet.wait_run(&client, run, Duration::from_secs(20)).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["output"], json!({"score": 0.95}));
    for node in ["slow", "after_slow"] {
        assert_eq!(task(&view, node)["state"], "cancelled", "{node}: {view}");
    }
    // The running step was told and stopped: its attempt ends cancelled, not after a minute.
    let sql = "SELECT count(*) FROM task_attempts WHERE task_id = $1";
    until(&fleet, &pool, sql, tasks["slow"], "the running step never stopped", |n: &i64| *n > 0).await;
}

/// A long step checkpoints; its worker is killed; the next attempt starts from the last
/// checkpoint. Then a run is cancelled mid-way and resumed: what succeeded is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_survive_a_worker_kill_and_runs_resume() {
    let mut fleet = Fleet::new("wf_checkpoint");
    fleet.set("TASKFLEET_NATS_ACK_WAIT", "2s");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let (run, tasks) = fleet
        .submit_run(&client, json!({"nodes": [{"name": "long", "kind": "steps", "payload": {"steps": 8, "ms": 250}}]}))
        .await;
    let sql = "SELECT checkpoint FROM tasks WHERE id = $1";
    until(&fleet, &pool, sql, tasks["long"], "no checkpoint", |cp: &Option<Value>| {
        cp.as_ref().and_then(|c| c["done"].as_u64()).is_some_and(|d| d >= 3)
    })
    .await;
    fleet.workers[0].kill();
    fleet.start_worker(&[]);
    let view = fleet.wait_run(&client, run, RUN_TIMEOUT).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let out = &view["output"]["long"];
    assert_eq!(out["done"], 8, "{view}");
    assert!(out["resumed_from"].as_u64().is_some_and(|r| r >= 3), "started over instead of resuming: {out}");

    let (run, tasks) = fleet
        .submit_run(
            &client,
            json!({"nodes": [
                {"name": "fetch", "kind": "echo", "payload": {"doc": 1}},
                {"name": "summarize", "kind": "sleep", "payload": {"ms": 1500}, "depends_on": ["fetch"]},
                {"name": "publish", "kind": "collect", "depends_on": ["summarize", "fetch"]}
            ]}),
        )
        .await;
    let sql = "SELECT state FROM tasks WHERE id = $1";
    until(&fleet, &pool, sql, tasks["summarize"], "summarize never ran", |s: &String| s == "running").await;
    let cancelled = fleet.api(&client, "run.cancel", &json!({ "id": run })).await;
    assert_eq!((cancelled["previous"].clone(), cancelled["state"].clone()), (json!("running"), json!("cancelled")));
    let not_again = fleet.api(&client, "run.cancel", &json!({ "id": run })).await;
    assert_eq!(not_again["tasks"], 0);
    let resumed = fleet.api(&client, "run.resume", &json!({ "id": run })).await;
    assert_eq!(resumed["tasks"], 2, "summarize and publish run again: {resumed}");
    let view = fleet.wait_run(&client, run, RUN_TIMEOUT).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(attempts(&pool, tasks["fetch"]).await, 1, "a succeeded step is kept, not re-run");
    assert_eq!(view["output"]["publish"]["results"][1], json!({"doc": 1}));
    let again = fleet.api(&client, "run.resume", &json!({ "id": run })).await;
    assert!(again["error"]["message"].as_str().is_some_and(|m| m.contains("succeeded")), "{again}");
}

/// A run past its timeout fails with `run_timeout` and its unfinished tasks are cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_its_timeout_fails() {
    let mut fleet = Fleet::new("wf_timeout");
    fleet.set("TASKFLEET_COORDINATOR_RESCUE_INTERVAL", "200ms");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;

    let (run, _) = fleet
        .submit_run(
            &client,
            json!({"timeout_ms": 1000, "nodes": [
                {"name": "slow", "kind": "sleep", "payload": {"ms": 60000}},
                {"name": "next", "kind": "echo", "depends_on": ["slow"]}
            ]}),
        )
        .await;
    let view = fleet.wait_run(&client, run, Duration::from_secs(20)).await;
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(view["error"]["code"], "run_timeout", "{view}");
    assert!(view["tasks"].as_array().is_some_and(|t| t.iter().all(|t| t["state"] == "cancelled")), "{view}");
}
