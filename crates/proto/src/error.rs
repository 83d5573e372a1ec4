//! Decode and validation errors.

use serde::{Deserialize, Serialize};

/// Why a message could not be turned into a valid value. Each variant maps to a stable
/// [`RejectReason`] code that is counted and reported in rejection events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body is not valid MessagePack/JSON for the expected shape (this includes missing
    /// required fields and fields of the wrong type).
    #[error("malformed {encoding} body: {message}")]
    Malformed {
        /// `msgpack` or `json`.
        encoding: &'static str,
        /// The decoder's description of the problem.
        message: String,
    },
    /// The body declares a protocol version newer than this decoder understands.
    #[error("unsupported protocol version {found} (this build understands up to {supported})")]
    UnsupportedVersion {
        /// Version in the message.
        found: u16,
        /// Highest version understood here.
        supported: u16,
    },
    /// The body or payload is larger than the configured limit.
    #[error("body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the offending body in bytes.
        size: usize,
        /// Configured limit in bytes.
        limit: usize,
    },
    /// The body decoded but a field holds a value that is not allowed.
    #[error("invalid field `{field}`: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `Content-Type` header names an encoding this decoder does not speak.
    #[error("unsupported content type {0:?} (use application/msgpack or application/json)")]
    UnsupportedContentType(String),
    /// The `Taskfleet-Reply-To` header names a subject replies may not go to.
    #[error("invalid Taskfleet-Reply-To {subject:?}: {reason}")]
    InvalidReplyTo {
        /// The subject named.
        subject: String,
        /// Why no reply may go there.
        reason: String,
    },
}

impl DecodeError {
    /// The stable reason code for this error.
    pub fn reason(&self) -> RejectReason {
        match self {
            DecodeError::Malformed { .. } | DecodeError::UnsupportedContentType(_) => RejectReason::Malformed,
            DecodeError::UnsupportedVersion { .. } => RejectReason::UnsupportedVersion,
            DecodeError::TooLarge { .. } => RejectReason::TooLarge,
            DecodeError::Invalid { .. } => RejectReason::Invalid,
            DecodeError::InvalidReplyTo { .. } => RejectReason::InvalidReplyTo,
        }
    }
}

/// Stable, machine-readable code of a rejected submission, used in events, replies and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not decodable.
    Malformed,
    /// Newer protocol version than the coordinator understands.
    UnsupportedVersion,
    /// Over the size limit.
    TooLarge,
    /// A field failed validation.
    Invalid,
    /// No handler is registered for the task's kind.
    UnknownKind,
    /// A dependency names a task that does not exist.
    UnknownDependency,
    /// The queue is not in the coordinator's allow-list (`coordinator.queues`).
    UnknownQueue,
    /// The `Taskfleet-Reply-To` header names a subject replies may not go to.
    InvalidReplyTo,
    /// Postgres refused to store the submission (the message carries the database's words).
    Unstorable,
}

impl RejectReason {
    /// The code as a string, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::TooLarge => "too_large",
            RejectReason::Invalid => "invalid",
            RejectReason::UnknownKind => "unknown_kind",
            RejectReason::UnknownDependency => "unknown_dependency",
            RejectReason::UnknownQueue => "unknown_queue",
            RejectReason::InvalidReplyTo => "invalid_reply_to",
            RejectReason::Unstorable => "unstorable",
        }
    }
}
