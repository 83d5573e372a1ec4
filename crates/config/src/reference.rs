//! The configuration reference, generated from the doc comments of the section structs and the
//! defaults of [`Config`]: the table in README.md (between `<!-- config-table:start -->` and
//! `<!-- config-table:end -->`) and the commented sample `deploy/taskfleet.example.toml`. The
//! tests fail when either has drifted; `TASKFLEET_BLESS=1 cargo test -p taskfleet-config`
//! rewrites both.

use crate::Config;
use serde_json::Value;
use std::path::PathBuf;

const SOURCES: [&str; 4] =
    [include_str!("lib.rs"), include_str!("connections.rs"), include_str!("sections.rs"), include_str!("policies.rs")];
const TABLE_START: &str = "<!-- config-table:start -->\n";
const TABLE_END: &str = "<!-- config-table:end -->";

/// A `pub` field of a struct, with its type and doc comment lines.
struct FieldDoc {
    name: String,
    ty: String,
    doc: Vec<String>,
}

/// One configuration key: its section, field, doc comment, default and variables.
struct Key {
    section: String,
    field: FieldDoc,
    default: Value,
    variables: Vec<String>,
}

/// A section: its name, doc comment and keys.
struct Section {
    name: String,
    doc: Vec<String>,
    keys: Vec<Key>,
}

/// The `pub` fields of `pub struct NAME { … }` in the crate's sources, one `pub name: Type,` a
/// line, each after its `///` lines (attributes between are skipped).
fn struct_fields(name: &str) -> Vec<FieldDoc> {
    let header = format!("pub struct {name} {{");
    let source = SOURCES.iter().find(|s| s.contains(&header)).unwrap_or_else(|| panic!("no struct {name}"));
    let body = &source[source.find(&header).unwrap_or_default()..];
    let mut fields = Vec::new();
    let mut doc = Vec::new();
    for line in body.lines().skip(1).map(str::trim).take_while(|line| *line != "}") {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_string());
        } else if let Some((name, ty)) = line.strip_prefix("pub ").and_then(|decl| decl.split_once(':')) {
            let ty = ty.trim().trim_end_matches(',').to_string();
            fields.push(FieldDoc { name: name.trim().to_string(), ty, doc: std::mem::take(&mut doc) });
        }
    }
    fields
}

/// Every section and key, in declaration order.
fn reference() -> Vec<Section> {
    let defaults = serde_json::to_value(Config::default()).unwrap();
    let names = crate::loader::env_names(&defaults);
    struct_fields("Config")
        .into_iter()
        .map(|section| {
            let keys = struct_fields(&section.ty)
                .into_iter()
                .map(|field| Key {
                    section: section.name.clone(),
                    default: defaults[&section.name][&field.name].clone(),
                    variables: names
                        .iter()
                        .filter(|(_, path)| path[..] == [section.name.clone(), field.name.clone()])
                        .map(|(var, _)| var.clone())
                        .collect(),
                    field,
                })
                .collect();
            Section { name: section.name, doc: section.doc, keys }
        })
        .collect()
}

/// A default as written in the README: plain text, `empty` for nothing.
fn plain(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(","),
        Value::Object(map) => map.iter().map(|(k, v)| format!("{k}={}", plain(v))).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    };
    if text.is_empty() { "empty".into() } else { text }
}

fn readme_table() -> String {
    let mut out = String::from("| key | variable | default | meaning |\n|---|---|---|---|\n");
    for key in reference().iter().flat_map(|s| &s.keys) {
        let vars = key.variables.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>();
        let default = match plain(&key.default) {
            empty if empty == "empty" => empty,
            text => format!("`{text}`"),
        };
        let doc = key.field.doc.join(" ").replace('|', "\\|");
        out += &format!("| `{}.{}` | {} | {default} | {doc} |\n", key.section, key.field.name, vars.join(" "));
    }
    out
}

fn sample_toml() -> String {
    let mut out = String::from(
        "# Every taskfleet configuration key with its default, generated from the doc comments in\n\
         # crates/config (`TASKFLEET_BLESS=1 cargo test -p taskfleet-config` rewrites this file).\n\
         # Name a copy in TASKFLEET_CONFIG and keep only the keys you change; each key can also be\n\
         # set by the environment variable shown, which wins over the file.\n",
    );
    for section in reference() {
        out += "\n";
        section.doc.iter().for_each(|line| out += &format!("# {line}\n"));
        out += &format!("[{}]\n", section.name);
        for key in &section.keys {
            out += "\n";
            key.field.doc.iter().for_each(|line| out += &format!("# {line}\n"));
            out += &format!("# Env: {}\n", key.variables.join(", "));
            let value = toml::Value::try_from(&key.default).unwrap();
            out += &format!("{} = {value}\n", key.field.name);
        }
    }
    out
}

fn repo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(name)
}

/// Compares `file` with `expected`, or rewrites it when `TASKFLEET_BLESS` is set.
fn check_generated(file: &str, current: &str, expected: String) {
    if std::env::var_os("TASKFLEET_BLESS").is_some() {
        std::fs::write(repo_file(file), expected).unwrap();
    } else {
        assert!(
            current == expected,
            "{file} is out of date with the doc comments in crates/config; \
             regenerate it with `TASKFLEET_BLESS=1 cargo test -p taskfleet-config`"
        );
    }
}

#[test]
fn every_field_is_documented() {
    let defaults = serde_json::to_value(Config::default()).unwrap();
    let sections = reference();
    assert_eq!(sections.len(), defaults.as_object().unwrap().len());
    for section in &sections {
        assert!(!section.doc.is_empty(), "section {} has no doc comment", section.name);
        let mut fields: Vec<_> = section.keys.iter().map(|k| k.field.name.as_str()).collect();
        fields.sort_unstable();
        let expected: Vec<_> = defaults[&section.name].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(fields, expected, "fields of section {}", section.name);
        for key in &section.keys {
            assert!(!key.field.doc.is_empty(), "{}.{} has no doc comment", section.name, key.field.name);
            assert!(!key.variables.is_empty() && !key.default.is_null(), "{}.{}", section.name, key.field.name);
        }
    }
}

#[test]
fn readme_table_is_current() {
    let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
    let start = readme.find(TABLE_START).expect("README.md has no config-table:start marker") + TABLE_START.len();
    let end = readme.find(TABLE_END).expect("README.md has no config-table:end marker");
    let expected = format!("{}{}{}", &readme[..start], readme_table(), &readme[end..]);
    check_generated("README.md", &readme, expected);
}

#[test]
fn sample_config_is_current_and_loads() {
    let path = repo_file("deploy/taskfleet.example.toml");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    check_generated("deploy/taskfleet.example.toml", &current, sample_toml());
    let loaded = Config::load_from(Some(&path), Vec::new()).unwrap();
    assert_eq!(loaded, Config::default());
}
