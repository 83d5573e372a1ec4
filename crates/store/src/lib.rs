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
use std::collections::BTreeMap;
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
    /// Connects. With `database.migrate_on_start` (the default) it first creates the schema if
    /// needed and applies pending migrations (concurrent starters are serialised by the
    /// migrator's advisory lock); without, it only checks that the schema is at the latest
    /// migration and fails with [`StoreErrorKind::SchemaBehind`], naming `taskfleet migrate`,
    /// when it is not.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        if cfg.migrate_on_start {
            return Ok(Store::migrate(cfg).await?.0);
        }
        let store = Store::open(cfg).await?;
        store.check_migrated().await?;
        Ok(store)
    }

    /// Creates the schema if needed and applies every pending migration, whatever
    /// `database.migrate_on_start` says (`taskfleet migrate`). Returns the store and the
    /// migrations this call applied, as `<version> <description>`.
    pub async fn migrate(cfg: &DatabaseConfig) -> Result<(Store, Vec<String>), StoreError> {
        let base = connect_options(cfg)?;
        {
            let mut conn = base.connect().await?;
            // The schema name was validated as a plain lowercase identifier, so quoting is enough.
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", cfg.schema)))
                .execute(&mut conn)
                .await?;
        }
        let store = Store::open(cfg).await?;
        let before = store.applied_migrations().await?.unwrap_or_default();
        MIGRATOR.run(&store.pool).await?;
        let applied = MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && !before.contains_key(&m.version))
            .map(|m| format!("{:04} {}", m.version, m.description))
            .collect();
        Ok((store, applied))
    }

    /// The pool on the configured schema, without touching the schema itself.
    async fn open(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        let base = connect_options(cfg)?;
        let schema = cfg.schema.clone();
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
        Ok(Store { pool, schema, limits: WorkflowLimits::default() })
    }

    /// The migrations recorded in the schema (version → checksum, successful ones only), or
    /// `None` when the schema has no migration table yet.
    async fn applied_migrations(&self) -> Result<Option<BTreeMap<i64, Vec<u8>>>, StoreError> {
        let sql = format!("SELECT version, checksum FROM \"{}\"._sqlx_migrations WHERE success", self.schema);
        match sqlx::query_as::<_, (i64, Vec<u8>)>(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await {
            Ok(rows) => Ok(Some(rows.into_iter().collect())),
            // 42P01 undefined_table, 3F000 invalid_schema_name: never migrated.
            Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P01" | "3F000")) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails unless every migration of this build is applied, with the same checksum.
    /// Migrations newer than this build are accepted: during a rolling upgrade the migrate
    /// step runs before the old processes stop.
    async fn check_migrated(&self) -> Result<(), StoreError> {
        let schema = &self.schema;
        let hint = "run `taskfleet migrate` with this configuration (and a role that may change the schema) \
                    first, or set database.migrate_on_start = true";
        let Some(applied) = self.applied_migrations().await? else {
            return Err(StoreError::schema_behind(format!(
                "schema {schema:?} has no taskfleet migrations applied and database.migrate_on_start is off: {hint}"
            )));
        };
        let mut missing = Vec::new();
        for m in MIGRATOR.iter().filter(|m| !m.migration_type.is_down_migration()) {
            match applied.get(&m.version) {
                None => missing.push(format!("{:04} {}", m.version, m.description)),
                Some(checksum) if checksum.as_slice() != &*m.checksum => {
                    return Err(StoreError::schema_behind(format!(
                        "schema {schema:?}: migration {:04} {} was applied with different contents than this build's; \
                         the schema and this release do not match",
                        m.version, m.description
                    )));
                }
                Some(_) => {}
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StoreError::schema_behind(format!(
                "schema {schema:?} is behind this build by {} migration(s) ({}) and database.migrate_on_start is off: {hint}",
                missing.len(),
                missing.join(", ")
            )))
        }
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

/// The connection options of `cfg.url` (TLS settings included), statements logged at trace.
fn connect_options(cfg: &DatabaseConfig) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(&cfg.url)
        .map_err(StoreError::config)?
        .log_statements(tracing::log::LevelFilter::Trace))
}

/// One column of a batched write (a parameter of `UNNEST`): `field` of every row.
pub(crate) fn column<'a, R, T>(rows: &'a [R], field: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(field).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgSslMode;

    #[test]
    fn a_tls_database_url_parses_with_its_root_certificate() {
        let cfg = DatabaseConfig {
            url: "postgres://app:pw@db.example:5432/fleet?sslmode=verify-full&sslrootcert=/etc/taskfleet/pg/ca.crt"
                .into(),
            ..DatabaseConfig::default()
        };
        let options = connect_options(&cfg).expect("a TLS URL parses");
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyFull));
        assert_eq!((options.get_host(), options.get_port()), ("db.example", 5432));
        let bad = DatabaseConfig { url: "postgres://db/x?sslmode=sometimes".into(), ..DatabaseConfig::default() };
        assert_eq!(connect_options(&bad).expect_err("unknown sslmode").kind(), StoreErrorKind::Config);
    }
}
