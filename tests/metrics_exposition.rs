//! Every `/metrics` endpoint of a working fleet (coordinator, worker, aggregator) passes
//! `promtool check metrics` (Prometheus' own linter: HELP text, `_total` on counters, base
//! units, histogram shape) with no finding at all, and the latency metrics are histograms with
//! buckets, not summaries. Needs `.dev/bin/promtool`, which `make services` installs.

use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use taskfleet_e2e::{Fleet, http_request};
use taskfleet_mock_api::{Behaviour, MockApi, MockConfig};
use taskfleet_proto::TaskEnvelope;

/// An `llm.chat` task for the mock's `model-a`, under the rate limit `llm`.
fn chat(i: usize) -> TaskEnvelope {
    let messages = json!([{ "role": "user", "content": format!("question {i}") }]);
    let mut t = TaskEnvelope::new("llm.chat", json!({ "model": "model-a", "messages": messages }));
    t.limits = vec!["llm".into()];
    t
}

/// `.dev/bin/promtool` of the repository, or a failure saying how to install it.
fn promtool() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.dev/bin/promtool");
    assert!(
        path.is_file(),
        "{} is missing: `make services` installs promtool (from Debian's prometheus package) into .dev/bin",
        path.display()
    );
    path
}

/// What `promtool check metrics` says about `body`: every line it prints (none when clean).
fn lint(promtool: &PathBuf, body: &str) -> Vec<String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    child.stdin.take().expect("promtool's stdin").write_all(body.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool's output");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if !out.status.success() && lines.is_empty() {
        lines.push(format!("promtool exited with {} and said nothing", out.status));
    }
    lines
}

/// Which source defines a metric, for the failure message.
fn owner(finding: &str) -> &'static str {
    let name = finding.split_whitespace().next().unwrap_or_default();
    match name {
        n if n.starts_with("taskfleet_worker_")
            || n.starts_with("taskfleet_llm_")
            || n.starts_with("taskfleet_embed_")
            || n.starts_with("taskfleet_provider_")
            || n.starts_with("taskfleet_semantic_cache_lookup") =>
        {
            "defined in crates/worker (HELP and unit in crates/service/src/catalogue.rs)"
        }
        n if n.starts_with("taskfleet_coordinator_") || n.starts_with("taskfleet_stream_") => {
            "defined in crates/coordinator (HELP and unit in crates/service/src/catalogue.rs)"
        }
        n if n.starts_with("taskfleet_task_")
            || n.starts_with("taskfleet_aggregator_")
            || n.starts_with("taskfleet_fleet_") =>
        {
            "defined in crates/aggregator (HELP and unit in crates/service/src/catalogue.rs)"
        }
        n if n.starts_with("taskfleet_") => {
            "defined in crates/shared-state (HELP and unit in crates/service/src/catalogue.rs)"
        }
        _ => "see crates/service/src/catalogue.rs and the exporter settings in crates/service/src/lib.rs",
    }
}

/// The `/metrics` body at `addr`.
fn metrics(addr: &str) -> String {
    let answer = http_request(addr, "GET", "/metrics", &[]).unwrap_or_else(|e| panic!("GET {addr}/metrics: {e}"));
    assert_eq!(answer.status, 200, "GET {addr}/metrics: {answer:?}");
    answer.body
}

/// Fails unless `name` is exposed in `body` as a histogram with a `+Inf` bucket.
fn assert_histogram(endpoint: &str, body: &str, name: &str) {
    assert!(
        body.contains(&format!("# TYPE {name} histogram\n")),
        "{endpoint}: {name} is not exposed as a histogram:\n{}",
        body.lines().filter(|l| l.contains(name)).collect::<Vec<_>>().join("\n")
    );
    let inf_bucket = body.lines().any(|l| l.starts_with(&format!("{name}_bucket{{")) && l.contains("le=\"+Inf\""));
    assert!(inf_bucket, "{endpoint}: {name} has no _bucket{{le=\"+Inf\"}} line");
    assert!(!body.lines().any(|l| l.starts_with(name) && l.contains("quantile=")), "{endpoint}: {name} is a summary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_passes_promtool() {
    let promtool = promtool();
    let llm =
        MockApi::start(MockConfig { name: "llm".into(), behaviour: Behaviour::default(), ..MockConfig::default() })
            .await
            .unwrap();
    let mut fleet = Fleet::new("metrics-lint");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("llm={}/v1", llm.url()))
        .set("TASKFLEET_PROVIDERS_MODELS", "model-a=llm")
        .set("TASKFLEET_PROVIDERS_PRICES", "model-a=1/2")
        .set("TASKFLEET_POLICIES_RATE_LIMITS", "llm=1000/s burst 100")
        .set("TASKFLEET_POLICIES_CACHE", "echo=10m,llm.chat=10m by model+messages");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_aggregator();
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    // Successes (echo, LLM calls with tokens and cost), a fatal failure, a retry that ends
    // dead, an unknown kind.
    let mut tasks: Vec<TaskEnvelope> = (0..20).map(|i| TaskEnvelope::new("echo", json!({ "i": i }))).collect();
    tasks.extend((0..3).map(chat));
    let mut fatal = TaskEnvelope::new("sleep", json!({ "ms": 5, "fail": "fatal" }));
    fatal.max_attempts = 1;
    let mut retried = TaskEnvelope::new("sleep", json!({ "fail": "retryable" }));
    retried.max_attempts = 2;
    retried.retry = Some(taskfleet_proto::RetryBackoff { base_ms: 20, factor: 2.0, max_ms: 50 });
    tasks.extend([fatal, retried, TaskEnvelope::new("no-such-kind", json!({}))]);
    fleet.submit_all(&client, &tasks).await;
    fleet.wait_final(&pool, tasks.len() as i64, Duration::from_secs(60)).await;
    // The same echo payloads again: answered from the result cache.
    let mut again: Vec<TaskEnvelope> = (0..5).map(|i| TaskEnvelope::new("echo", json!({ "i": i }))).collect();
    again.extend((0..3).map(chat));
    fleet.submit_all(&client, &again).await;
    let total = (tasks.len() + again.len()) as i64;
    fleet.wait_final(&pool, total, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.stats()["fleet"]["completed_total"].as_i64().unwrap_or(0) < total {
        assert!(Instant::now() < deadline, "the aggregator did not count every task:\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One more publisher round, so the fleet gauges are set from these figures.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let endpoints = [
        ("coordinator", fleet.coordinator_http.clone()),
        ("worker", fleet.worker_http[0].clone()),
        ("aggregator", fleet.aggregator_http.clone()),
    ];
    let mut report = Vec::new();
    let mut bodies = Vec::new();
    for (name, addr) in &endpoints {
        let body = metrics(addr);
        assert!(body.contains("taskfleet_"), "{name} exposes no taskfleet metric:\n{body}");
        let findings = lint(&promtool, &body);
        println!("{name} ({addr}/metrics): {} lines, {} promtool findings", body.lines().count(), findings.len());
        for f in findings {
            report.push(format!("{name} /metrics: {f}  [{}]", owner(&f)));
        }
        bodies.push((*name, body));
    }
    assert!(report.is_empty(), "promtool check metrics found {} problems:\n{}", report.len(), report.join("\n"));

    let body_of = |name: &str| bodies.iter().find(|(n, _)| *n == name).map(|(_, b)| b.as_str()).unwrap_or_default();
    assert_histogram("aggregator", body_of("aggregator"), "taskfleet_task_end_to_end_seconds");
    assert_histogram("aggregator", body_of("aggregator"), "taskfleet_task_run_seconds");
    assert_histogram("aggregator", body_of("aggregator"), "taskfleet_task_queue_wait_seconds");
    assert_histogram("worker", body_of("worker"), "taskfleet_worker_run_seconds");
    // The cached round shows up as cache hits.
    for (endpoint, metric) in [
        ("worker", "taskfleet_worker_cache_hits_total"),
        ("worker", "taskfleet_llm_tokens_total"),
        ("worker", "taskfleet_rate_limit_total"),
        ("aggregator", "taskfleet_task_tokens_total"),
        ("aggregator", "taskfleet_task_cache_hits_total"),
    ] {
        assert!(body_of(endpoint).contains(&format!("\n{metric}{{")), "{endpoint} exposes no {metric}");
    }
}
