//! What the mock has answered, as `GET /stats` shows it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Path counted for `POST /v1/chat/completions`.
pub const CHAT_ENDPOINT: &str = "/v1/chat/completions";
/// Path counted for `GET` and `POST /v1/search`.
pub const SEARCH_ENDPOINT: &str = "/v1/search";
/// Path of the embeddings endpoint, as counted in [`Stats::by_endpoint`].
pub const EMBEDDINGS_ENDPOINT: &str = "/v1/embeddings";
/// Path of the batch-write endpoint (`POST {"records": [...]}`), as counted in [`Stats::by_endpoint`].
pub const RECORDS_ENDPOINT: &str = "/v1/records";

/// Counters of the API endpoints (chat and search; not `/stats`, `/control` or `/healthz`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The mock's provider name.
    pub provider: String,
    /// Milliseconds since the server started.
    pub uptime_ms: f64,
    /// Requests that arrived (counted on arrival, so one whose client went away mid-answer is
    /// here but in no status).
    pub total: u64,
    /// Answers by HTTP status; 200, 400, 429 and 500 are always present.
    pub by_status: BTreeMap<u16, u64>,
    /// Arrivals by endpoint path ([`CHAT_ENDPOINT`], [`SEARCH_ENDPOINT`], [`EMBEDDINGS_ENDPOINT`]).
    pub by_endpoint: BTreeMap<String, u64>,
    /// Arrival times, in milliseconds since the server started, of the requests answered 200,
    /// in increasing order.
    pub accepted_ms: Vec<f64>,
    /// Records stored through [`RECORDS_ENDPOINT`], over all its requests.
    #[serde(default)]
    pub records: u64,
    /// Tokens the mock billed, by model: the `usage` of every chat completion and embedding it
    /// answered 200, as a provider's invoice would count them.
    #[serde(default)]
    pub tokens: BTreeMap<String, Billed>,
    /// The first [`MAX_SEEN`] requests to any path but `/stats`, `/control` and `/healthz`, in
    /// arrival order, with their `Authorization` header: which credentials reached this server.
    #[serde(default)]
    pub requests: Vec<SeenRequest>,
}

/// Most requests kept in [`Stats::requests`].
pub const MAX_SEEN: usize = 10_000;

/// One request as it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path (without the query).
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// Tokens billed for one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billed {
    /// Prompt (input) tokens.
    pub prompt: u64,
    /// Completion (output) tokens.
    pub completion: u64,
}

impl Stats {
    /// Empty counters.
    pub(crate) fn new(provider: &str) -> Stats {
        Stats {
            provider: provider.to_string(),
            uptime_ms: 0.0,
            total: 0,
            by_status: [200, 400, 429, 500].into_iter().map(|s| (s, 0)).collect(),
            by_endpoint: [CHAT_ENDPOINT, SEARCH_ENDPOINT, EMBEDDINGS_ENDPOINT, RECORDS_ENDPOINT]
                .into_iter()
                .map(|e| (e.to_string(), 0))
                .collect(),
            accepted_ms: Vec::new(),
            records: 0,
            tokens: BTreeMap::new(),
            requests: Vec::new(),
        }
    }

    /// Answers given with `status`.
    pub fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// The most requests answered 200 whose arrivals fall in any window of `window_ms`
    /// milliseconds (a half-open window `[t, t + window_ms)`): what a client-side rate limit
    /// let through at worst.
    pub fn max_in_window(&self, window_ms: f64) -> usize {
        let mut times = self.accepted_ms.clone();
        times.sort_by(f64::total_cmp);
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end] - times[start] >= window_ms {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    /// Bills `prompt` and `completion` tokens to `model`.
    pub(crate) fn bill(&mut self, model: &str, prompt: u32, completion: u32) {
        let b = self.tokens.entry(model.to_string()).or_default();
        b.prompt += u64::from(prompt);
        b.completion += u64::from(completion);
    }

    /// The `Authorization` headers of the requests seen, in arrival order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.requests.iter().map(|r| r.authorization.clone()).collect()
    }

    pub(crate) fn seen(&mut self, request: SeenRequest) {
        if self.requests.len() < MAX_SEEN {
            self.requests.push(request);
        }
    }

    pub(crate) fn arrived(&mut self, endpoint: &str) {
        self.total += 1;
        *self.by_endpoint.entry(endpoint.to_string()).or_insert(0) += 1;
    }

    pub(crate) fn answered(&mut self, status: u16, arrival_ms: f64) {
        *self.by_status.entry(status).or_insert(0) += 1;
        if status == 200 {
            self.accepted_ms.push(arrival_ms);
        }
    }

    /// A copy for showing, `accepted_ms` sorted and `uptime_ms` set.
    pub(crate) fn snapshot(&self, uptime_ms: f64) -> Stats {
        let mut out = self.clone();
        out.accepted_ms.sort_by(f64::total_cmp);
        out.uptime_ms = uptime_ms;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_maximum() {
        let mut s = Stats::new("p");
        assert_eq!(s.max_in_window(1000.0), 0);
        for t in [0.0, 100.0, 999.0, 1000.0, 1500.0, 1600.0, 1700.0, 1999.0] {
            s.answered(200, t);
        }
        s.answered(429, 1800.0);
        // [1000, 2000) holds 1000, 1500, 1600, 1700, 1999.
        assert_eq!(s.max_in_window(1000.0), 5);
        assert_eq!(s.max_in_window(1.0), 1);
        assert_eq!(s.count(200), 8);
        assert_eq!(s.count(429), 1);
        assert_eq!(s.count(500), 0);
    }

    #[test]
    fn json_has_string_status_keys() {
        let mut s = Stats::new("p");
        s.arrived(CHAT_ENDPOINT);
        s.answered(200, 2.0);
        let json = serde_json::to_value(s.snapshot(5.0)).expect("serializable");
        assert_eq!(json["by_status"]["200"], 1);
        assert_eq!(json["by_status"]["500"], 0);
        assert_eq!(json["by_endpoint"][CHAT_ENDPOINT], 1);
        assert_eq!(json["accepted_ms"][0], 2.0);
        let back: Stats = serde_json::from_value(json).expect("round trip");
        assert_eq!(back.count(200), 1);
    }
}
