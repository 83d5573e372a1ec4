//! Worker errors.

/// A failure that stops a worker (not a task failure: those become events).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// NATS set-up or connection failed.
    #[error(transparent)]
    Bus(#[from] taskfleet_bus::BusError),
    /// A consumer could not be read.
    #[error("cannot pull from {consumer}: {message}")]
    Pull {
        /// Consumer name.
        consumer: String,
        /// Error text.
        message: String,
    },
    /// The Redis settings or the policies in the configuration are unusable.
    #[error("shared state: {0}")]
    Redis(String),
}
