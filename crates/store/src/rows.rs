//! Task rows as the dispatch path reads them: the envelope columns, a redispatch's
//! generation and trace context, and the parents' outcomes a step receives.

use crate::StoreError;
use std::collections::HashMap;
use taskfleet_proto::{ParentOutcome, Priority, TaskEnvelope, TaskErrorInfo, TaskState};
use uuid::Uuid;

/// The columns of a `tasks` row (aliased `t`) that make up its envelope, as [`EnvelopeRow`]
/// reads them.
macro_rules! envelope_columns {
    () => {
        "t.id, t.kind, t.queue, t.priority, t.payload, t.max_attempts, t.timeout_ms, t.idempotency_key,
         (extract(epoch FROM t.created_at) * 1000)::int8 AS created_ms, t.options, t.run_id, t.node,
         t.iteration, t.checkpoint, t.completes"
    };
}
pub(crate) use envelope_columns;

/// The columns of a task row to dispatch again, as [`RedispatchRow`] reads them.
macro_rules! redispatch_columns {
    () => {
        concat!($crate::rows::envelope_columns!(), ", t.attempt, t.dispatches, t.next_traceparent, t.traceparent")
    };
}
pub(crate) use redispatch_columns;

/// A task's envelope as stored: the columns of [`envelope_columns!`].
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EnvelopeRow {
    id: Uuid,
    kind: String,
    queue: String,
    priority: String,
    payload: serde_json::Value,
    max_attempts: i32,
    timeout_ms: i64,
    idempotency_key: Option<String>,
    /// `created_at`, Unix epoch milliseconds.
    created_ms: i64,
    /// Retry policy and rate limits, when the submission set any.
    options: Option<serde_json::Value>,
    run_id: Option<Uuid>,
    node: Option<String>,
    iteration: i32,
    checkpoint: Option<serde_json::Value>,
    /// For a loop iteration after the first: the previous iteration.
    completes: Option<Uuid>,
}

impl EnvelopeRow {
    /// The envelope, and the previous loop iteration whose outcome it receives.
    fn split(self) -> (TaskEnvelope, Option<Uuid>) {
        let mut env = TaskEnvelope::new(self.kind, self.payload);
        env.id = self.id;
        env.queue = self.queue;
        env.priority = self.priority.parse().unwrap_or(Priority::Normal);
        env.max_attempts = self.max_attempts.max(1) as u32;
        env.timeout_ms = self.timeout_ms.max(1) as u64;
        env.idempotency_key = self.idempotency_key;
        env.created_at = self.created_ms.max(0) as u64;
        if let Some(options) = self.options {
            env.apply_options_json(options);
        }
        env.run_id = self.run_id;
        env.node = self.node;
        env.iteration = self.iteration.max(0) as u32;
        env.checkpoint = self.checkpoint;
        let previous = self.completes.filter(|_| env.iteration > 1);
        (env, previous)
    }
}

impl From<EnvelopeRow> for TaskEnvelope {
    fn from(r: EnvelopeRow) -> Self {
        r.split().0
    }
}

/// A task to publish to the dispatch stream, from its row.
#[derive(Debug, Clone)]
pub struct Redispatch {
    /// The task.
    pub envelope: TaskEnvelope,
    /// Handler attempts already recorded; the worker runs attempt `attempt_offset + 1`.
    pub attempt_offset: u32,
    /// Dispatch generation (1 for the first dispatch); part of the deduplication id.
    pub generation: i32,
    /// Trace context for the dispatch: a retry's or deferral's, kept from its earlier
    /// dispatch, else the one stored with the task (its run's or its spawner's).
    pub traceparent: Option<String>,
    /// The previous loop iteration, whose outcome goes with the dispatch.
    pub(crate) previous: Option<Uuid>,
}

/// A task row read for another dispatch.
#[derive(sqlx::FromRow)]
pub(crate) struct RedispatchRow {
    #[sqlx(flatten)]
    envelope: EnvelopeRow,
    /// Handler attempts recorded so far.
    attempt: i32,
    /// Dispatch generation.
    dispatches: i32,
    next_traceparent: Option<String>,
    traceparent: Option<String>,
}

impl From<RedispatchRow> for Redispatch {
    fn from(r: RedispatchRow) -> Self {
        let (envelope, previous) = r.envelope.split();
        Redispatch {
            envelope,
            attempt_offset: r.attempt.max(0) as u32,
            generation: r.dispatches,
            traceparent: r.next_traceparent.or(r.traceparent),
            previous,
        }
    }
}

/// A parent's outcome as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct ParentRow {
    /// The dependent.
    pub task_id: Uuid,
    id: Uuid,
    node: Option<String>,
    state: String,
    result: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
}

impl From<ParentRow> for ParentOutcome {
    fn from(r: ParentRow) -> Self {
        ParentOutcome {
            id: r.id,
            node: r.node,
            state: TaskState::parse(&r.state).unwrap_or(TaskState::Failed),
            result: r.result,
            error: r.error.and_then(|e| serde_json::from_value::<TaskErrorInfo>(e).ok()),
        }
    }
}

/// The outcomes of the parents of `tasks`, `offset..offset + limit` of each in edge order.
/// Each parent is read by its key (`OFFSET 0` keeps the lookup a per-edge index probe instead
/// of a join the planner may turn into a scan of every task).
pub(crate) const PARENTS_SQL: &str = "SELECT d.task_id, p.id, p.node, p.state, p.result, p.error
     FROM task_dependencies d
     CROSS JOIN LATERAL (SELECT t.id, t.node, t.state, t.result, t.error FROM tasks t
                         WHERE t.id = d.depends_on OFFSET 0) p
     WHERE d.task_id = ANY($1)
     ORDER BY d.task_id, d.position, p.id";

/// Fills in what goes with a dispatch from Postgres: each task's parents' outcomes and, for a
/// loop iteration, the previous iteration's outcome (both left out, with `parents_omitted`,
/// when together they encode to more than `inline_bytes`). Two queries for the whole batch.
pub(crate) async fn attach_parents(
    conn: &mut sqlx::PgConnection,
    tasks: &mut [Redispatch],
    inline_bytes: usize,
) -> Result<(), StoreError> {
    if tasks.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.envelope.id).collect();
    let rows: Vec<ParentRow> = sqlx::query_as(PARENTS_SQL).bind(&ids).fetch_all(&mut *conn).await?;
    let mut by_task: HashMap<Uuid, Vec<ParentOutcome>> = HashMap::new();
    for r in rows {
        by_task.entry(r.task_id).or_default().push(r.into());
    }
    let previous_ids: Vec<Uuid> = tasks.iter().filter_map(|t| t.previous).collect();
    let mut previous: HashMap<Uuid, ParentOutcome> = HashMap::new();
    if !previous_ids.is_empty() {
        let rows: Vec<ParentRow> = sqlx::query_as(
            "SELECT p.id AS task_id, p.id, p.node, p.state, p.result, p.error FROM tasks p WHERE p.id = ANY($1)",
        )
        .bind(&previous_ids)
        .fetch_all(&mut *conn)
        .await?;
        previous = rows.into_iter().map(|r| (r.task_id, r.into())).collect();
    }
    for t in tasks.iter_mut() {
        let parents = by_task.remove(&t.envelope.id).unwrap_or_default();
        // A previous iteration still `waiting` took its successor's place: show it succeeded.
        let previous = t.previous.and_then(|p| previous.remove(&p)).map(|mut p| {
            if p.state == TaskState::Waiting {
                p.state = TaskState::Succeeded;
            }
            p
        });
        // Parents and previous iteration share one budget; over it, the worker reads both
        // with `task.parents` before the step starts.
        if encoded_size(&parents) + encoded_size(previous.as_slice()) > inline_bytes {
            t.envelope.parents_omitted = true;
        } else {
            t.envelope.parents = parents;
            t.envelope.previous = previous.map(Box::new);
        }
    }
    Ok(())
}

/// Bytes the outcomes take in a dispatch, about.
fn encoded_size(parents: &[ParentOutcome]) -> usize {
    parents.iter().map(ParentOutcome::encoded_len).sum()
}
