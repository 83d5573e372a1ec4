//! A worker's live counters, read by its health endpoint and presence reports and exported
//! as metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Live counters of a worker, for health and metrics endpoints.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Handlers running now.
    pub in_flight: AtomicU64,
    /// Tasks pulled and waiting for a slot.
    pub buffered: AtomicU64,
    /// Attempts finished (any outcome).
    pub finished: AtomicU64,
    /// True once every consumer is set up and pulling.
    pub ready: AtomicBool,
}

/// Exports the counters as the `taskfleet_worker_in_flight`, `_buffered` and `_finished_total`
/// metrics every second, until aborted.
pub async fn run(stats: Arc<WorkerStats>) {
    loop {
        metrics::gauge!("taskfleet_worker_in_flight").set(stats.in_flight.load(Ordering::Relaxed) as f64);
        metrics::gauge!("taskfleet_worker_buffered").set(stats.buffered.load(Ordering::Relaxed) as f64);
        metrics::counter!("taskfleet_worker_finished_total").absolute(stats.finished.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
