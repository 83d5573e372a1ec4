//! The rescuer under sustained load: while tasks stream in faster than the workers drain them
//! (so no lane is ever empty), dispatch messages are deleted from JetStream on purpose. Every
//! task must still end once, and the lost ones must be dispatched again while the load goes
//! on, not after it. In a test binary of its own: it measures times.
//!
//! `TASKFLEET_RESCUE_RATE` (tasks/s, default 200), `TASKFLEET_RESCUE_SECS` (default 8),
//! `TASKFLEET_RESCUE_SLEEP_MS` (each task's run time, default 40) and
//! `TASKFLEET_RESCUE_CONCURRENCY` (per worker, two workers, default 3) shape the load; run it
//! with `cargo test --release` against release binaries for thousands of tasks per second.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};
use taskfleet_bus::send_submission;
use taskfleet_e2e::Fleet;
use taskfleet_proto::{Priority, TaskEnvelope, decode};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_dispatches_are_rescued_while_the_load_goes_on() {
    let rate = env_or("TASKFLEET_RESCUE_RATE", 200);
    let secs = env_or("TASKFLEET_RESCUE_SECS", 8);
    let sleep_ms = env_or("TASKFLEET_RESCUE_SLEEP_MS", 40);
    let concurrency = env_or("TASKFLEET_RESCUE_CONCURRENCY", 3).to_string();
    let mut fleet = Fleet::new("rescue_load");
    fleet
        .set("TASKFLEET_COORDINATOR_RESCUE_INTERVAL", "1s")
        .set("TASKFLEET_COORDINATOR_RESCUE_IDLE", "2s")
        .set("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", &concurrency)
        .set("TASKFLEET_WORKER_PREFETCH", "4");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let js = async_nats::jetstream::new(client.clone());
    let subjects = fleet.subjects();

    // The load, in its own task: `rate` tasks per second in ticks of 50 ms.
    let total = rate * secs;
    let loader = {
        let (js, subjects) = (js.clone(), subjects.clone());
        tokio::spawn(async move {
            let per_tick = (rate / 20).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut sent = 0;
            while sent < total {
                tick.tick().await;
                let mut acks = Vec::new();
                for _ in 0..per_tick.min(total - sent) {
                    let env = TaskEnvelope::new("sleep", serde_json::json!({ "ms": sleep_ms }))
                        .with_priority(Priority::ALL[(sent % 2) as usize + 1]);
                    let submission = send_submission(&js, &subjects, &env, async_nats::HeaderMap::new()).await;
                    acks.push(submission.expect("publish"));
                    sent += 1;
                }
                for a in acks {
                    a.stored().await.expect("stored");
                }
            }
            SystemTime::now()
        })
    };

    // Meanwhile, delete dispatch messages waiting in the stream: lost as if a server lost them.
    let mut lost: HashSet<uuid::Uuid> = HashSet::new();
    let mut stream = js.get_stream(subjects.dispatch_stream()).await.expect("dispatch stream");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs / 2) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let state = stream.info().await.expect("stream info").state.clone();
        if state.messages < 20 {
            continue;
        }
        // The newest messages wait longest for a worker: take a few of them.
        for seq in (state.last_sequence.saturating_sub(10)..=state.last_sequence).step_by(3) {
            let Ok(raw) = stream.get_raw_message(seq).await else { continue };
            let Ok(env) = decode::<TaskEnvelope>(&raw.payload, None, 1 << 20) else { continue };
            if stream.delete_message(seq).await.unwrap_or(false) {
                lost.insert(env.id);
            }
        }
    }
    let load_ended = loader.await.expect("loader");
    assert!(!lost.is_empty(), "the load built no backlog to lose messages from; raise TASKFLEET_RESCUE_RATE");

    let counts = fleet.wait_final(&pool, total as i64, Duration::from_secs(120)).await;
    assert_eq!(counts.get("succeeded"), Some(&(total as i64)), "{counts:?}");
    let lost_ids: Vec<uuid::Uuid> = lost.iter().copied().collect();
    let rows: Vec<(i32, f64, f64)> = sqlx::query_as(
        "SELECT dispatches, extract(epoch FROM dispatched_at)::float8, extract(epoch FROM submitted_at)::float8
         FROM tasks WHERE id = ANY($1)",
    )
    .bind(&lost_ids)
    .fetch_all(&pool)
    .await
    .expect("lost rows");
    let ended = load_ended.duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs_f64();
    // A message deleted after a worker had pulled it was not lost: that task ran from it.
    let rescued: Vec<&(i32, f64, f64)> = rows.iter().filter(|(d, _, _)| *d >= 2).collect();
    let worst = rescued.iter().map(|(_, rescued, submitted)| rescued - submitted).fold(0.0, f64::max);
    let during = rescued.iter().filter(|(_, rescued, _)| *rescued < ended).count();
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT task_id FROM task_attempts GROUP BY task_id HAVING count(*) > 1) x",
    )
    .fetch_one(&pool)
    .await
    .expect("attempt counts");
    println!(
        "rescue under load: {total} tasks at {rate}/s, {} dispatch messages deleted ({} before a worker had them); \
         all {total} succeeded; submission → rescue dispatch: worst {worst:.1} s; {during} rescued before the load \
         ended; {twice} ran twice",
        lost.len(),
        rescued.len()
    );
    assert!(!rescued.is_empty(), "no deleted message was waiting in the stream");
    assert!(during > 0, "lost tasks were only rescued after the load ended");
    // Rescue interval (1 s) + margin (2 s) + the time for the lane's floor to pass the message.
    assert!(worst < 15.0, "a lost task waited {worst:.1} s for its rescue");
    assert_eq!(twice, 0, "a rescued task ran twice");
}
