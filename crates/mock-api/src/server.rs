//! The routes, the shared state behind them, and the decisions (limit, injected faults, latency)
//! taken for each API request.

use crate::api::{self, ChatRequest, ErrorBody, SearchRequest};
use crate::embeddings::{EmbeddingRequest, embeddings_response};
use crate::stats::{CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT, RECORDS_ENDPOINT, SEARCH_ENDPOINT, SeenRequest, Stats};
use crate::{Behaviour, Control, MockError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// State shared by the routes and the [`crate::MockHandle`]s.
pub(crate) struct Shared {
    pub(crate) name: String,
    started: Instant,
    /// Number of the next chat completion, for its id.
    seq: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    behaviour: Behaviour,
    rng: StdRng,
    bucket: Option<Bucket>,
    stats: Stats,
}

/// What happens to a request, decided when it arrives.
enum Verdict {
    Serve,
    /// Over the server-side limit; retry after this many seconds.
    Limited(u64),
    /// Drawn for an injected 429; retry after this many seconds.
    TooMany(u64),
    /// Drawn for an injected 500.
    Fail,
}

struct Admission {
    arrival_ms: f64,
    verdict: Verdict,
    delay: Duration,
}

impl Shared {
    pub(crate) fn new(name: &str, seed: u64, behaviour: Behaviour) -> Shared {
        let started = Instant::now();
        Shared {
            name: name.to_string(),
            started,
            seq: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                behaviour,
                rng: StdRng::seed_from_u64(seed),
                bucket: Bucket::for_behaviour(&behaviour, started),
                stats: Stats::new(name),
            }),
        }
    }

    /// The state, even if a panic poisoned the lock (every update leaves it consistent).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn uptime_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    pub(crate) fn behaviour(&self) -> Behaviour {
        self.lock().behaviour
    }

    pub(crate) fn control(&self, control: &Control) -> Result<Behaviour, MockError> {
        let mut inner = self.lock();
        let next = control.apply_to(&inner.behaviour);
        next.validate()?;
        if next.limit_per_s != inner.behaviour.limit_per_s || next.limit_burst != inner.behaviour.limit_burst {
            inner.bucket = Bucket::for_behaviour(&next, Instant::now());
        }
        inner.behaviour = next;
        tracing::info!(provider = %self.name, behaviour = ?next, "behaviour changed");
        Ok(next)
    }

    pub(crate) fn stats(&self) -> Stats {
        let uptime = self.uptime_ms();
        self.lock().stats.snapshot(uptime)
    }

    pub(crate) fn reset_stats(&self) -> Stats {
        let uptime = self.uptime_ms();
        let mut inner = self.lock();
        let before = inner.stats.snapshot(uptime);
        inner.stats = Stats::new(&self.name);
        before
    }

    /// Counts an arrival at `endpoint` and decides its fate. The random draws are made for every
    /// request, in arrival order, so a given seed gives the same sequence of answers.
    fn admit(&self, endpoint: &str) -> Admission {
        let arrival_ms = self.uptime_ms();
        let now = Instant::now();
        let mut inner = self.lock();
        inner.stats.arrived(endpoint);
        let b = inner.behaviour;
        let draw_429: f64 = inner.rng.random();
        let draw_500: f64 = inner.rng.random();
        let jitter = if b.jitter_ms > 0 { inner.rng.random_range(0..=b.jitter_ms) } else { 0 };
        let limited = match inner.bucket.as_mut() {
            Some(bucket) => bucket.take(now).err(),
            None => None,
        };
        let verdict = if let Some(wait_s) = limited {
            // Retry-After is whole seconds: never tell a client to come back before a token is there.
            Verdict::Limited((wait_s.ceil() as u64).max(1))
        } else if draw_429 < b.rate_429 {
            Verdict::TooMany(b.retry_after_s)
        } else if draw_500 < b.error_rate {
            Verdict::Fail
        } else {
            Verdict::Serve
        };
        let delay = Duration::from_millis(b.latency_ms.saturating_add(jitter));
        Admission { arrival_ms, verdict, delay }
    }

    /// Counts the request, waits the latency, then either answers it (limited or an injected
    /// fault: `Err`) or lets it be served (`Ok` with its arrival time).
    async fn gate(&self, endpoint: &str) -> Result<f64, Response> {
        let admission = self.admit(endpoint);
        if !admission.delay.is_zero() {
            tokio::time::sleep(admission.delay).await;
        }
        let arrival = admission.arrival_ms;
        match admission.verdict {
            Verdict::Serve => Ok(arrival),
            Verdict::Limited(retry) => Err(self.too_many(arrival, retry, "rate limit exceeded (server-side limit)")),
            Verdict::TooMany(retry) => Err(self.too_many(arrival, retry, "rate limit exceeded (injected)")),
            Verdict::Fail => Err(self.answer(
                arrival,
                StatusCode::INTERNAL_SERVER_ERROR,
                &ErrorBody::new("server_error", "the mock failed this request (injected error)"),
            )),
        }
    }

    fn too_many(&self, arrival_ms: f64, retry_after_s: u64, message: &str) -> Response {
        let mut response =
            self.answer(arrival_ms, StatusCode::TOO_MANY_REQUESTS, &ErrorBody::new("rate_limit_error", message));
        response.headers_mut().insert(header::RETRY_AFTER, retry_after_s.into());
        response
    }

    fn bad_request(&self, arrival_ms: f64, message: impl Into<String>) -> Response {
        self.answer(arrival_ms, StatusCode::BAD_REQUEST, &ErrorBody::new("invalid_request_error", message))
    }

    /// Records the answer's status and builds it.
    fn answer(&self, arrival_ms: f64, status: StatusCode, body: &impl Serialize) -> Response {
        self.lock().stats.answered(status.as_u16(), arrival_ms);
        tracing::debug!(provider = %self.name, status = status.as_u16(), arrival_ms, "answered");
        (status, Json(body)).into_response()
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up; starts full.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn for_behaviour(b: &Behaviour, now: Instant) -> Option<Bucket> {
        if b.limit_per_s <= 0.0 {
            return None;
        }
        let burst = if b.limit_burst > 0.0 { b.limit_burst } else { b.limit_per_s }.max(1.0);
        Some(Bucket { rate: b.limit_per_s, burst, tokens: burst, last: now })
    }

    /// Takes a token, or tells how many seconds until one is there.
    fn take(&mut self, now: Instant) -> Result<(), f64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / self.rate)
        }
    }
}

/// The mock's routes over `shared`.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/search", get(search_get).post(search_post))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/records", post(records))
        .route("/stats", get(stats))
        .route("/stats/reset", post(reset_stats))
        .route("/control", get(get_control).post(post_control))
        .route("/healthz", get(|| async { "ok" }))
        .route("/redirect", get(redirect))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), record_request))
        .with_state(shared)
}

/// Notes every request but the mock's own `/stats`, `/control` and `/healthz` in
/// [`Stats::requests`], with its `Authorization` header.
async fn record_request(State(s): AppState, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if !(path.starts_with("/stats") || path == "/control" || path == "/healthz") {
        let authorization =
            request.headers().get(header::AUTHORIZATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let seen = SeenRequest { method: request.method().to_string(), path: path.to_string(), authorization };
        s.lock().stats.seen(seen);
    }
    next.run(request).await
}

/// Query string of `GET /redirect`.
#[derive(Deserialize)]
struct RedirectParams {
    to: String,
}

/// `GET /redirect?to=URL`: `302 Found` to `URL` (for testing a client's redirect rules).
async fn redirect(params: Result<Query<RedirectParams>, QueryRejection>) -> Response {
    match params {
        Ok(Query(p)) => match header::HeaderValue::from_str(&p.to) {
            Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
            Err(_) => {
                (StatusCode::BAD_REQUEST, Json(ErrorBody::new("invalid_request_error", "invalid 'to'"))).into_response()
            }
        },
        Err(e) => {
            (StatusCode::BAD_REQUEST, Json(ErrorBody::new("invalid_request_error", format!("{e}")))).into_response()
        }
    }
}

type AppState = State<Arc<Shared>>;

async fn chat(State(s): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let arrival = match s.gate(CHAT_ENDPOINT).await {
        Ok(arrival) => arrival,
        Err(response) => return response,
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return s.bad_request(arrival, format!("cannot read the request body: {e}")),
    };
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return s.bad_request(arrival, format!("invalid chat completion request: {e}")),
    };
    if let Err(message) = api::validate_chat(&request) {
        return s.bad_request(arrival, message);
    }
    let seq = s.seq.fetch_add(1, Ordering::Relaxed);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let response = api::chat_response(&s.name, &request, seq, created);
    s.lock().stats.bill(&request.model, response.usage.prompt_tokens, response.usage.completion_tokens);
    s.answer(arrival, StatusCode::OK, &response)
}

async fn embeddings(State(s): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let arrival = match s.gate(EMBEDDINGS_ENDPOINT).await {
        Ok(arrival) => arrival,
        Err(response) => return response,
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return s.bad_request(arrival, format!("cannot read the request body: {e}")),
    };
    let request: EmbeddingRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return s.bad_request(arrival, format!("invalid embeddings request: {e}")),
    };
    match request.texts() {
        Ok(texts) => {
            let response = embeddings_response(&request, &texts);
            s.lock().stats.bill(&request.model, response.usage.prompt_tokens, 0);
            s.answer(arrival, StatusCode::OK, &response)
        }
        Err(message) => s.bad_request(arrival, message),
    }
}

/// `POST /v1/records` `{"records": [...]}`: a batch write (e.g. analytics rows), answered
/// `{"stored": n}` and counted in [`Stats::records`].
async fn records(State(s): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let arrival = match s.gate(RECORDS_ENDPOINT).await {
        Ok(arrival) => arrival,
        Err(response) => return response,
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return s.bad_request(arrival, format!("cannot read the request body: {e}")),
    };
    #[derive(Deserialize)]
    struct Batch {
        records: Vec<serde_json::Value>,
    }
    match serde_json::from_slice::<Batch>(&body) {
        Ok(batch) => {
            let stored = batch.records.len() as u64;
            s.lock().stats.records += stored;
            s.answer(arrival, StatusCode::OK, &serde_json::json!({ "stored": stored }))
        }
        Err(e) => s.bad_request(arrival, format!("invalid records batch: {e}")),
    }
}

async fn search_post(State(s): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let arrival = match s.gate(SEARCH_ENDPOINT).await {
        Ok(arrival) => arrival,
        Err(response) => return response,
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return s.bad_request(arrival, format!("cannot read the request body: {e}")),
    };
    match serde_json::from_slice::<SearchRequest>(&body) {
        Ok(request) => search(&s, arrival, &request.query, request.max_results),
        Err(e) => s.bad_request(arrival, format!("invalid search request: {e}")),
    }
}

/// Query string of `GET /v1/search`: `q` (or `query`) and `max_results`.
#[derive(Deserialize)]
struct SearchParams {
    q: Option<String>,
    query: Option<String>,
    max_results: Option<usize>,
}

async fn search_get(State(s): AppState, params: Result<Query<SearchParams>, QueryRejection>) -> Response {
    let arrival = match s.gate(SEARCH_ENDPOINT).await {
        Ok(arrival) => arrival,
        Err(response) => return response,
    };
    match params {
        Ok(Query(p)) => match p.q.or(p.query) {
            Some(query) => search(&s, arrival, &query, p.max_results),
            None => s.bad_request(arrival, "missing query parameter 'q'"),
        },
        Err(e) => s.bad_request(arrival, format!("invalid query string: {e}")),
    }
}

fn search(s: &Shared, arrival: f64, query: &str, max_results: Option<usize>) -> Response {
    if query.trim().is_empty() {
        return s.bad_request(arrival, "'query' must not be empty");
    }
    s.answer(arrival, StatusCode::OK, &api::search_response(&s.name, query, max_results))
}

async fn stats(State(s): AppState) -> Json<Stats> {
    Json(s.stats())
}

/// Answers the counters as they were, and starts them again from zero.
async fn reset_stats(State(s): AppState) -> Json<Stats> {
    Json(s.reset_stats())
}

async fn get_control(State(s): AppState) -> Json<Behaviour> {
    Json(s.behaviour())
}

async fn post_control(State(s): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let parsed = body
        .map_err(|e| format!("cannot read the request body: {e}"))
        .and_then(|body| serde_json::from_slice::<Control>(&body).map_err(|e| format!("invalid control request: {e}")));
    let result = parsed.and_then(|control| s.control(&control).map_err(|e| e.to_string()));
    match result {
        Ok(behaviour) => Json(behaviour).into_response(),
        Err(message) => {
            (StatusCode::BAD_REQUEST, Json(ErrorBody::new("invalid_request_error", message))).into_response()
        }
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(ErrorBody::new("invalid_request_error", "unknown path"))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let b = Behaviour { limit_per_s: 2.0, limit_burst: 3.0, ..Behaviour::default() };
        let t0 = Instant::now();
        let mut bucket = Bucket::for_behaviour(&b, t0).expect("limited");
        assert!((0..3).all(|_| bucket.take(t0).is_ok()));
        let wait = bucket.take(t0).expect_err("empty");
        assert!((wait - 0.5).abs() < 1e-9, "{wait}");
        assert!(bucket.take(t0 + Duration::from_millis(500)).is_ok());
        assert!(bucket.take(t0 + Duration::from_millis(500)).is_err());
        assert!(Bucket::for_behaviour(&Behaviour::default(), t0).is_none());
    }

    #[test]
    fn same_seed_same_verdicts() {
        let b = Behaviour { error_rate: 0.5, rate_429: 0.2, ..Behaviour::default() };
        let run = |seed| {
            let s = Shared::new("p", seed, b);
            (0..50)
                .map(|_| match s.admit(CHAT_ENDPOINT).verdict {
                    Verdict::Serve => 'o',
                    Verdict::Fail => 'f',
                    Verdict::TooMany(_) => 't',
                    Verdict::Limited(_) => 'l',
                })
                .collect::<String>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).contains('o') && run(7).contains('f') && run(7).contains('t'));
    }
}
