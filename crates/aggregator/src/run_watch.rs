//! Where the figures per run name come from.
//!
//! * Ends: the coordinator's `RunEndedNotice` on core NATS (`<prefix>.runs.<id>.ended`), one
//!   wildcard subscription. The notice carries only the id and the state, so each end is read
//!   back from Postgres (`Store::run_end_summary`: the run's name, state, times and totals, one
//!   query by primary key). Reading it here rather than putting it on the notice keeps that
//!   cost off the coordinator's recording path, and it is paid only when an aggregator watches.
//!   Core NATS is not durable: an end published while the aggregator is down or slow is not
//!   counted (fine for live figures; Postgres keeps every run).
//! * Started and running: every [`POLL`], two grouped queries read directly from Postgres (the
//!   aggregator has the database anyway: no coordinator round trip): the runs in state
//!   `running` per name (`Store::running_runs_by_name`, every one of them, however many), and
//!   the runs created per name and 5-second bucket since the oldest bucket the window shows
//!   (`Store::runs_created_by_name`). A poll rather than a notice at submission: it needs no
//!   change to the coordinator, and "running now" is then what Postgres says, right after a
//!   restart of either service and even when an end notice was lost; a run that starts and ends
//!   between two polls is counted as started by the next poll. Starts come only from those
//!   creation counts, so no run is counted as started twice (`runs::Runs::polled`).

use crate::{Ctx, lock};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_aggregator::runs::{EndedRun, Poll};
use taskfleet_aggregator::stats::BUCKET_MS;
use taskfleet_proto::{RunEndedNotice, now_ms};
use tokio_util::sync::CancellationToken;

// Constants rather than knobs: none changes what the figures mean, and each is far from a limit
// an operator would need to move. A poll costs two grouped queries however many runs there are;
// 2 s keeps "running" fresh next to the dashboard's refresh. An end costs one query by primary
// key; 8 at once keeps a burst of ends from queueing without taking much of the pool.

/// How often the running and created runs are counted.
const POLL: Duration = Duration::from_secs(2);
/// Ends read back from Postgres at once.
const CONCURRENT_READS: usize = 8;

/// Subscribes to every run's end and starts the poll of running runs; both stop at shutdown.
pub(crate) async fn start(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // `<prefix>.runs.<id>.ended` with the id as a wildcard, whatever the prefix.
    let subject = ctx.topology.subjects.run_ended_all();
    let sub = ctx.client.subscribe(subject).await?;
    let ends = {
        let ctx = ctx.clone();
        sub.for_each_concurrent(CONCURRENT_READS, move |msg| {
            let ctx = ctx.clone();
            async move {
                match taskfleet_proto::decode::<RunEndedNotice>(&msg.payload, None, 64 * 1024) {
                    Ok(notice) => take_end(&ctx, notice).await,
                    Err(e) => tracing::debug!(error = %e, subject = %msg.subject, "unreadable run end notice"),
                }
            }
        })
    };
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = ends => {}
            _ = poll_running(&ctx) => {}
            _ = shutdown.cancelled() => {}
        }
    }))
}

/// Reads an ended run back and counts it.
async fn take_end(ctx: &Ctx, notice: RunEndedNotice) {
    if !notice.state.is_final() {
        return;
    }
    match ctx.store.run_end_summary(notice.run_id).await {
        Ok(Some(view)) => {
            // Its state now (a run resumed since is running again; its next end will count).
            if !view.state.is_final() {
                return;
            }
            let run = EndedRun {
                id: view.id,
                name: view.name,
                state: view.state,
                created_at: view.created_at,
                finished_at: view.finished_at.unwrap_or(0),
                totals: view.totals,
            };
            lock(&ctx.runs).ended(&run, now_ms());
        }
        Ok(None) => tracing::debug!(run_id = %notice.run_id, "an ended run is not in the database"),
        Err(e) => {
            metrics::counter!("taskfleet_aggregator_run_reads_failed_total").increment(1);
            tracing::warn!(run_id = %notice.run_id, error = %e, "cannot read an ended run; it is not counted");
        }
    }
}

/// Counts the running and created runs every [`POLL`], forever.
async fn poll_running(ctx: &Ctx) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let asked_at = now_ms();
        let since = lock(&ctx.runs).since(asked_at);
        let read = async {
            let running = ctx.store.running_runs_by_name().await?;
            let created = ctx.store.runs_created_by_name(since, BUCKET_MS).await?;
            Ok::<_, taskfleet_store::StoreError>(Poll { running, created })
        };
        match read.await {
            Ok(poll) => lock(&ctx.runs).polled(&poll, since, asked_at),
            Err(e) => tracing::warn!(error = %e, "cannot count the running runs"),
        }
    }
}
