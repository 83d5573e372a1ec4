//! `taskfleet-worker`: a stateless worker process with the built-in handlers.

// mimalloc: glibc malloc/free is a visible share of a busy worker's CPU time; mimalloc is cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::Ordering;
use std::time::Duration;
use taskfleet_service::Service;
use taskfleet_worker::providers::Providers;
use taskfleet_worker::{Worker, builtin};

/// `/readyz`: NATS connected and every dispatch consumer bound and pulled (`stats.ready`, set
/// by [`Worker::run`] once its pullers start and cleared when it drains).
fn readiness(
    client: async_nats::Client,
    stats: std::sync::Arc<taskfleet_worker::WorkerStats>,
) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
    move || {
        if client.connection_state() != async_nats::connection::State::Connected {
            Err("nats disconnected".into())
        } else if !stats.ready.load(Ordering::Relaxed) {
            Err("dispatch consumers not bound".into())
        } else {
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = Service::start("taskfleet-worker")?;
    let config = service.config.clone();
    let connecting = taskfleet_bus::connect(&config.nats, "taskfleet-worker", Duration::from_secs(60));
    let Some(client) = service.until_shutdown(connecting).await else { return Ok(()) };
    let client = client?;
    // One TLS crypto provider for every client in the process (outside APIs, NATS, Postgres).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let providers = Providers::new(&config.providers)?;
    let mut builder = Worker::builder(config.clone());
    if config.worker.test_handlers {
        tracing::info!("worker.test_handlers is on: registering the test kinds sleep and fanout");
        builder = builder.handler("sleep", builtin::sleep).handler("fanout", builtin::fanout);
    }
    let worker = builder
        .handler("echo", builtin::echo)
        .handler("spawn", builtin::spawn)
        .handler("collect", builtin::collect)
        .handler("counter", builtin::counter)
        .handler("steps", builtin::steps)
        .handler("stop", builtin::stop)
        .handler("http", providers.http_handler())
        .handler("llm.chat", providers.llm_chat_handler())
        .handler("llm.embed", providers.llm_embed_handler())
        .providers(providers.clone())
        .liveness(service.liveness.clone())
        .build();
    let stats = worker.stats();
    let gauges = tokio::spawn(taskfleet_worker::stats::run(stats.clone()));
    let http =
        service.serve_http(&config.worker.http_addr, readiness(client.clone(), stats), axum::Router::new()).await?;
    let result = worker.run(client, service.shutdown.clone()).await;
    service.shutdown.cancel();
    gauges.abort();
    let _ = http.await;
    service.finish();
    result.map_err(Into::into)
}
