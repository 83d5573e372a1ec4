//! Fleet-level messages on core NATS: worker status reports and alerts.

use serde::{Deserialize, Serialize};

/// What a worker reports about itself every `worker.status_interval` on
/// `<prefix>.workers.status` (JSON): the aggregator shows it per worker and derives the fleet's
/// worker count, utilisation and memory alerts from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Worker id (as in its events).
    pub id: String,
    /// Queues it serves.
    #[serde(default)]
    pub queues: Vec<String>,
    /// Handlers running now.
    #[serde(default)]
    pub in_flight: u64,
    /// Tasks pulled and waiting for a slot.
    #[serde(default)]
    pub buffered: u64,
    /// Handlers it runs at once at most.
    #[serde(default)]
    pub max_concurrent: u64,
    /// CPU used since the previous report, percent of one core.
    #[serde(default)]
    pub cpu_percent: f64,
    /// Resident memory, bytes.
    #[serde(default)]
    pub rss_bytes: u64,
    /// The memory it may use (its cgroup limit, else the machine's memory), bytes.
    #[serde(default)]
    pub memory_limit_bytes: u64,
    /// When it reported, Unix epoch milliseconds.
    pub at: u64,
    /// True in the last report of a worker that is stopping.
    #[serde(default)]
    pub stopping: bool,
}

impl WorkerStatus {
    /// Resident memory as a percentage of the limit; 0 when the limit is unknown.
    pub fn memory_percent(&self) -> f64 {
        if self.memory_limit_bytes == 0 { 0.0 } else { self.rss_bytes as f64 * 100.0 / self.memory_limit_bytes as f64 }
    }
}

/// Whether an alert started or stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The rule's condition holds.
    Firing,
    /// It held and no longer does.
    Resolved,
}

/// A change of an alert rule's state, published as JSON on `<prefix>.alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Rule name, e.g. `high_p95_latency`.
    pub rule: String,
    /// Firing or resolved.
    pub state: AlertState,
    /// The figure the rule watches, e.g. `p95_ms`.
    pub metric: String,
    /// Its value when the state changed.
    pub value: f64,
    /// The comparison, `>` or `<`.
    pub op: String,
    /// The threshold.
    pub threshold: f64,
    /// When the state changed, Unix epoch milliseconds.
    pub since: u64,
    /// Human-readable summary.
    pub message: String,
}
