//! The small text formats of some configuration values: rate limits, cache policies (exact and
//! semantic), lists of names, token prices and alert rules. Each is parsed once, when the configuration loads, into
//! a type that reads with [`FromStr`] and writes back the same format with [`fmt::Display`], so
//! the TOML file and the `TASKFLEET_*` variables keep their text form.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Why a value in one of these formats does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// The text does not have the expected form.
    #[error("{text:?}: expected {expected}")]
    Form {
        /// The text.
        text: String,
        /// The form it should have.
        expected: &'static str,
    },
    /// A whole number does not parse.
    #[error("{text:?} is not a whole number")]
    Integer {
        /// The text.
        text: String,
        /// The parser's error.
        source: std::num::ParseIntError,
    },
    /// A decimal number does not parse.
    #[error("{text:?} is not a number")]
    Number {
        /// The text.
        text: String,
        /// The parser's error.
        source: std::num::ParseFloatError,
    },
    /// A duration does not parse.
    #[error("duration {text:?}: {source}")]
    Duration {
        /// The text.
        text: String,
        /// The parser's error.
        source: humantime::DurationError,
    },
    /// A value is outside its range.
    #[error("{text:?}: {rule}")]
    Range {
        /// The text.
        text: String,
        /// The range it must be in.
        rule: &'static str,
    },
    /// An alert rule names a figure the aggregator does not compute.
    #[error("unknown metric {metric:?}; known: {}", ALERT_METRICS.join(", "))]
    UnknownMetric {
        /// The metric named.
        metric: String,
    },
}

/// Implements `Serialize` as the type's `Display` text and `Deserialize` through `FromStr`.
macro_rules! text_serde {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                text(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

text_serde!(RateLimitSpec, CacheSpec, SemanticCacheSpec, TokenPrice, AlertSetting);

/// A string, or a number read as its text (an environment value like `a=1` parses as a number).
pub(crate) fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!("expected a string, got {other}"))),
    }
}

/// A rate limit, `RATE/PERIOD [burst N]`: `rate` per `period`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitSpec {
    /// Requests allowed per period.
    pub rate: u64,
    /// The period.
    pub period: Duration,
    /// Requests that may go at once after an idle spell.
    pub burst: u64,
}

impl RateLimitSpec {
    /// Time between two requests at the steady rate (the GCRA emission interval).
    pub fn interval(&self) -> Duration {
        self.period / self.rate.min(u32::MAX as u64) as u32
    }
}

impl FromStr for RateLimitSpec {
    type Err = SpecError;

    /// Parses `500/min`, `5/s`, `100/10s`, `500/min burst 50`.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let form = || SpecError::Form { text: spec.to_string(), expected: "RATE/PERIOD [burst N]" };
        let mut words = spec.split_whitespace();
        let (rate, per) = words.next().and_then(|head| head.split_once('/')).ok_or_else(form)?;
        let rate = whole_number(rate)?;
        let period = match per {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => duration(other)?,
        };
        let burst = match (words.next(), words.next(), words.next()) {
            (None, _, _) => 1,
            (Some("burst"), Some(n), None) => whole_number(n)?,
            _ => return Err(form()),
        };
        if rate == 0 || burst == 0 || period.is_zero() {
            return Err(SpecError::Range { text: spec.to_string(), rule: "rate, period and burst must be positive" });
        }
        Ok(RateLimitSpec { rate, period, burst })
    }
}

impl fmt::Display for RateLimitSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.rate)?;
        match self.period.as_secs() {
            _ if self.period.subsec_nanos() != 0 => write_duration(f, self.period)?,
            1 => f.write_str("s")?,
            60 => f.write_str("min")?,
            3600 => f.write_str("h")?,
            86_400 => f.write_str("d")?,
            _ => write_duration(f, self.period)?,
        }
        if self.burst != 1 {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

/// A result cache policy, `TTL [by FIELD+FIELD]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSpec {
    /// How long a result stays cached.
    pub ttl: Duration,
    /// Payload fields that make the key; empty means the whole payload.
    pub key_fields: Vec<String>,
}

impl FromStr for CacheSpec {
    type Err = SpecError;

    /// Parses `1h` or `1h by model+messages`.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let form = || SpecError::Form { text: spec.to_string(), expected: "TTL [by FIELD+FIELD]" };
        let mut words = spec.split_whitespace();
        let ttl = duration(words.next().ok_or_else(form)?)?;
        if ttl < Duration::from_millis(1) {
            return Err(SpecError::Range { text: spec.to_string(), rule: "ttl must be at least 1ms" });
        }
        let key_fields = match (words.next(), words.next(), words.next()) {
            (None, _, _) => Vec::new(),
            (Some("by"), Some(fields), None) => fields.split('+').filter(|f| !f.is_empty()).map(String::from).collect(),
            _ => return Err(form()),
        };
        Ok(CacheSpec { ttl, key_fields })
    }
}

impl fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_duration(f, self.ttl)?;
        if !self.key_fields.is_empty() {
            write!(f, " by {}", self.key_fields.join("+"))?;
        }
        Ok(())
    }
}

/// A semantic cache policy, `TTL by FIELD [threshold X] model M [max N]`: the payload field
/// `FIELD` (a string) is embedded with model `M`, and a stored result of the same kind whose key
/// text's vector has a cosine similarity of at least `X` (default 0.8) is a hit. At most `N`
/// entries (default 100,000) are kept, the oldest dropped first.
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticCacheSpec {
    /// How long a stored result stays usable.
    pub ttl: Duration,
    /// The payload field whose string is the key text.
    pub field: String,
    /// Least cosine similarity of a hit, in (0, 1].
    pub threshold: f32,
    /// The embedding model (a key of `providers.models`).
    pub model: String,
    /// Most entries kept (in Redis and in every worker's index), the oldest dropped first.
    pub max_entries: u64,
}

impl SemanticCacheSpec {
    /// The threshold when the spec names none.
    pub const DEFAULT_THRESHOLD: f32 = 0.8;
    /// The entry cap when the spec names none: about 100 MiB of 256-dimension vectors per
    /// worker (1 KiB each), 600 MiB at 1,536 dimensions.
    pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
}

impl FromStr for SemanticCacheSpec {
    type Err = SpecError;

    /// Parses `30d by keyword model m`, `1h by text threshold 0.85 model text-embedding-3-small`,
    /// `30d by keyword model m max 10000` (the words after the TTL in any order).
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let form =
            || SpecError::Form { text: spec.to_string(), expected: "TTL by FIELD [threshold X] model M [max N]" };
        let words: Vec<&str> = spec.split_whitespace().collect();
        let ttl = duration(words.first().ok_or_else(form)?)?;
        if ttl < Duration::from_millis(1) {
            return Err(SpecError::Range { text: spec.to_string(), rule: "ttl must be at least 1ms" });
        }
        let (mut field, mut threshold, mut model, mut max) = (None, None, None, None);
        for pair in words[1..].chunks(2) {
            let [name, value] = pair else { return Err(form()) };
            let slot = match *name {
                "by" => &mut field,
                "threshold" => &mut threshold,
                "model" => &mut model,
                "max" => &mut max,
                _ => return Err(form()),
            };
            if slot.replace(*value).is_some() {
                return Err(form());
            }
        }
        let (Some(field), Some(model)) = (field, model) else { return Err(form()) };
        let threshold = match threshold {
            None => Self::DEFAULT_THRESHOLD,
            Some(t) => number(t)? as f32,
        };
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(SpecError::Range { text: spec.to_string(), rule: "threshold must be in (0, 1]" });
        }
        let max_entries = max.map_or(Ok(Self::DEFAULT_MAX_ENTRIES), whole_number)?;
        if max_entries == 0 {
            return Err(SpecError::Range { text: spec.to_string(), rule: "max must be positive" });
        }
        Ok(SemanticCacheSpec { ttl, field: field.to_string(), threshold, model: model.to_string(), max_entries })
    }
}

impl fmt::Display for SemanticCacheSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_duration(f, self.ttl)?;
        write!(f, " by {} threshold {} model {}", self.field, self.threshold, self.model)?;
        if self.max_entries != Self::DEFAULT_MAX_ENTRIES {
            write!(f, " max {}", self.max_entries)?;
        }
        Ok(())
    }
}

/// Names joined by `SEP`, blanks around them ignored: `+` for the limits of a kind
/// (`openai+search`), `>` for fallback chains (`tavily>exa>perplexity`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Names<const SEP: char>(pub Vec<String>);

/// The rate limits every task of a kind takes, `+`-separated.
pub type LimitNames = Names<'+'>;

/// A fallback chain, `>`-separated, tried in order.
pub type Chain = Names<'>'>;

impl<const SEP: char> FromStr for Names<SEP> {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Names(s.split(SEP).map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect()))
    }
}

impl<const SEP: char> fmt::Display for Names<SEP> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(&SEP.to_string()))
    }
}

impl<const SEP: char> Serialize for Names<SEP> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, const SEP: char> Deserialize<'de> for Names<SEP> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A model's price in USD per million tokens, `PROMPT/COMPLETION` (e.g. `0.15/0.60`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenPrice {
    /// USD per million prompt tokens.
    pub prompt: f64,
    /// USD per million completion tokens.
    pub completion: f64,
}

impl TokenPrice {
    /// What a call with these token counts costs, in USD.
    pub fn cost_usd(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (self.prompt * prompt_tokens as f64 + self.completion * completion_tokens as f64) / 1_000_000.0
    }
}

impl FromStr for TokenPrice {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let (prompt, completion) = s
            .split_once('/')
            .ok_or_else(|| SpecError::Form { text: s.to_string(), expected: "PROMPT/COMPLETION USD per 1M tokens" })?;
        Ok(TokenPrice { prompt: number(prompt)?, completion: number(completion)? })
    }
}

impl fmt::Display for TokenPrice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.prompt, self.completion)
    }
}

/// Figures an alert rule may watch.
pub const ALERT_METRICS: &[&str] = &[
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "queue_wait_p95_ms",
    "run_p95_ms",
    "error_rate",
    "retry_rate",
    "cache_hit_rate",
    "throughput_per_s",
    "utilization",
    "memory_percent",
    "cpu_percent",
];

/// An alert condition, `METRIC < or > THRESHOLD`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    /// The figure it watches, one of [`ALERT_METRICS`].
    pub metric: String,
    /// True for `>`, false for `<`.
    pub above: bool,
    /// The threshold.
    pub threshold: f64,
}

impl FromStr for AlertRule {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let form = || SpecError::Form { text: spec.to_string(), expected: "METRIC < or > THRESHOLD" };
        let [metric, op, threshold] = spec.split_whitespace().collect::<Vec<_>>()[..] else { return Err(form()) };
        if !ALERT_METRICS.contains(&metric) {
            return Err(SpecError::UnknownMetric { metric: metric.to_string() });
        }
        let above = match op {
            ">" => true,
            "<" => false,
            _ => return Err(form()),
        };
        Ok(AlertRule { metric: metric.to_string(), above, threshold: number(threshold)? })
    }
}

impl fmt::Display for AlertRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.metric, if self.above { ">" } else { "<" }, self.threshold)
    }
}

/// One entry of `aggregator.alert_rules`: a rule, or `off` (which disables a default rule).
#[derive(Debug, Clone, PartialEq)]
pub enum AlertSetting {
    /// Disabled (`off`, or empty).
    Off,
    /// Evaluated.
    On(AlertRule),
}

impl FromStr for AlertSetting {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s.trim() {
            "" | "off" => Ok(AlertSetting::Off),
            rule => rule.parse().map(AlertSetting::On),
        }
    }
}

impl fmt::Display for AlertSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlertSetting::Off => f.write_str("off"),
            AlertSetting::On(rule) => rule.fmt(f),
        }
    }
}

fn whole_number(text: &str) -> Result<u64, SpecError> {
    text.parse().map_err(|source| SpecError::Integer { text: text.to_string(), source })
}

fn number(text: &str) -> Result<f64, SpecError> {
    text.trim().parse().map_err(|source| SpecError::Number { text: text.to_string(), source })
}

fn duration(text: &str) -> Result<Duration, SpecError> {
    humantime::parse_duration(text).map_err(|source| SpecError::Duration { text: text.to_string(), source })
}

/// Writes a duration in its largest whole unit, without blanks (`90m`, `1500ms`), so that it
/// parses back as one word.
fn write_duration(f: &mut fmt::Formatter<'_>, d: Duration) -> fmt::Result {
    let nanos = d.as_nanos();
    let units: [(u128, &str); 5] =
        [(3_600_000_000_000, "h"), (60_000_000_000, "m"), (1_000_000_000, "s"), (1_000_000, "ms"), (1, "ns")];
    let (size, unit) = units.into_iter().find(|(size, _)| nanos.is_multiple_of(*size)).unwrap_or((1, "ns"));
    write!(f, "{}{unit}", nanos / size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: FromStr + fmt::Display + PartialEq + fmt::Debug>(text: &str)
    where
        T::Err: fmt::Debug,
    {
        let value: T = text.parse().unwrap();
        assert_eq!(value.to_string().parse::<T>().unwrap(), value, "{text:?}");
    }

    #[test]
    fn rate_limit_specs() {
        let s: RateLimitSpec = "500/min burst 50".parse().unwrap();
        assert_eq!((s.rate, s.period, s.burst), (500, Duration::from_secs(60), 50));
        assert_eq!(s.interval(), Duration::from_millis(120));
        assert_eq!(s.to_string(), "500/min burst 50");
        assert_eq!("5/s".parse::<RateLimitSpec>().unwrap().burst, 1);
        assert_eq!("100/10s".parse::<RateLimitSpec>().unwrap().period, Duration::from_secs(10));
        for good in ["5/s", "100/10s", "3/1500ms burst 2", "1/d", "7/90m"] {
            round_trips::<RateLimitSpec>(good);
        }
        for bad in ["", "500", "x/min", "5/s burst", "0/s", "5/s burst 0", "5/fortnightly", "5/s burst 2 extra"] {
            assert!(bad.parse::<RateLimitSpec>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn cache_specs() {
        let c: CacheSpec = "1h by model+messages".parse().unwrap();
        assert_eq!(c.ttl, Duration::from_secs(3600));
        assert_eq!(c.key_fields, vec!["model", "messages"]);
        assert_eq!(c.to_string(), "1h by model+messages");
        assert!("10m".parse::<CacheSpec>().unwrap().key_fields.is_empty());
        for good in ["90m by a", "1500ms", "2d"] {
            round_trips::<CacheSpec>(good);
        }
        assert!("soon".parse::<CacheSpec>().is_err());
        assert!("1h with model".parse::<CacheSpec>().is_err());
    }

    #[test]
    fn semantic_cache_specs() {
        let s: SemanticCacheSpec = "30d by keyword threshold 0.85 model text-embedding-3-small".parse().unwrap();
        assert_eq!(s.ttl, Duration::from_secs(30 * 86_400));
        assert_eq!((s.field.as_str(), s.threshold, s.model.as_str()), ("keyword", 0.85, "text-embedding-3-small"));
        assert_eq!(s.max_entries, SemanticCacheSpec::DEFAULT_MAX_ENTRIES);
        let d: SemanticCacheSpec = "1h by text model emb".parse().unwrap();
        assert_eq!((d.threshold, d.model.as_str(), d.max_entries), (0.8, "emb", 100_000));
        assert_eq!(d.to_string(), "1h by text threshold 0.8 model emb");
        assert_eq!("1h model m by t".parse::<SemanticCacheSpec>().unwrap().field, "t");
        let m: SemanticCacheSpec = "30d by keyword threshold 0.8 model m max 100".parse().unwrap();
        assert_eq!(m.max_entries, 100);
        assert_eq!(m.to_string(), "720h by keyword threshold 0.8 model m max 100");
        assert_eq!("1h max 7 by t model m".parse::<SemanticCacheSpec>().unwrap().max_entries, 7);
        for good in [
            "30d by keyword threshold 0.8 model emb",
            "90m by a threshold 1 model m",
            "1500ms by q model m",
            "30d by keyword threshold 0.8 model m max 1",
            "1h by q model m max 100000",
        ] {
            round_trips::<SemanticCacheSpec>(good);
        }
        for bad in [
            "",
            "1h",
            "1h by",
            "1h model m",
            "1h by t",
            "1h by t threshold 0.9",
            "soon by t",
            "1h by t threshold 0",
            "1h by t threshold 1.5",
            "1h by t threshold x",
            "1h by t by u",
            "1h by t with m",
            "1h by t model m max 0",
            "1h by t model m max -1",
            "1h by t model m max 1.5",
            "1h by t model m max",
            "1h by t model m max 5 max 6",
        ] {
            assert!(bad.parse::<SemanticCacheSpec>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn names_and_prices() {
        let chain: Chain = "tavily > exa>perplexity".parse().unwrap();
        assert_eq!(chain.0, vec!["tavily", "exa", "perplexity"]);
        assert_eq!(chain.to_string(), "tavily>exa>perplexity");
        assert_eq!("a+ b".parse::<LimitNames>().unwrap().0, vec!["a", "b"]);
        let price: TokenPrice = "0.15/0.6".parse().unwrap();
        assert_eq!((price.prompt, price.completion), (0.15, 0.6));
        assert_eq!(price.to_string(), "0.15/0.6");
        assert_eq!("0.5/2".parse::<TokenPrice>().unwrap().cost_usd(1_000_000, 2_000_000), 4.5);
        assert!("0.15".parse::<TokenPrice>().is_err());
        assert!("a/1".parse::<TokenPrice>().is_err());
    }

    #[test]
    fn alert_settings() {
        let rule = AlertRule { metric: "p95_ms".into(), above: true, threshold: 5000.0 };
        assert_eq!("p95_ms > 5000".parse::<AlertSetting>().unwrap(), AlertSetting::On(rule));
        assert_eq!(" off ".parse::<AlertSetting>().unwrap(), AlertSetting::Off);
        round_trips::<AlertSetting>("cache_hit_rate < 0.5");
        for bad in ["p95_ms >", "latency > 5", "p95_ms = 5", "p95_ms > many"] {
            assert!(bad.parse::<AlertSetting>().is_err(), "{bad:?} parsed");
        }
    }
}
