//! Admission: whether a delivered attempt runs its handler. In order: the gate (for a message
//! that may be stale), the skip checks, the shared result cache (a hit finishes the task; an
//! identical task running elsewhere is waited for), then a token of every rate limit the task
//! needs, or a deferral that holds no slot.

use crate::DeferReason;
use crate::attempt::{Attempt, Runtime, WorkerIdentity};
use crate::handler::{Handler, Usage};
use crate::settle::Report;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use taskfleet_proto::{EventKind, Runnable, TaskEvent, Timings, now_ms};
use taskfleet_shared_state::{CacheClaim, CacheKey, CacheLease, Decision, ResultCache};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

/// The verdict on an attempt.
pub(crate) enum Admission {
    /// Run the handler; with a lease, this attempt fills the shared cache.
    Run { handler: Arc<dyn Handler>, lease: Option<Lease> },
    /// The coordinator says it must not run (final, or superseded): terminate the message.
    Terminate,
    /// It ends without running (skipped, cached, misconfigured): report this event.
    Finish(Box<TaskEvent>),
    /// It cannot start yet: defer it.
    Defer(Refusal),
}

/// A rate limit's refusal: what the deferral takes along.
pub(crate) struct Refusal {
    pub reason: DeferReason,
    pub delay: Duration,
    /// The delivery's place in its puller's prefetch budget.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Limits whose token the task holds already.
    pub granted: Vec<String>,
    /// The `rate_limit.wait` span, which covers the wait.
    pub span: tracing::Span,
    /// What the admission's semantic lookup consumed (the deferral carries it).
    pub usage: Usage,
}

/// Why a delivered message ends without running its handler.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Skip {
    /// The last delivery JetStream makes of a message that never produced an outcome (each
    /// earlier one was lost with its worker): something kills its workers.
    DeliveriesExhausted { delivered: u32 },
    /// Cancelled while queued (the coordinator recorded `cancelled` already).
    Cancelled,
    /// A replayed task whose lowered budget is below this attempt.
    AttemptsExhausted { attempt: u32, max_attempts: u32 },
    /// This worker has no handler for the kind.
    UnknownKind,
}

/// What the skip checks look at.
pub(crate) struct Checks {
    pub delivered: u32,
    pub max_deliver: u32,
    pub cancelled: bool,
    pub attempt: u32,
    pub max_attempts: u32,
}

/// The handler to run, or why none runs.
pub(crate) fn check<H>(c: &Checks, handler: Option<H>) -> Result<H, Skip> {
    if c.delivered >= c.max_deliver.max(1) {
        return Err(Skip::DeliveriesExhausted { delivered: c.delivered });
    }
    if c.cancelled {
        return Err(Skip::Cancelled);
    }
    if c.attempt > c.max_attempts {
        return Err(Skip::AttemptsExhausted { attempt: c.attempt, max_attempts: c.max_attempts });
    }
    handler.ok_or(Skip::UnknownKind)
}

impl Skip {
    /// The report of a skipped attempt of a task of `kind` on `worker`.
    pub fn report(&self, kind: &str, worker: &WorkerIdentity) -> Report {
        match self {
            Skip::DeliveriesExhausted { delivered } => Report::failure(
                EventKind::Dead,
                "deliveries_exhausted",
                format!(
                    "delivered {delivered} times (nats.max_deliver) without any attempt ending: workers holding it were lost"
                ),
                false,
            ),
            Skip::Cancelled => Report::of(EventKind::Cancelled),
            Skip::AttemptsExhausted { attempt, max_attempts } => Report::failure(
                EventKind::Dead,
                "attempts_exhausted",
                format!("attempt {attempt} exceeds max_attempts {max_attempts}"),
                false,
            ),
            Skip::UnknownKind => Report::failure(
                EventKind::Failed,
                "unknown_kind",
                format!("no handler for kind {kind:?} on worker {} (knows {:?})", worker.id, worker.kinds()),
                false,
            ),
        }
    }
}

/// Decides whether `attempt` runs now. `permit` is released once it runs or finishes (a
/// deferral takes it along); `granted` are limits whose tokens it holds from a booked slot.
pub(crate) async fn admit(
    rt: &Runtime,
    attempt: &mut Attempt,
    permit: Option<OwnedSemaphorePermit>,
    granted: Vec<String>,
) -> Admission {
    let asked = match runnable(rt, attempt).await {
        Some(false) => return Admission::Terminate,
        Some(true) => true,
        None => false,
    };
    let checks = Checks {
        delivered: attempt.dispatch.delivered,
        max_deliver: rt.worker.config.nats.max_deliver as u32,
        // When the coordinator was just asked, Postgres has spoken: an id still in the local
        // cancelled set belongs to a task run again since (a resumed run) whose withdrawal from
        // the bucket has not arrived yet.
        cancelled: !asked && rt.worker.cancellations.contains(&attempt.env.id),
        attempt: attempt.number,
        max_attempts: attempt.max_attempts,
    };
    let handler = match check(&checks, rt.worker.handlers.get(&attempt.env.kind).cloned()) {
        Ok(handler) => handler,
        Err(skip) => {
            if skip == Skip::UnknownKind {
                metrics::counter!("taskfleet_worker_unknown_kind_total").increment(1);
            }
            let mut ev = attempt.base.clone();
            skip.report(&attempt.env.kind, &rt.worker).apply(&mut ev);
            return Admission::Finish(Box::new(ev));
        }
    };
    let lease = match claim_cache(rt, attempt).await {
        Claimed::Hit(ev) => return Admission::Finish(ev),
        Claimed::Lead(lease) => Some(lease),
        Claimed::Bypass => match crate::semantic::admit(rt, attempt).await {
            crate::semantic::Admitted::Hit(ev) => return Admission::Finish(ev),
            crate::semantic::Admitted::Miss(pending) => Some(Lease::Semantic(pending)),
            crate::semantic::Admitted::Bypass => None,
        },
    };
    match take_limits(rt, attempt, granted).await {
        Ok(()) => {
            drop(permit);
            Admission::Run { handler, lease }
        }
        Err(refused) => {
            let usage = match lease {
                Some(lease) => lease.release(&rt.policies.cache).await,
                None => Usage::default(),
            };
            match refused {
                LimitRefusal::Wait { reason, delay, granted, span } => {
                    Admission::Defer(Refusal { reason, delay, permit, granted, span, usage })
                }
                LimitRefusal::Unknown(e) => {
                    let mut ev = attempt.base.clone();
                    Report::failure(EventKind::Failed, "unknown_limit", e.to_string(), false).apply(&mut ev);
                    ev.tokens = usage.tokens;
                    ev.cost_usd = usage.cost_usd;
                    Admission::Finish(Box::new(ev))
                }
            }
        }
    }
}

/// Asks the coordinator about a message that may be stale (delivered before, or of a later
/// dispatch generation): it may have ended, or been dispatched again, since it was published.
/// A message that runs takes the task's last checkpoint, which may be newer than its own.
/// `None` when there was nothing to ask (a first delivery of a first dispatch).
async fn runnable(rt: &Runtime, attempt: &mut Attempt) -> Option<bool> {
    let d = &attempt.dispatch;
    if d.delivered <= 1 && d.generation <= 1 {
        return None;
    }
    let (answer, checkpoint) = rt.gate.check(attempt.env.id, d.generation).await;
    let reason = match answer {
        Runnable::Run => {
            if checkpoint.is_some() {
                attempt.env.checkpoint = checkpoint;
            }
            return Some(true);
        }
        Runnable::Final => "final",
        Runnable::Stale => "stale",
        Runnable::Unknown => "unknown",
    };
    metrics::counter!("taskfleet_worker_skipped_total", "reason" => reason).increment(1);
    tracing::debug!(task_id = %attempt.env.id, generation = d.generation, delivered = d.delivered,
                    reason, "not running a dispatch message: terminating it");
    Some(false)
}

/// A claim on a cache entry: the attempt that holds it stores its result there.
pub(crate) enum Lease {
    /// The exact cache's single-flight lease, renewed while it is held.
    Exact { key: CacheKey, lease: CacheLease },
    /// A semantic cache miss: the result is stored with the key text's vector.
    Semantic(Box<crate::semantic::Pending>),
}

impl Lease {
    /// Stores a successful result (one of a task not cancelled meanwhile, that spawned
    /// nothing); else lets the claim go so another task can lead. A semantic lookup's usage
    /// joins the attempt's.
    pub async fn settle(self, cache: &ResultCache, executed: &mut crate::execute::Executed, cancelled: bool) {
        match self {
            Lease::Semantic(pending) => pending.settle(executed, cancelled).await,
            Lease::Exact { key, lease } => match executed.cacheable_result(cancelled) {
                Some(result) => cache.store(&key, lease, result, executed.usage.cost_usd).await,
                None => cache.release(&key, lease).await,
            },
        }
    }

    /// Lets the claim go; returns what taking it consumed (a semantic lookup's embedding),
    /// which the caller reports instead of the attempt that did not run.
    pub async fn release(self, cache: &ResultCache) -> Usage {
        match self {
            Lease::Exact { key, lease } => {
                cache.release(&key, lease).await;
                Usage::default()
            }
            Lease::Semantic(pending) => pending.usage(),
        }
    }
}

/// The `succeeded` event of an attempt its cache hit at admission finishes (exact or semantic):
/// the stored `result`, what computing it cost (`saved_usd`) and what the lookup consumed.
pub(crate) fn cache_hit_event(
    rt: &Runtime,
    attempt: &Attempt,
    result: Value,
    saved_usd: Option<f64>,
    usage: Usage,
) -> TaskEvent {
    let kind = attempt.env.kind.clone();
    metrics::counter!("taskfleet_worker_cache_hits_total", "kind" => kind.clone()).increment(1);
    if let Some(saved) = saved_usd {
        metrics::counter!("taskfleet_worker_cache_saved_microusd_total", "kind" => kind)
            .increment((saved * 1e6).round() as u64);
    }
    rt.worker.stats.finished.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("taskfleet_worker_attempts_total", "outcome" => "cache_hit").increment(1);
    let now = now_ms();
    let mut ev = attempt.event(EventKind::Succeeded);
    ev.cache_hit = true;
    ev.result = Some(result);
    ev.saved_usd = saved_usd;
    ev.tokens = usage.tokens;
    ev.cost_usd = usage.cost_usd;
    ev.at = now;
    ev.timings = Some(Timings {
        created_at: attempt.env.created_at,
        received_at: attempt.received_at,
        started_at: now,
        finished_at: now,
    });
    ev
}

/// What the cache said.
enum Claimed {
    /// A stored result: this `succeeded` event finishes the task.
    Hit(Box<TaskEvent>),
    /// Nobody runs it yet: this attempt does and stores the result.
    Lead(Lease),
    /// No cache policy, Redis unavailable, or the wait for another's result expired.
    Bypass,
}

/// Looks the task up in the shared cache, waiting for an identical task running elsewhere.
async fn claim_cache(rt: &Runtime, attempt: &Attempt) -> Claimed {
    let (env, cache) = (&attempt.env, &rt.policies.cache);
    let Some(key) = cache.key_for(&env.kind, &env.payload) else { return Claimed::Bypass };
    let timeout = attempt.timeout();
    let lookup = tracing::info_span!(parent: &attempt.span, "cache.lookup", kind = %env.kind,
                                     result = tracing::field::Empty, waited = false);
    let (claim, waited) =
        cache.claim_or_wait(&key, cache.single_flight_wait().min(timeout)).instrument(lookup.clone()).await;
    lookup.record("waited", waited);
    let result = match &claim {
        CacheClaim::Hit(_) => "hit",
        CacheClaim::Leader(_) => "miss",
        CacheClaim::Follower => "wait_expired",
        CacheClaim::Unavailable => "unavailable",
    };
    lookup.record("result", result);
    attempt.span.record("cache_hit", matches!(claim, CacheClaim::Hit(_)));
    match claim {
        CacheClaim::Hit(hit) => {
            Claimed::Hit(Box::new(cache_hit_event(rt, attempt, hit.result, hit.cost_usd, Usage::default())))
        }
        CacheClaim::Leader(lease) => {
            metrics::counter!("taskfleet_worker_cache_misses_total", "kind" => env.kind.clone()).increment(1);
            Claimed::Lead(Lease::Exact { key, lease })
        }
        CacheClaim::Follower | CacheClaim::Unavailable => Claimed::Bypass,
    }
}

/// Why the limits did not all give a token.
enum LimitRefusal {
    /// Not yet: defer for `delay` (a booked slot, or a denial).
    Wait { reason: DeferReason, delay: Duration, granted: Vec<String>, span: tracing::Span },
    /// A limit the configuration does not know.
    Unknown(taskfleet_shared_state::SharedStateError),
}

/// Takes a token of every limit the task needs that it does not hold yet.
async fn take_limits(rt: &Runtime, attempt: &Attempt, mut granted: Vec<String>) -> Result<(), LimitRefusal> {
    let limits = rt.policies.limits_for(&attempt.env);
    if limits.iter().all(|l| granted.contains(l)) {
        return Ok(());
    }
    // Covers taking the tokens and, when one is refused, the deferral's wait.
    let span = tracing::info_span!(parent: &attempt.span, "rate_limit.wait", limits = %limits.join(","),
                                   deferred = false, reason = tracing::field::Empty,
                                   delay_ms = tracing::field::Empty, held = tracing::field::Empty);
    for name in limits {
        if granted.contains(&name) {
            continue;
        }
        let (reason, delay) = match rt.policies.shared.limiter.acquire(&name).instrument(span.clone()).await {
            Ok(Decision::Allowed) => {
                granted.push(name);
                continue;
            }
            // Wait for the booked slot without a slot of this worker, then run.
            Ok(Decision::Reserved { wait }) => {
                granted.push(name);
                (DeferReason::RateLimitBooked, wait)
            }
            Ok(Decision::Denied { retry_after }) => (DeferReason::RateLimited, retry_after),
            Err(e) => return Err(LimitRefusal::Unknown(e)),
        };
        span.record("deferred", true);
        attempt.span.record("deferred", true);
        return Err(LimitRefusal::Wait { reason, delay, granted, span });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks() -> Checks {
        Checks { delivered: 1, max_deliver: 20, cancelled: false, attempt: 1, max_attempts: 3 }
    }

    #[test]
    fn a_fresh_delivery_of_a_known_kind_runs() {
        assert_eq!(check(&checks(), Some("handler")), Ok("handler"));
    }

    #[test]
    fn skips_in_order_of_precedence() {
        let last = Checks { delivered: 20, cancelled: true, attempt: 4, ..checks() };
        assert_eq!(check(&last, Some(())), Err(Skip::DeliveriesExhausted { delivered: 20 }));
        let cancelled = Checks { cancelled: true, attempt: 4, ..checks() };
        assert_eq!(check(&cancelled, Some(())), Err(Skip::Cancelled));
        let replayed = Checks { attempt: 4, ..checks() };
        assert_eq!(check(&replayed, Some(())), Err(Skip::AttemptsExhausted { attempt: 4, max_attempts: 3 }));
        assert_eq!(check::<()>(&checks(), None), Err(Skip::UnknownKind));
    }

    #[test]
    fn a_zero_max_deliver_counts_as_one_delivery() {
        let c = Checks { max_deliver: 0, ..checks() };
        assert_eq!(check(&c, Some(())), Err(Skip::DeliveriesExhausted { delivered: 1 }));
        let c = Checks { max_deliver: 2, ..checks() };
        assert_eq!(check(&c, Some(())), Ok(()));
    }

    #[test]
    fn a_spawning_attempt_leaves_nothing_in_the_cache() {
        let spawn = taskfleet_proto::Spawn {
            children: vec![taskfleet_proto::NodeSpec::new("", "k", serde_json::Value::Null)],
            join: taskfleet_proto::NodeSpec::new("", "j", serde_json::Value::Null),
            on_child_failure: Default::default(),
        };
        let executed = |outcome, spawn| crate::execute::Executed {
            outcome,
            timings: Timings::default(),
            usage: Default::default(),
            effects: crate::workflow::Effects { spawn, stop_run: false },
        };
        let done = executed(Ok(serde_json::json!({"x": 1})), None);
        assert_eq!(done.cacheable_result(false), Some(&serde_json::json!({"x": 1})));
        assert_eq!(done.cacheable_result(true), None);
        assert_eq!(executed(Ok(serde_json::json!({"spawned": 2})), Some(spawn)).cacheable_result(false), None);
        assert_eq!(executed(Err(crate::TaskError::fatal("no")), None).cacheable_result(false), None);
    }

    #[test]
    fn skip_reports_say_what_happened() {
        let worker = WorkerIdentity {
            config: Default::default(),
            handlers: Default::default(),
            id: "w1".into(),
            stats: Default::default(),
            cancellations: Default::default(),
        };
        let r = Skip::DeliveriesExhausted { delivered: 20 }.report("echo", &worker);
        assert_eq!(
            (r.kind, r.error.as_ref().map(|e| e.code.as_str())),
            (EventKind::Dead, Some("deliveries_exhausted"))
        );
        let r = Skip::UnknownKind.report("nope", &worker);
        assert_eq!(r.kind, EventKind::Failed);
        assert!(r.error.is_some_and(|e| e.message.contains("\"nope\"") && !e.retryable));
        assert_eq!(Skip::Cancelled.report("echo", &worker), Report::of(EventKind::Cancelled));
    }
}
