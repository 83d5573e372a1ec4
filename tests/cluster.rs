//! The production shape of NATS: the fleet (a coordinator, two workers) on a three-node
//! JetStream cluster with every stream R3, under steady load, while each node in turn is
//! SIGKILLed, kept down for a while and restarted on its store. Every submission JetStream
//! acknowledged must end `succeeded` in Postgres; re-runs are allowed (delivery is at least
//! once) and counted.
//!
//! Environment (defaults in brackets): `TASKFLEET_CLUSTER_RATE` [200] tasks submitted per
//! second, `TASKFLEET_CLUSTER_DOWN_SECS` [5] how long a killed node stays down.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskfleet_bus::send_submission;
use taskfleet_e2e::Fleet;
use taskfleet_proto::{Priority, TaskEnvelope};
use taskfleet_test_support::cluster::{CLUSTER_SIZE, NatsCluster};
use uuid::Uuid;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// Submits `rate` tasks per second until `stop`, then until every task made is acknowledged.
/// A submission that fails (not sent, or no acknowledgement in time) is sent again with the
/// same task id, so the same `Nats-Msg-Id`: JetStream drops it if the first one was stored
/// after all. Returns the ids JetStream acknowledged, and how many sends failed.
async fn load(
    js: async_nats::jetstream::Context,
    subjects: taskfleet_proto::Subjects,
    rate: f64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(Uuid, Instant)>>>,
) -> usize {
    let start = Instant::now();
    let (mut next, mut failures) = (0usize, 0usize);
    let mut pending: Vec<TaskEnvelope> = Vec::new();
    let give_up = Duration::from_secs(60);
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        match stopped_at {
            Some(_) if pending.is_empty() => break,
            Some(at) if at.elapsed() > give_up => {
                panic!("{} submissions still not acknowledged {give_up:?} after the load", pending.len())
            }
            Some(_) => {}
            None => {
                while (next as f64) < start.elapsed().as_secs_f64() * rate {
                    let task = TaskEnvelope::new("echo", serde_json::json!({ "i": next }));
                    pending.push(task.with_priority(Priority::ALL[next % 4]));
                    next += 1;
                }
            }
        }
        // Every send first, then their acknowledgements together: a lost one costs its
        // timeout once, not once per submission behind it.
        let mut sent = Vec::with_capacity(pending.len());
        for env in std::mem::take(&mut pending) {
            let submission = send_submission(&js, &subjects, &env, async_nats::HeaderMap::new()).await;
            sent.push(async move {
                let stored = match submission {
                    Ok(s) => s.stored().await.is_ok(),
                    Err(_) => false,
                };
                (env, stored)
            });
        }
        let mut retry = false;
        for (env, stored) in futures::future::join_all(sent).await {
            if stored {
                acked.lock().expect("acked").push((env.id, Instant::now()));
            } else {
                failures += 1;
                retry = true;
                pending.push(env);
            }
        }
        tokio::time::sleep(Duration::from_millis(if retry { 200 } else { 10 })).await;
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_kills_in_a_jetstream_cluster_lose_no_acknowledged_task() {
    let rate = env_num("TASKFLEET_CLUSTER_RATE", 200).max(1) as f64;
    let down = Duration::from_secs(env_num("TASKFLEET_CLUSTER_DOWN_SECS", 5));
    let started = Instant::now();

    let mut cluster = NatsCluster::start();
    let mut fleet = Fleet::new("cluster");
    fleet
        .use_nats(&cluster.urls())
        .set("TASKFLEET_NATS_REPLICAS", "3")
        // A delivery whose acknowledgement died with a node comes back soon.
        .set("TASKFLEET_NATS_ACK_WAIT", "2s")
        .set("TASKFLEET_COORDINATOR_RESCUE_INTERVAL", "1s")
        .set("TASKFLEET_COORDINATOR_RESCUE_IDLE", "6s");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_worker(&[]);
    let pool = fleet.env.pg_pool().await;
    let client = fleet.nats().await;

    let js = async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(Uuid, Instant)>>> = Arc::default();
    let loader = tokio::spawn(load(js, fleet.subjects(), rate, stop.clone(), acked.clone()));

    // Each node in turn: killed under load, down a while, restarted on its store, rejoined.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rejoins = Vec::new();
    for node in 0..CLUSTER_SIZE {
        let led = leaders(&client, &fleet.subjects(), cluster.name(node)).await;
        let killed = Instant::now();
        cluster.kill(node);
        tokio::time::sleep(down).await;
        let back = Instant::now();
        tokio::task::block_in_place(|| {
            cluster.restart(node);
            if let Err(why) = cluster.wait_healthy(Duration::from_secs(60)) {
                panic!("{} did not rejoin: {why}\n{}\n{}", cluster.name(node), cluster.log(node), fleet.logs());
            }
        });
        let rejoined = back.elapsed();
        rejoins.push(rejoined);
        let (during, first) = {
            let acked = acked.lock().expect("acked");
            let after: Vec<Instant> = acked.iter().map(|a| a.1).filter(|t| *t > killed).collect();
            (after.iter().filter(|t| **t < back).count(), after.iter().min().map(|t| t.duration_since(killed)))
        };
        eprintln!(
            "{} killed (leader of: {}): {during} submissions acknowledged in its {down:?} down, the first \
             {first:.1?} after the kill; rejoined {rejoined:.1?} after its restart",
            cluster.name(node),
            if led.is_empty() { "none".to_string() } else { led.join(", ") },
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let send_failures = loader.await.expect("loader");
    let acked: Vec<(Uuid, Instant)> = acked.lock().expect("acked").clone();
    let load_time = started.elapsed();

    // Every acknowledged task final, or the drain times out.
    let drain = Instant::now();
    let ids: HashSet<Uuid> = acked.iter().map(|a| a.0).collect();
    let final_q =
        "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state IN ('succeeded', 'failed', 'dead', 'cancelled')";
    let all: Vec<Uuid> = ids.iter().copied().collect();
    while drain.elapsed() < Duration::from_secs(60) {
        let done: i64 = sqlx::query_scalar(final_q).bind(&all).fetch_one(&pool).await.unwrap_or(0);
        if done as usize >= ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_time = drain.elapsed();

    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, state FROM tasks").fetch_all(&pool).await.expect("read tasks");
    let states: HashMap<Uuid, String> = rows.into_iter().collect();
    let runs: Vec<(Uuid, i64, i32)> =
        sqlx::query_as("SELECT task_id, count(*), max(attempt) FROM task_attempts GROUP BY task_id")
            .fetch_all(&pool)
            .await
            .expect("read attempts");
    let ran_more_than_once =
        runs.iter().filter(|(id, rows, last)| ids.contains(id) && (*rows > 1 || *last > 1)).count();
    let missing: Vec<&Uuid> = ids.iter().filter(|id| !states.contains_key(id)).collect();
    let not_final: Vec<(&Uuid, &String)> = ids
        .iter()
        .filter_map(|id| states.get(id).map(|s| (id, s)))
        .filter(|(_, s)| !["succeeded", "failed", "dead", "cancelled"].contains(&s.as_str()))
        .collect();
    let not_succeeded: Vec<(&Uuid, &String)> = ids
        .iter()
        .filter_map(|id| states.get(id).map(|s| (id, s)))
        .filter(|(_, s)| s.as_str() != "succeeded")
        .collect();
    let unexpected = states.keys().filter(|id| !ids.contains(id)).count();
    eprintln!(
        "cluster: {} tasks acknowledged, {send_failures} sends retried, \
         {} missing, {} not final, {} final but not succeeded, {ran_more_than_once} ran more than once, \
         {unexpected} rows never acknowledged; load {load_time:.1?}, drain {drain_time:.1?}, rejoins {rejoins:?}",
        ids.len(),
        missing.len(),
        not_final.len(),
        not_succeeded.len() - not_final.len(),
    );
    let context =
        || format!("{}\n{}", fleet.logs(), (0..CLUSTER_SIZE).map(|i| tail(&cluster.log(i))).collect::<String>());
    assert!(ids.len() >= 1000, "only {} tasks acknowledged in the whole run\n{}", ids.len(), context());
    assert!(
        missing.is_empty(),
        "{} acknowledged tasks have no row, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(5)],
        context()
    );
    assert!(
        not_succeeded.is_empty(),
        "{} acknowledged tasks did not succeed, e.g. {:?}\n{}",
        not_succeeded.len(),
        &not_succeeded[..not_succeeded.len().min(5)],
        context()
    );
    for p in fleet.coordinator.iter_mut().chain(fleet.workers.iter_mut()) {
        assert!(p.is_running(), "{} exited\n{}", p.name, p.log());
    }
}

/// The fleet's streams whose leader is the server `name`.
async fn leaders(client: &async_nats::Client, subjects: &taskfleet_proto::Subjects, name: &str) -> Vec<String> {
    let js = async_nats::jetstream::new(client.clone());
    let mut led = Vec::new();
    for stream in [subjects.submit_stream(), subjects.dispatch_stream(), subjects.events_stream()] {
        let leader = match js.get_stream(&stream).await {
            Ok(s) => s.cached_info().cluster.as_ref().and_then(|c| c.leader.clone()),
            Err(_) => None,
        };
        if leader.as_deref() == Some(name) {
            led.push(stream);
        }
    }
    led
}

/// The last lines of a nats-server log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n") + "\n"
}
