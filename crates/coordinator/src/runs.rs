//! The run API verbs (`run.submit`, `run.get`, `run.cancel`, `run.resume`) and those a
//! running step uses (`task.parents`, `task.checkpoint`), and the expiry of runs past their
//! deadline. Every answer comes from Postgres; a change is committed before it is answered.

use crate::Ctx;
use crate::api::{Answer, bad_request, reply, unavailable};
use taskfleet_proto::{
    ApiError, ApiErrorKind, CheckpointReply, CheckpointRequest, ParentOutcome, ParentsReply, ParentsRequest, RunChange,
    RunGetRequest, RunListRequest, RunSpec, RunState, RunSubmitted, plan_nodes,
};
use taskfleet_store::WorkflowLimits;
use uuid::Uuid;

/// Longest run timeout: 366 days.
const MAX_RUN_TIMEOUT_MS: u64 = 366 * 24 * 3_600_000;
/// Runs expired per round, at most.
const EXPIRE_LIMIT: i64 = 100;
/// Parents returned per `task.parents` page, at most.
const MAX_PARENTS_PAGE: u32 = 1_000;
/// Bytes of outcomes per `task.parents` page (half of NATS's default `max_payload`); a page
/// holds at least one parent.
const PARENTS_PAGE_BYTES: usize = 512 << 10;

/// The store's workflow limits from the configuration.
pub(crate) fn limits(config: &taskfleet_config::Config) -> WorkflowLimits {
    let w = &config.workflows;
    WorkflowLimits {
        max_tasks_per_run: w.max_tasks_per_run,
        max_children_per_spawn: w.max_children_per_spawn,
        max_spawn_depth: w.max_spawn_depth,
        max_payload_bytes: config.coordinator.max_body_bytes,
        inline_parents_bytes: w.inline_parents_bytes,
        default_max_attempts: config.coordinator.max_attempts,
        kind_max_attempts: config.coordinator.kind_max_attempts.clone(),
    }
}

fn no_run(id: Uuid) -> ApiError {
    ApiError::new(ApiErrorKind::NotFound, format!("no run {id}"))
}

/// Decodes a run: JSON or MessagePack (sniffed), at most [`taskfleet_proto::MAX_MESSAGE_BYTES`].
fn decode_run(body: &[u8]) -> Result<RunSpec, ApiError> {
    taskfleet_proto::decode::<RunSpec>(body, None, taskfleet_proto::MAX_MESSAGE_BYTES)
        .map_err(|e| bad_request(format!("invalid run: {e}")))
}

/// Checks a run against the coordinator's limits and accepted queues and kinds.
fn check_run(ctx: &Ctx, spec: &RunSpec) -> Result<Vec<taskfleet_proto::PlannedTask>, ApiError> {
    let cfg = &ctx.config.coordinator;
    let max = ctx.config.workflows.max_tasks_per_run as usize;
    if spec.nodes.is_empty() || spec.nodes.len() > max {
        return Err(bad_request(format!(
            "a run has {} nodes; it needs 1..={max} (workflows.max_tasks_per_run)",
            spec.nodes.len()
        )));
    }
    if spec.id.is_nil() || spec.timeout_ms.is_some_and(|t| t == 0 || t > MAX_RUN_TIMEOUT_MS) {
        return Err(bad_request(format!(
            "a run needs a non-nil id, and a timeout_ms in 1..={MAX_RUN_TIMEOUT_MS} if any"
        )));
    }
    taskfleet_proto::validate_queue("queue", &spec.queue).map_err(|e| bad_request(e.to_string()))?;
    let planned = plan_nodes(&spec.nodes, &spec.queue, spec.priority, cfg.max_body_bytes)
        .map_err(|e| bad_request(format!("invalid run: {e}")))?;
    for p in &planned {
        let env = &p.envelope;
        if !cfg.queues.is_empty() && !cfg.queues.contains(&env.queue) {
            return Err(bad_request(format!("node {:?}: queue {:?} is not accepted", p.node, env.queue)));
        }
        if !cfg.kinds.is_empty() && !cfg.kinds.contains(&env.kind) {
            return Err(bad_request(format!("node {:?}: unknown task kind {:?}", p.node, env.kind)));
        }
    }
    Ok(planned)
}

/// `run.submit`: writes the run in one transaction, then dispatches its parentless tasks.
pub(crate) async fn submit(ctx: &Ctx, body: &[u8]) -> Answer {
    let spec = decode_run(body)?;
    let planned = check_run(ctx, &spec)?;
    let span = tracing::info_span!("run", run_id = %spec.id, nodes = spec.nodes.len());
    let traceparent = taskfleet_telemetry::traceparent(&span);
    let inserted = ctx.store.insert_run(&spec, &planned, traceparent.as_deref()).await.map_err(unavailable)?;
    if let Err(e) = crate::dispatch::publish_rows(&ctx.topology, &inserted.ready).await {
        // Committed as queued: the rescuer dispatches them once it sees them idle.
        tracing::error!(run_id = %spec.id, error = %e, "cannot dispatch a run's first tasks now");
    }
    if !inserted.duplicate {
        metrics::counter!("taskfleet_coordinator_runs_submitted_total").increment(1);
    }
    reply(RunSubmitted { run_id: spec.id, tasks: inserted.tasks, duplicate: inserted.duplicate })
}

/// `run.list`.
pub(crate) async fn list(ctx: &Ctx, r: RunListRequest) -> Answer {
    reply(ctx.store.list_runs(r.state, r.limit.unwrap_or(20)).await.map_err(unavailable)?)
}

/// `run.get`.
pub(crate) async fn get(ctx: &Ctx, r: RunGetRequest) -> Answer {
    ctx.store.run_view(&r).await.map_err(unavailable)?.map_or_else(|| Err(no_run(r.id)), reply)
}

/// `run.cancel`: the run and its unfinished tasks; workers holding one are told.
pub(crate) async fn cancel(ctx: &Ctx, id: Uuid) -> Answer {
    let (previous, ended) = ctx.store.cancel_run(id).await.map_err(unavailable)?.ok_or_else(|| no_run(id))?;
    crate::recorder::announce_cancelled(ctx, &ended.announce).await;
    crate::recorder::notify_committed(ctx, &ended.finalized).await;
    let state = if previous.is_final() { previous } else { RunState::Cancelled };
    if !previous.is_final() {
        crate::recorder::notify_runs_ended(ctx, &[(id, state)]).await;
    }
    reply(RunChange { previous, state, tasks: ended.finalized.len() })
}

/// `run.resume`: a failed or cancelled run runs again from what succeeded.
pub(crate) async fn resume(ctx: &Ctx, id: Uuid) -> Answer {
    let (previous, resumed) = ctx.store.resume_run(id).await.map_err(unavailable)?.ok_or_else(|| no_run(id))?;
    let Some(resumed) = resumed else {
        return Err(bad_request(format!("run {id} is {}; only a failed or cancelled run resumes", previous.as_str())));
    };
    // Their earlier cancellation must not make workers skip them now.
    for task in &resumed.reset {
        let _ = ctx.cancel_bucket.purge(task.to_string()).await;
    }
    if let Err(e) = crate::dispatch::publish_rows(&ctx.topology, &resumed.ready).await {
        tracing::error!(run_id = %id, error = %e, "cannot dispatch a resumed run's tasks now");
    }
    if resumed.state.is_final() {
        crate::recorder::notify_runs_ended(ctx, &[(id, resumed.state)]).await;
    }
    reply(RunChange { previous, state: resumed.state, tasks: resumed.reset.len() })
}

/// `task.parents`: a page of a step's parents' outcomes, cut at [`PARENTS_PAGE_BYTES`] so that
/// it fits one NATS message.
pub(crate) async fn parents(ctx: &Ctx, r: ParentsRequest) -> Answer {
    let limit = r.limit.unwrap_or(MAX_PARENTS_PAGE).clamp(1, MAX_PARENTS_PAGE);
    let (mut parents, total, previous) = ctx.store.parents_page(r.id, r.offset, limit).await.map_err(unavailable)?;
    let mut bytes = previous.as_ref().map_or(0, ParentOutcome::encoded_len);
    let fits = parents
        .iter()
        .position(|p| {
            bytes += p.encoded_len();
            bytes > PARENTS_PAGE_BYTES
        })
        .unwrap_or(parents.len());
    parents.truncate(fits.max(1));
    reply(ParentsReply { parents, total, previous })
}

/// `task.checkpoint`: stores a step's checkpoint before answering.
pub(crate) async fn checkpoint(ctx: &Ctx, r: CheckpointRequest) -> Answer {
    taskfleet_proto::check_json(&r.checkpoint).map_err(|e| bad_request(format!("invalid checkpoint: {e}")))?;
    let size = serde_json::to_vec(&r.checkpoint).map(|v| v.len()).unwrap_or(usize::MAX);
    let limit = ctx.config.workflows.max_checkpoint_bytes;
    if size > limit {
        return Err(bad_request(format!(
            "a checkpoint of {size} bytes is over workflows.max_checkpoint_bytes ({limit})"
        )));
    }
    reply(CheckpointReply {
        saved: ctx.store.save_checkpoint(r.id, &r.checkpoint, r.generation).await.map_err(unavailable)?,
    })
}

/// Fails runs past their deadline; called by the rescuer's leader each round.
pub(crate) async fn expire(ctx: &Ctx) -> anyhow::Result<()> {
    for (run, ended) in ctx.store.expire_runs(EXPIRE_LIMIT).await? {
        tracing::info!(run_id = %run, tasks = ended.finalized.len(), "a run timed out");
        crate::recorder::notify_runs_ended(ctx, &[(run, RunState::Failed)]).await;
        crate::recorder::announce_cancelled(ctx, &ended.announce).await;
        crate::recorder::notify_committed(ctx, &ended.finalized).await;
    }
    Ok(())
}
