//! The task envelope: one unit of work as submitted and dispatched.

use crate::{DecodeError, PROTOCOL_VERSION, ParentOutcome, Priority};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// A task's identity: a UUIDv7, so ids sort by creation time.
pub type TaskId = Uuid;

/// Queue a task lands in when it names none.
pub const DEFAULT_QUEUE: &str = "default";
/// Queue that rejections of submissions with an invalid or not allowed subject queue are
/// reported under (event subject, metric label), so that junk subjects create no lanes or
/// label series.
pub const INVALID_QUEUE: &str = "invalid";
/// Attempts a task gets when neither it nor the coordinator's configuration for its kind names a
/// limit.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Per-attempt timeout when a task names none: five minutes, long enough for an LLM call.
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// Longest allowed kind, rate limit name and idempotency key.
pub const MAX_ID_LEN: usize = 128;
/// Longest allowed queue name (see [`validate_queue`]).
pub const MAX_QUEUE_LEN: usize = 64;
/// Latest accepted `created_at`: 9999-12-31T23:59:59.999Z in Unix milliseconds, inside what
/// Postgres' `to_timestamp` and `timestamptz` take.
pub const MAX_CREATED_AT_MS: u64 = 253_402_300_799_999;
/// Most dependencies one task may name.
pub const MAX_DEPENDENCIES: usize = 1_000;
/// Most rate limits one task may name.
pub const MAX_LIMITS: usize = 16;

/// One task, as a client submits it and as a worker receives it.
///
/// Only `kind` is required on submission; every other field has a default, and a missing `id`
/// is filled with a fresh UUIDv7 by the decoder. Unknown fields are rejected so that a typo
/// (`paylod`) is an error, not a silently empty payload; new fields come with a new `v`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskEnvelope {
    /// Wire format version; see [`PROTOCOL_VERSION`].
    #[serde(default = "default_version")]
    pub v: u16,
    /// Task id (UUIDv7). Used as the JetStream `Nats-Msg-Id` unless an idempotency key is set.
    #[serde(default = "Uuid::now_v7")]
    pub id: TaskId,
    /// Handler name, e.g. `echo`, `http`, `llm.chat`.
    pub kind: String,
    /// Queue name; workers subscribe by queue.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Scheduling priority.
    #[serde(default)]
    pub priority: Priority,
    /// Handler input, any JSON value within the rules of [`crate::check_json`] (depth, no NUL,
    /// finite numbers), which decoding enforces.
    #[serde(default, deserialize_with = "crate::payload::deserialize")]
    pub payload: serde_json::Value,
    /// Attempts before the task is declared dead, 1..=1000. Zero (or absent) leaves it to the
    /// coordinator: its default for the kind, else its fleet default.
    #[serde(default)]
    pub max_attempts: u32,
    /// Per-attempt timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Client key that makes resubmission idempotent: a second task with the same key is not
    /// created again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Tasks that must succeed before this one runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<TaskId>,
    /// Creation time, Unix epoch milliseconds, at most [`MAX_CREATED_AT_MS`]; filled at intake
    /// when zero.
    #[serde(default)]
    pub created_at: u64,
    /// Backoff between attempts for this task; the worker's policy for the kind when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryBackoff>,
    /// Named fleet-wide rate limits (`policies.rate_limits`) this task takes a token from before
    /// it runs, besides those of its kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
    /// The run the task belongs to (set by the coordinator; refused on a submission).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    /// The task's node name in its run or spawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// For a node that repeats (a loop): this iteration, from 1; 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iteration: u32,
    /// Dispatch only: the final outcomes of the task's parents, in `depends_on` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<ParentOutcome>,
    /// Dispatch only: the parents' outcomes were too large to travel with the task and are
    /// left out of `parents`; read them with the `task.parents` API verb.
    #[serde(default, skip_serializing_if = "is_false")]
    pub parents_omitted: bool,
    /// Dispatch only: for a loop iteration after the first, the previous iteration's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<ParentOutcome>>,
    /// Dispatch only: the last checkpoint an earlier attempt of this task saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<serde_json::Value>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Exponential backoff with full jitter: the delay after failed attempt `n` is uniform in
/// `[0, min(max_ms, base_ms · factorⁿ⁻¹)]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBackoff {
    /// Delay ceiling after the first failure, milliseconds.
    pub base_ms: u64,
    /// Growth of the ceiling per attempt (at least 1).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// Largest delay, milliseconds.
    pub max_ms: u64,
}

fn default_factor() -> f64 {
    2.0
}

fn default_version() -> u16 {
    PROTOCOL_VERSION
}
fn default_queue() -> String {
    DEFAULT_QUEUE.to_string()
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl TaskEnvelope {
    /// A new envelope of `kind` with `payload` and every other field at its default.
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        TaskEnvelope {
            v: PROTOCOL_VERSION,
            id: Uuid::now_v7(),
            kind: kind.into(),
            queue: DEFAULT_QUEUE.to_string(),
            priority: Priority::Normal,
            payload,
            max_attempts: 0,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            idempotency_key: None,
            depends_on: Vec::new(),
            created_at: now_ms(),
            retry: None,
            limits: Vec::new(),
            run_id: None,
            node: None,
            iteration: 0,
            parents: Vec::new(),
            parents_omitted: false,
            previous: None,
            checkpoint: None,
        }
    }

    /// Sets the queue.
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// The attempt limit, with the unset value (0) read as [`DEFAULT_MAX_ATTEMPTS`].
    pub fn effective_max_attempts(&self) -> u32 {
        if self.max_attempts == 0 { DEFAULT_MAX_ATTEMPTS } else { self.max_attempts }
    }

    /// The key JetStream deduplicates submissions by: the idempotency key when there is one,
    /// else the task id.
    pub fn dedup_key(&self) -> String {
        match &self.idempotency_key {
            Some(k) => format!("key:{k}"),
            None => self.id.to_string(),
        }
    }

    /// The options kept beside the task's columns in Postgres (`retry`, `limits`), or `None`
    /// when the task sets neither.
    pub fn options_json(&self) -> Option<serde_json::Value> {
        if self.retry.is_none() && self.limits.is_empty() {
            return None;
        }
        let mut o = serde_json::Map::new();
        if let Some(r) = &self.retry {
            o.insert("retry".into(), serde_json::to_value(r).unwrap_or(serde_json::Value::Null));
        }
        if !self.limits.is_empty() {
            o.insert("limits".into(), serde_json::Value::from(self.limits.clone()));
        }
        Some(serde_json::Value::Object(o))
    }

    /// Restores the options written by [`TaskEnvelope::options_json`]; unreadable parts are
    /// skipped.
    pub fn apply_options_json(&mut self, options: serde_json::Value) {
        if let Some(r) = options.get("retry").and_then(|r| serde_json::from_value(r.clone()).ok()) {
            self.retry = Some(r);
        }
        if let Some(l) = options.get("limits").and_then(|l| serde_json::from_value(l.clone()).ok()) {
            self.limits = l;
        }
    }

    /// Checks every field against the contract. `max_payload_bytes` bounds the encoded
    /// payload (JSON length).
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), DecodeError> {
        self.validate_task(max_payload_bytes)?;
        self.validate_dependencies()
    }

    /// The `depends_on` of a submitted task: at most [`MAX_DEPENDENCIES`], none twice, not
    /// itself. (A run's or a spawn's edges are checked by [`crate::plan_nodes`] instead.)
    fn validate_dependencies(&self) -> Result<(), DecodeError> {
        if self.depends_on.len() > MAX_DEPENDENCIES {
            return Err(DecodeError::Invalid {
                field: "depends_on",
                reason: format!("{} dependencies, at most {MAX_DEPENDENCIES}", self.depends_on.len()),
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(self.depends_on.len());
        if let Some(twice) = self.depends_on.iter().find(|d| !seen.insert(**d)) {
            return Err(DecodeError::Invalid { field: "depends_on", reason: format!("names {twice} twice") });
        }
        if self.depends_on.contains(&self.id) {
            return Err(DecodeError::Invalid { field: "depends_on", reason: "a task cannot depend on itself".into() });
        }
        Ok(())
    }

    /// Every check of [`TaskEnvelope::validate`] but those of `depends_on`.
    pub fn validate_task(&self, max_payload_bytes: usize) -> Result<(), DecodeError> {
        if self.v == 0 || self.v > PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion { found: self.v, supported: PROTOCOL_VERSION });
        }
        validate_name("kind", &self.kind, true)?;
        validate_queue("queue", &self.queue)?;
        if self.id.is_nil() {
            return Err(DecodeError::Invalid { field: "id", reason: "must not be the nil UUID".into() });
        }
        if self.max_attempts > 1_000 {
            return Err(DecodeError::Invalid {
                field: "max_attempts",
                reason: format!("{} is more than 1000", self.max_attempts),
            });
        }
        if self.timeout_ms == 0 || self.timeout_ms > 7 * 24 * 3_600_000 {
            return Err(DecodeError::Invalid {
                field: "timeout_ms",
                reason: format!("{} is outside 1 ms ..= 7 days", self.timeout_ms),
            });
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > MAX_ID_LEN || key.contains('\0'))
        {
            return Err(DecodeError::Invalid {
                field: "idempotency_key",
                reason: format!("length must be 1..={MAX_ID_LEN} bytes, without NUL (U+0000)"),
            });
        }
        if self.created_at > MAX_CREATED_AT_MS {
            return Err(DecodeError::Invalid {
                field: "created_at",
                reason: format!("{} ms is after 9999-12-31 ({MAX_CREATED_AT_MS} ms)", self.created_at),
            });
        }
        if self.limits.len() > MAX_LIMITS {
            return Err(DecodeError::Invalid {
                field: "limits",
                reason: format!("{} limits, at most {MAX_LIMITS}", self.limits.len()),
            });
        }
        for limit in &self.limits {
            validate_name("limits", limit, true)?;
        }
        if let Some(r) = &self.retry
            && (!(r.factor >= 1.0 && r.factor <= 100.0) || r.base_ms > r.max_ms || r.max_ms > 24 * 3_600_000)
        {
            return Err(DecodeError::Invalid {
                field: "retry",
                reason: "needs 1 <= factor <= 100 and base_ms <= max_ms <= 1 day".into(),
            });
        }
        if self.run_id.is_some()
            || !self.parents.is_empty()
            || self.parents_omitted
            || self.previous.is_some()
            || self.checkpoint.is_some()
        {
            return Err(DecodeError::Invalid {
                field: "run_id",
                reason: "run_id, parents, previous and checkpoint are filled by the coordinator, not submitted".into(),
            });
        }
        if let Some(node) = &self.node {
            validate_name("node", node, true)?;
        }
        crate::check_json(&self.payload).map_err(|reason| DecodeError::Invalid { field: "payload", reason })?;
        let size = serde_json::to_vec(&self.payload).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > max_payload_bytes {
            return Err(DecodeError::TooLarge { size, limit: max_payload_bytes });
        }
        Ok(())
    }
}

/// Checks a queue name or task kind: 1..=128 characters of `[A-Za-z0-9_-]`, plus `.` for kinds
/// (`llm.chat`). Queue names become NATS subject tokens, so dots and wildcards are refused there.
pub fn validate_name(field: &'static str, value: &str, allow_dots: bool) -> Result<(), DecodeError> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(DecodeError::Invalid { field, reason: format!("length must be 1..={MAX_ID_LEN}") });
    }
    let ok = value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || (allow_dots && c == '.'));
    if !ok || value.starts_with('.') || value.ends_with('.') {
        return Err(DecodeError::Invalid {
            field,
            reason: format!(
                "{value:?} may only contain letters, digits, '_' and '-'{}",
                if allow_dots { " and inner '.'" } else { "" }
            ),
        });
    }
    Ok(())
}

/// Checks a queue name: 1..=[`MAX_QUEUE_LEN`] characters of `[A-Za-z0-9_-]`. A queue name is
/// one NATS subject token (`<prefix>.submit.<queue>`), a consumer name part and a metric label,
/// so dots, wildcards, spaces and anything else are refused.
pub fn validate_queue(field: &'static str, value: &str) -> Result<(), DecodeError> {
    if value.len() > MAX_QUEUE_LEN {
        return Err(DecodeError::Invalid { field, reason: format!("length must be 1..={MAX_QUEUE_LEN}") });
    }
    validate_name(field, value, false)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
