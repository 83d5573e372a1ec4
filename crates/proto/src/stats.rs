//! The aggregator's live figures: the snapshot served at `/v1/stats` and published on
//! `<prefix>.stats` (JSON), which the dashboard and `taskfleet top` read.
//!
//! Every struct reads with defaults for missing fields, so a reader of an older or partial
//! snapshot still gets one.

use crate::Alert;
use serde::{Deserialize, Serialize};

/// Everything the dashboard shows, as served at `/v1/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// When it was taken, Unix epoch ms.
    pub generated_at: u64,
    /// The window of the live figures, seconds.
    pub window_s: u64,
    /// The whole fleet.
    pub fleet: Figures,
    /// Per queue, kind and priority.
    pub series: Vec<SeriesFigures>,
    /// Workers reporting.
    pub workers: Vec<WorkerFigures>,
    /// Latest state of every alert rule that fired.
    pub alerts: Vec<Alert>,
    /// Chart points, oldest first.
    pub history: Vec<HistoryPoint>,
    /// Per run name (`RunSpec.name`): at most 50 names, the rest summed as `other`.
    pub runs: Vec<RunFigures>,
}

/// Percentiles of one latency histogram, in milliseconds; `None` when it is empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

/// Prompt and completion token totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
}

/// The figures of a series or of the whole fleet. Rates are over the window, `*_total` all time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Figures {
    /// Final states per second over the window.
    pub throughput_per_s: f64,
    /// Final states, all time.
    pub completed_total: u64,
    /// Succeeded, all time.
    pub succeeded_total: u64,
    /// Failed, all time.
    pub failed_total: u64,
    /// Dead, all time.
    pub dead_total: u64,
    /// Cancelled, all time.
    pub cancelled_total: u64,
    /// Retries, all time.
    pub retries_total: u64,
    /// Cache hits, all time.
    pub cache_hits_total: u64,
    /// (failed + dead) / final states over the window.
    pub error_rate: Option<f64>,
    /// Retries / attempts over the window.
    pub retry_rate: Option<f64>,
    /// Cache hits / successes over the window, for series the cache has ever served.
    pub cache_hit_rate: Option<f64>,
    /// Tokens, all time.
    pub tokens_total: Tokens,
    /// Spend, all time, USD.
    pub cost_usd_total: f64,
    /// Spend avoided by cache hits, all time, USD.
    pub saved_usd_total: f64,
    /// Spend per final state over the window, USD, for series that ever cost anything.
    pub cost_per_task_usd: Option<f64>,
    /// Queue wait (created → started, first attempts) over the window.
    pub queue_wait_ms: Latency,
    /// Run time (started → finished) over the window.
    pub run_ms: Latency,
    /// End-to-end latency (created → final state) over the window.
    pub end_to_end_ms: Latency,
    /// Workers reporting (fleet only).
    pub workers: Option<u64>,
    /// In flight / capacity (fleet only).
    pub utilization: Option<f64>,
    /// Handlers running (fleet only).
    pub in_flight: Option<u64>,
    /// Handlers the fleet can run at once (fleet only).
    pub capacity: Option<u64>,
}

/// One series' figures, with its key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SeriesFigures {
    /// Queue.
    pub queue: String,
    /// Task kind.
    pub kind: String,
    /// Priority.
    pub priority: String,
    /// Its figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// The runs of one name (`RunSpec.name`; `(unnamed)` for runs without one, `other` for the
/// names beyond the aggregator's limit). Window counts are over the snapshot's window by when
/// runs started or ended; `*_total` since the aggregator started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunFigures {
    /// Run name.
    pub name: String,
    /// Runs running now.
    pub running: u64,
    /// Runs created in the window.
    pub started: u64,
    /// Runs that succeeded in the window.
    pub succeeded: u64,
    /// Runs that failed in the window (a task failed, or the run timed out).
    pub failed: u64,
    /// Runs cancelled in the window.
    pub cancelled: u64,
    /// Runs created since the aggregator started.
    pub started_total: u64,
    /// Succeeded since the aggregator started.
    pub succeeded_total: u64,
    /// Failed since the aggregator started.
    pub failed_total: u64,
    /// Cancelled since the aggregator started.
    pub cancelled_total: u64,
    /// Run duration (created → ended) of the runs that ended in the window.
    pub duration_ms: Latency,
    /// Tokens of the runs that ended, all time.
    pub tokens_total: Tokens,
    /// Attempts of the runs that ended, all time.
    pub attempts_total: u64,
    /// Spend of the runs that ended, all time, USD.
    pub cost_usd_total: f64,
    /// Spend per run that ended in the window, USD.
    pub cost_per_run_usd: Option<f64>,
    /// Spend avoided by cache hits in the runs that ended, all time, USD.
    pub saved_usd_total: f64,
}

/// A worker as the dashboard shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerFigures {
    /// Worker id.
    pub id: String,
    /// Queues it serves.
    pub queues: Vec<String>,
    /// Handlers running.
    pub in_flight: u64,
    /// Tasks waiting for a slot.
    pub buffered: u64,
    /// Handlers at once, at most.
    pub max_concurrent: u64,
    /// CPU, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory.
    pub rss_bytes: u64,
    /// Resident memory, percent of its limit.
    pub memory_percent: f64,
    /// Its last report, Unix epoch ms.
    pub last_seen_ms: u64,
}

/// One point of the charts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryPoint {
    /// Start of the interval, Unix epoch ms.
    pub t: u64,
    /// Final states per second.
    pub throughput_per_s: f64,
    /// 95th percentile end to end, ms.
    pub p95_ms: Option<f64>,
    /// Error rate.
    pub error_rate: Option<f64>,
    /// Cache hit rate.
    pub cache_hit_rate: Option<f64>,
    /// Spend in the interval, USD.
    pub cost_usd: f64,
    /// Workers reporting.
    pub workers: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_figures_are_flat_and_partial_snapshots_read() {
        let series =
            SeriesFigures { queue: "q".into(), kind: "k".into(), priority: "low".into(), ..Default::default() };
        let json = serde_json::to_value(&series).unwrap();
        assert_eq!(json["queue"], "q");
        assert_eq!(json["completed_total"], 0);
        assert_eq!(json["end_to_end_ms"]["p95"], serde_json::Value::Null);
        let back: SeriesFigures = serde_json::from_value(json).unwrap();
        assert_eq!(back, series);
        let partial: Snapshot =
            serde_json::from_str(r#"{"fleet":{"error_rate":0.5},"series":[{"queue":"q","completed_total":3}]}"#)
                .unwrap();
        assert_eq!(partial.fleet.error_rate, Some(0.5));
        assert_eq!(partial.series[0].figures.completed_total, 3);
        assert!(partial.runs.is_empty(), "a snapshot from before runs reads");
        let runs: Snapshot = serde_json::from_str(r#"{"runs":[{"name":"research","running":2}]}"#).unwrap();
        assert_eq!(
            (runs.runs[0].name.as_str(), runs.runs[0].running, runs.runs[0].cost_per_run_usd),
            ("research", 2, None)
        );
    }
}
