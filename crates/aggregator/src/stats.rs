//! The aggregator's figures: per series (queue, kind, priority) counts and HDR histograms in
//! 5-second buckets over a sliding window, all-time totals, per-minute deltas waiting to be
//! written to Postgres, a history for charts, and the workers' latest status.

use crate::rollup::{from_rollup, to_rollup};
use crate::slot::{Counts, Slot, latency};
use std::collections::{BTreeMap, VecDeque};
use taskfleet_proto::{EventKind, Figures, HistoryPoint, SeriesFigures, TaskEvent, WorkerFigures, WorkerStatus};
use taskfleet_store::Rollup;

/// Width of one live bucket.
pub const BUCKET_MS: u64 = 5_000;
const MINUTE_MS: u64 = 60_000;

/// One series: what the figures are grouped by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    /// Queue.
    pub queue: String,
    /// Task kind.
    pub kind: String,
    /// Priority.
    pub priority: String,
}

#[derive(Default)]
struct Series {
    totals: Counts,
    buckets: BTreeMap<u64, Slot>,
}

/// Everything the aggregator knows.
pub struct Stats {
    window_ms: u64,
    history_len: usize,
    worker_timeout_ms: u64,
    started_ms: u64,
    series: BTreeMap<SeriesKey, Series>,
    pending: BTreeMap<(u64, SeriesKey), Slot>,
    history: VecDeque<HistoryPoint>,
    last_history_bucket: u64,
    workers: BTreeMap<String, WorkerStatus>,
}

impl Stats {
    /// Empty figures over a `window_ms` window, keeping `history_ms` of chart points.
    pub fn new(window_ms: u64, history_ms: u64, worker_timeout_ms: u64, now_ms: u64) -> Stats {
        Stats {
            window_ms: window_ms.max(BUCKET_MS),
            history_len: (history_ms / BUCKET_MS).max(1) as usize,
            worker_timeout_ms,
            started_ms: now_ms,
            series: BTreeMap::new(),
            pending: BTreeMap::new(),
            history: VecDeque::new(),
            last_history_bucket: now_ms - now_ms % BUCKET_MS,
            workers: BTreeMap::new(),
        }
    }

    /// Takes one event into the live window, the totals and the pending rollups.
    pub fn observe(&mut self, ev: &TaskEvent, now_ms: u64) {
        if !matches!(
            ev.kind,
            EventKind::Succeeded | EventKind::Failed | EventKind::Dead | EventKind::Cancelled | EventKind::Retrying
        ) {
            return;
        }
        let key = SeriesKey {
            queue: ev.queue.clone(),
            kind: ev.task_kind.clone(),
            priority: ev.priority.as_str().to_string(),
        };
        let at = if ev.at == 0 { now_ms } else { ev.at.min(now_ms) };
        let series = self.series.entry(key.clone()).or_default();
        series.totals.observe(ev);
        let bucket = at - at % BUCKET_MS;
        if at + self.window_ms >= now_ms {
            series.buckets.entry(bucket).or_default().observe(ev);
        }
        self.pending.entry((at - at % MINUTE_MS, key)).or_default().observe(ev);
    }

    /// Records a worker's report (a stopping worker is forgotten).
    pub fn worker_status(&mut self, status: WorkerStatus) {
        if status.stopping {
            self.workers.remove(&status.id);
        } else {
            self.workers.insert(status.id.clone(), status);
        }
    }

    /// Drops buckets that left the window and workers that stopped reporting, and closes
    /// history points of finished buckets. Call it about every second.
    pub fn tick(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms + BUCKET_MS);
        for s in self.series.values_mut() {
            s.buckets.retain(|start, _| *start >= oldest);
        }
        let timeout = self.worker_timeout_ms;
        self.workers.retain(|_, w| w.at + timeout >= now_ms);
        let current = now_ms - now_ms % BUCKET_MS;
        while self.last_history_bucket + BUCKET_MS <= current {
            let b = self.last_history_bucket;
            self.last_history_bucket += BUCKET_MS;
            let mut slot = Slot::default();
            let mut cached = false;
            for s in self.series.values() {
                cached |= s.totals.cache_hits > 0;
                if let Some(x) = s.buckets.get(&b) {
                    slot.merge(x);
                }
            }
            let point = self.point(b, &slot, BUCKET_MS, cached);
            self.push_history(point);
        }
    }

    fn point(&self, t: u64, slot: &Slot, span_ms: u64, cached: bool) -> HistoryPoint {
        let c = &slot.counts;
        HistoryPoint {
            t,
            throughput_per_s: c.finals as f64 * 1000.0 / span_ms as f64,
            p95_ms: latency(&slot.end_to_end).p95,
            error_rate: if c.finals == 0 { None } else { Some((c.failed + c.dead) as f64 / c.finals as f64) },
            cache_hit_rate: if cached && c.succeeded > 0 {
                Some(c.cache_hits as f64 / c.succeeded as f64)
            } else {
                None
            },
            cost_usd: c.cost_usd,
            workers: Some(self.workers.len() as u64),
        }
    }

    fn push_history(&mut self, p: HistoryPoint) {
        self.history.push_back(p);
        while self.history.len() > self.history_len {
            self.history.pop_front();
        }
    }

    /// The fleet's figures and every series', over the window ending `now_ms`.
    pub fn figures(&self, now_ms: u64) -> (Figures, Vec<SeriesFigures>) {
        let from = now_ms.saturating_sub(self.window_ms);
        let window_s = (now_ms.saturating_sub(self.started_ms.max(from))) as f64 / 1000.0;
        let (mut fleet_window, mut fleet_totals) = (Slot::default(), Counts::default());
        let (mut cached_window, mut any_cached, mut any_cost) = (Counts::default(), false, false);
        let mut series = Vec::new();
        for (key, s) in &self.series {
            let mut window = Slot::default();
            for (_, b) in s.buckets.range(from - from % BUCKET_MS..) {
                window.merge(b);
            }
            let cached = s.totals.cache_hits > 0;
            let costly = s.totals.cost_usd > 0.0;
            if cached {
                any_cached = true;
                cached_window.add(&window.counts);
            }
            any_cost |= costly;
            fleet_window.merge(&window);
            fleet_totals.add(&s.totals);
            series.push(SeriesFigures {
                queue: key.queue.clone(),
                kind: key.kind.clone(),
                priority: key.priority.clone(),
                figures: window.figures(&s.totals, window_s, cached, costly),
            });
        }
        let mut fleet = fleet_window.figures(&fleet_totals, window_s, false, any_cost);
        if any_cached && cached_window.succeeded > 0 {
            fleet.cache_hit_rate = Some(cached_window.cache_hits as f64 / cached_window.succeeded as f64);
        }
        let in_flight: u64 = self.workers.values().map(|w| w.in_flight).sum();
        let capacity: u64 = self.workers.values().map(|w| w.max_concurrent).sum();
        fleet.workers = Some(self.workers.len() as u64);
        fleet.in_flight = Some(in_flight);
        fleet.capacity = Some(capacity);
        fleet.utilization = (capacity > 0).then(|| in_flight as f64 / capacity as f64);
        (fleet, series)
    }

    /// Workers, as the dashboard shows them.
    pub fn workers(&self) -> Vec<WorkerFigures> {
        self.workers
            .values()
            .map(|w| WorkerFigures {
                id: w.id.clone(),
                queues: w.queues.clone(),
                in_flight: w.in_flight,
                buffered: w.buffered,
                max_concurrent: w.max_concurrent,
                cpu_percent: w.cpu_percent,
                rss_bytes: w.rss_bytes,
                memory_percent: w.memory_percent(),
                last_seen_ms: w.at,
            })
            .collect()
    }

    /// The chart points, oldest first.
    pub fn history(&self) -> Vec<HistoryPoint> {
        self.history.iter().cloned().collect()
    }

    /// Events observed since the last [`Stats::take_pending`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the per-minute deltas not yet written, as rollup rows.
    pub fn take_pending(&mut self) -> Vec<Rollup> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|((minute, key), slot)| to_rollup(minute, key, &slot))
            .collect()
    }

    /// Puts back rows whose write failed, to be written with the next ones.
    pub fn restore_pending(&mut self, rows: Vec<Rollup>) {
        for r in rows {
            let minute = r.minute_ms.max(0) as u64;
            let (key, slot) = from_rollup(r);
            self.pending.entry((minute, key)).or_default().merge(&slot);
        }
    }

    /// Rebuilds totals and history from what earlier runs wrote: `totals` are all-time sums per
    /// series, `recent` the rollups of the history span (one chart point per minute).
    pub fn restore(&mut self, totals: Vec<Rollup>, recent: Vec<Rollup>) {
        for r in totals {
            let (key, slot) = from_rollup(r);
            self.series.entry(key).or_default().totals.add(&slot.counts);
        }
        let cached = self.series.values().any(|s| s.totals.cache_hits > 0);
        let mut minutes: BTreeMap<u64, Slot> = BTreeMap::new();
        for r in recent {
            let minute = r.minute_ms.max(0) as u64;
            let (_, slot) = from_rollup(r);
            minutes.entry(minute).or_default().merge(&slot);
        }
        for (minute, slot) in minutes {
            let mut p = self.point(minute, &slot, MINUTE_MS, cached);
            p.workers = None;
            self.push_history(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_proto::{Timings, TokenUsage};

    fn ev(kind: EventKind, at: u64, e2e: u64, cache_hit: bool) -> TaskEvent {
        let mut e = TaskEvent::new(uuid::Uuid::now_v7(), kind, "default");
        e.task_kind = "llm.chat".into();
        e.attempt = 1;
        e.at = at;
        e.cache_hit = cache_hit;
        e.timings =
            Some(Timings { created_at: at - e2e, received_at: at - e2e, started_at: at - e2e / 2, finished_at: at });
        if !cache_hit {
            e.tokens = Some(TokenUsage { prompt: 10, completion: 5 });
            e.cost_usd = Some(0.01);
        } else {
            e.saved_usd = Some(0.01);
        }
        e
    }

    #[test]
    fn window_totals_rates_and_rollups() {
        let now = 1_000_000_000;
        let mut s = Stats::new(60_000, 3_600_000, 20_000, now - 120_000);
        // 90 successes (30 from the cache), 10 failures in the last minute; 50 older successes.
        for i in 0..90 {
            s.observe(&ev(EventKind::Succeeded, now - 1_000 - i * 100, 100 + i, i % 3 == 0), now);
        }
        for i in 0..10 {
            s.observe(&ev(EventKind::Failed, now - 2_000 - i, 1_000, false), now);
        }
        for i in 0..50 {
            s.observe(&ev(EventKind::Succeeded, now - 100_000 - i, 50, false), now);
        }
        let (fleet, series) = s.figures(now);
        assert_eq!(series.len(), 1);
        assert_eq!(fleet.completed_total, 150);
        assert_eq!(fleet.end_to_end_ms.count, 100);
        assert!((fleet.throughput_per_s - 100.0 / 60.0).abs() < 1e-9);
        assert_eq!(fleet.error_rate, Some(0.1));
        assert_eq!(fleet.cache_hit_rate, Some(30.0 / 90.0));
        assert_eq!(fleet.tokens_total.prompt, 1200);
        assert!((fleet.saved_usd_total - 0.3).abs() < 1e-9);
        let p95 = fleet.end_to_end_ms.p95.unwrap();
        assert!((990.0..=1010.0).contains(&p95), "{p95}");

        // Rollups: one row per minute touched, summing to the totals, and back again.
        let rows = s.take_pending();
        assert!(!s.has_pending());
        assert_eq!(rows.iter().map(|r| r.finals).sum::<i64>(), 150);
        let mut again = Stats::new(60_000, 3_600_000, 20_000, now);
        again.restore(rows.clone(), rows);
        let (f, _) = again.figures(now);
        assert_eq!(f.completed_total, 150);
        assert_eq!(f.cache_hits_total, 30);
        assert!(!again.history().is_empty());
    }

    #[test]
    fn workers_and_history() {
        let now = 1_000_000_000;
        let mut s = Stats::new(60_000, 3_600_000, 20_000, now - 20_000);
        let status = |id: &str, at: u64| WorkerStatus {
            id: id.into(),
            queues: vec!["default".into()],
            in_flight: 16,
            buffered: 0,
            max_concurrent: 64,
            cpu_percent: 50.0,
            rss_bytes: 100,
            memory_limit_bytes: 1000,
            at,
            stopping: false,
        };
        s.worker_status(status("a", now));
        s.worker_status(status("b", now - 30_000));
        s.tick(now);
        let (fleet, _) = s.figures(now);
        assert_eq!(fleet.workers, Some(1), "b stopped reporting");
        assert_eq!(fleet.utilization, Some(0.25));
        assert_eq!(s.workers()[0].memory_percent, 10.0);
        assert_eq!(s.history().len(), 4, "one point per finished 5 s bucket");
    }
}
