//! The taskfleet wire contract: what travels over NATS between clients, the coordinator,
//! workers and the aggregator, and the bodies of the coordinator's task API and the
//! aggregator's `/v1/stats`.
//!
//! Everything here is plain data plus the codec. Bodies are MessagePack maps with field names
//! (`rmp_serde::to_vec_named`), so any language with a MessagePack library can speak it; a JSON
//! body is accepted wherever a client submits, so `nats pub` works from a shell. The folder
//! `proto/` at the repository root describes the format for other languages and holds golden
//! encoded examples that the tests decode.

mod api;
mod codec;
mod envelope;
mod error;
mod event;
mod fleet;
mod payload;
mod permissions;
mod priority;
mod run_api;
mod stats;
mod subjects;
mod workflow;

pub use api::{
    ApiError, ApiErrorBody, ApiErrorKind, CancelReply, CountsRequest, ListRequest, QueueOpenReply, QueueOpenRequest,
    ReplayReply, ReplayRequest, Runnable, RunnableQuery, RunnableReply, RunnableRequest, TaskIdRequest,
    VERB_QUEUE_OPEN, VERB_TASK_CANCEL, VERB_TASK_COUNTS, VERB_TASK_GET, VERB_TASK_LIST, VERB_TASK_REPLAY,
    VERB_TASK_RUNNABLE,
};
pub use codec::{
    CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, Encoding, MAX_MESSAGE_BYTES, decode, decode_envelope, encode, encode_json,
};
pub use envelope::{
    DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, DEFAULT_TIMEOUT_MS, INVALID_QUEUE, MAX_CREATED_AT_MS, MAX_ID_LEN,
    MAX_QUEUE_LEN, RetryBackoff, TaskEnvelope, TaskId, now_ms, validate_name, validate_queue,
};
pub use error::{DecodeError, RejectReason};
pub use event::{
    CommittedBatch, CommittedTask, EventBatch, EventKind, SubmitReply, TaskErrorInfo, TaskEvent, TaskState, Timings,
    TokenUsage,
};
pub use fleet::{Alert, AlertState, WorkerStatus};
pub use payload::{MAX_PAYLOAD_DEPTH, check_json};
pub use permissions::{AGGREGATOR_CONSUMER, PasswordSource, Permissions, Role, authorization_block};
pub use priority::Priority;
pub use run_api::{
    CheckpointReply, CheckpointRequest, ParentsReply, ParentsRequest, RunChange, RunEndedNotice, RunGetRequest,
    RunIdRequest, RunListRequest, RunState, RunSubmitted, RunSummary, RunTaskView, RunTotals, RunView, VERB_RUN_CANCEL,
    VERB_RUN_GET, VERB_RUN_LIST, VERB_RUN_RESUME, VERB_RUN_SUBMIT, VERB_TASK_CHECKPOINT, VERB_TASK_PARENTS,
};
pub use stats::{Figures, HistoryPoint, Latency, RunFigures, SeriesFigures, Snapshot, Tokens, WorkerFigures};
pub use subjects::{MAX_REPLY_TO_LEN, Subjects, headers};
pub use workflow::{
    Dependency, LoopSpec, MAX_LOOP_ITERATIONS, NodeSpec, OnFailure, ParentOutcome, PlannedTask, Predicate, RunSpec,
    Spawn, plan_nodes,
};

/// Version of the wire format written by this crate; decoders accept versions up to this one.
pub const PROTOCOL_VERSION: u16 = 1;
