//! Writing tasks into a run: a whole run at submission, a spawn's children and join, a loop's
//! next iteration; each with its edges, in the transaction that records what created them.

use super::WorkflowLimits;
use crate::cascade::Ended;
use crate::rows::{Redispatch, RedispatchRow, redispatch_columns};
use crate::{Finalized, Store, StoreError, column};
use std::collections::{BTreeMap, HashMap, HashSet};
use taskfleet_proto::{LoopSpec, PlannedTask, RunSpec, Spawn, TaskErrorInfo, TaskState, plan_nodes};
use uuid::Uuid;

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
    /// Other tasks depend on it.
    pub has_dependents: bool,
    /// It decides a waiting task (a join, a loop's later iteration).
    pub completes: Option<Uuid>,
}

impl ChangedRow {
    /// The row, now final in `state`, as the cascade takes it.
    pub fn ended(&self, state: TaskState) -> Ended {
        Ended {
            task: Finalized { id: self.id, queue: self.queue.clone(), state, run_id: self.run_id },
            has_dependents: self.has_dependents,
            completes: self.completes.is_some(),
        }
    }
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
) -> Result<Ended, StoreError> {
    let error = TaskErrorInfo { code: "spawn_refused".into(), message: why.to_string(), retryable: false };
    sqlx::query("UPDATE tasks SET state = 'failed', error = $2, finished_at = now(), updated_at = now() WHERE id = $1")
        .bind(parent.id)
        .bind(serde_json::to_value(error).unwrap_or_default())
        .execute(tx)
        .await?;
    Ok(parent.ended(TaskState::Failed))
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
