//! Writes outside the hot path: rescuing tasks whose dispatch was lost, replaying dead tasks,
//! cancelling, and reading the envelopes of dead tasks for the dead-letter stream.

use crate::events::{ReleasedRow, envelope_from_row};
use crate::{Finalized, Store, StoreError};
use std::time::Duration;
use taskfleet_proto::{TaskEnvelope, TaskId, TaskState};
use uuid::Uuid;

/// A task to publish to the dispatch stream again.
#[derive(Debug, Clone)]
pub struct Redispatch {
    /// The task, with `max_attempts` raised by `attempt_offset` for a replay.
    pub envelope: TaskEnvelope,
    /// Attempts already spent; the worker's attempt number is this plus the delivery count.
    pub attempt_offset: u32,
    /// Dispatch generation (1 for the first dispatch); part of the deduplication id.
    pub generation: i32,
}

/// What a cancellation did.
#[derive(Debug, Clone)]
pub struct CancelOutcome {
    /// State before the cancellation; `None` if the task does not exist.
    pub previous: Option<TaskState>,
    /// True when this call moved the task to `cancelled`.
    pub cancelled: bool,
    /// The task and its pending dependents that became final.
    pub finalized: Vec<Finalized>,
}

macro_rules! envelope_columns {
    () => {
        "t.id, t.kind, t.queue, t.priority, t.payload, t.max_attempts, t.timeout_ms, t.idempotency_key,
         (extract(epoch FROM t.created_at) * 1000)::int8, t.options, t.attempt, t.dispatches"
    };
}

/// A task row as read for the dead-letter stream: envelope columns plus the last error.
type EnvelopeErrorRow = (
    Uuid,
    String,
    String,
    String,
    serde_json::Value,
    i32,
    i64,
    Option<String>,
    i64,
    Option<serde_json::Value>,
    Option<serde_json::Value>,
);

type RedispatchRow = (
    Uuid,
    String,
    String,
    String,
    serde_json::Value,
    i32,
    i64,
    Option<String>,
    i64,
    Option<serde_json::Value>,
    i32,
    i32,
);

fn redispatch_from_row(r: RedispatchRow, replay: bool) -> Redispatch {
    let (id, kind, queue, priority, payload, max_attempts, timeout_ms, key, created, options, attempt, dispatches) = r;
    let mut envelope =
        envelope_from_row((id, kind, queue, priority, payload, max_attempts, timeout_ms, key, created, options));
    let offset = attempt.max(0) as u32;
    if replay {
        envelope.max_attempts += offset;
    }
    Redispatch { envelope, attempt_offset: offset, generation: dispatches }
}

impl Store {
    /// Queues and priorities that have tasks in flight (queued, running or retrying).
    pub async fn active_lanes(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT queue, priority FROM tasks WHERE state IN ('queued', 'running', 'retrying')",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Claims in-flight tasks of one lane that nothing has touched for `idle`, for a new
    /// dispatch: bumps their dispatch generation and returns them. The caller has established
    /// that JetStream holds nothing for this lane, so these tasks' messages were lost.
    pub async fn claim_lost(
        &self,
        queue: &str,
        priority: &str,
        idle: Duration,
        limit: i64,
    ) -> Result<Vec<Redispatch>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE tasks t SET state = 'queued', dispatches = t.dispatches + 1, dispatched_at = now(), updated_at = now()
             WHERE t.id IN (SELECT id FROM tasks
                            WHERE state IN ('queued', 'running', 'retrying') AND queue = $1 AND priority = $2
                              AND updated_at < now() - make_interval(secs => $3)
                            ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            envelope_columns!()
        );
        let rows: Vec<RedispatchRow> = sqlx::query_as(SQL)
            .bind(queue)
            .bind(priority)
            .bind(idle.as_secs_f64())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| redispatch_from_row(r, false)).collect())
    }

    /// Pending tasks whose dependencies have all succeeded (a release that was missed), moved
    /// to `queued`.
    pub async fn release_stranded(&self) -> Result<Vec<TaskEnvelope>, StoreError> {
        let rows: Vec<ReleasedRow> = sqlx::query_as(
            "UPDATE tasks t SET state = 'queued', dispatched_at = now(), updated_at = now()
             WHERE t.state = 'pending'
               AND NOT EXISTS (SELECT 1 FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on
                               WHERE d.task_id = t.id AND p.state <> 'succeeded')
             RETURNING t.id, t.kind, t.queue, t.priority, t.payload, t.max_attempts, t.timeout_ms,
                       t.idempotency_key, (extract(epoch FROM t.created_at) * 1000)::int8, t.options",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(envelope_from_row).collect())
    }

    /// Moves dead tasks back to `queued` for another `max_attempts` attempts: the given ids, or
    /// every dead task (of `queue`, if given) when `ids` is `None`. Their history stays in
    /// `task_attempts`.
    pub async fn replay_dead(
        &self,
        ids: Option<&[TaskId]>,
        queue: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Redispatch>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE tasks t SET state = 'queued', dispatches = t.dispatches + 1, dispatched_at = now(),
                    updated_at = now(), finished_at = NULL
             WHERE t.id IN (SELECT id FROM tasks WHERE state = 'dead'
                              AND ($1::uuid[] IS NULL OR id = ANY($1))
                              AND ($2::text IS NULL OR queue = $2)
                            ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            envelope_columns!()
        );
        let rows: Vec<RedispatchRow> =
            sqlx::query_as(SQL).bind(ids).bind(queue).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|r| redispatch_from_row(r, true)).collect())
    }

    /// Cancels a task that is not final yet, and its pending dependents.
    pub async fn cancel(&self, id: TaskId) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, String)> = sqlx::query_as("SELECT state, queue FROM tasks WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((state, queue)) = row else {
            return Ok(CancelOutcome { previous: None, cancelled: false, finalized: Vec::new() });
        };
        let previous = TaskState::parse(&state);
        if previous.is_none_or(|s| s.is_final()) {
            return Ok(CancelOutcome { previous, cancelled: false, finalized: Vec::new() });
        }
        sqlx::query(
            "UPDATE tasks SET state = 'cancelled', finished_at = now(), updated_at = now(),
                    error = jsonb_build_object('code', 'cancelled', 'message', 'cancelled by request', 'retryable', false)
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let mut finalized = vec![Finalized { id, queue, state: TaskState::Cancelled }];
        finalized.extend(crate::events::cancel_dependents(&mut tx, &[id]).await?);
        tx.commit().await?;
        Ok(CancelOutcome { previous, cancelled: true, finalized })
    }

    /// The envelopes of the given tasks (for the dead-letter stream), with their last error.
    pub async fn envelopes_with_error(
        &self,
        ids: &[TaskId],
    ) -> Result<Vec<(TaskEnvelope, Option<serde_json::Value>)>, StoreError> {
        let rows: Vec<EnvelopeErrorRow> = sqlx::query_as(
            "SELECT id, kind, queue, priority, payload, max_attempts, timeout_ms, idempotency_key,
                        (extract(epoch FROM created_at) * 1000)::int8, options, error
                 FROM tasks WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, kind, queue, priority, payload, max_attempts, timeout_ms, key, created, options, error)| {
                let row = (id, kind, queue, priority, payload, max_attempts, timeout_ms, key, created, options);
                (envelope_from_row(row), error)
            })
            .collect())
    }
}

/// Leadership of a background job among coordinator replicas: a session-level Postgres
/// advisory lock held on one pooled connection. It ends when dropped or when the connection
/// breaks, and another replica can then take it.
pub struct LeaderLock {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
}

impl LeaderLock {
    /// True while the lock's connection still answers (and so still holds the lock).
    pub async fn still_held(&mut self) -> bool {
        sqlx::query("SELECT 1").execute(&mut *self.conn).await.is_ok()
    }
}

impl Store {
    /// Takes the lock named `name` (per schema) if no other session holds it.
    pub async fn try_leader_lock(&self, name: &str) -> Result<Option<LeaderLock>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let key = format!("{}:{name}", self.schema);
        let got: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))").bind(&key).fetch_one(&mut *conn).await?;
        Ok(got.then_some(LeaderLock { conn }))
    }
}
