//! Figures per run name (`RunSpec.name`): runs started, running, ended by state, their
//! durations, tokens, cost and savings, over the sliding window in 5-second buckets and since
//! the aggregator started.
//!
//! Fed by two sources (see `run_watch` in the binary): the runs listed `running` in Postgres,
//! read every few seconds ([`Runs::running`]), and each run's end, announced on core NATS and
//! read back with its totals ([`Runs::ended`]). A run is counted as started once, by whichever
//! source sees it first, at its creation time. Memory is bounded: at most [`MAX_NAMES`] names
//! (later ones are summed as [`OTHER`]), and the runs remembered by id are those running plus
//! those that started or ended within about a window.

use crate::slot::{histogram, latency};
use crate::stats::BUCKET_MS;
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, HashMap};
use taskfleet_proto::{RunFigures, RunState, RunSummary, RunTotals, Tokens};
use uuid::Uuid;

/// Most run names kept apart; runs of later names are summed under [`OTHER`].
pub const MAX_NAMES: usize = 50;
/// The name the runs beyond [`MAX_NAMES`] names are summed under.
pub const OTHER: &str = "other";
/// The name of runs submitted without one.
pub const UNNAMED: &str = "(unnamed)";
/// Largest duration a histogram holds (longer ones are clamped): one week, in ms.
const MAX_MS: u64 = 7 * 24 * 3_600_000;

/// A run that ended, as read back from the store.
#[derive(Debug, Clone)]
pub struct EndedRun {
    /// The run.
    pub id: Uuid,
    /// Its name.
    pub name: Option<String>,
    /// Its final state.
    pub state: RunState,
    /// Creation, Unix epoch ms.
    pub created_at: u64,
    /// End, Unix epoch ms.
    pub finished_at: u64,
    /// Sums over its attempts.
    pub totals: RunTotals,
}

/// Ends and what they summed.
#[derive(Debug, Clone, Default)]
struct Ends {
    succeeded: u64,
    failed: u64,
    cancelled: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    attempts: u64,
    cost_usd: f64,
    saved_usd: f64,
}

impl Ends {
    fn observe(&mut self, run: &EndedRun) {
        match run.state {
            RunState::Succeeded => self.succeeded += 1,
            RunState::Failed => self.failed += 1,
            RunState::Cancelled => self.cancelled += 1,
            RunState::Running => return,
        }
        let t = &run.totals;
        self.prompt_tokens += t.prompt_tokens;
        self.completion_tokens += t.completion_tokens;
        self.attempts += t.attempts;
        self.cost_usd += t.cost_usd;
        self.saved_usd += t.saved_usd;
    }

    fn add(&mut self, o: &Ends) {
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.cancelled += o.cancelled;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.attempts += o.attempts;
        self.cost_usd += o.cost_usd;
        self.saved_usd += o.saved_usd;
    }

    fn count(&self) -> u64 {
        self.succeeded + self.failed + self.cancelled
    }
}

/// One 5-second bucket of one name.
struct Bucket {
    started: u64,
    ends: Ends,
    duration: Histogram<u64>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket { started: 0, ends: Ends::default(), duration: histogram() }
    }
}

#[derive(Default)]
struct Name {
    running: u64,
    started_total: u64,
    ends_total: Ends,
    buckets: BTreeMap<u64, Bucket>,
}

/// A run remembered by id, so that it is counted as started once and its end once.
struct Known {
    name: String,
    /// Its last end (a resumed run ends again later), Unix epoch ms.
    ended_at: Option<u64>,
    /// When that end was taken, on the aggregator's clock.
    end_taken_at: u64,
    /// In the latest listing of running runs.
    listed: bool,
    /// When it was last listed, started or ended, Unix epoch ms.
    seen_at: u64,
}

/// The figures of every run name.
pub struct Runs {
    window_ms: u64,
    started_ms: u64,
    names: BTreeMap<String, Name>,
    known: HashMap<Uuid, Known>,
}

impl Runs {
    /// No runs yet, over a `window_ms` window; runs created before `now_ms` (the aggregator's
    /// start) are not counted as started.
    pub fn new(window_ms: u64, now_ms: u64) -> Runs {
        Runs { window_ms: window_ms.max(BUCKET_MS), started_ms: now_ms, names: BTreeMap::new(), known: HashMap::new() }
    }

    /// The name a run is counted under: its own while fewer than [`MAX_NAMES`] are kept.
    fn key(&mut self, name: Option<&str>) -> String {
        let name = name.filter(|n| !n.is_empty()).unwrap_or(UNNAMED);
        let kept = self.names.len() - usize::from(self.names.contains_key(OTHER));
        if self.names.contains_key(name) || (kept < MAX_NAMES && name != OTHER) {
            name.to_string()
        } else {
            OTHER.to_string()
        }
    }

    fn in_window(&self, at: u64, now_ms: u64) -> bool {
        at + self.window_ms >= now_ms
    }

    /// Remembers a run, counting it as started (at `created_at`) if it is new to us and was
    /// created since the aggregator started. Returns the name it is counted under.
    fn see(&mut self, id: Uuid, name: Option<&str>, created_at: u64, now_ms: u64) -> String {
        if let Some(k) = self.known.get_mut(&id) {
            k.seen_at = now_ms;
            return k.name.clone();
        }
        let key = self.key(name);
        let counts = created_at >= self.started_ms;
        let at = created_at.min(now_ms);
        let windowed = self.in_window(at, now_ms);
        let n = self.names.entry(key.clone()).or_default();
        if counts {
            n.started_total += 1;
            if windowed {
                n.buckets.entry(at - at % BUCKET_MS).or_default().started += 1;
            }
        }
        self.known
            .insert(id, Known { name: key.clone(), ended_at: None, end_taken_at: 0, listed: false, seen_at: now_ms });
        key
    }

    /// Takes the latest listing of running runs (only `running` entries are read), asked for
    /// at `asked_at`. A run listed after its end was taken was resumed and runs again; one
    /// whose end was taken after the listing was asked for is still ended (the listing is
    /// older than the end).
    pub fn running(&mut self, listed: &[RunSummary], asked_at: u64, now_ms: u64) {
        for k in self.known.values_mut() {
            k.listed = false;
        }
        for r in listed.iter().filter(|r| r.state == RunState::Running) {
            self.see(r.id, r.name.as_deref(), r.created_at, now_ms);
            if let Some(k) = self.known.get_mut(&r.id) {
                k.listed = true;
                if k.ended_at.is_some() && k.end_taken_at < asked_at {
                    k.ended_at = None;
                }
            }
        }
        self.count_running();
    }

    /// Takes a run's end; the same end seen twice is counted once.
    pub fn ended(&mut self, run: &EndedRun, now_ms: u64) {
        if !run.state.is_final() {
            return;
        }
        let key = self.see(run.id, run.name.as_deref(), run.created_at, now_ms);
        let finished = if run.finished_at == 0 { now_ms } else { run.finished_at.min(now_ms) };
        if let Some(k) = self.known.get_mut(&run.id) {
            if k.ended_at == Some(finished) {
                return;
            }
            k.ended_at = Some(finished);
            k.end_taken_at = now_ms;
        }
        let windowed = self.in_window(finished, now_ms);
        let n = self.names.entry(key).or_default();
        n.ends_total.observe(run);
        if windowed {
            let b = n.buckets.entry(finished - finished % BUCKET_MS).or_default();
            b.ends.observe(run);
            if run.created_at > 0 && finished >= run.created_at {
                b.duration.saturating_record((finished - run.created_at).clamp(1, MAX_MS));
            }
        }
        self.count_running();
    }

    fn count_running(&mut self) {
        for n in self.names.values_mut() {
            n.running = 0;
        }
        for k in self.known.values().filter(|k| k.listed && k.ended_at.is_none()) {
            if let Some(n) = self.names.get_mut(&k.name) {
                n.running += 1;
            }
        }
    }

    /// Drops buckets that left the window and forgets runs neither running nor seen within
    /// about a window. Call it about every second.
    pub fn tick(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms + BUCKET_MS);
        for n in self.names.values_mut() {
            n.buckets.retain(|start, _| *start >= oldest);
        }
        self.known.retain(|_, k| (k.listed && k.ended_at.is_none()) || k.seen_at >= oldest);
    }

    /// Every name's figures over the window ending `now_ms`, by name, [`OTHER`] last.
    pub fn figures(&self, now_ms: u64) -> Vec<RunFigures> {
        let from = now_ms.saturating_sub(self.window_ms);
        let mut out: Vec<RunFigures> = self
            .names
            .iter()
            .map(|(name, n)| {
                let (mut started, mut ends, mut duration) = (0, Ends::default(), histogram());
                for (_, b) in n.buckets.range(from - from % BUCKET_MS..) {
                    started += b.started;
                    ends.add(&b.ends);
                    let _ = duration.add(&b.duration);
                }
                let t = &n.ends_total;
                RunFigures {
                    name: name.clone(),
                    running: n.running,
                    started,
                    succeeded: ends.succeeded,
                    failed: ends.failed,
                    cancelled: ends.cancelled,
                    started_total: n.started_total,
                    succeeded_total: t.succeeded,
                    failed_total: t.failed,
                    cancelled_total: t.cancelled,
                    duration_ms: latency(&duration),
                    tokens_total: Tokens { prompt: t.prompt_tokens, completion: t.completion_tokens },
                    attempts_total: t.attempts,
                    cost_usd_total: t.cost_usd,
                    cost_per_run_usd: (ends.count() > 0).then(|| ends.cost_usd / ends.count() as f64),
                    saved_usd_total: t.saved_usd,
                }
            })
            .collect();
        out.sort_by_key(|r| r.name == OTHER);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000_000;

    fn listed(id: Uuid, name: &str, created_at: u64) -> RunSummary {
        RunSummary {
            id,
            name: Some(name.into()),
            state: RunState::Running,
            tasks: 2,
            remaining: 1,
            created_at,
            finished_at: None,
        }
    }

    fn ended(id: Uuid, name: &str, state: RunState, created_at: u64, finished_at: u64) -> EndedRun {
        EndedRun {
            id,
            name: Some(name.into()),
            state,
            created_at,
            finished_at,
            totals: RunTotals {
                attempts: 3,
                prompt_tokens: 10,
                completion_tokens: 5,
                cost_usd: 0.02,
                saved_usd: 0.01,
                ..Default::default()
            },
        }
    }

    #[test]
    fn started_running_and_ended_are_counted_once() {
        let mut r = Runs::new(60_000, NOW - 100_000);
        let (a, b, c, old) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // Listed twice while running: started once; one from before the aggregator: running only.
        let list = [listed(a, "research", NOW - 3_000), listed(b, "research", NOW - 2_000), listed(old, "research", 1)];
        r.running(&list, NOW - 1_000, NOW - 1_000);
        r.running(&list, NOW, NOW);
        // a ends (its notice twice); c started and ended between two listings.
        r.ended(&ended(a, "research", RunState::Succeeded, NOW - 3_000, NOW - 500), NOW);
        r.ended(&ended(a, "research", RunState::Succeeded, NOW - 3_000, NOW - 500), NOW);
        r.ended(&ended(c, "quorum", RunState::Failed, NOW - 1_500, NOW - 100), NOW);
        // A listing asked for before a ended, read after its end: a stays ended.
        r.running(&list, NOW - 1, NOW);
        let f = r.figures(NOW);
        assert_eq!(f.len(), 2);
        let (quorum, research) = (&f[0], &f[1]);
        assert_eq!(
            (research.name.as_str(), research.running, research.started, research.started_total),
            ("research", 2, 2, 2)
        );
        assert_eq!((research.succeeded, research.failed, research.succeeded_total), (1, 0, 1));
        assert_eq!(research.duration_ms.count, 1);
        let p50 = research.duration_ms.p50.unwrap_or_default();
        assert!((2_480.0..=2_520.0).contains(&p50), "{p50}");
        assert_eq!((research.tokens_total.prompt, research.attempts_total), (10, 3));
        assert!((research.cost_usd_total - 0.02).abs() < 1e-12 && (research.saved_usd_total - 0.01).abs() < 1e-12);
        assert_eq!(research.cost_per_run_usd, Some(0.02));
        assert_eq!((quorum.name.as_str(), quorum.running, quorum.started, quorum.failed), ("quorum", 0, 1, 1));

        // After the window: window counts are gone, totals stay; ended runs are forgotten, the
        // running ones are not (and are not started again).
        let later = NOW + 120_000;
        r.tick(later);
        r.running(&list[1..], later, later);
        let f = r.figures(later);
        let research = &f[1];
        assert_eq!((research.started, research.succeeded, research.duration_ms.count), (0, 0, 0));
        assert_eq!((research.started_total, research.succeeded_total, research.running), (2, 1, 2));
        assert_eq!(research.cost_per_run_usd, None);
        assert_eq!(r.known.len(), 2, "only the running runs are remembered");

        // b is resumed after it ended: listed again later, it runs again, and its second end counts.
        r.ended(&ended(b, "research", RunState::Failed, NOW - 2_000, later - 10), later);
        assert_eq!(r.figures(later)[1].running, 1);
        r.running(&list[1..], later + 5_000, later + 5_000);
        assert_eq!(r.figures(later + 5_000)[1].running, 2);
        r.ended(&ended(b, "research", RunState::Succeeded, NOW - 2_000, later + 6_000), later + 6_000);
        let research = &r.figures(later + 6_000)[1];
        assert_eq!(
            (research.running, research.failed_total, research.succeeded_total, research.started_total),
            (1, 1, 2, 2)
        );
    }

    #[test]
    fn names_are_bounded() {
        let mut r = Runs::new(60_000, NOW - 10_000);
        for i in 0..MAX_NAMES + 5 {
            r.ended(&ended(Uuid::now_v7(), &format!("n{i:02}"), RunState::Succeeded, NOW - 10, NOW - 1), NOW);
        }
        r.ended(&EndedRun { name: None, ..ended(Uuid::now_v7(), "", RunState::Cancelled, NOW - 10, NOW) }, NOW);
        r.ended(&ended(Uuid::now_v7(), "n00", RunState::Succeeded, NOW - 10, NOW - 1), NOW);
        let f = r.figures(NOW);
        assert_eq!(f.len(), MAX_NAMES + 1);
        let other = &f[MAX_NAMES];
        assert_eq!((other.name.as_str(), other.succeeded, other.cancelled), (OTHER, 5, 1));
        assert_eq!(f[0].succeeded, 2, "a kept name keeps counting");
    }
}
