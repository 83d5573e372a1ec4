//! Settling an attempt: a pure decision, from the handler's outcome, the attempt number and
//! the retry policy, of what the worker reports and does next.

use crate::workflow::Effects;
use crate::{DeferReason, Disposition, RetryPolicy, TaskError};
use serde_json::Value;
use std::time::Duration;
use taskfleet_proto::{EventKind, Spawn, TaskErrorInfo, TaskEvent};

/// What the decision needs to know besides the outcome.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts {
    /// This attempt, from 1.
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// The task was cancelled while it ran.
    pub cancelled: bool,
    /// The task has waited out open breakers for `breaker_max_wait` already: one more
    /// `breaker_open` ends the attempt instead of deferring it again.
    pub breaker_gave_up: bool,
}

/// What becomes of an attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Settlement {
    /// It did not start: run it again after `delay` without counting an attempt.
    Defer {
        /// Why.
        reason: DeferReason,
        /// How long to wait.
        delay: Duration,
    },
    /// It ended: report this, then acknowledge the message.
    Report(Report),
}

/// The end of an attempt, as its event tells it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    /// `succeeded`, `retrying`, `failed`, `dead` or `cancelled`.
    pub kind: EventKind,
    /// The handler's result, on success.
    pub result: Option<Value>,
    /// The failure.
    pub error: Option<TaskErrorInfo>,
    /// When the coordinator dispatches the next attempt (`retrying` only).
    pub retry_in: Option<Duration>,
    /// The children and join added (`spawned` only).
    pub spawn: Option<Box<Spawn>>,
    /// The success ends the task's run.
    pub stop_run: bool,
}

impl Report {
    /// A report of `kind` with nothing else.
    pub fn of(kind: EventKind) -> Report {
        Report { kind, result: None, error: None, retry_in: None, spawn: None, stop_run: false }
    }

    /// A report of `kind` failing with `code` and `message`.
    pub fn failure(kind: EventKind, code: &str, message: String, retryable: bool) -> Report {
        Report { error: Some(TaskErrorInfo { code: code.into(), message, retryable }), ..Report::of(kind) }
    }

    /// Writes the report into the attempt's event.
    pub fn apply(self, ev: &mut TaskEvent) {
        ev.kind = self.kind;
        ev.result = self.result;
        ev.error = self.error;
        ev.retry_in_ms = self.retry_in.map(|d| d.as_millis() as u64);
        ev.spawn = self.spawn;
        ev.stop_run = self.stop_run;
    }
}

/// Decides what becomes of an attempt that ran its handler. A spawn or an early stop takes
/// effect only with a success.
pub(crate) fn settle(
    outcome: Result<Value, TaskError>,
    effects: Effects,
    facts: Facts,
    retry: &RetryPolicy,
) -> Settlement {
    if facts.cancelled {
        return Settlement::Report(Report::of(EventKind::Cancelled));
    }
    let err = match outcome {
        Ok(result) => {
            let kind = if effects.spawn.is_some() { EventKind::Spawned } else { EventKind::Succeeded };
            let stop_run = effects.stop_run && effects.spawn.is_none();
            return Settlement::Report(Report {
                result: Some(result),
                spawn: effects.spawn.map(Box::new),
                stop_run,
                ..Report::of(kind)
            });
        }
        Err(err) => err,
    };
    let not_before = match err.disposition {
        Disposition::Defer { reason, delay } if !(reason == DeferReason::BreakerOpen && facts.breaker_gave_up) => {
            return Settlement::Defer { reason, delay };
        }
        // Deferred too long: an attempt that failed, retried no sooner than the deferral.
        Disposition::Defer { delay, .. } => Some(delay),
        Disposition::Retry { not_before } => not_before,
        Disposition::Fatal => None,
    };
    let retryable = err.is_retryable();
    let mut report = Report::failure(EventKind::Failed, &err.code, err.message, retryable);
    if retryable && facts.attempt < facts.max_attempts {
        // The coordinator dispatches the next attempt when the backoff has passed.
        report.kind = EventKind::Retrying;
        report.retry_in = Some(retry.delay(facts.attempt, not_before));
    } else if retryable {
        report.kind = EventKind::Dead;
    }
    Settlement::Report(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: RetryPolicy = RetryPolicy { base: Duration::from_secs(1), factor: 2.0, max: Duration::from_secs(60) };

    fn settle_plain(outcome: Result<Value, TaskError>, facts: Facts, retry: &RetryPolicy) -> Settlement {
        settle(outcome, Effects::default(), facts, retry)
    }

    fn facts(attempt: u32) -> Facts {
        Facts { attempt, max_attempts: 3, cancelled: false, breaker_gave_up: false }
    }

    fn report(s: Settlement) -> Report {
        match s {
            Settlement::Report(r) => r,
            other => panic!("expected a report, got {other:?}"),
        }
    }

    #[test]
    fn success_carries_the_result() {
        let r = report(settle_plain(Ok(serde_json::json!({"x": 1})), facts(1), &RETRY));
        assert_eq!(r.kind, EventKind::Succeeded);
        assert_eq!(r.result, Some(serde_json::json!({"x": 1})));
        assert_eq!(r.error, None);
    }

    #[test]
    fn retryable_failures_retry_until_the_last_attempt_then_die() {
        let r = report(settle_plain(Err(TaskError::retryable("flaky").with_code("http_503")), facts(2), &RETRY));
        assert_eq!(r.kind, EventKind::Retrying);
        assert!(r.retry_in.is_some_and(|d| d <= RETRY.ceiling(2)));
        assert_eq!(r.error.as_ref().map(|e| (e.code.as_str(), e.retryable)), Some(("http_503", true)));
        let r = report(settle_plain(Err(TaskError::retryable("flaky")), facts(3), &RETRY));
        assert_eq!(r.kind, EventKind::Dead);
        assert_eq!(r.retry_in, None);
    }

    #[test]
    fn a_retry_after_is_a_floor_of_the_backoff() {
        let err = TaskError::retryable("429").retry_after(Duration::from_secs(30));
        let r = report(settle_plain(Err(err), facts(1), &RETRY));
        assert!(r.retry_in.is_some_and(|d| d >= Duration::from_secs(30)));
    }

    #[test]
    fn a_spawn_or_a_stop_rides_on_a_success_only() {
        let spawn = Spawn {
            children: vec![taskfleet_proto::NodeSpec::new("", "k", Value::Null)],
            join: taskfleet_proto::NodeSpec::new("", "j", Value::Null),
            on_child_failure: Default::default(),
        };
        let effects = Effects { spawn: Some(spawn.clone()), stop_run: false };
        let r = report(settle(Ok(Value::Null), effects.clone(), facts(1), &RETRY));
        assert_eq!((r.kind, r.spawn), (EventKind::Spawned, Some(Box::new(spawn))));
        let r = report(settle(Err(TaskError::fatal("no")), effects, facts(1), &RETRY));
        assert_eq!((r.kind, r.spawn), (EventKind::Failed, None));
        let stop = Effects { spawn: None, stop_run: true };
        let r = report(settle(Ok(Value::Null), stop, facts(1), &RETRY));
        assert!(r.kind == EventKind::Succeeded && r.stop_run);
    }

    #[test]
    fn fatal_failures_fail_at_once() {
        let r = report(settle_plain(Err(TaskError::fatal("bad input").with_code("invalid_payload")), facts(1), &RETRY));
        assert_eq!(r.kind, EventKind::Failed);
        assert_eq!(r.error.map(|e| e.retryable), Some(false));
    }

    #[test]
    fn cancellation_wins_over_any_outcome() {
        let f = Facts { cancelled: true, ..facts(1) };
        for outcome in [Ok(Value::Null), Err(TaskError::retryable("x")), Err(TaskError::fatal("y"))] {
            assert_eq!(report(settle_plain(outcome, f, &RETRY)), Report::of(EventKind::Cancelled));
        }
        let deferred = TaskError::deferred(DeferReason::RateLimited, "no token", Duration::from_secs(1));
        assert_eq!(report(settle_plain(Err(deferred), f, &RETRY)).kind, EventKind::Cancelled);
    }

    #[test]
    fn deferrals_are_not_attempts_until_open_breakers_outlast_the_wait() {
        let open = || TaskError::deferred(DeferReason::BreakerOpen, "all open", Duration::from_secs(5));
        assert_eq!(
            settle_plain(Err(open()), facts(3), &RETRY),
            Settlement::Defer { reason: DeferReason::BreakerOpen, delay: Duration::from_secs(5) }
        );
        let gave_up = Facts { breaker_gave_up: true, ..facts(1) };
        let r = report(settle_plain(Err(open()), gave_up, &RETRY));
        assert_eq!(r.kind, EventKind::Retrying);
        assert!(r.retry_in.is_some_and(|d| d >= Duration::from_secs(5)));
        // A rate limit's deferral never gives up: its tokens come.
        let limited = TaskError::deferred(DeferReason::RateLimited, "no token", Duration::from_secs(2));
        assert!(matches!(settle_plain(Err(limited), gave_up, &RETRY), Settlement::Defer { .. }));
    }
}
