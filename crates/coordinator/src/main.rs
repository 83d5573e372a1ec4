//! `taskfleet-coordinator`: takes submissions, keeps durable task state in Postgres, dispatches
//! ready tasks, records worker events and answers task queries. Several replicas can run at
//! once: they share the durable consumers, and Postgres arbitrates every state change.

// mimalloc: under load glibc malloc/free took about 40% of the coordinator's CPU time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod dispatch;
mod intake;
mod leader;
mod promoter;
mod recorder;
mod rescuer;
mod runs;
mod stream_watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use taskfleet_bus::Topology;
use taskfleet_service::Service;
use taskfleet_store::Store;

/// Shared handles of the coordinator's loops.
pub(crate) struct Ctx {
    pub config: taskfleet_config::Config,
    pub client: async_nats::Client,
    pub topology: Topology,
    pub store: Store,
    /// Bucket of cancelled task ids that workers watch.
    pub cancel_bucket: async_nats::jetstream::kv::Store,
    /// Woken when the recorder stores a retry or deferral, so the promoter can dispatch it
    /// when due.
    pub retries_recorded: tokio::sync::Notify,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = Service::start("taskfleet-coordinator")?;
    let config = service.config.clone();
    let Some(store) = service.until_shutdown(Store::connect(&config.database)).await else { return Ok(()) };
    let store = store?.with_limits(runs::limits(&config));
    let connecting = taskfleet_bus::connect(&config.nats, "taskfleet-coordinator", Duration::from_secs(60));
    let Some(client) = service.until_shutdown(connecting).await else { return Ok(()) };
    let client = client?;
    warn_if_dispatches_may_not_fit(&config, client.server_info().max_payload);
    let topology = Topology::new(client.clone(), &config.nats);
    topology.ensure_streams().await?;
    let cancel_bucket = topology.cancel_bucket().await?;
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        client,
        topology,
        store,
        cancel_bucket,
        retries_recorded: tokio::sync::Notify::new(),
    });

    let ready = Arc::new(AtomicBool::new(false));
    let http = service
        .serve_http(
            &config.coordinator.http_addr,
            {
                let r = ready.clone();
                move || r.load(Ordering::Relaxed)
            },
            api::http_routes(ctx.clone()),
        )
        .await?;
    let shutdown = service.shutdown.clone();
    let loops = vec![
        tokio::spawn(intake::run(ctx.clone(), shutdown.clone())),
        tokio::spawn(recorder::run(ctx.clone(), shutdown.clone())),
        tokio::spawn(api::serve_nats(ctx.clone(), shutdown.clone())),
        tokio::spawn(rescuer::run(ctx.clone(), shutdown.clone())),
        tokio::spawn(promoter::run(ctx.clone(), shutdown.clone())),
        tokio::spawn(stream_watch::run(ctx.clone(), shutdown.clone())),
        tokio::spawn(readiness(ctx.clone(), ready, shutdown.clone())),
    ];
    tracing::info!(schema = %config.database.schema, prefix = %config.nats.subject_prefix, "coordinator running");
    let mut failure = None;
    for l in loops {
        match l.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "coordinator loop failed");
                shutdown.cancel();
                failure.get_or_insert(e);
            }
            Err(e) => {
                shutdown.cancel();
                failure.get_or_insert(anyhow::anyhow!("coordinator loop panicked: {e}"));
            }
        }
    }
    let _ = http.await;
    let _ = ctx.client.flush().await;
    service.finish();
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A dispatch carries a task's payload, its last checkpoint and its parents' outcomes inline:
/// warns when their limits together pass what the NATS server takes in one message.
fn warn_if_dispatches_may_not_fit(config: &taskfleet_config::Config, max_payload: usize) {
    let worst = config.coordinator.max_body_bytes
        + config.workflows.max_checkpoint_bytes
        + config.workflows.inline_parents_bytes
        + 16 * 1024;
    if worst > max_payload {
        tracing::warn!(
            worst_dispatch_bytes = worst,
            max_payload,
            "coordinator.max_body_bytes + workflows.max_checkpoint_bytes + workflows.inline_parents_bytes exceed the \
             NATS server's max_payload: a task with all three at their limits could not be dispatched"
        );
    }
}

/// Ready while Postgres answers and NATS is connected.
async fn readiness(
    ctx: Arc<Ctx>,
    ready: Arc<AtomicBool>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let db = ctx.store.ping().await.is_ok();
        let nats = ctx.client.connection_state() == async_nats::connection::State::Connected;
        ready.store(db && nats, Ordering::Relaxed);
        tokio::select! {
            _ = shutdown.cancelled() => { ready.store(false, Ordering::Relaxed); return Ok(()) }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
