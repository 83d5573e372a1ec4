//! What a final state sets off, inside the transaction that records it: the waiting task it
//! completes (a spawn's join completes its spawner, a loop iteration its predecessor; a loop
//! iteration completed by its join may loop on), its
//! dependents (one fewer parent to wait for; released at zero, cancelled by a failed `fail`
//! edge) and its run (one fewer task; ended at zero). Each step can make more tasks final, so
//! it repeats until nothing more changes.
//!
//! Counters, not `NOT EXISTS` checks, decide releases: a decrement locks the dependent's row,
//! so when two parents end in concurrent transactions the second waits for the first and sees
//! its decrement. Exactly one transaction takes a counter to zero: a join fires once.
//!
//! Every statement here is driven by the ids of the batch (`id = ANY(…)`), so it probes
//! indexes whatever the planner thinks of the tables' sizes: on fresh tables without
//! statistics, joins written plainly were planned as scans of all of `tasks` per batch.

use crate::rows::{Redispatch, RedispatchRow, redispatch_columns};
use crate::runs::{ChangedRow, next_iterations};
use crate::{Finalized, StoreError, column};
use std::collections::HashMap;
use taskfleet_proto::{RunState, TaskState};
use uuid::Uuid;

/// What the cascade changed besides its input.
#[derive(Debug, Default)]
pub(crate) struct Cascade {
    /// Every task that became final, the input included.
    pub finalized: Vec<Finalized>,
    /// Dependents whose parents are all final: the caller dispatches them.
    pub released: Vec<Redispatch>,
    /// Runs that ended.
    pub runs_ended: Vec<(Uuid, RunState)>,
}

/// A task that just became final, with what it may set off: dependents to count down, a
/// waiting task to decide. Tasks with neither (most of a plain workload) cost the cascade no
/// statement.
#[derive(Debug)]
pub(crate) struct Ended {
    /// The task.
    pub task: Finalized,
    /// Other tasks depend on it.
    pub has_dependents: bool,
    /// It decides a waiting task.
    pub completes: bool,
}

/// A waiting task its completer just decided, with what a loop needs to go on.
#[derive(sqlx::FromRow)]
struct CompletedTask {
    #[sqlx(flatten)]
    row: ChangedRow,
    result: Option<serde_json::Value>,
    /// Completed by its own next iteration (not by a join).
    chained: bool,
}

/// A dependent the cascade moved: released (`queued`) or cancelled.
#[derive(sqlx::FromRow)]
struct MovedDependent {
    #[sqlx(flatten)]
    row: RedispatchRow,
    new_state: String,
    moved_has_dependents: bool,
    moved_completes: bool,
}

/// Runs the cascade from `frontier`, tasks that just became final in this transaction.
pub(crate) async fn cascade(tx: &mut sqlx::PgConnection, mut frontier: Vec<Ended>) -> Result<Cascade, StoreError> {
    let mut out = Cascade::default();
    let mut runs: HashMap<Uuid, i32> = HashMap::new();
    while !frontier.is_empty() {
        let completers: Vec<Uuid> = frontier.iter().filter(|e| e.completes).map(|e| e.task.id).collect();
        let parents: Vec<(Uuid, &'static str)> =
            frontier.iter().filter(|e| e.has_dependents).map(|e| (e.task.id, e.task.state.as_str())).collect();
        for run in frontier.iter().filter_map(|e| e.task.run_id) {
            *runs.entry(run).or_default() += 1;
        }
        out.finalized.extend(frontier.drain(..).map(|e| e.task));
        if !completers.is_empty() {
            let (decided, loops) = complete_waiting(tx, &completers).await?;
            frontier.extend(decided);
            out.released.extend(next_iterations(tx, &loops.iter().collect::<Vec<_>>()).await?);
        }
        if !parents.is_empty() {
            let (released, cancelled) = move_dependents(tx, &parents).await?;
            out.released.extend(released);
            frontier.extend(cancelled);
        }
    }
    let ended = count_down_runs(tx, &runs).await?;
    out.runs_ended = finish_runs(tx, &ended).await?;
    Ok(out)
}

/// Waiting tasks completed by tasks of `ids` take their completer's state, result and error.
/// Returns those now final, and the loop iterations whose join just succeeded without their
/// loop's predicate holding: they go on to their next iteration instead.
async fn complete_waiting(
    tx: &mut sqlx::PgConnection,
    ids: &[Uuid],
) -> Result<(Vec<Ended>, Vec<ChangedRow>), StoreError> {
    let rows: Vec<CompletedTask> = sqlx::query_as(
        "UPDATE tasks w SET state = f.state, result = f.result, error = f.error, finished_at = now(),
                updated_at = now(), run_at = NULL
         FROM (SELECT completes, state, result, error, node, iteration FROM tasks
               WHERE id = ANY($1) AND completes IS NOT NULL OFFSET 0) f
         WHERE w.id = ANY(ARRAY(SELECT completes FROM tasks WHERE id = ANY($1) AND completes IS NOT NULL))
           AND w.id = f.completes AND w.state = 'waiting'
         RETURNING w.id, w.queue, w.priority, w.state, w.run_id, w.iteration, w.loop_spec, w.spawn_depth,
                   w.has_dependents, w.completes, w.result,
                   (f.iteration > 0 AND f.node IS NOT DISTINCT FROM w.node) AS chained",
    )
    .bind(ids)
    .fetch_all(tx)
    .await?;
    let (mut finals, mut loops) = (Vec::new(), Vec::new());
    for c in rows {
        let state = TaskState::parse(&c.row.state);
        if state == Some(TaskState::Succeeded) && !c.chained && c.row.loops_again(c.result.as_ref()) {
            loops.push(c.row);
        } else if let Some(state) = state.filter(|s| s.is_final()) {
            finals.push(c.row.ended(state));
        }
    }
    Ok((finals, loops))
}

/// Counts down the pending dependents of the `ended` parents (ids with the final states they
/// just took, passed in so that no parent row is read again): a dependent
/// with a `fail` edge from a parent that did not succeed is cancelled at once; one whose
/// count reaches zero is released. Rows are locked in id order first, so concurrent
/// transactions cannot deadlock on them.
async fn move_dependents(
    tx: &mut sqlx::PgConnection,
    ended: &[(Uuid, &str)],
) -> Result<(Vec<Redispatch>, Vec<Ended>), StoreError> {
    let parents: Vec<Uuid> = ended.iter().map(|e| e.0).collect();
    let states: Vec<&str> = ended.iter().map(|e| e.1).collect();
    let locked: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM tasks
         WHERE id = ANY(ARRAY(SELECT task_id FROM task_dependencies WHERE depends_on = ANY($1)))
           AND state = 'pending'
         ORDER BY id FOR UPDATE",
    )
    .bind(&parents)
    .fetch_all(&mut *tx)
    .await?;
    if locked.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    const SQL: &str = concat!(
        "WITH hits AS (
             SELECT d.task_id, count(*)::int4 AS n,
                    bool_or(d.on_failure = 'fail' AND p.state <> 'succeeded') AS doomed,
                    min(p.id::text) FILTER (WHERE d.on_failure = 'fail' AND p.state <> 'succeeded') AS culprit
             FROM UNNEST($1::uuid[], $3::text[]) AS p(id, state)
             JOIN task_dependencies d ON d.depends_on = p.id
             WHERE d.task_id = ANY($2)
             GROUP BY d.task_id
         )
         UPDATE tasks t SET
             waiting_on = t.waiting_on - h.n,
             state = CASE WHEN h.doomed THEN 'cancelled' WHEN t.waiting_on - h.n <= 0 THEN 'queued' ELSE 'pending' END,
             error = CASE WHEN h.doomed THEN jsonb_build_object('code', 'dependency_failed', 'message',
                              'dependency ' || h.culprit || ' did not succeed', 'retryable', false)
                          ELSE t.error END,
             finished_at = CASE WHEN h.doomed THEN now() END,
             dispatched_at = CASE WHEN NOT h.doomed AND t.waiting_on - h.n <= 0 THEN now() ELSE t.dispatched_at END,
             -- A bare countdown leaves every indexed column alone, so Postgres can update the
             -- row in place (HOT) instead of adding index entries for each parent that ends.
             updated_at = CASE WHEN h.doomed OR t.waiting_on - h.n <= 0 THEN now() ELSE t.updated_at END
         FROM hits h
         WHERE t.id = ANY($2) AND t.id = h.task_id AND t.state = 'pending'
         RETURNING t.state AS new_state, t.has_dependents AS moved_has_dependents,
                   t.completes IS NOT NULL AS moved_completes, ",
        redispatch_columns!()
    );
    let ids: Vec<Uuid> = locked.into_iter().map(|(id,)| id).collect();
    let rows: Vec<MovedDependent> =
        sqlx::query_as(SQL).bind(&parents).bind(&ids).bind(&states).fetch_all(&mut *tx).await?;
    let (mut released, mut cancelled) = (Vec::new(), Vec::new());
    for r in rows {
        let task = Redispatch::from(r.row);
        match r.new_state.as_str() {
            "queued" => released.push(task),
            "cancelled" => cancelled.push(Ended {
                task: Finalized {
                    id: task.envelope.id,
                    queue: task.envelope.queue,
                    state: TaskState::Cancelled,
                    run_id: task.envelope.run_id,
                },
                has_dependents: r.moved_has_dependents,
                completes: r.moved_completes,
            }),
            _ => {}
        }
    }
    Ok((released, cancelled))
}

/// Takes each run's newly final tasks off its `remaining`; returns the runs now at zero.
async fn count_down_runs(tx: &mut sqlx::PgConnection, runs: &HashMap<Uuid, i32>) -> Result<Vec<Uuid>, StoreError> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let mut counts: Vec<(Uuid, i32)> = runs.iter().map(|(k, v)| (*k, *v)).collect();
    counts.sort();
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(
        "UPDATE runs r SET remaining = r.remaining - u.n, updated_at = now()
         FROM UNNEST($1::uuid[], $2::int4[]) AS u(id, n)
         WHERE r.id = u.id AND r.state = 'running'
         RETURNING r.id, r.remaining",
    )
    .bind(column(&counts, |c| c.0))
    .bind(column(&counts, |c| c.1))
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().filter(|(_, left)| *left <= 0).map(|(id, _)| id).collect())
}

/// Ends runs whose every task is final: `failed` when a task failed, died or was cancelled and
/// no dependent took that with `continue`, else `succeeded`, with each final node's result
/// by name as output. (A join's or loop iteration's failure counts through the task it
/// completes.)
pub(crate) async fn finish_runs(
    tx: &mut sqlx::PgConnection,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, RunState)>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "UPDATE runs r SET
             state = CASE WHEN f.failed IS NULL THEN 'succeeded' ELSE 'failed' END,
             error = f.failed,
             output = (SELECT jsonb_object_agg(t.node, t.result) FROM tasks t
                       WHERE t.run_id = r.id AND t.spawned_by IS NULL AND t.completes IS NULL
                         AND NOT t.has_dependents AND t.node IS NOT NULL AND t.state = 'succeeded'),
             finished_at = now(), updated_at = now()
         FROM (SELECT r2.id,
                      (SELECT jsonb_build_object('code', 'step_failed', 'retryable', false, 'message',
                                  format('step %s (%s) ended %s: %s', coalesce(t.node, '?'), t.id, t.state,
                                         coalesce(t.error->>'message', '')))
                       FROM tasks t
                       WHERE t.run_id = r2.id AND t.state IN ('failed', 'dead', 'cancelled') AND t.completes IS NULL
                         AND NOT EXISTS (SELECT 1 FROM task_dependencies d
                                         WHERE d.depends_on = t.id AND d.on_failure = 'continue')
                       ORDER BY t.finished_at, t.id LIMIT 1) AS failed
               FROM runs r2 WHERE r2.id = ANY($1)) f
         WHERE r.id = f.id AND r.state = 'running' AND r.remaining <= 0
         RETURNING r.id, r.state",
    )
    .bind(ids)
    .fetch_all(tx)
    .await?;
    Ok(rows.into_iter().filter_map(|(id, s)| Some((id, RunState::parse(&s)?))).collect())
}
