//! What a running step asks of the store: its parents' outcomes, and storing a checkpoint.

use crate::rows::ParentRow;
use crate::{Store, StoreError};
use taskfleet_proto::ParentOutcome;
use uuid::Uuid;

impl Store {
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
