//! Store errors.

/// A failure of the Postgres store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration cannot be used (bad URL).
    #[error("{0}")]
    Config(String),
    /// A query failed; usually retryable (connection lost, database restarting).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}
