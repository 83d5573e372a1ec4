//! `taskfleet bench latency`: per-task latency at a steady, low rate; `taskfleet bench events`:
//! synthetic events for measuring the aggregator.

use crate::client::Fleet;
use anyhow::anyhow;
use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskfleet_bus::{decode_message, send_submission};
use taskfleet_proto::{
    CONTENT_TYPE_MSGPACK, CommittedBatch, EventBatch, MAX_MESSAGE_BYTES, Priority, TaskEnvelope, encode, headers,
};

#[derive(clap::Args)]
pub struct LatencyArgs {
    /// Tasks to send.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Tasks per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Task kind (`echo` measures the fleet's own overhead).
    #[arg(long, default_value = "echo")]
    kind: String,
    /// Queue.
    #[arg(long, default_value = "default")]
    queue: String,
    /// Priority.
    #[arg(long, default_value = "normal")]
    priority: Priority,
}

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Events to publish.
    #[arg(long, default_value_t = 1_000_000)]
    count: usize,
    /// Events per message (a busy worker sends up to 500).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Queue.
    #[arg(long, default_value = "default")]
    queue: String,
}

/// Publishes `count` `succeeded` events with realistic timings, `batch` per message, over the
/// four priority lanes and four kinds.
pub async fn events(fleet: &Fleet, args: EventsArgs) -> anyhow::Result<i32> {
    use taskfleet_proto::{EventKind, TaskEvent, Timings, now_ms};
    let start = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut sent = 0usize;
    while sent < args.count {
        let n = args.batch.max(1).min(args.count - sent);
        let priority = Priority::ALL[(sent / n) % 4];
        let now = now_ms();
        let events: Vec<TaskEvent> = (0..n)
            .map(|i| {
                let mut ev = TaskEvent::new(uuid::Uuid::now_v7(), EventKind::Succeeded, &args.queue);
                ev.task_kind = ["echo", "http", "llm.chat", "sleep"][(sent + i) % 4].to_string();
                ev.priority = priority;
                ev.attempt = 1;
                let e2e = ((sent + i) % 200) as u64;
                ev.timings = Some(Timings {
                    created_at: now - e2e,
                    received_at: now - e2e / 2,
                    started_at: now - e2e / 3,
                    finished_at: now,
                });
                ev
            })
            .collect();
        let mut h = HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, CONTENT_TYPE_MSGPACK);
        let body = Bytes::from(encode(&EventBatch { v: taskfleet_proto::PROTOCOL_VERSION, events }));
        let ack = fleet
            .js
            .send_publish(
                fleet.subjects.events(&args.queue, priority),
                PublishMessage::build().payload(body).headers(h),
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
        acks.push(ack.into_future());
        while acks.len() > 256 {
            if let Some(r) = acks.next().await {
                r.map_err(|e| anyhow!("{e}"))?;
            }
        }
        sent += n;
    }
    while let Some(r) = acks.next().await {
        r.map_err(|e| anyhow!("{e}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("published {sent} events in {secs:.2}s ({:.0} events/s)", sent as f64 / secs);
    Ok(0)
}

/// The `q` quantile (0..=1) of `v`, sorting it; NaN when empty.
pub(crate) fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
}

fn summary(name: &str, mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return format!("{name}: no samples");
    }
    let [p50, p90, p99, max] = [0.5, 0.9, 0.99, 1.0].map(|q| percentile(&mut v, q));
    format!("{name:<34} n={:<6} p50 {p50:>7.2} ms  p90 {p90:>7.2} ms  p99 {p99:>7.2} ms  max {max:>7.2} ms", v.len(),)
}

/// Sends `count` tasks at `rate`, one at a time, and measures for each, on this process's
/// clock: submit → its event is published by the worker (dispatch, run, event), and submit →
/// its final state is committed in Postgres (the durable end to end).
pub async fn latency(fleet: &Fleet, args: LatencyArgs) -> anyhow::Result<i32> {
    let sent: Arc<Mutex<HashMap<uuid::Uuid, Instant>>> = Arc::default();
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<(uuid::Uuid, Instant)>();
    let (cm_tx, mut cm_rx) = tokio::sync::mpsc::unbounded_channel::<(uuid::Uuid, Instant)>();
    let mut events =
        fleet.client.subscribe(fleet.subjects.events_of_queue(&args.queue)).await.map_err(|e| anyhow!("{e}"))?;
    let mut committed =
        fleet.client.subscribe(fleet.subjects.committed(&args.queue)).await.map_err(|e| anyhow!("{e}"))?;
    tokio::spawn(async move {
        while let Some(m) = events.next().await {
            let at = Instant::now();
            if let Ok(b) = decode_message::<EventBatch>(&m, MAX_MESSAGE_BYTES) {
                for e in b.events.into_iter().filter(|e| e.kind.is_final()) {
                    let _ = ev_tx.send((e.task_id, at));
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(m) = committed.next().await {
            let at = Instant::now();
            if let Ok(b) = decode_message::<CommittedBatch>(&m, MAX_MESSAGE_BYTES) {
                for t in b.tasks {
                    let _ = cm_tx.send((t.id, at));
                }
            }
        }
    });

    let gap = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let mut tick = tokio::time::interval(gap);
    for i in 0..args.count {
        tick.tick().await;
        let env = TaskEnvelope::new(&args.kind, serde_json::json!({ "i": i }))
            .with_queue(&args.queue)
            .with_priority(args.priority);
        if let Ok(mut s) = sent.lock() {
            s.insert(env.id, Instant::now());
        }
        // Fire and forget: the acknowledgement is awaited in the background so that the rate holds.
        let submission = send_submission(&fleet.js, &fleet.subjects, &env, HeaderMap::new()).await?;
        tokio::spawn(async move {
            if let Err(e) = submission.stored().await {
                eprintln!("submission not stored: {e}");
            }
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut ev_lat, mut cm_lat) = (Vec::new(), Vec::new());
    while cm_lat.len() < args.count || ev_lat.len() < args.count {
        tokio::select! {
            Some((id, at)) = ev_rx.recv() => {
                if let Some(t0) = sent.lock().ok().and_then(|s| s.get(&id).copied()) { ev_lat.push(at.duration_since(t0).as_secs_f64() * 1e3) }
            }
            Some((id, at)) = cm_rx.recv() => {
                if let Some(t0) = sent.lock().ok().and_then(|s| s.get(&id).copied()) { cm_lat.push(at.duration_since(t0).as_secs_f64() * 1e3) }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    println!("{} {} tasks at {}/s, queue {}, priority {}", args.count, args.kind, args.rate, args.queue, args.priority);
    println!("{}", summary("submit -> worker's event published", ev_lat));
    println!("{}", summary("submit -> final state committed", cm_lat));
    Ok(0)
}
