//! Layering of defaults, file and environment.

use crate::Config;
use serde_json::{Map, Value};
use std::path::Path;

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
    #[error("config file {path} is not valid TOML: {message}")]
    Toml {
        /// The file.
        path: String,
        /// Parser message.
        message: String,
    },
    /// An environment variable holds a value of the wrong shape.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// The merged configuration does not fit the schema (unknown key, wrong type).
    #[error("invalid configuration: {0}")]
    Schema(String),
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {field}: {message}")]
    Invalid {
        /// Dotted field path, e.g. `worker.max_concurrent_tasks`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Environment variables with the `TASKFLEET_` prefix that are not configuration fields.
const NOT_FIELDS: &[&str] = &["TASKFLEET_CONFIG"];

pub(crate) fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut root = serde_json::to_value(Config::default()).map_err(|e| ConfigError::Schema(e.to_string()))?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError::Toml { path: path.display().to_string(), message: e.to_string() })?;
        let file_value = serde_json::to_value(table).map_err(|e| ConfigError::Schema(e.to_string()))?;
        merge(&mut root, file_value);
    }
    let names = env_names(&root);
    for (var, raw) in env {
        if !var.starts_with("TASKFLEET_") || NOT_FIELDS.contains(&var.as_str()) || var.starts_with("TASKFLEET_TEST_") {
            continue;
        }
        let Some((section, field)) = names.iter().find(|(name, _)| *name == var).map(|(_, path)| path.clone()) else {
            tracing::warn!(%var, "ignoring environment variable that names no configuration field");
            continue;
        };
        let slot = &mut root[&section][&field];
        *slot = parse_env_value(slot, &raw).map_err(|message| ConfigError::Env { var: var.clone(), message })?;
    }
    serde_json::from_value(root).map_err(|e| ConfigError::Schema(e.to_string()))
}

/// Every accepted variable name with the (section, field) it sets: the long form for every
/// field, and the short form for field names that occur in one section only.
fn env_names(root: &Value) -> Vec<(String, (String, String))> {
    let mut long = Vec::new();
    let mut count = std::collections::HashMap::<String, usize>::new();
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
            (section.clone(), field.clone()),
        ));
        if count[&field] == 1 {
            names.push((format!("TASKFLEET_{}", field.to_uppercase()), (section, field)));
        }
    }
    names
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
                ("TASKFLEET_UNRELATED_THING", "x"),
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
        assert!(err.to_string().contains("invalid"), "{err}");
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
}
