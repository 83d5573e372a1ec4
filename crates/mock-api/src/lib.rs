//! A small HTTP server standing in for the outside LLM and search APIs that taskfleet's
//! handlers call, so tests and examples run without network, keys or cost, and can make the
//! "outside" slow, failing or rate-limited on purpose.
//!
//! # What it answers
//!
//! | route | answer |
//! | --- | --- |
//! | `POST /v1/chat/completions` | an OpenAI-shaped completion; the reply is `[<name>] echo: <last user message>` (see [`echo_content`]) and `usage` counts `ceil(chars / 4)` tokens per text (see [`count_tokens`]), so equal requests get equal answers; the `id` is unique per answer. A last user message starting with the line `SCORE` is judged instead (`{"score", "missing"}`, see [`judge_content`]) |
//! | `POST /v1/search` `{"query", "max_results"}`, `GET /v1/search?q=…&max_results=…` | `{"provider", "query", "results": [{"title", "url", "snippet"}]}`, the same for the same query |
//! | `POST /v1/embeddings` `{"model", "input": text or [texts], "dimensions"?}` | OpenAI-shaped unit vectors (256 dimensions by default) from the texts' words and character trigrams (see [`embed`]): paraphrases are close, unrelated texts are not, equal texts get equal vectors; `usage` counts [`count_tokens`] per text |
//! | `POST /v1/records` `{"records": [...]}` | `{"stored": n}`: a batch write (analytics rows), counted in [`Stats::records`] |
//! | `GET /stats` | [`Stats`]: arrivals, answers by status and by endpoint, and the arrival times of the requests answered 200 (for measuring a client's rate-limit overshoot, see [`Stats::max_in_window`]), and every request's method, path and `Authorization` header ([`Stats::requests`]: which credentials reached it) |
//! | `GET /redirect?to=URL` | `302 Found` with `Location: URL` (for testing a client's redirect rules) |
//! | `POST /stats/reset` | the counters as they were; they start again from zero |
//! | `GET /control`, `POST /control` | the current [`Behaviour`]; the body of a `POST` is a [`Control`] (any of its fields) changing it |
//! | `GET /healthz` | `ok` |
//!
//! Malformed JSON or a missing field is answered 400 with `{"error":{"message","type"}}`, as
//! OpenAI does. On the three API routes, before anything else, the mock waits `latency_ms` plus a
//! uniform `0..=jitter_ms`, answers 429 with `Retry-After` when over its own token-bucket limit
//! (`limit_per_s`) or with probability `rate_429`, and 500 with probability `error_rate`. The
//! draws come from an RNG seeded with `seed`, so a run is reproducible.
//!
//! # From Rust tests
//!
//! ```no_run
//! use taskfleet_mock_api::{Behaviour, Control, MockApi, MockConfig};
//!
//! # async fn example() -> Result<(), taskfleet_mock_api::MockError> {
//! let mock = MockApi::start(MockConfig { name: "llm".into(), ..MockConfig::default() }).await?;
//! let base = mock.url(); // http://127.0.0.1:<port>, point the client here
//! mock.control(&Control { error_rate: Some(1.0), ..Control::default() })?; // every call fails
//! mock.control(&Control { error_rate: Some(0.0), ..Control::default() })?; // and heals
//! let stats = mock.stats();
//! mock.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # As a process
//!
//! ```text
//! cargo run -p taskfleet-mock-api -- --name openai --latency-ms 50 --jitter-ms 20 --rate-429 0.1
//! curl -s localhost:8089/v1/chat/completions -d '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
//! curl -s localhost:8089/control -d '{"error_rate":1}'
//! curl -s localhost:8089/stats
//! ```
//!
//! Every flag has an environment variable `TASKFLEET_MOCK_<FLAG>` (`TASKFLEET_MOCK_ADDR`,
//! `TASKFLEET_MOCK_ERROR_RATE`, …); `RUST_LOG` sets the log level.

mod api;
mod embeddings;
mod server;
mod stats;

pub use api::{
    ChatChoice, ChatMessage, ChatRequest, ChatResponse, DEFAULT_SEARCH_RESULTS, ECHO_MAX_CHARS, ErrorBody, ErrorDetail,
    JUDGE_MARKER, MAX_SEARCH_RESULTS, SearchRequest, SearchResponse, SearchResult, Usage, count_tokens, echo_content,
    fnv1a, judge_content,
};
pub use embeddings::{
    DEFAULT_DIMENSIONS, Embedding, EmbeddingInput, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, MAX_DIMENSIONS,
    MAX_INPUTS, embed,
};
pub use stats::{
    Billed, CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT, MAX_SEEN, RECORDS_ENDPOINT, SEARCH_ENDPOINT, SeenRequest, Stats,
};

use serde::{Deserialize, Serialize};
use server::Shared;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Where the binary listens unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8089";

/// Errors of the mock server.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A behaviour setting is out of range.
    #[error("{field} must be {expected}, got {value}")]
    Invalid {
        /// The setting's name, as in [`Behaviour`].
        field: &'static str,
        /// What it was set to.
        value: f64,
        /// What it may be.
        expected: &'static str,
    },
    /// The server stopped with an error.
    #[error("mock server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The server task panicked or was aborted.
    #[error("mock server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How the mock behaves: what [`Control`] changes at run time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Behaviour {
    /// Wait before every API answer, in milliseconds.
    pub latency_ms: u64,
    /// Extra wait, uniform in `0..=jitter_ms` milliseconds.
    pub jitter_ms: u64,
    /// Probability (0..=1) of answering 500.
    pub error_rate: f64,
    /// Probability (0..=1) of answering 429 (checked before `error_rate`).
    pub rate_429: f64,
    /// `Retry-After` of the injected 429s, in seconds.
    pub retry_after_s: u64,
    /// Server-side limit, requests a second over both API routes (token bucket); 0 for none.
    /// Requests over it are answered 429 with `Retry-After` (whole seconds until a token, at
    /// least 1).
    pub limit_per_s: f64,
    /// Bucket size of the limit (requests allowed at once); 0 for `max(1, limit_per_s)`.
    pub limit_burst: f64,
}

impl Default for Behaviour {
    /// Answers at once, never fails, no limit; `retry_after_s` 1.
    fn default() -> Behaviour {
        Behaviour {
            latency_ms: 0,
            jitter_ms: 0,
            error_rate: 0.0,
            rate_429: 0.0,
            retry_after_s: 1,
            limit_per_s: 0.0,
            limit_burst: 0.0,
        }
    }
}

impl Behaviour {
    /// Checks the probabilities are in `0..=1` and the limit is finite and not negative.
    pub fn validate(&self) -> Result<(), MockError> {
        let probability = |field, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(MockError::Invalid { field, value, expected: "a probability between 0 and 1" })
            }
        };
        let non_negative = |field, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(MockError::Invalid { field, value, expected: "a finite number, 0 or more" })
            }
        };
        probability("error_rate", self.error_rate)?;
        probability("rate_429", self.rate_429)?;
        non_negative("limit_per_s", self.limit_per_s)?;
        non_negative("limit_burst", self.limit_burst)
    }
}

/// A change of [`Behaviour`]: the fields given are set, the others kept. The JSON body of
/// `POST /control` (unknown fields are refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// New [`Behaviour::latency_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// New [`Behaviour::jitter_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<u64>,
    /// New [`Behaviour::error_rate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// New [`Behaviour::rate_429`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_429: Option<f64>,
    /// New [`Behaviour::retry_after_s`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// New [`Behaviour::limit_per_s`] (the bucket starts full again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_per_s: Option<f64>,
    /// New [`Behaviour::limit_burst`] (the bucket starts full again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_burst: Option<f64>,
}

impl Control {
    /// `current` with this change made (not validated).
    pub fn apply_to(&self, current: &Behaviour) -> Behaviour {
        Behaviour {
            latency_ms: self.latency_ms.unwrap_or(current.latency_ms),
            jitter_ms: self.jitter_ms.unwrap_or(current.jitter_ms),
            error_rate: self.error_rate.unwrap_or(current.error_rate),
            rate_429: self.rate_429.unwrap_or(current.rate_429),
            retry_after_s: self.retry_after_s.unwrap_or(current.retry_after_s),
            limit_per_s: self.limit_per_s.unwrap_or(current.limit_per_s),
            limit_burst: self.limit_burst.unwrap_or(current.limit_burst),
        }
    }
}

/// What to start.
#[derive(Debug, Clone, PartialEq)]
pub struct MockConfig {
    /// Address to listen on; port 0 picks a free one (see [`RunningMock::addr`]).
    pub addr: SocketAddr,
    /// Provider name, shown in replies, search results and stats.
    pub name: String,
    /// Seed of the RNG behind jitter, injected 429s and 500s.
    pub seed: u64,
    /// Behaviour at start.
    pub behaviour: Behaviour,
}

impl Default for MockConfig {
    /// `127.0.0.1:0`, name `mock`, seed 0, [`Behaviour::default`]: what a test usually wants.
    fn default() -> MockConfig {
        MockConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            name: "mock".to_string(),
            seed: 0,
            behaviour: Behaviour::default(),
        }
    }
}

/// Starts mock servers.
pub struct MockApi;

impl MockApi {
    /// Validates `config`, binds its address and serves in a background task until
    /// [`RunningMock::shutdown`] (or the [`RunningMock`] is dropped).
    pub async fn start(config: MockConfig) -> Result<RunningMock, MockError> {
        config.behaviour.validate()?;
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| MockError::Bind { addr: config.addr, source })?;
        let addr = listener.local_addr().map_err(|source| MockError::Bind { addr: config.addr, source })?;
        let shared = Arc::new(Shared::new(&config.name, config.seed, config.behaviour));
        let app = server::router(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender stops the server too.
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%addr, provider = %config.name, behaviour = ?config.behaviour, "mock API listening");
        Ok(RunningMock { addr, handle: MockHandle { shared }, stop: Some(stop), task: Some(task) })
    }
}

/// A cloneable handle on a running mock's behaviour and counters, for other tasks.
#[derive(Clone)]
pub struct MockHandle {
    shared: Arc<Shared>,
}

impl MockHandle {
    /// The provider name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The current behaviour.
    pub fn behaviour(&self) -> Behaviour {
        self.shared.behaviour()
    }

    /// Changes the behaviour, as `POST /control` does; returns the new one. An out-of-range
    /// value changes nothing.
    pub fn control(&self, control: &Control) -> Result<Behaviour, MockError> {
        self.shared.control(control)
    }

    /// The counters, as `GET /stats` shows them.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Returns the counters and starts them again from zero, as `POST /stats/reset` does.
    pub fn reset_stats(&self) -> Stats {
        self.shared.reset_stats()
    }
}

/// A mock serving in the background. Dropping it stops the server (without waiting).
pub struct RunningMock {
    addr: SocketAddr,
    handle: MockHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningMock {
    /// The bound address (the real port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, the base URL to give a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A handle for other tasks.
    pub fn handle(&self) -> MockHandle {
        self.handle.clone()
    }

    /// See [`MockHandle::behaviour`].
    pub fn behaviour(&self) -> Behaviour {
        self.handle.behaviour()
    }

    /// See [`MockHandle::control`].
    pub fn control(&self, control: &Control) -> Result<Behaviour, MockError> {
        self.handle.control(control)
    }

    /// See [`MockHandle::stats`].
    pub fn stats(&self) -> Stats {
        self.handle.stats()
    }

    /// See [`MockHandle::reset_stats`].
    pub fn reset_stats(&self) -> Stats {
        self.handle.reset_stats()
    }

    /// Stops accepting connections, lets the requests in progress finish, and waits for the
    /// server to end.
    pub async fn shutdown(mut self) -> Result<(), MockError> {
        self.signal_stop();
        match self.task.take() {
            Some(task) => joined(task.await),
            None => Ok(()),
        }
    }

    /// Serves until `signal` completes, then shuts down as [`RunningMock::shutdown`] does; or
    /// returns at once if the server fails first.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), MockError> {
        let Some(mut task) = self.task.take() else { return Ok(()) };
        tokio::select! {
            _ = signal => {
                self.signal_stop();
                joined(task.await)
            }
            ended = &mut task => joined(ended),
        }
    }

    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for RunningMock {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

fn joined(result: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), MockError> {
    result?.map_err(MockError::Serve)
}

#[cfg(test)]
mod tests;
