//! Errors: [`WorkerError`] stops a worker; [`TaskError`] ends (or defers) one attempt.

use std::time::Duration;

/// A failure that stops a worker (not a task failure: those become events).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// NATS set-up or connection failed.
    #[error(transparent)]
    Bus(#[from] taskfleet_bus::BusError),
    /// The Redis settings or the policies in the configuration are unusable.
    #[error("shared state: {0}")]
    SharedState(#[from] taskfleet_shared_state::SharedStateError),
    /// The HTTP client of the built-in handlers could not be built.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// A task failure, as a handler reports it: a stable code, a message, and what the worker is
/// to do about it (its [`Disposition`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct TaskError {
    /// Stable code, e.g. `timeout`, `http_429`, `invalid_payload`.
    pub code: String,
    /// Human-readable description.
    pub message: String,
    /// Retry, fail, or run again later without counting an attempt.
    pub disposition: Disposition,
}

/// What the worker does with an attempt that ended in a [`TaskError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Another attempt could succeed: retried with backoff, and no sooner than `not_before`
    /// when the failure says so (e.g. `Retry-After`).
    Retry {
        /// Earliest delay before the next attempt.
        not_before: Option<Duration>,
    },
    /// No retry will fix it (bad input, unknown kind): the task fails at once.
    Fatal,
    /// Not a failure: the task could not start yet. It runs again after `delay` without
    /// counting an attempt and without holding a slot meanwhile.
    Defer {
        /// Why it could not start.
        reason: DeferReason,
        /// How long to wait.
        delay: Duration,
    },
}

/// Why a task could not start yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeferReason {
    /// A rate limit had no token.
    RateLimited,
    /// A rate limit booked a slot further away than a slot may be held for.
    RateLimitBooked,
    /// Every provider's circuit breaker is open.
    BreakerOpen,
}

impl DeferReason {
    /// The reason as it appears in events, metrics and spans.
    pub fn code(self) -> &'static str {
        match self {
            DeferReason::RateLimited => "rate_limited",
            DeferReason::RateLimitBooked => "rate_limit_booked",
            DeferReason::BreakerOpen => "breaker_open",
        }
    }
}

impl TaskError {
    fn new(message: impl Into<String>, disposition: Disposition) -> Self {
        TaskError { code: "handler_error".into(), message: message.into(), disposition }
    }

    /// A failure worth retrying (network error, overload, timeout).
    pub fn retryable(message: impl Into<String>) -> Self {
        TaskError::new(message, Disposition::Retry { not_before: None })
    }

    /// A failure that no retry will fix (bad input, unknown kind).
    pub fn fatal(message: impl Into<String>) -> Self {
        TaskError::new(message, Disposition::Fatal)
    }

    /// The task cannot start before `delay` (see [`Disposition::Defer`]); its code is the
    /// reason's.
    pub fn deferred(reason: DeferReason, message: impl Into<String>, delay: Duration) -> Self {
        TaskError {
            code: reason.code().into(),
            message: message.into(),
            disposition: Disposition::Defer { reason, delay },
        }
    }

    /// Replaces the code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = code.into();
        self
    }

    /// Asks for the next attempt (or, for a deferral, the next start) no sooner than `delay`;
    /// a fatal failure has none.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        match &mut self.disposition {
            Disposition::Retry { not_before } => *not_before = Some(delay),
            Disposition::Defer { delay: d, .. } => *d = delay,
            Disposition::Fatal => {}
        }
        self
    }

    /// True when another attempt (or a later start) could succeed.
    pub fn is_retryable(&self) -> bool {
        self.disposition != Disposition::Fatal
    }
}
