//! `taskfleet-aggregator`: reads every task event through its own durable consumer and every
//! worker's status reports, and serves the fleet's live figures: a dashboard (`/`), a JSON
//! snapshot (`/v1/stats`, also published every second on `<prefix>.stats`), Prometheus
//! `/metrics`, and alerts (`<prefix>.alerts`). Per-minute rollups go to Postgres, so totals and
//! history survive a restart; events are acknowledged once their rollup is written.

// mimalloc, as in the other services: cheaper than glibc malloc for small, short-lived allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use async_nats::jetstream::AckKind;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::{Router, routing::get};
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use taskfleet_aggregator::Snapshot;
use taskfleet_aggregator::alerts::Alerts;
use taskfleet_aggregator::stats::Stats;
use taskfleet_bus::Topology;
use taskfleet_proto::{EventBatch, WorkerStatus, decode, headers, now_ms};
use taskfleet_service::Service;
use taskfleet_store::Store;

/// Name of the aggregator's durable consumer on the event stream.
const CONSUMER: &str = "aggregator";

/// Events counted but not yet written to Postgres, with the acknowledgement subjects of the
/// messages that carried them (only the subjects: a held message's body would keep up to a
/// megabyte of results in memory until the next flush).
struct Shared {
    stats: Mutex<Stats>,
    held: Mutex<Vec<async_nats::Subject>>,
    snapshot: Mutex<Arc<Vec<u8>>>,
    alerts: Mutex<Alerts>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = Service::start("taskfleet-aggregator")?;
    let config = service.config.clone();
    let cfg = config.aggregator.clone();
    let connecting = taskfleet_bus::connect(&config.nats, "taskfleet-aggregator", Duration::from_secs(60));
    let Some(client) = service.until_shutdown(connecting).await else { return Ok(()) };
    let client = client?;
    let Some(store) = service.until_shutdown(Store::connect(&config.database)).await else { return Ok(()) };
    let store = store?;
    let topology = Topology::new(client.clone(), &config.nats);
    topology.ensure_streams().await?;

    let now = now_ms();
    let mut stats = Stats::new(
        cfg.window.as_millis() as u64,
        cfg.history.as_millis() as u64,
        cfg.worker_timeout.as_millis() as u64,
        now,
    );
    match (store.rollup_totals().await, store.rollups_since((now - cfg.history.as_millis() as u64) as i64).await) {
        (Ok(totals), Ok(recent)) => {
            tracing::info!(series = totals.len(), minutes = recent.len(), "restored totals and history from rollups");
            stats.restore(totals, recent);
        }
        (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "cannot read earlier rollups; starting from zero"),
    }
    let shared = Arc::new(Shared {
        stats: Mutex::new(stats),
        held: Mutex::new(Vec::new()),
        snapshot: Mutex::new(Arc::new(b"{}".to_vec())),
        alerts: Mutex::new(Alerts::new(config.aggregator.enabled_alert_rules(), cfg.alert_min_samples)),
    });

    let ready = Arc::new(AtomicBool::new(true));
    let routes = Router::new().route("/", get(|| async { Html(include_str!("dashboard.html")) })).route(
        "/v1/stats",
        get({
            let shared = shared.clone();
            move || {
                let body = lock(&shared.snapshot).clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], body.as_ref().clone()).into_response() }
            }
        }),
    );
    let http = service
        .serve_http(
            &cfg.http_addr,
            {
                let r = ready.clone();
                move || r.load(Ordering::Relaxed)
            },
            routes,
        )
        .await?;

    // Worker status reports.
    let statuses = {
        let shared = shared.clone();
        let mut sub = client.subscribe(topology.subjects.worker_status()).await?;
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                match serde_json::from_slice::<WorkerStatus>(&msg.payload) {
                    Ok(status) => lock(&shared.stats).worker_status(status),
                    Err(e) => tracing::debug!(error = %e, "unreadable worker status"),
                }
            }
        })
    };

    // Snapshots every second, alerts every alert_interval.
    let ticker = {
        let (shared, client, subjects) = (shared.clone(), client.clone(), topology.subjects.clone());
        let (window_s, alert_every) = (cfg.window.as_secs(), cfg.alert_interval);
        let stop = service.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last_alerts = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let now = now_ms();
                let (fleet, series, workers, history) = {
                    let mut s = lock(&shared.stats);
                    s.tick(now);
                    let (fleet, series) = s.figures(now);
                    (fleet, series, s.workers(), s.history())
                };
                if last_alerts.elapsed() >= alert_every {
                    last_alerts = tokio::time::Instant::now();
                    let changes = lock(&shared.alerts).evaluate(&fleet, &workers, now);
                    for alert in changes {
                        tracing::warn!(rule = %alert.rule, state = ?alert.state, value = alert.value, "{}", alert.message);
                        metrics::counter!("taskfleet_aggregator_alerts_total", "rule" => alert.rule.clone())
                            .increment(1);
                        if let Ok(body) = serde_json::to_vec(&alert) {
                            let _ = client.publish(subjects.alerts(), body.into()).await;
                        }
                    }
                }
                export_gauges(&fleet);
                let snapshot = Snapshot {
                    generated_at: now,
                    window_s,
                    fleet,
                    series,
                    workers,
                    alerts: lock(&shared.alerts).latest(),
                    history,
                };
                if let Ok(body) = serde_json::to_vec(&snapshot) {
                    let body = Arc::new(body);
                    *lock(&shared.snapshot) = body.clone();
                    let _ = client.publish(subjects.stats(), body.as_ref().clone().into()).await;
                }
            }
        })
    };

    // Rollups to Postgres every flush_interval; the events they hold are acknowledged after.
    let flusher = {
        let (shared, store, client) = (shared.clone(), store.clone(), client.clone());
        // Held events must be acknowledged well within ack_wait, or JetStream redelivers them.
        let every = cfg.flush_interval.min(config.nats.ack_wait / 3);
        let stop = service.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    _ = stop.cancelled() => true,
                };
                flush(&shared, &store, &client).await;
                if stopping {
                    return;
                }
            }
        })
    };

    tracing::info!("aggregator running");
    taskfleet_bus::consume_batches(
        "aggregator events",
        256,
        // Bodies are dropped once counted (only ack subjects are held), so this bounds the
        // decoded batch in memory; a pull must fit the largest message the server takes.
        (8 << 20).max(2 * client.server_info().max_payload),
        service.shutdown.cancelled(),
        || topology.events_consumer(CONSUMER, topology.subjects.events_all(), 8192),
        |msgs| {
            let shared = shared.clone();
            async move {
                let now = now_ms();
                let mut events = 0u64;
                let mut keep = Vec::with_capacity(msgs.len());
                {
                    let mut stats = lock(&shared.stats);
                    for msg in msgs {
                        let ct = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(headers::CONTENT_TYPE))
                            .map(|v| v.as_str().to_string());
                        match decode::<EventBatch>(&msg.payload, ct.as_deref(), 64 << 20) {
                            Ok(batch) => {
                                events += batch.events.len() as u64;
                                for ev in &batch.events {
                                    stats.observe(ev, now);
                                    observe_prometheus(ev);
                                }
                                if let Some(reply) = msg.reply.clone() {
                                    keep.push(reply);
                                }
                            }
                            Err(e) => {
                                metrics::counter!("taskfleet_aggregator_malformed_events_total").increment(1);
                                tracing::warn!(error = %e, "undecodable event message, terminating it");
                                tokio::spawn(async move {
                                    let _ = msg.ack_with(AckKind::Term).await;
                                });
                            }
                        }
                    }
                    lock(&shared.held).extend(keep);
                }
                metrics::counter!("taskfleet_aggregator_events_total").increment(events);
            }
        },
    )
    .await;
    ready.store(false, Ordering::Relaxed);
    let _ = flusher.await;
    ticker.abort();
    statuses.abort();
    let _ = http.await;
    service.finish();
    Ok(())
}

/// Writes the pending rollups and acknowledges the events they hold; on failure keeps both
/// (the rows are written with the next flush, the messages get an in-progress ack so they are
/// not redelivered meanwhile).
async fn flush(shared: &Shared, store: &Store, client: &async_nats::Client) {
    let (rows, held) = {
        let mut stats = lock(&shared.stats);
        let held = std::mem::take(&mut *lock(&shared.held));
        (stats.take_pending(), held)
    };
    if rows.is_empty() && held.is_empty() {
        return;
    }
    match store.insert_rollups(&rows).await {
        Ok(()) => {
            metrics::counter!("taskfleet_aggregator_rollups_written_total").increment(rows.len() as u64);
            for reply in held {
                let _ = client.publish(reply, "+ACK".into()).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, rows = rows.len(), "cannot write rollups; keeping them for the next flush");
            for reply in &held {
                let _ = client.publish(reply.clone(), "+WPI".into()).await;
            }
            lock(&shared.stats).restore_pending(rows);
            let mut h = lock(&shared.held);
            let newer = std::mem::take(&mut *h);
            *h = held;
            h.extend(newer);
        }
    }
}

/// Prometheus histograms and counters per queue, kind and priority (seconds, as Prometheus
/// names them).
fn observe_prometheus(ev: &taskfleet_proto::TaskEvent) {
    let labels =
        [("queue", ev.queue.clone()), ("kind", ev.task_kind.clone()), ("priority", ev.priority.as_str().to_string())];
    metrics::counter!(
        "taskfleet_task_events_total",
        &[&labels[..], &[("event", ev.kind.as_str().to_string())]].concat()
    )
    .increment(1);
    if let Some(t) = ev.timings.filter(|t| t.finished_at > 0 && t.started_at > 0) {
        if ev.attempt == 1 {
            metrics::histogram!("taskfleet_task_queue_wait_seconds", &labels)
                .record(t.started_at.saturating_sub(t.created_at) as f64 / 1e3);
        }
        metrics::histogram!("taskfleet_task_run_seconds", &labels)
            .record(t.finished_at.saturating_sub(t.started_at) as f64 / 1e3);
        if ev.kind.is_final() {
            metrics::histogram!("taskfleet_task_end_to_end_seconds", &labels)
                .record(t.finished_at.saturating_sub(t.created_at) as f64 / 1e3);
        }
    }
    if ev.cache_hit {
        metrics::counter!("taskfleet_task_cache_hits_total", &labels).increment(1);
    }
    if let Some(tok) = ev.tokens {
        metrics::counter!("taskfleet_task_tokens_total", &[&labels[..], &[("type", "prompt".to_string())]].concat())
            .increment(tok.prompt);
        metrics::counter!(
            "taskfleet_task_tokens_total",
            &[&labels[..], &[("type", "completion".to_string())]].concat()
        )
        .increment(tok.completion);
    }
    if let Some(c) = ev.cost_usd {
        metrics::counter!("taskfleet_task_cost_microdollars_total", &labels).increment((c * 1e6).round() as u64);
    }
}

/// Fleet-level gauges of the live window.
fn export_gauges(fleet: &taskfleet_aggregator::stats::Figures) {
    metrics::gauge!("taskfleet_fleet_throughput_tasks_per_second").set(fleet.throughput_per_s);
    metrics::gauge!("taskfleet_fleet_workers").set(fleet.workers.unwrap_or(0) as f64);
    metrics::gauge!("taskfleet_fleet_utilization_ratio").set(fleet.utilization.unwrap_or(0.0));
    if let Some(r) = fleet.error_rate {
        metrics::gauge!("taskfleet_fleet_error_ratio").set(r);
    }
    if let Some(r) = fleet.cache_hit_rate {
        metrics::gauge!("taskfleet_fleet_cache_hit_ratio").set(r);
    }
    if let Some(p) = fleet.end_to_end_ms.p95 {
        metrics::gauge!("taskfleet_fleet_end_to_end_p95_seconds").set(p / 1e3);
    }
}
