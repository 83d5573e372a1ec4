//! Store errors.

use std::fmt;

/// What a failed store call means for its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The configuration cannot be used (bad URL).
    Config,
    /// Postgres could not be reached or is not answering (I/O, TLS, protocol, pool timeout,
    /// connection and shutdown errors, resource shortage): the same request may succeed later.
    Unavailable,
    /// Postgres refused the data itself: retrying the same rows fails again, so the caller
    /// must find and drop the offending ones instead of waiting for the database.
    Data,
    /// Any other failed query (a missing table, a bad statement).
    Query,
    /// Migrations could not be applied.
    Migrate,
    /// Migrations are off (`database.migrate_on_start = false`) and the schema is not at the
    /// latest migration: run `taskfleet migrate` first.
    SchemaBehind,
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreErrorKind::Config => "invalid database url",
            StoreErrorKind::Unavailable | StoreErrorKind::Data | StoreErrorKind::Query => "database error",
            StoreErrorKind::Migrate => "migration failed",
            StoreErrorKind::SchemaBehind => "database schema not migrated",
        })
    }
}

/// A failure of the Postgres store: its [`StoreErrorKind`] and the error behind it.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {source}")]
pub struct StoreError {
    kind: StoreErrorKind,
    #[source]
    source: Source,
}

/// The error a [`StoreError`] comes from.
#[derive(Debug, thiserror::Error)]
enum Source {
    #[error(transparent)]
    Database(sqlx::Error),
    #[error(transparent)]
    Migrate(sqlx::migrate::MigrateError),
    #[error("{0}")]
    Schema(String),
}

/// SQLSTATE classes of errors caused by the data written, not by the database's availability:
/// 22 data exception (e.g. `\u0000` in jsonb, a timestamp out of range), 23 integrity constraint
/// violation, 54 program limit exceeded (e.g. a value too large to index).
const DATA_ERROR_CLASSES: [&str; 3] = ["22", "23", "54"];

/// SQLSTATE classes of an unavailable database: 08 connection exception, 53 insufficient
/// resources, 57 operator intervention (shutdown, cancel), 40 transaction rollback
/// (serialization, deadlock).
const UNAVAILABLE_CLASSES: [&str; 4] = ["08", "53", "57", "40"];

/// The kind of a failed query.
fn kind_of(e: &sqlx::Error) -> StoreErrorKind {
    let in_class = |code: &str, classes: &[&str]| classes.iter().any(|class| code.starts_with(class));
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(c) if in_class(&c, &DATA_ERROR_CLASSES) => StoreErrorKind::Data,
            Some(c) if in_class(&c, &UNAVAILABLE_CLASSES) => StoreErrorKind::Unavailable,
            _ => StoreErrorKind::Query,
        },
        // A value read back that cannot be decoded is as final as one refused on the way in.
        sqlx::Error::Encode(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreErrorKind::Data,
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreErrorKind::Unavailable,
        _ => StoreErrorKind::Query,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError { kind: kind_of(&e), source: Source::Database(e) }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError { kind: StoreErrorKind::Migrate, source: Source::Migrate(e) }
    }
}

impl StoreError {
    /// An unusable setting, e.g. a database URL that does not parse.
    pub(crate) fn config(e: sqlx::Error) -> Self {
        StoreError { kind: StoreErrorKind::Config, source: Source::Database(e) }
    }

    /// The schema is behind the migrations this build carries (`why` says how).
    pub(crate) fn schema_behind(why: String) -> Self {
        StoreError { kind: StoreErrorKind::SchemaBehind, source: Source::Schema(why) }
    }

    /// What the failure means for the caller.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The kind is [`StoreErrorKind::Data`].
    pub fn is_data_error(&self) -> bool {
        self.kind == StoreErrorKind::Data
    }

    /// The kind is [`StoreErrorKind::Unavailable`].
    pub fn is_unavailable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }

    /// Postgres rolled the transaction back to break a deadlock or a serialization conflict
    /// (SQLSTATE class 40): the same transaction, tried again, may well succeed.
    pub fn is_conflict(&self) -> bool {
        matches!(&self.source, Source::Database(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c.starts_with("40")))
    }

    /// What Postgres said, with its SQLSTATE, for a database error; the whole error otherwise.
    pub fn database_words(&self) -> String {
        match &self.source {
            Source::Database(sqlx::Error::Database(e)) => match e.code() {
                Some(code) => format!("{} (SQLSTATE {code})", e.message()),
                None => e.message().to_string(),
            },
            _ => self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{StoreError, StoreErrorKind};

    #[test]
    fn kinds_of_errors_without_a_sqlstate() {
        assert_eq!(StoreError::from(sqlx::Error::PoolTimedOut).kind(), StoreErrorKind::Unavailable);
        assert_eq!(StoreError::from(sqlx::Error::Decode("bad".into())).kind(), StoreErrorKind::Data);
        assert_eq!(StoreError::from(sqlx::Error::RowNotFound).kind(), StoreErrorKind::Query);
        let config = StoreError::config(sqlx::Error::Configuration("bad url".into()));
        assert_eq!(config.to_string(), "invalid database url: error with configuration: bad url");
    }
}
