//! The coordinator's task API: request and reply bodies (JSON) of the verbs served on
//! `<prefix>.api.<verb>` over NATS request/reply and under `/v1/...` over HTTP, and the one
//! error body every verb answers with when it cannot do what was asked.

use crate::{TaskId, TaskState};
use serde::{Deserialize, Serialize};

/// Verb of one task: `{"id"}` → the task as stored.
pub const VERB_TASK_GET: &str = "task.get";
/// Verb of a listing: [`ListRequest`] → tasks, newest first.
pub const VERB_TASK_LIST: &str = "task.list";
/// Verb of the counts: [`CountsRequest`] → `{"<state>": n, …}`.
pub const VERB_TASK_COUNTS: &str = "task.counts";
/// Verb of a cancellation: [`TaskIdRequest`] → [`CancelReply`].
pub const VERB_TASK_CANCEL: &str = "task.cancel";
/// Verb of a replay of dead tasks: [`ReplayRequest`] → [`ReplayReply`].
pub const VERB_TASK_REPLAY: &str = "task.replay";
/// Verb workers ask before running a message: [`RunnableRequest`] → [`RunnableReply`].
pub const VERB_TASK_RUNNABLE: &str = "task.runnable";
/// Verb a worker asks at start: [`QueueOpenRequest`] → [`QueueOpenReply`]. Only the
/// coordinator creates consumers, so a worker asks it for those of its queues and then binds
/// to them by name.
pub const VERB_QUEUE_OPEN: &str = "queue.open";

/// Request of `queue.open`: the queues whose dispatch consumers the worker is about to pull.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOpenRequest {
    /// Queue names.
    pub queues: Vec<String>,
}

/// Reply of `queue.open`: the names of the consumers that now exist, for every queue and
/// priority.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOpenReply {
    /// Consumer names on the dispatch stream.
    pub consumers: Vec<String>,
}

/// Request naming one task (`task.get`, `task.cancel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskIdRequest {
    /// The task.
    pub id: TaskId,
}

/// Request of `task.list` (also the query string of `GET /v1/tasks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    /// Only tasks in this state.
    #[serde(default)]
    pub state: Option<String>,
    /// Only tasks of this queue.
    #[serde(default)]
    pub queue: Option<String>,
    /// Most rows returned (default 20, at most 1000).
    #[serde(default)]
    pub limit: Option<i64>,
}

/// Request of `task.counts` (also the query string of `GET /v1/counts`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsRequest {
    /// Only tasks of this queue.
    #[serde(default)]
    pub queue: Option<String>,
}

/// Reply of `task.cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    /// True when this request moved the task to `cancelled`.
    pub cancelled: bool,
    /// The task's state before the request.
    pub previous: TaskState,
    /// Pending dependents cancelled with it.
    pub dependents_cancelled: usize,
}

/// Request of `task.replay`: named dead tasks, or all of them (of one queue).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// The dead tasks to replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<TaskId>>,
    /// Every dead task instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// With `all`, only this queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// Reply of `task.replay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReply {
    /// The tasks queued again.
    pub replayed: Vec<TaskId>,
}

/// A dispatch message a worker asks about before running it, because it may be stale: it was
/// delivered before, or it belongs to a later dispatch generation (a retry, rescue or replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnableQuery {
    /// The task.
    pub id: TaskId,
    /// The dispatch generation of the message (header [`crate::headers::GENERATION`]).
    pub generation: i32,
}

/// Whether a worker may run a dispatch message, as the coordinator's `task.runnable` verb
/// answers from Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runnable {
    /// The task is not final and the message is of its current generation (or a newer one).
    Run,
    /// The task already has its final state: terminate the message.
    Final,
    /// A later dispatch of the task exists: this message is a leftover; terminate it.
    Stale,
    /// No such task (its row was removed): terminate the message.
    Unknown,
}

/// Request body of `<prefix>.api.task.runnable` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnableRequest {
    /// The messages asked about.
    pub tasks: Vec<RunnableQuery>,
}

/// Reply body of `<prefix>.api.task.runnable` (JSON): one answer per asked task, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnableReply {
    /// The answers.
    pub answers: Vec<Runnable>,
    /// Per answer, the task's last checkpoint (a redelivered message carries the one it was
    /// published with, not a later one); empty when no task asked about has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<Option<serde_json::Value>>,
}

/// What kind of failure an API error is, for the caller to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorKind {
    /// The task does not exist (HTTP 404).
    NotFound,
    /// The request is not one the API understands (HTTP 400): fix it, do not retry it.
    BadRequest,
    /// The coordinator could not answer now, e.g. Postgres is down (HTTP 500): retry later.
    Unavailable,
}

impl ApiErrorKind {
    /// The HTTP status code the coordinator answers this kind with.
    pub fn http_status(self) -> u16 {
        match self {
            ApiErrorKind::NotFound => 404,
            ApiErrorKind::BadRequest => 400,
            ApiErrorKind::Unavailable => 500,
        }
    }
}

/// An API request that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind of failure.
    pub kind: ApiErrorKind,
    /// Human-readable description.
    pub message: String,
}

impl ApiError {
    /// An error of `kind` described by `message`.
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into() }
    }

    /// The body of an error answer: `{"error": {"kind": …, "message": …}}`.
    pub fn into_body(self) -> ApiErrorBody {
        ApiErrorBody { error: self }
    }
}

/// The body of every error answer of the API. No reply of a verb that succeeded has this
/// shape (a task record has more fields), so a caller tells the two apart by parsing this first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiErrorBody {
    /// The error.
    pub error: ApiError,
}

impl ApiErrorBody {
    /// The error of a reply body, if it is an error answer.
    /// Coordinators before this body answered `{"error": "…", "not_found": true}`; that shape
    /// is still recognised, so a client keeps working during a rolling upgrade.
    pub fn parse(body: &[u8]) -> Option<ApiError> {
        if let Ok(b) = serde_json::from_slice::<ApiErrorBody>(body) {
            return Some(b.error);
        }
        let old: PreviousErrorBody = serde_json::from_slice(body).ok()?;
        let kind = if old.not_found { ApiErrorKind::NotFound } else { ApiErrorKind::Unavailable };
        Some(ApiError::new(kind, old.error))
    }
}

/// The error body of coordinators before [`ApiErrorBody`]. Unknown fields refuse it, so a reply
/// (a task record, a list) is told apart at its first key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviousErrorBody {
    error: String,
    #[serde(default)]
    not_found: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_error_body_is_still_recognised() {
        let old = br#"{"error":"no task x","not_found":true}"#;
        assert_eq!(ApiErrorBody::parse(old).map(|e| e.kind), Some(ApiErrorKind::NotFound));
        assert_eq!(ApiErrorBody::parse(br#"{"error":"db down"}"#).map(|e| e.kind), Some(ApiErrorKind::Unavailable));
        assert!(ApiErrorBody::parse(br#"{"id":"x","error":"last failure","state":"dead"}"#).is_none());
    }

    #[test]
    fn error_body_shape_and_detection() {
        let body = serde_json::to_vec(&ApiError::new(ApiErrorKind::NotFound, "no task x").into_body()).unwrap();
        assert_eq!(body, br#"{"error":{"kind":"not_found","message":"no task x"}}"#);
        assert_eq!(ApiErrorBody::parse(&body).map(|e| e.kind), Some(ApiErrorKind::NotFound));
        // A task whose last error is an object is a reply, not an error answer.
        let task =
            br#"{"id":"0190f5f0-0000-7000-8000-000000000000","state":"failed","error":{"code":"x","message":"y"}}"#;
        assert_eq!(ApiErrorBody::parse(task), None);
    }

    #[test]
    fn replay_request_omits_what_is_unset() {
        let all = ReplayRequest { all: true, ..Default::default() };
        assert_eq!(serde_json::to_string(&all).unwrap(), r#"{"all":true}"#);
        let back: ReplayRequest = serde_json::from_str(r#"{"ids":[]}"#).unwrap();
        assert_eq!(back, ReplayRequest { ids: Some(vec![]), ..Default::default() });
    }
}
