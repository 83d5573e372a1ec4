//! The flusher: writes the per-minute rollups to Postgres every `aggregator.flush_interval`
//! and then acknowledges the events they hold; at start, the rollups of earlier runs give back
//! the totals and history.

use crate::{Ctx, lock};
use std::sync::Arc;
use taskfleet_aggregator::stats::Stats;
use taskfleet_config::AggregatorConfig;
use taskfleet_proto::now_ms;
use taskfleet_store::Store;
use tokio_util::sync::CancellationToken;

/// Empty live figures with the totals and history of earlier runs (from zero when Postgres
/// cannot say).
pub(crate) async fn restored_stats(cfg: &AggregatorConfig, store: &Store) -> Stats {
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
    stats
}

/// Flushes every `flush_interval` (at most a third of `ack_wait`: held events must be
/// acknowledged well before JetStream redelivers them), and once more at shutdown.
pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let every = ctx.config.aggregator.flush_interval.min(ctx.config.nats.ack_wait / 3);
    // Five intervals plus a minute for a slow flush (Postgres' 10 s acquire timeout per try).
    let beat = ctx.liveness.register("flusher", every * 5 + std::time::Duration::from_secs(60));
    loop {
        beat.tick();
        let stopping = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = shutdown.cancelled() => true,
        };
        flush(&ctx).await;
        if stopping {
            return;
        }
    }
}

/// Writes the pending rollups and acknowledges the events they hold; on failure keeps both
/// (the rows are written with the next flush, the messages get an in-progress ack so they are
/// not redelivered meanwhile).
async fn flush(ctx: &Ctx) {
    let (rows, held) = {
        let mut stats = lock(&ctx.stats);
        let held = std::mem::take(&mut *lock(&ctx.held));
        (stats.take_pending(), held)
    };
    if rows.is_empty() && held.is_empty() {
        return;
    }
    match ctx.store.insert_rollups(&rows).await {
        Ok(()) => {
            metrics::counter!("taskfleet_aggregator_rollups_written_total").increment(rows.len() as u64);
            for reply in held {
                let _ = ctx.client.publish(reply, "+ACK".into()).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, rows = rows.len(), "cannot write rollups; keeping them for the next flush");
            for reply in &held {
                let _ = ctx.client.publish(reply.clone(), "+WPI".into()).await;
            }
            lock(&ctx.stats).restore_pending(rows);
            let mut h = lock(&ctx.held);
            let newer = std::mem::take(&mut *h);
            *h = held;
            h.extend(newer);
        }
    }
}
