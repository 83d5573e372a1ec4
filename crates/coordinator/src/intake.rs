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
//!
//! Hostile input never stalls intake: bodies, subjects (`<prefix>.submit.<queue>`, a valid and
//! allowed queue) and reply subjects are checked before anything is written, and a row that
//! Postgres still refuses is isolated by the store (`unstorable`) while the rest commits. Every
//! refusal gets a `rejected` event, a reply when a valid reply subject was named, a count, and
//! is terminated in JetStream.

use crate::{Ctx, dispatch};
use async_nats::HeaderMap;
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_config::CoordinatorConfig;
use taskfleet_proto::{
    CONTENT_TYPE_MSGPACK, EventBatch, EventKind, INVALID_QUEUE, RejectReason, Subjects, SubmitReply, TaskEnvelope,
    TaskErrorInfo, TaskEvent, decode_envelope, encode, headers,
};
use taskfleet_store::InsertOutcome;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = &ctx.config.coordinator;
    let (batch, depth) = (cfg.submit_batch_size, cfg.intake_pipeline_depth);
    // Memory: a pull brings at most `pull_bytes` of submissions (the next one is requested when
    // half is consumed, so about twice that waits in the client), `process` cuts it into
    // batches of at most `submit_batch_max_bytes` of bodies, and at most `depth` committed
    // batches plus the one being written are held at once. With the defaults (16 MiB, depth 2)
    // that is about 5 × 16 MiB of bodies, plus their decoded envelopes (about the same size for
    // text payloads, more for payloads of many small numbers) and their dispatch copies: well
    // under the 512 Mi pod limit even when every submission is 512 KiB. The consumer's
    // `max_ack_pending` only bounds how many messages may be out unacknowledged; it is a count,
    // so it bounds bytes only through the pulls above. A pull must fit the largest message the
    // server accepts, or that message would never be delivered, hence twice `max_payload`.
    let pull_bytes = cfg.submit_batch_max_bytes.max(2 * ctx.client.server_info().max_payload);
    // One permit per post-commit stage in flight.
    let stages = Arc::new(Semaphore::new(depth));
    let beat = ctx.liveness.register("intake", crate::CONSUMER_MAX_SILENCE);
    taskfleet_bus::consume_batches(
        "submissions",
        batch,
        pull_bytes,
        shutdown.cancelled(),
        || beat.tick(),
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

/// Processes pulled submissions in batches of at most `submit_batch_max_bytes` of bodies, in
/// order. Once one batch is handed back (Postgres unavailable) the rest is too, so that a
/// later batch is never written before an earlier one (a child before its parent).
async fn process(ctx: &Arc<Ctx>, stages: &Arc<Semaphore>, mut msgs: Vec<Message>) {
    let max = ctx.config.coordinator.submit_batch_max_bytes;
    while !msgs.is_empty() {
        let n = batch_len(msgs.iter().map(|m| m.payload.len()), max);
        let rest = msgs.split_off(n);
        if !process_batch(ctx, stages, msgs).await {
            taskfleet_bus::hand_back(&rest, Duration::from_secs(1)).await;
            return;
        }
        msgs = rest;
    }
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

/// How many of the next bodies (their sizes, in order) form one batch of at most `max` bytes:
/// at least one, so that a body larger than `max` still goes through (alone).
fn batch_len(sizes: impl IntoIterator<Item = usize>, max: usize) -> usize {
    let mut total = 0;
    sizes
        .into_iter()
        .take_while(|size| {
            total += size;
            total <= max
        })
        .count()
        .max(1)
}

/// The `Taskfleet-Reply-To` of a submission, when it names a subject replies may go to.
fn reply_to<'a>(ctx: &Ctx, m: &'a Message) -> Option<&'a str> {
    let reply = header(m, headers::REPLY_TO)?;
    ctx.topology.subjects.check_reply_to(reply, &ctx.config.coordinator.reply_prefix).ok().map(|_| reply)
}

/// Checks what the message says besides its body: its subject's queue (valid and allowed) and
/// its reply subject. `Err` carries the queue to report the refusal under.
fn check_message<'a>(ctx: &Ctx, m: &'a Message) -> Result<&'a str, (&'a str, RejectReason, String)> {
    check_route(&ctx.topology.subjects, &ctx.config.coordinator, &m.subject, header(m, headers::REPLY_TO))
}

/// The queue a submission on `subject` goes to, when that queue is valid and accepted here and
/// `reply_to` (if any) names a subject replies may go to. `Err` carries the queue to report the
/// refusal under: [`INVALID_QUEUE`] when the subject names no acceptable queue.
fn check_route<'a>(
    subjects: &Subjects,
    cfg: &CoordinatorConfig,
    subject: &'a str,
    reply_to: Option<&str>,
) -> Result<&'a str, (&'a str, RejectReason, String)> {
    let queue = subjects.submit_queue(subject).map_err(|e| {
        (INVALID_QUEUE, e.reason(), format!("subject {:?}: {e}", subject.chars().take(200).collect::<String>()))
    })?;
    if !cfg.queues.is_empty() && !cfg.queues.iter().any(|q| q == queue) {
        let msg = format!("queue {queue:?} is not accepted here; accepted queues: {}", cfg.queues.join(", "));
        return Err((INVALID_QUEUE, RejectReason::UnknownQueue, msg));
    }
    if let Some(reply) = reply_to {
        subjects.check_reply_to(reply, &cfg.reply_prefix).map_err(|e| (queue, e.reason(), e.to_string()))?;
    }
    Ok(queue)
}

/// Settles a decoded envelope against the queue its subject names and this coordinator's
/// settings: a body naming another queue than the subject (other than the default) is refused,
/// the envelope takes the subject's queue and, when it names no `max_attempts`, its kind's (or
/// the fleet's) default; a kind outside `coordinator.kinds` is refused.
fn admit(cfg: &CoordinatorConfig, queue: &str, env: &mut TaskEnvelope) -> Result<(), (RejectReason, String)> {
    if env.queue != queue && env.queue != taskfleet_proto::DEFAULT_QUEUE {
        let msg = format!("queue {:?} in the body differs from the subject's queue {queue:?}", env.queue);
        return Err((RejectReason::Invalid, msg));
    }
    env.queue = queue.to_string();
    if env.max_attempts == 0 {
        env.max_attempts = cfg.kind_max_attempts.get(&env.kind).copied().unwrap_or(cfg.max_attempts);
    }
    if !cfg.kinds.is_empty() && !cfg.kinds.contains(&env.kind) {
        let msg = format!("unknown task kind {:?}; accepted kinds: {}", env.kind, cfg.kinds.join(", "));
        return Err((RejectReason::UnknownKind, msg));
    }
    Ok(())
}

/// Decodes and validates a batch and writes it to Postgres, then hands the rest to a
/// post-commit stage of its own once one of the `stages` permits is free. `false` when the
/// batch was handed back because Postgres could not take it.
async fn process_batch(ctx: &Arc<Ctx>, stages: &Arc<Semaphore>, msgs: Vec<Message>) -> bool {
    let cfg = &ctx.config.coordinator;
    let mut envs: Vec<TaskEnvelope> = Vec::with_capacity(msgs.len());
    let mut env_msg: Vec<usize> = Vec::with_capacity(msgs.len());
    // JetStream redeliveries: the coordinator may have stopped between commit and dispatch.
    let mut redelivered: Vec<bool> = Vec::with_capacity(msgs.len());
    // One `task.intake` span per traced submission, open until its dispatch is stored.
    let mut spans: Vec<Option<tracing::Span>> = Vec::with_capacity(msgs.len());
    let mut refusals: Vec<(usize, Refusal)> = Vec::new();

    for (i, m) in msgs.iter().enumerate() {
        let decoded = decode_envelope(&m.payload, header(m, headers::CONTENT_TYPE), cfg.max_body_bytes);
        let (task_id, kind) = decoded.as_ref().map(|e| (e.id, e.kind.clone())).unwrap_or_default();
        let refuse = |queue: &str, reason: RejectReason, message: String| Refusal {
            queue: queue.to_string(),
            task_id,
            kind: kind.clone(),
            reason,
            message,
        };
        let queue = match check_message(ctx, m) {
            Ok(queue) => queue,
            Err((queue, reason, message)) => {
                refusals.push((i, refuse(queue, reason, message)));
                continue;
            }
        };
        match decoded {
            Err(e) => refusals.push((i, refuse(queue, e.reason(), e.to_string()))),
            Ok(mut env) => {
                if let Err((reason, message)) = admit(cfg, queue, &mut env) {
                    refusals.push((i, refuse(queue, reason, message)));
                    continue;
                }
                spans.push(intake_span(m, &env));
                redelivered.push(m.info().is_ok_and(|info| info.delivered > 1));
                envs.push(env);
                env_msg.push(i);
            }
        }
    }

    let outcome = if envs.is_empty() {
        Default::default()
    } else {
        // Rows Postgres refuses come back in `rejected` (`unstorable`); the rest is written.
        match ctx.store.insert_submissions(&envs, &redelivered).await {
            Ok(o) => o,
            Err(e) => {
                // Postgres is unavailable (or failing for a reason that is not the data): hand
                // the whole batch back; JetStream redelivers it (submissions have no delivery
                // limit), nothing is lost, and rows already written are recognised.
                metrics::counter!("taskfleet_coordinator_store_errors_total", "op" => "insert").increment(1);
                tracing::error!(error = %e, unavailable = e.is_unavailable(), tasks = envs.len(),
                                "cannot write submissions; will retry");
                taskfleet_bus::hand_back(&msgs, Duration::from_secs(1)).await;
                return false;
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
    true
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

    // Refused submissions are terminated: no redelivery could make them acceptable.
    let refused: HashMap<usize, &Refusal> = refusals.iter().map(|(i, r)| (*i, r)).collect();
    for (i, m) in msgs.iter().enumerate() {
        let ack = if refused.contains_key(&i) { AckKind::Term } else { AckKind::Ack };
        if let Err(e) = m.ack_with(ack).await {
            tracing::warn!(error = %e, "acknowledging a submission failed; it will be redelivered and recognised");
        }
    }
    metrics::counter!("taskfleet_coordinator_submissions_total", "result" => "accepted")
        .increment(outcome.inserted.len() as u64);
    metrics::counter!("taskfleet_coordinator_submissions_total", "result" => "duplicate")
        .increment(outcome.duplicates.len() as u64);

    // Replies for confirmed submits.
    let dup: HashMap<usize, uuid::Uuid> = outcome.duplicates.iter().map(|d| (d.index, d.existing)).collect();
    for (k, &mi) in env_msg.iter().enumerate() {
        if refused.contains_key(&mi) {
            continue;
        }
        if let Some(reply) = reply_to(ctx, &msgs[mi]) {
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
        if let Some(reply) = reply_to(ctx, &msgs[i]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects() -> Subjects {
        Subjects::new("taskfleet", "TASKFLEET")
    }

    #[test]
    fn batches_are_cut_by_bytes() {
        assert_eq!(batch_len([100; 10], 1000), 10);
        assert_eq!(batch_len([400, 400, 400, 1], 1000), 2);
        assert_eq!(batch_len([5000, 1], 1000), 1, "an oversize body goes alone");
        assert_eq!(batch_len([600, 400, 1], 1000), 2);
        assert_eq!(batch_len(std::iter::repeat_n(512 * 1024, 1000), 16 << 20), 32);
    }

    #[test]
    fn a_submission_is_routed_only_to_a_valid_accepted_queue() {
        let mut cfg = CoordinatorConfig::default();
        assert_eq!(check_route(&subjects(), &cfg, "taskfleet.submit.llm", None), Ok("llm"));
        let (queue, _, _) = check_route(&subjects(), &cfg, "taskfleet.submit.bad queue", None).unwrap_err();
        assert_eq!(queue, INVALID_QUEUE, "an invalid queue name is reported under the `invalid` queue");
        let (queue, _, _) = check_route(&subjects(), &cfg, "elsewhere.submit.llm", None).unwrap_err();
        assert_eq!(queue, INVALID_QUEUE);

        cfg.queues = vec!["default".into()];
        let (queue, reason, _) = check_route(&subjects(), &cfg, "taskfleet.submit.llm", None).unwrap_err();
        assert_eq!((queue, reason), (INVALID_QUEUE, RejectReason::UnknownQueue));
        assert_eq!(check_route(&subjects(), &cfg, "taskfleet.submit.default", None), Ok("default"));
    }

    #[test]
    fn a_reply_subject_outside_the_prefix_or_into_the_fleet_is_refused_under_its_queue() {
        let cfg = CoordinatorConfig::default();
        let route = |reply| check_route(&subjects(), &cfg, "taskfleet.submit.default", Some(reply));
        assert_eq!(route("_INBOX.abc"), Ok("default"));
        for reply in ["other.inbox", "$JS.API.STREAM.DELETE.TASKFLEET_SUBMIT", "taskfleet.dispatch.default.high"] {
            let (queue, reason, _) = route(reply).unwrap_err();
            assert_eq!((queue, reason), ("default", RejectReason::InvalidReplyTo), "{reply}");
        }
    }

    #[test]
    fn an_admitted_envelope_takes_the_subject_queue_and_its_kind_attempts() {
        let mut cfg = CoordinatorConfig::default();
        cfg.kind_max_attempts.insert("llm.chat".into(), 5);
        let mut env = TaskEnvelope::new("llm.chat", serde_json::Value::Null);
        assert_eq!(admit(&cfg, "llm", &mut env), Ok(()));
        assert_eq!((env.queue.as_str(), env.max_attempts), ("llm", 5));

        let mut env = TaskEnvelope::new("echo", serde_json::Value::Null);
        assert_eq!(admit(&cfg, "default", &mut env), Ok(()));
        assert_eq!(env.max_attempts, cfg.max_attempts, "a kind without an entry gets the fleet's default");

        let mut env = TaskEnvelope::new("echo", serde_json::Value::Null);
        env.max_attempts = 9;
        assert_eq!(admit(&cfg, "default", &mut env), Ok(()));
        assert_eq!(env.max_attempts, 9, "a task's own limit stands");
    }

    #[test]
    fn a_body_queue_other_than_the_subject_or_an_unaccepted_kind_is_refused() {
        let mut cfg = CoordinatorConfig::default();
        let mut env = TaskEnvelope::new("echo", serde_json::Value::Null);
        env.queue = "billing".into();
        assert_eq!(admit(&cfg, "llm", &mut env).map_err(|(reason, _)| reason), Err(RejectReason::Invalid));

        cfg.kinds = vec!["echo".into()];
        let mut env = TaskEnvelope::new("sleep", serde_json::Value::Null);
        assert_eq!(admit(&cfg, "default", &mut env).map_err(|(reason, _)| reason), Err(RejectReason::UnknownKind));
        let mut env = TaskEnvelope::new("echo", serde_json::Value::Null);
        assert_eq!(admit(&cfg, "default", &mut env), Ok(()));
    }
}
