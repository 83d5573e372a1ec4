//! Deferral: running a task again later without counting an attempt. Short deferrals wait in
//! memory (heartbeated, cancellable, holding the task's prefetch place but no slot); longer
//! ones are handed to the coordinator (`deferred`), which dispatches the task again when the
//! delay has passed, so a task behind a slow limit uses up no JetStream deliveries.
//!
//! What the deferred admission or attempt consumed (e.g. its semantic lookup's embedding) is
//! not dropped: a deferral handed to the coordinator reports it on its `deferred` event; one
//! held in memory carries it ([`Carried`]) to the task's next event from this worker.

use crate::DeferReason;
use crate::attempt::{Runtime, traceparent_of};
use crate::events::AfterPublish;
use crate::handler::Usage;
use crate::lanes::Delivery;
use crate::running::RunningTask;
use async_nats::jetstream::{AckKind, Message};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskfleet_proto::{EventKind, TaskErrorInfo, TaskEvent, now_ms};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Where a deferred task goes back to, and when.
pub(crate) struct Deferral {
    /// The delivery's name in the running registry.
    pub token: u64,
    /// Its priority lane.
    pub lane: usize,
    /// Its place in its puller's prefetch budget.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Rate limits it holds tokens of.
    pub granted: Vec<String>,
    pub delay: Duration,
    /// Add up to 10% (a booked slot is exact; tasks refused together should not return
    /// together).
    pub jitter: bool,
    /// Covers the wait (`rate_limit.wait` or `deferral`, a child of the attempt's `task.run`).
    pub span: tracing::Span,
    /// When the task was first deferred by its handler.
    pub deferred_since: Option<Instant>,
    /// What the deferred admission or attempt consumed.
    pub usage: Usage,
}

/// Usage of tasks whose deferral waits in this worker's memory, by task: added to the task's
/// next event (its next admission takes it); cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Carried(Arc<Mutex<HashMap<uuid::Uuid, Usage>>>);

impl Carried {
    /// Adds `usage` to what task `id` carries.
    pub fn add(&self, id: uuid::Uuid, usage: &Usage) {
        if usage.is_empty() {
            return;
        }
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id).or_default().add(usage);
    }

    /// Takes what task `id` carries (nothing when it carries nothing).
    pub fn take(&self, id: uuid::Uuid) -> Usage {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&id).unwrap_or_default()
    }
}

/// Adds `usage` to an event's tokens, cost and savings.
pub(crate) fn charge(ev: &mut TaskEvent, usage: &Usage) {
    if usage.is_empty() {
        return;
    }
    let mut sum = Usage { tokens: ev.tokens, cost_usd: ev.cost_usd, saved_usd: ev.saved_usd, cache_hit: false };
    sum.add(usage);
    (ev.tokens, ev.cost_usd, ev.saved_usd) = (sum.tokens, sum.cost_usd, sum.saved_usd);
}

/// Defers the task of `msg` (see the module documentation).
pub(crate) fn defer(rt: &Runtime, msg: Message, base: TaskEvent, after: Deferral, reason: DeferReason) {
    let Deferral { token, lane, permit, granted, delay, jitter, span, deferred_since, usage } = after;
    let reason = reason.code();
    metrics::counter!("taskfleet_worker_deferred_total", "reason" => reason).increment(1);
    let delay = if jitter { delay + delay.mul_f64(rand::random::<f64>() * 0.1) } else { delay };
    tracing::debug!(task_id = %base.task_id, ?delay, reason, "task deferred");
    let held = delay <= rt.policies.defer_hold_max;
    span.record("reason", reason);
    span.record("delay_ms", delay.as_millis() as u64);
    span.record("held", held);
    if !held {
        let mut ev = base;
        ev.kind = EventKind::Deferred;
        ev.at = now_ms();
        ev.retry_in_ms = Some(delay.as_millis() as u64);
        ev.next_traceparent = traceparent_of(&msg);
        ev.error = Some(TaskErrorInfo {
            code: reason.to_string(),
            message: format!("could not start yet; deferred for {delay:?}"),
            retryable: true,
        });
        charge(&mut ev, &usage);
        rt.events.send(ev, AfterPublish::Ack(msg));
        return;
    }
    rt.carried.add(base.task_id, &usage);
    let cancel = CancellationToken::new();
    rt.running.insert(token, RunningTask { reply: msg.reply.clone(), cancel: cancel.clone(), base: base.clone() });
    let rt = rt.clone();
    let back = Delivery { msg, priority: lane, permit, granted, deferred_since };
    // The wait's span (and so its attempt's `task.run`) ends when the task is back in line.
    tokio::spawn(hold(rt, token, back, base, delay, cancel).instrument(span));
}

/// Waits out a held deferral, then puts the delivery back in its lane (or reports it
/// cancelled).
async fn hold(rt: Runtime, token: u64, back: Delivery, base: TaskEvent, delay: Duration, cancel: CancellationToken) {
    let cancelled = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = cancel.cancelled() => true,
    };
    // Gone from the registry: the drain handed it back already.
    if !rt.running.remove(token) {
        return;
    }
    if cancelled {
        let mut ev = base;
        ev.kind = EventKind::Cancelled;
        ev.at = now_ms();
        let carried = rt.carried.take(ev.task_id);
        charge(&mut ev, &carried);
        rt.events.send(ev, AfterPublish::Ack(back.msg));
        return;
    }
    let stats = &rt.worker.stats;
    stats.buffered.fetch_add(1, Ordering::Relaxed);
    if let Some(d) = rt.lanes.push(back) {
        stats.buffered.fetch_sub(1, Ordering::Relaxed);
        let _ = d.msg.ack_with(AckKind::Nak(None)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_proto::TokenUsage;

    fn lookup(prompt: u64, cost: f64) -> Usage {
        Usage { tokens: Some(TokenUsage { prompt, completion: 0 }), cost_usd: Some(cost), ..Usage::default() }
    }

    #[test]
    fn held_deferrals_carry_their_usage_to_the_next_event_once() {
        let carried = Carried::default();
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        carried.add(a, &lookup(10, 0.001));
        carried.add(a, &lookup(5, 0.0005));
        carried.add(b, &Usage::default());
        let mut ev = TaskEvent::new(a, EventKind::Succeeded, "q");
        ev.tokens = Some(TokenUsage { prompt: 1, completion: 2 });
        charge(&mut ev, &carried.take(a));
        assert_eq!(ev.tokens, Some(TokenUsage { prompt: 16, completion: 2 }));
        assert!(ev.cost_usd.is_some_and(|c| (c - 0.0015).abs() < 1e-12), "{:?}", ev.cost_usd);
        assert_eq!(ev.saved_usd, None);
        assert_eq!(carried.take(a), Usage::default(), "taken once");
        assert_eq!(carried.take(b), Usage::default(), "nothing carried for nothing");
        let mut untouched = TaskEvent::new(b, EventKind::Succeeded, "q");
        charge(&mut untouched, &Usage::default());
        assert_eq!((untouched.tokens, untouched.cost_usd), (None, None));
    }
}
