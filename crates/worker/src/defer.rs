//! Deferral: running a task again later without counting an attempt. Short deferrals wait in
//! memory (heartbeated, cancellable, holding the task's prefetch place but no slot); longer
//! ones are handed to the coordinator (`deferred`), which dispatches the task again when the
//! delay has passed, so a task behind a slow limit uses up no JetStream deliveries.

use crate::DeferReason;
use crate::attempt::{Runtime, traceparent_of};
use crate::events::AfterPublish;
use crate::lanes::Delivery;
use crate::running::RunningTask;
use async_nats::jetstream::{AckKind, Message};
use std::sync::atomic::Ordering;
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
}

/// Defers the task of `msg` (see the module documentation).
pub(crate) fn defer(rt: &Runtime, msg: Message, base: TaskEvent, after: Deferral, reason: DeferReason) {
    let Deferral { token, lane, permit, granted, delay, jitter, span, deferred_since } = after;
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
        rt.events.send(ev, AfterPublish::Ack(msg));
        return;
    }
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
