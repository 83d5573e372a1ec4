//! Parallel context and quorum: validate the input → 8 RAG queries in parallel merged into one
//! context → 3 models score the same plan in parallel, the verdict accepted when 2 of 3 agree
//! (a failing model is tolerated) → generate → one batched write of the run's analytics.
//!
//! A run per request, a static DAG: `validate` → `rag-0..7` (`http` searches of the knowledge
//! base) → `context` (merges them) → `score-a|b|c` (models `model-a`, `model-b`, `model-c`, one
//! provider each, asked through the mock's judge) → `quorum` (`continue` edges: it sees every
//! vote, failed or not) → `generate` → `analytics` (all records in one `POST /records`). Every
//! model and search call waits the same stated latency. Breakers open after 5 failures, stay
//! open 30 s and close after 2 successes; each call step has 3 attempts, backoff base 0.1 s,
//! factor 2, at most 10 s, full jitter. A model whose breaker is open is out of the vote at
//! once (its step fails `model_unavailable`) instead of waiting for it.
//!
//! Figures: the parallel DAG is ≥ 3× faster than the same steps one after another (a chain),
//! both at the same latency in the same invocation; with `model-c` answering 500 to every
//! call, every run still completes, by quorum of the other two.

use crate::harness::{Figure, Fleet, Mocks, Options, latency, percentile, queue, run_duration, secs};
use serde_json::{Value, json};
use std::time::Duration;
use taskfleet_mock_api::Control;
use taskfleet_proto::{Dependency, NodeSpec, OnFailure, RetryBackoff, RunSpec, RunState};
use taskfleet_worker::providers::Providers;
use taskfleet_worker::{Disposition, TaskContext, TaskError, Worker};

const NAME: &str = "quorum";
const RAG_QUERIES: usize = 8;
const SCORERS: [(&str, &str); 3] = [("score-a", "model-a"), ("score-b", "model-b"), ("score-c", "model-c")];
const WRITER: &str = "writer";
/// The latency of every model and search call, in both shapes (not scaled in a quick run:
/// the comparison needs it to dominate the fleet's own hops).
const CALL_MS: u64 = 200;

/// Runs the example and returns its figures.
pub async fn run(fleet: &Fleet, opts: Options) -> anyhow::Result<Vec<Figure>> {
    let mut mocks = Mocks::default();
    let mut urls = Vec::new();
    for provider in ["kb", "model-a", "model-b", "model-c", "writer-llm"] {
        urls.push(format!("{provider}={}", mocks.start(provider, latency(CALL_MS)).await?));
    }
    // The analytics store stands in for a database: fast, one batch per run.
    urls.push(format!("analytics={}", mocks.start("analytics", latency(10)).await?));
    let models: Vec<String> = SCORERS.iter().map(|(_, m)| format!("{m}={m}")).collect();
    let config = fleet.worker_config(
        NAME,
        &[
            ("TASKFLEET_PROVIDERS_URLS", urls.join(",")),
            ("TASKFLEET_PROVIDERS_MODELS", format!("{},{WRITER}=writer-llm", models.join(","))),
            ("TASKFLEET_PROVIDERS_PRICES", "model-a=2.5/10,model-b=3/15,model-c=0.5/1.5,writer=2.5/10".into()),
            ("TASKFLEET_POLICIES_BREAKER_FAILURES", "5".into()),
            ("TASKFLEET_POLICIES_BREAKER_COOLDOWN", "30s".into()),
            ("TASKFLEET_POLICIES_BREAKER_SUCCESSES", "2".into()),
            ("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "64".into()),
        ],
    )?;
    let providers = Providers::new(&config.providers)?;
    let worker = fleet.spawn_worker(worker(config, &providers));

    // 1. The same request as a DAG and as a chain, alternately, one run at a time.
    let rounds = opts.pick(3, 2);
    let (mut parallel, mut chained) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        for (sequential, into) in [(false, &mut parallel), (true, &mut chained)] {
            let spec = spec(&format!("request {i}"), sequential);
            let (view, took) = fleet.run_all(&[spec], Duration::from_secs(120)).await?.remove(0);
            anyhow::ensure!(view.state == RunState::Succeeded, "a {NAME} run ended {:?}: {:?}", view.state, view.error);
            into.push(took.as_secs_f64());
        }
    }
    let (p, c) = (percentile(&parallel, 50.0), percentile(&chained, 50.0));
    let speedup = c / p.max(1e-9);
    let mut rows = vec![Figure::new(
        NAME,
        format!(
            "{RAG_QUERIES} RAG queries, 3 scorers, generate: DAG against the same steps chained ({CALL_MS} ms a call, median of {rounds})"
        ),
        "≥ 3.0×",
        format!("{speedup:.2}× ({} against {})", secs(Duration::from_secs_f64(p)), secs(Duration::from_secs_f64(c))),
        speedup >= 3.0,
    )];

    // 2. model-c answers 500 to everything: runs complete by quorum of the other two.
    mocks.get("model-c").control(&Control { error_rate: Some(1.0), ..Control::default() })?;
    let before = mocks.stats("model-c").total;
    let runs = opts.pick(10, 6);
    let specs: Vec<RunSpec> = (0..runs).map(|i| spec(&format!("request with a failing model {i}"), false)).collect();
    let finished = fleet.run_all(&specs, Duration::from_secs(300)).await?;
    let by_quorum = finished
        .iter()
        .filter(|(v, _)| v.state == RunState::Succeeded && v.output.as_ref().is_some_and(accepted_by_two))
        .count();
    let calls_to_failing = mocks.stats("model-c").total - before;
    let slowest = finished.iter().map(|(v, _)| run_duration(v)).max().unwrap_or_default();
    rows.push(Figure::new(
        NAME,
        format!("{runs} concurrent runs with model-c answering 500: completed by 2-of-3 quorum"),
        format!("{runs} of {runs}; model-c called fewer than {} times (3 attempts a vote)", runs * 3),
        format!(
            "{by_quorum} of {runs}, slowest {}; model-c called {calls_to_failing} times for {} votes (breaker after 5)",
            secs(slowest),
            runs
        ),
        // Without the breaker every vote would call it 3 times (its attempts).
        by_quorum == runs && (calls_to_failing as usize) < runs * 3,
    ));
    let records = mocks.stats("analytics").records;
    let writes = mocks.stats("analytics").count(200);
    rows.push(Figure::new(
        NAME,
        "analytics: records written per batch (one batch per run)",
        "one write per run",
        format!("{records} records in {writes} writes for {} runs", rounds * 2 + runs),
        writes as usize == rounds * 2 + runs,
    ));
    worker.stop().await?;
    mocks.shutdown().await;
    Ok(rows)
}

/// A run answering `question`, as a DAG or, with `sequential`, as a chain of the same steps.
fn spec(question: &str, sequential: bool) -> RunSpec {
    let retry = |mut n: NodeSpec| {
        n.max_attempts = 3;
        n.retry = Some(RetryBackoff { base_ms: 100, factor: 2.0, max_ms: 10_000 });
        n
    };
    let continue_after = |n: &str| Dependency::Edge { node: n.to_string(), on_failure: OnFailure::Continue };
    let plan = format!("Answer {question:?} from the knowledge base, citing every source.");
    let mut nodes = vec![NodeSpec::new("validate", "quorum.validate", json!({ "question": question, "plan": plan }))];
    let mut previous = "validate".to_string();
    for i in 0..RAG_QUERIES {
        let search = json!({ "provider": "kb", "method": "POST", "path": "/search",
                             "json": { "query": format!("{question}: facet {i}"), "max_results": 3 } });
        let parent = if sequential { previous.clone() } else { "validate".to_string() };
        nodes.push(retry(NodeSpec::new(format!("rag-{i}"), "http", search)).after(&[&parent]));
        previous = format!("rag-{i}");
    }
    let rags: Vec<String> = (0..RAG_QUERIES).map(|i| format!("rag-{i}")).collect();
    let rag_refs: Vec<&str> = rags.iter().map(String::as_str).collect();
    nodes.push(NodeSpec::new("context", "quorum.merge", json!({})).after(&rag_refs));
    previous = "context".into();
    for (node, model) in SCORERS {
        let mut n =
            retry(NodeSpec::new(node, "quorum.score", json!({ "model": model }))).after(&["validate", "context"]);
        if sequential && previous != "context" {
            n.depends_on.push(continue_after(&previous));
        }
        nodes.push(n);
        previous = node.to_string();
    }
    let mut decide = NodeSpec::new("quorum", "quorum.decide", json!({ "needed": 2 }));
    decide.depends_on = SCORERS.iter().map(|(n, _)| continue_after(n)).collect();
    nodes.push(decide);
    nodes
        .push(retry(NodeSpec::new("generate", "quorum.generate", json!({}))).after(&["quorum", "context", "validate"]));
    nodes.push(retry(NodeSpec::new("analytics", "quorum.analytics", json!({}))).after(&["generate", "quorum"]));
    let mut spec = RunSpec::new(nodes);
    spec.name = Some(if sequential { format!("{NAME}-chained") } else { NAME.to_string() });
    spec.queue = queue(NAME);
    spec.timeout_ms = Some(120_000);
    spec
}

/// The example's worker: its steps plus the built-in `http`.
fn worker(config: taskfleet_config::Config, providers: &Providers) -> Worker {
    let (p1, p2, p3) = (providers.clone(), providers.clone(), providers.clone());
    Worker::builder(config)
        .handler("quorum.validate", validate)
        .handler("quorum.merge", merge)
        .handler("quorum.score", move |ctx, payload| score(p1.clone(), ctx, payload))
        .handler("quorum.decide", decide)
        .handler("quorum.generate", move |ctx, payload| generate(p2.clone(), ctx, payload))
        .handler("quorum.analytics", move |ctx, payload| analytics(p3.clone(), ctx, payload))
        .handler("http", providers.http_handler())
        .build()
}

fn invalid(message: impl Into<String>) -> TaskError {
    TaskError::fatal(message).with_code("invalid_input")
}

/// Refuses a request without a question or plan, or with one too long to send to a model.
async fn validate(_ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let field = |k: &str| payload.get(k).and_then(Value::as_str).map(str::trim).unwrap_or_default().to_string();
    let (question, plan) = (field("question"), field("plan"));
    if question.is_empty() || plan.is_empty() {
        return Err(invalid("a request needs a question and a plan"));
    }
    if question.len() + plan.len() > 4_000 {
        return Err(invalid("question and plan exceed 4,000 bytes"));
    }
    Ok(json!({ "question": question, "plan": plan }))
}

/// Merges every search's results into one context, each source once.
async fn merge(ctx: TaskContext, _payload: Value) -> Result<Value, TaskError> {
    let mut sources: Vec<String> = Vec::new();
    let mut snippets = Vec::new();
    for p in ctx.parents.iter() {
        for r in
            p.result.as_ref().and_then(|r| r.pointer("/json/results")).and_then(Value::as_array).into_iter().flatten()
        {
            let url = r.get("url").and_then(Value::as_str).unwrap_or_default().to_string();
            if !sources.contains(&url) {
                sources.push(url);
                snippets.push(r.get("snippet").and_then(Value::as_str).unwrap_or_default().to_string());
            }
        }
    }
    Ok(json!({ "context": snippets.join("\n"), "sources": sources.len() }))
}

/// One model's vote on the plan: the judge's score, approved at 0.5 or more.
async fn score(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let model = payload.get("model").and_then(Value::as_str).unwrap_or_default();
    let plan = ctx.parent_result("validate").and_then(|v| v.get("plan")).and_then(Value::as_str).unwrap_or_default();
    let sources = ctx.parent_result("context").and_then(|c| c.get("sources")).cloned().unwrap_or(Value::Null);
    let request = json!({ "model": model, "messages": [
        { "role": "system", "content": format!("Judge the plan against a context of {sources} sources.") },
        { "role": "user", "content": format!("SCORE\n---\n{plan}") } ] });
    let answer = match providers.chat(&ctx, request).await {
        Ok(a) => a,
        // A model whose breaker is open would hold the vote for its cooldown: it is out.
        Err(e) if matches!(e.disposition, Disposition::Defer { .. }) => {
            return Err(
                TaskError::fatal(format!("{model} is unavailable: {}", e.message)).with_code("model_unavailable")
            );
        }
        Err(e) => return Err(e),
    };
    let verdict: Value = answer
        .get("content")
        .and_then(Value::as_str)
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or_else(|| TaskError::retryable(format!("{model} gave no score")).with_code("bad_answer"))?;
    let s = verdict.get("score").and_then(Value::as_f64).unwrap_or(0.0);
    Ok(json!({ "model": model, "score": s, "approve": s >= 0.5 }))
}

/// Accepts the verdict that at least `needed` of the votes share; failed votes do not count.
async fn decide(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let needed = payload.get("needed").and_then(Value::as_u64).unwrap_or(2) as usize;
    let votes: Vec<bool> = ctx.parents.iter().filter_map(|p| p.result.as_ref()?.get("approve")?.as_bool()).collect();
    let approve = votes.iter().filter(|v| **v).count();
    let (verdict, agreeing) =
        if approve >= votes.len() - approve { (true, approve) } else { (false, votes.len() - approve) };
    if agreeing < needed {
        return Err(TaskError::fatal(format!("no quorum: {agreeing} of {} votes agree, {needed} needed", votes.len()))
            .with_code("no_quorum"));
    }
    Ok(
        json!({ "approve": verdict, "agreeing": agreeing, "votes": votes.len(), "failed": ctx.parents.len() - votes.len() }),
    )
}

/// Writes the answer from the context, once the vote accepted the plan.
async fn generate(providers: Providers, ctx: TaskContext, _payload: Value) -> Result<Value, TaskError> {
    let question =
        ctx.parent_result("validate").and_then(|v| v.get("question")).and_then(Value::as_str).unwrap_or_default();
    let context = ctx.parent_result("context").and_then(|c| c.get("context")).and_then(Value::as_str).unwrap_or("");
    let request = json!({ "model": WRITER, "messages": [
        { "role": "system", "content": context }, { "role": "user", "content": format!("Answer: {question}") } ] });
    let answer = providers.chat(&ctx, request).await?;
    Ok(json!({ "answer": answer.get("content"), "usage": answer.get("usage") }))
}

/// One batched write of the run's records: the votes and the generation.
async fn analytics(providers: Providers, ctx: TaskContext, _payload: Value) -> Result<Value, TaskError> {
    let mut records = vec![json!({ "run": ctx.run_id, "step": "quorum", "outcome": ctx.parent_result("quorum") })];
    records.push(json!({ "run": ctx.run_id, "step": "generate", "usage": ctx.parent_result("generate").and_then(|g| g.get("usage")) }));
    let request =
        json!({ "provider": "analytics", "method": "POST", "path": "/records", "json": { "records": records } });
    providers.http(&ctx, request).await?;
    Ok(json!({ "records": records.len(), "quorum": ctx.parent_result("quorum") }))
}

/// Whether a finished run's output shows a quorum of two of the three votes.
fn accepted_by_two(output: &Value) -> bool {
    output.pointer("/analytics/quorum/agreeing").and_then(Value::as_u64).is_some_and(|n| n >= 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_are_valid_runs_of_the_same_steps() {
        let (dag, chain) = (spec("q", false), spec("q", true));
        for s in [&dag, &chain] {
            taskfleet_proto::plan_nodes(&s.nodes, &s.queue, s.priority, 1 << 20).expect("valid run");
        }
        let names = |s: &RunSpec| s.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&dag), names(&chain));
        let parents = |s: &RunSpec, n: &str| s.nodes.iter().find(|x| x.name == n).map(|x| x.depends_on.len());
        assert_eq!(parents(&dag, "rag-3"), Some(1));
        assert_eq!(parents(&chain, "score-b"), Some(3), "validate, context and the previous vote");
    }

    #[tokio::test]
    async fn a_quorum_needs_two_agreeing_votes() {
        use taskfleet_proto::{ParentOutcome, TaskState};
        let vote = |approve: Option<bool>| ParentOutcome {
            id: uuid::Uuid::now_v7(),
            node: None,
            state: if approve.is_some() { TaskState::Succeeded } else { TaskState::Failed },
            result: approve.map(|a| json!({ "approve": a })),
            error: None,
        };
        let decided = |votes: Vec<Option<bool>>| {
            let mut ctx = TaskContext::for_test("quorum.decide");
            ctx.parents = std::sync::Arc::new(votes.into_iter().map(vote).collect());
            decide(ctx, json!({ "needed": 2 }))
        };
        let two_of_three = decided(vec![Some(true), None, Some(true)]).await.expect("a quorum");
        assert_eq!(two_of_three["agreeing"], 2);
        assert_eq!(two_of_three["failed"], 1);
        assert_eq!(decided(vec![Some(true), None, Some(false)]).await.unwrap_err().code, "no_quorum");
        assert_eq!(decided(vec![Some(false), Some(false), Some(true)]).await.expect("a quorum")["approve"], false);
    }
}
