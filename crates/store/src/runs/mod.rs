//! Runs, spawns and loops. `insert` writes a run's, a spawn's or a loop iteration's tasks in
//! the transaction that creates them; `ending` ends a run early (stop, cancel, timeout) and
//! resumes it; `view` reads runs for `run.get` and `run.list`; `steps` answers what a running
//! step asks (its parents' outcomes, storing a checkpoint).

mod ending;
mod insert;
mod steps;
mod view;

pub(crate) use ending::end_run;
pub use ending::{RunEnded, RunResumed};
pub use insert::RunInserted;
pub(crate) use insert::{ChangedRow, next_iterations, refuse_spawn, spawn_children};
pub use view::RunEndSummary;

use std::collections::BTreeMap;

/// Limits on runs and spawns, and what the store needs to fill in a spawned task.
#[derive(Debug, Clone)]
pub struct WorkflowLimits {
    /// Tasks a run may ever have, spawned ones and loop iterations included.
    pub max_tasks_per_run: u32,
    /// Children one spawn may add.
    pub max_children_per_spawn: u32,
    /// How deep spawns may nest (a top-level task spawns at depth 1).
    pub max_spawn_depth: u32,
    /// Largest payload of a spawned task, bytes of JSON.
    pub max_payload_bytes: usize,
    /// Parents' outcomes travel with a dispatch up to this many bytes; beyond it the step
    /// reads them with `task.parents`.
    pub inline_parents_bytes: usize,
    /// Attempts of a task that names none.
    pub default_max_attempts: u32,
    /// Attempts by kind, for tasks that name none.
    pub kind_max_attempts: BTreeMap<String, u32>,
}

impl Default for WorkflowLimits {
    fn default() -> Self {
        WorkflowLimits {
            max_tasks_per_run: 100_000,
            max_children_per_spawn: 10_000,
            max_spawn_depth: 8,
            max_payload_bytes: 1 << 20,
            inline_parents_bytes: 256 << 10,
            default_max_attempts: taskfleet_proto::DEFAULT_MAX_ATTEMPTS,
            kind_max_attempts: BTreeMap::new(),
        }
    }
}

impl WorkflowLimits {
    /// The attempt limit of a task that names `max_attempts` (0: none).
    fn attempts(&self, kind: &str, max_attempts: u32) -> u32 {
        if max_attempts > 0 {
            return max_attempts;
        }
        self.kind_max_attempts.get(kind).copied().unwrap_or(self.default_max_attempts)
    }
}
