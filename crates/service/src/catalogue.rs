//! Every metric the taskfleet binaries export: its type, unit and the HELP text Prometheus shows,
//! and the histogram buckets. [`describe_all`] registers the descriptions with the installed
//! recorder; a unit test checks the list against the `counter!`/`gauge!`/`histogram!` calls in
//! the workspace's sources, so a new metric without HELP text fails `cargo test`.
//!
//! Latency metrics (`*_seconds` histograms) are exported as Prometheus histograms with the
//! buckets below, never as quantile summaries, so that
//! `histogram_quantile(0.99, sum by (le) (rate(taskfleet_task_end_to_end_seconds_bucket[5m])))`
//! is a fleet-wide percentile over every pod.

use metrics::Unit;

/// A metric's Prometheus type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic counter (`*_total`).
    Counter,
    /// Value that goes up and down.
    Gauge,
    /// Distribution exported with buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One exported metric.
#[derive(Clone, Copy, Debug)]
pub struct MetricInfo {
    /// Name as exported (counters include `_total`; histograms without their suffixes).
    pub name: &'static str,
    /// Prometheus type.
    pub kind: MetricKind,
    /// Unit of the values (also in the name, as Prometheus naming asks).
    pub unit: Unit,
    /// HELP text, labels in braces.
    pub help: &'static str,
}

const fn counter(name: &'static str, unit: Unit, help: &'static str) -> MetricInfo {
    MetricInfo { name, kind: MetricKind::Counter, unit, help }
}
const fn gauge(name: &'static str, unit: Unit, help: &'static str) -> MetricInfo {
    MetricInfo { name, kind: MetricKind::Gauge, unit, help }
}
const fn histogram(name: &'static str, help: &'static str) -> MetricInfo {
    MetricInfo { name, kind: MetricKind::Histogram, unit: Unit::Seconds, help }
}

/// Upper bounds, in seconds, of the buckets of every latency histogram: 5 ms to one hour,
/// about three per decade, for tasks from a cache hit to a long LLM pipeline.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// Buckets of `taskfleet_semantic_cache_lookup_seconds`: 0.5 ms to 10 s (an embedding call,
/// an index sync and a scan).
pub const LOOKUP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Every metric of the coordinator, the workers and the aggregator.
pub const METRICS: &[MetricInfo] = &[
    // --- aggregator: task figures from the event stream ------------------------------------
    histogram(
        "taskfleet_task_queue_wait_seconds",
        "Time from submission to the start of the first attempt, by queue, kind and priority.",
    ),
    histogram("taskfleet_task_run_seconds", "Duration of each attempt that ended, by queue, kind and priority."),
    histogram(
        "taskfleet_task_end_to_end_seconds",
        "Time from submission to the final state (succeeded, failed, dead, cancelled), by queue, kind and priority.",
    ),
    counter(
        "taskfleet_task_events_total",
        Unit::Count,
        "Task events seen by the aggregator, by queue, kind, priority and event (succeeded, failed, retrying, dead, ...).",
    ),
    counter(
        "taskfleet_task_cache_hits_total",
        Unit::Count,
        "Final states answered from the result cache, by queue, kind and priority.",
    ),
    counter(
        "taskfleet_task_tokens_total",
        Unit::Count,
        "LLM tokens of task attempts, by queue, kind, priority and type.",
    ),
    counter(
        "taskfleet_task_cost_microdollars_total",
        Unit::Count,
        "Provider cost of task attempts in millionths of a US dollar, by queue, kind and priority.",
    ),
    counter("taskfleet_aggregator_events_total", Unit::Count, "Events consumed by the aggregator."),
    counter(
        "taskfleet_aggregator_malformed_events_total",
        Unit::Count,
        "Event messages the aggregator could not decode (terminated).",
    ),
    counter("taskfleet_aggregator_rollups_written_total", Unit::Count, "Per-minute rollup rows written to Postgres."),
    counter(
        "taskfleet_aggregator_run_reads_failed_total",
        Unit::Count,
        "Ended runs whose totals could not be read from Postgres (not counted).",
    ),
    counter("taskfleet_aggregator_alerts_total", Unit::Count, "Alert state changes (firing or resolved), by rule."),
    gauge(
        "taskfleet_fleet_throughput_tasks_per_second",
        Unit::CountPerSecond,
        "Final states per second over the aggregator's window.",
    ),
    gauge("taskfleet_fleet_workers", Unit::Count, "Workers that reported their status within the window."),
    gauge("taskfleet_fleet_utilization_ratio", Unit::Percent, "Tasks in flight over the fleet's capacity (0..1)."),
    gauge("taskfleet_fleet_error_ratio", Unit::Percent, "Failed and dead over final states in the window (0..1)."),
    gauge(
        "taskfleet_fleet_cache_hit_ratio",
        Unit::Percent,
        "Cache hits over succeeded tasks of kinds with a cache policy, in the window (0..1).",
    ),
    gauge(
        "taskfleet_fleet_end_to_end_p95_seconds",
        Unit::Seconds,
        "95th percentile of end-to-end latency over the window, as one aggregator computes it (fleet-wide percentiles: histogram_quantile over taskfleet_task_end_to_end_seconds_bucket).",
    ),
    // --- coordinator ------------------------------------------------------------------------
    counter(
        "taskfleet_coordinator_submissions_total",
        Unit::Count,
        "Submissions taken in, by result (accepted, duplicate, rejected) and, for rejections, reason.",
    ),
    counter("taskfleet_coordinator_dispatched_total", Unit::Count, "Dispatch messages published."),
    counter("taskfleet_coordinator_events_total", Unit::Count, "Task events recorded in Postgres."),
    counter(
        "taskfleet_coordinator_events_ignored_total",
        Unit::Count,
        "Events that changed nothing (duplicates, late events of a final task).",
    ),
    counter(
        "taskfleet_coordinator_events_unstorable_total",
        Unit::Count,
        "Events Postgres refused, recorded as failures of their tasks.",
    ),
    counter("taskfleet_coordinator_finalized_total", Unit::Count, "Tasks that reached a final state."),
    counter(
        "taskfleet_coordinator_malformed_events_total",
        Unit::Count,
        "Event messages the coordinator could not decode (terminated).",
    ),
    counter(
        "taskfleet_coordinator_store_errors_total",
        Unit::Count,
        "Failed Postgres writes (retried), by operation (insert, record).",
    ),
    counter("taskfleet_coordinator_dead_letters_total", Unit::Count, "Dead tasks copied to the dead-letter stream."),
    counter("taskfleet_coordinator_promoted_total", Unit::Count, "Due retries and deferrals dispatched again."),
    counter(
        "taskfleet_coordinator_rescue_rounds_total",
        Unit::Count,
        "Rounds of the rescuer's scan for lost dispatches.",
    ),
    counter(
        "taskfleet_coordinator_rescued_total",
        Unit::Count,
        "Tasks dispatched again because their dispatch was lost.",
    ),
    counter("taskfleet_coordinator_runs_submitted_total", Unit::Count, "Runs (workflows) inserted."),
    counter("taskfleet_coordinator_runs_ended_total", Unit::Count, "Runs that reached a final state."),
    counter("taskfleet_coordinator_cancelled_total", Unit::Count, "Tasks cancelled through the API."),
    counter("taskfleet_coordinator_replayed_total", Unit::Count, "Dead tasks replayed through the API."),
    gauge(
        "taskfleet_stream_fill_ratio",
        Unit::Percent,
        "Bytes in a JetStream stream over its max_bytes (0..1), by stream; an alert fires at 0.8.",
    ),
    gauge(
        "taskfleet_coordinator_events_stuck_seconds",
        Unit::Seconds,
        "How long the oldest event waiting for the coordinator has waited (0 when none waits).",
    ),
    // --- worker -----------------------------------------------------------------------------
    histogram("taskfleet_worker_run_seconds", "Handler run time of each attempt on this worker, by kind."),
    counter(
        "taskfleet_worker_attempts_total",
        Unit::Count,
        "Attempts that ended on this worker, by outcome (succeeded, failed, retrying, dead, cache_hit, ...).",
    ),
    counter("taskfleet_worker_finished_total", Unit::Count, "Attempts finished by this worker since it started."),
    gauge("taskfleet_worker_in_flight", Unit::Count, "Handlers running now on this worker."),
    gauge("taskfleet_worker_buffered", Unit::Count, "Dispatch messages pulled and waiting for a free slot."),
    counter(
        "taskfleet_worker_malformed_dispatch_total",
        Unit::Count,
        "Dispatch messages this worker could not decode (terminated).",
    ),
    counter(
        "taskfleet_worker_unknown_kind_total",
        Unit::Count,
        "Dispatched tasks of a kind no handler is registered for.",
    ),
    counter(
        "taskfleet_worker_skipped_total",
        Unit::Count,
        "Dispatch messages not run (stale generation, already final, cancelled, ...), by reason.",
    ),
    counter("taskfleet_worker_deferred_total", Unit::Count, "Attempts deferred without counting, by reason."),
    counter("taskfleet_worker_cache_hits_total", Unit::Count, "Tasks answered from the result cache, by kind."),
    counter("taskfleet_worker_cache_misses_total", Unit::Count, "Cache lookups that led to running the task, by kind."),
    counter(
        "taskfleet_worker_inline_cache_hits_total",
        Unit::Count,
        "Provider calls inside handlers answered from the cache, by kind.",
    ),
    counter(
        "taskfleet_worker_cache_saved_microusd_total",
        Unit::Count,
        "Provider cost saved by cache hits in millionths of a US dollar, by kind.",
    ),
    counter("taskfleet_worker_events_total", Unit::Count, "Task events published by this worker."),
    counter("taskfleet_worker_event_batches_total", Unit::Count, "Event batches (JetStream messages) published."),
    counter(
        "taskfleet_worker_event_publish_failures_total",
        Unit::Count,
        "Failed publishes of an event batch (retried).",
    ),
    counter(
        "taskfleet_worker_results_too_large_total",
        Unit::Count,
        "Events whose result was dropped because it did not fit in a message.",
    ),
    counter(
        "taskfleet_worker_results_unstorable_total",
        Unit::Count,
        "Results the fleet cannot store (NUL characters, nested too deep), recorded as failures.",
    ),
    counter("taskfleet_llm_tokens_total", Unit::Count, "LLM tokens used by provider calls, by model and type."),
    counter(
        "taskfleet_llm_cost_microusd_total",
        Unit::Count,
        "Provider cost of LLM calls in millionths of a US dollar, by model.",
    ),
    gauge("taskfleet_embed_batch_size", Unit::Count, "Current adaptive batch size of embedding calls, by model."),
    counter(
        "taskfleet_provider_overflow_total",
        Unit::Count,
        "Calls moved on to the next provider of a chain, by provider and reason (no_token, 429).",
    ),
    histogram(
        "taskfleet_semantic_cache_lookup_seconds",
        "Duration of semantic cache lookups (embedding, index sync and search), by kind.",
    ),
    counter(
        "taskfleet_semantic_cache_lookups_total",
        Unit::Count,
        "Semantic cache lookups, by kind and outcome (hit, miss, bypass).",
    ),
    counter(
        "taskfleet_semantic_embed_failures_total",
        Unit::Count,
        "Embedding calls of semantic lookups that failed, by model and reason.",
    ),
    // --- shared state (Redis) -----------------------------------------------------------------
    gauge("taskfleet_redis_up", Unit::Count, "1 while Redis answers, 0 while this process falls back without it."),
    counter(
        "taskfleet_redis_fallback_total",
        Unit::Count,
        "Redis calls that failed and fell back to local behaviour, by operation.",
    ),
    counter("taskfleet_cache_lookups_total", Unit::Count, "Result cache lookups, by kind and outcome."),
    counter("taskfleet_cache_unreadable_total", Unit::Count, "Unreadable cache entries deleted, by kind."),
    counter(
        "taskfleet_cache_lease_lost_total",
        Unit::Count,
        "Single-flight leases that lapsed before they were renewed, by kind.",
    ),
    counter(
        "taskfleet_cache_too_large_total",
        Unit::Count,
        "Results not cached because they exceed the size limit, by kind.",
    ),
    counter(
        "taskfleet_semantic_index_rebuilds_total",
        Unit::Count,
        "Semantic indexes rebuilt because the vectors' dimension changed, by kind.",
    ),
    counter("taskfleet_rate_limit_total", Unit::Count, "Rate limit decisions, by limit and outcome."),
    counter("taskfleet_breaker_refused_total", Unit::Count, "Calls refused by an open circuit breaker, by dependency."),
    gauge(
        "taskfleet_breaker_state",
        Unit::Count,
        "Circuit breaker state by dependency: 0 closed, 1 half-open, 2 open.",
    ),
];

/// Registers the HELP text and unit of every metric in [`METRICS`] with the installed recorder.
pub fn describe_all() {
    for m in METRICS {
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, m.unit, m.help),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.unit, m.help),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, m.unit, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// `(kind, name)` of every `counter!("…")`, `gauge!("…")` and `histogram!("…")` in `src`.
    fn metric_calls(src: &str, out: &mut BTreeSet<(&'static str, String)>) {
        for (macro_name, kind) in [("counter!(", "counter"), ("gauge!(", "gauge"), ("histogram!(", "histogram")] {
            let mut rest = src;
            while let Some(at) = rest.find(macro_name) {
                let preceded_by_ident =
                    rest[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                rest = &rest[at + macro_name.len()..];
                let arg = rest.trim_start();
                if preceded_by_ident || !arg.starts_with('"') {
                    continue;
                }
                if let Some(end) = arg[1..].find('"') {
                    out.insert((kind, arg[1..1 + end].to_string()));
                }
            }
        }
    }

    fn walk(dir: &Path, out: &mut BTreeSet<(&'static str, String)>) {
        for entry in std::fs::read_dir(dir).expect("readable source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("catalogue.rs") {
                let src = std::fs::read_to_string(&path).expect("readable source file");
                metric_calls(&src, out);
            }
        }
    }

    #[test]
    fn every_metric_in_the_sources_is_described_with_its_type() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found = BTreeSet::new();
        walk(&crates, &mut found);
        assert!(found.len() > 40, "the scan found only {} metrics: is the crates directory where it was?", found.len());
        let listed: BTreeMap<&str, MetricKind> = METRICS.iter().map(|m| (m.name, m.kind)).collect();
        let mut missing = Vec::new();
        for (kind, name) in &found {
            let expected = match *kind {
                "counter" => MetricKind::Counter,
                "gauge" => MetricKind::Gauge,
                _ => MetricKind::Histogram,
            };
            if listed.get(name.as_str()) != Some(&expected) {
                missing.push(format!("{kind} {name}"));
            }
        }
        assert!(missing.is_empty(), "metrics used in the code but not in METRICS with that type: {missing:?}");
        let names: BTreeSet<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
        let stale: Vec<&str> = METRICS.iter().map(|m| m.name).filter(|n| !names.contains(n)).collect();
        assert!(stale.is_empty(), "METRICS lists metrics no code records: {stale:?}");
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = BTreeSet::new();
        for m in METRICS {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("taskfleet_"), "{}", m.name);
            assert!(!m.help.is_empty() && !m.help.contains('\n'), "{}: one line of HELP", m.name);
            assert_eq!(m.kind == MetricKind::Counter, m.name.ends_with("_total"), "{}: _total is for counters", m.name);
            if m.name.ends_with("_seconds") {
                assert_eq!(m.unit, Unit::Seconds, "{}", m.name);
            }
            if m.kind == MetricKind::Histogram {
                assert!(m.name.ends_with("_seconds"), "{}: histograms here are latencies", m.name);
            }
        }
    }

    #[test]
    fn bucket_bounds_increase() {
        for b in [LATENCY_BUCKETS, LOOKUP_BUCKETS] {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        }
        assert!(LATENCY_BUCKETS[0] <= 0.01 && *LATENCY_BUCKETS.last().unwrap_or(&0.0) >= 600.0);
    }
}
