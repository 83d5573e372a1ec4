//! Document pipeline: research → write → edit → verify, with a quality gate that re-runs
//! write → edit → verify, with the verifier's feedback, until the score is at least 0.80 (at
//! most 2 re-runs).
//!
//! A run per document: `research` (the large model; returns notes and the document's five
//! required section terms, chosen from the topic, of which the research finds only some) →
//! `draft`, a loop node (`score >= 0.8`, at most 3 iterations) whose every iteration spawns
//! `write` (large) → `edit` (small), joined by `verify` (large, the stand-in judge scoring the
//! edited draft against the required terms); the loop reads the join's `score`. An iteration
//! after the first reads `ctx.previous` (the verifier's `missing` terms) and has the writer add
//! up to [`REVISION_MAX`] of them. Models by role: `large` (provider `large-llm`, $0.03 / $0.06
//! per 1,000 prompt / completion tokens) and `small` (`small-llm`, $0.0015 / $0.002); stated
//! latencies 800 ms and 200 ms. 120 s per step, 300 s per document.
//!
//! Figures: 10 concurrent documents all end with a score ≥ 0.80 within 300 s each; the cost per
//! document from the fleet's own accounting (`RunView.totals`) matches its tasks' tokens ×
//! the price table.

use crate::harness::{Figure, Fleet, Mocks, Options, answer_text, chat_request, latency, queue, secs, strings};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use taskfleet_proto::{NodeSpec, RunSpec, RunView, TaskState};
use taskfleet_worker::providers::Providers;
use taskfleet_worker::{OnFailure, Spawn, TaskContext, TaskError, Worker};

const NAME: &str = "document";
const LARGE: &str = "large";
const SMALL: &str = "small";
/// USD per 1,000 prompt / completion tokens, by model (the fleet's table is per million).
const PRICES: [(&str, f64, f64); 2] = [(LARGE, 0.03, 0.06), (SMALL, 0.0015, 0.002)];
/// Stated mock latencies, milliseconds.
const LATENCY_MS: [(&str, u64); 2] = [("large-llm", 800), ("small-llm", 200)];
/// The quality gate and the re-runs it may ask for.
const QUALITY: f64 = 0.80;
const MAX_RERUNS: u32 = 2;
/// Missing terms a revision adds at most (the stand-in writer's answer is short).
pub const REVISION_MAX: usize = 2;
/// Required section terms per document.
const TERMS: usize = 5;
const STEP_TIMEOUT_MS: u64 = 120_000;
const DOC_TIMEOUT_MS: u64 = 300_000;
/// Section terms a document may require (none is a substring of a topic or a prompt word).
const SECTIONS: [&str; 10] = [
    "background",
    "methods",
    "evidence",
    "risks",
    "costs",
    "timeline",
    "stakeholders",
    "metrics",
    "glossary",
    "outlook",
];
const TOPICS: [&str; 10] = [
    "tidal power",
    "coral reefs",
    "vertical farming",
    "lithium recycling",
    "heat pumps",
    "river deltas",
    "urban trees",
    "battery swaps",
    "ocean acidity",
    "wind farms",
];

/// Runs the example and returns its figures.
pub async fn run(fleet: &Fleet, opts: Options) -> anyhow::Result<Vec<Figure>> {
    let docs = TOPICS.len();
    let mut mocks = Mocks::default();
    let mut urls = Vec::new();
    for (provider, ms) in LATENCY_MS {
        urls.push(format!("{provider}={}", mocks.start(provider, latency(opts.latency_ms(ms))).await?));
    }
    let prices: Vec<String> = PRICES.iter().map(|(m, p, c)| format!("{m}={}/{}", p * 1000.0, c * 1000.0)).collect();
    let config = fleet.worker_config(
        NAME,
        &[
            ("TASKFLEET_PROVIDERS_URLS", urls.join(",")),
            ("TASKFLEET_PROVIDERS_MODELS", format!("{LARGE}=large-llm,{SMALL}=small-llm")),
            ("TASKFLEET_PROVIDERS_PRICES", prices.join(",")),
            ("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "16".into()),
        ],
    )?;
    let providers = Providers::new(&config.providers)?;
    let worker = fleet.spawn_worker(worker(config, &providers));

    let started = Instant::now();
    let specs: Vec<RunSpec> = TOPICS.iter().map(|t| spec(t)).collect();
    let finished = fleet.run_all(&specs, Duration::from_millis(DOC_TIMEOUT_MS + 60_000)).await?;
    let wall = started.elapsed();
    worker.stop().await?;
    // The providers' invoices: what each stand-in billed, priced by the table.
    let invoiced: f64 = LATENCY_MS
        .iter()
        .flat_map(|(provider, _)| mocks.stats(provider).tokens)
        .map(|(model, billed)| {
            let (_, p, c) = PRICES.iter().find(|(m, _, _)| *m == model).copied().unwrap_or((LARGE, f64::NAN, f64::NAN));
            (billed.prompt as f64 * p + billed.completion as f64 * c) / 1000.0
        })
        .sum();
    mocks.shutdown().await;

    let docs_f = docs as f64;
    let mut scores = Vec::new();
    let mut reruns = [0usize; 3];
    let mut longest = Duration::ZERO;
    let mut good = 0;
    for (view, took) in &finished {
        let score = view.output.as_ref().and_then(|o| o.pointer("/draft/score")).and_then(Value::as_f64);
        let iterations = view.tasks.iter().filter(|t| t.node.as_deref() == Some("draft")).map(|t| t.iteration).max();
        if let Some(i) = iterations.filter(|i| (1..=MAX_RERUNS + 1).contains(i)) {
            reruns[(i - 1) as usize] += 1;
        }
        longest = longest.max(*took);
        if let Some(s) = score {
            scores.push(s);
        }
        let ok = view.state == taskfleet_proto::RunState::Succeeded
            && score.is_some_and(|s| s >= QUALITY)
            && took.as_millis() as u64 <= DOC_TIMEOUT_MS;
        good += usize::from(ok);
    }
    let (min, max) = scores.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
    let mut first =
        format!("{docs} concurrent documents: score ≥ {QUALITY:.2}, each within 300 s, ≤ {MAX_RERUNS} re-runs");
    if opts.quick {
        first.push_str(" (quick: latencies / 10)");
    }
    let mut rows = vec![Figure::new(
        NAME,
        first,
        format!("{docs} of {docs}"),
        format!(
            "{good} of {docs} in {}; score min {min:.2} max {max:.2}; longest {}; re-runs 0/1/2: {}/{}/{}",
            secs(wall),
            secs(longest),
            reruns[0],
            reruns[1],
            reruns[2]
        ),
        good == docs,
    )];

    let views: Vec<&RunView> = finished.iter().map(|(v, _)| v).collect();
    let (cost, prompt, completion) = views.iter().fold((0.0, 0u64, 0u64), |(c, p, q), v| {
        (c + v.totals.cost_usd, p + v.totals.prompt_tokens, q + v.totals.completion_tokens)
    });
    let worst = views.iter().try_fold(0.0f64, |acc, v| Some(acc.max(recompute_gap(v)?)));
    let invoice_gap = (cost - invoiced).abs() / cost.abs().max(invoiced.abs()).max(f64::MIN_POSITIVE);
    let matched = worst.is_some_and(|g| g <= 1e-9) && invoice_gap <= 1e-9 && cost > 0.0;
    rows.push(Figure::new(
        NAME,
        "cost per document from the fleet's token accounting (RunView.totals), against the price table \
         per step and against the providers' invoices (tokens the mocks billed × prices)",
        "reported; equal within 1e-9 relative",
        format!(
            "mean ${:.5} ({:.0} prompt + {:.0} completion tokens); invoiced ${:.5} a document; largest gap {}",
            cost / docs_f,
            prompt as f64 / docs_f,
            completion as f64 / docs_f,
            invoiced / docs_f,
            worst
                .map_or("— (a step with tokens but no model)".to_string(), |g| format!("{:.1e}", g.max(invoice_gap))),
        ),
        matched,
    ));
    Ok(rows)
}

/// The relative gap between a run's recorded cost and its tasks' tokens × the price table, or
/// `None` when a task has tokens but no known model.
fn recompute_gap(view: &RunView) -> Option<f64> {
    let mut cost = 0.0;
    for t in &view.tasks {
        if t.prompt_tokens + t.completion_tokens == 0 {
            continue;
        }
        let (_, p, c) = PRICES.iter().find(|(m, _, _)| Some(*m) == model_of(&t.kind))?;
        cost += (t.prompt_tokens as f64 * p + t.completion_tokens as f64 * c) / 1000.0;
    }
    let recorded = view.totals.cost_usd;
    Some(if recorded == 0.0 && cost == 0.0 { 0.0 } else { (recorded - cost).abs() / recorded.abs().max(cost.abs()) })
}

/// The model a step kind uses.
fn model_of(kind: &str) -> Option<&'static str> {
    match kind {
        "doc.research" | "doc.write" | "doc.verify" => Some(LARGE),
        "doc.edit" => Some(SMALL),
        _ => None,
    }
}

/// The run of one document about `topic`.
fn spec(topic: &str) -> RunSpec {
    let mut research = NodeSpec::new("research", "doc.research", json!({ "topic": topic }));
    research.timeout_ms = Some(STEP_TIMEOUT_MS);
    let mut draft = NodeSpec::new("draft", "doc.revise", json!({ "topic": topic }))
        .after(&["research"])
        .repeat_until(format!("score >= {QUALITY}"), MAX_RERUNS + 1);
    draft.timeout_ms = Some(STEP_TIMEOUT_MS);
    let mut spec = RunSpec::new(vec![research, draft]);
    spec.name = Some(NAME.into());
    spec.queue = queue(NAME);
    spec.timeout_ms = Some(DOC_TIMEOUT_MS);
    spec
}

/// The example's worker: its five steps.
fn worker(config: taskfleet_config::Config, providers: &Providers) -> Worker {
    let (p1, p2, p3, p4) = (providers.clone(), providers.clone(), providers.clone(), providers.clone());
    Worker::builder(config)
        .handler("doc.research", move |ctx, payload| research(p1.clone(), ctx, payload))
        .handler("doc.revise", revise)
        .handler("doc.write", move |ctx, payload| write(p2.clone(), ctx, payload))
        .handler("doc.edit", move |ctx, payload| edit(p3.clone(), ctx, payload))
        .handler("doc.verify", move |ctx, payload| verify(p4.clone(), ctx, payload))
        .build()
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The document's required section terms: [`TERMS`] of [`SECTIONS`], ordered by a hash of the
/// topic and the term.
pub fn required_terms(topic: &str) -> Vec<String> {
    let mut all: Vec<&str> = SECTIONS.to_vec();
    all.sort_by_key(|t| taskfleet_mock_api::fnv1a(format!("{topic}/{t}").as_bytes()));
    all.into_iter().take(TERMS).map(str::to_string).collect()
}

/// Research (large model): notes on the topic and the required terms, of which it finds 1 to 4
/// (how many follows from the model's answer), so a first draft can miss some.
async fn research(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let topic = text(&payload, "topic");
    if topic.is_empty() {
        return Err(TaskError::fatal("a document needs a topic").with_code("invalid_payload"));
    }
    let required = required_terms(topic);
    let answer =
        providers.chat(&ctx, chat_request(LARGE, format!("Research {topic}: {}.", required.join(", ")))).await?;
    let notes = answer_text(&answer);
    let found = 1 + taskfleet_mock_api::fnv1a(notes.as_bytes()) as usize % (TERMS - 1);
    Ok(json!({ "topic": topic, "required": required, "found": required[..found], "notes": notes }))
}

/// One iteration of the quality gate: the terms this draft covers (what research found, or
/// what the previous draft covered plus up to [`REVISION_MAX`] of the terms the verifier found
/// missing), then write → edit, joined by verify.
async fn revise(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let topic = text(&payload, "topic");
    let research = ctx
        .parent_result("research")
        .ok_or_else(|| TaskError::fatal("no research to write from").with_code("missing_parent"))?;
    let required = strings(research.get("required"));
    let terms: Vec<String> = match ctx.previous.as_ref().and_then(|p| p.result.as_ref()) {
        Some(last) => {
            let missing = strings(last.get("missing"));
            let mut terms: Vec<String> = required.iter().filter(|t| !missing.contains(t)).cloned().collect();
            terms.extend(missing.into_iter().take(REVISION_MAX));
            terms
        }
        None => strings(research.get("found")),
    };
    let mut write = NodeSpec::new("write", "doc.write", json!({ "topic": topic, "terms": terms }));
    write.timeout_ms = Some(STEP_TIMEOUT_MS);
    let mut edit = NodeSpec::new("edit", "doc.edit", json!({})).after(&["write"]);
    edit.timeout_ms = Some(STEP_TIMEOUT_MS);
    let mut join = NodeSpec::new("verify", "doc.verify", json!({ "required": required }));
    join.timeout_ms = Some(STEP_TIMEOUT_MS);
    ctx.spawn(Spawn { children: vec![write, edit], join, on_child_failure: OnFailure::Fail })?;
    Ok(json!({ "iteration": ctx.iteration, "terms": terms }))
}

/// The writer (large model): a draft covering the given terms (put first: the stand-in model
/// keeps only the start of a prompt).
async fn write(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let topic = text(&payload, "topic");
    let terms = strings(payload.get("terms"));
    let answer = providers.chat(&ctx, chat_request(LARGE, format!("Draft {topic}: {}.", terms.join(", ")))).await?;
    Ok(json!({ "draft": answer_text(&answer) }))
}

/// The editor (small model): an edited draft.
async fn edit(providers: Providers, ctx: TaskContext, _payload: Value) -> Result<Value, TaskError> {
    let draft = ctx
        .parent_result("write")
        .and_then(|w| w.get("draft"))
        .and_then(Value::as_str)
        .ok_or_else(|| TaskError::fatal("no draft to edit").with_code("missing_parent"))?;
    let answer = providers.chat(&ctx, chat_request(SMALL, format!("Edit: {draft}"))).await?;
    Ok(json!({ "edited": answer_text(&answer) }))
}

/// The verifier (large model, the stand-in judge): scores the edited draft against the
/// required terms; its `score` decides the loop, its `missing` feeds the next writer.
async fn verify(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let edited = ctx
        .parent("edit")
        .filter(|p| p.state == TaskState::Succeeded)
        .and_then(|p| p.result.as_ref())
        .map(|r| text(r, "edited").to_string())
        .ok_or_else(|| TaskError::fatal("no edited draft to verify").with_code("missing_parent"))?;
    let required = strings(payload.get("required"));
    let prompt = format!("SCORE\nrequired: {}\n---\n{edited}", required.join(", "));
    let answer = providers.chat(&ctx, chat_request(LARGE, prompt)).await?;
    let verdict: Value = serde_json::from_str(&answer_text(&answer)).map_err(|e| {
        TaskError::retryable(format!("the verifier's answer is not JSON: {e}")).with_code("bad_verdict")
    })?;
    let score = verdict
        .get("score")
        .and_then(Value::as_f64)
        .ok_or_else(|| TaskError::retryable("the verifier gave no score").with_code("bad_verdict"))?;
    Ok(json!({ "score": score, "missing": verdict.get("missing").cloned().unwrap_or(json!([])), "document": edited }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_deterministic_and_not_in_any_topic_or_prompt() {
        assert_eq!(required_terms("tidal power"), required_terms("tidal power"));
        assert_eq!(required_terms("tidal power").len(), TERMS);
        for topic in TOPICS {
            for t in SECTIONS {
                let words = format!("{topic} draft edit research echo [large-llm] [small-llm]");
                assert!(!words.contains(t), "{t} in {words}");
            }
        }
    }

    #[test]
    fn the_edited_draft_keeps_every_term_within_the_echo() {
        // The longest topic with all five terms, through writer and editor.
        let topic = "lithium recycling";
        let terms = required_terms(topic);
        let draft = taskfleet_mock_api::echo_content("large-llm", &format!("Draft {topic}: {}.", terms.join(", ")));
        let edited = taskfleet_mock_api::echo_content("small-llm", &format!("Edit: {draft}"));
        let verdict =
            taskfleet_mock_api::judge_content(&format!("SCORE\nrequired: {}\n---\n{edited}", terms.join(", ")));
        let v: Value = serde_json::from_str(&verdict.expect("a verdict")).expect("JSON");
        assert_eq!(v["score"], 1.0, "{edited}");
    }

    #[test]
    fn the_spec_is_a_valid_run() {
        let s = spec("t");
        taskfleet_proto::plan_nodes(&s.nodes, &s.queue, s.priority, 1 << 20).expect("valid run");
    }

    #[test]
    fn prices_are_stated_per_thousand_and_given_per_million() {
        let table: Vec<String> = PRICES.iter().map(|(m, p, c)| format!("{m}={}/{}", p * 1000.0, c * 1000.0)).collect();
        assert_eq!(table.join(","), "large=30/60,small=1.5/2");
    }
}
