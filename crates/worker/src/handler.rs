//! What a handler is and what it is given.

use crate::workflow::{Coordinator, Effects};
use crate::{DeferReason, TaskError};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskfleet_proto::{ParentOutcome, Priority, Spawn, Subjects, TaskEnvelope, TaskId, TokenUsage};
use taskfleet_shared_state::{Breakers, Decision, RateLimiter, ResultCache};
use tokio_util::sync::CancellationToken;

/// What a handler knows about the task it runs.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// Task id; handlers must be idempotent by it (a task can run more than once).
    pub task_id: TaskId,
    /// Task kind.
    pub kind: String,
    /// Queue.
    pub queue: String,
    /// Priority.
    pub priority: Priority,
    /// This attempt, from 1.
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// When this attempt times out.
    pub deadline: Instant,
    /// Cancelled when the task is cancelled or the attempt is abandoned; long handlers should
    /// watch it.
    pub cancel: CancellationToken,
    pub(crate) progress: Option<tokio::sync::mpsc::UnboundedSender<(TaskId, Value)>>,
    pub(crate) shared: Option<Arc<Shared>>,
    pub(crate) usage: Arc<Mutex<Usage>>,
    /// The attempt's `handler` span: the parent of child tasks' traces.
    pub(crate) span: tracing::Span,
    pub(crate) submitter: Option<Arc<Submitter>>,
    /// The run the task belongs to, if any.
    pub run_id: Option<uuid::Uuid>,
    /// The task's node name in its run or spawn.
    pub node: Option<String>,
    /// For a repeating node: this iteration, from 1; 0 otherwise.
    pub iteration: u32,
    /// The parents' final outcomes, in `depends_on` order (see [`TaskContext::parent`]).
    pub parents: Arc<Vec<ParentOutcome>>,
    /// For a loop iteration after the first: the previous iteration's outcome.
    pub previous: Option<Arc<ParentOutcome>>,
    /// The last checkpoint an earlier attempt of this task saved ([`TaskContext::checkpoint`]).
    pub checkpoint: Option<Value>,
    pub(crate) effects: Arc<Mutex<Effects>>,
    /// Dispatch generation of the message this attempt runs from.
    pub(crate) generation: u32,
}

/// Where a handler's child tasks go (the fleet's submit subjects) and the coordinator's API.
#[derive(Debug, Clone)]
pub(crate) struct Submitter {
    pub js: async_nats::jetstream::Context,
    pub subjects: Subjects,
    pub coordinator: Coordinator,
}

/// The fleet-wide state a handler can use: rate limits, circuit breakers and the result cache
/// in Redis.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Named fleet-wide rate limits.
    pub limiter: RateLimiter,
    /// Circuit breakers per dependency.
    pub breakers: Breakers,
    /// The fleet's result cache with the worker's per-kind policies (what admission uses); the
    /// inline `Providers::chat`/`http` calls consult it under the `llm.chat`/`http` policies.
    pub cache: ResultCache,
    /// The semantic cache (`policies.semantic_cache`), for [`TaskContext::semantic_lookup`].
    pub semantic: crate::semantic::SemanticCache,
}

/// What an attempt consumed, reported by the handler and carried in its event.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Prompt and completion tokens.
    pub tokens: Option<TokenUsage>,
    /// Cost in US dollars.
    pub cost_usd: Option<f64>,
    /// What calls answered from the shared cache would have cost, in US dollars
    /// ([`TaskContext::record_saved`]).
    pub saved_usd: Option<f64>,
    /// The attempt's result came from the cache: a hit of [`TaskContext::semantic_lookup`]
    /// (its event then counts as a cache hit, as an admission hit's does).
    pub cache_hit: bool,
}

impl Usage {
    /// Adds `other`'s tokens, cost and savings to these (a cache hit stays this usage's own).
    pub(crate) fn add(&mut self, other: &Usage) {
        if let Some(t) = other.tokens {
            let sum = self.tokens.get_or_insert(TokenUsage { prompt: 0, completion: 0 });
            sum.prompt += t.prompt;
            sum.completion += t.completion;
        }
        if let Some(c) = other.cost_usd {
            *self.cost_usd.get_or_insert(0.0) += c;
        }
        if let Some(s) = other.saved_usd {
            *self.saved_usd.get_or_insert(0.0) += s;
        }
    }

    /// Nothing consumed nor saved.
    pub(crate) fn is_empty(&self) -> bool {
        self.tokens.is_none() && self.cost_usd.is_none() && self.saved_usd.is_none()
    }
}

impl TaskContext {
    /// Reports progress; it is published as a `progress` event.
    pub fn progress(&self, value: impl Serialize) {
        if let (Some(tx), Ok(v)) = (&self.progress, serde_json::to_value(value)) {
            let _ = tx.send((self.task_id, v));
        }
    }

    /// Takes a token of the fleet-wide rate limit `name`, waiting for a booked slot when the
    /// next one is within the reservation horizon; when none is, the error defers the task
    /// (return it with `?`). Without Redis configured (a bare context) it allows.
    pub async fn acquire(&self, name: &str) -> Result<(), TaskError> {
        match self.try_acquire(name).await? {
            Decision::Denied { retry_after } => Err(TaskError::deferred(
                DeferReason::RateLimited,
                format!("rate limit {name} has no token"),
                retry_after,
            )),
            Decision::Allowed | Decision::Reserved { .. } => Ok(()),
        }
    }

    /// Like [`TaskContext::acquire`] without deferring: takes a token of the limit `name`
    /// (waiting for a booked slot within the reservation horizon) and returns the limiter's
    /// decision. `Denied` means no token was taken and none will be within the horizon (try
    /// another provider, or defer). An unknown limit is a fatal `unknown_limit` error. Without
    /// Redis configured (a bare context) it allows.
    pub async fn try_acquire(&self, name: &str) -> Result<Decision, TaskError> {
        use tracing::Instrument;
        let Some(shared) = &self.shared else { return Ok(Decision::Allowed) };
        // A `rate_limit.wait` span under the handler's, covering a booked slot's wait.
        let span = tracing::info_span!(parent: &self.span, "rate_limit.wait", limits = name,
                                       deferred = false, delay_ms = tracing::field::Empty);
        async {
            match shared.limiter.acquire(name).await {
                Ok(Decision::Reserved { wait }) => {
                    // A booked slot, at most the reservation horizon away.
                    span.record("delay_ms", wait.as_millis() as u64);
                    tokio::time::sleep(wait).await;
                    Ok(Decision::Reserved { wait })
                }
                Ok(d @ Decision::Denied { .. }) => {
                    span.record("deferred", true);
                    Ok(d)
                }
                Ok(d) => Ok(d),
                Err(e) => Err(TaskError::fatal(e.to_string()).with_code("unknown_limit")),
            }
        }
        .instrument(span.clone())
        .await
    }

    /// The fleet's circuit breakers, when the worker has them.
    pub fn breakers(&self) -> Option<&Breakers> {
        self.shared.as_ref().map(|s| &s.breakers)
    }

    /// Adds tokens and cost to this attempt's usage (reported in its event).
    pub fn record_usage(&self, tokens: Option<TokenUsage>, cost_usd: Option<f64>) {
        if let Ok(mut u) = self.usage.lock() {
            if let Some(t) = tokens {
                let sum = u.tokens.get_or_insert(TokenUsage { prompt: 0, completion: 0 });
                sum.prompt += t.prompt;
                sum.completion += t.completion;
            }
            if let Some(c) = cost_usd {
                *u.cost_usd.get_or_insert(0.0) += c;
            }
        }
    }

    /// Adds what a call answered from the shared cache would have cost to this attempt's
    /// savings (its event's `saved_usd`).
    pub fn record_saved(&self, usd: f64) {
        if let Ok(mut u) = self.usage.lock() {
            *u.saved_usd.get_or_insert(0.0) += usd;
        }
    }

    /// The fleet's result cache, when the worker has it.
    pub fn cache(&self) -> Option<&ResultCache> {
        self.shared.as_ref().map(|s| &s.cache)
    }

    /// Looks `text` up in the semantic cache policy `name` (a key of `policies.semantic_cache`,
    /// e.g. the kind of the task whose result is wanted): embeds it (the embedding's tokens and
    /// cost go into this attempt's usage) and returns the most similar stored result of that
    /// policy at or above its threshold, or `None` (also when Redis is unreachable, or outside a
    /// worker). An open breaker or a refused rate-limit token of the embedding provider is a
    /// deferral, a failed embedding call its retryable error (`http_500`, `http_timeout`, …;
    /// treat them as a miss with `.ok().flatten()`); an unknown policy is a fatal
    /// `unknown_semantic_policy`. A hit counts as this attempt's cache hit and saves the stored
    /// result's cost.
    pub async fn semantic_lookup(
        &self,
        name: &str,
        text: &str,
    ) -> Result<Option<crate::semantic::SemanticHit>, TaskError> {
        crate::semantic::lookup_for(self, name, text).await
    }

    /// Stores `result` under the key text `text` in the semantic cache policy `name`, with what
    /// computing it cost (what a later hit saves). Reuses the embedding of a recent lookup of
    /// the same text; errors as [`TaskContext::semantic_lookup`]'s. A store Redis does not take
    /// is skipped (the result is recomputed next time).
    pub async fn semantic_store(
        &self,
        name: &str,
        text: &str,
        result: &Value,
        cost_usd: Option<f64>,
    ) -> Result<(), TaskError> {
        crate::semantic::store_for(self, name, text, result, cost_usd).await
    }

    /// Marks this attempt as served by the cache (its event counts as a cache hit), saving
    /// `saved_usd`.
    pub(crate) fn record_cache_hit(&self, saved_usd: Option<f64>) {
        if let Ok(mut u) = self.usage.lock() {
            u.cache_hit = true;
        }
        if let Some(usd) = saved_usd {
            self.record_saved(usd);
        }
    }

    /// This attempt's usage so far.
    pub fn usage(&self) -> Usage {
        self.usage.lock().map(|u| *u).unwrap_or_default()
    }

    /// Time left before this attempt times out.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The trace context of this attempt (its `handler` span) as NATS headers (`traceparent`,
    /// `tracestate`). Put them on a submission to make the submitted task part of this task's
    /// trace: the coordinator's `task.intake` span of the child is then a child of this
    /// handler. [`TaskContext::submit`] does it for you; this is for handlers that publish
    /// submissions themselves. Empty when the worker has no tracing (a bare test context).
    pub fn trace_headers(&self) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        taskfleet_telemetry::inject_context(&self.span, &mut h);
        h
    }

    /// A new task of `kind` in this task's queue and at its priority, for
    /// [`TaskContext::submit`]. Its id is fresh: set `id` (or `idempotency_key`) to something
    /// derived from [`TaskContext::task_id`] when a retried attempt must not create it twice.
    pub fn child_envelope(&self, kind: impl Into<String>, payload: Value) -> TaskEnvelope {
        TaskEnvelope::new(kind, payload).with_queue(&self.queue).with_priority(self.priority)
    }

    /// Submits a task (a child of this one) to the fleet, carrying this attempt's trace
    /// context ([`TaskContext::trace_headers`]), and returns once JetStream has stored the
    /// submission. Resubmitting the same id or idempotency key within the dedup window stores
    /// nothing new. Fails with a retryable `submit_failed` error when the submission cannot be
    /// stored, and a fatal one outside a running worker.
    pub async fn submit(&self, env: &TaskEnvelope) -> Result<(), TaskError> {
        let Some(to) = &self.submitter else {
            return Err(TaskError::fatal("no fleet to submit to (not running in a worker)").with_code("submit_failed"));
        };
        taskfleet_bus::publish_submission(&to.js, &to.subjects, env, self.trace_headers()).await.map(|_| ()).map_err(
            |e| TaskError::retryable(format!("cannot submit child task {}: {e}", env.id)).with_code("submit_failed"),
        )
    }

    /// The outcome of the parent named `node`.
    pub fn parent(&self, node: &str) -> Option<&ParentOutcome> {
        self.parents.iter().find(|p| p.node.as_deref() == Some(node))
    }

    /// The result of the parent named `node`, when it succeeded.
    pub fn parent_result(&self, node: &str) -> Option<&Value> {
        self.parent(node).and_then(|p| p.result.as_ref())
    }

    /// Saves a checkpoint durably: when this returns `Ok`, a later attempt of this task (after
    /// a crash, a timeout or a retry) finds it in [`TaskContext::checkpoint`]. While the
    /// coordinator cannot store it, it keeps trying for up to 30 s (and within the attempt's
    /// timeout), then fails with a retryable `checkpoint_failed` error.
    pub async fn checkpoint(&self, value: impl Serialize) -> Result<(), TaskError> {
        let Some(to) = &self.submitter else {
            return Err(TaskError::fatal("no coordinator (not running in a worker)").with_code("checkpoint_failed"));
        };
        let value = serde_json::to_value(value).map_err(|e| {
            TaskError::fatal(format!("checkpoint not serializable: {e}")).with_code("checkpoint_failed")
        })?;
        let until = tokio::time::Instant::from_std(self.deadline.min(Instant::now() + Duration::from_secs(30)));
        to.coordinator.checkpoint(self.task_id, self.generation, value, until).await.map(|_| ())
    }

    /// Adds children and a join when this attempt succeeds: the task then waits, holding no
    /// worker, until the join is final, and takes the join's state and result as its own. The
    /// children and the join are written in the same transaction as this attempt's end, or not
    /// at all. One spawn per attempt; an invalid spawn is a fatal `invalid_spawn` error.
    pub fn spawn(&self, spawn: Spawn) -> Result<(), TaskError> {
        let invalid = |m: String| TaskError::fatal(m).with_code("invalid_spawn");
        let nodes = spawn.nodes().map_err(|e| invalid(e.to_string()))?;
        taskfleet_proto::plan_nodes(&nodes, &self.queue, self.priority, usize::MAX)
            .map_err(|e| invalid(e.to_string()))?;
        let mut effects = self.effects.lock().map_err(|_| invalid("effects poisoned".into()))?;
        if effects.spawn.is_some() {
            return Err(invalid("an attempt spawns once".into()));
        }
        effects.spawn = Some(spawn);
        Ok(())
    }

    /// Ends this task's run when this attempt succeeds: the task's result becomes the run's
    /// output and every unfinished task of the run is cancelled. No effect outside a run.
    pub fn stop_run(&self) {
        if let Ok(mut effects) = self.effects.lock() {
            effects.stop_run = true;
        }
    }

    /// A context for calling a handler directly, e.g. in unit tests.
    pub fn for_test(kind: &str) -> TaskContext {
        TaskContext::detached(kind, None, tracing::Span::none(), Instant::now() + Duration::from_secs(60))
    }

    /// A context outside any handler, with its own usage: for calls the worker makes on a task's
    /// behalf before its handler runs (the semantic cache's lookup at admission).
    pub(crate) fn detached(kind: &str, shared: Option<Arc<Shared>>, span: tracing::Span, deadline: Instant) -> Self {
        TaskContext {
            task_id: uuid::Uuid::now_v7(),
            kind: kind.to_string(),
            queue: "default".into(),
            priority: Priority::Normal,
            attempt: 1,
            max_attempts: 1,
            deadline,
            cancel: CancellationToken::new(),
            progress: None,
            shared,
            usage: Default::default(),
            span,
            submitter: None,
            run_id: None,
            node: None,
            iteration: 0,
            parents: Default::default(),
            previous: None,
            checkpoint: None,
            effects: Default::default(),
            generation: 1,
        }
    }
}

/// Runs tasks of one kind: `async fn(TaskContext, Value) -> Result<Value, TaskError>`.
/// Any such closure is a handler.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    fn call(&self, ctx: TaskContext, payload: Value) -> BoxFuture<'static, Result<Value, TaskError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(TaskContext, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    fn call(&self, ctx: TaskContext, payload: Value) -> BoxFuture<'static, Result<Value, TaskError>> {
        Box::pin(self(ctx, payload))
    }
}

/// Adapts a handler over typed input and output: the payload is deserialized into `I`
/// (a mismatch is a fatal `invalid_payload` error) and the output serialized from `O`.
pub fn typed<I, O, F, Fut>(f: F) -> impl Handler
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(TaskContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
{
    let f = std::sync::Arc::new(f);
    move |ctx: TaskContext, payload: Value| {
        let f = f.clone();
        async move {
            let input: I = serde_json::from_value(payload)
                .map_err(|e| TaskError::fatal(format!("payload does not fit: {e}")).with_code("invalid_payload"))?;
            let out = f(ctx, input).await?;
            serde_json::to_value(out).map_err(|e| TaskError::fatal(format!("output not serializable: {e}")))
        }
    }
}
