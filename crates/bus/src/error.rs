//! Errors of the NATS layer.

/// A failure talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Could not connect (after retrying).
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// Server URL.
        url: String,
        /// Last connection error.
        message: String,
    },
    /// The server lacks something taskfleet needs (JetStream, a recent enough version).
    #[error("NATS server at {url} is unsuitable: {message}")]
    Unsuitable {
        /// Server URL.
        url: String,
        /// What is missing.
        message: String,
    },
    /// Creating or updating a stream or consumer failed.
    #[error("cannot set up {what}: {message}")]
    Topology {
        /// The stream or consumer.
        what: String,
        /// Server's answer.
        message: String,
    },
    /// Publishing, or waiting for the publish acknowledgement, failed. Retryable.
    #[error("publish to {subject} failed: {message}")]
    Publish {
        /// Subject of the first failed message.
        subject: String,
        /// Error text.
        message: String,
    },
}
