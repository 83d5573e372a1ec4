//! The promoter: dispatches retries and deferrals once they are due. A worker whose handler
//! asks for another attempt (or that cannot start a task for longer than it holds tasks)
//! acknowledges the message and reports `retrying` (`deferred`) with a delay; the recorder
//! stores `run_at`, and this loop publishes the next dispatch generation when it comes.
//! Waiting retries thus live in Postgres, hold no worker slot, survive any restart, and never
//! use up JetStream deliveries.
//!
//! No leader: every coordinator runs the loop, and claims due rows with
//! `FOR UPDATE SKIP LOCKED` in a transaction that commits only after the dispatch is stored in
//! JetStream, so two coordinators never dispatch the same generation and a failed publish
//! leaves the rows to be claimed again.

use crate::{Ctx, dispatch};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Tasks dispatched per claim, at most.
const CLAIM_LIMIT: i64 = 1_000;

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let longest = ctx.config.coordinator.promote_interval;
    loop {
        let sleep = match promote_due(&ctx).await {
            // A full claim: more may be due.
            Ok(n) if n as i64 >= CLAIM_LIMIT => Duration::ZERO,
            // At least a moment: a due row another coordinator holds locked is not ours to wait on.
            Ok(_) => until_next_due(&ctx).await.max(Duration::from_millis(20)).min(longest),
            Err(e) => {
                tracing::warn!(error = %e, "cannot dispatch due retries; will try again");
                longest
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(sleep) => {}
            _ = ctx.retries_recorded.notified() => {}
        }
    }
}

async fn promote_due(ctx: &Ctx) -> anyhow::Result<usize> {
    let claimed = ctx.store.claim_due(CLAIM_LIMIT).await?;
    let n = dispatch::publish_claimed(&ctx.topology, claimed).await?;
    if n > 0 {
        tracing::debug!(tasks = n, "dispatched due retries and deferrals");
        metrics::counter!("taskfleet_coordinator_promoted_total").increment(n as u64);
    }
    Ok(n)
}

/// Time until the earliest waiting retry or deferral; long when there is none.
async fn until_next_due(ctx: &Ctx) -> Duration {
    match ctx.store.next_due().await {
        Ok(Some(at)) => at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO),
        Ok(None) | Err(_) => Duration::from_secs(3600),
    }
}
