//! Figures per run name (`RunSpec.name`): runs started, running, ended by state, their
//! durations, tokens, cost and savings, over the sliding window in 5-second buckets and since
//! the aggregator started.
//!
//! Fed by two sources (see `run_watch` in the binary): a poll of Postgres every few seconds
//! ([`Runs::polled`]) counting per name the runs `running` and the runs created per 5-second
//! bucket since the oldest bucket the window shows, and each run's end, announced on core NATS
//! and read back with its totals ([`Runs::ended`]). Starts come only from the creation counts,
//! each bucket's replaced by every poll until it is final, so a run is counted as started once
//! at its creation time however many runs there are. Memory is bounded: at most [`MAX_NAMES`]
//! names (later ones are summed as [`OTHER`]), buckets of about a window, and the runs
//! remembered by id are those that ended within about a window.

use crate::slot::{histogram, latency};
use crate::stats::BUCKET_MS;
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, HashMap};
use taskfleet_proto::{RunFigures, RunState, RunTotals, Tokens};
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

/// One 5-second bucket of one name: the runs that ended in it.
struct Bucket {
    ends: Ends,
    duration: Histogram<u64>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket { ends: Ends::default(), duration: histogram() }
    }
}

#[derive(Default)]
struct Name {
    /// Runs `running` at the latest poll, less those whose end was taken since.
    running: u64,
    /// Runs created per 5-second bucket (start ms), as the latest poll read them.
    starts: BTreeMap<u64, u64>,
    /// Runs created in buckets no longer read (final counts, folded out of `starts`).
    started_before: u64,
    ends_total: Ends,
    buckets: BTreeMap<u64, Bucket>,
}

/// An ended run remembered by id, so that its end is counted once.
struct Known {
    name: String,
    /// Its creation, Unix epoch ms.
    created_at: u64,
    /// Its last end (a resumed run ends again later), Unix epoch ms.
    ended_at: u64,
    /// When that end was taken, on the aggregator's clock.
    end_taken_at: u64,
    /// The poll (its `asked_at`) whose running count this end was taken off.
    taken_off: Option<u64>,
    /// When it was last ended, Unix epoch ms.
    seen_at: u64,
}

/// What one poll of Postgres read: the runs `running` per name (all of them), and the runs
/// created since [`Runs::since`] per name and 5-second bucket, whatever their state now.
#[derive(Debug, Clone, Default)]
pub struct Poll {
    /// `(name, runs running)`.
    pub running: Vec<(Option<String>, u64)>,
    /// `(name, bucket start ms, runs created)`.
    pub created: Vec<(Option<String>, u64, u64)>,
}

/// The figures of every run name.
pub struct Runs {
    window_ms: u64,
    started_ms: u64,
    names: BTreeMap<String, Name>,
    known: HashMap<Uuid, Known>,
    /// The lower bound of the latest poll's creation counts.
    since: u64,
    /// When the latest poll was asked for.
    asked_at: Option<u64>,
}

impl Runs {
    /// No runs yet, over a `window_ms` window; runs created before `now_ms` (the aggregator's
    /// start) are not counted as started.
    pub fn new(window_ms: u64, now_ms: u64) -> Runs {
        Runs {
            window_ms: window_ms.max(BUCKET_MS),
            started_ms: now_ms,
            names: BTreeMap::new(),
            known: HashMap::new(),
            since: now_ms,
            asked_at: None,
        }
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

    /// From when a poll asked for at `asked_at` should count the runs created: the start of
    /// the oldest bucket the window may still show (never before the aggregator started, and
    /// never earlier than the previous poll's bound). Buckets before it were read whole by
    /// earlier polls and are final.
    pub fn since(&self, asked_at: u64) -> u64 {
        let oldest = asked_at.saturating_sub(self.window_ms + BUCKET_MS);
        (oldest - oldest % BUCKET_MS).max(self.started_ms).max(self.since)
    }

    /// Takes a poll asked for at `asked_at`, its creation counts read from `since` (as
    /// [`Runs::since`] gave it). Creation counts replace those of the buckets the poll read
    /// (each run is in exactly one bucket, read by one poll after another until the bucket
    /// is older than `since` and its count final), so no run is counted as started twice,
    /// however many run at once or how often they are polled. Running counts replace the
    /// previous ones, less the runs whose end was taken after the poll was asked for (the
    /// poll is older than those ends).
    pub fn polled(&mut self, poll: &Poll, since: u64, asked_at: u64) {
        let since = since.max(self.since);
        for n in self.names.values_mut() {
            // Buckets reaching past `since` are read again (their counts are replaced below);
            // those wholly before it will not be, and their counts are final.
            let _read_again = n.starts.split_off(&since.saturating_sub(BUCKET_MS - 1));
            n.started_before += n.starts.values().sum::<u64>();
            n.starts.clear();
            n.running = 0;
        }
        for (name, bucket, count) in &poll.created {
            if bucket + BUCKET_MS <= since {
                continue;
            }
            let key = self.key(name.as_deref());
            *self.names.entry(key).or_default().starts.entry(*bucket).or_default() += count;
        }
        for (name, count) in &poll.running {
            let key = self.key(name.as_deref());
            self.names.entry(key).or_default().running += count;
        }
        self.since = since;
        self.asked_at = Some(asked_at);
        // Ends taken since the poll was asked for, of runs it counted as running.
        let ids: Vec<Uuid> = self
            .known
            .iter()
            .filter(|(_, k)| k.end_taken_at >= asked_at && k.created_at <= asked_at && k.ended_at > asked_at)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.take_off(id, asked_at);
        }
    }

    /// Takes an ended run off the running count of the poll asked for at `asked_at`, once.
    fn take_off(&mut self, id: Uuid, asked_at: u64) {
        let Some(k) = self.known.get_mut(&id) else { return };
        if k.taken_off == Some(asked_at) {
            return;
        }
        k.taken_off = Some(asked_at);
        if let Some(n) = self.names.get_mut(&k.name) {
            n.running = n.running.saturating_sub(1);
        }
    }

    /// Takes a run's end; the same end seen twice is counted once. Its start is not counted
    /// here (polls count every run created, ended or not).
    pub fn ended(&mut self, run: &EndedRun, now_ms: u64) {
        if !run.state.is_final() {
            return;
        }
        let finished = if run.finished_at == 0 { now_ms } else { run.finished_at.min(now_ms) };
        let key = match self.known.get_mut(&run.id) {
            Some(k) if k.ended_at == finished => return,
            Some(k) => {
                (k.ended_at, k.end_taken_at, k.seen_at) = (finished, now_ms, now_ms);
                k.name.clone()
            }
            None => {
                let key = self.key(run.name.as_deref());
                let k = Known {
                    name: key.clone(),
                    created_at: run.created_at,
                    ended_at: finished,
                    end_taken_at: now_ms,
                    taken_off: None,
                    seen_at: now_ms,
                };
                self.known.insert(run.id, k);
                key
            }
        };
        // Counted as running by the latest poll: no longer.
        if let Some(asked_at) = self.asked_at
            && run.created_at <= asked_at
            && finished > asked_at
        {
            self.take_off(run.id, asked_at);
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
    }

    /// Drops buckets that left the window and forgets ended runs not seen within about a
    /// window. Call it about every second.
    pub fn tick(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms + BUCKET_MS);
        for n in self.names.values_mut() {
            n.buckets.retain(|start, _| *start >= oldest);
        }
        self.known.retain(|_, k| k.seen_at >= oldest);
    }

    /// Every name's figures over the window ending `now_ms`, by name, [`OTHER`] last.
    pub fn figures(&self, now_ms: u64) -> Vec<RunFigures> {
        let from = now_ms.saturating_sub(self.window_ms);
        let mut out: Vec<RunFigures> = self
            .names
            .iter()
            .map(|(name, n)| {
                let (mut ends, mut duration) = (Ends::default(), histogram());
                let started = n.starts.range(from - from % BUCKET_MS..).map(|(_, c)| c).sum();
                for (_, b) in n.buckets.range(from - from % BUCKET_MS..) {
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
                    started_total: n.started_before + n.starts.values().sum::<u64>(),
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

    /// A run as the test's stand-in for Postgres holds it.
    struct Row {
        id: Uuid,
        name: &'static str,
        created_at: u64,
        running: bool,
    }

    fn row(id: Uuid, name: &'static str, created_at: u64) -> Row {
        Row { id, name, created_at, running: true }
    }

    fn set_running(db: &mut [Row], id: Uuid, running: bool) {
        db.iter_mut().filter(|r| r.id == id).for_each(|r| r.running = running);
    }

    /// A poll asked for at `asked_at`, answered as the store's grouped queries would.
    fn poll(r: &mut Runs, db: &[Row], asked_at: u64) {
        let since = r.since(asked_at);
        let mut running = BTreeMap::<&str, u64>::new();
        let mut created = BTreeMap::<(&str, u64), u64>::new();
        for row in db.iter().filter(|row| row.created_at <= asked_at) {
            if row.running {
                *running.entry(row.name).or_default() += 1;
            }
            if row.created_at >= since {
                *created.entry((row.name, row.created_at - row.created_at % BUCKET_MS)).or_default() += 1;
            }
        }
        let poll = Poll {
            running: running.into_iter().map(|(n, c)| (Some(n.to_string()), c)).collect(),
            created: created.into_iter().map(|((n, b), c)| (Some(n.to_string()), b, c)).collect(),
        };
        r.polled(&poll, since, asked_at);
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
        // Polled twice while running: started once; one from before the aggregator: running
        // only. c starts and ends between two polls.
        let mut db = vec![
            row(a, "research", NOW - 3_000),
            row(b, "research", NOW - 2_000),
            row(old, "research", 1),
            Row { running: false, ..row(c, "quorum", NOW - 1_500) },
        ];
        poll(&mut r, &db, NOW - 1_800);
        // a ends (its notice twice), and c's end is taken.
        set_running(&mut db, a, false);
        r.ended(&ended(a, "research", RunState::Succeeded, NOW - 3_000, NOW - 500), NOW - 400);
        r.ended(&ended(a, "research", RunState::Succeeded, NOW - 3_000, NOW - 500), NOW - 400);
        r.ended(&ended(c, "quorum", RunState::Failed, NOW - 1_500, NOW - 100), NOW);
        assert_eq!(r.figures(NOW)[1].running, 2, "a's end is taken off the poll's count");
        // A poll asked for before a ended, read after its end: a stays ended.
        set_running(&mut db, a, true);
        poll(&mut r, &db, NOW - 600);
        set_running(&mut db, a, false);
        let f = r.figures(NOW);
        assert_eq!(f.len(), 2);
        let (quorum, research) = (&f[0], &f[1]);
        assert_eq!(
            (research.name.as_str(), research.running, research.started, research.started_total),
            ("research", 2, 2, 2)
        );
        poll(&mut r, &db, NOW);
        let f = r.figures(NOW);
        let research = &f[1];
        assert_eq!((research.running, research.started, research.started_total), (2, 2, 2));
        assert_eq!((research.succeeded, research.failed, research.succeeded_total), (1, 0, 1));
        assert_eq!(research.duration_ms.count, 1);
        let p50 = research.duration_ms.p50.unwrap_or_default();
        assert!((2_480.0..=2_520.0).contains(&p50), "{p50}");
        assert_eq!((research.tokens_total.prompt, research.attempts_total), (10, 3));
        assert!((research.cost_usd_total - 0.02).abs() < 1e-12 && (research.saved_usd_total - 0.01).abs() < 1e-12);
        assert_eq!(research.cost_per_run_usd, Some(0.02));
        assert_eq!((quorum.name.as_str(), quorum.running, quorum.started, quorum.failed), ("quorum", 0, 1, 1));

        // After the window: window counts are gone, totals stay; ended runs are forgotten, and
        // the running ones are not started again.
        let later = NOW + 120_000;
        r.tick(later);
        poll(&mut r, &db, later);
        let f = r.figures(later);
        let research = &f[1];
        assert_eq!((research.started, research.succeeded, research.duration_ms.count), (0, 0, 0));
        assert_eq!((research.started_total, research.succeeded_total, research.running), (2, 1, 2));
        assert_eq!(research.cost_per_run_usd, None);
        assert_eq!(f[0].started_total, 1);
        assert!(r.known.is_empty(), "ended runs are forgotten after the window");

        // b ends, is resumed: polled again later, it runs again, and its second end counts.
        set_running(&mut db, b, false);
        r.ended(&ended(b, "research", RunState::Failed, NOW - 2_000, later + 1_000), later + 1_000);
        assert_eq!(r.figures(later + 1_000)[1].running, 1);
        set_running(&mut db, b, true);
        poll(&mut r, &db, later + 5_000);
        assert_eq!(r.figures(later + 5_000)[1].running, 2);
        set_running(&mut db, b, false);
        r.ended(&ended(b, "research", RunState::Succeeded, NOW - 2_000, later + 6_000), later + 6_000);
        let research = &r.figures(later + 6_000)[1];
        assert_eq!(
            (research.running, research.failed_total, research.succeeded_total, research.started_total),
            (1, 1, 2, 2)
        );
    }

    /// Far more running runs than a listing would hold (1,500): all are running, each is
    /// started once however often it is polled, and their ends long after the window (when
    /// the aggregator has forgotten them) do not start them again.
    #[test]
    fn many_running_runs_are_counted_and_started_once() {
        let mut r = Runs::new(60_000, NOW - 100_000);
        let mut db: Vec<Row> = (0..1_500).map(|i| row(Uuid::now_v7(), "bulk", NOW - 30_000 + i * 10)).collect();
        for t in [NOW, NOW + 2_000, NOW + 4_000] {
            poll(&mut r, &db, t);
            let f = &r.figures(t)[0];
            assert_eq!((f.running, f.started, f.started_total), (1_500, 1_500, 1_500));
        }
        // Hours later, polled every few seconds meanwhile: still running, started once.
        let mut t = NOW + 4_000;
        while t < NOW + 3_600_000 {
            t += 2_000;
            poll(&mut r, &db, t);
            r.tick(t);
        }
        let f = &r.figures(t)[0];
        assert_eq!((f.running, f.started, f.started_total), (1_500, 0, 1_500));
        // They all end: none is started again, and none runs.
        for row in &mut db {
            row.running = false;
            r.ended(&ended(row.id, "bulk", RunState::Succeeded, row.created_at, t + 100), t + 200);
        }
        let f = &r.figures(t + 200)[0];
        assert_eq!((f.running, f.started_total, f.succeeded, f.succeeded_total), (0, 1_500, 1_500, 1_500));
        poll(&mut r, &db, t + 2_000);
        let f = &r.figures(t + 2_000)[0];
        assert_eq!((f.running, f.started_total, f.succeeded_total), (0, 1_500, 1_500));
        // Runs created later are counted once each, across the fold of their buckets.
        let first_new = db.len();
        for i in 0..20 {
            db.push(row(Uuid::now_v7(), "bulk", t + 2_500 + i * 700));
        }
        let mut u = t + 2_000;
        while u < t + 200_000 {
            u += 2_000;
            poll(&mut r, &db, u);
            r.tick(u);
        }
        assert_eq!(db.len() - first_new, 20);
        let f = &r.figures(u)[0];
        assert_eq!((f.running, f.started, f.started_total), (20, 0, 1_520));
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
