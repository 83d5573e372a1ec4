//! Layering of defaults, file and environment.

use crate::Config;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {source}")]
    Toml {
        /// The file.
        path: String,
        /// The parser's error (it names the line and key).
        source: toml::de::Error,
    },
    /// An environment variable holds a value of the wrong shape.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A `TASKFLEET_*` environment variable names no configuration field.
    #[error("environment variable {var} names no configuration field{}", did_you_mean(suggestion.as_deref()))]
    UnknownEnv {
        /// The variable.
        var: String,
        /// The known variable with the closest name, if one is close.
        suggestion: Option<String>,
    },
    /// A value does not fit its field: wrong type, unknown key, malformed duration or rate limit.
    #[error("{origin}: {source}")]
    Value {
        /// The variable or file key that set it.
        origin: Origin,
        /// What is wrong.
        source: serde_json::Error,
    },
    /// The configuration does not fit the schema in a way no single value explains.
    #[error("invalid configuration: {0}")]
    Schema(#[source] serde_json::Error),
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {field}: {message}")]
    Invalid {
        /// Dotted field path, e.g. `worker.max_concurrent_tasks`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default()
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An environment variable.
    Env(String),
    /// A key of the config file.
    File {
        /// The file.
        path: String,
        /// The dotted key, e.g. `worker.max_concurrent_tasks`.
        key: String,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::File { path, key } => write!(f, "config file {path}, key {key}"),
        }
    }
}

/// `TASKFLEET_*` variables that other programs of the project read and that are not
/// configuration fields, so a service started with them in its environment accepts them: the
/// config file's name, `taskfleet top`'s aggregator address, the dev script's NATS port, the
/// tests' `nats-server` binary, the switch that rewrites the generated configuration reference,
/// and the load knobs of `tests/rescue.rs`.
const NOT_FIELDS: &[&str] = &[
    "TASKFLEET_CONFIG",
    "TASKFLEET_AGGREGATOR_URL",
    "TASKFLEET_DEV_NATS_PORT",
    "TASKFLEET_NATS_SERVER_BIN",
    "TASKFLEET_BLESS",
    "TASKFLEET_RESCUE_RATE",
    "TASKFLEET_RESCUE_SECS",
    "TASKFLEET_RESCUE_SLEEP_MS",
    "TASKFLEET_RESCUE_CONCURRENCY",
];

/// Prefixes of further such variables: the mock API's flags (`taskfleet-mock-api`), the fault
/// suite's knobs (`tests/faults.rs`) and the test support's servers.
const NOT_FIELD_PREFIXES: &[&str] = &["TASKFLEET_MOCK_", "TASKFLEET_FAULT_", "TASKFLEET_TEST_"];

/// A field, or a whole section, as a path from the root (`["worker", "queues"]`).
type KeyPath = Vec<String>;

pub(crate) fn load(
    file: Option<&std::path::Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let defaults = serde_json::to_value(Config::default()).map_err(ConfigError::Schema)?;
    let mut root = defaults.clone();
    let mut origins = BTreeMap::new();
    if let Some(path) = file {
        apply_file(&mut root, &mut origins, path)?;
    }
    apply_env(&mut root, &mut origins, &defaults, env)?;
    serde_json::from_value(root.clone()).map_err(|source| blame(&defaults, &root, origins, source))
}

/// Merges the TOML file at `path` into `root`, noting the keys it sets.
fn apply_file(
    root: &mut Value,
    origins: &mut BTreeMap<KeyPath, Origin>,
    path: &std::path::Path,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|source| ConfigError::Toml { path: path.display().to_string(), source })?;
    let file = serde_json::to_value(table).map_err(ConfigError::Schema)?;
    for key in file_keys(&file) {
        origins.insert(key.clone(), Origin::File { path: path.display().to_string(), key: key.join(".") });
    }
    merge(root, file);
    Ok(())
}

/// Sets the fields named by `TASKFLEET_*` variables, noting which variable set each; any other
/// `TASKFLEET_*` variable that is not known to be read elsewhere (the exemptions above, or a
/// provider's API key named in `providers.api_key_envs`) is an error.
fn apply_env(
    root: &mut Value,
    origins: &mut BTreeMap<KeyPath, Origin>,
    defaults: &Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let names = env_names(defaults);
    let mut unknown = Vec::new();
    for (var, raw) in env {
        if !var.starts_with("TASKFLEET_") {
            continue;
        }
        let Some((_, path)) = names.iter().find(|(name, _)| *name == var) else {
            if !NOT_FIELDS.contains(&var.as_str()) && !NOT_FIELD_PREFIXES.iter().any(|p| var.starts_with(p)) {
                unknown.push(var);
            }
            continue;
        };
        let shape = &defaults[&path[0]][&path[1]];
        let value = parse_env_value(shape, &raw).map_err(|message| ConfigError::Env { var: var.clone(), message })?;
        set(root, path, value);
        origins.insert(path.clone(), Origin::Env(var));
    }
    let key_envs = &root["providers"]["api_key_envs"];
    match unknown.into_iter().find(|var| !key_envs.as_object().is_some_and(|m| m.values().any(|v| v == var.as_str()))) {
        Some(var) => Err(ConfigError::UnknownEnv { suggestion: closest(&var, &names), var }),
        None => Ok(()),
    }
}

/// The keys a file sets, down to fields: `["worker", "queues"]`, or `["name"]` for a top-level
/// value that is not a section.
fn file_keys(file: &Value) -> Vec<KeyPath> {
    let Value::Object(sections) = file else { return Vec::new() };
    let mut keys = Vec::new();
    for (section, fields) in sections {
        match fields {
            Value::Object(fields) => keys.extend(fields.keys().map(|f| vec![section.clone(), f.clone()])),
            _ => keys.push(vec![section.clone()]),
        }
    }
    keys
}

/// Finds which variable or file key made deserialization fail: each value set on its own over
/// the defaults, the first that fails is the culprit.
fn blame(defaults: &Value, root: &Value, origins: BTreeMap<KeyPath, Origin>, error: serde_json::Error) -> ConfigError {
    for (path, origin) in origins {
        let mut probe = defaults.clone();
        let value = path.iter().try_fold(root, |v, key| v.get(key)).cloned().unwrap_or(Value::Null);
        set(&mut probe, &path, value);
        if let Err(source) = serde_json::from_value::<Config>(probe) {
            return ConfigError::Value { origin, source };
        }
    }
    ConfigError::Schema(error)
}

/// Sets the value at `path`, creating objects on the way.
fn set(target: &mut Value, path: &[String], value: Value) {
    let mut slot = target;
    for key in path {
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(map) = slot else { return };
        slot = map.entry(key.clone()).or_insert(Value::Null);
    }
    *slot = value;
}

/// Every accepted variable name with the (section, field) it sets: the long form for every
/// field, and the short form for field names that occur in one section only.
pub(crate) fn env_names(root: &Value) -> Vec<(String, KeyPath)> {
    let mut long = Vec::new();
    let mut count = HashMap::<String, usize>::new();
    if let Value::Object(sections) = root {
        for (section, fields) in sections {
            if let Value::Object(fields) = fields {
                for field in fields.keys() {
                    long.push((section.clone(), field.clone()));
                    *count.entry(field.clone()).or_default() += 1;
                }
            }
        }
    }
    let mut names = Vec::new();
    for (section, field) in long {
        names.push((
            format!("TASKFLEET_{}_{}", section.to_uppercase(), field.to_uppercase()),
            vec![section.clone(), field.clone()],
        ));
        if count[&field] == 1 {
            names.push((format!("TASKFLEET_{}", field.to_uppercase()), vec![section, field]));
        }
    }
    names
}

/// The known variable closest to `var`, when it is close enough to be a typo of it.
fn closest(var: &str, names: &[(String, KeyPath)]) -> Option<String> {
    let (distance, name) = names.iter().map(|(name, _)| (edit_distance(var, name), name)).min()?;
    (distance <= 3.max(var.len() / 5)).then(|| name.clone())
}

/// Levenshtein distance: the fewest single-character insertions, deletions and substitutions
/// that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb { diagonal } else { 1 + diagonal.min(above).min(row[j]) };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Turns an environment string into a value of the same shape as the default it replaces.
fn parse_env_value(default: &Value, raw: &str) -> Result<Value, String> {
    match default {
        Value::Bool(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Value::Bool(true)),
            "0" | "false" | "no" | "off" => Ok(Value::Bool(false)),
            other => Err(format!("{other:?} is not a boolean")),
        },
        Value::Number(_) => serde_json::from_str::<serde_json::Number>(raw.trim())
            .map(Value::Number)
            .map_err(|_| format!("{raw:?} is not a number")),
        Value::Array(_) => Ok(Value::Array(
            raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| Value::String(s.to_string())).collect(),
        )),
        Value::Object(_) => {
            let mut map = Map::new();
            for pair in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| format!("{pair:?} is not key=value"))?;
                let v = v.trim();
                let value = serde_json::from_str::<serde_json::Number>(v)
                    .map(Value::Number)
                    .unwrap_or_else(|_| Value::String(v.to_string()));
                map.insert(k.trim().to_string(), value);
            }
            Ok(Value::Object(map))
        }
        Value::Null => Ok(serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))),
        Value::String(_) => Ok(Value::String(raw.to_string())),
    }
}

/// Deep-merges `over` into `base`: objects merge key by key, anything else replaces.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_validate() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn env_long_and_short_forms() {
        let c = Config::load_from(
            None,
            env(&[
                ("TASKFLEET_MAX_CONCURRENT_TASKS", "7"),
                ("TASKFLEET_WORKER_QUEUES", "a, b"),
                ("TASKFLEET_NATS_ACK_WAIT", "45s"),
                ("TASKFLEET_PRIORITY_WEIGHTS", "critical=9,high=5,normal=2,low=1"),
                ("TASKFLEET_MOCK_LATENCY_MS", "30"),
                ("TASKFLEET_NATS_SERVER_BIN", "/usr/bin/nats-server"),
                ("TASKFLEET_RESCUE_RATE", "100"),
                ("OTHER", "x"),
                ("TASKFLEET_COORDINATOR_QUEUES", "default, llm"),
                ("TASKFLEET_REPLY_PREFIX", "_R."),
                ("TASKFLEET_COORDINATOR_SUBMIT_BATCH_MAX_BYTES", "1048576"),
            ]),
        )
        .unwrap();
        assert_eq!(c.coordinator.queues, vec!["default".to_string(), "llm".to_string()]);
        assert_eq!(c.coordinator.reply_prefix, "_R.");
        assert_eq!(c.coordinator.submit_batch_max_bytes, 1 << 20);
        assert_eq!(c.worker.max_concurrent_tasks, 7);
        assert_eq!(c.worker.queues, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(c.nats.ack_wait, Duration::from_secs(45));
        assert_eq!(c.worker.priority_weights.critical, 9);
    }

    #[test]
    fn file_then_env() {
        let dir = std::env::temp_dir().join(format!("tfcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[worker]\nmax_concurrent_tasks = 3\nqueues = [\"x\"]\n[nats]\nurl = \"nats://h:1\"\n")
            .unwrap();
        let c = Config::load_from(Some(&path), env(&[("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "5")])).unwrap();
        assert_eq!(c.worker.max_concurrent_tasks, 5);
        assert_eq!(c.worker.queues, vec!["x".to_string()]);
        assert_eq!(c.nats.url, "nats://h:1");

        std::fs::write(&path, "[worker]\nmax_concurent_tasks = 3\n").unwrap();
        let err = Config::load_from(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(err.contains("max_concurent_tasks"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn clear_errors() {
        let err = Config::load_from(None, env(&[("TASKFLEET_MAX_CONCURRENT_TASKS", "many")])).unwrap_err();
        assert!(err.to_string().contains("TASKFLEET_MAX_CONCURRENT_TASKS"), "{err}");
        let err = Config::load_from(None, env(&[("TASKFLEET_MAX_CONCURRENT_TASKS", "0")])).unwrap_err();
        assert!(err.to_string().contains("max_concurrent_tasks"), "{err}");
        let err = Config::load_from(None, env(&[("TASKFLEET_NATS_ACK_WAIT", "soon")])).unwrap_err();
        assert!(err.to_string().contains("TASKFLEET_NATS_ACK_WAIT"), "{err}");
        let err = Config::load_from(None, env(&[("TASKFLEET_WORKER_QUEUES", "a.b")])).unwrap_err();
        assert!(err.to_string().contains("queues"), "{err}");
        let err = Config::load_from(None, env(&[("TASKFLEET_COORDINATOR_QUEUES", "ok,a>b")])).unwrap_err();
        assert!(err.to_string().contains("coordinator.queues"), "{err}");
        for bad in ["", "$JS.", "_INBOX.*", "taskfleet.", "tas"] {
            let err = Config::load_from(None, env(&[("TASKFLEET_COORDINATOR_REPLY_PREFIX", bad)])).unwrap_err();
            assert!(err.to_string().contains("reply_prefix"), "{bad:?}: {err}");
        }
        let err = Config::load_from(None, env(&[("TASKFLEET_SUBMIT_BATCH_MAX_BYTES", "1000")])).unwrap_err();
        assert!(err.to_string().contains("submit_batch_max_bytes"), "{err}");
    }

    #[test]
    fn errors_name_the_variable_or_key() {
        let dir = std::env::temp_dir().join(format!("tfcfg-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[nats]\nurl = \"nats://h:1\"\n[policies]\nbreaker_window = \"soon\"\n").unwrap();
        let err = Config::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Value { origin: Origin::File { key, .. }, .. } if key == "policies.breaker_window")
        );
        assert!(err.to_string().contains("policies.breaker_window"), "{err}");
        // The variable wins over the file, and is blamed.
        let err = Config::load_from(Some(&path), env(&[("TASKFLEET_POLICIES_BREAKER_WINDOW", "later")])).unwrap_err();
        assert!(err.to_string().contains("TASKFLEET_POLICIES_BREAKER_WINDOW"), "{err}");
        std::fs::remove_dir_all(&dir).ok();

        let err = Config::load_from(None, env(&[("TASKFLEET_POLICIES_RATE_LIMITS", "api=5/s,slow=fast")])).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Value { origin: Origin::Env(var), .. } if var == "TASKFLEET_POLICIES_RATE_LIMITS"),
            "{err}"
        );
        assert!(err.to_string().contains("fast"), "{err}");
        let err = Config::load_from(None, env(&[("TASKFLEET_AGGREGATOR_ALERT_RULES", "x=p95 > 1")])).unwrap_err();
        assert!(err.to_string().contains("TASKFLEET_AGGREGATOR_ALERT_RULES"), "{err}");
    }

    #[test]
    fn unknown_variables_are_refused_with_a_suggestion() {
        let err = Config::load_from(None, env(&[("TASKFLEET_MAX_CONCURENT_TASKS", "7")])).unwrap_err();
        let ConfigError::UnknownEnv { var, suggestion } = &err else { panic!("{err}") };
        assert_eq!(var, "TASKFLEET_MAX_CONCURENT_TASKS");
        assert_eq!(suggestion.as_deref(), Some("TASKFLEET_MAX_CONCURRENT_TASKS"));
        assert!(err.to_string().contains("did you mean TASKFLEET_MAX_CONCURRENT_TASKS?"), "{err}");
        let err = Config::load_from(None, env(&[("TASKFLEET_UNRELATED_THING", "x")])).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownEnv { suggestion: None, .. }), "{err}");
    }

    #[test]
    fn a_provider_key_variable_is_not_an_unknown_setting() {
        let vars = [
            ("TASKFLEET_PROVIDERS_URLS", "openai=https://api.openai.com/v1"),
            ("TASKFLEET_PROVIDERS_API_KEY_ENVS", "openai=TASKFLEET_OPENAI_KEY"),
            ("TASKFLEET_OPENAI_KEY", "sk-test"),
        ];
        assert!(Config::load_from(None, env(&vars)).is_ok());
        let err = Config::load_from(None, env(&vars[2..])).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownEnv { .. }), "{err}");
    }

    #[test]
    fn typed_values_load_from_env() {
        let c = Config::load_from(
            None,
            env(&[
                ("TASKFLEET_POLICIES_RATE_LIMITS", "openai=500/min burst 50,tavily=5/s"),
                ("TASKFLEET_POLICIES_KIND_LIMITS", "llm.chat=openai+tavily"),
                ("TASKFLEET_POLICIES_CACHE", "llm.chat=1h by model+messages"),
                ("TASKFLEET_AGGREGATOR_ALERT_RULES", "high_memory=off,slow=p99_ms > 900"),
            ]),
        )
        .unwrap();
        assert_eq!(c.policies.rate_limits["openai"].burst, 50);
        assert_eq!(c.policies.kind_limits["llm.chat"].0, vec!["openai", "tavily"]);
        assert_eq!(c.policies.cache["llm.chat"].key_fields, vec!["model", "messages"]);
        let rules: Vec<_> = c.aggregator.enabled_alert_rules().map(|(name, rule)| (name, rule.threshold)).collect();
        assert_eq!(rules, vec![("slow", 900.0)]);
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
