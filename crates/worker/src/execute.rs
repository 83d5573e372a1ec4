//! Execution: the handler under the attempt's timeout and cancellation, with a `started`
//! event once it has run for `worker.started_event_delay`.

use crate::attempt::{Attempt, Runtime};
use crate::events::AfterPublish;
use crate::handler::{Handler, Usage};
use crate::running::RunningTask;
use crate::workflow::Effects;
use crate::{TaskContext, TaskError};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use taskfleet_proto::{Timings, now_ms};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a cancelled handler is given to stop by itself before it is aborted.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// What running the handler gave.
pub(crate) struct Executed {
    pub outcome: Result<Value, TaskError>,
    pub timings: Timings,
    /// Tokens and cost the handler reported.
    pub usage: Usage,
    /// The spawn or early stop the handler asked for.
    pub effects: Effects,
}

impl Executed {
    /// The result this attempt leaves in a cache (exact or semantic): a success of a task not
    /// cancelled meanwhile. An attempt that spawned children has none: what it returned is
    /// interim, the task's result comes later from the join (a twin must wait for, or run, the
    /// whole thing).
    pub fn cacheable_result(&self, cancelled: bool) -> Option<&Value> {
        match &self.outcome {
            Ok(result) if !cancelled && self.effects.spawn.is_none() => Some(result),
            _ => None,
        }
    }
}

/// Runs the attempt's handler; the attempt is in the running registry (for heartbeats and
/// cancellation) under `token` meanwhile (replacing its admission's entry). Takes the payload out of the attempt's envelope.
pub(crate) async fn execute(
    rt: &Runtime,
    token: u64,
    reply: Option<async_nats::Subject>,
    attempt: &mut Attempt,
    handler: Arc<dyn Handler>,
) -> Executed {
    let cancel = CancellationToken::new();
    let usage: Arc<std::sync::Mutex<Usage>> = Default::default();
    let effects: Arc<std::sync::Mutex<Effects>> = Default::default();
    let env = &mut attempt.env;
    let (parents, unreadable) = match env.parents_omitted {
        false => (std::mem::take(&mut env.parents), None),
        true => match rt.submitter.coordinator.parents(env.id).await {
            Ok((parents, previous)) => {
                env.previous = previous.map(Box::new);
                (parents, None)
            }
            Err(e) => (Vec::new(), Some(e)),
        },
    };
    let handler_span = tracing::info_span!(parent: &attempt.span, "handler", kind = %attempt.env.kind);
    let ctx = TaskContext {
        task_id: attempt.env.id,
        kind: attempt.env.kind.clone(),
        queue: attempt.env.queue.clone(),
        priority: attempt.env.priority,
        attempt: attempt.number,
        max_attempts: attempt.max_attempts,
        deadline: Instant::now() + attempt.timeout(),
        cancel: cancel.clone(),
        progress: Some(rt.progress.clone()),
        shared: Some(rt.policies.shared.clone()),
        usage: usage.clone(),
        span: handler_span.clone(),
        submitter: Some(rt.submitter.clone()),
        run_id: attempt.env.run_id,
        node: attempt.env.node.clone(),
        iteration: attempt.env.iteration,
        parents: Arc::new(parents),
        previous: attempt.env.previous.take().map(|p| Arc::new(*p)),
        checkpoint: attempt.env.checkpoint.take(),
        effects: effects.clone(),
        generation: attempt.dispatch.generation.max(1) as u32,
    };
    rt.running.insert(token, RunningTask { reply, cancel: cancel.clone(), base: attempt.base.clone() });
    let stats = &rt.worker.stats;
    stats.in_flight.fetch_add(1, Ordering::Relaxed);
    let started_at = now_ms();
    let mut timings =
        Timings { created_at: attempt.env.created_at, received_at: attempt.received_at, started_at, finished_at: 0 };

    let payload = std::mem::take(&mut attempt.env.payload);
    let outcome = match unreadable {
        // The step cannot start without its inputs: another attempt, later.
        Some(e) => Err(e),
        None => {
            let call = tokio::spawn(handler.call(ctx, payload).instrument(handler_span));
            supervise(rt, attempt, call, &cancel, timings).instrument(attempt.span.clone()).await
        }
    };

    timings.finished_at = now_ms();
    rt.running.remove(token);
    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    stats.finished.fetch_add(1, Ordering::Relaxed);
    metrics::histogram!("taskfleet_worker_run_seconds", "kind" => attempt.env.kind.clone())
        .record((timings.finished_at.saturating_sub(started_at)) as f64 / 1000.0);
    let usage = usage.lock().map(|u| *u).unwrap_or_default();
    let effects = effects.lock().map(|e| e.clone()).unwrap_or_default();
    Executed { outcome, timings, usage, effects }
}

/// Waits for the handler, its timeout or its cancellation, whichever comes first, and sends
/// the `started` event if the handler is still running after the configured delay.
async fn supervise(
    rt: &Runtime,
    attempt: &Attempt,
    mut call: JoinHandle<Result<Value, TaskError>>,
    cancel: &CancellationToken,
    timings: Timings,
) -> Result<Value, TaskError> {
    let timeout = attempt.timeout();
    let abort = call.abort_handle();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let started_timer = tokio::time::sleep(rt.worker.config.worker.started_event_delay);
    tokio::pin!(started_timer);
    let mut started_sent = false;
    loop {
        tokio::select! {
            r = &mut call => return match r {
                Ok(result) => result,
                Err(join) if join.is_panic() => Err(TaskError::retryable("handler panicked").with_code("handler_panic")),
                Err(_) => Err(TaskError::retryable("handler was aborted").with_code("aborted")),
            },
            _ = cancel.cancelled() => {
                if tokio::time::timeout(CANCEL_GRACE, &mut call).await.is_err() {
                    abort.abort();
                }
                return Err(TaskError::fatal("cancelled by request").with_code("cancelled"));
            }
            _ = &mut deadline => {
                abort.abort();
                cancel.cancel();
                return Err(TaskError::retryable(format!("attempt exceeded its timeout of {timeout:?}")).with_code("timeout"));
            }
            _ = &mut started_timer, if !started_sent => {
                started_sent = true;
                let mut ev = attempt.base.clone();
                ev.timings = Some(timings);
                rt.events.send(ev, AfterPublish::Nothing);
            }
        }
    }
}
