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

pub mod builtin;
mod error;
mod events;
mod gate;
mod handler;
mod lanes;
mod presence;
pub mod providers;
mod retry;
mod runner;
mod scheduler;

pub use error::WorkerError;
pub use handler::{Handler, Shared, TaskContext, TaskError, Usage, typed};
pub use retry::RetryPolicy;
pub use runner::{Worker, WorkerBuilder, WorkerStats};
pub use scheduler::PriorityPicker;
