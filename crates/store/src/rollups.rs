//! The aggregator's history: appended per-minute rollups of task events.

use crate::{Store, StoreError, column};

/// What happened to one series (queue, kind, priority) in one minute, since the previous
/// rollup of that minute was written.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct Rollup {
    /// Start of the minute, Unix epoch milliseconds.
    pub minute_ms: i64,
    /// Queue.
    pub queue: String,
    /// Task kind.
    pub kind: String,
    /// Priority.
    pub priority: String,
    /// Final states reached.
    pub finals: i64,
    /// Of which succeeded.
    pub succeeded: i64,
    /// Of which failed.
    pub failed: i64,
    /// Of which dead.
    pub dead: i64,
    /// Of which cancelled.
    pub cancelled: i64,
    /// Attempts that will be retried.
    pub retries: i64,
    /// Attempts that ended.
    pub attempts: i64,
    /// Results served from the cache.
    pub cache_hits: i64,
    /// LLM prompt tokens.
    pub prompt_tokens: i64,
    /// LLM completion tokens.
    pub completion_tokens: i64,
    /// Spend, US dollars.
    pub cost_usd: f64,
    /// Spend avoided by cache hits, US dollars.
    pub saved_usd: f64,
    /// Serialized histogram of queue waits (ms).
    pub queue_wait: Option<Vec<u8>>,
    /// Serialized histogram of run times (ms).
    pub run: Option<Vec<u8>>,
    /// Serialized histogram of end-to-end latencies (ms).
    pub end_to_end: Option<Vec<u8>>,
}

const COLUMNS: &str =
    "(extract(epoch FROM minute) * 1000)::int8 AS minute_ms, queue, kind, priority, finals, succeeded, failed, dead,
     cancelled, retries, attempts, cache_hits, prompt_tokens, completion_tokens, cost_usd, saved_usd,
     queue_wait, run, end_to_end";

impl Store {
    /// Appends rollups in one statement.
    pub async fn insert_rollups(&self, rows: &[Rollup]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO metric_rollups (minute, queue, kind, priority, finals, succeeded, failed, dead, cancelled,
                 retries, attempts, cache_hits, prompt_tokens, completion_tokens, cost_usd, saved_usd,
                 queue_wait, run, end_to_end)
             SELECT to_timestamp(u.minute_ms / 1000.0), u.queue, u.kind, u.priority, u.finals, u.succeeded, u.failed,
                    u.dead, u.cancelled, u.retries, u.attempts, u.cache_hits, u.prompt_tokens, u.completion_tokens,
                    u.cost_usd, u.saved_usd, u.queue_wait, u.run, u.end_to_end
             FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[],
                         $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[],
                         $15::float8[], $16::float8[], $17::bytea[], $18::bytea[], $19::bytea[])
                  AS u(minute_ms, queue, kind, priority, finals, succeeded, failed, dead, cancelled, retries,
                       attempts, cache_hits, prompt_tokens, completion_tokens, cost_usd, saved_usd,
                       queue_wait, run, end_to_end)",
        )
        .bind(column(rows, |r| r.minute_ms))
        .bind(column(rows, |r| r.queue.as_str()))
        .bind(column(rows, |r| r.kind.as_str()))
        .bind(column(rows, |r| r.priority.as_str()))
        .bind(column(rows, |r| r.finals))
        .bind(column(rows, |r| r.succeeded))
        .bind(column(rows, |r| r.failed))
        .bind(column(rows, |r| r.dead))
        .bind(column(rows, |r| r.cancelled))
        .bind(column(rows, |r| r.retries))
        .bind(column(rows, |r| r.attempts))
        .bind(column(rows, |r| r.cache_hits))
        .bind(column(rows, |r| r.prompt_tokens))
        .bind(column(rows, |r| r.completion_tokens))
        .bind(column(rows, |r| r.cost_usd))
        .bind(column(rows, |r| r.saved_usd))
        .bind(column(rows, |r| r.queue_wait.as_deref()))
        .bind(column(rows, |r| r.run.as_deref()))
        .bind(column(rows, |r| r.end_to_end.as_deref()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Rollups of minutes from `since_ms` on, oldest first (several rows per minute and series
    /// are possible; the caller adds them up).
    pub async fn rollups_since(&self, since_ms: i64) -> Result<Vec<Rollup>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM metric_rollups WHERE minute >= to_timestamp($1 / 1000.0) ORDER BY minute, written_at"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(since_ms).fetch_all(&self.pool).await?)
    }

    /// All-time counts per series (no histograms; `minute_ms` is 0).
    pub async fn rollup_totals(&self) -> Result<Vec<Rollup>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT 0::int8 AS minute_ms, queue, kind, priority, sum(finals)::int8 AS finals,
                    sum(succeeded)::int8 AS succeeded, sum(failed)::int8 AS failed, sum(dead)::int8 AS dead,
                    sum(cancelled)::int8 AS cancelled, sum(retries)::int8 AS retries, sum(attempts)::int8 AS attempts,
                    sum(cache_hits)::int8 AS cache_hits, sum(prompt_tokens)::int8 AS prompt_tokens,
                    sum(completion_tokens)::int8 AS completion_tokens, sum(cost_usd)::float8 AS cost_usd,
                    sum(saved_usd)::float8 AS saved_usd, NULL::bytea AS queue_wait, NULL::bytea AS run,
                    NULL::bytea AS end_to_end
             FROM metric_rollups GROUP BY queue, kind, priority",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
