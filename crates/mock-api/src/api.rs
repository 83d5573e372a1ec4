//! Wire types of the mocked APIs and the deterministic answers built from them.

use serde::{Deserialize, Deserializer, Serialize};

/// Longest part of the last user message echoed back in a chat completion, in characters.
pub const ECHO_MAX_CHARS: usize = 200;
/// Results a search returns when the request does not say how many.
pub const DEFAULT_SEARCH_RESULTS: usize = 5;
/// Most results a search returns, whatever the request asks.
pub const MAX_SEARCH_RESULTS: usize = 20;

/// An OpenAI-compatible chat completion request (the fields the mock reads; others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// Model name, echoed back in the response.
    pub model: String,
    /// Conversation so far; must not be empty.
    pub messages: Vec<ChatMessage>,
    /// Longest completion, in tokens: a longer reply is cut and finishes with `"length"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; accepted and ignored (answers are deterministic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// Text of the message. On input a string, `null`, missing, or an array of
    /// `{"type":"text","text":…}` parts (their texts are joined).
    #[serde(default, deserialize_with = "content_text")]
    pub content: String,
}

/// An OpenAI-shaped chat completion response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// `chatcmpl-mock-<n>`: unique per answer, so a test can tell a cached answer from a fresh one.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix time of the answer, in seconds.
    pub created: u64,
    /// The request's model.
    pub model: String,
    /// Exactly one choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts (see [`count_tokens`]).
    pub usage: Usage,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The assistant's reply.
    pub message: ChatMessage,
    /// `stop`, or `length` when `max_tokens` cut the reply.
    pub finish_reason: String,
}

/// Token counts of a chat completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Sum of [`count_tokens`] over the request's message contents.
    pub prompt_tokens: u32,
    /// [`count_tokens`] of the reply.
    pub completion_tokens: u32,
    /// `prompt_tokens + completion_tokens`.
    pub total_tokens: u32,
}

/// A search request: the JSON body of `POST /v1/search`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchRequest {
    /// What to search for; must not be blank.
    pub query: String,
    /// How many results ([`DEFAULT_SEARCH_RESULTS`] if absent, at most [`MAX_SEARCH_RESULTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_results: Option<usize>,
}

/// The answer to a search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResponse {
    /// The mock's provider name.
    pub provider: String,
    /// The query, as received.
    pub query: String,
    /// Results, the same for the same query and provider.
    pub results: Vec<SearchResult>,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    /// Title.
    pub title: String,
    /// A URL under the reserved `.invalid` domain.
    pub url: String,
    /// A short text naming the provider and the query.
    pub snippet: String,
}

/// Body of every error answer, as OpenAI shapes it: `{"error":{"message":…,"type":…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong, for people.
    pub message: String,
    /// `invalid_request_error` (400), `rate_limit_error` (429) or `server_error` (500).
    #[serde(rename = "type")]
    pub kind: String,
}

impl ErrorBody {
    /// An error body of type `kind`.
    pub fn new(kind: &str, message: impl Into<String>) -> ErrorBody {
        ErrorBody { error: ErrorDetail { message: message.into(), kind: kind.to_string() } }
    }
}

/// The mock's token count of a text: `ceil(characters / 4)`.
pub fn count_tokens(text: &str) -> u32 {
    let chars = text.chars().count();
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

/// The reply the mock named `name` gives to a conversation whose last user message (or last
/// message, if no user spoke) is `last`: `[<name>] echo: <last>`, `last` cut to
/// [`ECHO_MAX_CHARS`] characters (and `…` added when cut).
pub fn echo_content(name: &str, last: &str) -> String {
    let mut echoed: String = last.chars().take(ECHO_MAX_CHARS).collect();
    if last.chars().nth(ECHO_MAX_CHARS).is_some() {
        echoed.push('…');
    }
    format!("[{name}] echo: {echoed}")
}

/// First line of a user message that asks the mock to score a text (see [`judge_content`]).
pub const JUDGE_MARKER: &str = "SCORE";

/// The judge's answer, when the last user message asks for one: a message whose first line is
/// [`JUDGE_MARKER`], then optionally a line `required: term, term, …`, then a line `---` and the
/// text to judge, is answered with the JSON `{"score": s, "missing": [terms]}`.
///
/// With `required` terms the score is the fraction of them found in the text (case-insensitive
/// substring), and `missing` lists the others: a reviser that adds what the judge found missing
/// gets a higher score next time. Without, the score is a uniform draw in `[0, 1)` fixed by the
/// text's hash (three decimals), and `missing` is empty. Equal texts always get equal scores,
/// whichever model judges them.
pub fn judge_content(last: &str) -> Option<String> {
    let rest = last.strip_prefix(JUDGE_MARKER)?;
    let rest = rest.strip_prefix('\n').or_else(|| rest.strip_prefix("\r\n"))?;
    let (head, text) = match rest.split_once("\n---\n") {
        Some((head, text)) => (head, text),
        None => ("", rest.strip_prefix("---\n").unwrap_or(rest)),
    };
    let required: Vec<&str> = head
        .lines()
        .find_map(|l| l.trim().strip_prefix("required:"))
        .map(|terms| terms.split(',').map(str::trim).filter(|t| !t.is_empty()).collect())
        .unwrap_or_default();
    let (score, missing) = if required.is_empty() {
        (f64::from(fnv1a(text.as_bytes()) % 1000) / 1000.0, Vec::new())
    } else {
        let lower = text.to_lowercase();
        let missing: Vec<&str> = required.iter().copied().filter(|t| !lower.contains(&t.to_lowercase())).collect();
        let found = required.len() - missing.len();
        (found as f64 / required.len() as f64, missing)
    };
    Some(serde_json::json!({ "score": (score * 1000.0).round() / 1000.0, "missing": missing }).to_string())
}

/// Checks a parsed chat request for what serde cannot: at least one message.
pub(crate) fn validate_chat(req: &ChatRequest) -> Result<(), String> {
    if req.messages.is_empty() {
        return Err("'messages' must contain at least one message".to_string());
    }
    if req.model.trim().is_empty() {
        return Err("'model' must not be empty".to_string());
    }
    Ok(())
}

/// The completion for `req` (already validated), with id `chatcmpl-mock-<seq>`.
pub(crate) fn chat_response(name: &str, req: &ChatRequest, seq: u64, created: u64) -> ChatResponse {
    let last = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .or_else(|| req.messages.last())
        .map(|m| m.content.as_str())
        .unwrap_or_default();
    let mut content = judge_content(last).unwrap_or_else(|| echo_content(name, last));
    let mut finish_reason = "stop";
    if let Some(max) = req.max_tokens
        && count_tokens(&content) > max
    {
        let keep = usize::try_from(max).unwrap_or(usize::MAX).saturating_mul(4);
        content = content.chars().take(keep).collect();
        finish_reason = "length";
    }
    let prompt_tokens = req.messages.iter().map(|m| count_tokens(&m.content)).fold(0u32, u32::saturating_add);
    let completion_tokens = count_tokens(&content);
    ChatResponse {
        id: format!("chatcmpl-mock-{seq}"),
        object: "chat.completion".to_string(),
        created,
        model: req.model.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessage { role: "assistant".to_string(), content },
            finish_reason: finish_reason.to_string(),
        }],
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        },
    }
}

/// The results the provider `name` returns for `query`.
pub(crate) fn search_response(name: &str, query: &str, max_results: Option<usize>) -> SearchResponse {
    let n = max_results.unwrap_or(DEFAULT_SEARCH_RESULTS).min(MAX_SEARCH_RESULTS);
    let hash = fnv1a(query.as_bytes());
    let provider = slug(name);
    let topic = slug(query);
    let results = (1..=n)
        .map(|i| SearchResult {
            title: format!("{query} — result {i}"),
            url: format!("https://{provider}.invalid/{topic}-{hash:08x}/{i}"),
            snippet: format!("[{name}] result {i} of {n} for \"{query}\""),
        })
        .collect();
    SearchResponse { provider: name.to_string(), query: query.to_string(), results }
}

/// Lower-case ASCII letters and digits of `text`, other runs turned into one `-`, at most 40
/// characters; `x` if nothing is left.
fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if out.len() >= 40 {
            break;
        }
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_end_matches('-');
    if trimmed.is_empty() { "x".to_string() } else { trimmed.to_string() }
}

/// 32-bit FNV-1a: stable across Rust versions, unlike `DefaultHasher` (the mock's answers and
/// the examples' stand-in choices derive from it, so runs are reproducible).
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// Reads message content given as a string, `null`, or an array of text parts.
fn content_text<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    struct Part {
        #[serde(default)]
        text: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
    }
    Ok(match Option::<Content>::deserialize(de)? {
        None => String::new(),
        Some(Content::Text(s)) => s,
        Some(Content::Parts(parts)) => parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> ChatRequest {
        serde_json::from_str(json).expect("valid request")
    }

    #[test]
    fn tokens_are_a_quarter_of_the_characters_rounded_up() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("abcd"), 1);
        assert_eq!(count_tokens("abcde"), 2);
        assert_eq!(count_tokens("ééééé"), 2, "characters, not bytes");
    }

    #[test]
    fn echo_is_cut_on_characters() {
        let long = "é".repeat(ECHO_MAX_CHARS + 5);
        let out = echo_content("p", &long);
        assert_eq!(out, format!("[p] echo: {}…", "é".repeat(ECHO_MAX_CHARS)));
        assert_eq!(echo_content("p", "hi"), "[p] echo: hi");
    }

    #[test]
    fn reply_echoes_the_last_user_message_and_counts_tokens() {
        let req = request(
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":"first"},{"role":"assistant","content":null},
                {"role":"user","content":[{"type":"text","text":"second"}]}]}"#,
        );
        let a = chat_response("p", &req, 1, 0);
        let b = chat_response("p", &req, 2, 0);
        assert_eq!(a.choices[0].message.content, "[p] echo: second");
        assert_eq!(a.choices, b.choices, "same input, same answer");
        assert_ne!(a.id, b.id);
        assert_eq!(a.usage.prompt_tokens, 6, "2 + 2 + 0 (null) + 2");
        assert_eq!(a.usage.completion_tokens, count_tokens("[p] echo: second"));
        assert_eq!(a.usage.total_tokens, a.usage.prompt_tokens + a.usage.completion_tokens);
        assert_eq!(a.choices[0].finish_reason, "stop");
    }

    #[test]
    fn the_judge_scores_required_terms_or_a_hash() {
        let scored = |m: &str| -> serde_json::Value {
            serde_json::from_str(&judge_content(m).expect("a judge answer")).expect("JSON")
        };
        let partial = scored("SCORE\nrequired: alpha, Beta, gamma, delta\n---\nAlpha and beta, no more");
        assert_eq!(partial["score"], 0.5);
        assert_eq!(partial["missing"], serde_json::json!(["gamma", "delta"]));
        let full = scored("SCORE\nrequired: alpha\n---\nALPHA");
        assert_eq!(full["score"], 1.0);
        let a = scored("SCORE\n---\ncandidate one");
        assert_eq!(a, scored("SCORE\n---\ncandidate one"), "deterministic");
        assert_ne!(a["score"], scored("SCORE\n---\ncandidate two")["score"]);
        let s = a["score"].as_f64().expect("a number");
        assert!((0.0..1.0).contains(&s), "{s}");
        assert!(judge_content("score this").is_none(), "only the marker line asks");
        let req = request(r#"{"model":"m","messages":[{"role":"user","content":"SCORE\n---\nx"}]}"#);
        let content = chat_response("p", &req, 1, 0).choices[0].message.content.clone();
        assert!(serde_json::from_str::<serde_json::Value>(&content).is_ok_and(|v| v["score"].is_number()), "{content}");
    }

    #[test]
    fn max_tokens_cuts_the_reply() {
        let req = request(r#"{"model":"m","max_tokens":2,"messages":[{"role":"user","content":"a long question"}]}"#);
        let out = chat_response("p", &req, 1, 0);
        assert_eq!(out.choices[0].message.content, "[p] echo");
        assert_eq!(out.choices[0].finish_reason, "length");
        assert_eq!(out.usage.completion_tokens, 2);
    }

    #[test]
    fn validation_rejects_empty_conversations() {
        assert!(validate_chat(&request(r#"{"model":"m","messages":[]}"#)).is_err());
        assert!(validate_chat(&request(r#"{"model":" ","messages":[{"role":"user"}]}"#)).is_err());
        assert!(validate_chat(&request(r#"{"model":"m","messages":[{"role":"user"}]}"#)).is_ok());
        assert!(serde_json::from_str::<ChatRequest>(r#"{"messages":[]}"#).is_err(), "model is required");
        assert!(serde_json::from_str::<ChatRequest>(r#"{"model":"m","messages":[{"content":"x"}]}"#).is_err());
    }

    #[test]
    fn search_is_deterministic_and_bounded() {
        let a = search_response("Web Search", "rust async", Some(3));
        assert_eq!(a, search_response("Web Search", "rust async", Some(3)));
        assert_eq!(a.results.len(), 3);
        assert!(a.results[0].url.starts_with("https://web-search.invalid/rust-async-"), "{}", a.results[0].url);
        assert_ne!(a.results[0].url, search_response("Web Search", "rust sync", Some(3)).results[0].url);
        assert_eq!(search_response("p", "q", None).results.len(), DEFAULT_SEARCH_RESULTS);
        assert_eq!(search_response("p", "q", Some(1000)).results.len(), MAX_SEARCH_RESULTS);
        assert_eq!(slug("¿¿"), "x");
    }
}
