//! The stream watch: warns before JetStream refuses or drops anything. Every
//! `STREAM_WATCH_INTERVAL` it reads how full each stream is and how long the coordinator's
//! event recording has been stuck, exports both as gauges, and publishes an [`Alert`] on
//! `<prefix>.alerts` when a rule starts or stops firing:
//!
//! * `stream_nearly_full`: a stream holds more than 80% of `nats.stream_max_bytes`. A full
//!   work queue (submissions, dispatch) refuses new messages (submitters get errors); a full
//!   event stream drops its oldest events, which matters only when the coordinator has not
//!   recorded them yet.
//! * `events_unrecorded_aging`: events wait to be recorded (Postgres is down, say) and the
//!   coordinator's position has not moved for half of `nats.events_max_age`. Events older than
//!   `events_max_age` are dropped by JetStream unrecorded: their tasks' dispatch messages are
//!   already acknowledged, so the rescuer runs those tasks again (their results are lost, the
//!   tasks are not).
//!
//! One replica watches at a time (a Postgres advisory lock), so each alert is sent once.

use crate::Ctx;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_bus::Topology;
use taskfleet_proto::{Alert, AlertState, Priority, now_ms};
use tokio_util::sync::CancellationToken;

const STREAM_WATCH_INTERVAL: Duration = Duration::from_secs(10);
/// Share of `stream_max_bytes` above which `stream_nearly_full` fires.
const FULL_SHARE: f64 = 0.8;

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut leader = crate::leader::Leadership::new("stream-watch");
    let mut firing: HashMap<String, bool> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(STREAM_WATCH_INTERVAL) => {}
        }
        if leader.hold(&ctx.store).await.is_none() {
            continue;
        }
        for check in checks(&ctx).await {
            if changed(&mut firing, &check) {
                announce(&ctx, &check).await;
            }
        }
    }
}

/// Notes a check's verdict; `true` when its rule started or stopped firing (a rule never seen
/// before counts as not firing, so a quiet start announces nothing).
fn changed(firing: &mut HashMap<String, bool>, check: &Check) -> bool {
    firing.insert(check.key.clone(), check.firing).unwrap_or(false) != check.firing
}

/// One rule's verdict on one stream.
#[derive(Debug)]
struct Check {
    key: String,
    rule: &'static str,
    metric: &'static str,
    value: f64,
    threshold: f64,
    firing: bool,
    message: String,
}

async fn checks(ctx: &Ctx) -> Vec<Check> {
    let s = &ctx.topology.subjects;
    let mut out = Vec::new();
    for stream in [s.submit_stream(), s.dispatch_stream(), s.events_stream(), s.dead_stream()] {
        let Ok(taskfleet_bus::StreamState { bytes, max_bytes: max, .. }) = ctx.topology.stream_state(&stream).await
        else {
            continue;
        };
        let check = fill_check(&stream, bytes, max);
        metrics::gauge!("taskfleet_stream_fill_ratio", "stream" => stream).set(check.value);
        out.push(check);
    }
    let max_age = ctx.config.nats.events_max_age;
    let mut stuck = Duration::ZERO;
    for lane in Priority::ALL {
        let consumer = Topology::coordinator_events_consumer(lane);
        let Ok(p) = ctx.topology.consumer_progress(&s.events_stream(), &consumer).await else { continue };
        if !p.is_idle() {
            stuck = stuck.max(p.floor_idle.unwrap_or_default());
        }
    }
    metrics::gauge!("taskfleet_coordinator_events_stuck_seconds").set(stuck.as_secs_f64());
    out.push(aging_check(stuck, max_age));
    out
}

/// `stream_nearly_full` for a stream holding `bytes` of at most `max` (unlimited when not
/// positive, and then never full).
fn fill_check(stream: &str, bytes: u64, max: i64) -> Check {
    let share = if max > 0 { bytes as f64 / max as f64 } else { 0.0 };
    Check {
        key: format!("full:{stream}"),
        rule: "stream_nearly_full",
        metric: "fill_ratio",
        value: share,
        threshold: FULL_SHARE,
        firing: share > FULL_SHARE,
        message: format!("stream {stream} holds {bytes} of {max} bytes"),
    }
}

/// `events_unrecorded_aging`: the coordinator's event recording has not moved for `stuck`,
/// which fires past half of `max_age` (JetStream drops events older than that unrecorded).
fn aging_check(stuck: Duration, max_age: Duration) -> Check {
    Check {
        key: "events_aging".into(),
        rule: "events_unrecorded_aging",
        metric: "stuck_seconds",
        value: stuck.as_secs_f64(),
        threshold: (max_age / 2).as_secs_f64(),
        firing: stuck > max_age / 2,
        message: format!(
            "events have waited {stuck:?} without being recorded; JetStream drops them after events_max_age ({max_age:?})"
        ),
    }
}

async fn announce(ctx: &Ctx, c: &Check) {
    let state = if c.firing { AlertState::Firing } else { AlertState::Resolved };
    if c.firing {
        tracing::warn!(rule = c.rule, value = c.value, threshold = c.threshold, "{}", c.message);
    } else {
        tracing::info!(rule = c.rule, "resolved: {}", c.message);
    }
    let alert = Alert {
        rule: c.rule.into(),
        state,
        metric: c.metric.into(),
        value: c.value,
        op: ">".into(),
        threshold: c.threshold,
        since: now_ms(),
        message: c.message.clone(),
    };
    let body = serde_json::to_vec(&alert).unwrap_or_default();
    if let Err(e) = ctx.client.publish(ctx.topology.subjects.alerts(), body.into()).await {
        tracing::debug!(error = %e, "cannot publish a stream alert");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_nearly_full_above_its_share_and_never_when_unlimited() {
        assert!(!fill_check("S", 80, 100).firing, "exactly the share does not fire");
        assert!(fill_check("S", 81, 100).firing);
        assert!(!fill_check("S", u64::MAX, -1).firing, "an unlimited stream is never full");
        assert_eq!(fill_check("S", 1, 100).key, "full:S");
    }

    #[test]
    fn unrecorded_events_alert_past_half_their_retention() {
        let day = Duration::from_secs(86_400);
        assert!(!aging_check(day / 2, day).firing);
        assert!(aging_check(day / 2 + Duration::from_secs(1), day).firing);
    }

    #[test]
    fn only_a_change_of_verdict_is_announced() {
        let mut firing = HashMap::new();
        let (quiet, loud) = (fill_check("S", 0, 100), fill_check("S", 100, 100));
        assert!(!changed(&mut firing, &quiet), "a quiet start announces nothing");
        assert!(changed(&mut firing, &loud), "starts firing");
        assert!(!changed(&mut firing, &loud), "still firing");
        assert!(changed(&mut firing, &quiet), "resolved");
        assert!(changed(&mut HashMap::new(), &loud), "a rule firing at start is announced");
    }
}
