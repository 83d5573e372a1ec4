//! Writes outside the hot path: rescuing tasks whose dispatch was lost, replaying dead tasks,
//! cancelling, and reading the envelopes of dead tasks for the dead-letter stream.

use crate::rows::{EnvelopeRow, Redispatch, RedispatchRow, attach_parents, envelope_columns, redispatch_columns};
use crate::{Finalized, Store, StoreError};
use std::collections::HashMap;
use std::time::Duration;
use taskfleet_proto::{Runnable, RunnableQuery, TaskEnvelope, TaskId, TaskState};
use uuid::Uuid;

/// Tasks claimed for a new dispatch, inside the transaction that claimed them: publish their
/// messages, then [`Claimed::commit`]. Dropped without a commit, the claim is rolled back and
/// the rows stay as they were, so a failed publish never strands a task.
pub struct Claimed {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The claimed tasks, with their new generation.
    pub tasks: Vec<Redispatch>,
}

impl Claimed {
    /// Commits the claim.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// Bytes of checkpoints one `task.runnable` answer carries, at most.
const RUNNABLE_CHECKPOINT_BYTES: usize = 512 << 10;

/// The decision for one message: a message of a newer generation than the row's was
/// published by a claim that did not commit and may run; an older one is a leftover; one of
/// the current generation may run unless its attempt already handed the task back (a retry or
/// deferral is scheduled).
fn runnable_of(state: &str, current: i32, waits: bool, generation: i32) -> Runnable {
    // A waiting task's attempt ended (it spawned or looped): its message must not run again.
    if TaskState::parse(state).is_some_and(|s| s.is_final() || s == TaskState::Waiting) {
        Runnable::Final
    } else if generation > current {
        Runnable::Run
    } else if generation < current || state == "retrying" || waits {
        Runnable::Stale
    } else {
        Runnable::Run
    }
}

fn time_of(t: std::time::SystemTime) -> time::OffsetDateTime {
    let ms = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i128).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl CancelOutcome {
    fn unchanged() -> CancelOutcome {
        CancelOutcome {
            previous: None,
            cancelled: false,
            finalized: Vec::new(),
            released: Vec::new(),
            runs_ended: Vec::new(),
        }
    }
}

/// What a cancellation did.
#[derive(Debug, Clone)]
pub struct CancelOutcome {
    /// State before the cancellation; `None` if the task does not exist.
    pub previous: Option<TaskState>,
    /// True when this call moved the task to `cancelled`.
    pub cancelled: bool,
    /// The task and the tasks that became final with it (dependents cancelled, a spawner it
    /// completed).
    pub finalized: Vec<Finalized>,
    /// Dependents released by it (those that take a failure with `continue`): dispatch them.
    pub released: Vec<Redispatch>,
    /// Runs that ended with it.
    pub runs_ended: Vec<(Uuid, taskfleet_proto::RunState)>,
}

/// A task row as read for the dead-letter stream: its envelope and last error.
#[derive(sqlx::FromRow)]
struct DeadLetterRow {
    #[sqlx(flatten)]
    envelope: EnvelopeRow,
    error: Option<serde_json::Value>,
}

impl Store {
    /// A claim of `rows`, with what goes with their dispatch.
    async fn claimed(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        rows: Vec<RedispatchRow>,
    ) -> Result<Claimed, StoreError> {
        let mut tasks: Vec<Redispatch> = rows.into_iter().map(Redispatch::from).collect();
        attach_parents(&mut tx, &mut tasks, self.limits.inline_parents_bytes).await?;
        Ok(Claimed { tx, tasks })
    }

    /// Queues and priorities that have tasks in flight (queued, running or retrying).
    pub async fn active_lanes(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT queue, priority FROM tasks WHERE state IN ('queued', 'running', 'retrying')",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Claims in-flight tasks of one lane whose dispatch message is known to be gone: the
    /// caller has established that every message of this lane published before `settled_before`
    /// is acknowledged or terminated and that every event stored before then is recorded, so
    /// a task dispatched before it, untouched since, and still in flight has lost its message.
    /// The claim bumps their dispatch generation; the caller publishes them, then commits.
    pub async fn claim_lost(
        &self,
        queue: &str,
        priority: &str,
        settled_before: std::time::SystemTime,
        limit: i64,
    ) -> Result<Claimed, StoreError> {
        let bound = time_of(settled_before);
        const SQL: &str = concat!(
            "UPDATE tasks t SET state = 'queued', dispatches = t.dispatches + 1, dispatched_at = now(),
                    updated_at = now(), run_at = NULL,
                    attempt = CASE WHEN t.state = 'running' THEN GREATEST(t.attempt - 1, 0) ELSE t.attempt END
             WHERE t.id IN (SELECT id FROM tasks
                            WHERE state IN ('queued', 'running', 'retrying') AND run_at IS NULL
                              AND queue = $1 AND priority = $2
                              AND updated_at < $3 AND COALESCE(dispatched_at, updated_at) < $3
                            ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            redispatch_columns!()
        );
        let mut tx = self.pool.begin().await?;
        let rows: Vec<RedispatchRow> =
            sqlx::query_as(SQL).bind(queue).bind(priority).bind(bound).bind(limit).fetch_all(&mut *tx).await?;
        self.claimed(tx, rows).await
    }

    /// Claims retries and deferrals that are due (`run_at` passed), oldest first, for their
    /// next dispatch: any coordinator may call this at any time (`FOR UPDATE SKIP LOCKED`).
    /// The caller publishes them, then commits; if it cannot, dropping the claim leaves them
    /// waiting for the next call.
    pub async fn claim_due(&self, limit: i64) -> Result<Claimed, StoreError> {
        const SQL: &str = concat!(
            "UPDATE tasks t SET state = 'queued', dispatches = t.dispatches + 1, dispatched_at = now(),
                    updated_at = now(), run_at = NULL
             WHERE t.id IN (SELECT id FROM tasks WHERE run_at <= now()
                              AND state IN ('queued', 'retrying')
                            ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            redispatch_columns!()
        );
        let mut tx = self.pool.begin().await?;
        let rows: Vec<RedispatchRow> = sqlx::query_as(SQL).bind(limit).fetch_all(&mut *tx).await?;
        self.claimed(tx, rows).await
    }

    /// The earliest `run_at` of any waiting retry or deferral.
    pub async fn next_due(&self) -> Result<Option<std::time::SystemTime>, StoreError> {
        let ms: Option<i64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM min(run_at)) * 1000)::int8 FROM tasks
             WHERE run_at IS NOT NULL AND state IN ('queued', 'retrying')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(ms.map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)))
    }

    /// Whether dispatch messages of the given generations may still run (see [`Runnable`]),
    /// in the order asked, with the last checkpoint of each task that may run and has one.
    pub async fn runnable(
        &self,
        asked: &[RunnableQuery],
    ) -> Result<(Vec<Runnable>, Vec<Option<serde_json::Value>>), StoreError> {
        let ids: Vec<Uuid> = asked.iter().map(|q| q.id).collect();
        let rows: Vec<(Uuid, String, i32, bool, Option<serde_json::Value>)> = sqlx::query_as(
            "SELECT id, state, dispatches, run_at IS NOT NULL, checkpoint FROM tasks WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut by_id: HashMap<Uuid, (String, i32, bool, Option<serde_json::Value>)> =
            rows.into_iter().map(|(id, state, gen_, waits, cp)| (id, (state, gen_, waits, cp))).collect();
        let (mut answers, mut checkpoints) = (Vec::with_capacity(asked.len()), Vec::with_capacity(asked.len()));
        // Checkpoints ride in one reply message: past this budget a message runs with the
        // checkpoint it carries (an older one, or none).
        let mut budget = RUNNABLE_CHECKPOINT_BYTES;
        for q in asked {
            let (answer, checkpoint) = match by_id.get_mut(&q.id) {
                None => (Runnable::Unknown, None),
                Some((state, current, waits, cp)) => {
                    let answer = runnable_of(state, *current, *waits, q.generation);
                    let size = cp.as_ref().map_or(0, |c| c.to_string().len());
                    let fits = answer == Runnable::Run && size <= budget;
                    budget -= if fits { size } else { 0 };
                    (answer, if fits { cp.take() } else { None })
                }
            };
            answers.push(answer);
            checkpoints.push(checkpoint);
        }
        if checkpoints.iter().all(Option::is_none) {
            checkpoints.clear();
        }
        Ok((answers, checkpoints))
    }

    /// Pending tasks whose parents are all final, none of them failed on a `fail` edge (a
    /// release that was missed), moved to `queued`. Checked against the parents themselves,
    /// not the countdown, so a miscounted row is released too.
    pub async fn release_stranded(&self) -> Result<Vec<Redispatch>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE tasks t SET state = 'queued', waiting_on = 0, dispatched_at = now(), updated_at = now()
             WHERE t.state = 'pending'
               AND NOT EXISTS (SELECT 1 FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on
                               WHERE d.task_id = t.id
                                 AND (p.state NOT IN ('succeeded', 'failed', 'dead', 'cancelled')
                                      OR (p.state <> 'succeeded' AND d.on_failure = 'fail')))
             RETURNING ",
            redispatch_columns!()
        );
        let mut tx = self.pool.begin().await?;
        let rows: Vec<RedispatchRow> = sqlx::query_as(SQL).fetch_all(&mut *tx).await?;
        let mut tasks: Vec<Redispatch> = rows.into_iter().map(Redispatch::from).collect();
        attach_parents(&mut tx, &mut tasks, self.limits.inline_parents_bytes).await?;
        tx.commit().await?;
        Ok(tasks)
    }

    /// Moves dead tasks outside runs (a run's are resumed with their run) back to `queued` for
    /// another `max_attempts` attempts (the row's budget
    /// grows by the attempts already spent, so retries after the replay keep it): the given ids, or
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
                    updated_at = now(), finished_at = NULL, max_attempts = t.max_attempts + t.attempt
             WHERE t.id IN (SELECT id FROM tasks WHERE state = 'dead' AND run_id IS NULL
                              AND ($1::uuid[] IS NULL OR id = ANY($1))
                              AND ($2::text IS NULL OR queue = $2)
                            ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            redispatch_columns!()
        );
        let mut tx = self.pool.begin().await?;
        let rows: Vec<RedispatchRow> =
            sqlx::query_as(SQL).bind(ids).bind(queue).bind(limit).fetch_all(&mut *tx).await?;
        let mut tasks: Vec<Redispatch> = rows.into_iter().map(Redispatch::from).collect();
        attach_parents(&mut tx, &mut tasks, self.limits.inline_parents_bytes).await?;
        tx.commit().await?;
        Ok(tasks)
    }

    /// Cancels a task that is not final yet, and its pending dependents.
    pub async fn cancel(&self, id: TaskId) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, String, Option<Uuid>, bool, bool)> = sqlx::query_as(
            "SELECT state, queue, run_id, has_dependents, completes IS NOT NULL FROM tasks WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, queue, run_id, has_dependents, completes)) = row else {
            return Ok(CancelOutcome { previous: None, ..CancelOutcome::unchanged() });
        };
        let previous = TaskState::parse(&state);
        // A waiting task's outcome is its join's or next iteration's: cancel its run instead.
        if previous.is_none_or(|s| s.is_final() || s == TaskState::Waiting) {
            return Ok(CancelOutcome { previous, ..CancelOutcome::unchanged() });
        }
        sqlx::query(
            "UPDATE tasks SET state = 'cancelled', finished_at = now(), updated_at = now(), run_at = NULL,
                    error = jsonb_build_object('code', 'cancelled', 'message', 'cancelled by request', 'retryable', false)
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let done = Finalized { id, queue, state: TaskState::Cancelled, run_id };
        let ended = crate::cascade::Ended { task: done, has_dependents, completes };
        let mut cascade = crate::cascade::cascade(&mut tx, vec![ended]).await?;
        attach_parents(&mut tx, &mut cascade.released, self.limits.inline_parents_bytes).await?;
        tx.commit().await?;
        Ok(CancelOutcome {
            previous,
            cancelled: true,
            finalized: cascade.finalized,
            released: cascade.released,
            runs_ended: cascade.runs_ended,
        })
    }

    /// The envelopes of the given tasks (for the dead-letter stream), with their last error.
    pub async fn envelopes_with_error(
        &self,
        ids: &[TaskId],
    ) -> Result<Vec<(TaskEnvelope, Option<serde_json::Value>)>, StoreError> {
        const SQL: &str = concat!("SELECT ", envelope_columns!(), ", t.error FROM tasks t WHERE t.id = ANY($1)");
        let rows: Vec<DeadLetterRow> = sqlx::query_as(SQL).bind(ids).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|r| (r.envelope.into(), r.error)).collect())
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

#[cfg(test)]
mod tests {
    use super::runnable_of;
    use taskfleet_proto::Runnable;

    #[test]
    fn a_message_runs_only_while_it_is_the_tasks_live_dispatch() {
        assert_eq!(runnable_of("succeeded", 1, false, 1), Runnable::Final);
        assert_eq!(runnable_of("dead", 1, false, 5), Runnable::Final);
        assert_eq!(runnable_of("waiting", 1, false, 1), Runnable::Final);
        assert_eq!(runnable_of("queued", 1, false, 1), Runnable::Run);
        assert_eq!(runnable_of("running", 2, false, 2), Runnable::Run);
        assert_eq!(runnable_of("queued", 3, false, 2), Runnable::Stale);
        // Its attempt asked for a retry, or it was deferred: the next generation will come.
        assert_eq!(runnable_of("retrying", 2, true, 2), Runnable::Stale);
        assert_eq!(runnable_of("queued", 2, true, 2), Runnable::Stale);
        // Published by a claim whose commit did not happen (yet).
        assert_eq!(runnable_of("retrying", 2, true, 3), Runnable::Run);
    }
}
