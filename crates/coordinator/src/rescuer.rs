//! The rescuer: a timer that finds tasks Postgres shows in flight but JetStream no longer
//! holds (a dispatch message lost with a nats-server, one that exhausted `max_deliver` without
//! ever running, a dispatch publish that failed after the commit) and dispatches them again,
//! so that a lost message costs a re-run, never a task. It also releases pending tasks whose
//! dependencies have all succeeded if their release was missed.
//!
//! One replica runs it at a time: each round starts by taking a session-level Postgres
//! advisory lock, so coordinators can run as several replicas without double work.

use crate::{Ctx, dispatch};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use taskfleet_proto::Priority;
use tokio_util::sync::CancellationToken;

/// Rounds completed, for tests and metrics: background loops expose a signal instead of making
/// tests sleep.
pub(crate) static ROUNDS: AtomicU64 = AtomicU64::new(0);

/// Tasks redispatched per lane and round, at most.
const CLAIM_LIMIT: i64 = 1_000;

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let interval = ctx.config.coordinator.rescue_interval;
    let mut lock: Option<taskfleet_store::LeaderLock> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
        if let Some(l) = lock.as_mut()
            && !l.still_held().await
        {
            tracing::warn!("rescuer lost its lock");
            lock = None;
        }
        if lock.is_none() {
            match ctx.store.try_leader_lock("rescuer").await {
                Ok(Some(l)) => {
                    tracing::info!("this coordinator now runs the rescuer");
                    lock = Some(l);
                }
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "rescuer cannot take its lock");
                    continue;
                }
            }
        }
        if let Err(e) = round(&ctx).await {
            tracing::warn!(error = %e, "rescue round failed");
        }
        ROUNDS.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("taskfleet_coordinator_rescue_rounds_total").increment(1);
    }
}

async fn round(ctx: &Ctx) -> anyhow::Result<()> {
    let idle = ctx.config.coordinator.rescue_idle;
    // While events wait to be recorded, Postgres lags behind the workers: a task that looks
    // lost may have finished. Rescue only once the event backlog is drained.
    let subjects = &ctx.topology.subjects;
    for lane in Priority::ALL {
        let consumer = taskfleet_bus::Topology::coordinator_events_consumer(lane);
        let (pending, unacked) = ctx.topology.consumer_backlog(&subjects.events_stream(), &consumer).await?;
        if pending > 0 || unacked > 0 {
            return Ok(());
        }
    }
    for (queue, priority) in ctx.store.active_lanes().await? {
        let Ok(p) = priority.parse::<Priority>() else { continue };
        // Only a lane whose consumer holds nothing, neither waiting nor delivered and
        // unacknowledged, can have lost tasks: in-flight work there is accounted for by JetStream.
        let consumer = subjects.dispatch_consumer(&queue, p);
        match ctx.topology.consumer_backlog(&subjects.dispatch_stream(), &consumer).await {
            Ok((0, 0)) => {}
            Ok(_) => continue,
            Err(e) => {
                // No consumer yet means no worker has served this queue: its tasks wait in the
                // stream, not lost.
                tracing::debug!(%queue, %priority, error = %e, "rescuer skips a lane without a readable consumer");
                continue;
            }
        }
        let lost = ctx.store.claim_lost(&queue, &priority, idle, CLAIM_LIMIT).await?;
        if lost.is_empty() {
            continue;
        }
        tracing::warn!(%queue, %priority, tasks = lost.len(), "dispatching tasks whose dispatch message was lost");
        metrics::counter!("taskfleet_coordinator_rescued_total").increment(lost.len() as u64);
        let out = lost
            .iter()
            .map(|r| dispatch::redispatch_message(&ctx.topology, &r.envelope, None, r.attempt_offset, r.generation))
            .collect();
        dispatch::publish(&ctx.topology, out).await?;
    }
    let stranded = ctx.store.release_stranded().await?;
    if !stranded.is_empty() {
        tracing::warn!(tasks = stranded.len(), "releasing dependents whose release was missed");
        let out = stranded.iter().map(|env| dispatch::message(&ctx.topology, env, None)).collect();
        dispatch::publish(&ctx.topology, out).await?;
    }
    Ok(())
}
