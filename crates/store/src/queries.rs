//! Reads for the API and the CLI.

use crate::{Store, StoreError};
use serde::{Deserialize, Serialize};
use taskfleet_proto::{ListRequest, TaskId};
use time::OffsetDateTime;

/// A task as stored, for status queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TaskRecord {
    /// Id.
    pub id: TaskId,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Priority name.
    pub priority: String,
    /// State name.
    pub state: String,
    /// Highest attempt seen.
    pub attempt: i32,
    /// Attempt limit.
    pub max_attempts: i32,
    /// Input (omitted from listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Output, when succeeded.
    pub result: Option<serde_json::Value>,
    /// Last error.
    pub error: Option<serde_json::Value>,
    /// Worker of the latest attempt.
    pub worker: Option<String>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Dispatch time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub dispatched_at: Option<OffsetDateTime>,
    /// Start of the latest attempt.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// Time the task became final.
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

macro_rules! columns {
    () => {
        "id, queue, kind, priority, state, attempt, max_attempts, result, error, worker,
         idempotency_key, created_at, dispatched_at, started_at, finished_at"
    };
}

impl Store {
    /// One task with its payload, if it exists.
    pub async fn get_task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        const SQL: &str = concat!("SELECT ", columns!(), ", payload FROM tasks WHERE id = $1");
        Ok(sqlx::query_as(SQL).bind(id).fetch_optional(&self.pool).await?)
    }

    /// Most recent tasks first (ids are UUIDv7, so id order is creation order).
    pub async fn list_tasks(&self, filter: &ListRequest) -> Result<Vec<TaskRecord>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            columns!(),
            ", NULL::jsonb AS payload FROM tasks
             WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR queue = $2)
             ORDER BY id DESC LIMIT $3"
        );
        Ok(sqlx::query_as(SQL)
            .bind(&filter.state)
            .bind(&filter.queue)
            .bind(filter.limit.unwrap_or(20).clamp(1, 1000))
            .fetch_all(&self.pool)
            .await?)
    }

    /// Number of tasks in each state (optionally of one queue).
    pub async fn count_by_state(&self, queue: Option<&str>) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT state, count(*) FROM tasks WHERE ($1::text IS NULL OR queue = $1) GROUP BY state ORDER BY state",
        )
        .bind(queue)
        .fetch_all(&self.pool)
        .await?)
    }
}
