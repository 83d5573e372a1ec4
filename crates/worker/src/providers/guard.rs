//! Where the `http` handler may send a request: the `providers.url_hosts` allow-list for `url`
//! targets, the refusal of loopback, private, link-local, CGNAT, unspecified and multicast
//! addresses (unless `providers.allow_private_addresses` lets them through) after DNS
//! resolution and on every redirect, and the joining of a payload's `path` to a provider's base
//! URL so that it can never change the host.
//!
//! The operator's own configuration is trusted: a provider's host (from `providers.urls`) may
//! resolve to any address and a redirect that stays on it (same scheme, host and port) is
//! followed. Anything a payload chooses (a `url`, or a redirect off the provider's host) must be
//! on the allow-list and reach only allowed addresses.

use crate::TaskError;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use taskfleet_config::{PrivateAllowance, ProvidersConfig};

/// Most redirects followed for one request.
pub(super) const MAX_REDIRECTS: usize = 5;

/// A request the rules refuse: a fatal error of the task, never a failure of a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refused {
    /// `url_not_allowed`, `address_not_allowed`, `redirect_not_allowed`, `too_many_redirects`.
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    fn new(code: &'static str, message: String) -> Refused {
        Refused { code, message }
    }

    pub(super) fn into_task_error(self) -> TaskError {
        TaskError::fatal(self.message).with_code(self.code)
    }

    /// The refusal behind a failed request, if the rules made it fail (the resolver's or the
    /// redirect policy's error, somewhere in its source chain).
    pub(super) fn behind(e: &reqwest::Error) -> Option<Refused> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(r) = err.downcast_ref::<Refused>() {
                return Some(r.clone());
            }
            source = err.source();
        }
        None
    }
}

/// The rules, from the configuration.
#[derive(Debug)]
pub(super) struct Guard {
    url_hosts: Vec<String>,
    allowance: PrivateAllowance,
    /// Hosts of `providers.urls` (lower case, IPv6 without brackets).
    provider_hosts: BTreeSet<String>,
}

/// A host as compared: lower case, without a trailing dot or IPv6 brackets.
fn normal(host: &str) -> String {
    host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

impl Guard {
    pub(super) fn new(config: &ProvidersConfig) -> Guard {
        Guard {
            url_hosts: config.url_hosts.iter().map(|h| normal(h.trim())).collect(),
            // Validated with the configuration; a program building its own config unchecked
            // gets nothing let through.
            allowance: config.private_allowance().unwrap_or(PrivateAllowance::Ranges(Vec::new())),
            provider_hosts: config
                .urls
                .values()
                .filter_map(|u| Url::parse(u).ok())
                .filter_map(|u| u.host_str().map(normal))
                .collect(),
        }
    }

    /// Whether `providers.url_hosts` names `host`.
    pub(super) fn host_listed(&self, host: &str) -> bool {
        let host = normal(host);
        let ip = host.parse::<IpAddr>().ok();
        self.url_hosts.iter().any(|rule| {
            rule == "*"
                || *rule == host
                || (ip.is_some() && rule.parse::<IpAddr>().ok() == ip)
                || rule.strip_prefix("*.").is_some_and(|suffix| {
                    host.len() > suffix.len() + 1
                        && host.ends_with(suffix)
                        && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                })
        })
    }

    /// Whether a request may reach `ip`.
    pub(super) fn address_allowed(&self, ip: IpAddr) -> bool {
        !restricted(ip) || self.allowance.allows(ip)
    }

    /// Checks a URL a payload or a redirect chose: an http(s) URL whose host is on the
    /// allow-list and, when it is an IP address, an allowed one (names are checked when they
    /// are resolved).
    pub(super) fn check_url(&self, url: &Url, what: &str) -> Result<(), Refused> {
        let code = if what == "url" { "url_not_allowed" } else { "redirect_not_allowed" };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused::new(code, format!("{what} {}: only http and https are allowed", url.as_str())));
        }
        let Some(host) = url.host_str() else {
            return Err(Refused::new(code, format!("{what} {} has no host", url.as_str())));
        };
        let name = host.to_string();
        if !self.host_listed(&name) {
            let why = if self.url_hosts.is_empty() {
                "providers.url_hosts is empty, so no url may be called".to_string()
            } else {
                format!("{name} is not in providers.url_hosts")
            };
            return Err(Refused::new(code, format!("{what} {}: {why}", url.as_str())));
        }
        // The URL parser has normalized IP forms (`0x7f.1`, `2130706433`) to dotted quads.
        if let Ok(ip) = normal(&name).parse::<IpAddr>()
            && !self.address_allowed(ip)
        {
            return Err(address_refused(&name, &[ip]));
        }
        Ok(())
    }

    /// The redirect policy: at most [`MAX_REDIRECTS`]; a redirect that stays on the first
    /// request's scheme, host and port is followed when `trusted_start` (a provider's own host),
    /// any other must pass [`Guard::check_url`]. (reqwest drops `Authorization` on a redirect to
    /// another host.)
    pub(super) fn redirect_policy(self: &Arc<Self>, trusted_start: bool) -> reqwest::redirect::Policy {
        let guard = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                let e = Refused::new("too_many_redirects", format!("more than {MAX_REDIRECTS} redirects"));
                return attempt.error(e);
            }
            let next = attempt.url();
            let first = &attempt.previous()[0];
            if trusted_start && same_origin(first, next) {
                return attempt.follow();
            }
            match guard.check_url(next, "redirect to") {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        })
    }

    /// A DNS resolver that drops the addresses the rules refuse (names in `trusted`, the
    /// providers' hosts, keep all theirs).
    pub(super) fn resolver(self: &Arc<Self>, trust_providers: bool) -> GuardedResolver {
        let trusted = if trust_providers { self.provider_hosts.clone() } else { BTreeSet::new() };
        GuardedResolver { guard: self.clone(), trusted: Arc::new(trusted) }
    }
}

fn address_refused(host: &str, addrs: &[IpAddr]) -> Refused {
    let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
    let what = if host.parse::<IpAddr>().is_ok() || normal(host).parse::<IpAddr>().is_ok() {
        format!("address {host} is refused")
    } else {
        format!("{host} resolves only to refused addresses ({})", list.join(", "))
    };
    Refused::new(
        "address_not_allowed",
        format!(
            "{what}: loopback, private, link-local, CGNAT, unspecified and multicast addresses need \
             providers.allow_private_addresses"
        ),
    )
}

/// Same scheme, host and port.
pub(super) fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme() && a.host() == b.host() && a.port_or_known_default() == b.port_or_known_default()
}

/// Loopback, private (RFC 1918, fc00::/7), link-local (169.254/16, fe80::/10), unspecified,
/// CGNAT (100.64/10), multicast, broadcast, and the IPv4-mapped / IPv4-compatible / NAT64 forms
/// of these.
pub(super) fn restricted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => restricted_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return restricted_v4(v4);
            }
            let s = v6.segments();
            // IPv4-compatible (::a.b.c.d, deprecated) and the NAT64 prefix 64:ff9b::/96.
            if (s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified()) || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                return restricted_v4(v4);
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                // Deprecated site-local fec0::/10.
                || (s[0] & 0xffc0) == 0xfec0
        }
    }
}

fn restricted_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
}

/// The DNS resolver of the clients: the system's (`getaddrinfo`), keeping only allowed addresses.
#[derive(Debug, Clone)]
pub(super) struct GuardedResolver {
    guard: Arc<Guard>,
    trusted: Arc<BTreeSet<String>>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let this = self.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if this.trusted.contains(&normal(&host)) {
                return Ok(Box::new(addrs.into_iter()) as Addrs);
            }
            let (kept, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
                addrs.into_iter().partition(|a| this.guard.address_allowed(a.ip()));
            if kept.is_empty() && !refused.is_empty() {
                let ips: Vec<IpAddr> = refused.iter().map(SocketAddr::ip).collect();
                return Err(Box::new(address_refused(&host, &ips)) as Box<dyn std::error::Error + Send + Sync>);
            }
            if !refused.is_empty() {
                tracing::debug!(host, refused = refused.len(), "dropped refused addresses of a resolved name");
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// Joins a payload's `path` to a provider's base URL: `path` is empty or starts with `/`, and
/// has no `@`, `\`, `//` at the start, `.` or `..` segment (also percent-encoded), scheme,
/// fragment or control character; an optional `?query` is kept. The result has the base's
/// scheme, host and port, or the path is refused (`invalid_path`).
pub(super) fn join_path(base: &str, path: &str) -> Result<Url, TaskError> {
    let invalid = |why: &str| TaskError::fatal(format!("path {path:?} {why}")).with_code("invalid_path");
    let base_url = Url::parse(base)
        .map_err(|e| TaskError::fatal(format!("provider url {base:?}: {e}")).with_code("invalid_provider_url"))?;
    if path.is_empty() {
        return Ok(base_url);
    }
    if !path.starts_with('/') {
        return Err(invalid("must start with `/`"));
    }
    if path.starts_with("//") {
        return Err(invalid("must not start with `//`"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(invalid("must not contain control characters"));
    }
    for (c, name) in [('@', "`@`"), ('\\', "`\\`"), ('#', "a fragment (`#`)")] {
        if path.contains(c) {
            return Err(invalid(&format!("must not contain {name}")));
        }
    }
    let (segments, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
    if segments.contains("://") || segments.split('/').next().is_some_and(|s| s.contains(':')) {
        return Err(invalid("must not contain a scheme"));
    }
    for segment in segments.split('/') {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err(invalid("must not contain `.` or `..` segments"));
        }
        if segment.to_ascii_lowercase().contains("%2f") || segment.to_ascii_lowercase().contains("%5c") {
            return Err(invalid("must not contain an encoded `/` or `\\`"));
        }
    }
    let mut url = base_url.clone();
    let joined = format!("{}{}", base_url.path().trim_end_matches('/'), segments);
    url.set_path(&joined);
    if let Some(q) = query {
        let merged = match base_url.query() {
            Some(b) if !b.is_empty() => format!("{b}&{q}"),
            _ => q.to_string(),
        };
        url.set_query(Some(&merged));
    }
    if !same_origin(&url, &base_url) || url.username() != base_url.username() || url.password() != base_url.password() {
        return Err(invalid("would leave the provider's host"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(hosts: &[&str], private: &[&str]) -> Guard {
        let config = ProvidersConfig {
            url_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            allow_private_addresses: private.iter().map(|s| s.to_string()).collect(),
            ..ProvidersConfig::default()
        };
        Guard::new(&config)
    }

    #[test]
    fn restricted_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(restricted(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "100.128.0.1", "172.32.0.1", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(!restricted(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn allow_list_and_private_allowance() {
        let g = guard(&["api.example.com", "*.example.org", "127.0.0.1", "[::ffff:10.0.0.1]"], &["127.0.0.1/32"]);
        assert!(g.host_listed("API.example.com"));
        assert!(g.host_listed("[::ffff:a00:1]"));
        assert!(g.host_listed("a.b.example.org"));
        assert!(!g.host_listed("example.org"));
        assert!(!g.host_listed("badexample.org"));
        assert!(!g.host_listed("api.example.com.evil.net"));
        let check = |u: &str| g.check_url(&Url::parse(u).unwrap(), "url").map_err(|e| e.code);
        assert_eq!(check("http://127.0.0.1:8080/x"), Ok(()));
        assert_eq!(check("http://api.example.com/x"), Ok(()));
        assert_eq!(check("http://openai/x"), Err("url_not_allowed"));
        assert_eq!(check("ftp://api.example.com/x"), Err("url_not_allowed"));
        let g = guard(&["*"], &[]);
        let check = |u: &str| g.check_url(&Url::parse(u).unwrap(), "url").map_err(|e| e.code);
        for u in [
            "http://127.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0/",
        ] {
            assert_eq!(check(u), Err("address_not_allowed"), "{u}");
        }
        assert_eq!(check("http://93.184.216.34/"), Ok(()));
        let empty = guard(&[], &[]);
        let e = empty.check_url(&Url::parse("http://example.com/").unwrap(), "url").unwrap_err();
        assert!(e.message.contains("providers.url_hosts is empty"), "{e}");
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        let g = Arc::new(guard(&["*"], &[]));
        let e = match g.resolver(false).resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost resolved"),
            Err(e) => e,
        };
        let refused = e.downcast_ref::<Refused>().expect("a refusal");
        assert_eq!(refused.code, "address_not_allowed");
        let allowed = Arc::new(guard(&["*"], &["all"]));
        let addrs: Vec<_> = allowed.resolver(false).resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    #[test]
    fn paths_are_joined_and_cannot_change_the_host() {
        let base = "http://127.0.0.1:9000/v1";
        let ok = |p: &str| join_path(base, p).unwrap().to_string();
        assert_eq!(ok(""), "http://127.0.0.1:9000/v1");
        assert_eq!(ok("/search"), "http://127.0.0.1:9000/v1/search");
        assert_eq!(ok("/a%20b/c"), "http://127.0.0.1:9000/v1/a%20b/c");
        assert_eq!(ok("/search?q=1"), "http://127.0.0.1:9000/v1/search?q=1");
        assert_eq!(join_path("http://h/", "/x").unwrap().to_string(), "http://h/x");
        for bad in [
            ".evil.com/x",
            "@evil.com/",
            "/@evil.com/",
            "/../../x",
            "/a/%2e%2e/x",
            "/./x",
            "//evil.com/x",
            "/a\\b",
            "http://evil.com/x",
            "/x\n",
            "/x#y",
            "/a%2fb",
            "evil.com",
        ] {
            let e = join_path(base, bad).unwrap_err();
            assert_eq!(e.code, "invalid_path", "{bad}: {e:?}");
        }
    }
}
