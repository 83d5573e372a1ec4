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

impl StoreError {
    /// True when Postgres refused the data itself (SQLSTATE classes 22 data exception, 23
    /// integrity violation, 54 program limit exceeded), or a value read back could not be
    /// decoded: retrying the same rows cannot help, so the caller isolates them. Every other
    /// error (connection lost, pool timeout, database restarting) is an outage: retry later.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54"))
            }
            StoreError::Database(sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)) => true,
            _ => false,
        }
    }
}
