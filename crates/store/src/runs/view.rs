//! Reading runs: one run with its tasks and totals (`run.get`), recent runs (`run.list`), and
//! for the aggregator an ended run's summary and the runs running and created per name.

use crate::{Store, StoreError};
use taskfleet_proto::{RunGetRequest, RunState, RunSummary, RunTaskView, RunTotals, RunView, TaskErrorInfo, TaskState};
use uuid::Uuid;

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

/// An ended run as the aggregator counts it: [`Store::run_end_summary`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunEndSummary {
    /// The run.
    pub id: Uuid,
    /// Its name.
    pub name: Option<String>,
    /// Its state now (a run resumed since its end is `running` again).
    pub state: RunState,
    /// Creation, Unix epoch ms.
    pub created_at: u64,
    /// End, Unix epoch ms (`None` while running).
    pub finished_at: Option<u64>,
    /// Sums over its tasks and attempts, as `run.get` gives them.
    pub totals: RunTotals,
}

#[derive(sqlx::FromRow)]
struct RunEndRow {
    name: Option<String>,
    state: String,
    created_ms: i64,
    finished_ms: Option<i64>,
    states: Option<sqlx::types::Json<std::collections::BTreeMap<String, i64>>>,
    attempts: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_usd: f64,
    busy_ms: i64,
    saved_usd: f64,
}

impl Store {
    /// An ended run's name, state, times and totals in one query (what [`Store::run_view`]
    /// reads in four); `None` if there is no such run.
    pub async fn run_end_summary(&self, id: Uuid) -> Result<Option<RunEndSummary>, StoreError> {
        let row: Option<RunEndRow> = sqlx::query_as(
            "SELECT r.name, r.state, (extract(epoch FROM r.created_at) * 1000)::int8 AS created_ms,
                    (extract(epoch FROM r.finished_at) * 1000)::int8 AS finished_ms,
                    (SELECT jsonb_object_agg(s.state, s.n)
                     FROM (SELECT state, count(*) AS n FROM tasks WHERE run_id = r.id GROUP BY state) s) AS states,
                    a.attempts, a.prompt_tokens, a.completion_tokens, a.cost_usd, a.busy_ms, a.saved_usd
             FROM runs r
             CROSS JOIN LATERAL (
                 SELECT count(*)::int8 AS attempts,
                        COALESCE(sum((a.usage->>'prompt_tokens')::int8), 0)::int8 AS prompt_tokens,
                        COALESCE(sum((a.usage->>'completion_tokens')::int8), 0)::int8 AS completion_tokens,
                        COALESCE(sum((a.usage->>'cost_usd')::float8), 0)::float8 AS cost_usd,
                        COALESCE(sum(extract(epoch FROM (a.finished_at - a.started_at)) * 1000), 0)::int8 AS busy_ms,
                        COALESCE(sum((a.usage->>'saved_usd')::float8), 0)::float8 AS saved_usd
                 FROM task_attempts a JOIN tasks t ON t.id = a.task_id WHERE t.run_id = r.id) a
             WHERE r.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| {
            let states: std::collections::BTreeMap<String, u64> =
                r.states.map(|j| j.0).unwrap_or_default().into_iter().map(|(s, n)| (s, n.max(0) as u64)).collect();
            RunEndSummary {
                id,
                name: r.name,
                state: RunState::parse(&r.state).unwrap_or(RunState::Failed),
                created_at: r.created_ms.max(0) as u64,
                finished_at: r.finished_ms.map(|m| m.max(0) as u64),
                totals: RunTotals {
                    tasks: states.values().sum(),
                    states,
                    attempts: r.attempts.max(0) as u64,
                    prompt_tokens: r.prompt_tokens.max(0) as u64,
                    completion_tokens: r.completion_tokens.max(0) as u64,
                    cost_usd: r.cost_usd,
                    busy_ms: r.busy_ms.max(0) as u64,
                    saved_usd: r.saved_usd,
                },
            }
        }))
    }

    /// The runs in state `running` per name (`None`: unnamed), all of them in one grouped
    /// query: `SELECT name, count(*) FROM runs WHERE state = 'running' GROUP BY name`.
    pub async fn running_runs_by_name(&self) -> Result<Vec<(Option<String>, u64)>, StoreError> {
        let rows: Vec<(Option<String>, i64)> =
            sqlx::query_as("SELECT name, count(*) FROM runs WHERE state = 'running' GROUP BY name")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(name, n)| (name, n.max(0) as u64)).collect())
    }

    /// The runs created at or after `since_ms` (Unix epoch ms), whatever their state now, per
    /// name and `bucket_ms` bucket of creation: `(name, bucket start ms, runs)`.
    pub async fn runs_created_by_name(
        &self,
        since_ms: u64,
        bucket_ms: u64,
    ) -> Result<Vec<(Option<String>, u64, u64)>, StoreError> {
        let rows: Vec<(Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT name, b.ms - b.ms % $2 AS bucket, count(*)
             FROM runs CROSS JOIN LATERAL (SELECT (extract(epoch FROM created_at) * 1000)::int8 AS ms) b
             WHERE created_at >= to_timestamp($1::float8 / 1000) GROUP BY 1, 2",
        )
        .bind(since_ms as i64)
        .bind(bucket_ms.max(1) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(name, b, n)| (name, b.max(0) as u64, n.max(0) as u64)).collect())
    }

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
        let (attempts, prompt, completion, cost, busy, saved): (i64, i64, i64, f64, i64, f64) = sqlx::query_as(
            "SELECT count(*), COALESCE(sum((a.usage->>'prompt_tokens')::int8), 0)::int8,
                    COALESCE(sum((a.usage->>'completion_tokens')::int8), 0)::int8,
                    COALESCE(sum((a.usage->>'cost_usd')::float8), 0)::float8,
                    COALESCE(sum(extract(epoch FROM (a.finished_at - a.started_at)) * 1000), 0)::int8,
                    COALESCE(sum((a.usage->>'saved_usd')::float8), 0)::float8
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
            saved_usd: saved,
        })
    }
}
