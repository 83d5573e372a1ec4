//! Task events (worker → coordinator, aggregator) and the coordinator's replies.

use crate::{PROTOCOL_VERSION, Priority, RejectReason, TaskId};
use serde::{Deserialize, Serialize};

/// What happened to a task. Workers publish these; the coordinator records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A worker began an attempt that is taking a while (short attempts only send their end).
    Started,
    /// A handler reported progress.
    Progress,
    /// The attempt succeeded; the task is done.
    Succeeded,
    /// The attempt failed with a non-retryable error; the task is done.
    Failed,
    /// The attempt failed and another attempt is scheduled after `retry_in_ms`.
    Retrying,
    /// The last attempt failed; the task is dead and can be replayed.
    Dead,
    /// The task could not start yet (a rate limit or an open breaker further away than a
    /// worker holds tasks): not an attempt. The coordinator dispatches it again after
    /// `retry_in_ms`.
    Deferred,
    /// The task was cancelled.
    Cancelled,
    /// The attempt succeeded and spawned children and a join (`spawn`): the task waits,
    /// holding no worker, until its join is final, then takes the join's outcome.
    Spawned,
    /// A submission was refused at intake; `error` says why.
    Rejected,
}

impl EventKind {
    /// True for events that end a task.
    pub fn is_final(self) -> bool {
        matches!(self, EventKind::Succeeded | EventKind::Failed | EventKind::Dead | EventKind::Cancelled)
    }

    /// The task state this event moves a task into.
    pub fn resulting_state(self) -> Option<TaskState> {
        Some(match self {
            EventKind::Started | EventKind::Progress => TaskState::Running,
            EventKind::Succeeded => TaskState::Succeeded,
            EventKind::Failed => TaskState::Failed,
            EventKind::Retrying => TaskState::Retrying,
            EventKind::Deferred => TaskState::Queued,
            EventKind::Dead => TaskState::Dead,
            EventKind::Cancelled => TaskState::Cancelled,
            EventKind::Spawned => TaskState::Waiting,
            EventKind::Rejected => return None,
        })
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Progress => "progress",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::Retrying => "retrying",
            EventKind::Dead => "dead",
            EventKind::Deferred => "deferred",
            EventKind::Cancelled => "cancelled",
            EventKind::Spawned => "spawned",
            EventKind::Rejected => "rejected",
        }
    }
}

/// The state of a task as the coordinator records it in Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for dependencies.
    Pending,
    /// Dispatched to workers, not yet running.
    Queued,
    /// A worker is running it.
    Running,
    /// Waiting for a retry.
    Retrying,
    /// Holds no worker while what it started finishes: the join of the children it spawned,
    /// or its loop's next iteration. It then takes that task's outcome as its own.
    Waiting,
    /// Final: succeeded.
    Succeeded,
    /// Final: failed with a non-retryable error.
    Failed,
    /// Final: out of attempts.
    Dead,
    /// Final: cancelled.
    Cancelled,
}

impl TaskState {
    /// Every state.
    pub const ALL: [TaskState; 9] = [
        TaskState::Pending,
        TaskState::Queued,
        TaskState::Running,
        TaskState::Retrying,
        TaskState::Waiting,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Dead,
        TaskState::Cancelled,
    ];

    /// Lowercase name, as stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Retrying => "retrying",
            TaskState::Waiting => "waiting",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Dead => "dead",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True for the four final states.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Dead | TaskState::Cancelled)
    }
}

/// An error as carried in events and stored with a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskErrorInfo {
    /// Stable code, e.g. `timeout`, `handler_error`, `unknown_kind`, `malformed`.
    pub code: String,
    /// Human-readable description.
    pub message: String,
    /// Whether another attempt could succeed.
    #[serde(default)]
    pub retryable: bool,
}

/// When an attempt moved through its stages, Unix epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Task creation (from the envelope).
    pub created_at: u64,
    /// The worker received the task.
    pub received_at: u64,
    /// The handler started.
    pub started_at: u64,
    /// The handler finished (0 while running).
    #[serde(default)]
    pub finished_at: u64,
}

/// LLM token counts of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
}

/// One thing that happened to one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// The task (the nil UUID for a rejected submission whose id could not be read).
    pub task_id: TaskId,
    /// What happened.
    pub kind: EventKind,
    /// Queue of the task.
    pub queue: String,
    /// Kind (handler name) of the task; empty when unknown.
    #[serde(default)]
    pub task_kind: String,
    /// Priority of the task.
    #[serde(default)]
    pub priority: Priority,
    /// Attempt number, from 1; 0 for events outside any attempt (rejections, cancellations of
    /// queued tasks).
    #[serde(default)]
    pub attempt: u32,
    /// Dispatch generation of the message the attempt ran from (header
    /// [`crate::headers::GENERATION`]); 0 when unknown (rejections, older workers). The
    /// coordinator ignores a non-final event of a generation older than the task's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
    /// When the event happened, Unix epoch milliseconds.
    pub at: u64,
    /// Id of the worker that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Handler output, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Error, on failure, retry, death or rejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskErrorInfo>,
    /// Stage times of the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// Whether the result came from the shared result cache.
    #[serde(default)]
    pub cache_hit: bool,
    /// Token counts, for LLM handlers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenUsage>,
    /// Cost of the attempt in US dollars, for paid APIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Delay before the next attempt, for `retrying` and `deferred`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// For a cache hit: what the cached result cost when it was computed, in US dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_usd: Option<f64>,
    /// W3C `traceparent` of the attempt that produced the event (its `task.run` span), when the
    /// worker exports traces: the coordinator records the event under it. Events travel in
    /// batches, so per-task trace context cannot ride in message headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// For `retrying` and `deferred`: the W3C `traceparent` the task's next dispatch carries
    /// (the one its dispatch message had), so that every attempt stays in one trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_traceparent: Option<String>,
    /// For `spawned`: the children and join the attempt added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn: Option<Box<crate::Spawn>>,
    /// For `succeeded`: the step ended its run early with its result as the run's output;
    /// every unfinished task of the run is cancelled.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stop_run: bool,
}

impl TaskEvent {
    /// A bare event of `kind` for a task, stamped now.
    pub fn new(task_id: TaskId, kind: EventKind, queue: impl Into<String>) -> Self {
        TaskEvent {
            task_id,
            kind,
            queue: queue.into(),
            task_kind: String::new(),
            priority: Priority::Normal,
            attempt: 0,
            generation: 0,
            at: crate::now_ms(),
            worker: None,
            result: None,
            error: None,
            timings: None,
            cache_hit: false,
            tokens: None,
            cost_usd: None,
            retry_in_ms: None,
            saved_usd: None,
            traceparent: None,
            next_traceparent: None,
            spawn: None,
            stop_run: false,
        }
    }
}

/// Many events in one NATS message: workers batch their events to spend one publish, and one
/// JetStream acknowledgement, on many tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// Wire format version.
    #[serde(default = "version")]
    pub v: u16,
    /// The events, in the order they happened on the producer.
    pub events: Vec<TaskEvent>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn version() -> u16 {
    PROTOCOL_VERSION
}

impl EventBatch {
    /// Wraps events in a batch of the current version.
    pub fn new(events: Vec<TaskEvent>) -> Self {
        EventBatch { v: PROTOCOL_VERSION, events }
    }

    /// The MessagePack body of a batch of events already encoded one by one (with
    /// [`crate::encode`]): byte for byte what encoding the whole batch gives, so a producer can
    /// learn each event's size, cut batches by bytes, and encode every event once.
    pub fn assemble(encoded_events: &[impl AsRef<[u8]>]) -> Vec<u8> {
        let total: usize = encoded_events.iter().map(|e| e.as_ref().len()).sum();
        let mut out = Vec::with_capacity(total + 16);
        out.push(0x82); // a map of two entries
        out.extend_from_slice(&[0xa1, b'v']);
        out.extend_from_slice(&crate::encode(&PROTOCOL_VERSION));
        out.extend_from_slice(&[0xa6, b'e', b'v', b'e', b'n', b't', b's']);
        let n = encoded_events.len();
        if n < 16 {
            out.push(0x90 | n as u8);
        } else if n <= u16::MAX as usize {
            out.push(0xdc);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0xdd);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        for e in encoded_events {
            out.extend_from_slice(e.as_ref());
        }
        out
    }

    /// Bytes a batch adds around its encoded events, at most.
    pub const ENVELOPE_BYTES: usize = 16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assembled_batch_is_the_encoded_batch() {
        for n in [0usize, 1, 15, 16, 300, 70_000] {
            let events: Vec<TaskEvent> = (0..n)
                .map(|i| {
                    let mut e = TaskEvent::new(uuid::Uuid::now_v7(), EventKind::Succeeded, "q");
                    e.result = Some(serde_json::json!({ "i": i }));
                    e
                })
                .collect();
            let parts: Vec<Vec<u8>> = events.iter().map(crate::encode).collect();
            assert_eq!(EventBatch::assemble(&parts), crate::encode(&EventBatch::new(events)), "{n} events");
        }
    }
}

/// One task whose final state the coordinator has just committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedTask {
    /// The task.
    pub id: TaskId,
    /// Its final state.
    pub state: TaskState,
}

/// Published by the coordinator on core NATS after each commit of final states, so that
/// `taskfleet wait` and other watchers learn of completions without polling Postgres.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedBatch {
    /// Tasks that reached a final state in this commit.
    pub tasks: Vec<CommittedTask>,
}

/// The coordinator's answer to a submission that asked for one (header
/// [`crate::headers::REPLY_TO`]): sent after the task is committed in Postgres, or on rejection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitReply {
    /// True when the task is (or already was) recorded.
    pub ok: bool,
    /// The task id: the submitted one, or the existing task's id for a duplicate idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// True when the submission matched an existing task and created nothing new.
    #[serde(default)]
    pub duplicate: bool,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RejectReason>,
    /// Human-readable error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
