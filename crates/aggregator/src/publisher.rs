//! The snapshot publisher: every second it moves the live window on, evaluates the alert
//! rules when they are due, updates the fleet gauges, and publishes the `/v1/stats` snapshot
//! (served over HTTP and sent on `<prefix>.stats`).

use crate::{Ctx, lock};
use std::sync::Arc;
use std::time::Duration;
use taskfleet_proto::{Figures, Snapshot, WorkerFigures, now_ms};
use tokio_util::sync::CancellationToken;

/// Publishes a snapshot every second, and alert changes every `aggregator.alert_interval`,
/// until shutdown.
pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let cfg = &ctx.config.aggregator;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_alerts = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = now_ms();
        let (fleet, series, workers, history) = {
            let mut s = lock(&ctx.stats);
            s.tick(now);
            let (fleet, series) = s.figures(now);
            (fleet, series, s.workers(), s.history())
        };
        let runs = {
            let mut r = lock(&ctx.runs);
            r.tick(now);
            r.figures(now)
        };
        if last_alerts.elapsed() >= cfg.alert_interval {
            last_alerts = tokio::time::Instant::now();
            publish_alert_changes(&ctx, &fleet, &workers, now).await;
        }
        export_gauges(&fleet);
        let alerts = lock(&ctx.alerts).latest();
        let snapshot = Snapshot {
            generated_at: now,
            window_s: cfg.window.as_secs(),
            fleet,
            series,
            workers,
            alerts,
            history,
            runs,
        };
        publish_snapshot(&ctx, &snapshot).await;
    }
}

/// Evaluates the alert rules and logs, counts and publishes every change of state.
async fn publish_alert_changes(ctx: &Ctx, fleet: &Figures, workers: &[WorkerFigures], now: u64) {
    let changes = lock(&ctx.alerts).evaluate(fleet, workers, now);
    for alert in changes {
        tracing::warn!(rule = %alert.rule, state = ?alert.state, value = alert.value, "{}", alert.message);
        metrics::counter!("taskfleet_aggregator_alerts_total", "rule" => alert.rule.clone()).increment(1);
        if let Ok(body) = serde_json::to_vec(&alert) {
            let _ = ctx.client.publish(ctx.topology.subjects.alerts(), body.into()).await;
        }
    }
}

/// Keeps the snapshot for `/v1/stats` and sends it on `<prefix>.stats`.
async fn publish_snapshot(ctx: &Ctx, snapshot: &Snapshot) {
    if let Ok(body) = serde_json::to_vec(snapshot) {
        let body = Arc::new(body);
        *lock(&ctx.snapshot) = body.clone();
        let _ = ctx.client.publish(ctx.topology.subjects.stats(), body.as_ref().clone().into()).await;
    }
}

/// Fleet-level gauges of the live window.
fn export_gauges(fleet: &Figures) {
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
