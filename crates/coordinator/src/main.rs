//! `taskfleet-coordinator`: takes submissions, keeps durable task state in Postgres, dispatches
//! ready tasks, records worker events and answers task queries. Several replicas can run at
//! once: they share the durable consumers, and Postgres arbitrates every state change.

// mimalloc: under load glibc malloc/free took about 40% of the coordinator's CPU time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod dispatch;
mod http_auth;
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
    /// The loops `/healthz` watches.
    pub liveness: taskfleet_service::Liveness,
}

/// Longest silence of a loop that consumes a stream (intake, recorder) before `/healthz` fails:
/// an idle one ticks every [`taskfleet_bus::IDLE_TICK`] (5 s), and one batch waits at most about
/// 10 s per Postgres connection it acquires plus its statements; 120 s is many times either.
pub(crate) const CONSUMER_MAX_SILENCE: Duration = Duration::from_secs(120);

/// Longest silence of a periodic loop (promoter, rescuer) sleeping `interval` between rounds:
/// five rounds plus a minute for a slow round (Postgres acquire timeouts, leader checks).
pub(crate) fn periodic_max_silence(interval: Duration) -> Duration {
    interval * 5 + Duration::from_secs(60)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = Service::start("taskfleet-coordinator")?;
    let config = service.config.clone();
    // The token file is read, and the token checked, before anything else starts.
    let access = Arc::new(http_auth::Access::from_config(&config.coordinator).map_err(|e| anyhow::anyhow!("{e}"))?);
    log_api_access(&access, &config.coordinator.http_addr);
    let Some(store) = service.until_shutdown(Store::connect(&config.database)).await else { return Ok(()) };
    let store = store?.with_limits(runs::limits(&config));
    let connecting = taskfleet_bus::connect(&config.nats, "taskfleet-coordinator", Duration::from_secs(60));
    let Some(client) = service.until_shutdown(connecting).await else { return Ok(()) };
    let client = client?;
    warn_if_dispatches_may_not_fit(&config, client.server_info().max_payload);
    let topology = Topology::new(client.clone(), &config.nats);
    topology.ensure_streams().await?;
    let cancel_bucket = topology.cancel_bucket().await?;
    // The aggregator may only bind to its consumer, so the coordinator makes it.
    topology.aggregator_consumer().await?;
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        client,
        topology,
        store,
        cancel_bucket,
        retries_recorded: tokio::sync::Notify::new(),
        liveness: service.liveness.clone(),
    });

    let ready = Arc::new(AtomicBool::new(false));
    let http = service
        .serve_http(
            &config.coordinator.http_addr,
            {
                let (db, client) = (ready.clone(), ctx.client.clone());
                move || readiness_now(&client, &db)
            },
            http_auth::protect(api::http_routes(ctx.clone()), access),
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

/// Logs which mode the HTTP task API is in (never the token), warning when it listens beyond
/// loopback without a token: remote callers then get 403.
fn log_api_access(access: &http_auth::Access, http_addr: &str) {
    let mode = access.describe();
    let loopback_bind = http_addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback())
        || http_addr.starts_with("localhost:");
    match access {
        http_auth::Access::LoopbackOnly if !loopback_bind => tracing::warn!(
            http_addr,
            mode,
            "HTTP task API (/v1/...) answers only to loopback peers: set coordinator.api_token (or \
             api_token_file) to serve it to other hosts; /healthz, /readyz and /metrics stay open"
        ),
        _ => tracing::info!(http_addr, mode, "HTTP task API (/v1/...) access; /healthz, /readyz and /metrics are open"),
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

/// What `/readyz` answers: NATS connected (asked of the client on each request: an atomic
/// read) and Postgres reachable (the cached result of [`readiness`]' latest probe).
fn readiness_now(client: &async_nats::Client, db: &AtomicBool) -> Result<(), String> {
    let nats = client.connection_state() == async_nats::connection::State::Connected;
    let db = db.load(Ordering::Relaxed);
    match (nats, db) {
        (true, true) => Ok(()),
        (false, true) => Err("nats disconnected".into()),
        (true, false) => Err("postgres unreachable".into()),
        (false, false) => Err("nats disconnected, postgres unreachable".into()),
    }
}

/// Probes Postgres (`SELECT 1`) every 2 s into `db`, so `/readyz` never waits on it; false
/// from shutdown on.
async fn readiness(
    ctx: Arc<Ctx>,
    db: Arc<AtomicBool>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let reachable = tokio::time::timeout(Duration::from_secs(2), ctx.store.ping()).await.is_ok_and(|r| r.is_ok());
        db.store(reachable, Ordering::Relaxed);
        tokio::select! {
            _ = shutdown.cancelled() => { db.store(false, Ordering::Relaxed); return Ok(()) }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
