//! Where the figures per run name come from.
//!
//! * Ends: the coordinator's `RunEndedNotice` on core NATS (`<prefix>.runs.<id>.ended`), one
//!   wildcard subscription. The notice carries only the id and the state, so each end is read
//!   back from Postgres (`Store::run_view` with no tasks: the run's row and its totals, two
//!   indexed queries). Reading it here rather than putting it on the notice keeps that cost off
//!   the coordinator's recording path, and it is paid only when an aggregator watches. Core
//!   NATS is not durable: an end published while the aggregator is down or slow is not counted
//!   (fine for live figures; Postgres keeps every run).
//! * Started and running: every [`POLL`] the runs in state `running` (`Store::list_runs`, the
//!   query `run.list` answers with, read directly since the aggregator has the database
//!   anyway: no coordinator round trip). A poll rather than a notice at submission: it needs no
//!   change to the coordinator, and "running now" is then what Postgres says, right after a
//!   restart of either service and even when an end notice was lost; a run that starts and ends
//!   between two polls is still counted as started, from its end. At most [`LISTED`] running
//!   runs (the newest) are seen.

use crate::{Ctx, lock};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_aggregator::runs::EndedRun;
use taskfleet_proto::{RunEndedNotice, RunGetRequest, RunState, now_ms};
use tokio_util::sync::CancellationToken;

/// How often the running runs are read.
const POLL: Duration = Duration::from_secs(2);
/// Most running runs read per poll (the store's ceiling).
const LISTED: u32 = 1_000;
/// Ends read back from Postgres at once.
const CONCURRENT_READS: usize = 8;

/// Subscribes to every run's end and starts the poll of running runs; both stop at shutdown.
pub(crate) async fn start(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // `<prefix>.runs.<id>.ended` with the id as a wildcard, whatever the prefix.
    let nil = uuid::Uuid::nil();
    let subject = ctx.topology.subjects.run_ended(&nil).replace(&nil.to_string(), "*");
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
    match ctx.store.run_view(&RunGetRequest { id: notice.run_id, tasks: Some(0) }).await {
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

/// Reads the running runs every [`POLL`], forever.
async fn poll_running(ctx: &Ctx) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let asked_at = now_ms();
        match ctx.store.list_runs(Some(RunState::Running), LISTED).await {
            Ok(list) => lock(&ctx.runs).running(&list, asked_at, now_ms()),
            Err(e) => tracing::warn!(error = %e, "cannot list the running runs"),
        }
    }
}
