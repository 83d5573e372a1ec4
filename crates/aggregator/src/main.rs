//! `taskfleet-aggregator`: reads every task event through its own durable consumer and every
//! worker's status reports and run ends, and serves the fleet's live figures: a dashboard (`/`), a JSON
//! snapshot (`/v1/stats`, also published every second on `<prefix>.stats`), Prometheus
//! `/metrics`, and alerts (`<prefix>.alerts`). Per-minute rollups go to Postgres, so totals and
//! history survive a restart; events are acknowledged once their rollup is written.

// mimalloc, as in the other services: cheaper than glibc malloc for small, short-lived allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod consume;
mod flusher;
mod publisher;
mod run_watch;
mod worker_status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use taskfleet_aggregator::alerts::Alerts;
use taskfleet_aggregator::runs::Runs;
use taskfleet_aggregator::stats::Stats;
use taskfleet_bus::Topology;
use taskfleet_service::Service;
use taskfleet_store::Store;

/// Shared handles and state of the aggregator's loops.
pub(crate) struct Ctx {
    pub config: taskfleet_config::Config,
    pub client: async_nats::Client,
    pub topology: Topology,
    pub store: Store,
    /// The live figures.
    pub stats: Mutex<Stats>,
    /// Acknowledgement subjects of the messages whose events are counted but not yet written to
    /// Postgres (only the subjects: a held message's body would keep up to a megabyte of
    /// results in memory until the next flush).
    pub held: Mutex<Vec<async_nats::Subject>>,
    /// The latest `/v1/stats` body.
    pub snapshot: Mutex<Arc<Vec<u8>>>,
    /// The alert rules and their latest states.
    pub alerts: Mutex<Alerts>,
    /// The figures per run name.
    pub runs: Mutex<Runs>,
    /// True while the event consumer's latest open succeeded (for `/readyz`).
    pub consumer_bound: AtomicBool,
    /// The loops `/healthz` watches.
    pub liveness: taskfleet_service::Liveness,
}

/// Locks a mutex of [`Ctx`], recovering it if a panicking holder poisoned it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
    let stats = flusher::restored_stats(&cfg, &store).await;
    let alerts = Alerts::new(config.aggregator.enabled_alert_rules(), cfg.alert_min_samples);
    let ctx = Arc::new(Ctx {
        config,
        client,
        topology,
        store,
        stats: Mutex::new(stats),
        held: Mutex::new(Vec::new()),
        snapshot: Mutex::new(Arc::new(b"{}".to_vec())),
        alerts: Mutex::new(alerts),
        runs: Mutex::new(Runs::new(cfg.window.as_millis() as u64, taskfleet_proto::now_ms())),
        consumer_bound: AtomicBool::new(false),
        liveness: service.liveness.clone(),
    });

    let ready = Arc::new(AtomicBool::new(true));
    let http = service
        .serve_http(
            &cfg.http_addr,
            {
                let (r, ctx) = (ready.clone(), ctx.clone());
                move || {
                    let nats = ctx.client.connection_state() == async_nats::connection::State::Connected;
                    let bound = ctx.consumer_bound.load(Ordering::Relaxed);
                    match (r.load(Ordering::Relaxed), nats, bound) {
                        (false, _, _) => Err("shutting down".into()),
                        (true, false, _) => Err("nats disconnected".into()),
                        (true, true, false) => Err("event consumer not bound".into()),
                        (true, true, true) => Ok(()),
                    }
                }
            },
            api::http_routes(ctx.clone()),
        )
        .await?;
    let shutdown = service.shutdown.clone();
    let statuses = worker_status::start(ctx.clone()).await?;
    let runs = run_watch::start(ctx.clone(), shutdown.clone()).await?;
    let publisher = tokio::spawn(publisher::run(ctx.clone(), shutdown.clone()));
    let flusher = tokio::spawn(flusher::run(ctx.clone(), shutdown.clone()));

    tracing::info!("aggregator running");
    consume::run(&ctx, shutdown.cancelled()).await;
    ready.store(false, Ordering::Relaxed);
    let _ = flusher.await;
    publisher.abort();
    statuses.abort();
    runs.abort();
    let _ = http.await;
    service.finish();
    Ok(())
}
