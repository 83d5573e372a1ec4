//! Intake: submissions from JetStream → validated → one Postgres transaction per batch →
//! dispatch → acknowledgement. A submission is acknowledged only after its row is committed
//! (and, when ready, its dispatch message stored), so a crash at any point leads to a
//! redelivery, which the store recognises by id.
//!
//! Batches are pipelined: once a batch is committed, its post-commit stage (dispatch, acks,
//! replies, refusal reports) runs in a task of its own while the next batch is decoded and
//! inserted, with at most `coordinator.intake_pipeline_depth` such stages in flight. Inserts
//! stay strictly one after another, so a batch's rows are written only after every earlier
//! batch has committed (a child task still finds a parent submitted in an earlier batch).

use crate::{Ctx, dispatch};
use async_nats::HeaderMap;
use async_nats::jetstream::Message;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_proto::{
    CONTENT_TYPE_MSGPACK, EventBatch, EventKind, RejectReason, SubmitReply, TaskEnvelope, TaskErrorInfo, TaskEvent,
    decode_envelope, encode, headers,
};
use taskfleet_store::InsertOutcome;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let batch = ctx.config.coordinator.submit_batch_size;
    let depth = ctx.config.coordinator.intake_pipeline_depth;
    // One permit per post-commit stage in flight.
    let stages = Arc::new(Semaphore::new(depth));
    taskfleet_bus::consume_batches(
        "submissions",
        batch,
        16 << 20,
        shutdown.cancelled(),
        // Room for the stages in flight, the batch being inserted and the next pull.
        || ctx.topology.submit_consumer((batch * (depth + 2)) as i64),
        |msgs| process(&ctx, &stages, msgs),
    )
    .await;
    // Let the stages in flight finish: their submissions are acknowledged (or handed back)
    // before the coordinator exits.
    let _ = stages.acquire_many(depth as u32).await;
    Ok(())
}

struct Refusal {
    queue: String,
    task_id: uuid::Uuid,
    kind: String,
    reason: RejectReason,
    message: String,
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// Decodes and validates a batch and writes it to Postgres, then hands the rest to a
/// post-commit stage of its own once one of the `stages` permits is free.
async fn process(ctx: &Arc<Ctx>, stages: &Arc<Semaphore>, msgs: Vec<Message>) {
    let cfg = &ctx.config.coordinator;
    let subjects = &ctx.topology.subjects;
    let mut envs: Vec<TaskEnvelope> = Vec::with_capacity(msgs.len());
    let mut env_msg: Vec<usize> = Vec::with_capacity(msgs.len());
    // One `task.intake` span per traced submission, open until its dispatch is stored.
    let mut spans: Vec<Option<tracing::Span>> = Vec::with_capacity(msgs.len());
    let mut refusals: Vec<(usize, Refusal)> = Vec::new();

    for (i, m) in msgs.iter().enumerate() {
        let queue = subjects.queue_of(&m.subject).unwrap_or("default").to_string();
        let refuse = |reason: RejectReason, message: String, task_id: uuid::Uuid, kind: String| Refusal {
            queue: queue.clone(),
            task_id,
            kind,
            reason,
            message,
        };
        match decode_envelope(&m.payload, header(m, headers::CONTENT_TYPE), cfg.max_body_bytes) {
            Err(e) => refusals.push((i, refuse(e.reason(), e.to_string(), uuid::Uuid::nil(), String::new()))),
            Ok(mut env) => {
                if env.queue != queue && env.queue != taskfleet_proto::DEFAULT_QUEUE {
                    let msg = format!("queue {:?} in the body differs from the subject's queue {queue:?}", env.queue);
                    refusals.push((i, refuse(RejectReason::Invalid, msg, env.id, env.kind)));
                    continue;
                }
                env.queue = queue.clone();
                if env.max_attempts == 0 {
                    env.max_attempts = cfg.kind_max_attempts.get(&env.kind).copied().unwrap_or(cfg.max_attempts);
                }
                if !cfg.kinds.is_empty() && !cfg.kinds.contains(&env.kind) {
                    let msg = format!("unknown task kind {:?}; accepted kinds: {}", env.kind, cfg.kinds.join(", "));
                    refusals.push((i, refuse(RejectReason::UnknownKind, msg, env.id, env.kind)));
                    continue;
                }
                spans.push(intake_span(m, &env));
                envs.push(env);
                env_msg.push(i);
            }
        }
    }

    let outcome = if envs.is_empty() {
        Default::default()
    } else {
        match ctx.store.insert_tasks(&envs).await {
            Ok(o) => o,
            Err(e) => {
                // Postgres is unavailable: hand the whole batch back; JetStream redelivers it
                // (submissions have no delivery limit) and nothing is lost.
                metrics::counter!("taskfleet_coordinator_store_errors_total", "op" => "insert").increment(1);
                tracing::error!(error = %e, tasks = envs.len(), "cannot write submissions; will retry");
                taskfleet_bus::hand_back(&msgs, Duration::from_secs(1)).await;
                return;
            }
        }
    };
    for r in &outcome.rejected {
        let env = &envs[r.index];
        refusals.push((
            env_msg[r.index],
            Refusal {
                queue: env.queue.clone(),
                task_id: env.id,
                kind: env.kind.clone(),
                reason: r.reason,
                message: r.message.clone(),
            },
        ));
    }

    // Committed: the next batch may be inserted while this one is dispatched and acknowledged.
    let permit = stages.clone().acquire_owned().await.expect("the intake semaphore is never closed");
    let ctx = ctx.clone();
    tokio::spawn(async move {
        after_commit(&ctx, msgs, envs, env_msg, outcome, refusals, spans).await;
        drop(permit);
    });
}

/// The post-commit stage of a batch: dispatches the ready tasks, then acknowledges every
/// submission and answers the submitters. On a dispatch failure the whole batch is handed back
/// unacknowledged. `spans` (one per envelope) end when the stage does.
async fn after_commit(
    ctx: &Ctx,
    msgs: Vec<Message>,
    envs: Vec<TaskEnvelope>,
    env_msg: Vec<usize>,
    outcome: InsertOutcome,
    refusals: Vec<(usize, Refusal)>,
    spans: Vec<Option<tracing::Span>>,
) {
    // Dispatch what is ready, carrying the trace context: the task's `task.intake` span when
    // this coordinator exports spans, else the submission's own, when it had one.
    let out: Vec<_> = outcome
        .dispatch
        .iter()
        .map(|&i| {
            let Some(span) = &spans[i] else {
                return dispatch::message(&ctx.topology, &envs[i], msgs[env_msg[i]].headers.as_ref());
            };
            let mut h = HeaderMap::new();
            taskfleet_telemetry::inject_context(span, &mut h);
            dispatch::message(&ctx.topology, &envs[i], Some(&h))
        })
        .collect();
    for &i in &outcome.dispatch {
        if let Some(span) = &spans[i] {
            span.record("dispatched", true);
        }
    }
    if let Err(e) = dispatch::publish(&ctx.topology, out).await {
        // Rows are committed as queued; redelivering the submissions dispatches them again.
        tracing::error!(error = %e, "cannot dispatch; submissions will be redelivered");
        taskfleet_bus::hand_back(&msgs, Duration::from_secs(1)).await;
        return;
    }

    for m in &msgs {
        if let Err(e) = m.ack().await {
            tracing::warn!(error = %e, "acknowledging a submission failed; it will be redelivered and recognised");
        }
    }
    metrics::counter!("taskfleet_coordinator_submissions_total", "result" => "accepted")
        .increment(outcome.inserted.len() as u64);
    metrics::counter!("taskfleet_coordinator_submissions_total", "result" => "duplicate")
        .increment(outcome.duplicates.len() as u64);

    // Replies for confirmed submits.
    let dup: HashMap<usize, uuid::Uuid> = outcome.duplicates.iter().map(|d| (d.index, d.existing)).collect();
    let refused: HashMap<usize, &Refusal> = refusals.iter().map(|(i, r)| (*i, r)).collect();
    for (k, &mi) in env_msg.iter().enumerate() {
        if refused.contains_key(&mi) {
            continue;
        }
        if let Some(reply) = header(&msgs[mi], headers::REPLY_TO) {
            let existing = dup.get(&k).copied();
            let body = SubmitReply {
                ok: true,
                task_id: Some(existing.unwrap_or(envs[k].id)),
                duplicate: existing.is_some(),
                reason: None,
                error: None,
            };
            reply_json(ctx, reply, &body).await;
        }
    }
    if !refusals.is_empty() {
        report_refusals(ctx, &msgs, refusals).await;
    }
}

/// The `task.intake` span of a submission, from decoding to its dispatch being stored: a child
/// of the submission's `traceparent`, or a root when it has none. Only when spans are exported
/// and the submission's trace is not one the sampler drops; otherwise the submission's trace
/// context, if any, is passed on unchanged.
fn intake_span(m: &Message, env: &TaskEnvelope) -> Option<tracing::Span> {
    if !taskfleet_telemetry::exporting() || taskfleet_telemetry::unsampled_parent(m.headers.as_ref()) {
        return None;
    }
    let span = tracing::info_span!("task.intake", otel.kind = "consumer", task_id = %env.id, kind = %env.kind,
                                   queue = %env.queue, priority = %env.priority, dispatched = false);
    let parent = m.headers.as_ref().filter(|h| h.get(taskfleet_telemetry::TRACEPARENT).is_some());
    taskfleet_telemetry::set_parent_from(&span, parent);
    Some(span)
}

async fn reply_json(ctx: &Ctx, subject: &str, body: &SubmitReply) {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    if let Err(e) = ctx.client.publish(subject.to_string(), Bytes::from(bytes)).await {
        tracing::warn!(%subject, error = %e, "cannot send submit reply");
    }
}

/// Counts, logs, publishes a `rejected` event and replies for every refused submission.
async fn report_refusals(ctx: &Ctx, msgs: &[Message], refusals: Vec<(usize, Refusal)>) {
    let mut by_queue: HashMap<String, Vec<TaskEvent>> = HashMap::new();
    for (i, r) in refusals {
        metrics::counter!("taskfleet_coordinator_submissions_total", "result" => "rejected", "reason" => r.reason.as_str())
            .increment(1);
        tracing::warn!(queue = %r.queue, task_id = %r.task_id, reason = r.reason.as_str(), error = %r.message, "submission rejected");
        if let Some(reply) = header(&msgs[i], headers::REPLY_TO) {
            let body = SubmitReply {
                ok: false,
                task_id: (!r.task_id.is_nil()).then_some(r.task_id),
                duplicate: false,
                reason: Some(r.reason),
                error: Some(r.message.clone()),
            };
            reply_json(ctx, reply, &body).await;
        }
        let mut ev = TaskEvent::new(r.task_id, EventKind::Rejected, &r.queue);
        ev.task_kind = r.kind;
        ev.error = Some(TaskErrorInfo { code: r.reason.as_str().into(), message: r.message, retryable: false });
        by_queue.entry(r.queue).or_default().push(ev);
    }
    for (queue, events) in by_queue {
        let mut h = HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, CONTENT_TYPE_MSGPACK);
        let out = taskfleet_bus::Outgoing {
            // Rejections change no task state; they travel in the normal lane of their queue.
            subject: ctx.topology.subjects.events(&queue, taskfleet_proto::Priority::Normal),
            payload: Bytes::from(encode(&EventBatch::new(events))),
            headers: h,
            msg_id: None,
        };
        if let Err(e) = taskfleet_bus::publish_all(&ctx.topology.js, vec![out]).await {
            tracing::warn!(error = %e, "cannot publish rejection events");
        }
    }
}
