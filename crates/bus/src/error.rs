//! Errors of the NATS layer.

use std::fmt;

/// The error behind a [`BusError`]: the client's own, or a description where there is none.
pub type Source = Box<dyn std::error::Error + Send + Sync>;

/// What failed, for a caller to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusErrorKind {
    /// Could not connect (after retrying).
    Connect,
    /// The server lacks something taskfleet needs (JetStream, a recent enough version).
    Unsuitable,
    /// Creating, updating or reading a stream or consumer failed.
    Topology,
    /// Opening a pull stream on a consumer failed.
    Consume,
    /// Publishing, or waiting for the publish acknowledgement, failed. Retryable.
    Publish,
}

/// A failure talking to NATS: its kind, what it concerned (a server URL, a stream, a consumer
/// or a subject) and the error behind it.
#[derive(Debug, thiserror::Error)]
pub struct BusError {
    kind: BusErrorKind,
    what: String,
    #[source]
    source: Source,
}

impl BusError {
    /// A failure of `kind` concerning `what`, caused by `source`.
    pub fn new(kind: BusErrorKind, what: impl Into<String>, source: impl Into<Source>) -> Self {
        BusError { kind, what: what.into(), source: source.into() }
    }

    /// What failed.
    pub fn kind(&self) -> BusErrorKind {
        self.kind
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = &self.what;
        match self.kind {
            BusErrorKind::Connect => write!(f, "cannot connect to NATS at {what}"),
            BusErrorKind::Unsuitable => write!(f, "NATS server at {what} is unsuitable"),
            BusErrorKind::Topology => write!(f, "cannot set up {what}"),
            BusErrorKind::Consume => write!(f, "cannot pull from {what}"),
            BusErrorKind::Publish => write!(f, "publish to {what} failed"),
        }?;
        write!(f, ": {}", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::{BusError, BusErrorKind};
    use std::error::Error;

    #[test]
    fn keeps_its_kind_and_source() {
        let e = BusError::new(BusErrorKind::Publish, "tf.dispatch.q.normal", std::io::Error::other("timed out"));
        assert_eq!(e.kind(), BusErrorKind::Publish);
        assert_eq!(e.to_string(), "publish to tf.dispatch.q.normal failed: timed out");
        assert!(e.source().is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()));
    }
}
