//! The rescuer: a timer that finds tasks Postgres shows in flight but JetStream no longer
//! holds (a dispatch message lost with a nats-server, a dispatch publish that failed after the
//! commit) and dispatches them again, so that a lost message costs a re-run, never a task. It
//! also releases pending tasks whose dependencies have all succeeded if their release was
//! missed, and fails runs past their deadline.
//!
//! A task is known lost, even while its lane is busy, by watermarks: every round notes the
//! last sequence of the dispatch and event streams. Once a lane's consumer has settled
//! (acknowledged or terminated) every message up to the sequence noted at time T, every
//! message of that lane published before T is done with; once the coordinator's event
//! consumers have settled every event stored before that observation, the events of those
//! messages are recorded. A task dispatched before T (less `rescue_idle`, the margin between
//! a dispatch's commit and its publish), untouched since and still in flight in Postgres, then
//! has no message left. A long-running task holds its lane's floor back, which delays rescues
//! in that lane but never causes a wrong one.
//!
//! One replica runs it at a time: each round starts by taking a session-level Postgres
//! advisory lock, so coordinators can run as several replicas without double work.

use crate::{Ctx, dispatch};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use taskfleet_bus::{ConsumerProgress, Topology};
use taskfleet_proto::Priority;
use tokio_util::sync::CancellationToken;

/// Rounds completed, for tests and metrics: background loops expose a signal instead of making
/// tests sleep.
pub(crate) static ROUNDS: AtomicU64 = AtomicU64::new(0);

/// Tasks redispatched per lane and round, at most.
const CLAIM_LIMIT: i64 = 1_000;

/// Stream positions remembered, one per round (an hour at the default interval).
const SNAPSHOTS_KEPT: usize = 720;

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let interval = ctx.config.coordinator.rescue_interval;
    let mut leader = crate::leader::Leadership::new("rescuer");
    let mut marks = Watermarks::default();
    let beat = ctx.liveness.register("rescuer", crate::periodic_max_silence(interval));
    loop {
        beat.tick();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
        match leader.hold(&ctx.store).await {
            None => continue,
            Some(true) => marks = Watermarks::default(),
            Some(false) => {}
        }
        if let Err(e) = round(&ctx, &mut marks).await {
            tracing::warn!(error = %e, "rescue round failed");
        }
        if let Err(e) = crate::runs::expire(&ctx).await {
            tracing::warn!(error = %e, "cannot expire runs past their deadline this round");
        }
        ROUNDS.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("taskfleet_coordinator_rescue_rounds_total").increment(1);
    }
}

/// Positions of the dispatch and event streams over time, and per lane what is known settled.
#[derive(Default)]
struct Watermarks {
    /// (when, dispatch stream last sequence, event stream last sequence), oldest first.
    snapshots: VecDeque<(SystemTime, u64, u64)>,
    /// Per lane: (when observed, every message published before this time is settled).
    lanes: HashMap<(String, Priority), VecDeque<(SystemTime, SystemTime)>>,
}

impl Watermarks {
    /// Notes the streams' positions now. A position lower than the last one means the server
    /// lost messages (a crash with unsynced data) and reuses sequences: forget the history.
    fn note(&mut self, now: SystemTime, dispatch_last: u64, events_last: u64) {
        if self.snapshots.back().is_some_and(|&(_, d, e)| d > dispatch_last || e > events_last) {
            tracing::warn!("stream sequences went back (the server lost messages); rescue watermarks restart");
            self.snapshots.clear();
            self.lanes.clear();
        }
        self.snapshots.push_back((now, dispatch_last, events_last));
        while self.snapshots.len() > SNAPSHOTS_KEPT {
            self.snapshots.pop_front();
        }
    }

    /// The latest time before which a consumer has settled everything, given its progress
    /// and which of the snapshot's sequences (`pick`) it is measured against.
    fn settled(
        &self,
        now: SystemTime,
        p: ConsumerProgress,
        pick: fn(&(SystemTime, u64, u64)) -> u64,
    ) -> Option<SystemTime> {
        if p.is_idle() {
            return Some(now);
        }
        self.snapshots.iter().rev().find(|s| pick(s) <= p.ack_floor).map(|s| s.0)
    }

    /// Records a lane's settled time, and returns the latest one observed no later than
    /// `events_settled` (its events are all recorded).
    fn lane_bound(
        &mut self,
        lane: (String, Priority),
        now: SystemTime,
        settled: Option<SystemTime>,
        events_settled: SystemTime,
    ) -> Option<SystemTime> {
        let history = self.lanes.entry(lane).or_default();
        if let Some(t) = settled {
            history.push_back((now, t));
        }
        // Entries older than the last usable one are never needed again.
        while history.len() > 1 && history.get(1).is_some_and(|(seen, _)| *seen <= events_settled) {
            history.pop_front();
        }
        while history.len() > SNAPSHOTS_KEPT {
            history.pop_front();
        }
        history.iter().filter(|(seen, _)| *seen <= events_settled).map(|(_, t)| *t).max()
    }
}

/// One lane's consumer as read this round: settled before `settled`, read by `seen`.
struct LaneReading {
    queue: String,
    priority: String,
    lane: Priority,
    progress: ConsumerProgress,
    /// Just before the read: an idle consumer had settled everything published before this.
    before: SystemTime,
    /// Just after the read: the acknowledgements it reflects happened before this.
    seen: SystemTime,
}

async fn round(ctx: &Ctx, marks: &mut Watermarks) -> anyhow::Result<()> {
    let subjects = &ctx.topology.subjects;
    // The order of the reads matters: lanes first, then the streams' positions, then the event
    // consumers, so that every event behind an acknowledgement a lane reading shows was stored
    // before the event consumers are read.
    let lanes = read_lanes(ctx).await?;
    let now = SystemTime::now();
    let dispatch_last = ctx.topology.stream_state(&subjects.dispatch_stream()).await?.last_seq;
    let events_last = ctx.topology.stream_state(&subjects.events_stream()).await?.last_seq;
    marks.note(now, dispatch_last, events_last);

    // Every event stored before this time is recorded in Postgres.
    let mut events_settled = SystemTime::now();
    for lane in Priority::ALL {
        let consumer = Topology::coordinator_events_consumer(lane);
        let before = SystemTime::now();
        let p = ctx.topology.consumer_progress(&subjects.events_stream(), &consumer).await?;
        match marks.settled(before, p, |s| s.2) {
            Some(t) => events_settled = events_settled.min(t),
            None => return Ok(()),
        }
    }

    let margin = ctx.config.coordinator.rescue_idle;
    for r in lanes {
        let settled = marks.settled(r.before, r.progress, |s| s.1);
        let Some(bound) = marks.lane_bound((r.queue.clone(), r.lane), r.seen, settled, events_settled) else {
            continue;
        };
        let Some(bound) = bound.checked_sub(margin) else { continue };
        if let Err(e) = rescue_lane(ctx, &r.queue, &r.priority, bound).await {
            tracing::warn!(queue = %r.queue, priority = %r.priority, error = %e, "cannot rescue a lane this round");
        }
    }
    let stranded = ctx.store.release_stranded().await?;
    if !stranded.is_empty() {
        tracing::warn!(tasks = stranded.len(), "releasing dependents whose release was missed");
        dispatch::publish_rows(&ctx.topology, &stranded).await?;
    }
    Ok(())
}

/// The dispatch consumers of every lane with tasks in flight.
async fn read_lanes(ctx: &Ctx) -> anyhow::Result<Vec<LaneReading>> {
    let subjects = &ctx.topology.subjects;
    let mut out = Vec::new();
    for (queue, priority) in ctx.store.active_lanes().await? {
        let Ok(lane) = priority.parse::<Priority>() else { continue };
        let consumer = subjects.dispatch_consumer(&queue, lane);
        let before = SystemTime::now();
        match ctx.topology.consumer_progress(&subjects.dispatch_stream(), &consumer).await {
            Ok(progress) => out.push(LaneReading { queue, priority, lane, progress, before, seen: SystemTime::now() }),
            // No consumer yet means no worker has served this queue: its tasks wait in the
            // stream, not lost.
            Err(e) => {
                tracing::debug!(%queue, %priority, error = %e, "rescuer skips a lane without a readable consumer")
            }
        }
    }
    Ok(out)
}

/// Dispatches again the lane's tasks dispatched before `bound` that are still in flight.
async fn rescue_lane(ctx: &Ctx, queue: &str, priority: &str, bound: SystemTime) -> anyhow::Result<()> {
    let claimed = ctx.store.claim_lost(queue, priority, bound, CLAIM_LIMIT).await?;
    let n = dispatch::publish_claimed(&ctx.topology, claimed).await?;
    if n > 0 {
        tracing::warn!(%queue, %priority, tasks = n, "dispatched tasks whose dispatch message was lost");
        metrics::counter!("taskfleet_coordinator_rescued_total").increment(n as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn progress(pending: u64, ack_pending: usize, ack_floor: u64) -> ConsumerProgress {
        ConsumerProgress { pending, ack_pending, ack_floor, floor_idle: None }
    }

    #[test]
    fn a_busy_lane_is_settled_up_to_the_last_snapshot_its_floor_passed() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut m = Watermarks::default();
        m.note(at(0), 100, 10);
        m.note(at(5), 200, 20);
        m.note(at(10), 300, 30);
        assert_eq!(m.settled(at(10), progress(5, 3, 250), |s| s.1), Some(at(5)));
        assert_eq!(m.settled(at(10), progress(5, 3, 99), |s| s.1), None);
        assert_eq!(m.settled(at(10), progress(0, 0, 0), |s| s.1), Some(at(10)));
        // Only observations made before the events were settled count.
        let lane = ("default".to_string(), Priority::Normal);
        assert_eq!(m.lane_bound(lane.clone(), at(10), Some(at(5)), at(8)), None);
        assert_eq!(m.lane_bound(lane, at(15), Some(at(10)), at(12)), Some(at(5)));
    }

    #[test]
    fn sequences_going_back_forget_the_history() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut m = Watermarks::default();
        m.note(t0, 100, 10);
        m.note(t0 + Duration::from_secs(5), 50, 12);
        assert_eq!(m.snapshots.len(), 1);
        assert_eq!(m.settled(t0, progress(1, 0, 60), |s| s.1), Some(t0 + Duration::from_secs(5)));
    }
}
