//! The worker run loop: pull, pick by priority, run with a timeout, report.

use crate::events::{AfterPublish, EventSender, spawn_publisher};
use crate::handler::{Shared, Submitter, Usage};
use crate::lanes::{Delivery, Lanes};
use crate::{Handler, RetryPolicy, TaskContext, TaskError, WorkerError};
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use taskfleet_bus::Topology;
use taskfleet_config::CacheSpec;
use taskfleet_config::Config;
use taskfleet_proto::{
    EventKind, Priority, Runnable, TaskEnvelope, TaskErrorInfo, TaskEvent, Timings, decode, headers, now_ms,
};
use taskfleet_shared_state::{CacheClaim, CacheKey, Decision, ResultCache, SharedState};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Live counters of a worker, for health and metrics endpoints.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Handlers running now.
    pub in_flight: AtomicU64,
    /// Tasks pulled and waiting for a slot.
    pub buffered: AtomicU64,
    /// Attempts finished (any outcome).
    pub finished: AtomicU64,
    /// True once every consumer is set up and pulling.
    pub ready: AtomicBool,
}

/// Builds a [`Worker`]: register handlers by kind, then `build`.
pub struct WorkerBuilder {
    config: Config,
    handlers: HashMap<String, Arc<dyn Handler>>,
    retry_by_kind: HashMap<String, RetryPolicy>,
    cache_by_kind: HashMap<String, CacheSpec>,
}

impl WorkerBuilder {
    /// Registers `handler` for tasks of `kind` (replacing an earlier one).
    pub fn handler(mut self, kind: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// Sets the retry backoff of one kind. A task's own `retry` takes precedence; kinds without
    /// a policy use the configured default (`worker.retry_base`, `retry_factor`, `retry_max`).
    pub fn retry_policy(mut self, kind: impl Into<String>, retry: RetryPolicy) -> Self {
        self.retry_by_kind.insert(kind.into(), retry);
        self
    }

    /// Caches the results of one kind in the fleet's shared cache (in addition to, or instead
    /// of, `policies.cache` in the configuration).
    pub fn cache_policy(mut self, kind: impl Into<String>, spec: CacheSpec) -> Self {
        self.cache_by_kind.insert(kind.into(), spec);
        self
    }

    /// Finishes the worker.
    pub fn build(self) -> Worker {
        let id = if self.config.worker.id.is_empty() {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "worker".into());
            format!("{host}-{}", std::process::id())
        } else {
            self.config.worker.id.clone()
        };
        let retry_default = RetryPolicy {
            base: self.config.worker.retry_base,
            factor: self.config.worker.retry_factor,
            max: self.config.worker.retry_max,
        };
        Worker {
            inner: Arc::new(Inner {
                config: self.config,
                handlers: self.handlers,
                retry_default,
                retry_by_kind: self.retry_by_kind,
                cache_by_kind: self.cache_by_kind,
                cancelled: Default::default(),
                id,
                stats: Arc::new(WorkerStats::default()),
            }),
        }
    }
}

struct Inner {
    config: Config,
    handlers: HashMap<String, Arc<dyn Handler>>,
    retry_default: RetryPolicy,
    retry_by_kind: HashMap<String, RetryPolicy>,
    cache_by_kind: HashMap<String, CacheSpec>,
    /// Ids of cancelled tasks, from the cancellation bucket.
    cancelled: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    id: String,
    stats: Arc<WorkerStats>,
}

impl Inner {
    /// The backoff for a task: its own, else its kind's, else the default.
    fn retry_for(&self, env: &TaskEnvelope) -> RetryPolicy {
        if let Some(r) = env.retry {
            return RetryPolicy {
                base: Duration::from_millis(r.base_ms),
                factor: r.factor,
                max: Duration::from_millis(r.max_ms),
            };
        }
        self.retry_by_kind.get(&env.kind).copied().unwrap_or(self.retry_default)
    }

    fn is_cancelled(&self, id: &uuid::Uuid) -> bool {
        self.cancelled.lock().map(|c| c.contains(id)).unwrap_or(false)
    }
}

/// A worker process's task loop. Stateless: run as many as you like against one fleet.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl Worker {
    /// Starts building a worker with the fleet configuration.
    pub fn builder(config: Config) -> WorkerBuilder {
        WorkerBuilder { config, handlers: HashMap::new(), retry_by_kind: HashMap::new(), cache_by_kind: HashMap::new() }
    }

    /// This worker's id, as it appears in events.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.inner.stats.clone()
    }

    /// Kinds this worker can run.
    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<String> = self.inner.handlers.keys().cloned().collect();
        k.sort();
        k
    }

    /// Pulls and runs tasks until `shutdown` is cancelled, then drains: stops pulling, lets
    /// running tasks finish for up to `drain_timeout`, hands everything else back to JetStream
    /// for immediate redelivery, and flushes events.
    pub async fn run(&self, client: async_nats::Client, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let inner = &self.inner;
        let cfg = &inner.config;
        let topology = Topology::new(client.clone(), &cfg.nats);
        topology.ensure_streams().await?;
        let policies = Arc::new(Policies::connect(cfg, &inner.cache_by_kind)?);
        let mut consumers = Vec::new();
        for queue in &cfg.worker.queues {
            for p in Priority::ALL {
                consumers.push((p, topology.dispatch_consumer(queue, p).await?));
            }
        }
        // Event batches stay below the largest message the server takes (its headers aside).
        let max_payload = client.server_info().max_payload.max(64 * 1024);
        let (events, publisher) = spawn_publisher(
            topology.js.clone(),
            topology.subjects.clone(),
            cfg.worker.event_batch_size,
            cfg.worker.event_linger,
            max_payload - 4 * 1024,
        );
        let lanes = Arc::new(Lanes::new(cfg.worker.priority_weights.as_array()));
        let pulling = CancellationToken::new();
        let prefetch = cfg.worker.effective_prefetch();
        let mut pullers = Vec::new();
        for (priority, consumer) in consumers {
            pullers.push(tokio::spawn(pull_loop(
                consumer,
                priority,
                prefetch,
                lanes.clone(),
                pulling.clone(),
                inner.stats.clone(),
            )));
        }

        // Running attempts, by dispatch reply subject, for heartbeats and the drain.
        let running: Arc<std::sync::Mutex<HashMap<u64, RunningTask>>> = Default::default();
        let heartbeat = tokio::spawn(heartbeat_loop(
            client.clone(),
            lanes.clone(),
            running.clone(),
            heartbeat_interval(cfg.nats.ack_wait),
            pulling.clone(),
        ));
        let bucket = topology.cancel_bucket().await?;
        let watcher = tokio::spawn(cancel_watch(bucket, self.inner.clone(), running.clone(), pulling.clone()));
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        let progress = tokio::spawn(progress_loop(progress_rx, running.clone(), events.clone()));

        let presence = crate::presence::Presence {
            client: client.clone(),
            subject: topology.subjects.worker_status(),
            id: inner.id.clone(),
            queues: cfg.worker.queues.clone(),
            max_concurrent: cfg.worker.max_concurrent_tasks as u64,
            stats: inner.stats.clone(),
            every: cfg.worker.status_interval.max(Duration::from_millis(100)),
        };
        let presence = tokio::spawn(presence.run(shutdown.clone()));
        inner.stats.ready.store(true, Ordering::Relaxed);
        tracing::info!(worker = %inner.id, queues = ?cfg.worker.queues, kinds = ?self.kinds(),
                       max_concurrent_tasks = cfg.worker.max_concurrent_tasks, "worker running");

        let slots = Arc::new(Semaphore::new(cfg.worker.max_concurrent_tasks));
        let shared_loop = Loop {
            events: events.clone(),
            running: running.clone(),
            progress_tx: progress_tx.clone(),
            lanes: lanes.clone(),
            policies,
            submitter: Arc::new(Submitter { js: topology.js.clone(), subjects: topology.subjects.clone() }),
            gate: crate::gate::Gate::spawn(client.clone(), topology.subjects.api("task.runnable")),
        };
        let mut next_token: u64 = 0;
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = lanes.pop() => match d { Some(d) => d, None => break },
            };
            inner.stats.buffered.fetch_sub(1, Ordering::Relaxed);
            next_token += 1;
            let token = next_token;
            let this = self.clone();
            let lp = shared_loop.clone();
            tokio::spawn(async move {
                this.run_delivery(token, delivery, lp).await;
                drop(permit);
            });
        }

        // Drain.
        inner.stats.ready.store(false, Ordering::Relaxed);
        pulling.cancel();
        for p in pullers {
            let _ = p.await;
        }
        let buffered = lanes.close();
        tracing::info!(buffered = buffered.len(), running = running_count(&running), "draining");
        for d in buffered {
            let _ = d.msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
        }
        let max = cfg.worker.max_concurrent_tasks as u32;
        let drained = tokio::time::timeout(cfg.worker.drain_timeout, slots.acquire_many(max)).await.is_ok();
        // Whatever is left is running past the drain timeout or waiting out a deferral.
        let left: Vec<RunningTask> =
            running.lock().map(|mut m| m.drain().map(|(_, r)| r).collect()).unwrap_or_default();
        if !left.is_empty() {
            if drained {
                tracing::info!(tasks = left.len(), "handing deferred tasks back for redelivery");
            } else {
                tracing::warn!(tasks = left.len(), "drain timeout: handing running tasks back for redelivery");
            }
            for r in left {
                r.cancel.cancel();
                if let Some(reply) = r.reply {
                    let _ = client.publish(reply, "-NAK".into()).await;
                }
            }
        }
        drop(events);
        drop(progress_tx);
        drop(shared_loop);
        let _ = progress.await;
        let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
        heartbeat.abort();
        watcher.abort();
        let _ = presence.await;
        let _ = client.flush().await;
        tracing::info!("worker stopped");
        Ok(())
    }

    async fn run_delivery(&self, token: u64, delivery: Delivery, lp: Loop) {
        let Delivery { msg, permit, priority: lane, granted, deferred_since } = delivery;
        let Loop { events, running, progress_tx, policies, .. } = lp.clone();
        let received_at = now_ms();
        let inner = &self.inner;
        let limit = inner.config.coordinator.max_body_bytes.max(1 << 20);
        let ct = msg.headers.as_ref().and_then(|h| h.get(headers::CONTENT_TYPE)).map(|v| v.as_str().to_string());
        let env: TaskEnvelope = match decode(&msg.payload, ct.as_deref(), limit) {
            Ok(env) => env,
            Err(e) => {
                // Only the coordinator publishes dispatch messages, so this is a corrupt or
                // foreign message: retrying cannot help.
                metrics::counter!("taskfleet_worker_malformed_dispatch_total").increment(1);
                tracing::error!(subject = %msg.subject, error = %e, "undecodable dispatch message, terminating it");
                let _ = msg.ack_with(async_nats::jetstream::AckKind::Term).await;
                return;
            }
        };
        let dispatch = DispatchInfo::of(&msg);
        // Attempts are handler executions: a redelivery (a worker lost, an event that could not
        // be published, an outage) runs the same attempt again and uses up none.
        let attempt = dispatch.attempt_offset + 1;
        // One span per attempt (and per run after an in-memory deferral), in the trace of the
        // dispatch message's context; a redelivered message keeps its headers, so every retry
        // lands in the same trace.
        let span = tracing::info_span!("task.run", otel.kind = "consumer", task_id = %env.id, kind = %env.kind,
                                       queue = %env.queue, priority = %env.priority, attempt,
                                       worker = %inner.id, cache_hit = tracing::field::Empty,
                                       deferred = tracing::field::Empty, outcome = tracing::field::Empty,
                                       otel.status_code = tracing::field::Empty);
        taskfleet_telemetry::set_parent_from(&span, msg.headers.as_ref());

        let mut base = TaskEvent::new(env.id, EventKind::Started, &env.queue);
        base.task_kind = env.kind.clone();
        base.priority = env.priority;
        base.attempt = attempt;
        base.generation = dispatch.generation.max(1) as u32;
        base.worker = Some(inner.id.clone());
        if taskfleet_telemetry::exporting() {
            // The coordinator records this attempt's events under its span.
            base.traceparent = taskfleet_telemetry::traceparent(&span);
        }

        if dispatch.delivered > 1 || dispatch.generation > 1 {
            // It may have ended, or been dispatched again, since this message was published.
            let verdict = lp.gate.check(env.id, dispatch.generation).await;
            if verdict != Runnable::Run {
                let reason = match verdict {
                    Runnable::Final => "final",
                    Runnable::Stale => "stale",
                    _ => "unknown",
                };
                metrics::counter!("taskfleet_worker_skipped_total", "reason" => reason).increment(1);
                tracing::debug!(task_id = %env.id, generation = dispatch.generation, delivered = dispatch.delivered,
                                reason, "not running a dispatch message: terminating it");
                record_outcome(&span, EventKind::Cancelled);
                let _ = msg.ack_with(async_nats::jetstream::AckKind::Term).await;
                return;
            }
        }
        if dispatch.delivered >= inner.config.nats.max_deliver.max(1) as u32 {
            // The last delivery JetStream makes of a message that never produced an outcome
            // (each earlier one was lost with its worker): something kills its workers.
            let mut ev = base.clone();
            ev.kind = EventKind::Dead;
            ev.error = Some(TaskErrorInfo {
                code: "deliveries_exhausted".into(),
                message: format!(
                    "delivered {} times (nats.max_deliver) without any attempt ending: workers holding it were lost",
                    dispatch.delivered
                ),
                retryable: false,
            });
            record_outcome(&span, ev.kind);
            events.send(ev, AfterPublish::Ack(msg));
            return;
        }
        if inner.is_cancelled(&env.id) {
            // Cancelled while queued: skip it. The coordinator already recorded `cancelled`.
            let mut ev = base.clone();
            ev.kind = EventKind::Cancelled;
            record_outcome(&span, ev.kind);
            events.send(ev, AfterPublish::Ack(msg));
            return;
        }
        let max_attempts = env.effective_max_attempts();
        if attempt > max_attempts {
            // Only a replayed task with a lowered budget gets here.
            let mut ev = base.clone();
            ev.kind = EventKind::Dead;
            ev.error = Some(TaskErrorInfo {
                code: "attempts_exhausted".into(),
                message: format!("attempt {attempt} exceeds max_attempts {max_attempts}"),
                retryable: false,
            });
            record_outcome(&span, ev.kind);
            events.send(ev, AfterPublish::Ack(msg));
            return;
        }
        let Some(handler) = inner.handlers.get(&env.kind).cloned() else {
            metrics::counter!("taskfleet_worker_unknown_kind_total").increment(1);
            let mut ev = base.clone();
            ev.kind = EventKind::Failed;
            ev.error = Some(TaskErrorInfo {
                code: "unknown_kind".into(),
                message: format!(
                    "no handler for kind {:?} on worker {} (knows {:?})",
                    env.kind,
                    inner.id,
                    self.kinds()
                ),
                retryable: false,
            });
            record_outcome(&span, ev.kind);
            events.send(ev, AfterPublish::Ack(msg));
            return;
        };

        let timeout = Duration::from_millis(env.timeout_ms);

        // Admission: a cached result finishes the task at once; an identical task running
        // elsewhere is waited for; then every rate limit the task needs gives a token, or the
        // task is deferred without holding a slot.
        let mut lease: Option<(CacheKey, String)> = None;
        if let Some(key) = policies.cache.key_for(&env.kind, &env.payload) {
            let lookup = tracing::info_span!(parent: &span, "cache.lookup", kind = %env.kind,
                                             result = tracing::field::Empty, waited = false);
            let claim = async {
                let claim = policies.cache.claim(&key, timeout).await;
                if claim != CacheClaim::Follower {
                    return claim;
                }
                // An identical task is running elsewhere: wait for its result.
                lookup.record("waited", true);
                let wait = policies.cache.single_flight_wait().min(timeout);
                policies.cache.wait_for(&key, timeout, wait).await
            }
            .instrument(lookup.clone())
            .await;
            let result = match &claim {
                CacheClaim::Hit(_) => "hit",
                CacheClaim::Leader(_) => "miss",
                CacheClaim::Follower => "wait_expired",
                CacheClaim::Unavailable => "unavailable",
            };
            lookup.record("result", result);
            span.record("cache_hit", matches!(claim, CacheClaim::Hit(_)));
            drop(lookup);
            match claim {
                CacheClaim::Hit(hit) => {
                    drop(permit);
                    metrics::counter!("taskfleet_worker_cache_hits_total", "kind" => env.kind.clone()).increment(1);
                    if let Some(saved) = hit.cost_usd {
                        metrics::counter!("taskfleet_worker_cache_saved_microusd_total", "kind" => env.kind.clone())
                            .increment((saved * 1e6).round() as u64);
                    }
                    let now = now_ms();
                    let mut ev = base;
                    ev.kind = EventKind::Succeeded;
                    ev.cache_hit = true;
                    ev.result = Some(hit.result);
                    ev.saved_usd = hit.cost_usd;
                    ev.at = now;
                    ev.timings =
                        Some(Timings { created_at: env.created_at, received_at, started_at: now, finished_at: now });
                    inner.stats.finished.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("taskfleet_worker_attempts_total", "outcome" => "cache_hit").increment(1);
                    record_outcome(&span, ev.kind);
                    events.send(ev, AfterPublish::Ack(msg));
                    return;
                }
                CacheClaim::Leader(owner) => {
                    metrics::counter!("taskfleet_worker_cache_misses_total", "kind" => env.kind.clone()).increment(1);
                    lease = Some((key, owner));
                }
                CacheClaim::Follower | CacheClaim::Unavailable => {}
            }
        }
        let mut granted = granted;
        let limits = policies.limits_for(&env);
        // Taking the tokens, and a deferral's wait when one is refused. None on a run after a
        // booked slot (its tokens are taken) or for a task without limits.
        let limit_span = if limits.iter().any(|l| !granted.contains(l)) {
            tracing::info_span!(parent: &span, "rate_limit.wait", limits = %limits.join(","), deferred = false,
                                reason = tracing::field::Empty, delay_ms = tracing::field::Empty,
                                held = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        for name in limits {
            if granted.contains(&name) {
                continue;
            }
            let refusal = match policies.shared.limiter.acquire(&name).instrument(limit_span.clone()).await {
                Ok(Decision::Allowed) => {
                    granted.push(name);
                    continue;
                }
                Ok(Decision::Reserved { wait }) => {
                    // Wait for the booked slot without a slot of this worker, then run.
                    granted.push(name);
                    Ok((wait, true))
                }
                Ok(Decision::Denied { retry_after }) => Ok((retry_after, false)),
                Err(e) => Err(e),
            };
            if let Some((key, owner)) = &lease {
                policies.cache.release(key, owner).await;
            }
            match refusal {
                Ok((wait, booked)) => {
                    let reason = if booked { "rate_limit_booked" } else { "rate_limited" };
                    limit_span.record("deferred", true);
                    span.record("deferred", true);
                    let after = Deferral {
                        token,
                        lane,
                        permit,
                        granted,
                        delay: wait,
                        jitter: !booked,
                        span: limit_span,
                        deferred_since,
                    };
                    self.defer(msg, base, after, reason, &lp)
                }
                Err(e) => {
                    let mut ev = base;
                    ev.kind = EventKind::Failed;
                    ev.error =
                        Some(TaskErrorInfo { code: "unknown_limit".into(), message: e.to_string(), retryable: false });
                    record_outcome(&span, ev.kind);
                    events.send(ev, AfterPublish::Ack(msg));
                }
            }
            return;
        }
        drop(limit_span);
        drop(permit);

        let cancel = CancellationToken::new();
        let usage: Arc<std::sync::Mutex<Usage>> = Default::default();
        let handler_span = tracing::info_span!(parent: &span, "handler", kind = %env.kind);
        let ctx = TaskContext {
            task_id: env.id,
            kind: env.kind.clone(),
            queue: env.queue.clone(),
            priority: env.priority,
            attempt,
            max_attempts,
            deadline: Instant::now() + timeout,
            cancel: cancel.clone(),
            progress: Some(progress_tx),
            shared: Some(policies.shared.clone()),
            usage: usage.clone(),
            span: handler_span.clone(),
            submitter: Some(lp.submitter.clone()),
        };
        if let Ok(mut m) = running.lock() {
            m.insert(token, RunningTask { reply: msg.reply.clone(), cancel: cancel.clone(), base: base.clone() });
        }
        inner.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let started_at = now_ms();
        let mut timings = Timings { created_at: env.created_at, received_at, started_at, finished_at: 0 };

        let retry = inner.retry_for(&env);
        let payload = env.payload;
        let call = tokio::spawn(handler.call(ctx, payload).instrument(handler_span));
        let abort = call.abort_handle();
        let started_delay = inner.config.worker.started_event_delay;
        let outcome = async {
            let mut call = call;
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let started_timer = tokio::time::sleep(started_delay);
            tokio::pin!(started_timer);
            let mut started_sent = false;
            loop {
                tokio::select! {
                    r = &mut call => break match r {
                        Ok(result) => result,
                        Err(join) if join.is_panic() => Err(TaskError::retryable("handler panicked").with_code("handler_panic")),
                        Err(_) => Err(TaskError::retryable("handler was aborted").with_code("aborted")),
                    },
                    _ = cancel.cancelled() => {
                        // Cancelled by request: give the handler a moment to stop by itself.
                        if tokio::time::timeout(Duration::from_secs(2), &mut call).await.is_err() {
                            abort.abort();
                        }
                        break Err(TaskError::fatal("cancelled by request").with_code("cancelled"));
                    }
                    _ = &mut deadline => {
                        abort.abort();
                        cancel.cancel();
                        break Err(TaskError::retryable(format!("attempt exceeded its timeout of {timeout:?}")).with_code("timeout"));
                    }
                    _ = &mut started_timer, if !started_sent => {
                        started_sent = true;
                        let mut ev = base.clone();
                        ev.timings = Some(timings);
                        events.send(ev, AfterPublish::Nothing);
                    }
                }
            }
        }
        .instrument(span.clone())
        .await;
        timings.finished_at = now_ms();
        if let Ok(mut m) = running.lock() {
            m.remove(&token);
        }
        inner.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        inner.stats.finished.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("taskfleet_worker_run_seconds", "kind" => env.kind.clone())
            .record((timings.finished_at.saturating_sub(started_at)) as f64 / 1000.0);

        let spent = usage.lock().map(|u| *u).unwrap_or_default();
        let cancelled = inner.is_cancelled(&env.id);
        match (&outcome, &lease) {
            (Ok(result), Some((key, owner))) if !cancelled => {
                policies.cache.store(key, owner, result, spent.cost_usd).await;
            }
            (_, Some((key, owner))) => policies.cache.release(key, owner).await,
            _ => {}
        }
        // A dependency that stays down must not hold its tasks forever: after
        // `breaker_max_wait` of deferrals the task fails this attempt (and is retried or dies).
        let gave_up = deferred_since.is_some_and(|t| t.elapsed() >= policies.breaker_max_wait);
        if let Err(err) = &outcome
            && err.deferred
            && !cancelled
            && !(err.code == "breaker_open" && gave_up)
        {
            // Not an attempt: the handler could not start its call yet.
            let delay = err.retry_after.unwrap_or(Duration::from_secs(1));
            let code = err.code.clone();
            span.record("deferred", true);
            let wait = tracing::info_span!(parent: &span, "deferral", reason = %code,
                                           delay_ms = tracing::field::Empty, held = tracing::field::Empty);
            let since = Some(deferred_since.unwrap_or_else(std::time::Instant::now));
            let after = Deferral {
                token,
                lane,
                permit: None,
                granted: Vec::new(),
                delay,
                jitter: true,
                span: wait,
                deferred_since: since,
            };
            self.defer(msg, base, after, &code, &lp);
            return;
        }
        let mut ev = base;
        ev.timings = Some(timings);
        ev.at = timings.finished_at;
        ev.tokens = spent.tokens;
        ev.cost_usd = spent.cost_usd;
        let after = match outcome {
            _ if cancelled => {
                ev.kind = EventKind::Cancelled;
                AfterPublish::Ack(msg)
            }
            Ok(result) => {
                ev.kind = EventKind::Succeeded;
                ev.result = Some(result);
                AfterPublish::Ack(msg)
            }
            Err(err) => {
                ev.error = Some(TaskErrorInfo {
                    code: err.code.clone(),
                    message: err.message.clone(),
                    retryable: err.retryable,
                });
                if err.retryable && attempt < max_attempts {
                    // The coordinator dispatches the next attempt when the backoff has passed.
                    let delay = retry.delay(attempt, err.retry_after);
                    ev.kind = EventKind::Retrying;
                    ev.retry_in_ms = Some(delay.as_millis() as u64);
                    ev.next_traceparent = traceparent_of(&msg);
                    AfterPublish::Ack(msg)
                } else if err.retryable {
                    ev.kind = EventKind::Dead;
                    AfterPublish::Ack(msg)
                } else {
                    ev.kind = EventKind::Failed;
                    AfterPublish::Ack(msg)
                }
            }
        };
        metrics::counter!("taskfleet_worker_attempts_total", "outcome" => ev.kind.as_str()).increment(1);
        record_outcome(&span, ev.kind);
        events.send(ev, after);
    }
}

impl Worker {
    /// Runs the task again after `delay` without counting an attempt. Short deferrals wait in
    /// memory (heartbeated, cancellable, holding the task's prefetch place but no slot); longer
    /// ones are handed to the coordinator (`deferred`), which dispatches the task again when
    /// the delay has passed, so a task behind a slow limit uses up no JetStream deliveries.
    fn defer(&self, msg: async_nats::jetstream::Message, base: TaskEvent, after: Deferral, reason: &str, lp: &Loop) {
        let Deferral { token, lane, permit, granted, delay, jitter, span, deferred_since } = after;
        metrics::counter!("taskfleet_worker_deferred_total", "reason" => reason.to_string()).increment(1);
        // Up to 10% later, so tasks refused together do not come back together (a booked slot
        // is exact).
        let delay = if jitter { delay + delay.mul_f64(rand::random::<f64>() * 0.1) } else { delay };
        tracing::debug!(task_id = %base.task_id, ?delay, reason, "task deferred");
        let held = delay <= lp.policies.defer_hold_max;
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
            lp.events.send(ev, AfterPublish::Ack(msg));
            return;
        }
        let cancel = CancellationToken::new();
        if let Ok(mut m) = lp.running.lock() {
            m.insert(token, RunningTask { reply: msg.reply.clone(), cancel: cancel.clone(), base: base.clone() });
        }
        let lp = lp.clone();
        let stats = self.inner.stats.clone();
        tokio::spawn(
            async move {
                let cancelled = tokio::select! {
                    _ = tokio::time::sleep(delay) => false,
                    _ = cancel.cancelled() => true,
                };
                // Gone from the map: the drain handed it back already.
                if !lp.running.lock().map(|mut m| m.remove(&token).is_some()).unwrap_or(false) {
                    return;
                }
                if cancelled {
                    let mut ev = base;
                    ev.kind = EventKind::Cancelled;
                    ev.at = now_ms();
                    lp.events.send(ev, AfterPublish::Ack(msg));
                    return;
                }
                stats.buffered.fetch_add(1, Ordering::Relaxed);
                if let Some(d) = lp.lanes.push(Delivery { msg, priority: lane, permit, granted, deferred_since }) {
                    stats.buffered.fetch_sub(1, Ordering::Relaxed);
                    let _ = d.msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                }
            }
            // The wait's span (and so its attempt's `task.run`) ends when the task is back in line.
            .instrument(span),
        );
    }
}

/// Where a deferred task goes back to, and when.
struct Deferral {
    token: u64,
    lane: usize,
    permit: Option<OwnedSemaphorePermit>,
    /// Rate limits it holds tokens of.
    granted: Vec<String>,
    /// When the task was first deferred by its handler.
    deferred_since: Option<std::time::Instant>,
    delay: Duration,
    jitter: bool,
    /// Covers the wait (`rate_limit.wait` or `deferral`, a child of the attempt's `task.run`).
    span: tracing::Span,
}

/// What every task of a running worker shares.
#[derive(Clone)]
struct Loop {
    events: EventSender,
    running: Arc<std::sync::Mutex<HashMap<u64, RunningTask>>>,
    progress_tx: mpsc::UnboundedSender<(uuid::Uuid, serde_json::Value)>,
    lanes: Arc<Lanes>,
    policies: Arc<Policies>,
    /// Where handlers submit child tasks.
    submitter: Arc<Submitter>,
    /// Asks the coordinator whether a possibly stale message still runs.
    gate: crate::gate::Gate,
}

/// The fleet-wide policies as this worker applies them.
struct Policies {
    cache: ResultCache,
    shared: Arc<Shared>,
    kind_limits: HashMap<String, Vec<String>>,
    defer_hold_max: Duration,
    breaker_max_wait: Duration,
}

impl Policies {
    fn connect(cfg: &Config, cache_by_kind: &HashMap<String, CacheSpec>) -> Result<Policies, WorkerError> {
        let state = SharedState::connect(&cfg.redis).map_err(|e| WorkerError::Redis(e.to_string()))?;
        let mut cache = state.cache(&cfg.policies);
        for (kind, spec) in cache_by_kind {
            cache = cache.with_policy(kind.clone(), spec.clone());
        }
        let limiter = state.rate_limiter(&cfg.policies);
        let kind_limits = cfg.policies.kind_limits.iter().map(|(k, limits)| (k.clone(), limits.0.clone())).collect();
        Ok(Policies {
            cache,
            shared: Arc::new(Shared { limiter, breakers: state.breakers(&cfg.policies) }),
            kind_limits,
            defer_hold_max: cfg.policies.defer_hold_max,
            breaker_max_wait: cfg.policies.breaker_max_wait,
        })
    }

    /// The limits a task takes a token from: its kind's, then its own.
    fn limits_for(&self, env: &TaskEnvelope) -> Vec<String> {
        let mut out = self.kind_limits.get(&env.kind).cloned().unwrap_or_default();
        for l in &env.limits {
            if !out.contains(l) {
                out.push(l.clone());
            }
        }
        out
    }
}

/// An attempt in progress.
struct RunningTask {
    reply: Option<async_nats::Subject>,
    cancel: CancellationToken,
    base: TaskEvent,
}

fn running_count(running: &std::sync::Mutex<HashMap<u64, RunningTask>>) -> usize {
    running.lock().map(|m| m.len()).unwrap_or(0)
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
struct DispatchInfo {
    delivered: u32,
    attempt_offset: u32,
    generation: i32,
}

impl DispatchInfo {
    fn of(msg: &async_nats::jetstream::Message) -> DispatchInfo {
        let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
        DispatchInfo {
            delivered: msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1),
            attempt_offset: header(headers::ATTEMPT_OFFSET).and_then(|v| v.parse().ok()).unwrap_or(0),
            generation: header(headers::GENERATION).and_then(|v| v.parse().ok()).unwrap_or(1),
        }
    }
}

/// The trace context a dispatch message carries, for the task's next dispatch.
fn traceparent_of(msg: &async_nats::jetstream::Message) -> Option<String> {
    msg.headers.as_ref().and_then(|h| h.get(taskfleet_telemetry::TRACEPARENT)).map(|v| v.as_str().to_string())
}

/// Heartbeats every third of `ack_wait`: often enough that one lost heartbeat does not cause a
/// redelivery.
fn heartbeat_interval(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(200))
}

/// Pulls one consumer into its lane, keeping at most `prefetch` of its tasks buffered.
async fn pull_loop(
    consumer: PullConsumer,
    priority: Priority,
    prefetch: usize,
    lanes: Arc<Lanes>,
    stop: CancellationToken,
    stats: Arc<WorkerStats>,
) {
    let budget = Arc::new(Semaphore::new(prefetch));
    let name = consumer.cached_info().name.clone();
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        // Wait for at least one free place, then ask for as many as are free.
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = budget.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut permits = vec![first];
        while let Ok(p) = budget.clone().try_acquire_owned() {
            permits.push(p);
        }
        let want = permits.len();
        // No idle heartbeat on purpose: async-nats' `Batch` swallows a heartbeat without
        // re-arming its waker, so a message arriving after one would sit unread until the
        // client-side timeout and then be dropped with the batch (lost until `ack_wait`).
        // Without heartbeats the server's 408 at `expires` ends an idle batch cleanly.
        let batch = consumer.batch().max_messages(want).expires(Duration::from_secs(5)).messages().await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "pull request failed, retrying");
                drop(permits);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = batch.next() => n,
            };
            match next {
                Some(Ok(msg)) => {
                    let Some(permit) = permits.pop() else {
                        // More than asked for cannot happen; hand it back rather than overfill.
                        let _ = msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                        continue;
                    };
                    stats.buffered.fetch_add(1, Ordering::Relaxed);
                    if let Some(d) = lanes.push(Delivery {
                        msg,
                        priority: priority.index(),
                        permit: Some(permit),
                        granted: Vec::new(),
                        deferred_since: None,
                    }) {
                        stats.buffered.fetch_sub(1, Ordering::Relaxed);
                        let _ = d.msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(consumer = %name, error = %e, "pull batch ended with an error");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Sends in-progress acks for every task this worker holds: running ones and buffered ones.
async fn heartbeat_loop(
    client: async_nats::Client,
    lanes: Arc<Lanes>,
    running: Arc<std::sync::Mutex<HashMap<u64, RunningTask>>>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => {}
        }
        let mut replies = lanes.reply_subjects();
        if let Ok(m) = running.lock() {
            replies.extend(m.values().filter_map(|r| r.reply.clone()));
        }
        for reply in replies {
            let _ = client.publish(reply, "+WPI".into()).await;
        }
        if stop.is_cancelled() {
            // Keep heartbeating running tasks during the drain.
            tokio::time::sleep(every).await;
        }
    }
}

/// Follows the cancellation bucket: remembers cancelled ids (a queued task is then skipped when
/// it arrives) and cancels the token of a running one.
async fn cancel_watch(
    bucket: async_nats::jetstream::kv::Store,
    inner: Arc<Inner>,
    running: Arc<std::sync::Mutex<HashMap<u64, RunningTask>>>,
    stop: CancellationToken,
) {
    use async_nats::jetstream::kv::Operation;
    while !stop.is_cancelled() {
        let mut watch = match bucket.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch cancellations, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let entry = tokio::select! {
                _ = stop.cancelled() => return,
                e = watch.next() => e,
            };
            let entry = match entry {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cancellation watch failed, restarting it");
                    break;
                }
                None => break,
            };
            if entry.operation != Operation::Put {
                continue;
            }
            let Ok(id) = entry.key.parse::<uuid::Uuid>() else { continue };
            if let Ok(mut c) = inner.cancelled.lock() {
                c.insert(id);
            }
            if let Ok(m) = running.lock() {
                for r in m.values().filter(|r| r.base.task_id == id) {
                    tracing::info!(task_id = %id, "cancelling a running task");
                    r.cancel.cancel();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Turns handler progress reports into `progress` events.
async fn progress_loop(
    mut rx: mpsc::UnboundedReceiver<(uuid::Uuid, serde_json::Value)>,
    running: Arc<std::sync::Mutex<HashMap<u64, RunningTask>>>,
    events: EventSender,
) {
    while let Some((task_id, value)) = rx.recv().await {
        let base =
            running.lock().ok().and_then(|m| m.values().find(|r| r.base.task_id == task_id).map(|r| r.base.clone()));
        if let Some(mut ev) = base {
            ev.kind = EventKind::Progress;
            ev.at = now_ms();
            ev.result = Some(value);
            events.send(ev, AfterPublish::Nothing);
        }
    }
}
