//! Redacting credentials out of connection URLs before they reach a log line or an error
//! message: the one helper every crate uses to show `nats.url`, `database.url` or `redis.url`.

/// Placeholder shown instead of a secret.
pub const REDACTED: &str = "***";

/// Query parameters whose values are secrets (`postgres://host/db?password=…`).
const SECRET_PARAMS: [&str; 4] = ["password", "pass", "token", "auth_token"];

/// `url` with its credentials replaced by `***`: the password of `user:password@`, the whole
/// user part of a NATS URL (`nats://token@host`, where it is a token) and secret query
/// parameters (`?password=…`). Everything else, the user name included, is kept; a string
/// that is not a URL at all comes back unchanged unless it has such parts. Works on malformed
/// URLs too, so an error about a bad URL can quote it.
///
/// ```
/// use taskfleet_config::redact_url;
/// assert_eq!(redact_url("nats://user:secret@host:4222"), "nats://user:***@host:4222");
/// assert_eq!(redact_url("nats://s3cr3t@host:4222"), "nats://***@host:4222");
/// assert_eq!(redact_url("postgres://app@db/fleet"), "postgres://app@db/fleet");
/// ```
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i], &url[i + 3..]),
        None => ("", url),
    };
    let token_scheme = ["", "nats", "tls", "ws", "wss"].iter().any(|s| s.eq_ignore_ascii_case(scheme));
    // The user part ends at the last `@`: a password may hold `/`, `?` or `#` unescaped, and
    // redacting too much of an odd URL is better than logging part of a secret.
    let host_from = rest.rfind('@').unwrap_or(0);
    let end = rest[host_from..].find(['/', '?', '#']).map_or(rest.len(), |i| host_from + i);
    let (authority, tail) = rest.split_at(end);
    let mut out = String::with_capacity(url.len());
    if url.len() != rest.len() {
        out.push_str(&url[..url.len() - rest.len()]);
    }
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(REDACTED);
                }
                None if token_scheme && !userinfo.is_empty() => out.push_str(REDACTED),
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    out.push_str(&redact_query(tail));
    out
}

/// Each comma-separated entry of `urls` redacted by [`redact_url`], joined by `,`.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',').map(|u| redact_url(u.trim())).collect::<Vec<_>>().join(",")
}

/// `tail` (path, query, fragment) with the values of secret query parameters redacted.
fn redact_query(tail: &str) -> String {
    let Some(q) = tail.find('?') else { return tail.to_string() };
    let (path, query) = tail.split_at(q + 1);
    let (query, fragment) = match query.find('#') {
        Some(h) => query.split_at(h),
        None => (query, ""),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if SECRET_PARAMS.iter().any(|s| s.eq_ignore_ascii_case(key)) => {
                format!("{key}={REDACTED}")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{path}{}{fragment}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::{redact_url, redact_urls};

    #[test]
    fn passwords_and_tokens_are_redacted() {
        let cases = [
            ("nats://user:pa55@host:4222", "nats://user:***@host:4222"),
            ("tls://user:p@ss:word@host:4222", "tls://user:***@host:4222"),
            ("wss://tok3n@host:443/ws", "wss://***@host:443/ws"),
            ("user:pw@host:4222", "user:***@host:4222"),
            ("tok3n@host:4222", "***@host:4222"),
            ("NATS://tok3n@host", "NATS://***@host"),
            (
                "postgres://app:hunter2@db:5432/fleet?sslmode=require",
                "postgres://app:***@db:5432/fleet?sslmode=require",
            ),
            ("postgres://db/fleet?user=app&password=hunter2#x", "postgres://db/fleet?user=app&password=***#x"),
            ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
            ("rediss://default:hunter2@cache:6380", "rediss://default:***@cache:6380"),
            ("postgres://app:ab/c?d#e@db:5432/fleet", "postgres://app:***@db:5432/fleet"),
            ("nats://tok/en@host:4222", "nats://***@host:4222"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn urls_without_secrets_are_unchanged() {
        for url in [
            "nats://127.0.0.1:4222",
            "127.0.0.1:4222",
            "postgres://postgres@127.0.0.1:5432/test",
            "redis://127.0.0.1:6379",
            "ws://[::1]:8080/path?x=1",
            "",
            "not a url",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn a_list_is_redacted_entry_by_entry() {
        assert_eq!(
            redact_urls("nats://a:x@h1:4222, tok@h2:4222 ,nats://h3"),
            "nats://a:***@h1:4222,***@h2:4222,nats://h3"
        );
    }
}
