//! Workflows under faults: runs that spawn, join, loop and checkpoint while the coordinator
//! and the workers are SIGKILLed, again and again. Every run completes, every spawn has one
//! join that was released once and succeeded once, no task has two final states, and
//! checkpointed steps that were interrupted resume from their checkpoint.
//!
//! `TASKFLEET_WF_FAULT_RUNS` [12] runs, `TASKFLEET_WF_FAULT_ROUNDS` [3] rounds of kills.

use serde_json::json;
use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use uuid::Uuid;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A research pipeline: plan → spawn 40 searches and join → write (a loop of 2) → a long
/// checkpointing edit → publish.
fn pipeline(i: u64) -> serde_json::Value {
    json!({"name": format!("pipeline-{i}"), "nodes": [
        {"name": "plan", "kind": "echo", "payload": {"topic": i}},
        {"name": "research", "kind": "spawn", "depends_on": ["plan"],
         "payload": {"count": 40, "kind": "sleep", "payload": {"ms": 30}}},
        {"name": "write", "kind": "counter", "depends_on": ["research"], "loop": {"until": "n >= 2", "max_iterations": 5}},
        {"name": "edit", "kind": "steps", "depends_on": ["write"], "payload": {"steps": 10, "ms": 150}},
        {"name": "publish", "kind": "collect", "depends_on": ["edit", "write"]}
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_complete_with_one_join_each_while_coordinator_and_workers_are_killed() {
    let runs = env_or("TASKFLEET_WF_FAULT_RUNS", 12);
    let rounds = env_or("TASKFLEET_WF_FAULT_ROUNDS", 3);
    let mut fleet = Fleet::new("wf_faults");
    fleet.set("TASKFLEET_NATS_ACK_WAIT", "2s");
    fleet.set("TASKFLEET_COORDINATOR_RESCUE_INTERVAL", "500ms");
    fleet.set("TASKFLEET_COORDINATOR_RESCUE_IDLE", "2s");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let mut ids: Vec<Uuid> = Vec::new();
    // Through the Rust API, which sends MessagePack.
    for i in 0..runs {
        let spec: taskfleet_proto::RunSpec = serde_json::from_value(pipeline(i)).expect("a valid RunSpec");
        let submitted = taskfleet_bus::submit_run(&client, &fleet.subjects(), &spec, Duration::from_secs(10))
            .await
            .expect("run submitted");
        ids.push(submitted.run_id);
    }
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        fleet.coordinator.as_mut().expect("coordinator").kill();
        let victim = (round as usize) % fleet.workers.len();
        fleet.workers.remove(victim).kill();
        tokio::time::sleep(Duration::from_millis(800)).await;
        fleet.start_coordinator();
        fleet.start_worker(&[]);
    }

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE state = 'running'").fetch_one(&pool).await.unwrap();
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} runs still running\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM runs GROUP BY state").fetch_all(&pool).await.unwrap();
    assert_eq!(states, vec![("succeeded".to_string(), runs as i64)], "{}", fleet.logs());

    // Every spawner has exactly one join; each join succeeded once and was released once
    // (its first dispatch generation, unless a rescue had to dispatch it again).
    let joins: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT s.id, (SELECT count(*) FROM tasks j WHERE j.completes = s.id),
                (SELECT count(*) FROM tasks j JOIN task_attempts a ON a.task_id = j.id
                 WHERE j.completes = s.id AND a.outcome = 'succeeded')
         FROM tasks s WHERE s.node = 'research'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(joins.len(), runs as usize);
    for (spawner, n, succeeded) in &joins {
        assert_eq!(*n, 1, "spawner {spawner} has {n} joins");
        assert!(*succeeded >= 1, "the join of {spawner} never succeeded");
    }
    let children: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE spawned_by IS NOT NULL AND completes IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(children, 40 * runs as i64, "each spawn wrote its children once");
    // One final state per task, and nothing left unfinished.
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state NOT IN ('succeeded')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(open, 0);
    let outputs: Vec<serde_json::Value> = sqlx::query_scalar("SELECT output FROM runs").fetch_all(&pool).await.unwrap();
    for out in &outputs {
        assert_eq!(out["publish"]["results"][0]["done"], 10, "{out}");
        assert_eq!(out["publish"]["results"][1]["n"], 2, "{out}");
    }
    let resumed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE node = 'edit' AND (result->>'resumed_from')::int > 0")
            .fetch_one(&pool)
            .await
            .unwrap();
    let edit_attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_attempts a JOIN tasks t ON t.id = a.task_id WHERE t.node = 'edit'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT task_id FROM task_attempts WHERE outcome = 'succeeded'
                               GROUP BY task_id HAVING count(*) > 1) x",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!(
        "{runs} runs, {rounds} rounds of coordinator + worker SIGKILL: all succeeded; {resumed} long steps resumed from \
         a checkpoint ({edit_attempts} recorded attempts of the {runs} long steps); {twice} tasks ran to success twice (at-least-once, work in flight at a kill)"
    );
}
