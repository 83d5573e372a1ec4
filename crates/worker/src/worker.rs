//! The worker: a builder of handlers and policies, and its lifecycle: start the loops, hand
//! deliveries to the attempt pipeline as slots free up, then drain.

use crate::attempt::{Runtime, WorkerIdentity, run_delivery};
use crate::events::spawn_publisher;
use crate::gate::Gate;
use crate::handler::Submitter;
use crate::lanes::Lanes;
use crate::policies::Policies;
use crate::presence::Presence;
use crate::providers::Providers;
use crate::running::Running;
use crate::workflow::Coordinator;
use crate::{Handler, RetryPolicy, WorkerError, WorkerStats, cancellations, heartbeat, progress, pull};
use async_nats::jetstream::{AckKind, consumer::PullConsumer};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use taskfleet_bus::Topology;
use taskfleet_config::{CacheSpec, Config};
use taskfleet_proto::Priority;
use taskfleet_service::Liveness;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Builds a [`Worker`]: register handlers by kind, then `build`.
pub struct WorkerBuilder {
    config: Config,
    handlers: HashMap<String, Arc<dyn Handler>>,
    retry_by_kind: HashMap<String, RetryPolicy>,
    cache_by_kind: HashMap<String, CacheSpec>,
    providers: Option<Providers>,
    liveness: Liveness,
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

    /// The outside-services client the worker's own calls use (the semantic cache's
    /// embeddings): pass the one your handlers call, so that the process has one HTTP connection
    /// pool and one set of adaptive embedding batch sizes. Without it the worker builds its own
    /// from `providers` in the configuration when it starts.
    pub fn providers(mut self, providers: Providers) -> Self {
        self.providers = Some(providers);
        self
    }

    /// The registry the worker's loops (pullers, heartbeat, event publisher) tick, e.g. the
    /// [`taskfleet_service::Service::liveness`] its `/healthz` watches. Without it they tick
    /// a registry of their own that nobody reads.
    pub fn liveness(mut self, liveness: Liveness) -> Self {
        self.liveness = liveness;
        self
    }

    /// Finishes the worker.
    pub fn build(self) -> Worker {
        let id = if self.config.worker.id.is_empty() { default_id() } else { self.config.worker.id.clone() };
        Worker {
            identity: Arc::new(WorkerIdentity {
                config: self.config,
                handlers: self.handlers,
                id,
                stats: Arc::new(WorkerStats::default()),
                cancellations: Default::default(),
            }),
            retry_by_kind: self.retry_by_kind,
            cache_by_kind: self.cache_by_kind,
            providers: self.providers,
            liveness: self.liveness,
        }
    }
}

/// `<hostname>-<pid>`: unique per process, readable in events.
fn default_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// A worker process's task loop. Stateless: run as many as you like against one fleet.
#[derive(Clone)]
pub struct Worker {
    identity: Arc<WorkerIdentity>,
    retry_by_kind: HashMap<String, RetryPolicy>,
    cache_by_kind: HashMap<String, CacheSpec>,
    providers: Option<Providers>,
    liveness: Liveness,
}

/// The loops a running worker starts besides its pullers.
struct Loops {
    heartbeat: JoinHandle<()>,
    cancellations: JoinHandle<()>,
    progress: JoinHandle<()>,
    presence: JoinHandle<()>,
    publisher: JoinHandle<()>,
}

impl Worker {
    /// Starts building a worker with the fleet configuration.
    pub fn builder(config: Config) -> WorkerBuilder {
        WorkerBuilder {
            config,
            handlers: HashMap::new(),
            retry_by_kind: HashMap::new(),
            cache_by_kind: HashMap::new(),
            providers: None,
            liveness: Liveness::default(),
        }
    }

    /// This worker's id, as it appears in events.
    pub fn id(&self) -> &str {
        &self.identity.id
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.identity.stats.clone()
    }

    /// Kinds this worker can run.
    pub fn kinds(&self) -> Vec<String> {
        self.identity.kinds()
    }

    /// Pulls and runs tasks until `shutdown` is cancelled, then drains: stops pulling, lets
    /// running tasks finish for up to `drain_timeout`, hands everything else back to JetStream
    /// for immediate redelivery, and flushes events.
    pub async fn run(&self, client: async_nats::Client, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let id = &self.identity;
        let cfg = &id.config;
        let topology = Topology::new(client.clone(), &cfg.nats);
        let Some(consumers) = self.bind_consumers(&client, &topology, &shutdown).await? else { return Ok(()) };
        let ack_wait =
            consumers.iter().map(|(_, c)| c.cached_info().config.ack_wait).min().unwrap_or(cfg.nats.ack_wait);
        let providers = match &self.providers {
            Some(p) => p.clone(),
            None => Providers::new(&cfg.providers)?,
        };
        let policies =
            Arc::new(Policies::connect_with(cfg, &self.cache_by_kind, self.retry_by_kind.clone(), &providers)?);
        let lanes = Arc::new(Lanes::new(cfg.worker.priority_weights.as_array()));
        let pulling = CancellationToken::new();
        let pullers = self.start_pullers(consumers, &lanes, &pulling);
        let (rt, loops) = self.start_loops(&topology, ack_wait, policies, lanes, &pulling, &shutdown).await?;
        id.stats.ready.store(true, Ordering::Relaxed);
        tracing::info!(worker = %id.id, queues = ?cfg.worker.queues, kinds = ?self.kinds(),
                       max_concurrent_tasks = cfg.worker.max_concurrent_tasks, "worker running");

        let slots = Arc::new(Semaphore::new(cfg.worker.max_concurrent_tasks));
        hand_out(&rt, &slots, &shutdown).await;

        id.stats.ready.store(false, Ordering::Relaxed);
        pulling.cancel();
        for p in pullers {
            let _ = p.await;
        }
        self.drain(&client, rt, &slots, loops).await;
        Ok(())
    }

    /// Asks the coordinator to open this worker's queues, then binds to their dispatch consumers
    /// (a worker never creates one); retries until both work. `None`: shut down meanwhile.
    async fn bind_consumers(
        &self,
        client: &async_nats::Client,
        topology: &Topology,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<(Priority, PullConsumer)>>, WorkerError> {
        let queues = &self.identity.config.worker.queues;
        let coordinator = Coordinator { client: client.clone(), subjects: topology.subjects.clone() };
        let mut delay = Duration::from_millis(200);
        loop {
            let why = match coordinator.open_queues(queues).await {
                Ok(_) => match Self::bind_all(topology, queues).await {
                    Ok(consumers) => return Ok(Some(consumers)),
                    Err(e) => e.to_string(),
                },
                Err(e) => e,
            };
            tracing::warn!(queues = ?queues, error = %why, "waiting for the coordinator to open this worker's queues");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn bind_all(topology: &Topology, queues: &[String]) -> Result<Vec<(Priority, PullConsumer)>, WorkerError> {
        let mut consumers = Vec::new();
        for queue in queues {
            for p in Priority::ALL {
                consumers.push((p, topology.bind_dispatch_consumer(queue, p).await?));
            }
        }
        Ok(consumers)
    }

    /// One pull loop per bound consumer, until `pulling` is cancelled.
    fn start_pullers(
        &self,
        consumers: Vec<(Priority, PullConsumer)>,
        lanes: &Arc<Lanes>,
        pulling: &CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let cfg = &self.identity.config.worker;
        let pullers = consumers.into_iter().map(|(p, consumer)| {
            let (lanes, stop, stats) = (lanes.clone(), pulling.clone(), self.identity.stats.clone());
            let beat = self.liveness.register(format!("pull {}", consumer.cached_info().name), pull::MAX_SILENCE);
            tokio::spawn(pull::run(consumer, p, cfg.effective_prefetch(), lanes, stop, stats, beat))
        });
        pullers.collect()
    }

    /// Starts the event publisher and the background loops, and assembles what attempts share.
    async fn start_loops(
        &self,
        topology: &Topology,
        ack_wait: Duration,
        policies: Arc<Policies>,
        lanes: Arc<Lanes>,
        pulling: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(Runtime, Loops), WorkerError> {
        let (id, client) = (&self.identity, &topology.js.client());
        let cfg = &id.config;
        // Event batches stay below the largest message the server takes (its headers aside).
        let max_payload = client.server_info().max_payload.max(64 * 1024);
        let (js, subjects) = (topology.js.clone(), topology.subjects.clone());
        // The publisher ticks at least every 5 s (idle, or waiting for batches in flight);
        // a minute plus the linger covers any one turn.
        let beat = self.liveness.register("event publisher", cfg.worker.event_linger + Duration::from_secs(60));
        let (events, publisher) = spawn_publisher(
            js,
            subjects,
            cfg.worker.event_batch_size,
            cfg.worker.event_linger,
            max_payload - 4 * 1024,
            beat,
        );
        let running = Running::default();
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        let presence = Presence {
            client: client.clone(),
            subject: topology.subjects.worker_status(),
            id: id.id.clone(),
            queues: cfg.worker.queues.clone(),
            max_concurrent: cfg.worker.max_concurrent_tasks as u64,
            stats: id.stats.clone(),
            every: cfg.worker.status_interval.max(Duration::from_millis(100)),
        };
        let every = heartbeat::interval(ack_wait);
        // Six intervals plus a minute: publishing the in-progress acks may wait on a slow or
        // reconnecting NATS connection for a while before the loop is wedged for good.
        let heartbeat_beat = self.liveness.register("heartbeat", every * 6 + Duration::from_secs(60));
        let bucket = topology.cancel_stream().await?;
        let loops = Loops {
            heartbeat: tokio::spawn(heartbeat::run(
                client.clone(),
                lanes.clone(),
                running.clone(),
                every,
                pulling.clone(),
                heartbeat_beat,
            )),
            cancellations: tokio::spawn(cancellations::run(
                client.clone(),
                bucket,
                topology.subjects.cancel_bucket(),
                id.cancellations.clone(),
                running.clone(),
                pulling.clone(),
            )),
            progress: tokio::spawn(progress::run(progress_rx, running.clone(), events.clone())),
            presence: tokio::spawn(presence.run(shutdown.clone())),
            publisher,
        };
        let rt = Runtime {
            worker: id.clone(),
            events,
            running,
            progress: progress_tx,
            lanes,
            policies,
            submitter: Arc::new(Submitter {
                js: topology.js.clone(),
                subjects: topology.subjects.clone(),
                coordinator: Coordinator { client: client.clone(), subjects: topology.subjects.clone() },
            }),
            gate: Gate::spawn(client.clone(), topology.subjects.api("task.runnable")),
            carried: Default::default(),
        };
        Ok((rt, loops))
    }

    /// Hands every buffered and deferred task back, waits up to `drain_timeout` for the running
    /// ones, hands back those still running, and flushes events.
    async fn drain(&self, client: &async_nats::Client, rt: Runtime, slots: &Semaphore, loops: Loops) {
        let buffered = rt.lanes.close();
        tracing::info!(buffered = buffered.len(), running = rt.running.len(), "draining");
        for d in buffered {
            let _ = d.msg.ack_with(AckKind::Nak(None)).await;
        }
        let cfg = &self.identity.config.worker;
        let all = cfg.max_concurrent_tasks as u32;
        let drained = tokio::time::timeout(cfg.drain_timeout, slots.acquire_many(all)).await.is_ok();
        // Whatever is left is running past the drain timeout or waiting out a deferral.
        let left = rt.running.drain();
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
        // The publisher stops once every event sender is gone: the runtime's, and the progress
        // loop's once the runtime's progress sender is.
        drop(rt);
        let _ = loops.progress.await;
        let _ = tokio::time::timeout(Duration::from_secs(10), loops.publisher).await;
        loops.heartbeat.abort();
        loops.cancellations.abort();
        let _ = loops.presence.await;
        let _ = client.flush().await;
        tracing::info!("worker stopped");
    }
}

/// Gives each delivery a slot and an attempt, in priority order, until `shutdown`.
async fn hand_out(rt: &Runtime, slots: &Arc<Semaphore>, shutdown: &CancellationToken) {
    let mut next_token: u64 = 0;
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = rt.lanes.pop() => match d { Some(d) => d, None => return },
        };
        rt.worker.stats.buffered.fetch_sub(1, Ordering::Relaxed);
        next_token += 1;
        let rt = rt.clone();
        let token = next_token;
        tokio::spawn(async move {
            run_delivery(rt, token, delivery).await;
            drop(permit);
        });
    }
}
