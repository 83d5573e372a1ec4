//! `taskfleet-aggregator`: reads every task event through its own durable consumer and turns
//! them into Prometheus metrics (`/metrics`) and a JSON summary (`/v1/stats`): events by queue,
//! kind and outcome, queue wait, run time and end-to-end latency, cache hits, tokens and cost.

// mimalloc, as in the other services: cheaper than glibc malloc for small, short-lived allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use axum::{Json, Router, routing::get};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use taskfleet_bus::Topology;
use taskfleet_proto::{EventBatch, EventKind, TaskEvent, decode, headers};
use taskfleet_service::Service;

/// Name of the aggregator's durable consumer on the event stream.
const CONSUMER: &str = "aggregator";

/// Running totals served at `/v1/stats`.
#[derive(Debug, Default, Serialize)]
struct Totals {
    /// Events by kind (`succeeded`, `failed`, …).
    events: BTreeMap<String, u64>,
    /// Final outcomes by `queue/kind`.
    outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    /// Results served from the cache.
    cache_hits: u64,
    /// Prompt plus completion tokens.
    tokens: u64,
    /// Spend in US dollars.
    cost_usd: f64,
}

fn observe(totals: &Mutex<Totals>, ev: &TaskEvent) {
    let kind = ev.kind.as_str();
    metrics::counter!("taskfleet_task_events_total", "queue" => ev.queue.clone(), "kind" => ev.task_kind.clone(), "event" => kind)
        .increment(1);
    if let Some(t) = ev.timings.filter(|t| t.finished_at > 0) {
        let labels = [
            ("queue", ev.queue.clone()),
            ("kind", ev.task_kind.clone()),
            ("priority", ev.priority.as_str().to_string()),
        ];
        metrics::histogram!("taskfleet_task_queue_wait_seconds", &labels)
            .record(t.started_at.saturating_sub(t.created_at) as f64 / 1e3);
        metrics::histogram!("taskfleet_task_run_seconds", &labels)
            .record(t.finished_at.saturating_sub(t.started_at) as f64 / 1e3);
        if ev.kind.is_final() {
            metrics::histogram!("taskfleet_task_end_to_end_seconds", &labels)
                .record(t.finished_at.saturating_sub(t.created_at) as f64 / 1e3);
        }
    }
    let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
    *t.events.entry(kind.to_string()).or_default() += 1;
    if ev.kind.is_final() || ev.kind == EventKind::Rejected {
        *t.outcomes
            .entry(format!("{}/{}", ev.queue, ev.task_kind))
            .or_default()
            .entry(kind.to_string())
            .or_default() += 1;
    }
    if ev.cache_hit {
        t.cache_hits += 1;
    }
    if let Some(tok) = ev.tokens {
        t.tokens += tok.prompt + tok.completion;
    }
    if let Some(c) = ev.cost_usd {
        t.cost_usd += c;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = Service::start("taskfleet-aggregator")?;
    let config = service.config.clone();
    let connecting = taskfleet_bus::connect(&config.nats, "taskfleet-aggregator", Duration::from_secs(60));
    let Some(client) = service.until_shutdown(connecting).await else { return Ok(()) };
    let client = client?;
    let topology = Topology::new(client.clone(), &config.nats);
    topology.ensure_streams().await?;

    let totals = Arc::new(Mutex::new(Totals::default()));
    let ready = Arc::new(AtomicBool::new(true));
    let routes = Router::new().route(
        "/v1/stats",
        get({
            let totals = totals.clone();
            move || {
                let body = serde_json::to_value(&*totals.lock().unwrap_or_else(|p| p.into_inner())).unwrap_or_default();
                async move { Json(body) }
            }
        }),
    );
    let http = service
        .serve_http(
            &config.aggregator.http_addr,
            {
                let r = ready.clone();
                move || r.load(Ordering::Relaxed)
            },
            routes,
        )
        .await?;

    tracing::info!("aggregator running");
    taskfleet_bus::consume_batches(
        "aggregator events",
        256,
        service.shutdown.cancelled(),
        || topology.events_consumer(CONSUMER, topology.subjects.events_all(), 4096),
        |msgs| {
            let totals = totals.clone();
            async move {
                for msg in msgs {
                    let ct =
                        msg.headers.as_ref().and_then(|h| h.get(headers::CONTENT_TYPE)).map(|v| v.as_str().to_string());
                    match decode::<EventBatch>(&msg.payload, ct.as_deref(), 64 << 20) {
                        Ok(batch) => batch.events.iter().for_each(|ev| observe(&totals, ev)),
                        Err(e) => {
                            metrics::counter!("taskfleet_aggregator_malformed_events_total").increment(1);
                            tracing::warn!(error = %e, "undecodable event message");
                        }
                    }
                    let _ = msg.ack().await;
                }
            }
        },
    )
    .await;
    ready.store(false, Ordering::Relaxed);
    let _ = http.await;
    service.finish();
    Ok(())
}
