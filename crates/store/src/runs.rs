//! Runs, spawns and loops: inserting a run's or a spawn's tasks in one transaction, a loop's
//! next iteration, ending a run early (stop, cancel, timeout), resuming it, and reading it.

use crate::cascade::finish_runs;
use crate::rows::{ParentRow, Redispatch, RedispatchRow, attach_parents, redispatch_columns};
use crate::{Finalized, Store, StoreError, column};
use std::collections::{BTreeMap, HashMap, HashSet};
use taskfleet_proto::{
    LoopSpec, ParentOutcome, PlannedTask, RunGetRequest, RunSpec, RunState, RunSummary, RunTaskView, RunTotals,
    RunView, Spawn, TaskErrorInfo, TaskState, plan_nodes,
};
use uuid::Uuid;

/// Limits on runs and spawns, and what the store needs to fill in a spawned task.
#[derive(Debug, Clone)]
pub struct WorkflowLimits {
    /// Tasks a run may ever have, spawned ones and loop iterations included.
    pub max_tasks_per_run: u32,
    /// Children one spawn may add.
    pub max_children_per_spawn: u32,
    /// How deep spawns may nest (a top-level task spawns at depth 1).
    pub max_spawn_depth: u32,
    /// Largest payload of a spawned task, bytes of JSON.
    pub max_payload_bytes: usize,
    /// Parents' outcomes travel with a dispatch up to this many bytes; beyond it the step
    /// reads them with `task.parents`.
    pub inline_parents_bytes: usize,
    /// Attempts of a task that names none.
    pub default_max_attempts: u32,
    /// Attempts by kind, for tasks that name none.
    pub kind_max_attempts: BTreeMap<String, u32>,
}

impl Default for WorkflowLimits {
    fn default() -> Self {
        WorkflowLimits {
            max_tasks_per_run: 100_000,
            max_children_per_spawn: 10_000,
            max_spawn_depth: 8,
            max_payload_bytes: 1 << 20,
            inline_parents_bytes: 256 << 10,
            default_max_attempts: taskfleet_proto::DEFAULT_MAX_ATTEMPTS,
            kind_max_attempts: BTreeMap::new(),
        }
    }
}

impl WorkflowLimits {
    /// The attempt limit of a task that names `max_attempts` (0: none).
    fn attempts(&self, kind: &str, max_attempts: u32) -> u32 {
        if max_attempts > 0 {
            return max_attempts;
        }
        self.kind_max_attempts.get(kind).copied().unwrap_or(self.default_max_attempts)
    }
}

/// What `insert_run` did.
#[derive(Debug)]
pub struct RunInserted {
    /// Each top-level node's task.
    pub tasks: BTreeMap<String, Uuid>,
    /// The run existed already; nothing was written.
    pub duplicate: bool,
    /// Tasks without parents, to dispatch now.
    pub ready: Vec<Redispatch>,
}

/// Where planned tasks go.
struct Placement<'a> {
    run_id: Option<Uuid>,
    spawned_by: Option<Uuid>,
    spawn_depth: i32,
    traceparent: Option<&'a str>,
    /// A join's task id and the spawner it completes.
    completes: Option<(Uuid, Uuid)>,
}

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

/// A row of `tasks` that a recorded event changed, with what spawns and loops need.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ChangedRow {
    pub id: Uuid,
    pub queue: String,
    pub priority: String,
    pub state: String,
    pub run_id: Option<Uuid>,
    pub iteration: i32,
    pub loop_spec: Option<serde_json::Value>,
    pub spawn_depth: i32,
}

impl ChangedRow {
    /// True when this succeeded iteration of a loop is not its last.
    pub fn loops_again(&self, result: Option<&serde_json::Value>) -> bool {
        let Some(spec) = self.loop_spec.as_ref().and_then(|l| serde_json::from_value::<LoopSpec>(l.clone()).ok())
        else {
            return false;
        };
        !spec.done(self.iteration.max(1) as u32, result.unwrap_or(&serde_json::Value::Null))
    }
}

/// Writes planned tasks (parents first) and their edges. Tasks without parents start
/// `queued` and are returned for dispatch; the others wait `pending` for all their parents.
async fn insert_planned(
    tx: &mut sqlx::PgConnection,
    planned: &[PlannedTask],
    place: &Placement<'_>,
    limits: &WorkflowLimits,
) -> Result<Vec<Redispatch>, StoreError> {
    let parents: HashSet<Uuid> = planned.iter().flat_map(|p| p.envelope.depends_on.iter().copied()).collect();
    let completes = |id: Uuid| place.completes.filter(|(join, _)| *join == id).map(|(_, spawner)| spawner);
    sqlx::query(
        "INSERT INTO tasks (id, queue, kind, priority, state, payload, max_attempts, timeout_ms, created_at, options,
                            dispatched_at, run_id, node, waiting_on, completes, spawned_by, spawn_depth, iteration,
                            loop_spec, traceparent, has_dependents)
         SELECT u.id, u.queue, u.kind, u.priority, CASE WHEN u.waiting_on = 0 THEN 'queued' ELSE 'pending' END,
                u.payload, u.max_attempts, u.timeout_ms, now(), u.options,
                CASE WHEN u.waiting_on = 0 THEN now() END, $13, u.node, u.waiting_on, u.completes, $14, $15,
                u.iteration, u.loop_spec, $16, u.has_dependents
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int4[], $7::int8[], $8::jsonb[],
                     $9::text[], $10::int4[], $11::uuid[], $12::int4[], $17::jsonb[], $18::bool[])
              AS u(id, queue, kind, priority, payload, max_attempts, timeout_ms, options, node, waiting_on, completes,
                   iteration, loop_spec, has_dependents)",
    )
    .bind(column(planned, |p| p.envelope.id))
    .bind(column(planned, |p| p.envelope.queue.as_str()))
    .bind(column(planned, |p| p.envelope.kind.as_str()))
    .bind(column(planned, |p| p.envelope.priority.as_str()))
    .bind(column(planned, |p| &p.envelope.payload))
    .bind(column(planned, |p| limits.attempts(&p.envelope.kind, p.envelope.max_attempts) as i32))
    .bind(column(planned, |p| p.envelope.timeout_ms as i64))
    .bind(column(planned, |p| p.envelope.options_json()))
    .bind(column(planned, |p| p.node.as_str()))
    .bind(column(planned, |p| p.envelope.depends_on.len() as i32))
    .bind(column(planned, |p| completes(p.envelope.id)))
    .bind(column(planned, |p| p.envelope.iteration as i32))
    .bind(place.run_id)
    .bind(place.spawned_by)
    .bind(place.spawn_depth)
    .bind(place.traceparent)
    .bind(column(planned, |p| p.repeat.as_ref().and_then(|l| serde_json::to_value(l).ok())))
    .bind(column(planned, |p| parents.contains(&p.envelope.id)))
    .execute(&mut *tx)
    .await?;
    insert_edges(tx, planned).await?;
    Ok(planned
        .iter()
        .filter(|p| p.envelope.depends_on.is_empty())
        .map(|p| {
            let mut envelope = p.envelope.clone();
            envelope.run_id = place.run_id;
            envelope.max_attempts = limits.attempts(&envelope.kind, envelope.max_attempts);
            Redispatch {
                envelope,
                attempt_offset: 0,
                generation: 1,
                traceparent: place.traceparent.map(str::to_string),
                previous: None,
            }
        })
        .collect())
}

/// Writes the edges of planned tasks, in order, with their failure policies.
async fn insert_edges(tx: &mut sqlx::PgConnection, planned: &[PlannedTask]) -> Result<(), StoreError> {
    let edges: Vec<(Uuid, Uuid, i32, &str)> = planned
        .iter()
        .flat_map(|p| {
            p.envelope
                .depends_on
                .iter()
                .zip(&p.on_failure)
                .enumerate()
                .map(|(i, (d, f))| (p.envelope.id, *d, i as i32, f.as_str()))
        })
        .collect();
    if edges.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO task_dependencies (task_id, depends_on, position, on_failure)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::text[])",
    )
    .bind(column(&edges, |e| e.0))
    .bind(column(&edges, |e| e.1))
    .bind(column(&edges, |e| e.2))
    .bind(column(&edges, |e| e.3))
    .execute(tx)
    .await?;
    Ok(())
}

impl Store {
    /// Writes a run and all its tasks in one transaction; `planned` is
    /// [`taskfleet_proto::plan_nodes`] of its nodes. A run id that exists already writes
    /// nothing and answers its tasks.
    pub async fn insert_run(
        &self,
        spec: &RunSpec,
        planned: &[PlannedTask],
        traceparent: Option<&str>,
    ) -> Result<RunInserted, StoreError> {
        let mut tx = self.pool.begin().await?;
        let n = planned.len() as i32;
        let created: Option<(Uuid,)> = sqlx::query_as(
            "INSERT INTO runs (id, name, state, remaining, task_count, timeout_ms, deadline, traceparent)
             VALUES ($1, $2, 'running', $3, $3, $4, now() + make_interval(secs => $4 / 1000.0), $5)
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(spec.id)
        .bind(spec.name.as_deref())
        .bind(n)
        .bind(spec.timeout_ms.map(|t| t.min(i64::MAX as u64) as i64))
        .bind(traceparent)
        .fetch_optional(&mut *tx)
        .await?;
        if created.is_none() {
            let rows: Vec<(String, Uuid)> = sqlx::query_as(
                "SELECT node, id FROM tasks WHERE run_id = $1 AND spawned_by IS NULL AND completes IS NULL
                   AND node IS NOT NULL",
            )
            .bind(spec.id)
            .fetch_all(&mut *tx)
            .await?;
            return Ok(RunInserted { tasks: rows.into_iter().collect(), duplicate: true, ready: Vec::new() });
        }
        let place = Placement { run_id: Some(spec.id), spawned_by: None, spawn_depth: 0, traceparent, completes: None };
        let ready = insert_planned(&mut tx, planned, &place, &self.limits).await?;
        tx.commit().await?;
        Ok(RunInserted {
            tasks: planned.iter().map(|p| (p.node.clone(), p.envelope.id)).collect(),
            duplicate: false,
            ready,
        })
    }
}

/// Adds a spawn's children and join under `parent` (now `waiting`). `Ok(Err(why))` when the
/// spawn breaks a limit: nothing is written and the caller fails the parent.
pub(crate) async fn spawn_children(
    tx: &mut sqlx::PgConnection,
    parent: &ChangedRow,
    spawn: &Spawn,
    traceparent: Option<&str>,
    limits: &WorkflowLimits,
) -> Result<Result<Vec<Redispatch>, String>, StoreError> {
    if spawn.children.len() > limits.max_children_per_spawn as usize {
        return Ok(Err(format!(
            "{} children in one spawn, at most {} (workflows.max_children_per_spawn)",
            spawn.children.len(),
            limits.max_children_per_spawn
        )));
    }
    if parent.spawn_depth + 1 > limits.max_spawn_depth as i32 {
        return Ok(Err(format!(
            "spawns nest {} deep, at most {} (workflows.max_spawn_depth)",
            parent.spawn_depth + 1,
            limits.max_spawn_depth
        )));
    }
    let priority = parent.priority.parse().unwrap_or_default();
    let planned = match spawn.nodes().and_then(|n| plan_nodes(&n, &parent.queue, priority, limits.max_payload_bytes)) {
        Ok(p) => p,
        Err(e) => return Ok(Err(format!("invalid spawn: {e}"))),
    };
    let join_name = if spawn.join.name.is_empty() { "join" } else { spawn.join.name.as_str() };
    let Some(join) = planned.iter().find(|p| p.node == join_name).map(|p| p.envelope.id) else {
        return Ok(Err("invalid spawn: no join".into()));
    };
    if let Some(run) = parent.run_id {
        let n = planned.len() as i32;
        let count: Option<i32> = sqlx::query_scalar("SELECT task_count FROM runs WHERE id = $1 FOR UPDATE")
            .bind(run)
            .fetch_optional(&mut *tx)
            .await?;
        if count.unwrap_or(0) + n > limits.max_tasks_per_run as i32 {
            return Ok(Err(format!(
                "the spawn would give the run {} tasks, at most {} (workflows.max_tasks_per_run)",
                count.unwrap_or(0) + n,
                limits.max_tasks_per_run
            )));
        }
        sqlx::query("UPDATE runs SET task_count = task_count + $2, remaining = remaining + $2 WHERE id = $1")
            .bind(run)
            .bind(n)
            .execute(&mut *tx)
            .await?;
    }
    let place = Placement {
        run_id: parent.run_id,
        spawned_by: Some(parent.id),
        spawn_depth: parent.spawn_depth + 1,
        traceparent,
        completes: Some((join, parent.id)),
    };
    Ok(Ok(insert_planned(tx, &planned, &place, limits).await?))
}

/// Fails a task whose spawn was refused.
pub(crate) async fn refuse_spawn(
    tx: &mut sqlx::PgConnection,
    parent: &ChangedRow,
    why: &str,
) -> Result<Finalized, StoreError> {
    let error = TaskErrorInfo { code: "spawn_refused".into(), message: why.to_string(), retryable: false };
    sqlx::query("UPDATE tasks SET state = 'failed', error = $2, finished_at = now(), updated_at = now() WHERE id = $1")
        .bind(parent.id)
        .bind(serde_json::to_value(error).unwrap_or_default())
        .execute(tx)
        .await?;
    Ok(Finalized { id: parent.id, queue: parent.queue.clone(), state: TaskState::Failed, run_id: parent.run_id })
}

/// Starts the next iteration of each loop in `loops` (succeeded iterations whose predicate
/// does not hold yet): the iteration waits for its successor, a new task with the same node,
/// payload and parents, which is ready at once.
pub(crate) async fn next_iterations(
    tx: &mut sqlx::PgConnection,
    loops: &[&ChangedRow],
) -> Result<Vec<Redispatch>, StoreError> {
    if loops.is_empty() {
        return Ok(Vec::new());
    }
    let old: Vec<Uuid> = loops.iter().map(|l| l.id).collect();
    let new: Vec<Uuid> = loops.iter().map(|_| Uuid::now_v7()).collect();
    sqlx::query("UPDATE tasks SET state = 'waiting', finished_at = NULL, updated_at = now() WHERE id = ANY($1)")
        .bind(&old)
        .execute(&mut *tx)
        .await?;
    const SQL: &str = concat!(
        "INSERT INTO tasks AS t (id, queue, kind, priority, state, payload, max_attempts, timeout_ms, created_at,
                                 options, dispatched_at, run_id, node, waiting_on, completes, spawned_by, spawn_depth,
                                 iteration, loop_spec, traceparent)
         SELECT u.new_id, o.queue, o.kind, o.priority, 'queued', o.payload, o.max_attempts, o.timeout_ms, now(),
                o.options, now(), o.run_id, o.node, 0, o.id, o.spawned_by, o.spawn_depth, o.iteration + 1,
                o.loop_spec, o.traceparent
         FROM tasks o JOIN UNNEST($1::uuid[], $2::uuid[]) AS u(old_id, new_id) ON o.id = u.old_id
         RETURNING ",
        redispatch_columns!()
    );
    let rows: Vec<RedispatchRow> = sqlx::query_as(SQL).bind(&old).bind(&new).fetch_all(&mut *tx).await?;
    sqlx::query(
        "INSERT INTO task_dependencies (task_id, depends_on, position, on_failure)
         SELECT u.new_id, d.depends_on, d.position, d.on_failure
         FROM task_dependencies d JOIN UNNEST($1::uuid[], $2::uuid[]) AS u(old_id, new_id) ON d.task_id = u.old_id",
    )
    .bind(&old)
    .bind(&new)
    .execute(&mut *tx)
    .await?;
    let mut per_run: HashMap<Uuid, i32> = HashMap::new();
    for run in loops.iter().filter_map(|l| l.run_id) {
        *per_run.entry(run).or_default() += 1;
    }
    let mut per_run: Vec<(Uuid, i32)> = per_run.into_iter().collect();
    per_run.sort();
    sqlx::query(
        "UPDATE runs r SET task_count = r.task_count + u.n, remaining = r.remaining + u.n
         FROM UNNEST($1::uuid[], $2::int4[]) AS u(id, n) WHERE r.id = u.id",
    )
    .bind(column(&per_run, |r| r.0))
    .bind(column(&per_run, |r| r.1))
    .execute(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(Redispatch::from).collect())
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

/// A run's row as `run.get` shows it.
#[derive(sqlx::FromRow)]
struct RunRow {
    id: Uuid,
    name: Option<String>,
    state: String,
    created_ms: i64,
    finished_ms: Option<i64>,
    deadline_ms: Option<i64>,
    output: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
}

/// A task of a run as `run.get` shows it.
#[derive(sqlx::FromRow)]
struct RunTaskRow {
    id: Uuid,
    node: Option<String>,
    kind: String,
    state: String,
    attempt: i32,
    iteration: i32,
    depends_on: Vec<Uuid>,
    spawned_by: Option<Uuid>,
    completes: Option<Uuid>,
    duration_ms: Option<i64>,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_usd: f64,
    error: Option<serde_json::Value>,
}

fn error_of(v: Option<serde_json::Value>) -> Option<TaskErrorInfo> {
    v.and_then(|e| serde_json::from_value(e).ok())
}

impl From<RunTaskRow> for RunTaskView {
    fn from(r: RunTaskRow) -> Self {
        RunTaskView {
            id: r.id,
            node: r.node,
            kind: r.kind,
            state: TaskState::parse(&r.state).unwrap_or(TaskState::Failed),
            attempts: r.attempt.max(0) as u32,
            iteration: r.iteration.max(0) as u32,
            depends_on: r.depends_on,
            spawned_by: r.spawned_by,
            completes: r.completes,
            duration_ms: r.duration_ms.map(|d| d.max(0) as u64),
            started_at: r.started_ms.map(|d| d.max(0) as u64),
            finished_at: r.finished_ms.map(|d| d.max(0) as u64),
            prompt_tokens: r.prompt_tokens.max(0) as u64,
            completion_tokens: r.completion_tokens.max(0) as u64,
            cost_usd: r.cost_usd,
            error: error_of(r.error),
        }
    }
}

/// Most tasks `run.get` lists.
const MAX_LISTED: u32 = 5_000;

/// A run's row as `run.list` shows it.
#[derive(sqlx::FromRow)]
struct RunSummaryRow {
    id: Uuid,
    name: Option<String>,
    state: String,
    task_count: i32,
    remaining: i32,
    created_ms: i64,
    finished_ms: Option<i64>,
}

impl From<RunSummaryRow> for RunSummary {
    fn from(r: RunSummaryRow) -> Self {
        RunSummary {
            id: r.id,
            name: r.name,
            state: RunState::parse(&r.state).unwrap_or(RunState::Failed),
            tasks: r.task_count.max(0) as u32,
            remaining: r.remaining.max(0) as u32,
            created_at: r.created_ms.max(0) as u64,
            finished_at: r.finished_ms.map(|m| m.max(0) as u64),
        }
    }
}

impl Store {
    /// Runs, newest first: `limit` (at most 1000) of them, of `state` if given.
    pub async fn list_runs(&self, state: Option<RunState>, limit: u32) -> Result<Vec<RunSummary>, StoreError> {
        let rows: Vec<RunSummaryRow> = sqlx::query_as(
            "SELECT id, name, state, task_count, remaining,
                    (extract(epoch FROM created_at) * 1000)::int8 AS created_ms,
                    (extract(epoch FROM finished_at) * 1000)::int8 AS finished_ms
             FROM runs WHERE ($1::text IS NULL OR state = $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(state.map(RunState::as_str))
        .bind(limit.clamp(1, 1_000) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(RunSummary::from).collect())
    }

    /// A run with its first tasks and totals over all of them; `None` if there is no such run.
    pub async fn run_view(&self, r: &RunGetRequest) -> Result<Option<RunView>, StoreError> {
        let run: Option<RunRow> = sqlx::query_as(
            "SELECT id, name, state, (extract(epoch FROM created_at) * 1000)::int8 AS created_ms,
                    (extract(epoch FROM finished_at) * 1000)::int8 AS finished_ms,
                    (extract(epoch FROM deadline) * 1000)::int8 AS deadline_ms, output, error
             FROM runs WHERE id = $1",
        )
        .bind(r.id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(run) = run else { return Ok(None) };
        let limit = r.tasks.unwrap_or(1_000).min(MAX_LISTED) as i64;
        let tasks: Vec<RunTaskRow> = sqlx::query_as(
            "SELECT t.id, t.node, t.kind, t.state, t.attempt, t.iteration, t.spawned_by, t.completes, t.error,
                    (extract(epoch FROM (t.finished_at - t.started_at)) * 1000)::int8 AS duration_ms,
                    (extract(epoch FROM t.started_at) * 1000)::int8 AS started_ms,
                    (extract(epoch FROM t.finished_at) * 1000)::int8 AS finished_ms,
                    COALESCE(a.prompt, 0)::int8 AS prompt_tokens, COALESCE(a.completion, 0)::int8 AS completion_tokens,
                    COALESCE(a.cost, 0)::float8 AS cost_usd,
                    COALESCE((SELECT array_agg(d.depends_on ORDER BY d.position, d.depends_on)
                              FROM task_dependencies d WHERE d.task_id = t.id), '{}') AS depends_on
             FROM tasks t
             LEFT JOIN LATERAL (SELECT sum((usage->>'prompt_tokens')::int8) AS prompt,
                                       sum((usage->>'completion_tokens')::int8) AS completion,
                                       sum((usage->>'cost_usd')::float8) AS cost
                                FROM task_attempts WHERE task_id = t.id) a ON true
             WHERE t.run_id = $1 ORDER BY t.id LIMIT $2",
        )
        .bind(r.id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(RunView {
            id: run.id,
            name: run.name,
            state: RunState::parse(&run.state).unwrap_or(RunState::Failed),
            created_at: run.created_ms.max(0) as u64,
            finished_at: run.finished_ms.map(|m| m.max(0) as u64),
            deadline: run.deadline_ms.map(|m| m.max(0) as u64),
            output: run.output,
            error: error_of(run.error),
            totals: self.run_totals(r.id).await?,
            tasks: tasks.into_iter().map(RunTaskView::from).collect(),
        }))
    }

    /// Tokens, cost, attempts and time summed over a run, and its tasks by state.
    async fn run_totals(&self, run: Uuid) -> Result<RunTotals, StoreError> {
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM tasks WHERE run_id = $1 GROUP BY state")
                .bind(run)
                .fetch_all(&self.pool)
                .await?;
        let (attempts, prompt, completion, cost, busy): (i64, i64, i64, f64, i64) = sqlx::query_as(
            "SELECT count(*), COALESCE(sum((a.usage->>'prompt_tokens')::int8), 0)::int8,
                    COALESCE(sum((a.usage->>'completion_tokens')::int8), 0)::int8,
                    COALESCE(sum((a.usage->>'cost_usd')::float8), 0)::float8,
                    COALESCE(sum(extract(epoch FROM (a.finished_at - a.started_at)) * 1000), 0)::int8
             FROM task_attempts a JOIN tasks t ON t.id = a.task_id WHERE t.run_id = $1",
        )
        .bind(run)
        .fetch_one(&self.pool)
        .await?;
        Ok(RunTotals {
            tasks: states.iter().map(|(_, n)| *n as u64).sum(),
            states: states.into_iter().map(|(s, n)| (s, n as u64)).collect(),
            attempts: attempts as u64,
            prompt_tokens: prompt as u64,
            completion_tokens: completion as u64,
            cost_usd: cost,
            busy_ms: busy.max(0) as u64,
        })
    }

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

    /// A step's parents' outcomes, `offset..offset + limit` in edge order, how many it has,
    /// and, for a loop iteration after the first, the previous iteration's outcome.
    pub async fn parents_page(
        &self,
        task: Uuid,
        offset: u32,
        limit: u32,
    ) -> Result<(Vec<ParentOutcome>, u32, Option<ParentOutcome>), StoreError> {
        let (total, previous): (i64, Option<Uuid>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM task_dependencies WHERE task_id = $1),
                    (SELECT completes FROM tasks WHERE id = $1 AND iteration > 1)",
        )
        .bind(task)
        .fetch_one(&self.pool)
        .await?;
        let rows: Vec<ParentRow> = sqlx::query_as(
            "SELECT d.task_id, p.id, p.node, p.state, p.result, p.error
             FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on
             WHERE d.task_id = $1 ORDER BY d.position, p.id OFFSET $2 LIMIT $3",
        )
        .bind(task)
        .bind(offset as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let previous: Option<ParentRow> = match previous {
            Some(id) => sqlx::query_as(
                "SELECT p.id AS task_id, p.id, p.node, 'succeeded' AS state, p.result, p.error FROM tasks p WHERE p.id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?,
            None => None,
        };
        Ok((rows.into_iter().map(ParentOutcome::from).collect(), total as u32, previous.map(ParentOutcome::from)))
    }

    /// Stores a task's checkpoint unless the task is final or was dispatched again after the
    /// saving attempt's `generation`; true when stored.
    pub async fn save_checkpoint(
        &self,
        task: Uuid,
        checkpoint: &serde_json::Value,
        generation: Option<u32>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE tasks SET checkpoint = $2
             WHERE id = $1 AND state NOT IN ('succeeded', 'failed', 'dead', 'cancelled')
               AND ($3::int4 IS NULL OR dispatches <= $3)",
        )
        .bind(task)
        .bind(checkpoint)
        .bind(generation.map(|g| g.min(i32::MAX as u32) as i32))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
