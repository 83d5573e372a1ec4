//! Recording worker events in Postgres, batched, then releasing dependents and telling
//! watchers which tasks became final.

use crate::{Ctx, dispatch};
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_bus::Topology;
use taskfleet_proto::Priority;
use taskfleet_proto::TaskState;
use taskfleet_proto::{CommittedBatch, CommittedTask, EventBatch, EventKind, TaskEvent, encode, headers};
use taskfleet_store::Finalized;
use tokio_util::sync::CancellationToken;

/// Event messages pulled per request; each carries up to a worker's event batch.
const MESSAGES_PER_PULL: usize = 256;
/// Bytes of event messages pulled per request and lane. With two such groups buffered per
/// lane and one being recorded, the recorder holds at most about 12 × this in memory.
const BYTES_PER_PULL: usize = 8 << 20;

/// Records events of every priority lane. One puller per lane feeds a small bounded buffer;
/// a single recorder drains the buffers most urgent lane first, so a critical task's result
/// waits at most for the transaction in progress, never behind a backlog of low-priority
/// events, while batches stay as large as one lane alone would make them.
pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (senders, receivers): (Vec<_>, Vec<_>) =
        Priority::ALL.iter().map(|_| tokio::sync::mpsc::channel::<Vec<Message>>(2)).unzip();
    let Ok::<[_; 4], _>([mut critical, mut high, mut normal, mut low]) = receivers.try_into() else {
        return Err(anyhow::anyhow!("one buffer per priority"));
    };
    let pullers = Priority::ALL.into_iter().zip(senders).map(|(priority, tx)| {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        async move {
            let name = Topology::coordinator_events_consumer(priority);
            let filter = ctx.topology.subjects.events_of_priority(priority);
            taskfleet_bus::consume_batches(
                &name,
                MESSAGES_PER_PULL,
                BYTES_PER_PULL.max(2 * ctx.client.server_info().max_payload),
                shutdown.cancelled(),
                // Not watched on their own: a puller blocks while the recorder (watched) is busy.
                || {},
                || ctx.topology.events_consumer(&name, filter.clone(), (MESSAGES_PER_PULL * 8) as i64),
                |chunk| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(chunk).await;
                    }
                },
            )
            .await
        }
    });
    let pulling = futures::future::join_all(pullers);
    tokio::pin!(pulling);
    let limit = ctx.config.coordinator.event_batch_size;
    // Messages taken from the pullers and not recorded yet, per lane, most urgent first.
    let mut waiting: [std::collections::VecDeque<Message>; 4] = Default::default();
    let beat = ctx.liveness.register("recorder", crate::CONSUMER_MAX_SILENCE);
    loop {
        beat.tick();
        if waiting.iter().all(|w| w.is_empty()) {
            let (lane, chunk) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = &mut pulling => break,
                Some(c) = critical.recv() => (0, c),
                Some(c) = high.recv() => (1, c),
                Some(c) = normal.recv() => (2, c),
                Some(c) = low.recv() => (3, c),
                // Idle: still alive.
                _ = tokio::time::sleep(taskfleet_bus::IDLE_TICK) => continue,
            };
            waiting[lane].extend(chunk);
        }
        for (lane, rx) in [&mut critical, &mut high, &mut normal, &mut low].into_iter().enumerate() {
            while let Ok(more) = rx.try_recv() {
                waiting[lane].extend(more);
            }
        }
        // One transaction of about `event_batch_size` events, most urgent lane first: a
        // critical event waits at most for the transaction in progress.
        let mut group: Vec<Message> = Vec::new();
        let mut events: Vec<TaskEvent> = Vec::new();
        let mut bytes = 0;
        'fill: for lane in waiting.iter_mut() {
            while let Some(m) = lane.pop_front() {
                bytes += m.payload.len();
                if let Some(batch) = decode_events(&m).await {
                    events.extend(batch);
                    group.push(m);
                }
                if events.len() >= limit || bytes >= BYTES_PER_PULL {
                    break 'fill;
                }
            }
        }
        if !group.is_empty() {
            record(&ctx, group, events).await;
        }
    }
    Ok(())
}

/// The events of one message; an undecodable message is terminated (nothing can make it
/// readable later), counted, and yields `None`.
async fn decode_events(m: &Message) -> Option<Vec<TaskEvent>> {
    match taskfleet_bus::decode_message::<EventBatch>(m, taskfleet_proto::MAX_MESSAGE_BYTES) {
        Ok(batch) => Some(batch.events),
        Err(e) => {
            metrics::counter!("taskfleet_coordinator_malformed_events_total").increment(1);
            tracing::error!(subject = %m.subject, error = %e, "undecodable event message, terminating it");
            let _ = m.ack_with(AckKind::Term).await;
            None
        }
    }
}

async fn record(ctx: &Ctx, msgs: Vec<Message>, events: Vec<TaskEvent>) {
    let spans = record_spans(&events);
    let outcome = match ctx.store.record_events_isolating(&events).await {
        Ok(o) => o,
        Err(e) => {
            for span in &spans {
                span.record("otel.status_code", "ERROR");
            }
            metrics::counter!("taskfleet_coordinator_store_errors_total", "op" => "record").increment(1);
            tracing::error!(error = %e, events = events.len(), "cannot record events; will retry");
            taskfleet_bus::hand_back(&msgs, Duration::from_secs(1)).await;
            return;
        }
    };
    // Committed: the `task.record` spans end here.
    drop(spans);
    metrics::counter!("taskfleet_coordinator_events_total").increment(events.len() as u64);
    metrics::counter!("taskfleet_coordinator_events_ignored_total").increment(outcome.ignored as u64);
    metrics::counter!("taskfleet_coordinator_finalized_total").increment(outcome.finalized.len() as u64);
    if outcome.unstorable > 0 {
        metrics::counter!("taskfleet_coordinator_events_unstorable_total").increment(outcome.unstorable as u64);
    }
    if events.iter().any(|e| matches!(e.kind, EventKind::Retrying | EventKind::Deferred)) {
        ctx.retries_recorded.notify_one();
    }

    if let Err(e) = dispatch::publish_rows(&ctx.topology, &outcome.released).await {
        // The released rows are committed as queued. Redelivering these events would find the
        // parents already final and release nothing, so the rescuer must pick them up.
        tracing::error!(error = %e, tasks = outcome.released.len(), "cannot dispatch released tasks");
    }
    for m in &msgs {
        if let Err(e) = m.ack().await {
            tracing::warn!(error = %e, "acknowledging an event message failed; it will be redelivered and ignored");
        }
    }
    announce_cancelled(ctx, &outcome.announce).await;
    notify_committed(ctx, &outcome.finalized).await;
    notify_runs_ended(ctx, &outcome.runs_ended).await;
    let dead: Vec<uuid::Uuid> = outcome.finalized.iter().filter(|f| f.state == TaskState::Dead).map(|f| f.id).collect();
    if !dead.is_empty() {
        publish_dead_letters(ctx, &dead).await;
    }
}

/// One `task.record` span per event that carries its attempt's trace context, a child of that
/// attempt's `task.run` span, open until the batch's transaction ends. None when this
/// coordinator exports no spans.
fn record_spans(events: &[TaskEvent]) -> Vec<tracing::Span> {
    if !taskfleet_telemetry::exporting() {
        return Vec::new();
    }
    events
        .iter()
        .filter_map(|ev| {
            let traceparent = ev.traceparent.as_deref()?;
            let span = tracing::info_span!("task.record", task_id = %ev.task_id, event = ev.kind.as_str(),
                                           attempt = ev.attempt, batch = events.len(),
                                           otel.status_code = tracing::field::Empty);
            taskfleet_telemetry::set_parent_from_traceparent(&span, traceparent);
            Some(span)
        })
        .collect()
}

/// Puts cancelled tasks in the cancellation bucket, so that a worker holding one skips it or
/// stops it. Postgres already says cancelled: a worker that misses this records an attempt
/// whose outcome is ignored.
pub(crate) async fn announce_cancelled(ctx: &Ctx, ids: &[uuid::Uuid]) {
    for id in ids {
        if let Err(e) = ctx.cancel_bucket.put(id.to_string(), Bytes::new()).await {
            tracing::warn!(task_id = %id, error = %e, "cannot announce a cancellation to workers");
        }
    }
}

/// Tells watchers (`taskfleet run wait`) which runs just ended, one core NATS message each.
pub(crate) async fn notify_runs_ended(ctx: &Ctx, ended: &[(uuid::Uuid, taskfleet_proto::RunState)]) {
    if ended.is_empty() {
        return;
    }
    metrics::counter!("taskfleet_coordinator_runs_ended_total").increment(ended.len() as u64);
    for (run_id, state) in ended {
        let body = Bytes::from(encode(&taskfleet_proto::RunEndedNotice { run_id: *run_id, state: *state }));
        if let Err(e) = ctx.client.publish(ctx.topology.subjects.run_ended(run_id), body).await {
            tracing::debug!(error = %e, "cannot publish a run's end");
        }
    }
}

/// Tells watchers (`taskfleet wait`, `submit --wait`) which tasks just became final: one core
/// NATS message per queue and commit.
pub(crate) async fn notify_committed(ctx: &Ctx, finalized: &[Finalized]) {
    let mut by_queue: HashMap<&str, Vec<CommittedTask>> = HashMap::new();
    for f in finalized {
        by_queue.entry(f.queue.as_str()).or_default().push(CommittedTask { id: f.id, state: f.state });
    }
    for (queue, tasks) in by_queue {
        let body = Bytes::from(encode(&CommittedBatch { tasks }));
        if let Err(e) = ctx.client.publish(ctx.topology.subjects.committed(queue), body).await {
            tracing::debug!(error = %e, "cannot publish committed notification");
        }
    }
}

/// Copies dead tasks' envelopes, with their last error in the `Taskfleet-Error` header, to the
/// dead-letter stream. Postgres stays the source of truth (`state = dead`); the stream is the
/// feed other systems can consume.
async fn publish_dead_letters(ctx: &Ctx, ids: &[uuid::Uuid]) {
    let rows = match ctx.store.envelopes_with_error(ids).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read dead tasks for the dead-letter stream");
            return;
        }
    };
    let out: Vec<taskfleet_bus::Outgoing> = rows
        .into_iter()
        .map(|(env, error)| {
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::CONTENT_TYPE, taskfleet_proto::CONTENT_TYPE_MSGPACK);
            if let Some(e) = error {
                h.insert("Taskfleet-Error", e.to_string().replace(['\r', '\n'], " ").as_str());
            }
            taskfleet_bus::Outgoing {
                subject: ctx.topology.subjects.dead(&env.queue),
                payload: Bytes::from(encode(&env)),
                headers: h,
                msg_id: Some(format!("dead:{}:{}", env.id, env.max_attempts)),
            }
        })
        .collect();
    metrics::counter!("taskfleet_coordinator_dead_letters_total").increment(out.len() as u64);
    if let Err(e) = taskfleet_bus::publish_all(&ctx.topology.js, out).await {
        tracing::error!(error = %e, "cannot publish to the dead-letter stream (the tasks are dead in Postgres)");
    }
}
