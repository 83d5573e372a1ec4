//! Ending a run before its last task (early stop, cancellation, timeout) and resuming a
//! failed or cancelled one.

use crate::cascade::finish_runs;
use crate::rows::{Redispatch, RedispatchRow, attach_parents, redispatch_columns};
use crate::{Finalized, Store, StoreError, column};
use taskfleet_proto::{RunState, TaskErrorInfo, TaskState};
use uuid::Uuid;

/// What ending a run did to its tasks.
#[derive(Debug, Default)]
pub struct RunEnded {
    /// Tasks cancelled.
    pub finalized: Vec<Finalized>,
    /// Of those, the ones a worker may hold (queued, running, retrying): announce them.
    pub announce: Vec<Uuid>,
}

/// What resuming a run did.
#[derive(Debug)]
pub struct RunResumed {
    /// Tasks set to run again.
    pub reset: Vec<Uuid>,
    /// Of those, the ones ready now.
    pub ready: Vec<Redispatch>,
    /// The run's state now: `running`, or final again when nothing was left to run.
    pub state: RunState,
}

/// Ends a running run with `state` (and `output`, `error`), cancelling every task of it that
/// is not final. Nothing happens to a run that already ended.
pub(crate) async fn end_run(
    tx: &mut sqlx::PgConnection,
    run: Uuid,
    state: RunState,
    output: Option<&serde_json::Value>,
    error: Option<TaskErrorInfo>,
) -> Result<Option<RunEnded>, StoreError> {
    let error = error.and_then(|e| serde_json::to_value(e).ok());
    let ended: Option<(Uuid,)> = sqlx::query_as(
        "UPDATE runs SET state = $2, output = COALESCE($3, output), error = $4, finished_at = now(), updated_at = now()
         WHERE id = $1 AND state = 'running' RETURNING id",
    )
    .bind(run)
    .bind(state.as_str())
    .bind(output)
    .bind(&error)
    .fetch_optional(&mut *tx)
    .await?;
    if ended.is_none() {
        return Ok(None);
    }
    let open: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT id, queue, state FROM tasks
         WHERE run_id = $1 AND state NOT IN ('succeeded', 'failed', 'dead', 'cancelled') ORDER BY id FOR UPDATE",
    )
    .bind(run)
    .fetch_all(&mut *tx)
    .await?;
    let reason = match state {
        RunState::Succeeded => ("run_stopped", "a step ended the run early"),
        RunState::Cancelled => ("cancelled", "the run was cancelled"),
        _ => ("run_failed", "the run ended"),
    };
    let task_error = serde_json::json!({"code": reason.0, "message": reason.1, "retryable": false});
    sqlx::query(
        "UPDATE tasks SET state = 'cancelled', error = $2, finished_at = now(), updated_at = now(), run_at = NULL
         WHERE id = ANY($1)",
    )
    .bind(column(&open, |o| o.0))
    .bind(task_error)
    .execute(&mut *tx)
    .await?;
    let announce = open.iter().filter(|(_, _, s)| matches!(s.as_str(), "queued" | "running" | "retrying")).map(|o| o.0);
    Ok(Some(RunEnded {
        announce: announce.collect(),
        finalized: open
            .into_iter()
            .map(|(id, queue, _)| Finalized { id, queue, state: TaskState::Cancelled, run_id: Some(run) })
            .collect(),
    }))
}

impl Store {
    /// Cancels a running run and every unfinished task of it.
    pub async fn cancel_run(&self, run: Uuid) -> Result<Option<(RunState, RunEnded)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(previous) = self.lock_run(&mut tx, run).await? else { return Ok(None) };
        let error =
            TaskErrorInfo { code: "cancelled".into(), message: "cancelled by request".into(), retryable: false };
        let ended = end_run(&mut tx, run, RunState::Cancelled, None, Some(error)).await?.unwrap_or_default();
        tx.commit().await?;
        Ok(Some((previous, ended)))
    }

    /// Fails running runs past their deadline (`run_timeout`), cancelling their unfinished
    /// tasks; any coordinator may call it (`FOR UPDATE SKIP LOCKED`).
    pub async fn expire_runs(&self, limit: i64) -> Result<Vec<(Uuid, RunEnded)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let due: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT id, COALESCE(timeout_ms, 0) FROM runs WHERE state = 'running' AND deadline < now()
             ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::new();
        for (run, timeout_ms) in due {
            let error = TaskErrorInfo {
                code: "run_timeout".into(),
                message: format!("the run exceeded its timeout of {timeout_ms} ms"),
                retryable: false,
            };
            out.extend(end_run(&mut tx, run, RunState::Failed, None, Some(error)).await?.map(|e| (run, e)));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The run's state, its row locked; `None` if there is no such run.
    async fn lock_run(&self, tx: &mut sqlx::PgConnection, run: Uuid) -> Result<Option<RunState>, StoreError> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM runs WHERE id = $1 FOR UPDATE").bind(run).fetch_optional(tx).await?;
        Ok(state.and_then(|s| RunState::parse(&s)))
    }

    /// Runs a failed or cancelled run again: succeeded tasks keep their results; every other
    /// task is set to run again with a fresh attempt budget (and its last checkpoint), a task
    /// that had spawned or looped waits for its join or iteration again (or takes its result
    /// when that one had succeeded). `Ok(None)` if there
    /// is no such run; the previous state is returned with no change when it is not failed
    /// or cancelled.
    pub async fn resume_run(&self, run: Uuid) -> Result<Option<(RunState, Option<RunResumed>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(previous) = self.lock_run(&mut tx, run).await? else { return Ok(None) };
        if !matches!(previous, RunState::Failed | RunState::Cancelled) {
            return Ok(Some((previous, None)));
        }
        let reset: Vec<(Uuid,)> = sqlx::query_as(
            "UPDATE tasks t SET
                 state = CASE WHEN c.state = 'succeeded' THEN 'succeeded' WHEN c.id IS NOT NULL THEN 'waiting'
                              ELSE 'pending' END,
                 result = c.result, error = NULL, run_at = NULL, dispatches = t.dispatches + 1,
                 finished_at = CASE WHEN c.state = 'succeeded' THEN now() END,
                 max_attempts = t.max_attempts + t.attempt, updated_at = now()
             FROM tasks t0 LEFT JOIN LATERAL (SELECT id, state, result FROM tasks WHERE completes = t0.id LIMIT 1) c ON true
             WHERE t.id = t0.id AND t.run_id = $1 AND t.state IN ('failed', 'dead', 'cancelled')
             RETURNING t.id",
        )
        .bind(run)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE tasks t SET waiting_on = (SELECT count(*) FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on
                                              WHERE d.task_id = t.id
                                                AND p.state NOT IN ('succeeded', 'failed', 'dead', 'cancelled'))
             WHERE t.run_id = $1 AND t.state = 'pending'",
        )
        .bind(run)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE runs SET state = 'running', output = NULL, error = NULL, finished_at = NULL, updated_at = now(),
                    deadline = now() + make_interval(secs => timeout_ms / 1000.0),
                    remaining = (SELECT count(*) FROM tasks WHERE run_id = $1
                                 AND state NOT IN ('succeeded', 'failed', 'dead', 'cancelled'))
             WHERE id = $1",
        )
        .bind(run)
        .execute(&mut *tx)
        .await?;
        const READY: &str = concat!(
            "UPDATE tasks t SET state = 'queued', dispatched_at = now(), updated_at = now()
             WHERE t.run_id = $1 AND t.state = 'pending' AND t.waiting_on <= 0
             RETURNING ",
            redispatch_columns!()
        );
        let rows: Vec<RedispatchRow> = sqlx::query_as(READY).bind(run).fetch_all(&mut *tx).await?;
        let mut ready: Vec<Redispatch> = rows.into_iter().map(Redispatch::from).collect();
        attach_parents(&mut tx, &mut ready, self.limits.inline_parents_bytes).await?;
        // A run with nothing left to do (every task had succeeded) ends again at once.
        let state = finish_runs(&mut tx, &[run]).await?.first().map_or(RunState::Running, |(_, s)| *s);
        tx.commit().await?;
        Ok(Some((previous, Some(RunResumed { reset: reset.into_iter().map(|(id,)| id).collect(), ready, state }))))
    }
}
