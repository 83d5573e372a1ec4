//! Parallel research: planner → N search queries → researchers → writer → a report with
//! sections.
//!
//! A run per topic: `plan` (the planner model) → `research` (spawns, per query, an `http`
//! search through a fallback chain chosen by the query's kind and a researcher reading its
//! results, joined by `collect`) → `write` (the writer model: one section per query). Planner
//! and writer use `gpt-4o` on provider `openai`; researchers `claude-haiku` on `anthropic`.
//! Search goes to three providers limited to 10 (tavily), 5 (perplexity) and 20 (exa) calls a
//! minute, fleet-wide, with chains news: tavily→perplexity→exa, academic: perplexity→tavily→exa,
//! web: exa→tavily→perplexity; a query whose first provider has no token goes to the next one
//! that has. Search results are cached 1 h, LLM answers 24 h; 16 tasks at once per worker.
//!
//! Figure: 10 concurrent runs of 2 queries each all return a report with non-empty sections,
//! and no provider exceeds its limit in any window at the mock API (its arrival log).

use crate::harness::{Figure, Fleet, Mocks, Options, answer_text, chat_request, latency, queue, secs};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use taskfleet_proto::{NodeSpec, RetryBackoff, RunSpec};
use taskfleet_worker::providers::Providers;
use taskfleet_worker::{OnFailure, Spawn, TaskContext, TaskError, Worker, builtin};

const NAME: &str = "research";
/// Search providers, their stated limits per minute, and the chain each kind of query uses.
const SEARCH: [(&str, u32); 3] = [("tavily", 10), ("perplexity", 5), ("exa", 20)];
const CHAINS: [(&str, &str); 3] =
    [("news", "tavily>perplexity>exa"), ("academic", "perplexity>tavily>exa"), ("web", "exa>tavily>perplexity")];
const PLANNER: &str = "gpt-4o";
const RESEARCHER: &str = "claude-haiku";
const ASPECTS: [&str; 4] = ["recent developments", "key studies", "open problems", "practical uses"];

/// Runs the example and returns its figures.
pub async fn run(fleet: &Fleet, opts: Options) -> anyhow::Result<Vec<Figure>> {
    let (runs, queries) = (10usize, 2usize);
    let mut mocks = Mocks::default();
    let mut urls = Vec::new();
    for (provider, ms) in [("openai", 400), ("anthropic", 300), ("tavily", 250), ("perplexity", 350), ("exa", 200)] {
        urls.push(format!("{provider}={}", mocks.start(provider, latency(opts.latency_ms(ms))).await?));
    }
    let per = if opts.quick { "s" } else { "min" };
    let limits: Vec<String> = SEARCH.iter().map(|(p, n)| format!("{p}={n}/{per}")).collect();
    let config = fleet.worker_config(
        NAME,
        &[
            ("TASKFLEET_PROVIDERS_URLS", urls.join(",")),
            ("TASKFLEET_PROVIDERS_MODELS", format!("{PLANNER}=openai,{RESEARCHER}=anthropic")),
            ("TASKFLEET_PROVIDERS_PRICES", format!("{PLANNER}=2.5/10,{RESEARCHER}=0.8/4")),
            ("TASKFLEET_POLICIES_RATE_LIMITS", limits.join(",")),
            ("TASKFLEET_PROVIDERS_LIMITS", "tavily=tavily,perplexity=perplexity,exa=exa".into()),
            (
                "TASKFLEET_PROVIDERS_CHAINS",
                CHAINS.iter().map(|(k, c)| format!("{k}={c}")).collect::<Vec<_>>().join(","),
            ),
            ("TASKFLEET_POLICIES_CACHE", "http=1h by provider+path+json,llm.chat=24h by model+messages".into()),
            ("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "16".into()),
            // A call may book a token at most this far ahead instead of overflowing: 1 s
            // against limits of a few a minute; scaled with them in a quick run.
            ("TASKFLEET_POLICIES_RATE_LIMIT_HORIZON", opts.pick("1s", "16ms").into()),
        ],
    )?;
    let providers = Providers::new(&config.providers)?;
    let worker = fleet.spawn_worker(worker(config, &providers));

    let started = Instant::now();
    let specs: Vec<RunSpec> =
        (0..runs).map(|i| spec(&format!("{} ({i})", TOPICS[i % TOPICS.len()]), i, queries)).collect();
    let finished = fleet.run_all(&specs, Duration::from_secs(600)).await?;
    let wall = started.elapsed();
    worker.stop().await?;

    let complete =
        finished.iter().filter(|(v, _)| report_sections(v.output.as_ref()).is_some_and(|n| n == queries)).count();
    let mut rows = vec![Figure::new(
        NAME,
        format!("{runs} concurrent runs of {queries} queries: reports with non-empty sections"),
        format!("{runs} of {runs}"),
        format!("{complete} of {runs} in {}", secs(wall)),
        complete == runs,
    )];
    let window_ms = opts.minute().as_secs_f64() * 1000.0;
    let mut served = Vec::new();
    for (provider, limit) in SEARCH {
        let stats = mocks.stats(provider);
        let busiest = stats.max_in_window(window_ms);
        served.push(format!("{provider} {}", stats.count(200)));
        rows.push(Figure::new(
            NAME,
            format!("{provider}: most calls in any {} window at the API", secs(opts.minute())),
            format!("≤ {limit}"),
            busiest.to_string(),
            busiest <= limit as usize,
        ));
    }
    let overflowed = overflow_count(&finished);
    rows.push(Figure::new(
        NAME,
        "searches served by a fallback (overflow past a limit)",
        "> 0, and every search served",
        format!("{overflowed} of {}; calls: {}", runs * queries, served.join(", ")),
        overflowed > 0,
    ));
    if opts.quick {
        rows[0].figure.push_str(" (quick: limits per second, latencies / 10)");
    }
    mocks.shutdown().await;
    Ok(rows)
}

const TOPICS: [&str; 5] =
    ["solid-state batteries", "protein folding", "urban heat islands", "quantum error correction", "soil carbon"];

/// Research run number `n`, about `topic`.
fn spec(topic: &str, n: usize, queries: usize) -> RunSpec {
    let mut spec = RunSpec::new(vec![
        NodeSpec::new("plan", "research.plan", json!({ "topic": topic, "queries": queries, "n": n })),
        NodeSpec::new("research", "research.fanout", json!({})).after(&["plan"]),
        NodeSpec::new("write", "research.write", json!({ "topic": topic })).after(&["research", "plan"]),
    ]);
    spec.name = Some(NAME.into());
    spec.queue = queue(NAME);
    spec.timeout_ms = Some(600_000);
    spec
}

/// The example's worker: its steps plus the built-in `http` and `collect`.
fn worker(config: taskfleet_config::Config, providers: &Providers) -> Worker {
    let (p1, p2, p3) = (providers.clone(), providers.clone(), providers.clone());
    Worker::builder(config)
        .handler("research.plan", move |ctx, payload| plan(p1.clone(), ctx, payload))
        .handler("research.fanout", fanout)
        .handler("research.read", move |ctx, payload| read(p2.clone(), ctx, payload))
        .handler("research.write", move |ctx, payload| write(p3.clone(), ctx, payload))
        .handler("http", providers.http_handler())
        .handler("collect", builtin::collect)
        .build()
}

/// The planner: asks for the queries and assigns each a kind (news, academic, web), which
/// picks its search chain. The stand-in model cannot plan, so the queries are the topic with
/// an aspect each; the model's answer travels along as the plan.
async fn plan(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let topic = payload.get("topic").and_then(Value::as_str).unwrap_or("anything");
    let n = payload.get("queries").and_then(Value::as_u64).unwrap_or(2) as usize;
    let answer = providers.chat(&ctx, chat_request(PLANNER, format!("Plan {n} web searches about {topic}."))).await?;
    // Kinds rotate over the runs' queries, so every chain gets its share.
    let offset = payload.get("n").and_then(Value::as_u64).unwrap_or(0) as usize * n;
    let queries: Vec<Value> = (0..n)
        .map(|i| {
            let (kind, _) = CHAINS[(offset + i) % CHAINS.len()];
            json!({ "query": format!("{topic}: {}", ASPECTS[i % ASPECTS.len()]), "kind": kind })
        })
        .collect();
    Ok(json!({ "plan": answer_text(&answer), "queries": queries }))
}

/// Fans out: per query, a search through its kind's chain and a researcher reading it; a
/// `collect` join gathers the researchers' notes.
async fn fanout(ctx: TaskContext, _payload: Value) -> Result<Value, TaskError> {
    let queries = ctx
        .parent_result("plan")
        .and_then(|p| p.get("queries"))
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| TaskError::fatal("the plan has no queries").with_code("invalid_plan"))?;
    let mut children = Vec::new();
    for (i, q) in queries.iter().enumerate() {
        let query = q.get("query").and_then(Value::as_str).unwrap_or_default();
        let chain = q.get("kind").and_then(Value::as_str).unwrap_or("web");
        let mut search = NodeSpec::new(
            format!("search-{i}"),
            "http",
            json!({ "provider": chain, "method": "POST", "path": "/search", "json": { "query": query, "max_results": 3 } }),
        );
        search.max_attempts = 5;
        search.retry = Some(RetryBackoff { base_ms: 200, factor: 2.0, max_ms: 5_000 });
        children.push(search);
        let read = NodeSpec::new(format!("read-{i}"), "research.read", json!({ "query": query, "chain": chain }));
        children.push(read.after(&[&format!("search-{i}")]));
    }
    let join = NodeSpec::new("gather", "collect", json!({}));
    ctx.spawn(Spawn { children, join, on_child_failure: OnFailure::Fail })?;
    Ok(json!({ "queries": queries.len() }))
}

/// A researcher: reads one search's results and writes notes on them.
async fn read(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let query = payload.get("query").and_then(Value::as_str).unwrap_or_default();
    let search = ctx.parents.first().and_then(|p| p.result.clone()).unwrap_or(Value::Null);
    let snippets: Vec<&str> = search
        .pointer("/json/results")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(|x| x.get("snippet").and_then(Value::as_str)).collect())
        .unwrap_or_default();
    let answer = providers
        .chat(&ctx, chat_request(RESEARCHER, format!("Notes on {query} from: {}", snippets.join(" | "))))
        .await?;
    Ok(json!({
        "query": query,
        "chain": payload.get("chain"),
        "search_provider": search.get("provider"),
        "notes": answer_text(&answer),
    }))
}

/// The writer: one section per query from the researchers' notes, and a summary.
async fn write(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let topic = payload.get("topic").and_then(Value::as_str).unwrap_or_default();
    let notes: Vec<Value> = ctx
        .parent_result("research")
        .and_then(|r| r.get("results"))
        .and_then(Value::as_array)
        .map(|rs| rs.iter().filter(|r| r.get("notes").is_some()).cloned().collect())
        .unwrap_or_default();
    let mut sections = Vec::new();
    for n in &notes {
        let heading = n.get("query").and_then(Value::as_str).unwrap_or_default();
        let text = n.get("notes").and_then(Value::as_str).unwrap_or_default();
        sections.push(
            json!({ "heading": heading, "text": text, "chain": n.get("chain"), "source": n.get("search_provider") }),
        );
    }
    let headings: Vec<&str> = sections.iter().filter_map(|s| s.get("heading").and_then(Value::as_str)).collect();
    let summary =
        providers.chat(&ctx, chat_request(PLANNER, format!("Summarise {topic}: {}", headings.join("; ")))).await?;
    Ok(json!({ "topic": topic, "summary": answer_text(&summary), "sections": sections }))
}

/// Sections of a finished run's report, when every one has a heading and text.
fn report_sections(output: Option<&Value>) -> Option<usize> {
    let report = output?.get("write")?;
    let sections = report.get("sections")?.as_array()?;
    let full = |s: &Value| {
        ["heading", "text"].iter().all(|k| s.get(*k).and_then(Value::as_str).is_some_and(|t| !t.trim().is_empty()))
    };
    sections.iter().all(full).then_some(sections.len())
}

/// Searches served by a provider other than their chain's first.
fn overflow_count(finished: &[(taskfleet_proto::RunView, Duration)]) -> usize {
    let sections = finished
        .iter()
        .filter_map(|(v, _)| v.output.as_ref()?.pointer("/write/sections")?.as_array().cloned())
        .flatten();
    sections
        .filter(|s| {
            let chain = s.get("chain").and_then(Value::as_str).unwrap_or_default();
            let primary = CHAINS.iter().find(|(k, _)| *k == chain).and_then(|(_, c)| c.split('>').next());
            // A section without a source is not served by a fallback: it was not served.
            s.get("source").and_then(Value::as_str).is_some_and(|p| Some(p) != primary)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_needs_every_section_filled() {
        let good = json!({"write": {"sections": [{"heading": "a", "text": "x"}, {"heading": "b", "text": "y"}]}});
        assert_eq!(report_sections(Some(&good)), Some(2));
        let empty = json!({"write": {"sections": [{"heading": "a", "text": " "}]}});
        assert_eq!(report_sections(Some(&empty)), None);
        assert_eq!(report_sections(None), None);
    }

    #[test]
    fn the_spec_is_a_valid_run() {
        let s = spec("t", 0, 2);
        taskfleet_proto::plan_nodes(&s.nodes, &s.queue, s.priority, 1 << 20).expect("valid run");
    }

    #[test]
    fn overflow_counts_sections_served_past_their_chains_first() {
        let view = |sections: Value| {
            let mut v: taskfleet_proto::RunView = serde_json::from_value(json!({
                "id": uuid::Uuid::now_v7(), "state": "succeeded", "created_at": 0,
                "totals": {"tasks": 0, "states": {}, "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0,
                           "cost_usd": 0.0, "busy_ms": 0, "saved_usd": 0.0},
                "tasks": []
            }))
            .expect("a view");
            v.output = Some(json!({"write": {"sections": sections}}));
            (v, Duration::ZERO)
        };
        let runs = [view(json!([{"chain": "news", "source": "tavily"}, {"chain": "news", "source": "exa"},
                                {"chain": "web", "source": "exa"}]))];
        assert_eq!(overflow_count(&runs), 1);
    }
}
