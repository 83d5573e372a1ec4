//! Start-up and shutdown shared by the taskfleet binaries, so each `main` stays a few lines:
//! load and validate [`Config`], install logging/tracing and the Prometheus recorder, serve
//! `/healthz`, `/readyz` and `/metrics` beside the service's own routes, and turn SIGTERM or
//! Ctrl-C into a cancellation token.

use axum::{Router, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::Arc;
use taskfleet_config::Config;
use taskfleet_telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

pub mod catalogue;
mod liveness;
pub use liveness::{Beat, Liveness};

/// A started binary: its configuration and the handles that must live as long as it runs.
pub struct Service {
    /// Validated configuration.
    pub config: Config,
    /// Prometheus recorder handle, rendered at `/metrics`.
    pub metrics: PrometheusHandle,
    /// Cancelled on SIGTERM or Ctrl-C.
    pub shutdown: CancellationToken,
    /// The loops `/healthz` watches: register each long-running loop here.
    pub liveness: Liveness,
    telemetry: Option<Telemetry>,
}

impl Service {
    /// Loads configuration (a clear error if it is invalid), starts telemetry under the
    /// OpenTelemetry service name `name`, installs the metrics recorder and signal handlers.
    pub fn start(name: &str) -> anyhow::Result<Service> {
        let config = Config::load().map_err(|e| anyhow::anyhow!("{e}"))?;
        let telemetry = taskfleet_telemetry::init(name, &config.telemetry)?;
        // Connection URLs may carry passwords: only their redacted forms are ever logged.
        tracing::info!(
            nats = %config.nats.redacted_url(),
            database = %config.database.redacted_url(),
            redis = %config.redis.redacted_url(),
            "{name} starting"
        );
        let metrics = prometheus_builder()
            .and_then(PrometheusBuilder::install_recorder)
            .map_err(|e| anyhow::anyhow!("cannot install metrics recorder: {e}"))?;
        catalogue::describe_all();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            token.cancel();
        });
        Ok(Service { config, metrics, shutdown, liveness: Liveness::default(), telemetry: Some(telemetry) })
    }

    /// Serves `extra` routes plus `/healthz`, `/readyz` and `/metrics` on `addr`, until shutdown.
    /// Handlers can read the peer's address as `axum::extract::ConnectInfo<SocketAddr>`; a layer
    /// on `extra` (the coordinator's API guard) does not cover the three routes added here.
    ///
    /// `/healthz` (liveness) answers 200 `ok` while every loop registered in [`Self::liveness`]
    /// ticks within its maximum, else 503 naming the silent loops: a restart may help.
    /// `/readyz` (readiness) answers 200 `ready` when `ready()` is `Ok`, else 503 with its
    /// message naming the missing dependency: send no traffic, but do not restart. `ready`
    /// runs on every request, so it must be cheap (atomics, cached probes).
    pub async fn serve_http(
        &self,
        addr: &str,
        ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
        extra: Router,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let ready = Arc::new(ready);
        let metrics = self.metrics.clone();
        let liveness = self.liveness.clone();
        let app = extra
            .route("/healthz", get(move || std::future::ready(probe_response(liveness.check(), "ok", "not alive"))))
            .route("/readyz", get(move || std::future::ready(probe_response(ready(), "ready", "not ready"))))
            .route("/metrics", get(move || std::future::ready(metrics.render())));
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr()?, "HTTP endpoints listening");
        let shutdown = self.shutdown.clone();
        Ok(tokio::spawn(async move {
            // The peer's address reaches handlers as `ConnectInfo<SocketAddr>` (the coordinator's
            // API serves only loopback peers when it has no token).
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            let served =
                axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }))
    }

    /// Runs a start-up step (connecting, migrating) unless shutdown is requested first:
    /// `None` then, so a SIGTERM during a long wait for NATS or Postgres stops the process.
    pub async fn until_shutdown<T>(&self, step: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => None,
            out = step => Some(out),
        }
    }

    /// Flushes telemetry.
    pub fn finish(mut self) {
        if let Some(t) = self.telemetry.take() {
            t.shutdown();
        }
    }
}

/// The exporter's settings: every histogram with [`catalogue::LATENCY_BUCKETS`] (the semantic
/// cache's lookups with [`catalogue::LOOKUP_BUCKETS`]), so none is rendered as a summary.
fn prometheus_builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new().set_buckets(catalogue::LATENCY_BUCKETS)?.set_buckets_for_metric(
        Matcher::Full("taskfleet_semantic_cache_lookup_seconds".into()),
        catalogue::LOOKUP_BUCKETS,
    )
}

/// 200 with `ok_body`, or 503 with `"<prefix>: <what is missing>"`.
fn probe_response(state: Result<(), String>, ok_body: &'static str, prefix: &str) -> (StatusCode, String) {
    match state {
        Ok(()) => (StatusCode::OK, ok_body.to_string()),
        Err(missing) => (StatusCode::SERVICE_UNAVAILABLE, format!("{prefix}: {missing}")),
    }
}

/// Resolves on SIGTERM or Ctrl-C: what every taskfleet process stops on.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `/metrics` renders for a few recorded values, with the binaries' exporter settings.
    fn rendered() -> String {
        let recorder = prometheus_builder().expect("valid buckets").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            catalogue::describe_all();
            metrics::histogram!("taskfleet_task_end_to_end_seconds", "queue" => "default").record(0.3);
            metrics::histogram!("taskfleet_task_end_to_end_seconds", "queue" => "default").record(42.0);
            metrics::histogram!("taskfleet_semantic_cache_lookup_seconds").record(0.002);
            metrics::counter!("taskfleet_coordinator_dispatched_total").increment(3);
        });
        handle.render()
    }

    /// Every metric of the catalogue recorded once, rendered as `/metrics` renders it, passes
    /// `promtool check metrics` (also for the metrics an end-to-end run does not produce;
    /// tests/metrics_exposition.rs lints the live endpoints and fails without promtool). Skipped
    /// when `.dev/bin/promtool` (installed by `make services`) is missing.
    #[test]
    fn every_catalogue_metric_passes_promtool() {
        let promtool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.dev/bin/promtool");
        if !promtool.is_file() {
            eprintln!("skipped: {} is missing (`make services` installs it)", promtool.display());
            return;
        }
        let recorder = prometheus_builder().expect("valid buckets").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            catalogue::describe_all();
            for m in catalogue::METRICS {
                match m.kind {
                    catalogue::MetricKind::Counter => metrics::counter!(m.name, "kind" => "echo").increment(1),
                    catalogue::MetricKind::Gauge => metrics::gauge!(m.name, "kind" => "echo").set(0.5),
                    catalogue::MetricKind::Histogram => metrics::histogram!(m.name, "kind" => "echo").record(0.2),
                }
            }
        });
        let text = handle.render();
        for m in catalogue::METRICS {
            assert!(text.contains(&format!("# HELP {} ", m.name)), "{} is not rendered with HELP", m.name);
        }
        let mut child = std::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("promtool's output");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");
    }

    #[test]
    fn latencies_render_as_histograms_with_help() {
        let text = rendered();
        assert!(text.contains("# TYPE taskfleet_task_end_to_end_seconds histogram\n"), "{text}");
        assert!(text.contains("# HELP taskfleet_task_end_to_end_seconds Time from submission"), "{text}");
        assert!(!text.contains("quantile="), "no summaries: {text}");
        // 0.3 s is in the 0.5 s bucket, 42 s only from the 60 s bucket on.
        assert!(text.contains("taskfleet_task_end_to_end_seconds_bucket{queue=\"default\",le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("taskfleet_task_end_to_end_seconds_bucket{queue=\"default\",le=\"60\"} 2\n"), "{text}");
        assert!(text.contains("taskfleet_task_end_to_end_seconds_bucket{queue=\"default\",le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("taskfleet_task_end_to_end_seconds_count{queue=\"default\"} 2\n"), "{text}");
        // The lookup histogram has its own, finer buckets.
        assert!(text.contains("taskfleet_semantic_cache_lookup_seconds_bucket{le=\"0.0025\"} 1\n"), "{text}");
        assert!(
            text.contains("# HELP taskfleet_coordinator_dispatched_total Dispatch messages published.\n"),
            "{text}"
        );
    }
}
