//! The optional monitoring kit, k8s/monitoring: every `taskfleet_*` metric its Grafana dashboard
//! and its PrometheusRule name is one the services export (the catalogue,
//! `taskfleet_service::catalogue::METRICS`, read from crates/service/src/catalogue.rs), the rules
//! mirror the aggregator's default alert rules (crates/config/src/sections.rs), and promtool
//! (`.dev/bin/promtool`, installed by `make services`) accepts the rules and the dashboard's
//! queries and passes the rules' unit tests (k8s/monitoring/prometheusrule.test.yaml). Without
//! promtool that last part is skipped with a notice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;
use serde_norway::Value;

const DASHBOARD: &str = "k8s/monitoring/dashboards/taskfleet.json";
const RULES: &str = "k8s/monitoring/prometheusrule.yaml";
const RULE_TESTS: &str = "k8s/monitoring/prometheusrule.test.yaml";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory").to_owned()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The catalogue's metrics by name, with their kind (`counter`, `gauge`, `histogram`).
fn catalogue() -> BTreeMap<String, String> {
    let source = read("crates/service/src/catalogue.rs");
    let start = source.find("pub const METRICS").expect("catalogue.rs defines METRICS");
    let end = start + source[start..].find("\n];").expect("METRICS ends with ];");
    let entry = Regex::new(r#"\b(counter|gauge|histogram)\(\s*"([a-z0-9_]+)""#).expect("valid regex");
    let metrics: BTreeMap<String, String> =
        entry.captures_iter(&source[start..end]).map(|c| (c[2].to_owned(), c[1].to_owned())).collect();
    assert!(metrics.len() > 40, "read only {} metrics from catalogue.rs: has its layout changed?", metrics.len());
    metrics
}

/// The `taskfleet_*` identifiers of a PromQL expression, outside string literals (label values).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let strings = Regex::new(r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'"#).expect("valid regex");
    let code = strings.replace_all(expr, "\"\"");
    let name = Regex::new(r"\btaskfleet_[A-Za-z0-9_:]*").expect("valid regex");
    name.find_iter(&code).map(|m| m.as_str().to_owned()).collect()
}

/// Why `name` is not an exported series: not in the catalogue, and not a histogram's
/// `_bucket`, `_sum` or `_count`.
fn unexported(name: &str, catalogue: &BTreeMap<String, String>) -> Option<String> {
    if let Some(kind) = catalogue.get(name) {
        return (kind == "histogram").then(|| format!("{name} is a histogram: use {name}_bucket, _sum or _count"));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some(kind) = catalogue.get(base)
        {
            return (kind != "histogram").then(|| format!("{name}: {base} is a {kind}, not a histogram"));
        }
    }
    Some(format!("{name} is not in the catalogue (crates/service/src/catalogue.rs)"))
}

/// Every query of the dashboard, as `(panel title, expr)`, rows' nested panels included.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(panels: &[serde_json::Value], out: &mut Vec<(String, String)>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(panel["panels"].as_array().map(Vec::as_slice).unwrap_or_default(), out);
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    walk(dashboard["panels"].as_array().expect("the dashboard has panels"), &mut queries);
    for variable in dashboard["templating"]["list"].as_array().map(Vec::as_slice).unwrap_or_default() {
        if variable["type"] == "query"
            && let Some(query) = variable["query"].as_str().or_else(|| variable["query"]["query"].as_str())
        {
            queries.push((format!("variable {}", variable["name"]), query.to_owned()));
        }
    }
    queries
}

/// The PrometheusRule's `spec` (a Prometheus rules file).
fn rules_spec() -> Value {
    let rule: Value = serde_norway::from_str(&read(RULES)).expect("the PrometheusRule is YAML");
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"), "{RULES}");
    rule["spec"].clone()
}

/// Every rule of the spec, as `(group, rule)`.
fn rules(spec: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for group in spec["groups"].as_sequence().expect("spec.groups") {
        let name = group["name"].as_str().unwrap_or("?").to_owned();
        for rule in group["rules"].as_sequence().expect("every group has rules") {
            out.push((name.clone(), rule.clone()));
        }
    }
    out
}

#[test]
fn dashboard_and_rules_name_only_exported_metrics() {
    let catalogue = catalogue();
    let mut named: Vec<(String, String)> = Vec::new();
    for (panel, expr) in dashboard_queries() {
        named.extend(metric_names(&expr).into_iter().map(|m| (format!("{DASHBOARD}: panel {panel:?}"), m)));
    }
    for (group, rule) in rules(&rules_spec()) {
        let id = rule["alert"].as_str().or(rule["record"].as_str()).unwrap_or("?").to_owned();
        let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{RULES}: {id} has no expr"));
        named.extend(metric_names(expr).into_iter().map(|m| (format!("{RULES}: {group}/{id}"), m)));
    }
    // The unit tests' input series must be real series too, or they test nothing.
    let tests: Value = serde_norway::from_str(&read(RULE_TESTS)).expect("the rule tests are YAML");
    for test in tests["tests"].as_sequence().expect("tests") {
        for series in test["input_series"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
            let text = series["series"].as_str().unwrap_or_default();
            let name = text.split('{').next().unwrap_or_default();
            named.extend(metric_names(name).into_iter().map(|m| (format!("{RULE_TESTS}: input series"), m)));
        }
    }
    let distinct: BTreeSet<&str> = named.iter().map(|(_, m)| m.as_str()).collect();
    assert!(
        distinct.len() >= 15,
        "found only {} taskfleet_ metric names: is extraction broken? {distinct:?}",
        distinct.len()
    );
    let unknown: Vec<String> = named
        .iter()
        .filter_map(|(place, name)| unexported(name, &catalogue).map(|why| format!("{place}: {why}")))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(unknown.is_empty(), "metrics the services do not export:\n  {}", unknown.join("\n  "));
}

#[test]
fn dashboard_shows_what_operators_look_at() {
    let queries = dashboard_queries();
    let all: String = queries.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("\n");
    let expected = [
        ("throughput", "taskfleet_task_events_total"),
        ("p50 latency", "histogram_quantile(0.5, sum by (le) (rate(taskfleet_task_end_to_end_seconds_bucket"),
        ("p99 latency", "histogram_quantile(0.99, sum by (le) (rate(taskfleet_task_end_to_end_seconds_bucket"),
        ("errors", "event=~\"failed|dead\""),
        ("cache hit ratio", "taskfleet_task_cache_hits_total"),
        ("queue depth", "taskfleet_worker_buffered"),
        ("cost", "taskfleet_task_cost_microdollars_total"),
    ];
    for (what, needle) in expected {
        assert!(all.contains(needle), "{DASHBOARD}: no panel shows {what} ({needle})");
    }
    // Percentiles over every pod: buckets summed by le before histogram_quantile.
    let quantile = Regex::new(r"histogram_quantile\(\s*[0-9.]+\s*,\s*sum by \(([^)]*)\) \(rate\(([a-z0-9_]+)\[")
        .expect("valid regex");
    for (panel, expr) in &queries {
        if expr.contains("histogram_quantile") {
            let caps = quantile.captures(expr).unwrap_or_else(|| panic!("panel {panel:?}: unexpected form {expr}"));
            assert!(caps[1].split(',').any(|l| l.trim() == "le"), "panel {panel:?}: sum by must keep le: {expr}");
            assert!(caps[2].ends_with("_bucket"), "panel {panel:?}: histogram_quantile over {}", &caps[2]);
        }
    }
}

/// The aggregator's default alert rules, `(name, metric, above, threshold)`, and its
/// `alert_min_samples`, read from `AggregatorConfig::default` in crates/config/src/sections.rs.
fn aggregator_defaults() -> (Vec<(String, String, bool, f64)>, u64) {
    let source = read("crates/config/src/sections.rs");
    let start = source.find("impl Default for AggregatorConfig").expect("AggregatorConfig has a Default");
    let body = &source[start..start + source[start..].find("\n}\n").expect("end of the impl")];
    let rule = Regex::new(r#"\(\s*"([a-z0-9_]+)"\s*,\s*"([a-z0-9_]+)"\s*,\s*(true|false)\s*,\s*([0-9.]+)\s*\)"#)
        .expect("valid regex");
    let rules: Vec<(String, String, bool, f64)> = rule
        .captures_iter(body)
        .map(|c| (c[1].to_owned(), c[2].to_owned(), &c[3] == "true", c[4].parse().expect("a number")))
        .collect();
    let samples = Regex::new(r"alert_min_samples:\s*(\d+)").expect("valid regex");
    let min_samples = samples.captures(body).expect("alert_min_samples default")[1].parse().expect("a number");
    assert!(rules.len() >= 4, "read {} default alert rules from sections.rs: has its layout changed?", rules.len());
    (rules, min_samples)
}

#[test]
fn rules_mirror_the_aggregator_default_alerts() {
    let (defaults, min_samples) = aggregator_defaults();
    let alerts: BTreeMap<String, Value> = rules(&rules_spec())
        .into_iter()
        .filter_map(|(_, r)| Some((r["labels"]["aggregator_rule"].as_str()?.to_owned(), r)))
        .collect();
    let names: BTreeSet<&str> = defaults.iter().map(|(n, ..)| n.as_str()).collect();
    let mirrored: BTreeSet<&str> = alerts.keys().map(String::as_str).collect();
    assert_eq!(mirrored, names, "{RULES}: alerts labelled aggregator_rule must be exactly the aggregator's defaults");
    // Metrics judged only once the window holds alert_min_samples final states.
    let sampled = ["p50_ms", "p95_ms", "p99_ms", "max_ms", "queue_wait_p95_ms", "run_p95_ms"];
    for (name, metric, above, threshold) in &defaults {
        let rule = &alerts[name];
        let expr = rule["expr"].as_str().unwrap_or_default();
        // The rules use the units Prometheus exports: seconds, and percent as the aggregator.
        let value = if metric.ends_with("_ms") { threshold / 1000.0 } else { *threshold };
        let op = if *above { ">" } else { "<" };
        let comparison = Regex::new(&format!(r"{op}\s*{}(?:\s|$)", regex::escape(&value.to_string()))).expect("regex");
        assert!(
            comparison.is_match(expr),
            "{RULES}: {name} ({metric} {op} {threshold} in the aggregator) should compare `{op} {value}`:\n{expr}"
        );
        let judged_on_samples = sampled.contains(&metric.as_str()) || metric.ends_with("_rate");
        if judged_on_samples {
            let guard = format!(">= {min_samples}");
            assert!(
                expr.contains(&guard),
                "{RULES}: {name} should wait for {min_samples} final states ({guard}):\n{expr}"
            );
        }
        for key in ["summary", "description"] {
            assert!(rule["annotations"][key].as_str().is_some_and(|s| !s.is_empty()), "{RULES}: {name}: no {key}");
        }
    }
}

/// `.dev/bin/promtool` (`make services`), else `promtool` on the PATH.
fn promtool() -> Option<PathBuf> {
    let dev = root().join(".dev").join("bin").join("promtool");
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("promtool")).find(|p| p.is_file()));
    [Some(dev), on_path].into_iter().flatten().find(|p| p.is_file())
}

fn run(promtool: &Path, dir: &Path, args: &[&str]) {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    assert!(
        output.status.success(),
        "promtool {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    print!("{}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn promtool_accepts_the_rules_and_their_tests_pass() {
    let Some(promtool) = promtool() else {
        println!("NOTICE: promtool not found (.dev/bin/promtool: `make services`): rules not checked with promtool");
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let spec = serde_norway::to_string(&rules_spec()).expect("serialize the rules");
    std::fs::write(dir.path().join("rules.yaml"), spec).expect("write rules.yaml");
    std::fs::write(dir.path().join("prometheusrule.test.yaml"), read(RULE_TESTS)).expect("write the rule tests");
    run(&promtool, dir.path(), &["check", "rules", "rules.yaml"]);
    run(&promtool, dir.path(), &["test", "rules", "prometheusrule.test.yaml"]);

    // The dashboard's queries, with Grafana's interval variables filled in, as recording rules:
    // promtool parses every one.
    let mut groups = Vec::new();
    for (i, (panel, expr)) in dashboard_queries().into_iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h");
        let mut rule = serde_norway::Mapping::new();
        rule.insert("record".into(), format!("dashboard:query_{i}:check").into());
        rule.insert("expr".into(), expr.into());
        let mut labels = serde_norway::Mapping::new();
        labels.insert("panel".into(), panel.into());
        rule.insert("labels".into(), Value::Mapping(labels));
        groups.push(Value::Mapping(rule));
    }
    let mut group = serde_norway::Mapping::new();
    group.insert("name".into(), "dashboard".into());
    group.insert("rules".into(), Value::Sequence(groups));
    let mut file = serde_norway::Mapping::new();
    file.insert("groups".into(), Value::Sequence(vec![Value::Mapping(group)]));
    let text = serde_norway::to_string(&Value::Mapping(file)).expect("serialize the dashboard queries");
    std::fs::write(dir.path().join("dashboard.yaml"), text).expect("write dashboard.yaml");
    run(&promtool, dir.path(), &["check", "rules", "dashboard.yaml"]);
}

#[test]
fn metric_names_skip_label_values_and_resolve_histograms() {
    let expr = r#"sum(rate(taskfleet_task_events_total{namespace="taskfleet_x",event="succeeded"}[5m])) / taskfleet_a"#;
    assert_eq!(
        metric_names(expr),
        BTreeSet::from(["taskfleet_task_events_total".to_owned(), "taskfleet_a".to_owned()])
    );
    let catalogue = BTreeMap::from([
        ("taskfleet_task_run_seconds".to_owned(), "histogram".to_owned()),
        ("taskfleet_worker_in_flight".to_owned(), "gauge".to_owned()),
    ]);
    assert_eq!(unexported("taskfleet_task_run_seconds_bucket", &catalogue), None);
    assert_eq!(unexported("taskfleet_worker_in_flight", &catalogue), None);
    assert!(unexported("taskfleet_task_run_seconds", &catalogue).is_some(), "a histogram has no bare series");
    assert!(unexported("taskfleet_worker_in_flight_count", &catalogue).is_some(), "a gauge has no _count");
    assert!(unexported("taskfleet_queue_depth", &catalogue).is_some());
}
