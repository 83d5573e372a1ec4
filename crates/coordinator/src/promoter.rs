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
    let beat = ctx.liveness.register("promoter", crate::periodic_max_silence(longest));
    loop {
        beat.tick();
        let sleep = match promote_due(&ctx).await {
            // A full claim: more may be due.
            Ok(n) if n as i64 >= CLAIM_LIMIT => Duration::ZERO,
            // At least a moment: a due row another coordinator holds locked is not ours to wait on.
            Ok(_) => pause_until_due(until_next_due(&ctx).await, longest),
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
    time_until(ctx.store.next_due().await.ok().flatten(), SystemTime::now())
}

/// Time from `now` until `due` (none when it has passed); an hour when nothing is due.
fn time_until(due: Option<SystemTime>, now: SystemTime) -> Duration {
    due.map_or(Duration::from_secs(3600), |at| at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The sleep after a claim that was not full: until the next due row, but at least a moment (a
/// due row another coordinator holds locked is not ours to wait on) and at most `longest`.
fn pause_until_due(until_due: Duration, longest: Duration) -> Duration {
    until_due.max(Duration::from_millis(20)).min(longest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_promoter_sleeps_until_the_next_due_row_within_its_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let longest = Duration::from_secs(1);
        let after = |ms| pause_until_due(time_until(Some(now + Duration::from_millis(ms)), now), longest);
        assert_eq!(after(300), Duration::from_millis(300));
        assert_eq!(after(5_000), longest);
        assert_eq!(after(0), Duration::from_millis(20), "a due row another coordinator holds is not spun on");
        let overdue = pause_until_due(time_until(Some(now - Duration::from_secs(5)), now), longest);
        assert_eq!(overdue, Duration::from_millis(20));
        assert_eq!(pause_until_due(time_until(None, now), longest), longest, "nothing due: the longest sleep");
    }
}
