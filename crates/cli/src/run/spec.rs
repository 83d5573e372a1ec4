//! Reading a run file: JSON or YAML, from a path or standard input.

use anyhow::{Context, anyhow};
use std::io::Read;
use std::path::Path;
use taskfleet_proto::RunSpec;

/// How a run file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `.yaml` or `.yml`.
    Yaml,
    /// Anything else: JSON, else YAML.
    Guess,
}

/// Reads a RunSpec from `file` (`-`: standard input).
pub(super) fn read_spec(file: &str) -> anyhow::Result<RunSpec> {
    let (text, format) = if file == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the run from standard input")?;
        (text, Format::Guess)
    } else {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        let yaml = Path::new(file)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        (text, if yaml { Format::Yaml } else { Format::Guess })
    };
    let name = if file == "-" { "standard input" } else { file };
    parse_spec(&text, format).with_context(|| format!("{name} is not a valid run"))
}

/// Parses a RunSpec as YAML, or as JSON and else YAML.
fn parse_spec(text: &str, format: Format) -> anyhow::Result<RunSpec> {
    if format == Format::Yaml {
        return serde_norway::from_str(text).map_err(|e| anyhow!("YAML: {e}"));
    }
    match serde_json::from_str(text) {
        Ok(spec) => Ok(spec),
        Err(json) => serde_norway::from_str(text).map_err(|yaml| anyhow!("as JSON: {json}; as YAML: {yaml}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runs_are_read_from_json_or_yaml() {
        let json = r#"{"name": "r", "nodes": [{"name": "a", "kind": "k"},
            {"name": "b", "kind": "k", "depends_on": ["a", {"node": "a", "on_failure": "continue"}],
             "loop": {"until": "x > 1", "max_iterations": 2}}]}"#;
        let yaml = "name: r\nnodes:\n  - name: a\n    kind: k\n  - name: b\n    kind: k\n    depends_on:\n      - a\n      \
                    - {node: a, on_failure: continue}\n    loop: {until: x > 1, max_iterations: 2}\n";
        for (text, format) in [(json, Format::Guess), (yaml, Format::Guess), (yaml, Format::Yaml)] {
            let spec = parse_spec(text, format).unwrap();
            assert_eq!(spec.name.as_deref(), Some("r"));
            assert_eq!(spec.nodes[1].depends_on.len(), 2);
            assert_eq!(spec.nodes[1].repeat.as_ref().map(|l| l.max_iterations), Some(2));
        }
        let yaml_payload = "nodes:\n  - name: a\n    kind: k\n    payload: {q: [1, 2.5, \"x\"]}\n";
        assert_eq!(parse_spec(yaml_payload, Format::Guess).unwrap().nodes[0].payload, json!({"q": [1, 2.5, "x"]}));
        let err = parse_spec("nodes: [{name: a, kind: k, bogus: 1}]", Format::Guess).unwrap_err().to_string();
        assert!(err.contains("as JSON") && err.contains("bogus"), "{err}");
        assert!(parse_spec("{\"nodes\": []}", Format::Yaml).is_ok());
    }
}
