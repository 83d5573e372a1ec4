//! Who may use the HTTP API's task routes (`/v1/...`: task payloads and results, counts, and
//! any route added there later). With `coordinator.api_token` (or `api_token_file`) set, every
//! request needs `Authorization: Bearer <token>` (compared in constant time), from any peer;
//! otherwise 401 with `WWW-Authenticate: Bearer`. With no token set the routes answer only to
//! loopback peers, 403 to anyone else, so a fresh install that binds `0.0.0.0` serves no
//! payloads to the network. `/healthz`, `/readyz` and `/metrics` (added by
//! `taskfleet_service::Service::serve_http` outside this guard) stay open: they carry no
//! payloads or results.
//!
//! The guard wraps the whole API router, its fallback included, so a path or method the router
//! does not know is refused the same way before it answers 404 or 405.

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use taskfleet_config::{ConfigError, CoordinatorConfig, Secret};

/// How the task routes are guarded.
#[derive(Debug)]
pub(crate) enum Access {
    /// Every request must carry this bearer token.
    Token(Secret),
    /// No token is configured: only loopback peers are served.
    LoopbackOnly,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denial {
    /// No `Authorization: Bearer …` header (401).
    MissingToken,
    /// A bearer token that is not the configured one (401).
    WrongToken,
    /// No token is configured and the peer is not on loopback (403).
    NotLoopback,
}

impl Access {
    /// The mode `config` asks for; reads `api_token_file` now.
    pub(crate) fn from_config(config: &CoordinatorConfig) -> Result<Access, ConfigError> {
        Ok(match config.effective_api_token()? {
            Some(token) => Access::Token(token),
            None => Access::LoopbackOnly,
        })
    }

    /// The mode, for the start-up log line (never the token).
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Access::Token(_) => "bearer token required (coordinator.api_token)",
            Access::LoopbackOnly => "loopback peers only (no coordinator.api_token set)",
        }
    }

    /// Whether a request from `peer` with these headers may pass. A request whose peer is
    /// unknown counts as not from loopback.
    pub(crate) fn check(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Result<(), Denial> {
        match self {
            Access::Token(expected) => {
                let given = headers.get(header::AUTHORIZATION).and_then(bearer).ok_or(Denial::MissingToken)?;
                match constant_time_eq(given, expected.expose().as_bytes()) {
                    true => Ok(()),
                    false => Err(Denial::WrongToken),
                }
            }
            Access::LoopbackOnly => match peer.is_some_and(|p| is_loopback(&p)) {
                true => Ok(()),
                false => Err(Denial::NotLoopback),
            },
        }
    }
}

/// True for 127.0.0.0/8, `::1` and their IPv4-mapped forms (a dual-stack listener).
fn is_loopback(peer: &SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let value = value.as_bytes();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares in time that depends only on the lengths (the expected one is not secret enough to
/// matter, and the given one is the caller's own), never on where the bytes first differ.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(!*e);
        diff |= usize::from(std::hint::black_box(g ^ e));
    }
    std::hint::black_box(diff) == 0
}

impl IntoResponse for Denial {
    fn into_response(self) -> Response {
        let (status, kind, challenge, message) = match self {
            Denial::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                Some(r#"Bearer realm="taskfleet""#),
                "this route needs Authorization: Bearer <coordinator.api_token>",
            ),
            Denial::WrongToken => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                Some(r#"Bearer realm="taskfleet", error="invalid_token""#),
                "the bearer token is not coordinator.api_token",
            ),
            Denial::NotLoopback => (
                StatusCode::FORBIDDEN,
                "forbidden",
                None,
                "this coordinator has no coordinator.api_token (TASKFLEET_COORDINATOR_API_TOKEN or \
                 TASKFLEET_COORDINATOR_API_TOKEN_FILE), so its task API answers only to loopback peers; \
                 set one and send Authorization: Bearer <token>",
            ),
        };
        let body = serde_json::json!({ "error": { "kind": kind, "message": message } });
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(challenge) = challenge {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        response
    }
}

/// `routes` behind the guard (their fallback included).
pub(crate) fn protect(routes: Router, access: Arc<Access>) -> Router {
    routes.layer(axum::middleware::from_fn_with_state(access, guard))
}

async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    match access.check(peer, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(denial) => {
            tracing::debug!(?peer, ?denial, path = %request.uri().path(), "HTTP API request refused");
            denial.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = authorization {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn peer(addr: &str) -> Option<SocketAddr> {
        Some(addr.parse().unwrap())
    }

    #[test]
    fn without_a_token_only_loopback_peers_pass() {
        let access = Access::LoopbackOnly;
        for ok in ["127.0.0.1:5000", "127.8.9.10:1", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert_eq!(access.check(peer(ok), &headers(None)), Ok(()), "{ok}");
        }
        for refused in ["192.0.2.2:5000", "10.0.0.1:80", "[fd00::2]:5000", "[::ffff:10.1.2.3]:5000", "0.0.0.0:1"] {
            assert_eq!(access.check(peer(refused), &headers(None)), Err(Denial::NotLoopback), "{refused}");
            let with_any_token = headers(Some(&format!("Bearer {TOKEN}")));
            assert_eq!(access.check(peer(refused), &with_any_token), Err(Denial::NotLoopback), "{refused}");
        }
        assert_eq!(access.check(None, &headers(None)), Err(Denial::NotLoopback), "an unknown peer is refused");
    }

    #[test]
    fn with_a_token_every_peer_needs_it() {
        let access = Access::Token(Secret::from(TOKEN));
        for from in [peer("127.0.0.1:1"), peer("192.0.2.2:1"), None] {
            assert_eq!(access.check(from, &headers(Some(&format!("Bearer {TOKEN}")))), Ok(()));
            assert_eq!(access.check(from, &headers(Some(&format!("bearer  {TOKEN} ")))), Ok(()));
            assert_eq!(access.check(from, &headers(None)), Err(Denial::MissingToken));
            for missing in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", TOKEN, &format!("Bearer{TOKEN}")] {
                assert_eq!(access.check(from, &headers(Some(missing))), Err(Denial::MissingToken), "{missing:?}");
            }
            let wrong = [&TOKEN[..TOKEN.len() - 1], &format!("{TOKEN}x"), "0123456789abcdef-tokeN", "x"];
            for w in wrong {
                assert_eq!(access.check(from, &headers(Some(&format!("Bearer {w}")))), Err(Denial::WrongToken), "{w}");
            }
        }
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn denials_answer_json_with_a_bearer_challenge() {
        let r = Denial::MissingToken.into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"));
        assert!(r.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/json"));
        let r = Denial::WrongToken.into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().contains("invalid_token"));
        let r = Denial::NotLoopback.into_response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(!r.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
