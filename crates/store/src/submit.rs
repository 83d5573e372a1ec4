//! Writing submitted tasks.

use crate::{Store, StoreError, column};
use std::collections::{HashMap, HashSet};
use taskfleet_proto::{RejectReason, TaskEnvelope, TaskId, TaskState};
use uuid::Uuid;

/// What became of a batch of submissions.
#[derive(Debug, Default)]
pub struct InsertOutcome {
    /// Tasks newly written.
    pub inserted: Vec<TaskId>,
    /// Tasks (new, or redelivered submissions whose rows are still queued) that must now be
    /// dispatched, by index into the submitted slice.
    pub dispatch: Vec<usize>,
    /// Submissions that matched an existing task (same id, or same idempotency key).
    pub duplicates: Vec<Duplicate>,
    /// Submissions refused: a dependency does not exist, or Postgres refused the row.
    pub rejected: Vec<Rejected>,
    /// Tasks written straight into `cancelled` because a dependency had already failed.
    pub cancelled: Vec<TaskId>,
}

/// A submission that matched an existing task.
#[derive(Debug, Clone)]
pub struct Duplicate {
    /// Index into the submitted slice.
    pub index: usize,
    /// The existing task's id (differs from the submitted id for an idempotency-key match).
    pub existing: TaskId,
}

/// A submission refused by the store.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Index into the submitted slice.
    pub index: usize,
    /// Reason code.
    pub reason: RejectReason,
    /// Human-readable explanation.
    pub message: String,
}

impl InsertOutcome {
    /// Adds the outcome of the sub-batch starting at index `offset`.
    fn append(&mut self, part: InsertOutcome, offset: usize) {
        self.inserted.extend(part.inserted);
        self.dispatch.extend(part.dispatch.into_iter().map(|i| i + offset));
        self.duplicates.extend(part.duplicates.into_iter().map(|d| Duplicate { index: d.index + offset, ..d }));
        self.rejected.extend(part.rejected.into_iter().map(|r| Rejected { index: r.index + offset, ..r }));
        self.cancelled.extend(part.cancelled);
    }
}

impl Store {
    /// Writes a batch of validated envelopes in one transaction.
    ///
    /// Dependency-free tasks are written as `queued` and listed in `dispatch`: the caller
    /// publishes them after this returns (the write commits first, so a dispatched task always
    /// has its row). Tasks with dependencies are `pending`, or `queued` when every dependency
    /// already succeeded, or `cancelled` when one already ended otherwise. A dependency must be
    /// an existing task or come earlier in the same batch.
    ///
    /// Every submission counts as fresh: see [`Store::insert_submissions`].
    pub async fn insert_tasks(&self, tasks: &[TaskEnvelope]) -> Result<InsertOutcome, StoreError> {
        self.insert_submissions(tasks, &[]).await
    }

    /// [`Store::insert_tasks`], where `redelivered[i]` says that `tasks[i]` is a redelivery of a
    /// submission already handled once (JetStream's delivery count above 1; missing entries
    /// count as fresh). A redelivered submission whose row is still `queued` is dispatched again
    /// (the coordinator may have stopped between commit and dispatch; the dispatch dedup id
    /// makes a second copy harmless), while a fresh duplicate from a client never is: that would
    /// put a second live dispatch message in JetStream once the first one's dedup window passed.
    ///
    /// Poison isolation: when Postgres refuses a row ([`StoreError::is_data_error`], e.g. a
    /// value validation did not catch), the batch is split in halves, recursively, until the
    /// refused submissions are alone; each is listed in `rejected` with
    /// [`RejectReason::Unstorable`] and the database's words, and every other one is written
    /// (in submission order, so dependencies still come first). Any other error is returned:
    /// Postgres is unavailable, and the caller retries the whole batch later (parts already
    /// written are then recognised as redelivered duplicates).
    pub async fn insert_submissions(
        &self,
        tasks: &[TaskEnvelope],
        redelivered: &[bool],
    ) -> Result<InsertOutcome, StoreError> {
        let mut out = InsertOutcome::default();
        // Ranges still to write, the next one on top.
        let mut todo = vec![(0, tasks.len())];
        while let Some((start, end)) = todo.pop() {
            let again: Vec<bool> = (start..end).map(|i| redelivered.get(i).copied().unwrap_or(false)).collect();
            match self.insert_batch(&tasks[start..end], &again).await {
                Ok(part) => out.append(part, start),
                Err(e) if e.is_data_error() && end - start > 1 => {
                    let mid = start + (end - start) / 2;
                    todo.push((mid, end));
                    todo.push((start, mid));
                }
                Err(e) if e.is_data_error() => {
                    tracing::warn!(task_id = %tasks[start].id, error = %e, "Postgres refused a submission");
                    out.rejected.push(Rejected {
                        index: start,
                        reason: RejectReason::Unstorable,
                        message: format!("Postgres refused to store the task: {}", e.database_words()),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn insert_batch(&self, tasks: &[TaskEnvelope], redelivered: &[bool]) -> Result<InsertOutcome, StoreError> {
        let mut out = InsertOutcome::default();
        let mut tx = self.pool.begin().await?;

        let dep_state = lock_dependency_states(&mut tx, tasks).await?;
        let initial = initial_states(tasks, &dep_state, &mut out.rejected);
        let accepted: Vec<usize> = (0..tasks.len()).filter(|i| initial[*i].is_some()).collect();
        if accepted.is_empty() {
            tx.commit().await?;
            return Ok(out);
        }
        // The initial state of task `i`, and the error recorded when it starts cancelled.
        let state_of = |i: usize| initial[i].as_ref().map_or(TaskState::Queued, |r| r.state);
        let error_of = |i: usize| {
            let message = initial[i].as_ref().and_then(|r| r.error.as_ref())?;
            Some(serde_json::json!({"code": "dependency_failed", "message": message, "retryable": false}))
        };
        let inserted: Vec<(Uuid,)> = sqlx::query_as(
            "INSERT INTO tasks (id, queue, kind, priority, state, payload, max_attempts, timeout_ms,
                                idempotency_key, created_at, error, options, dispatched_at, finished_at, waiting_on)
             SELECT u.id, u.queue, u.kind, u.priority, u.state, u.payload, u.max_attempts, u.timeout_ms,
                    u.key, to_timestamp(u.created_ms / 1000.0), u.error, u.options,
                    CASE WHEN u.state = 'queued' THEN now() END,
                    CASE WHEN u.state = 'cancelled' THEN now() END, u.waiting_on
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                         $7::int4[], $8::int8[], $9::text[], $10::int8[], $11::jsonb[], $12::jsonb[], $13::int4[])
                  AS u(id, queue, kind, priority, state, payload, max_attempts, timeout_ms, key, created_ms, error, options,
                       waiting_on)
             ON CONFLICT DO NOTHING
             RETURNING id",
        )
        .bind(column(&accepted, |&i| tasks[i].id))
        .bind(column(&accepted, |&i| tasks[i].queue.as_str()))
        .bind(column(&accepted, |&i| tasks[i].kind.as_str()))
        .bind(column(&accepted, |&i| tasks[i].priority.as_str()))
        .bind(column(&accepted, |&i| state_of(i).as_str()))
        .bind(column(&accepted, |&i| &tasks[i].payload))
        .bind(column(&accepted, |&i| tasks[i].max_attempts as i32))
        .bind(column(&accepted, |&i| tasks[i].timeout_ms as i64))
        .bind(column(&accepted, |&i| tasks[i].idempotency_key.as_deref()))
        .bind(column(&accepted, |&i| tasks[i].created_at as i64))
        .bind(column(&accepted, |&i| error_of(i)))
        .bind(column(&accepted, |&i| tasks[i].options_json()))
        .bind(column(&accepted, |&i| initial[i].as_ref().map_or(0, |r| r.waiting_on)))
        .fetch_all(&mut *tx)
        .await?;
        let inserted: HashSet<Uuid> = inserted.into_iter().map(|(id,)| id).collect();
        // Submissions that wrote a row: the first of each id (a second copy of the same id in
        // this batch is a duplicate of it, not a second new task).
        let mut first_seen: HashSet<Uuid> = HashSet::new();
        let wrote: HashSet<usize> = accepted
            .iter()
            .copied()
            .filter(|i| inserted.contains(&tasks[*i].id) && first_seen.insert(tasks[*i].id))
            .collect();

        // Submissions that wrote nothing matched an existing row, by id (a redelivered
        // submission) or by idempotency key.
        let missing: Vec<usize> = accepted.iter().copied().filter(|i| !wrote.contains(i)).collect();
        if !missing.is_empty() {
            let miss_ids: Vec<Uuid> = missing.iter().map(|i| tasks[*i].id).collect();
            let miss_keys: Vec<String> = missing.iter().filter_map(|i| tasks[*i].idempotency_key.clone()).collect();
            let rows: Vec<(Uuid, Option<String>, String)> = sqlx::query_as(
                "SELECT id, idempotency_key, state FROM tasks WHERE id = ANY($1) OR idempotency_key = ANY($2)",
            )
            .bind(&miss_ids)
            .bind(&miss_keys)
            .fetch_all(&mut *tx)
            .await?;
            let by_id: HashMap<Uuid, &str> = rows.iter().map(|(id, _, s)| (*id, s.as_str())).collect();
            let by_key: HashMap<&str, Uuid> =
                rows.iter().filter_map(|(id, k, _)| k.as_deref().map(|k| (k, *id))).collect();
            let mut again: Vec<usize> = Vec::new();
            for i in missing {
                let t = &tasks[i];
                if let Some(state) = by_id.get(&t.id) {
                    // The same submission redelivered (e.g. after a crash between commit and
                    // dispatch): dispatch it again if it never got further than queued.
                    if *state == TaskState::Queued.as_str() && redelivered.get(i).copied().unwrap_or(false) {
                        again.push(i);
                    }
                    out.duplicates.push(Duplicate { index: i, existing: t.id });
                } else if let Some(existing) = t.idempotency_key.as_deref().and_then(|k| by_key.get(k)) {
                    out.duplicates.push(Duplicate { index: i, existing: *existing });
                } else {
                    // Conflicted with a row of this very batch sharing its idempotency key.
                    let first = wrote
                        .iter()
                        .map(|j| &tasks[*j])
                        .find(|o| o.idempotency_key.is_some() && o.idempotency_key == t.idempotency_key)
                        .map(|o| o.id)
                        .unwrap_or(t.id);
                    out.duplicates.push(Duplicate { index: i, existing: first });
                }
            }
            out.dispatch.extend(redispatch_first(&mut tx, tasks, again).await?);
        }

        let new_tasks = accepted.iter().filter(|i| wrote.contains(i)).map(|i| &tasks[*i]);
        insert_dependencies(&mut tx, new_tasks).await?;
        tx.commit().await?;

        for &i in &accepted {
            let t = &tasks[i];
            if !wrote.contains(&i) {
                continue;
            }
            out.inserted.push(t.id);
            match initial[i].as_ref().map(|r| r.state) {
                Some(TaskState::Queued) => out.dispatch.push(i),
                Some(TaskState::Cancelled) => out.cancelled.push(t.id),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The states of the tasks outside the batch that `tasks` depend on, locked FOR SHARE: a
/// concurrent commit of a dependency's final state waits for this transaction, and then sees
/// the new dependency rows when it releases dependents. Without the lock a dependent could stay
/// pending forever.
async fn lock_dependency_states(
    tx: &mut sqlx::PgConnection,
    tasks: &[TaskEnvelope],
) -> Result<HashMap<Uuid, String>, StoreError> {
    let batch_ids: HashSet<Uuid> = tasks.iter().map(|t| t.id).collect();
    let external: Vec<Uuid> = tasks
        .iter()
        .flat_map(|t| t.depends_on.iter().copied())
        .filter(|d| !batch_ids.contains(d))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if external.is_empty() {
        return Ok(HashMap::new());
    }
    // A run's tasks are not dependencies for tasks outside it (a run ends and is resumed as a
    // whole): they read as unknown.
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, state FROM tasks WHERE id = ANY($1) AND run_id IS NULL ORDER BY id FOR SHARE")
            .bind(&external)
            .fetch_all(tx)
            .await?;
    Ok(rows.into_iter().collect())
}

/// A submitted task's initial row: its state, the error recorded when it starts
/// `cancelled`, and how many of its parents are not final yet.
#[derive(Debug, Clone, PartialEq)]
struct Initial {
    state: TaskState,
    error: Option<String>,
    waiting_on: i32,
}

/// Each task's initial row; `None` for the tasks refused into `rejected`: an unknown
/// dependency (one neither in `dep_state` nor earlier in the batch) or, transitively, a
/// refused dependency of this batch. A dependency that already ended other than succeeded
/// (or that starts cancelled in this batch) makes the task start `cancelled`.
fn initial_states(
    tasks: &[TaskEnvelope],
    dep_state: &HashMap<Uuid, String>,
    rejected: &mut Vec<Rejected>,
) -> Vec<Option<Initial>> {
    let mut in_batch: HashMap<Uuid, Option<TaskState>> = HashMap::new();
    let mut initial: Vec<Option<Initial>> = vec![None; tasks.len()];
    for (i, t) in tasks.iter().enumerate() {
        let mut row = Initial { state: TaskState::Queued, error: None, waiting_on: 0 };
        let mut refusal = None;
        for dep in &t.depends_on {
            let dep_now = match in_batch.get(dep) {
                Some(None) => {
                    refusal = Some(format!("dependency {dep} was refused"));
                    break;
                }
                Some(Some(s)) => Some(*s),
                None if tasks.iter().any(|o| o.id == *dep) => {
                    refusal = Some(format!("dependency {dep} must be submitted before its dependent"));
                    break;
                }
                None => dep_state.get(dep).and_then(|s| TaskState::parse(s)),
            };
            match dep_now {
                None => {
                    refusal = Some(format!("dependency {dep} does not exist"));
                    break;
                }
                Some(TaskState::Succeeded) => {}
                Some(s) if s.is_final() => {
                    if row.state != TaskState::Cancelled {
                        row.error = Some(format!("dependency {dep} ended {}", s.as_str()));
                    }
                    row.state = TaskState::Cancelled;
                }
                Some(_) => {
                    row.waiting_on += 1;
                    if row.state != TaskState::Cancelled {
                        row.state = TaskState::Pending;
                    }
                }
            }
        }
        match refusal {
            Some(message) => {
                rejected.push(Rejected { index: i, reason: RejectReason::UnknownDependency, message });
                in_batch.insert(t.id, None);
            }
            None => {
                in_batch.entry(t.id).or_insert(Some(row.state));
                initial[i] = Some(row);
            }
        }
    }
    initial
}

/// Writes the dependency edges of newly written tasks, and the flag that makes their
/// dependencies look for dependents when they finish.
async fn insert_dependencies<'a>(
    tx: &mut sqlx::PgConnection,
    new_tasks: impl Iterator<Item = &'a TaskEnvelope>,
) -> Result<(), StoreError> {
    let (mut edge_task, mut edge_dep, mut position) = (Vec::new(), Vec::new(), Vec::new());
    for t in new_tasks {
        for (i, d) in t.depends_on.iter().enumerate() {
            edge_task.push(t.id);
            edge_dep.push(*d);
            position.push(i as i32);
        }
    }
    if edge_task.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO task_dependencies (task_id, depends_on, position)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[]) ON CONFLICT DO NOTHING",
    )
    .bind(&edge_task)
    .bind(&edge_dep)
    .bind(&position)
    .execute(&mut *tx)
    .await?;
    let mut targets = edge_dep;
    targets.sort();
    targets.dedup();
    sqlx::query("UPDATE tasks SET has_dependents = true WHERE id = ANY($1) AND NOT has_dependents")
        .bind(&targets)
        .execute(tx)
        .await?;
    Ok(())
}

/// Of the redelivered submissions whose rows are still queued, those whose first dispatch is
/// still the only one (no rescue, retry or deferral dispatched a later generation since): their
/// `dispatched_at` is renewed under the row lock, so the rescuer does not take the same row for
/// lost while this dispatch is published again, and a claim that got there first wins.
async fn redispatch_first(
    tx: &mut sqlx::PgConnection,
    tasks: &[TaskEnvelope],
    candidates: Vec<usize>,
) -> Result<Vec<usize>, StoreError> {
    if candidates.is_empty() {
        return Ok(candidates);
    }
    let ids: Vec<Uuid> = candidates.iter().map(|i| tasks[*i].id).collect();
    let renewed: Vec<(Uuid,)> = sqlx::query_as(
        "UPDATE tasks SET dispatched_at = now(), updated_at = now()
         WHERE id = ANY($1) AND state = 'queued' AND dispatches = 1 AND run_at IS NULL
         RETURNING id",
    )
    .bind(&ids)
    .fetch_all(tx)
    .await?;
    let renewed: HashSet<Uuid> = renewed.into_iter().map(|(id,)| id).collect();
    Ok(candidates.into_iter().filter(|i| renewed.contains(&tasks[*i].id)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_states_follow_the_dependencies() {
        let failed = Uuid::now_v7();
        let task = |deps: &[Uuid]| {
            let mut t = TaskEnvelope::new("k", serde_json::Value::Null);
            t.depends_on = deps.to_vec();
            t
        };
        let a = task(&[]);
        let b = task(&[a.id]);
        let c = task(&[Uuid::now_v7()]);
        let d = task(&[c.id]);
        let e = task(&[failed]);
        let states = HashMap::from([(failed, "failed".to_string())]);
        let mut rejected = Vec::new();
        let initial = initial_states(&[a, b, c, d, e], &states, &mut rejected);
        let row = |state, error: Option<String>, waiting_on| Some(Initial { state, error, waiting_on });
        assert_eq!(initial[0], row(TaskState::Queued, None, 0));
        assert_eq!(initial[1], row(TaskState::Pending, None, 1));
        assert_eq!((initial[2].clone(), initial[3].clone()), (None, None));
        assert_eq!(initial[4], row(TaskState::Cancelled, Some(format!("dependency {failed} ended failed")), 0));
        let refused: Vec<(usize, &str)> = rejected.iter().map(|r| (r.index, r.message.as_str())).collect();
        assert!(refused[0].0 == 2 && refused[0].1.ends_with("does not exist"), "{refused:?}");
        assert!(refused[1].0 == 3 && refused[1].1.ends_with("was refused"), "{refused:?}");
    }
}
