//! Postgres for taskfleet: migrations, and batched reads and writes of tasks, attempts and
//! dependencies. Every write path takes a whole batch in one transaction of a few statements
//! (`INSERT … SELECT FROM UNNEST`, `UPDATE … FROM UNNEST`), never a round trip per task.

mod cascade;
mod error;
mod events;
mod maintenance;
mod nodelay;
mod queries;
mod rollups;
mod rows;
mod runs;
mod submit;

pub use error::{StoreError, StoreErrorKind};
pub use events::{Finalized, RecordOutcome};
pub use maintenance::{CancelOutcome, Claimed, LeaderLock};
pub use queries::TaskRecord;
pub use rollups::Rollup;
pub use rows::Redispatch;
pub use runs::{RunEndSummary, RunEnded, RunInserted, RunResumed, WorkflowLimits};
pub use submit::{Duplicate, InsertOutcome, Rejected};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use taskfleet_config::DatabaseConfig;

/// Handle to taskfleet's tables in one Postgres schema.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    schema: String,
    limits: WorkflowLimits,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    /// Connects, creates the schema if needed and applies pending migrations (concurrent
    /// starters are serialised by the migrator's advisory lock).
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        let base = PgConnectOptions::from_str(&cfg.url)
            .map_err(StoreError::config)?
            .log_statements(tracing::log::LevelFilter::Trace);
        // The schema name was validated as a plain lowercase identifier, so quoting is enough.
        let schema = cfg.schema.clone();
        {
            let mut conn = base.connect().await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")))
                .execute(&mut conn)
                .await?;
        }
        // Custom plans always: every batched statement takes arrays (`= ANY($1)`, `UNNEST`) whose
        // sizes vary from 1 to thousands, and a generic plan made for small ones (after a series
        // of small batches) turned a 1,000-row release from milliseconds into seconds.
        let options = base.options([("search_path", schema.as_str()), ("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(|_conn, _meta| {
                Box::pin(async {
                    nodelay::set_on_tcp_sockets();
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Store { pool, schema, limits: WorkflowLimits::default() })
    }

    /// The same store with these workflow limits.
    pub fn with_limits(mut self, limits: WorkflowLimits) -> Store {
        self.limits = limits;
        self
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The connection pool, for callers that need a query of their own.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Cheap liveness check of the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// One column of a batched write (a parameter of `UNNEST`): `field` of every row.
pub(crate) fn column<'a, R, T>(rows: &'a [R], field: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(field).collect()
}
