//! What one series records over one interval: event counts and sums ([`Counts`]) with latency
//! histograms ([`Slot`]), and the percentiles read from them.

use hdrhistogram::Histogram;
use taskfleet_proto::{EventKind, Figures, Latency, TaskEvent, Tokens};

/// Largest latency a histogram holds (longer values are clamped): one week, in ms.
const MAX_MS: u64 = 7 * 24 * 3_600_000;

/// Event counts and sums.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Final states.
    pub finals: u64,
    /// Succeeded.
    pub succeeded: u64,
    /// Failed.
    pub failed: u64,
    /// Dead.
    pub dead: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Attempts to be retried.
    pub retries: u64,
    /// Attempts that ended.
    pub attempts: u64,
    /// Results from the cache.
    pub cache_hits: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Spend, USD.
    pub cost_usd: f64,
    /// Spend avoided by cache hits, USD.
    pub saved_usd: f64,
}

impl Counts {
    /// Adds another interval's counts to these.
    pub fn add(&mut self, o: &Counts) {
        self.finals += o.finals;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.dead += o.dead;
        self.cancelled += o.cancelled;
        self.retries += o.retries;
        self.attempts += o.attempts;
        self.cache_hits += o.cache_hits;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.cost_usd += o.cost_usd;
        self.saved_usd += o.saved_usd;
    }

    /// Counts an event; false (and nothing counted) for kinds that end no attempt.
    pub fn observe(&mut self, ev: &TaskEvent) -> bool {
        match ev.kind {
            EventKind::Succeeded => self.succeeded += 1,
            EventKind::Failed => self.failed += 1,
            EventKind::Dead => self.dead += 1,
            EventKind::Cancelled => self.cancelled += 1,
            EventKind::Retrying => self.retries += 1,
            _ => return false,
        }
        if ev.kind.is_final() {
            self.finals += 1;
        }
        if ev.attempt > 0 {
            self.attempts += 1;
        }
        if ev.cache_hit {
            self.cache_hits += 1;
        }
        if let Some(t) = ev.tokens {
            self.prompt_tokens += t.prompt;
            self.completion_tokens += t.completion;
        }
        self.cost_usd += ev.cost_usd.unwrap_or(0.0);
        self.saved_usd += ev.saved_usd.unwrap_or(0.0);
        true
    }
}

/// Counts plus latency histograms (milliseconds).
#[derive(Debug, Clone)]
pub struct Slot {
    /// Counts and sums.
    pub counts: Counts,
    /// Created → started, first attempts.
    pub queue_wait: Histogram<u64>,
    /// Started → finished, every attempt that ran.
    pub run: Histogram<u64>,
    /// Created → final state.
    pub end_to_end: Histogram<u64>,
}

/// An empty latency histogram (1 ms to a week, two significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MS, 2).expect("constant histogram bounds are valid")
}

impl Default for Slot {
    fn default() -> Self {
        Slot { counts: Counts::default(), queue_wait: histogram(), run: histogram(), end_to_end: histogram() }
    }
}

impl Slot {
    /// Counts an event and records its latencies.
    pub fn observe(&mut self, ev: &TaskEvent) {
        if !self.counts.observe(ev) {
            return;
        }
        let Some(t) = ev.timings else { return };
        let record = |h: &mut Histogram<u64>, from: u64, to: u64| {
            if from > 0 && to >= from {
                h.saturating_record((to - from).clamp(1, MAX_MS));
            }
        };
        if ev.kind.is_final() {
            record(&mut self.end_to_end, t.created_at, t.finished_at);
        }
        if !ev.cache_hit {
            record(&mut self.run, t.started_at, t.finished_at);
        }
        if ev.attempt == 1 {
            record(&mut self.queue_wait, t.created_at, t.started_at);
        }
    }

    /// Adds another interval's counts and latencies to this one.
    pub fn merge(&mut self, o: &Slot) {
        self.counts.add(&o.counts);
        let _ = self.queue_wait.add(&o.queue_wait);
        let _ = self.run.add(&o.run);
        let _ = self.end_to_end.add(&o.end_to_end);
    }

    /// The figures of a series (or the fleet) whose window is this slot and whose all-time
    /// counts are `totals`. `cached`: the cache ever served the series; `costly`: it ever cost
    /// anything (the rates that need either are `None` otherwise).
    pub fn figures(&self, totals: &Counts, window_s: f64, cached: bool, costly: bool) -> Figures {
        let w = &self.counts;
        let ratio = |a: u64, b: u64| if b == 0 { None } else { Some(a as f64 / b as f64) };
        Figures {
            throughput_per_s: w.finals as f64 / window_s.max(1.0),
            completed_total: totals.finals,
            succeeded_total: totals.succeeded,
            failed_total: totals.failed,
            dead_total: totals.dead,
            cancelled_total: totals.cancelled,
            retries_total: totals.retries,
            cache_hits_total: totals.cache_hits,
            error_rate: ratio(w.failed + w.dead, w.finals),
            retry_rate: ratio(w.retries, w.attempts),
            cache_hit_rate: if cached { ratio(w.cache_hits, w.succeeded) } else { None },
            tokens_total: Tokens { prompt: totals.prompt_tokens, completion: totals.completion_tokens },
            cost_usd_total: totals.cost_usd,
            saved_usd_total: totals.saved_usd,
            cost_per_task_usd: if costly && w.finals > 0 { Some(w.cost_usd / w.finals as f64) } else { None },
            queue_wait_ms: latency(&self.queue_wait),
            run_ms: latency(&self.run),
            end_to_end_ms: latency(&self.end_to_end),
            workers: None,
            utilization: None,
            in_flight: None,
            capacity: None,
        }
    }
}

/// The percentiles of a histogram; all `None` when it is empty.
pub fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    let q = |p: f64| Some(h.value_at_quantile(p) as f64);
    Latency { count: h.len(), p50: q(0.5), p95: q(0.95), p99: q(0.99), max: Some(h.max() as f64) }
}
