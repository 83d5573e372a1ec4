//! Store errors.

/// A failure of the Postgres store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration cannot be used (bad URL).
    #[error("{0}")]
    Config(String),
    /// A query failed: Postgres unavailable (connection lost, database restarting, pool timed
    /// out) or, see [`StoreError::is_data_error`], a row it refuses.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// SQLSTATE classes of errors caused by the data written, not by the database's availability:
/// 22 data exception (e.g. `\u0000` in jsonb, a timestamp out of range), 23 integrity constraint
/// violation, 54 program limit exceeded (e.g. a value too large to index).
const DATA_ERROR_CLASSES: [&str; 3] = ["22", "23", "54"];

impl StoreError {
    /// Postgres refused the data itself: retrying the same rows fails again, so the caller
    /// must find and drop the offending ones instead of waiting for the database.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => {
                e.code().is_some_and(|c| DATA_ERROR_CLASSES.iter().any(|class| c.starts_with(class)))
            }
            // A value read back that cannot be decoded is as final as one refused on the way in.
            StoreError::Database(
                sqlx::Error::Encode(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_),
            ) => true,
            _ => false,
        }
    }

    /// What Postgres said, with its SQLSTATE, for a database error; the whole error otherwise.
    pub fn database_words(&self) -> String {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => match e.code() {
                Some(code) => format!("{} (SQLSTATE {code})", e.message()),
                None => e.message().to_string(),
            },
            other => other.to_string(),
        }
    }

    /// Postgres could not be reached or is not answering (I/O, TLS, protocol, pool timeout,
    /// connection and shutdown errors, resource shortage): the same request may succeed later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => {
                // 08 connection exception, 53 insufficient resources, 57 operator intervention
                // (shutdown, cancel), 40 transaction rollback (serialization, deadlock).
                e.code().is_some_and(|c| ["08", "53", "57", "40"].iter().any(|class| c.starts_with(class)))
            }
            StoreError::Database(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ),
            StoreError::Config(_) | StoreError::Migrate(_) => false,
        }
    }
}
