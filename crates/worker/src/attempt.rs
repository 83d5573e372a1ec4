//! One delivery of a dispatch message, through the attempt pipeline: decode, admit
//! ([`crate::admit`]), execute ([`crate::execute`]), settle ([`crate::settle`]), report.

use crate::admit::{self, Admission};
use crate::cancellations::Cancellations;
use crate::defer::{self, Carried, Deferral};
use crate::events::{AfterPublish, EventSender};
use crate::execute;
use crate::gate::Gate;
use crate::handler::{Handler, Submitter};
use crate::lanes::{Delivery, Lanes};
use crate::policies::Policies;
use crate::progress::ProgressSender;
use crate::running::{Running, RunningTask};
use crate::settle::{Facts, Settlement, settle};
use crate::{DeferReason, WorkerStats};
use async_nats::jetstream::{AckKind, Message};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use taskfleet_config::Config;
use taskfleet_proto::{EventKind, MAX_MESSAGE_BYTES, TaskEnvelope, TaskEvent, headers, now_ms};

/// What a worker is, independent of any one task.
pub(crate) struct WorkerIdentity {
    pub config: Config,
    pub handlers: HashMap<String, Arc<dyn Handler>>,
    pub id: String,
    pub stats: Arc<WorkerStats>,
    pub cancellations: Arc<Cancellations>,
}

impl WorkerIdentity {
    /// Kinds this worker can run, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<String> = self.handlers.keys().cloned().collect();
        k.sort();
        k
    }
}

/// What every attempt of a running worker shares; cheap to clone.
#[derive(Clone)]
pub(crate) struct Runtime {
    pub worker: Arc<WorkerIdentity>,
    pub events: EventSender,
    pub running: Running,
    pub progress: ProgressSender,
    pub lanes: Arc<Lanes>,
    pub policies: Arc<Policies>,
    /// Where handlers submit child tasks.
    pub submitter: Arc<Submitter>,
    /// Asks the coordinator whether a possibly stale message still runs.
    pub gate: Gate,
    /// Usage of tasks deferred in memory, for their next event.
    pub carried: Carried,
}

/// An attempt of a task: the envelope, what the message says about itself, the event every
/// report starts from and the attempt's `task.run` span.
pub(crate) struct Attempt {
    pub env: TaskEnvelope,
    pub dispatch: DispatchInfo,
    /// This attempt, from 1.
    pub number: u32,
    pub max_attempts: u32,
    pub base: TaskEvent,
    pub span: tracing::Span,
    pub received_at: u64,
}

impl Attempt {
    /// Decodes a dispatch message into its attempt; `None` for a corrupt or foreign message.
    fn of(worker: &WorkerIdentity, msg: &Message) -> Option<Attempt> {
        let received_at = now_ms();
        // Only the coordinator publishes dispatches, from submissions it has taken.
        let env: TaskEnvelope = match taskfleet_bus::decode_message(msg, MAX_MESSAGE_BYTES) {
            Ok(env) => env,
            Err(e) => {
                metrics::counter!("taskfleet_worker_malformed_dispatch_total").increment(1);
                tracing::error!(subject = %msg.subject, error = %e, "undecodable dispatch message, terminating it");
                return None;
            }
        };
        let dispatch = DispatchInfo::of(msg);
        // Attempts are handler executions: a redelivery (a worker lost, an event that could not
        // be published, an outage) runs the same attempt again and uses up none.
        let number = dispatch.attempt_offset + 1;
        // One span per attempt (and per run after an in-memory deferral), in the trace of the
        // dispatch message's context; a redelivered message keeps its headers, so every retry
        // lands in the same trace.
        let span = tracing::info_span!("task.run", otel.kind = "consumer", task_id = %env.id, kind = %env.kind,
                                       queue = %env.queue, priority = %env.priority, attempt = number,
                                       worker = %worker.id, cache_hit = tracing::field::Empty,
                                       deferred = tracing::field::Empty, outcome = tracing::field::Empty,
                                       otel.status_code = tracing::field::Empty);
        taskfleet_telemetry::set_parent_from(&span, msg.headers.as_ref());
        let mut base = TaskEvent::new(env.id, EventKind::Started, &env.queue);
        base.task_kind = env.kind.clone();
        base.priority = env.priority;
        base.attempt = number;
        base.generation = dispatch.generation.max(1) as u32;
        base.worker = Some(worker.id.clone());
        if taskfleet_telemetry::exporting() {
            // The coordinator records this attempt's events under its span.
            base.traceparent = taskfleet_telemetry::traceparent(&span);
        }
        let max_attempts = env.effective_max_attempts();
        Some(Attempt { env, dispatch, number, max_attempts, base, span, received_at })
    }

    /// The attempt's time limit.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.env.timeout_ms)
    }

    /// The attempt's event, as `kind`.
    pub fn event(&self, kind: EventKind) -> TaskEvent {
        TaskEvent { kind, ..self.base.clone() }
    }
}

/// Runs one delivery through the pipeline; `token` names it in the running registry.
pub(crate) async fn run_delivery(rt: Runtime, token: u64, delivery: Delivery) {
    let Delivery { msg, permit, priority: lane, granted, deferred_since } = delivery;
    let Some(mut attempt) = Attempt::of(&rt.worker, &msg) else {
        // Only the coordinator publishes dispatch messages: retrying cannot help.
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    };
    // Admission can take a while (the coordinator's gate, a single-flight wait, a semantic
    // lookup): the delivery is heartbeated meanwhile, so JetStream does not hand it to another
    // worker. The entry is removed on every path but a run, whose entry replaces it.
    let admitting = RunningTask {
        reply: msg.reply.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
        base: attempt.base.clone(),
    };
    rt.running.insert(token, admitting);
    // What a deferral of this task held in this worker's memory consumed.
    let carried = rt.carried.take(attempt.env.id);
    let admission = admit::admit(&rt, &mut attempt, permit, granted).await;
    // Gone from the registry: the drain handed the delivery back meanwhile.
    let handed_back = match &admission {
        Admission::Run { .. } => !rt.running.contains(token),
        _ => !rt.running.remove(token),
    };
    let (handler, lease) = match admission {
        Admission::Run { lease, .. } if handed_back => {
            if let Some(lease) = lease {
                lease.release(&rt.policies.cache).await;
            }
            return;
        }
        Admission::Run { handler, lease } => (handler, lease),
        Admission::Terminate => {
            record_outcome(&attempt.span, EventKind::Cancelled);
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
        Admission::Finish(mut ev) => {
            defer::charge(&mut ev, &carried);
            return finish(&rt, &attempt.span, *ev, msg);
        }
        // Handed back: redelivered elsewhere, nothing to wait for here.
        Admission::Defer(_) if handed_back => return,
        Admission::Defer(mut d) => {
            d.usage.add(&carried);
            let after = Deferral {
                token,
                lane,
                permit: d.permit,
                granted: d.granted,
                delay: d.delay,
                jitter: d.reason != DeferReason::RateLimitBooked,
                span: d.span,
                deferred_since,
                usage: d.usage,
            };
            return defer::defer(&rt, msg, attempt.base, after, d.reason);
        }
    };

    let mut executed = execute::execute(&rt, token, msg.reply.clone(), &mut attempt, handler).await;
    let cancelled = rt.worker.cancellations.contains(&attempt.env.id);
    if let Some(lease) = lease {
        lease.settle(&rt.policies.cache, &mut executed, cancelled).await;
    }
    executed.usage.add(&carried);
    let facts = Facts {
        attempt: attempt.number,
        max_attempts: attempt.max_attempts,
        cancelled,
        // A dependency that stays down must not hold its tasks forever: after
        // `breaker_max_wait` of deferrals the task fails this attempt (and is retried or dies).
        breaker_gave_up: deferred_since.is_some_and(|t| t.elapsed() >= rt.policies.breaker_max_wait),
    };
    match settle(executed.outcome, executed.effects, facts, &rt.policies.retry_for(&attempt.env)) {
        Settlement::Defer { reason, delay } => {
            // Not an attempt: the handler could not start its call yet.
            attempt.span.record("deferred", true);
            let span = tracing::info_span!(parent: &attempt.span, "deferral", reason = reason.code(),
                                           delay_ms = tracing::field::Empty, held = tracing::field::Empty);
            let since = Some(deferred_since.unwrap_or_else(Instant::now));
            let after = Deferral {
                token,
                lane,
                permit: None,
                granted: Vec::new(),
                delay,
                jitter: true,
                span,
                deferred_since: since,
                // Its usage so far (its admission's lookup, calls made before the deferral).
                usage: executed.usage,
            };
            defer::defer(&rt, msg, attempt.base, after, reason);
        }
        Settlement::Report(report) => {
            let mut ev = attempt.base;
            ev.timings = Some(executed.timings);
            ev.at = executed.timings.finished_at;
            ev.tokens = executed.usage.tokens;
            ev.cost_usd = executed.usage.cost_usd;
            // An admission hit never runs a handler: what this attempt saved is its inline hits'.
            ev.saved_usd = ev.saved_usd.or(executed.usage.saved_usd);
            ev.cache_hit |= executed.usage.cache_hit;
            report.apply(&mut ev);
            if ev.kind == EventKind::Retrying {
                ev.next_traceparent = traceparent_of(&msg);
            }
            metrics::counter!("taskfleet_worker_attempts_total", "outcome" => ev.kind.as_str()).increment(1);
            finish(&rt, &attempt.span, ev, msg);
        }
    }
}

/// Reports an attempt's last event; the message is acknowledged once it is published.
fn finish(rt: &Runtime, span: &tracing::Span, ev: TaskEvent, msg: Message) {
    record_outcome(span, ev.kind);
    rt.events.send(ev, AfterPublish::Ack(msg));
}

/// Notes an attempt's outcome on its `task.run` span; failures mark it as an error.
fn record_outcome(span: &tracing::Span, kind: EventKind) {
    span.record("outcome", kind.as_str());
    if matches!(kind, EventKind::Failed | EventKind::Dead | EventKind::Retrying) {
        span.record("otel.status_code", "ERROR");
    }
}

/// What a dispatch message says about itself: JetStream's delivery count, the handler
/// attempts recorded before this dispatch and its dispatch generation (headers).
pub(crate) struct DispatchInfo {
    pub delivered: u32,
    pub attempt_offset: u32,
    pub generation: i32,
}

impl DispatchInfo {
    fn of(msg: &Message) -> DispatchInfo {
        let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
        DispatchInfo {
            delivered: msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1),
            attempt_offset: header(headers::ATTEMPT_OFFSET).and_then(|v| v.parse().ok()).unwrap_or(0),
            generation: header(headers::GENERATION).and_then(|v| v.parse().ok()).unwrap_or(1),
        }
    }
}

/// The trace context a dispatch message carries, for the task's next dispatch.
pub(crate) fn traceparent_of(msg: &Message) -> Option<String> {
    msg.headers.as_ref().and_then(|h| h.get(taskfleet_telemetry::TRACEPARENT)).map(|v| v.as_str().to_string())
}
