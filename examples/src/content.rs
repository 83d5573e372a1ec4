//! Content pipeline with a semantic cache: keyword → semantic cache lookup → on a miss: search
//! → chunk → embed in batches and store → write the article → remember it in the cache.
//!
//! A run per keyword: `lookup` asks the fleet's semantic cache (`policies.semantic_cache`,
//! policy `content.article`: 30 days, a hit at cosine similarity ≥ 0.8 of the keyword's
//! embedding); a hit ends the run at once (early stop) with the stored article as its output,
//! and the cached article's cost is counted as saved. On a miss the run goes on: `search` (an
//! `http` task), `chunk`, `index` (embeds the chunks through `Providers::embed`, whose batch size
//! adapts: 10, +5 after each good batch up to 100, halved on a failure, at least 5, and writes
//! them to the vector store in one batch), `write` (the writer model on the chunks) and
//! `remember` (stores the article under the keyword, with what it cost).
//!
//! Figures: p95 per article < 5 s at the stated latencies; at a ~70% hit rate the cost per
//! request from the fleet's accounting (each run's `totals.cost_usd`) ≤ $0.012 against about
//! $0.04 for the same articles uncached (measured first in the same invocation). The fleet's
//! alerts on hit rate < 50%, p95 > 5 s and error rate > 5% are its default rules; the example
//! prints their state from the aggregator.

use crate::harness::{Figure, Fleet, Mocks, Options, latency, percentile, queue, run_duration, secs};
use serde_json::{Value, json};
use std::time::Duration;
use taskfleet_proto::{AlertState, NodeSpec, RunSpec, RunState, Snapshot};
use taskfleet_worker::providers::Providers;
use taskfleet_worker::{TaskContext, TaskError, Worker};

const NAME: &str = "content";
const POLICY: &str = "content.article";
const WRITER: &str = "gpt-4";
const EMBEDDER: &str = "text-embedding-3-small";
/// The writer's style guide, sent with every article (a realistic share of its prompt).
const STYLE: &str = "You write search-optimised articles: an engaging title, an introduction that states the \
reader's problem, three to five sections with descriptive headings, concrete examples, a short FAQ, and a \
conclusion with a call to action. Cite the sources given. Use plain language, short paragraphs, active voice, \
no filler, no claims the sources do not support. Keep every heading under sixty characters and every paragraph \
under ninety words. Match the keyword's search intent: informational keywords get explanations, commercial \
ones comparisons, transactional ones clear next steps. End with three related keywords for internal links. \
Structure: open with a one-sentence answer to the keyword's question, then expand; every section starts with \
its main point, follows with evidence from the sources, and ends with a practical tip. Prefer numbers, \
measurements and named examples over adjectives. When sources disagree, say so and give both positions with \
their sources. Do not invent statistics, prices, dates or quotes. Write for a reader who skims: bold the key \
phrase of each section once, use bulleted lists for steps and options, and keep lists under seven items. \
The FAQ answers the three questions a reader is most likely to ask next, in two or three sentences each. \
Meta description: at most 155 characters, containing the keyword once, written as a promise to the reader.";

/// Topics of the keywords; each is asked as written and then as paraphrases.
const TOPICS: [&str; 30] = [
    "best running shoes for beginners",
    "how to start a vegetable garden",
    "budget travel tips for europe",
    "home espresso machine buying guide",
    "learn python programming fast",
    "healthy meal prep for the week",
    "how to train a puppy at home",
    "remote work productivity habits",
    "electric car charging at home",
    "beginner yoga poses for flexibility",
    "how to save money on groceries",
    "best hiking trails in colorado",
    "indoor plants that need little light",
    "how to write a cover letter",
    "sourdough bread baking basics",
    "first time home buyer checklist",
    "marathon training plan for beginners",
    "how to reduce stress at work",
    "solar panels for small houses",
    "learning guitar chords quickly",
    "kids birthday party ideas at home",
    "best budget mechanical keyboards",
    "how to improve sleep quality",
    "camping gear list for families",
    "podcast equipment for beginners",
    "how to clean a cast iron pan",
    "winter skin care routine tips",
    "time management for college students",
    "backyard chicken keeping guide",
    "how to negotiate a pay raise",
];

/// Paraphrases of a keyword, as different users type the same need.
fn paraphrases(topic: &str) -> [String; 3] {
    [format!("{topic} guide"), format!("guide: {topic}"), format!("{topic} in 2026")]
}

/// Runs the example and returns its figures.
pub async fn run(fleet: &Fleet, opts: Options) -> anyhow::Result<Vec<Figure>> {
    let mut mocks = Mocks::default();
    let urls = [
        format!("search={}", mocks.start("search", latency(opts.latency_ms(300))).await?),
        format!("openai={}", mocks.start("openai", latency(opts.latency_ms(1500))).await?),
        format!("openai-emb={}", mocks.start("openai-emb", latency(opts.latency_ms(60))).await?),
        format!("vectors={}", mocks.start("vectors", latency(opts.latency_ms(20))).await?),
    ];
    let config = fleet.worker_config(
        NAME,
        &[
            ("TASKFLEET_PROVIDERS_URLS", urls.join(",")),
            ("TASKFLEET_PROVIDERS_MODELS", format!("{WRITER}=openai,{EMBEDDER}=openai-emb")),
            ("TASKFLEET_PROVIDERS_PRICES", format!("{WRITER}=30/60,{EMBEDDER}=0.02/0.02")),
            ("TASKFLEET_POLICIES_SEMANTIC_CACHE", format!("{POLICY}=30days by keyword threshold 0.8 model {EMBEDDER}")),
            ("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "32".into()),
        ],
    )?;
    let providers = Providers::new(&config.providers)?;
    let worker = fleet.spawn_worker(worker(config, &providers));
    let topics = &TOPICS[..opts.pick(30, 10)];
    let hits_before = snapshot().await.as_ref().map_or(0, lookup_hits);

    // 1. Uncached: the same pipeline without the cache, for a sample of the topics.
    let uncached: Vec<RunSpec> = topics.iter().take(opts.pick(10, 4)).map(|t| spec(t, false)).collect();
    let baseline = fleet.run_all(&uncached, Duration::from_secs(300)).await?;
    let uncached_cost = mean(baseline.iter().map(|(v, _)| v.totals.cost_usd));

    // 2. Cached: each topic once, then 7 paraphrases in 3 rounds for every 3 topics (~70% hits).
    let mut rounds: Vec<Vec<RunSpec>> = vec![topics.iter().map(|t| spec(t, true)).collect()];
    for p in 0..3 {
        let take = if p == 2 { topics.len() / 3 } else { topics.len() };
        rounds.push(topics.iter().take(take).map(|t| spec(&paraphrases(t)[p], true)).collect());
    }
    let mut views = Vec::new();
    for round in &rounds {
        views.extend(fleet.run_all(round, Duration::from_secs(300)).await?);
    }
    worker.stop().await?;
    let requests = views.len();
    let failed = views.iter().filter(|(v, _)| v.state != RunState::Succeeded).count();
    let hits = views.iter().filter(|(v, _)| v.output.as_ref().is_some_and(is_hit)).count();
    let hit_rate = hits as f64 / requests as f64;
    let cached_cost = mean(views.iter().map(|(v, _)| v.totals.cost_usd));
    let saved: f64 = views.iter().map(|(v, _)| v.totals.saved_usd).sum();
    let durations: Vec<f64> = views.iter().map(|(v, _)| run_duration(v).as_secs_f64()).collect();
    let p95 = percentile(&durations, 95.0);
    let embeds = mocks.stats("openai-emb").by_endpoint.get(taskfleet_mock_api::EMBEDDINGS_ENDPOINT).copied();
    let batch_sizes: Vec<u64> = baseline
        .iter()
        .chain(&views)
        .filter_map(|(v, _)| v.output.as_ref()?.pointer("/remember/embed_batch_size")?.as_u64())
        .collect();
    let largest_batch = batch_sizes.iter().max().copied().unwrap_or(0);
    mocks.shutdown().await;

    let mut rows = vec![
        Figure::new(
            NAME,
            format!(
                "{requests} article requests: p95 per article (search 300 ms, writer 1.5 s, embeddings 60 ms{})",
                if opts.quick { ", quick: / 10" } else { "" }
            ),
            "< 5 s",
            format!(
                "{} (p50 {}), {failed} failed",
                secs(Duration::from_secs_f64(p95)),
                secs(Duration::from_secs_f64(percentile(&durations, 50.0)))
            ),
            p95 < 5.0 && failed == 0,
        ),
        Figure::new(
            NAME,
            format!(
                "cost per request at a {:.0}% semantic hit rate ({hits} of {requests}), fleet accounting",
                hit_rate * 100.0
            ),
            "≤ $0.012 and ≤ (1 − hit rate) × uncached + 5%, hit rate ~70%",
            format!("${cached_cost:.4} against ${uncached_cost:.4} uncached; ${saved:.3} saved"),
            // The guide's economics: a request costs (1 − hit rate) × the uncached cost, plus
            // its lookup (allowed 5% here).
            cached_cost <= 0.012
                && cached_cost <= (1.0 - hit_rate) * uncached_cost * 1.05
                && (0.6..=0.8).contains(&hit_rate),
        ),
        Figure::new(
            NAME,
            "embedding batch size after the articles written (adaptive: 10, +5 a good batch, up to 100)",
            "grows past 10",
            format!("{largest_batch} ({} embedding calls in all, lookups included)", embeds.unwrap_or(0)),
            largest_batch > 10,
        ),
    ];
    if let Some((measured, pass)) = alert_figures(hits_before, hits, p95).await {
        let figure = "the fleet's alert rules on this workload's figures (aggregator window)";
        rows.push(Figure::new(NAME, figure, "hit rate ≥ 50%, error rate ≤ 5%, p95 ≤ 5 s", measured, pass));
    }
    Ok(rows)
}

/// The aggregator's snapshot (`TASKFLEET_AGGREGATOR_URL`), if one answers.
async fn snapshot() -> Option<Snapshot> {
    let base = std::env::var("TASKFLEET_AGGREGATOR_URL").unwrap_or_else(|_| "http://127.0.0.1:9090".into());
    reqwest::get(format!("{base}/v1/stats")).await.ok()?.json().await.ok()
}

/// Cache hits of this workload's lookup step the aggregator has counted, all time.
fn lookup_hits(stats: &Snapshot) -> u64 {
    stats
        .series
        .iter()
        .filter(|s| s.queue == queue(NAME) && s.kind == "content.lookup")
        .map(|s| s.figures.cache_hits_total)
        .sum()
}

/// The fleet's default alert rules (hit rate < 50%, p95 > 5 s, error rate > 5%) applied to this
/// workload's own figures at the aggregator, once it has counted the `hits` cache hits of the
/// lookup step this invocation made (`hits_before` were counted before it); with the alerts
/// firing fleet-wide (other workloads' included). `None` when no aggregator answers.
async fn alert_figures(hits_before: u64, hits: usize, p95_s: f64) -> Option<(String, bool)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = snapshot().await?;
        let ours: Vec<_> = stats.series.iter().filter(|s| s.queue == queue(NAME)).collect();
        let lookup = ours.iter().find(|s| s.kind == "content.lookup");
        if lookup_hits(&stats) < hits_before + hits as u64 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let hit_rate = lookup.and_then(|l| l.figures.cache_hit_rate).unwrap_or(0.0);
        let error_rate = ours.iter().filter_map(|s| s.figures.error_rate).fold(0.0, f64::max);
        let firing: Vec<String> =
            stats.alerts.into_iter().filter(|a| a.state == AlertState::Firing).map(|a| a.rule).collect();
        let firing = if firing.is_empty() { "none".to_string() } else { firing.join(", ") };
        let measured = format!(
            "lookup hit rate {:.0}%, worst step error rate {:.1}%, p95 {p95_s:.2} s; firing fleet-wide: {firing}",
            hit_rate * 100.0,
            error_rate * 100.0
        );
        return Some((measured, hit_rate >= 0.5 && error_rate <= 0.05 && p95_s <= 5.0));
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// A run writing an article for `keyword`, through the semantic cache or without it.
fn spec(keyword: &str, cached: bool) -> RunSpec {
    let search = json!({ "provider": "search", "method": "POST", "path": "/search",
                         "json": { "query": keyword, "max_results": 20 } });
    let mut nodes = vec![
        NodeSpec::new("lookup", "content.lookup", json!({ "keyword": keyword, "cached": cached })),
        NodeSpec::new("search", "http", search).after(&["lookup"]),
        NodeSpec::new("chunk", "content.chunk", json!({ "max_chars": 1000 })).after(&["search"]),
        NodeSpec::new("index", "content.index", json!({})).after(&["chunk"]),
        NodeSpec::new("write", "content.write", json!({ "keyword": keyword })).after(&["chunk", "index"]),
        NodeSpec::new("remember", "content.remember", json!({ "keyword": keyword, "cached": cached }))
            .after(&["lookup", "index", "write"]),
    ];
    for n in &mut nodes {
        n.max_attempts = 3;
    }
    let mut spec = RunSpec::new(nodes);
    spec.name = Some(NAME.into());
    spec.queue = queue(NAME);
    spec.timeout_ms = Some(120_000);
    spec
}

/// The example's worker: its steps plus the built-in `http`.
fn worker(config: taskfleet_config::Config, providers: &Providers) -> Worker {
    let (p1, p2) = (providers.clone(), providers.clone());
    Worker::builder(config)
        .handler("content.lookup", lookup)
        .handler("content.chunk", chunk)
        .handler("content.index", move |ctx, payload| index(p1.clone(), ctx, payload))
        .handler("content.write", move |ctx, payload| write(p2.clone(), ctx, payload))
        .handler("content.remember", remember)
        .handler("http", providers.http_handler())
        .build()
}

/// What this attempt has spent, for the steps downstream that sum a run's cost.
fn spent(ctx: &TaskContext) -> f64 {
    ctx.usage().cost_usd.unwrap_or(0.0)
}

/// The semantic cache lookup: a hit ends the run with the stored article.
async fn lookup(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    if !payload.get("cached").and_then(Value::as_bool).unwrap_or(true) {
        return Ok(json!({ "hit": false, "cost_usd": 0.0 }));
    }
    let keyword = payload.get("keyword").and_then(Value::as_str).unwrap_or_default();
    match ctx.semantic_lookup(POLICY, keyword).await {
        // A hit counts as the step's cache hit and saves the article's cost.
        Ok(Some(hit)) => {
            ctx.stop_run();
            Ok(json!({ "hit": true, "similarity": hit.similarity, "article": hit.result, "cost_usd": spent(&ctx) }))
        }
        Ok(None) => Ok(json!({ "hit": false, "cost_usd": spent(&ctx) })),
        // The cache is an accelerator: without it the article is written anyway.
        Err(e) => {
            tracing::warn!(error = %e, "semantic cache unavailable; writing the article");
            Ok(json!({ "hit": false, "cost_usd": spent(&ctx), "bypass": e.to_string() }))
        }
    }
}

/// Splits the search results into chunks of at most `max_chars`.
async fn chunk(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let max = payload.get("max_chars").and_then(Value::as_u64).unwrap_or(1000) as usize;
    let results = ctx.parent_result("search").and_then(|s| s.pointer("/json/results")).and_then(Value::as_array);
    let mut chunks: Vec<String> = Vec::new();
    for r in results.into_iter().flatten() {
        let text = format!(
            "{}. {} ({})",
            r.get("title").and_then(Value::as_str).unwrap_or_default(),
            r.get("snippet").and_then(Value::as_str).unwrap_or_default(),
            r.get("url").and_then(Value::as_str).unwrap_or_default()
        );
        match chunks.last_mut() {
            Some(last) if last.len() + text.len() < max / 4 => {
                last.push(' ');
                last.push_str(&text);
            }
            _ => chunks.push(text.chars().take(max).collect()),
        }
    }
    Ok(json!({ "chunks": chunks }))
}

fn chunks_of(ctx: &TaskContext) -> Vec<String> {
    ctx.parent_result("chunk")
        .and_then(|c| c.get("chunks"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Embeds the chunks (adaptive batches) and writes them with their vectors to the vector store
/// in one batch.
async fn index(providers: Providers, ctx: TaskContext, _payload: Value) -> Result<Value, TaskError> {
    let chunks = chunks_of(&ctx);
    let vectors = providers.embed(&ctx, EMBEDDER, &chunks).await?;
    let records: Vec<Value> =
        chunks.iter().zip(&vectors).map(|(text, v)| json!({ "run": ctx.run_id, "text": text, "vector": v })).collect();
    let store = json!({ "provider": "vectors", "method": "POST", "path": "/records", "json": { "records": records } });
    providers.http(&ctx, store).await?;
    Ok(json!({ "stored": records.len(), "batch_size": providers.embed_batch_size(EMBEDDER), "cost_usd": spent(&ctx) }))
}

/// Writes the article from the chunks.
async fn write(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let keyword = payload.get("keyword").and_then(Value::as_str).unwrap_or_default();
    let request = json!({ "model": WRITER, "messages": [
        { "role": "system", "content": STYLE },
        { "role": "system", "content": chunks_of(&ctx).join("\n") },
        { "role": "user", "content": format!("Write the article for the keyword {keyword:?}.") } ] });
    let answer = providers.chat(&ctx, request).await?;
    Ok(json!({ "keyword": keyword, "article": answer.get("content"), "cost_usd": spent(&ctx) }))
}

/// Stores the article in the semantic cache with what the run spent on it.
async fn remember(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let keyword = payload.get("keyword").and_then(Value::as_str).unwrap_or_default();
    let article = ctx.parent_result("write").and_then(|w| w.get("article")).cloned().unwrap_or(Value::Null);
    let cost: f64 = ctx.parents.iter().filter_map(|p| p.result.as_ref()?.get("cost_usd")?.as_f64()).sum();
    if payload.get("cached").and_then(Value::as_bool).unwrap_or(true)
        && let Err(e) = ctx.semantic_store(POLICY, keyword, &article, Some(cost)).await
    {
        tracing::warn!(error = %e, "article not cached");
    }
    let batch_size = ctx.parent_result("index").and_then(|i| i.get("batch_size")).cloned();
    Ok(json!({ "keyword": keyword, "article": article, "cost_usd": cost, "embed_batch_size": batch_size }))
}

/// Whether a run's output came from the cache (the lookup stopped the run).
fn is_hit(output: &Value) -> bool {
    output.get("hit").and_then(Value::as_bool).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_mock_api::embed;

    fn cosine(a: &str, b: &str) -> f32 {
        let (x, y) = (embed(a, 256), embed(b, 256));
        x.iter().zip(&y).map(|(p, q)| p * q).sum()
    }

    #[test]
    fn paraphrases_are_close_and_topics_apart_under_the_mock_embedding() {
        for t in TOPICS {
            for p in paraphrases(t) {
                assert!(cosine(t, &p) >= 0.8, "{t:?} ~ {p:?}: {}", cosine(t, &p));
            }
        }
        for (i, a) in TOPICS.iter().enumerate() {
            for b in &TOPICS[i + 1..] {
                for p in paraphrases(b) {
                    assert!(cosine(a, &p) < 0.8, "{a:?} vs {p:?}: {}", cosine(a, &p));
                }
            }
        }
    }

    #[test]
    fn the_spec_is_a_valid_run() {
        let s = spec("k", true);
        taskfleet_proto::plan_nodes(&s.nodes, &s.queue, s.priority, 1 << 20).expect("valid run");
    }
}
