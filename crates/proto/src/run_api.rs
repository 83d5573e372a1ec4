//! The coordinator's run API: bodies of the `run.*` verbs and of the verbs a running step
//! uses (`task.parents`, `task.checkpoint`). Served like the task API (JSON over NATS
//! request/reply on `<prefix>.api.<verb>`); `run.submit` also takes a MessagePack body.

use crate::{ParentOutcome, TaskErrorInfo, TaskId, TaskState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Verb of a run submission: [`crate::RunSpec`] → [`RunSubmitted`], answered once the whole
/// run is committed.
pub const VERB_RUN_SUBMIT: &str = "run.submit";
/// Verb of a run's view: [`RunGetRequest`] → [`RunView`].
pub const VERB_RUN_GET: &str = "run.get";
/// Verb of a listing of runs: [`RunListRequest`] → `[RunSummary, …]`, newest first.
pub const VERB_RUN_LIST: &str = "run.list";
/// Verb of a run's cancellation: [`RunIdRequest`] → [`RunChange`].
pub const VERB_RUN_CANCEL: &str = "run.cancel";
/// Verb of a run's resumption: [`RunIdRequest`] → [`RunChange`].
pub const VERB_RUN_RESUME: &str = "run.resume";
/// Verb of a step's parents, paged: [`ParentsRequest`] → [`ParentsReply`].
pub const VERB_TASK_PARENTS: &str = "task.parents";
/// Verb of a checkpoint: [`CheckpointRequest`] → [`CheckpointReply`], answered once stored.
pub const VERB_TASK_CHECKPOINT: &str = "task.checkpoint";

/// The state of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Some task is not final.
    Running,
    /// Every task is final and no failure went unhandled, or a step stopped the run early.
    Succeeded,
    /// A task failed (and no dependent took its failure with `continue`), or the run timed out.
    Failed,
    /// Cancelled by request.
    Cancelled,
}

impl RunState {
    /// Lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<RunState> {
        [RunState::Running, RunState::Succeeded, RunState::Failed, RunState::Cancelled]
            .into_iter()
            .find(|st| st.as_str() == s)
    }

    /// True for every state but `running`.
    pub fn is_final(self) -> bool {
        self != RunState::Running
    }
}

/// Reply of `run.submit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSubmitted {
    /// The run.
    pub run_id: Uuid,
    /// Each node's task id.
    pub tasks: BTreeMap<String, TaskId>,
    /// True when a run with this id existed already and nothing was created.
    #[serde(default)]
    pub duplicate: bool,
}

/// Request naming one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdRequest {
    /// The run.
    pub id: Uuid,
}

/// Request of `run.get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunGetRequest {
    /// The run.
    pub id: Uuid,
    /// Tasks listed at most, oldest first (default 1000, at most 5000); totals cover all.
    #[serde(default)]
    pub tasks: Option<u32>,
}

/// Reply of `run.cancel` and `run.resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunChange {
    /// The run's state before the request.
    pub previous: RunState,
    /// Its state now.
    pub state: RunState,
    /// Tasks the request cancelled (`run.cancel`) or set to run again (`run.resume`).
    pub tasks: usize,
}

/// Tokens, cost and time summed over a run's attempts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunTotals {
    /// Tasks in the run (spawned ones and loop iterations included).
    pub tasks: u64,
    /// Tasks per state.
    pub states: BTreeMap<String, u64>,
    /// Attempts that ended.
    pub attempts: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cost, US dollars.
    pub cost_usd: f64,
    /// Handler time summed over attempts, milliseconds.
    pub busy_ms: u64,
    /// Spend avoided by cache hits (what the cached results cost when they were made), USD.
    #[serde(default)]
    pub saved_usd: f64,
}

/// One task of a run, as `run.get` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTaskView {
    /// The task.
    pub id: TaskId,
    /// Its node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Handler name.
    pub kind: String,
    /// State.
    pub state: TaskState,
    /// Handler attempts so far.
    pub attempts: u32,
    /// Loop iteration (0 outside loops).
    #[serde(default)]
    pub iteration: u32,
    /// Parents, in order.
    #[serde(default)]
    pub depends_on: Vec<TaskId>,
    /// The task that spawned this one (a spawn's children and join).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawned_by: Option<TaskId>,
    /// The waiting task whose outcome this one decides (a join's spawner, a loop iteration's
    /// predecessor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completes: Option<TaskId>,
    /// First start to final state, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When its handler first started, Unix epoch milliseconds (the worker's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// When it became final, Unix epoch milliseconds (its last handler's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// Prompt tokens of its attempts.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion tokens of its attempts.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Cost of its attempts, US dollars.
    #[serde(default)]
    pub cost_usd: f64,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskErrorInfo>,
}

/// Reply of `run.get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    /// The run.
    pub id: Uuid,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// State.
    pub state: RunState,
    /// Creation, Unix epoch milliseconds.
    pub created_at: u64,
    /// End, Unix epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// When it times out, Unix epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// Output: the early-stopping step's result, else each final node's result by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskErrorInfo>,
    /// Sums over its attempts.
    pub totals: RunTotals,
    /// Its tasks, oldest first (the first `tasks` asked for).
    pub tasks: Vec<RunTaskView>,
}

/// Request of `task.parents`. A page holds at most `limit` parents and stops earlier once its
/// outcomes exceed about 512 KiB (at least one per page): read on from `offset + parents.len()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentsRequest {
    /// The step.
    pub id: TaskId,
    /// Parents to skip.
    #[serde(default)]
    pub offset: u32,
    /// Parents to return at most (default and ceiling 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Reply of `task.parents`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParentsReply {
    /// Parents `offset..offset + limit`, in order.
    pub parents: Vec<ParentOutcome>,
    /// How many parents the step has.
    pub total: u32,
    /// For a loop iteration after the first, the previous iteration's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<ParentOutcome>,
}

/// Request of `task.checkpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRequest {
    /// The task.
    pub id: TaskId,
    /// What the next attempt should start from.
    pub checkpoint: Value,
    /// Dispatch generation of the attempt saving it: a checkpoint from an attempt the task was
    /// dispatched again since (a lost worker's) is not stored. None: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
}

/// Reply of `task.checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReply {
    /// False when the task is final (nothing was stored).
    pub saved: bool,
}

/// Published on core NATS ([`crate::Subjects::run_ended`]) when a run ends, so that watchers
/// (`taskfleet run wait`) need not poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEndedNotice {
    /// The run.
    pub run_id: Uuid,
    /// Its final state.
    pub state: RunState,
}

/// Request of `run.list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunListRequest {
    /// Only runs in this state.
    #[serde(default)]
    pub state: Option<RunState>,
    /// Most runs returned (default 20, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// One run in a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run.
    pub id: Uuid,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// State.
    pub state: RunState,
    /// Tasks it has had.
    pub tasks: u32,
    /// Of those, how many are not final.
    pub remaining: u32,
    /// Creation, Unix epoch milliseconds.
    pub created_at: u64,
    /// End, Unix epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
}
