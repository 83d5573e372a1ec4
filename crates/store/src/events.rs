//! Recording task events: attempts, state changes, and in the same transaction what they set
//! off: spawns, loops' next iterations, early stops, and the cascade of final states.

use crate::cascade::cascade;
use crate::rows::{Redispatch, attach_parents};
use crate::runs::{ChangedRow, end_run, next_iterations, refuse_spawn, spawn_children};
use crate::{Store, StoreError, column};
use std::collections::HashMap;
use taskfleet_proto::{EventKind, RunState, TaskEvent, TaskId, TaskState};
use uuid::Uuid;

/// A task that reached its final state in this commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    /// The task.
    pub id: TaskId,
    /// Its queue.
    pub queue: String,
    /// Its final state.
    pub state: TaskState,
    /// Its run, if it belongs to one.
    pub run_id: Option<Uuid>,
}

/// What a batch of events changed.
#[derive(Debug, Default)]
pub struct RecordOutcome {
    /// Tasks that reached a final state, including dependents cancelled because a dependency
    /// failed.
    pub finalized: Vec<Finalized>,
    /// Tasks to dispatch now: dependents whose parents are all final, spawned children
    /// without parents, loops' next iterations.
    pub released: Vec<Redispatch>,
    /// Tasks cancelled because their run ended early that a worker may hold: the caller
    /// announces them on the cancellation path.
    pub announce: Vec<TaskId>,
    /// Runs that ended.
    pub runs_ended: Vec<(Uuid, RunState)>,
    /// Events that changed nothing: duplicates, stale events, unknown tasks.
    pub ignored: usize,
    /// Events Postgres refused (see [`Store::record_events_isolating`]).
    pub unstorable: usize,
}

impl RecordOutcome {
    fn merge(&mut self, other: RecordOutcome) {
        self.finalized.extend(other.finalized);
        self.released.extend(other.released);
        self.announce.extend(other.announce);
        self.runs_ended.extend(other.runs_ended);
        self.ignored += other.ignored;
        self.unstorable += other.unstorable;
    }
}

fn ms_or_null(ms: u64) -> Option<i64> {
    (ms > 0).then_some(ms as i64)
}

impl Store {
    /// Records a batch of events in one transaction.
    ///
    /// Per task only the decisive event of the batch is applied: its first final event if it
    /// has one, else its latest. A final state is written only over a non-final one, so a task
    /// gets exactly one final state however often its events are delivered; non-final events
    /// of an older attempt than the recorded one are ignored.
    pub async fn record_events(&self, events: &[TaskEvent]) -> Result<RecordOutcome, StoreError> {
        let (decisive, superseded) = decisive_events(events);
        let mut out = RecordOutcome { ignored: superseded, ..Default::default() };
        if decisive.is_empty() {
            return Ok(out);
        }
        let mut tx = self.pool.begin().await?;
        insert_attempts(&mut tx, events).await?;
        let changed = update_states(&mut tx, &decisive).await?;
        out.ignored += decisive.len() - changed.len();
        let by_id: HashMap<Uuid, &TaskEvent> = decisive.iter().map(|ev| (ev.task_id, *ev)).collect();
        let mut frontier = Vec::new();
        let mut loops = Vec::new();
        let mut stops = Vec::new();
        for row in &changed {
            let (Some(state), Some(ev)) = (TaskState::parse(&row.state), by_id.get(&row.id)) else { continue };
            match state {
                TaskState::Waiting => {
                    let spawned = match ev.spawn.as_deref() {
                        Some(spawn) => {
                            spawn_children(&mut tx, row, spawn, ev.traceparent.as_deref(), &self.limits).await?
                        }
                        None => Err("a spawned event without its spawn".to_string()),
                    };
                    match spawned {
                        Ok(ready) => out.released.extend(ready),
                        Err(why) => frontier.push(refuse_spawn(&mut tx, row, &why).await?),
                    }
                }
                TaskState::Succeeded if row.loops_again(ev.result.as_ref()) => loops.push(row),
                s if s.is_final() => {
                    if ev.stop_run && s == TaskState::Succeeded && row.run_id.is_some() {
                        stops.push((row.run_id, ev.result.clone()));
                    }
                    frontier.push(row.ended(s));
                }
                _ => {}
            }
        }
        out.released.extend(next_iterations(&mut tx, &loops).await?);
        for (run, output) in stops.into_iter().filter_map(|(run, output)| Some((run?, output))) {
            if let Some(ended) = end_run(&mut tx, run, RunState::Succeeded, output.as_ref(), None).await? {
                out.finalized.extend(ended.finalized);
                out.announce.extend(ended.announce);
                out.runs_ended.push((run, RunState::Succeeded));
                out.released.retain(|r| r.envelope.run_id != Some(run));
            }
        }
        let cascade = cascade(&mut tx, frontier).await?;
        out.finalized.extend(cascade.finalized);
        out.released.extend(cascade.released);
        out.runs_ended.extend(cascade.runs_ended);
        attach_parents(&mut tx, &mut out.released, self.limits.inline_parents_bytes).await?;
        tx.commit().await?;
        Ok(out)
    }
}

/// The decisive event of each task (see [`Store::record_events`]), in the order the tasks
/// first appear, and the number of events they supersede.
fn decisive_events(events: &[TaskEvent]) -> (Vec<&TaskEvent>, usize) {
    let mut decisive: HashMap<Uuid, &TaskEvent> = HashMap::new();
    let mut order: Vec<Uuid> = Vec::new();
    let mut superseded = 0;
    for ev in events {
        if ev.kind == EventKind::Rejected || ev.kind.resulting_state().is_none() {
            continue;
        }
        match decisive.get(&ev.task_id) {
            None => {
                order.push(ev.task_id);
                decisive.insert(ev.task_id, ev);
            }
            // A late `started`/`progress` never replaces the end of its own attempt.
            Some(prev) if !prev.kind.is_final() && !hands_back_after(prev, ev) => {
                decisive.insert(ev.task_id, ev);
            }
            Some(_) => superseded += 1,
        }
    }
    (order.iter().map(|id| decisive[id]).collect(), superseded)
}

/// True for the events that end an attempt.
fn ends_attempt(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Succeeded
            | EventKind::Failed
            | EventKind::Retrying
            | EventKind::Dead
            | EventKind::Cancelled
            | EventKind::Spawned
    )
}

/// The event's error as stored in jsonb.
fn error_json(ev: &TaskEvent) -> Option<serde_json::Value> {
    ev.error.as_ref().and_then(|e| serde_json::to_value(e).ok())
}

/// Writes a `task_attempts` row for every event that ends an attempt (the first end of an
/// attempt wins).
async fn insert_attempts(tx: &mut sqlx::PgConnection, events: &[TaskEvent]) -> Result<(), StoreError> {
    let ended: Vec<&TaskEvent> = events.iter().filter(|ev| ends_attempt(ev.kind) && ev.attempt > 0).collect();
    if ended.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO task_attempts (task_id, attempt, outcome, worker, error, started_at, finished_at, usage)
         SELECT u.task_id, u.attempt, u.outcome, u.worker, u.error,
                to_timestamp(u.started_ms / 1000.0), to_timestamp(u.finished_ms / 1000.0), u.usage
         FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::jsonb[], $6::int8[], $7::int8[],
                     $8::jsonb[])
              AS u(task_id, attempt, outcome, worker, error, started_ms, finished_ms, usage)
         ON CONFLICT (task_id, attempt) DO NOTHING",
    )
    .bind(column(&ended, |ev| ev.task_id))
    .bind(column(&ended, |ev| ev.attempt as i32))
    .bind(column(&ended, |ev| ev.kind.as_str()))
    .bind(column(&ended, |ev| ev.worker.as_deref()))
    .bind(column(&ended, |ev| error_json(ev)))
    .bind(column(&ended, |ev| ev.timings.and_then(|t| ms_or_null(t.started_at))))
    .bind(column(&ended, |ev| ev.timings.and_then(|t| ms_or_null(t.finished_at)).or(Some(ev.at as i64))))
    .bind(column(&ended, |ev| usage_json(ev)))
    .execute(tx)
    .await?;
    Ok(())
}

/// The state a decisive event moves its task to.
fn state_after(ev: &TaskEvent) -> TaskState {
    ev.kind.resulting_state().unwrap_or(TaskState::Running)
}

/// A retry or a deferral: the coordinator dispatches the task again once it is due.
fn waits(ev: &TaskEvent) -> bool {
    matches!(ev.kind, EventKind::Retrying | EventKind::Deferred)
}

/// Applies the decisive events to their tasks; returns the rows that changed.
async fn update_states(tx: &mut sqlx::PgConnection, decisive: &[&TaskEvent]) -> Result<Vec<ChangedRow>, StoreError> {
    // A deferral (back to `queued`) is not an attempt, so it leaves `attempt` alone. An event
    // of an older dispatch generation than the task's (a duplicate, or a leftover of a
    // superseded message) changes nothing, unless it is a success (finished work is kept;
    // an old failure or cancellation must not end a task dispatched again, e.g. resumed), and neither does a late `started`
    // or `progress` once its generation handed the task back (a retry or deferral waits).
    Ok(sqlx::query_as(
        "UPDATE tasks t SET
             state = u.state,
             attempt = CASE WHEN u.state = 'queued' THEN t.attempt ELSE GREATEST(t.attempt, u.attempt) END,
             run_at = CASE WHEN u.delay_ms IS NULL THEN NULL
                           ELSE now() + make_interval(secs => u.delay_ms / 1000.0) END,
             next_traceparent = u.next_trace,
             worker = COALESCE(u.worker, t.worker),
             result = COALESCE(u.result, t.result),
             error = CASE WHEN u.state = 'succeeded' THEN NULL ELSE COALESCE(u.error, t.error) END,
             started_at = COALESCE(to_timestamp(u.started_ms / 1000.0), t.started_at),
             finished_at = to_timestamp(u.finished_ms / 1000.0),
             updated_at = now()
         FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::int4[], $5::text[], $6::jsonb[], $7::jsonb[],
                     $8::int8[], $9::int8[], $10::int8[], $11::text[], $12::int4[])
              AS u(id, state, final, attempt, worker, result, error, started_ms, finished_ms, delay_ms, next_trace,
                   gen)
         WHERE t.id = u.id
           AND t.state NOT IN ('succeeded', 'failed', 'dead', 'cancelled', 'waiting')
           AND ((u.final AND (u.state = 'succeeded' OR u.gen = 0 OR u.gen >= t.dispatches))
                OR ((u.gen = 0 OR u.gen >= t.dispatches) AND u.attempt >= t.attempt
                    AND NOT (u.state = 'running' AND t.run_at IS NOT NULL AND (u.gen = 0 OR u.gen <= t.dispatches))
                    AND NOT (u.state = 'running' AND t.state = 'retrying' AND u.attempt = t.attempt)))
         RETURNING t.id, t.queue, t.priority, t.state, t.run_id, t.iteration, t.loop_spec, t.spawn_depth,
                   t.has_dependents, t.completes",
    )
    .bind(column(decisive, |ev| ev.task_id))
    .bind(column(decisive, |ev| state_after(ev).as_str()))
    .bind(column(decisive, |ev| state_after(ev).is_final()))
    .bind(column(decisive, |ev| ev.attempt as i32))
    .bind(column(decisive, |ev| ev.worker.as_deref()))
    .bind(column(decisive, |ev| ev.result.as_ref()))
    .bind(column(decisive, |ev| error_json(ev)))
    .bind(column(decisive, |ev| ev.timings.and_then(|t| ms_or_null(t.started_at))))
    .bind(column(decisive, |ev| {
        state_after(ev).is_final().then(|| ev.timings.and_then(|t| ms_or_null(t.finished_at)).unwrap_or(ev.at as i64))
    }))
    .bind(column(decisive, |ev| waits(ev).then(|| ev.retry_in_ms.unwrap_or(1_000).min(i64::MAX as u64) as i64)))
    .bind(column(decisive, |ev| ev.next_traceparent.as_deref().filter(|_| waits(ev))))
    .bind(column(decisive, |ev| ev.generation.min(i32::MAX as u32) as i32))
    .fetch_all(tx)
    .await?)
}

impl Store {
    /// Records a batch like [`Store::record_events`], isolating events that Postgres refuses
    /// (a result holding a NUL character, a value beyond a limit): on a data error the batch
    /// is split in halves until each refused event stands alone. A refused event that ends an
    /// attempt is recorded instead as the task's `failed` final state with the code
    /// `result_unstorable` and the database's words; a refused `started` or `progress` is
    /// dropped. The rest of the batch is recorded as usual. An outage error is returned as is.
    pub async fn record_events_isolating(&self, events: &[TaskEvent]) -> Result<RecordOutcome, StoreError> {
        let mut out = RecordOutcome::default();
        // Slices still to record, as (start, end) into `events`, first half first.
        let mut todo = vec![(0, events.len())];
        while let Some((start, end)) = todo.pop() {
            let part = &events[start..end];
            match self.record_events_retrying(part).await {
                Ok(o) => out.merge(o),
                Err(e) if !e.is_data_error() => return Err(e),
                Err(e) if part.len() == 1 => {
                    out.unstorable += 1;
                    let Some(replacement) = unstorable_replacement(&part[0], &e) else { continue };
                    match self.record_events(std::slice::from_ref(&replacement)).await {
                        Ok(o) => out.merge(o),
                        Err(e2) if e2.is_data_error() => {
                            tracing::error!(task_id = %part[0].task_id, error = %e2, "cannot record even the failure of an unstorable event");
                        }
                        Err(e2) => return Err(e2),
                    }
                }
                Err(_) => {
                    let mid = start + part.len() / 2;
                    todo.push((mid, end));
                    todo.push((start, mid));
                }
            }
        }
        Ok(out)
    }
}

impl Store {
    /// [`Store::record_events`], tried again (up to three times) when Postgres rolled it back
    /// to break a deadlock with a concurrent transaction (another coordinator, a run's
    /// cancellation), so a batch is not handed back for so little.
    async fn record_events_retrying(&self, events: &[TaskEvent]) -> Result<RecordOutcome, StoreError> {
        let mut tries = 0;
        loop {
            match self.record_events(events).await {
                Err(e) if e.is_conflict() && tries < 3 => {
                    tries += 1;
                    tracing::debug!(error = %e, tries, "recording conflicted with another transaction; again");
                }
                other => return other,
            }
        }
    }
}

/// True when `later` is a `started`/`progress` that must not replace `earlier`, the event by
/// which the same attempt handed its task back (`retrying`, `deferred`).
fn hands_back_after(earlier: &TaskEvent, later: &TaskEvent) -> bool {
    matches!(earlier.kind, EventKind::Retrying | EventKind::Deferred | EventKind::Spawned)
        && matches!(later.kind, EventKind::Started | EventKind::Progress)
        && later.attempt <= earlier.attempt
}

/// What is recorded in place of an event Postgres refused: the end of its task as `failed`
/// (`result_unstorable`), when the event ended an attempt; nothing for `started`/`progress`.
fn unstorable_replacement(ev: &TaskEvent, err: &StoreError) -> Option<TaskEvent> {
    if !ends_attempt(ev.kind) {
        return None;
    }
    let mut r = TaskEvent::new(ev.task_id, EventKind::Failed, ev.queue.clone());
    r.task_kind = ev.task_kind.clone();
    r.priority = ev.priority;
    r.attempt = ev.attempt;
    r.worker = ev.worker.clone();
    r.timings = ev.timings;
    r.at = ev.at;
    r.error = Some(taskfleet_proto::TaskErrorInfo {
        code: "result_unstorable".into(),
        message: format!("the attempt's {} event could not be stored: {err}", ev.kind.as_str()),
        retryable: false,
    });
    Some(r)
}

/// The `usage` column of an attempt: cache hit, tokens and cost, when the event has any.
fn usage_json(ev: &TaskEvent) -> Option<serde_json::Value> {
    let mut o = serde_json::Map::new();
    if ev.cache_hit {
        o.insert("cache_hit".into(), true.into());
    }
    if let Some(t) = ev.tokens {
        o.insert("prompt_tokens".into(), t.prompt.into());
        o.insert("completion_tokens".into(), t.completion.into());
    }
    if let Some(c) = ev.cost_usd {
        o.insert("cost_usd".into(), c.into());
    }
    if let Some(s) = ev.saved_usd {
        o.insert("saved_usd".into(), s.into());
    }
    (!o.is_empty()).then_some(serde_json::Value::Object(o))
}
