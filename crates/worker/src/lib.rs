//! Workers: the [`Handler`] trait, the [`Worker`] builder, and the run loop that pulls tasks
//! from JetStream, runs them and reports their events.
//!
//! ```no_run
//! use taskfleet_worker::{TaskContext, TaskError, Worker};
//!
//! # async fn demo(config: taskfleet_config::Config, client: async_nats::Client) -> Result<(), taskfleet_worker::WorkerError> {
//! let worker = Worker::builder(config)
//!     .handler("shout", |_ctx: TaskContext, payload: serde_json::Value| async move {
//!         let text = payload.as_str().ok_or_else(|| TaskError::fatal("payload must be a string"))?;
//!         Ok(serde_json::Value::String(text.to_uppercase()))
//!     })
//!     .build();
//! worker.run(client, tokio_util::sync::CancellationToken::new()).await
//! # }
//! ```
//!
//! Inside, [`Worker::run`] (`worker.rs`) starts one loop per module — `pull` (JetStream into
//! priority `lanes`), `heartbeat`, `cancellations`, `progress`, `presence`, `stats` and the
//! event publisher (`events`) — and hands each delivery, as a slot frees up, to the attempt
//! pipeline (`attempt.rs`): `admit` (gate, skip checks, shared cache, rate limits), `execute`
//! (the handler under timeout and cancellation, registered in `running`), `settle` (a pure
//! decision from the outcome to the event), and `defer` when the task cannot start yet. A step
//! of a workflow reads its parents' outcomes, saves checkpoints, spawns and stops its run
//! through its [`TaskContext`] (`workflow.rs` talks to the coordinator for it).

mod admit;
mod attempt;
pub mod builtin;
mod cancellations;
mod defer;
mod error;
mod events;
mod execute;
mod gate;
mod handler;
mod heartbeat;
mod lanes;
mod policies;
mod presence;
mod progress;
pub mod providers;
mod pull;
mod retry;
mod running;
mod scheduler;
pub mod semantic;
mod settle;
pub mod stats;
mod worker;
mod workflow;

pub use error::{DeferReason, Disposition, TaskError, WorkerError};
pub use handler::{Handler, Shared, TaskContext, Usage, typed};
pub use retry::RetryPolicy;
pub use scheduler::PriorityPicker;
pub use stats::WorkerStats;
pub use taskfleet_proto::{NodeSpec, OnFailure, ParentOutcome, Spawn};
pub use worker::{Worker, WorkerBuilder};
