//! The fleet-wide policies kept in Redis (rate limits, result cache, circuit breakers) and the
//! outside providers the built-in `http` and `llm.chat` handlers call.

use crate::{CacheSpec, Chain, ConfigError, LimitNames, RateLimitSpec, SemanticCacheSpec, TokenPrice};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Rate limits, cache policies and circuit breakers, shared by every worker through Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoliciesConfig {
    /// Named rate limits, e.g. `openai = "500/min burst 50"`, `tavily = "5/s"`: a rate per
    /// period (`s`, `min`, `h`, or a duration such as `10s`) and an optional burst (default 1).
    /// Enforced across the fleet (GCRA in Redis). Env: `TASKFLEET_RATE_LIMITS=openai=500/min burst 50,tavily=5/s`.
    pub rate_limits: BTreeMap<String, RateLimitSpec>,
    /// Limits every task of a kind needs, `+`-separated, e.g. `llm.chat = "openai"`. Tasks can
    /// name more in their envelope (`limits`).
    pub kind_limits: BTreeMap<String, LimitNames>,
    /// Result cache policy per kind: a TTL, optionally followed by `by` and the `+`-separated
    /// payload fields that make the key, e.g. `llm.chat = "1h by model+messages+temperature"`;
    /// without `by` the whole payload is the key.
    pub cache: BTreeMap<String, CacheSpec>,
    /// Semantic cache policy per kind: a TTL, `by` the payload field whose string is the key
    /// text, an optional `threshold` (least cosine similarity of a hit, default 0.8), the
    /// embedding `model` (a key of `providers.models`, called at `POST {url}/embeddings`) and an
    /// optional `max` (most entries kept, the oldest dropped first; default 100000), e.g.
    /// `"content.article" = "30d by keyword threshold 0.8 model text-embedding-3-small max 50000"`.
    /// A stored result of the same kind whose key text is that similar is a hit. A kind has
    /// either this or `cache`. Env: `TASKFLEET_SEMANTIC_CACHE=content.article=30d by keyword model emb`.
    pub semantic_cache: BTreeMap<String, SemanticCacheSpec>,
    /// Longest a task's semantic cache lookup at admission (embedding the key text, then the
    /// search) may take: past it the task runs without the cache (`outcome="bypass"`), so a
    /// slow embedding provider delays tasks by at most this much.
    #[serde(with = "humantime_serde")]
    pub semantic_lookup_timeout: Duration,
    /// Largest result stored in the cache, in bytes (larger results are not cached).
    pub cache_max_bytes: usize,
    /// How long a task whose identical twin is running waits for the twin's result before
    /// running itself (single-flight lease).
    #[serde(with = "humantime_serde")]
    pub single_flight_wait: Duration,
    /// How long a single-flight lease lasts unless renewed: the task computing a cached result
    /// renews it every third of this while it runs, so a worker that dies holding it (killed,
    /// lost) lets it lapse within this and an identical task waiting for it runs instead.
    #[serde(with = "humantime_serde")]
    pub cache_lease: Duration,
    /// Failures within `breaker_window` that open a dependency's circuit breaker.
    pub breaker_failures: u32,
    /// Window in which failures are counted.
    #[serde(with = "humantime_serde")]
    pub breaker_window: Duration,
    /// How long an open breaker stays open before letting trial calls through (half-open).
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Successful trial calls that close a half-open breaker.
    pub breaker_successes: u32,
    /// How long a task waits (deferred, without counting an attempt) for one of its providers'
    /// breakers to close; after that the attempt fails with `breaker_open` and is retried with
    /// backoff, so a dependency that stays down ends its tasks `dead` instead of holding them.
    #[serde(with = "humantime_serde")]
    pub breaker_max_wait: Duration,
    /// How far ahead a task may book a rate-limit token: it then waits for its slot (in memory,
    /// without a slot) and runs without asking again. Longer horizons save Redis round trips on
    /// a saturated limit; shorter ones let more urgent tasks get tokens sooner.
    #[serde(with = "humantime_serde")]
    pub rate_limit_horizon: Duration,
    /// With Redis unreachable, each worker enforces this fraction of every rate limit on its
    /// own (about 1 / the number of workers).
    pub local_limit_share: f64,
    /// A task deferred (no rate-limit token, every provider's breaker open) for up to this long
    /// waits in its worker's memory, without a slot and without counting an attempt; a longer
    /// deferral hands it to the coordinator, which dispatches it again when the delay has
    /// passed (counting neither an attempt nor a delivery).
    #[serde(with = "humantime_serde")]
    pub defer_hold_max: Duration,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        PoliciesConfig {
            rate_limits: BTreeMap::new(),
            kind_limits: BTreeMap::new(),
            cache: BTreeMap::new(),
            semantic_cache: BTreeMap::new(),
            semantic_lookup_timeout: Duration::from_secs(2),
            cache_max_bytes: 1 << 20,
            single_flight_wait: Duration::from_secs(60),
            cache_lease: Duration::from_secs(10),
            breaker_failures: 5,
            breaker_window: Duration::from_secs(30),
            breaker_cooldown: Duration::from_secs(15),
            breaker_successes: 2,
            breaker_max_wait: Duration::from_secs(300),
            rate_limit_horizon: Duration::from_secs(1),
            local_limit_share: 0.25,
            defer_hold_max: Duration::from_secs(60),
        }
    }
}

impl PoliciesConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for (kind, names) in &self.kind_limits {
            if let Some(name) = names.0.iter().find(|name| !self.rate_limits.contains_key(*name)) {
                return Err(ConfigError::Invalid {
                    field: "policies.kind_limits",
                    message: format!("{kind} needs limit {name:?}, which policies.rate_limits does not define"),
                });
            }
        }
        if let Some(kind) = self.semantic_cache.keys().find(|kind| self.cache.contains_key(*kind)) {
            return Err(ConfigError::Invalid {
                field: "policies.semantic_cache",
                message: format!("{kind} has a policy in policies.cache too; a kind has one cache or the other"),
            });
        }
        if self.semantic_lookup_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                field: "policies.semantic_lookup_timeout",
                message: "must be greater than 0".into(),
            });
        }
        if self.breaker_failures == 0 || self.breaker_successes == 0 {
            return Err(ConfigError::Invalid {
                field: "policies.breaker_failures",
                message: "breaker_failures and breaker_successes must be at least 1".into(),
            });
        }
        if self.cache_lease < Duration::from_millis(30) {
            return Err(ConfigError::Invalid {
                field: "policies.cache_lease",
                message: "must be at least 30ms (it is renewed every third of itself)".into(),
            });
        }
        if self.rate_limit_horizon > self.defer_hold_max {
            return Err(ConfigError::Invalid {
                field: "policies.rate_limit_horizon",
                message: "must not exceed policies.defer_hold_max (a booked token must be waited for in memory)".into(),
            });
        }
        if !(self.local_limit_share > 0.0 && self.local_limit_share <= 1.0) {
            return Err(ConfigError::Invalid {
                field: "policies.local_limit_share",
                message: format!("{} is outside (0, 1]", self.local_limit_share),
            });
        }
        Ok(())
    }
}

/// Outside services the built-in `http`, `llm.chat` and `llm.embed` handlers (and `Providers`) call. A provider is a name with a
/// base URL; its circuit breaker and (optionally) rate limit go by that name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// Base URL per provider, e.g. `openai = "https://api.openai.com/v1"`, `tavily = "https://api.tavily.com"`.
    #[serde(deserialize_with = "string_map")]
    pub urls: BTreeMap<String, String>,
    /// Environment variable holding each provider's API key (sent as `Authorization: Bearer`).
    #[serde(deserialize_with = "string_map")]
    pub api_key_envs: BTreeMap<String, String>,
    /// Rate limit (a name from `policies.rate_limits`) each provider's calls take.
    #[serde(deserialize_with = "string_map")]
    pub limits: BTreeMap<String, String>,
    /// Fallback chains of providers, `>`-separated, e.g. `search = "tavily>exa>perplexity"`: an
    /// `http` task that names the chain calls the first provider whose breaker is not open.
    pub chains: BTreeMap<String, Chain>,
    /// Provider of each model for `llm.chat`, e.g. `"gpt-4o-mini" = "openai"`.
    #[serde(deserialize_with = "string_map")]
    pub models: BTreeMap<String, String>,
    /// Model fallback chains for `llm.chat`, e.g. `"gpt-4o" = "gpt-4o>gpt-4o-mini"`: a task asking
    /// for the key model uses the first model of the chain whose breaker is not open.
    pub model_fallbacks: BTreeMap<String, Chain>,
    /// Prices in USD per million prompt / completion tokens, e.g. `"gpt-4o-mini" = "0.15/0.60"`.
    pub prices: BTreeMap<String, TokenPrice>,
    /// Timeout of one outside HTTP request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Idle keep-alive connections kept per provider host.
    pub pool_max_idle_per_host: usize,
    /// Largest response body read from a provider, in bytes.
    pub max_response_bytes: usize,
    /// Texts per embeddings request at first, per provider and model: the batch size of
    /// `llm.embed` and `Providers::embed` adapts between `embed_batch_min` and `embed_batch_max`.
    pub embed_batch_start: usize,
    /// Texts added to the embeddings batch size after each successful batch.
    pub embed_batch_step: usize,
    /// Largest embeddings batch.
    pub embed_batch_max: usize,
    /// Smallest embeddings batch: a failed batch (5xx, timeout, 429) halves the size down to this.
    pub embed_batch_min: usize,
    /// Hosts an `http` task may name in `url` (exact names or IP addresses, `*.example.com` for
    /// any subdomain, `*` for any host); empty refuses every `url` (`url_not_allowed`). Such
    /// calls get no API key. Env: `TASKFLEET_PROVIDERS_URL_HOSTS=api.example.com,*.example.org`.
    pub url_hosts: Vec<String>,
    /// Loopback, private, link-local (cloud metadata), CGNAT, unspecified and multicast addresses
    /// that `url` targets and redirects off a provider's host may still reach: CIDRs
    /// (`10.0.0.0/8`, `fd00::/8`, a bare address) or `all`. Checked after DNS resolution and on
    /// every redirect; a configured provider's own host is trusted.
    pub allow_private_addresses: Vec<String>,
}

/// An IP address range (`10.0.0.0/8`, `fd00::/8`, or one address), as in
/// `providers.allow_private_addresses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpRange {
    type Err = String;

    fn from_str(s: &str) -> Result<IpRange, String> {
        let (addr, prefix) = s.trim().split_once('/').map_or((s.trim(), None), |(a, p)| (a, Some(p)));
        let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{s:?}: bad prefix length"))?,
        };
        Ok(IpRange { addr, prefix })
    }
}

/// Which restricted addresses `providers.allow_private_addresses` lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivateAllowance {
    /// Every address (`all`).
    All,
    /// The addresses in these ranges.
    Ranges(Vec<IpRange>),
}

impl PrivateAllowance {
    /// Whether `ip` is let through.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        match self {
            PrivateAllowance::All => true,
            PrivateAllowance::Ranges(ranges) => ranges.iter().any(|r| r.contains(ip)),
        }
    }
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        ProvidersConfig {
            urls: BTreeMap::new(),
            api_key_envs: BTreeMap::new(),
            limits: BTreeMap::new(),
            chains: BTreeMap::new(),
            models: BTreeMap::new(),
            model_fallbacks: BTreeMap::new(),
            prices: BTreeMap::new(),
            request_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 32,
            max_response_bytes: 4 << 20,
            embed_batch_start: 10,
            embed_batch_step: 5,
            embed_batch_max: 100,
            embed_batch_min: 5,
            url_hosts: Vec::new(),
            allow_private_addresses: Vec::new(),
        }
    }
}

impl ProvidersConfig {
    /// A chain's providers in order; a name that is not a chain is a chain of itself.
    pub fn chain(&self, name: &str) -> Vec<String> {
        self.chains.get(name).map_or_else(|| vec![name.to_string()], |chain| chain.0.clone())
    }

    /// The models to try for `model`, in order.
    pub fn model_chain(&self, model: &str) -> Vec<String> {
        self.model_fallbacks.get(model).map_or_else(|| vec![model.to_string()], |chain| chain.0.clone())
    }

    /// Price of `model` in USD per million tokens, if configured.
    pub fn price(&self, model: &str) -> Option<TokenPrice> {
        self.prices.get(model).copied()
    }

    /// `allow_private_addresses` parsed (an entry that does not parse is an error).
    pub fn private_allowance(&self) -> Result<PrivateAllowance, String> {
        if self.allow_private_addresses.iter().any(|a| a.trim().eq_ignore_ascii_case("all")) {
            return Ok(PrivateAllowance::All);
        }
        self.allow_private_addresses.iter().map(|a| a.parse()).collect::<Result<_, _>>().map(PrivateAllowance::Ranges)
    }

    pub(crate) fn validate(&self, policies: &PoliciesConfig) -> Result<(), ConfigError> {
        let invalid = |field, message| Err(ConfigError::Invalid { field, message });
        if let Err(message) = self.private_allowance() {
            return invalid("providers.allow_private_addresses", message);
        }
        for host in &self.url_hosts {
            let name = host.strip_prefix("*.").unwrap_or(host);
            let ipv6 = name.trim_start_matches('[').trim_end_matches(']').parse::<std::net::Ipv6Addr>().is_ok();
            if name.is_empty() || (!ipv6 && name.contains(['/', ':', '@', '\\', ' ', '[', ']'])) {
                return invalid("providers.url_hosts", format!("{host:?} is not a host name, `*.suffix` or `*`"));
            }
        }
        for (name, url) in &self.urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return invalid("providers.urls", format!("{name}: {url:?} is not an http(s) URL"));
            }
        }
        for (provider, limit) in &self.limits {
            if !policies.rate_limits.contains_key(limit) {
                return invalid(
                    "providers.limits",
                    format!("{provider} takes limit {limit:?}, which policies.rate_limits does not define"),
                );
            }
        }
        for (chain, providers) in &self.chains {
            for p in &providers.0 {
                if !self.urls.contains_key(p) {
                    return invalid("providers.chains", format!("chain {chain} names {p:?}, which has no url"));
                }
            }
        }
        for (model, provider) in &self.models {
            if !self.urls.contains_key(provider) {
                return invalid(
                    "providers.models",
                    format!("model {model} is served by {provider:?}, which has no url"),
                );
            }
        }
        for (kind, spec) in &policies.semantic_cache {
            if !self.models.contains_key(&spec.model) {
                return invalid(
                    "policies.semantic_cache",
                    format!("{kind}: embedding model {:?} is not in providers.models", spec.model),
                );
            }
        }
        for (model, chain) in &self.model_fallbacks {
            for m in &chain.0 {
                if !self.models.contains_key(m) {
                    return invalid("providers.model_fallbacks", format!("{model}: {m:?} is not in providers.models"));
                }
            }
        }
        if self.max_response_bytes < 1024 {
            return invalid("providers.max_response_bytes", "must be at least 1024".into());
        }
        if self.embed_batch_min == 0 {
            return invalid("providers.embed_batch_min", "must be at least 1".into());
        }
        if !(self.embed_batch_min <= self.embed_batch_start && self.embed_batch_start <= self.embed_batch_max) {
            return invalid(
                "providers.embed_batch_start",
                format!(
                    "needs embed_batch_min ({}) <= embed_batch_start ({}) <= embed_batch_max ({})",
                    self.embed_batch_min, self.embed_batch_start, self.embed_batch_max
                ),
            );
        }
        if self.embed_batch_step == 0 {
            return invalid("providers.embed_batch_step", "must be at least 1".into());
        }
        Ok(())
    }
}

/// A map of strings that also takes numbers (an environment value like `a=1` parses as one).
pub(crate) fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, Text>::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, Text(v))| (k, v)).collect())
}

/// A string, or a number read as its text.
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::specs::text(d).map(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_and_prices() {
        let mut p = ProvidersConfig::default();
        p.chains.insert("search".into(), "tavily > exa>perplexity".parse().unwrap());
        p.prices.insert("m".into(), "0.15/0.6".parse().unwrap());
        assert_eq!(p.chain("search"), vec!["tavily", "exa", "perplexity"]);
        assert_eq!(p.chain("exa"), vec!["exa"]);
        assert_eq!(p.price("m"), Some(TokenPrice { prompt: 0.15, completion: 0.6 }));
        assert_eq!(p.price("other"), None);
    }

    #[test]
    fn embed_batch_bounds_are_checked() {
        let policies = PoliciesConfig::default();
        assert!(ProvidersConfig::default().validate(&policies).is_ok());
        let bad = [
            ProvidersConfig { embed_batch_min: 20, ..ProvidersConfig::default() },
            ProvidersConfig { embed_batch_start: 200, ..ProvidersConfig::default() },
            ProvidersConfig { embed_batch_step: 0, ..ProvidersConfig::default() },
            ProvidersConfig { embed_batch_min: 0, embed_batch_start: 0, ..ProvidersConfig::default() },
        ];
        for p in bad {
            assert!(p.validate(&policies).is_err(), "{p:?}");
        }
    }

    #[test]
    fn the_semantic_lookup_timeout_must_be_positive() {
        assert_eq!(PoliciesConfig::default().semantic_lookup_timeout, Duration::from_secs(2));
        let zero = PoliciesConfig { semantic_lookup_timeout: Duration::ZERO, ..PoliciesConfig::default() };
        assert!(matches!(zero.validate(), Err(ConfigError::Invalid { field: "policies.semantic_lookup_timeout", .. })));
        let short = PoliciesConfig { semantic_lookup_timeout: Duration::from_millis(1), ..PoliciesConfig::default() };
        assert!(short.validate().is_ok());
    }

    #[test]
    fn semantic_cache_loads_from_env_and_is_validated() {
        let env =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let ok = [
            ("TASKFLEET_PROVIDERS_URLS", "mock=http://127.0.0.1:9/v1"),
            ("TASKFLEET_PROVIDERS_MODELS", "emb=mock"),
            ("TASKFLEET_POLICIES_SEMANTIC_CACHE", "content.article=30d by keyword threshold 0.8 model emb"),
        ];
        let c = crate::Config::load_from(None, env(&ok)).unwrap();
        let spec = &c.policies.semantic_cache["content.article"];
        assert_eq!((spec.field.as_str(), spec.threshold, spec.model.as_str()), ("keyword", 0.8, "emb"));

        let unknown_model = [ok[0], ok[1], ("TASKFLEET_SEMANTIC_CACHE", "echo=1h by text model other")];
        let err = crate::Config::load_from(None, env(&unknown_model)).unwrap_err().to_string();
        assert!(err.contains("policies.semantic_cache") && err.contains("\"other\""), "{err}");

        let both = [ok[0], ok[1], ok[2], ("TASKFLEET_POLICIES_CACHE", "content.article=1h")];
        let err = crate::Config::load_from(None, env(&both)).unwrap_err().to_string();
        assert!(err.contains("policies.semantic_cache") && err.contains("content.article"), "{err}");

        let bad = [ok[0], ok[1], ("TASKFLEET_POLICIES_SEMANTIC_CACHE", "echo=1h by text threshold 2 model emb")];
        let err = crate::Config::load_from(None, env(&bad)).unwrap_err().to_string();
        assert!(err.contains("TASKFLEET_POLICIES_SEMANTIC_CACHE") && err.contains("threshold"), "{err}");
    }

    #[test]
    fn url_hosts_and_private_addresses_load_and_are_validated() {
        let env =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let ok = [
            ("TASKFLEET_PROVIDERS_URL_HOSTS", "api.example.com, *.example.org,127.0.0.1,[::1]"),
            ("TASKFLEET_PROVIDERS_ALLOW_PRIVATE_ADDRESSES", "10.0.0.0/8,fd00::/8,127.0.0.1"),
        ];
        let c = crate::Config::load_from(None, env(&ok)).unwrap();
        assert_eq!(c.providers.url_hosts, ["api.example.com", "*.example.org", "127.0.0.1", "[::1]"]);
        let allowed = c.providers.private_allowance().unwrap();
        for ip in ["10.1.2.3", "fd12::1", "127.0.0.1", "::ffff:10.9.9.9"] {
            assert!(allowed.allows(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["11.0.0.1", "127.0.0.2", "fe80::1", "169.254.169.254"] {
            assert!(!allowed.allows(ip.parse().unwrap()), "{ip}");
        }
        assert_eq!(ProvidersConfig::default().private_allowance().unwrap(), PrivateAllowance::Ranges(Vec::new()));
        let all = [("TASKFLEET_PROVIDERS_ALLOW_PRIVATE_ADDRESSES", "all")];
        let c = crate::Config::load_from(None, env(&all)).unwrap();
        assert_eq!(c.providers.private_allowance().unwrap(), PrivateAllowance::All);
        assert!("0.0.0.0/0".parse::<IpRange>().unwrap().contains("1.2.3.4".parse().unwrap()));

        for bad in ["10.0.0.0/33", "10.0.0", "fd00::/129", "private"] {
            let err = crate::Config::load_from(None, env(&[("TASKFLEET_PROVIDERS_ALLOW_PRIVATE_ADDRESSES", bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("providers.allow_private_addresses"), "{bad}: {err}");
        }
        for bad in ["http://x.com", "x.com/path", "user@x.com", "x.com:443", "*."] {
            let err =
                crate::Config::load_from(None, env(&[("TASKFLEET_PROVIDERS_URL_HOSTS", bad)])).unwrap_err().to_string();
            assert!(err.contains("providers.url_hosts"), "{bad}: {err}");
        }
    }
}
