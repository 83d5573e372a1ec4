//! Beam search planner: agents propose first plan steps in parallel, then a beam search
//! (k = 3, at most 15 rounds) extends the plans, scores them and keeps the best.
//!
//! A run per goal: `agents` (the built-in `spawn`: 3 `beam.agent` tasks, each asking the model
//! for a first step, joined by `collect`) → `search` (`beam.search`, one long step). Each round
//! asks the model for 3 candidate next steps per beam, the calls made concurrently in the step;
//! the stand-in model cannot plan, so a candidate's step is picked from the goal's terms plus as
//! many distractors by a hash of the model's answer. Candidates are scored by the stand-in judge
//! with the goal's terms as `required` (a plan covering more of the goal scores higher); scores
//! are memoized in the step (the memo travels in the checkpoint) and LLM answers are cached
//! 30 min fleet-wide (`llm.chat` by model+messages). The best 3 distinct plans of beams and
//! candidates are kept.
//!
//! Early stop (unless the payload says `"early_stop": false`): after a round whose best score is
//! ≥ 0.9, or after the 2nd round in a row whose best improved by less than 0.05 over the round
//! before. A checkpoint (round, beams, best, stall count, memo) every 3 rounds; progress
//! `{"round", "best"}` after every round. 180 s per LLM call; a cached call's twin waits for
//! it (single-flight; the leases of a killed worker's calls lapse within 3 s); stated mock
//! latency 300 ms a call.
//!
//! Figures: a search completes in < 2 min; early stop is ≥ 20% faster than a full 15-round
//! search (other goal and seed, same invocation); a worker process SIGKILLed mid-search
//! resumes from its last checkpoint, not from round 1.

use crate::harness::{Figure, Fleet, Mocks, Options, chat_request, latency, queue, secs, strings};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};
use taskfleet_proto::{EventBatch, EventKind, NodeSpec, RunSpec, RunState};
use taskfleet_worker::providers::Providers;
use taskfleet_worker::{TaskContext, TaskError, Worker, builtin};
use uuid::Uuid;

const NAME: &str = "beam";
const MODEL: &str = "planner";
const PROVIDER: &str = "planner-llm";
/// Stated latency of a model call, milliseconds.
const LATENCY_MS: u64 = 300;
/// Beam width, candidates per beam and round, rounds at most.
pub const K: usize = 3;
pub const FANOUT: usize = 3;
pub const MAX_ROUNDS: u32 = 15;
/// Early stop: a best score this high, or this many rounds in a row improving less than
/// [`MIN_GAIN`].
pub const STOP_SCORE: f64 = 0.9;
pub const MIN_GAIN: f64 = 0.05;
pub const PATIENCE: u32 = 2;
/// A checkpoint every this many rounds.
pub const CHECKPOINT_EVERY: u32 = 3;
const AGENTS: u64 = 3;
/// Goal terms and distractors per goal.
const GOAL_TERMS: usize = 6;
const DISTRACTORS: usize = 6;
/// What plans are made of (no term is a substring of another).
const VOCAB: [&str; 16] = [
    "venue",
    "catering",
    "budget",
    "invitations",
    "transport",
    "lodging",
    "schedule",
    "speakers",
    "permits",
    "insurance",
    "signage",
    "audio",
    "security",
    "volunteers",
    "photography",
    "parking",
];
/// The round after which the kill figure SIGKILLs the worker process.
const KILL_AFTER_ROUND: u32 = 4;
/// The worker process's `ack_wait`: how soon JetStream redelivers what a dead worker held.
const KILL_ACK_WAIT: &str = "3s";

/// Runs the example and returns its figures.
pub async fn run(fleet: &Fleet, opts: Options) -> anyhow::Result<Vec<Figure>> {
    let mut mocks = Mocks::default();
    let url = mocks.start(PROVIDER, latency(opts.latency_ms(LATENCY_MS))).await?;
    let config = fleet.worker_config(NAME, &settings(&url))?;
    let providers = Providers::new(&config.providers)?;
    let worker = fleet.spawn_worker(worker(config, &providers));

    // One after the other, so neither slows the other; other goals, so the cache favours none.
    let early = fleet.run_all(&[spec(1, true, &queue(NAME))], Duration::from_secs(600)).await?;
    let full = fleet.run_all(&[spec(2, false, &queue(NAME))], Duration::from_secs(600)).await?;
    worker.stop().await?;
    mocks.shutdown().await;

    let summary = |v: &taskfleet_proto::RunView| -> (bool, u32, f64, String) {
        let s = v.output.as_ref().and_then(|o| o.get("search"));
        let rounds = s.and_then(|s| s.get("rounds")).and_then(Value::as_u64).unwrap_or(0) as u32;
        let best = s.and_then(|s| s.get("best")).and_then(Value::as_f64).unwrap_or(0.0);
        let why = s.and_then(|s| s.get("stopped")).and_then(Value::as_str).unwrap_or("?").to_string();
        (v.state == RunState::Succeeded && rounds > 0, rounds, best, why)
    };
    let (early_view, early_took) = &early[0];
    let (full_view, full_took) = &full[0];
    let (e_ok, e_rounds, e_best, e_why) = summary(early_view);
    let (f_ok, f_rounds, f_best, _) = summary(full_view);
    let limit = Duration::from_secs(120);
    let mut first = "a search (3 agents, then k = 3 beam search with early stop) completes".to_string();
    if opts.quick {
        first.push_str(" (quick: latencies / 10)");
    }
    let mut rows = vec![Figure::new(
        NAME,
        first,
        "< 120 s",
        format!(
            "{} ({e_rounds} rounds, stopped on {e_why}, best {e_best:.3}); full 15 rounds {}",
            secs(*early_took),
            secs(*full_took)
        ),
        e_ok && f_ok && *early_took < limit && *full_took < limit,
    )];
    let faster = 1.0 - early_took.as_secs_f64() / full_took.as_secs_f64().max(1e-9);
    rows.push(Figure::new(
        NAME,
        "early stop vs a full 15-round search (early stop off; other goal and seed)",
        "≥ 20% faster",
        format!(
            "{:.0}% faster: {} ({e_rounds} rounds, best {e_best:.3}) vs {} ({f_rounds} rounds, best {f_best:.3})",
            faster * 100.0,
            secs(*early_took),
            secs(*full_took)
        ),
        e_ok && f_ok && f_rounds == MAX_ROUNDS && faster >= 0.20,
    ));
    rows.push(kill_and_resume(fleet).await?);
    Ok(rows)
}

/// The worker settings of the example, with the model at `url`.
fn settings(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TASKFLEET_PROVIDERS_URLS", format!("{PROVIDER}={url}")),
        ("TASKFLEET_PROVIDERS_MODELS", format!("{MODEL}={PROVIDER}")),
        ("TASKFLEET_PROVIDERS_PRICES", format!("{MODEL}=2.5/10")),
        ("TASKFLEET_POLICIES_CACHE", "llm.chat=30m by model+messages".into()),
        ("TASKFLEET_PROVIDERS_REQUEST_TIMEOUT", "180s".into()),
        // The single-flight leases of a killed worker's calls lapse within this (renewed while
        // a call runs), so they hold up the search's successor no longer.
        ("TASKFLEET_POLICIES_CACHE_LEASE", "3s".into()),
        ("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "16".into()),
    ]
}

/// The kill figure: a full 15-round search on a worker in a process of its own, SIGKILLed once
/// it reports round [`KILL_AFTER_ROUND`], then a second worker process that takes the task over
/// (after the first one's `ack_wait`) from the last checkpoint. The model keeps its stated
/// 300 ms even in a quick run, so there are rounds left to kill.
async fn kill_and_resume(fleet: &Fleet) -> anyhow::Result<Figure> {
    let mut mocks = Mocks::default();
    let url = mocks.start(PROVIDER, latency(LATENCY_MS)).await?;
    let kill_queue = queue("beam-kill");
    let tag = Uuid::now_v7().simple().to_string();
    let mut env: Vec<(String, String)> = settings(&url).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    env.push(("TASKFLEET_WORKER_QUEUES".into(), kill_queue.clone()));
    env.push(("TASKFLEET_NATS_ACK_WAIT".into(), KILL_ACK_WAIT.into()));
    env.push((
        "TASKFLEET_REDIS_KEY_PREFIX".into(),
        format!("{}ex:beam-kill:{}:", fleet.base.redis.key_prefix, &tag[tag.len() - 8..]),
    ));
    let start = |n: u32| -> anyhow::Result<(tokio::process::Child, String)> {
        let id = format!("ex-beam-kill-{n}-{}", std::process::id());
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["worker", NAME])
            .envs(env.iter().cloned())
            .env("TASKFLEET_WORKER_ID", &id)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok((child, id))
    };

    let mut events = fleet.client.subscribe(fleet.subjects.events_of_queue(&kill_queue)).await?;
    let (mut first, _) = start(1)?;
    let run = fleet.submit(&spec(3, false, &kill_queue)).await?;
    let killed_after = loop {
        let (round, _) = next_progress(&mut events, Duration::from_secs(60)).await?;
        if round >= KILL_AFTER_ROUND {
            first.start_kill()?; // SIGKILL
            break round;
        }
    };
    let killed_at = Instant::now();
    first.wait().await?;
    let (mut second, second_id) = start(2)?;
    let resumed_after = loop {
        let (_, by) = next_progress(&mut events, Duration::from_secs(60)).await?;
        if by == second_id {
            break killed_at.elapsed();
        }
    };
    let view = fleet.wait(run, Duration::from_secs(300)).await?;
    let ended_after = killed_at.elapsed();
    // A drain (SIGTERM), or a kill if it is already gone or does not stop in time.
    if let Some(pid) = second.id() {
        let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
    }
    if tokio::time::timeout(Duration::from_secs(15), second.wait()).await.is_err() {
        let _ = second.start_kill();
    }
    mocks.shutdown().await;

    let out = view.output.as_ref().and_then(|o| o.get("search"));
    let field = |k: &str| out.and_then(|o| o.get(k)).and_then(Value::as_u64).unwrap_or(0) as u32;
    let (from, rounds) = (field("started_from"), field("rounds"));
    Ok(Figure::new(
        NAME,
        format!(
            "worker process SIGKILLed after round ≥ {KILL_AFTER_ROUND} of a 15-round search (ack_wait {KILL_ACK_WAIT})"
        ),
        "a second worker resumes from the last checkpoint (round > 1) and finishes",
        format!(
            "killed after round {killed_after}; resumed from round {from} {} later; {rounds} of {MAX_ROUNDS} rounds, {} {} after the kill",
            secs(resumed_after),
            view.state.as_str(),
            secs(ended_after)
        ),
        view.state == RunState::Succeeded && from > 1 && from <= killed_after && rounds == MAX_ROUNDS,
    ))
}

/// The next progress report of a `beam.search` task among `events`: (its round, its worker).
async fn next_progress(events: &mut async_nats::Subscriber, deadline: Duration) -> anyhow::Result<(u32, String)> {
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(Some(msg)) = tokio::time::timeout(left, futures::StreamExt::next(events)).await else {
            anyhow::bail!("no progress of the search within {deadline:?}");
        };
        let Ok(batch) = taskfleet_bus::decode_message::<EventBatch>(&msg, 1 << 20) else { continue };
        let seen = batch.events.iter().rev().find(|e| e.kind == EventKind::Progress && e.task_kind == "beam.search");
        if let Some(e) = seen {
            let round = e.result.as_ref().and_then(|r| r.get("round")).and_then(Value::as_u64).unwrap_or(0);
            return Ok((round as u32, e.worker.clone().unwrap_or_default()));
        }
    }
}

/// `taskfleet-examples worker beam`: only the example's worker, configured by the environment
/// its parent gave it, until SIGTERM or Ctrl-C.
pub async fn worker_process(fleet: &Fleet) -> anyhow::Result<()> {
    let config = taskfleet_config::Config::load()?;
    let providers = Providers::new(&config.providers)?;
    let handle = fleet.spawn_worker(worker(config, &providers));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    handle.stop().await
}

/// The run for goal number `seed`, in `queue`.
fn spec(seed: u64, early_stop: bool, queue: &str) -> RunSpec {
    let (goal, vocab) = goal_of(seed);
    let agents = NodeSpec::new(
        "agents",
        "spawn",
        json!({ "count": AGENTS, "kind": "beam.agent", "join": "collect", "payload": { "seed": seed, "vocab": vocab } }),
    );
    let mut search = NodeSpec::new(
        "search",
        "beam.search",
        json!({ "seed": seed, "goal": goal, "vocab": vocab, "early_stop": early_stop, "max_rounds": MAX_ROUNDS }),
    )
    .after(&["agents"]);
    search.timeout_ms = Some(900_000);
    let mut spec = RunSpec::new(vec![agents, search]);
    spec.name = Some(NAME.into());
    spec.queue = queue.to_string();
    spec.timeout_ms = Some(1_200_000);
    spec
}

/// The example's worker: agents, the search, and the built-in `spawn` and `collect`.
fn worker(config: taskfleet_config::Config, providers: &Providers) -> Worker {
    let (p1, p2) = (providers.clone(), providers.clone());
    Worker::builder(config)
        .handler("beam.agent", move |ctx, payload| agent(p1.clone(), ctx, payload))
        .handler("beam.search", move |ctx, payload| search(p2.clone(), ctx, payload))
        .handler("spawn", builtin::spawn)
        .handler("collect", builtin::collect)
        .build()
}

/// Goal number `seed`: its terms, and the vocabulary candidates are drawn from (the goal's
/// terms and as many distractors, in an order of the seed).
pub fn goal_of(seed: u64) -> (Vec<String>, Vec<String>) {
    let mut all: Vec<&str> = VOCAB.to_vec();
    all.sort_by_key(|t| taskfleet_mock_api::fnv1a(format!("{seed}/{t}").as_bytes()));
    let goal: Vec<String> = all[..GOAL_TERMS].iter().map(|s| s.to_string()).collect();
    let mut vocab: Vec<String> = all[..GOAL_TERMS + DISTRACTORS].iter().map(|s| s.to_string()).collect();
    vocab.sort_by_key(|t| taskfleet_mock_api::fnv1a(format!("{t}/{seed}").as_bytes()));
    (goal, vocab)
}

/// The term the model's `answer` picks for candidate `j`.
pub fn pick(answer: &str, j: usize, vocab: &[String]) -> Option<String> {
    if vocab.is_empty() {
        return None;
    }
    let h = taskfleet_mock_api::fnv1a(format!("{answer}#{j}").as_bytes()) as usize;
    Some(vocab[h % vocab.len()].clone())
}

/// An agent: asks the model for a first plan step.
async fn agent(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let vocab = strings(payload.get("vocab"));
    let i = payload.get("i").and_then(Value::as_u64).unwrap_or(0) as usize;
    let seed = payload.get("seed").and_then(Value::as_u64).unwrap_or(0);
    let answer =
        providers.chat(&ctx, chat_request(MODEL, format!("Agent {i}, goal {seed}: propose a first step."))).await?;
    let text = answer.get("content").and_then(Value::as_str).unwrap_or_default();
    let step = pick(text, i, &vocab).ok_or_else(|| TaskError::fatal("no vocabulary").with_code("invalid_payload"))?;
    Ok(json!({ "agent": i, "step": step }))
}

/// One plan and its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beam {
    /// The steps.
    pub steps: Vec<String>,
    /// The judge's score.
    pub score: f64,
}

/// The search's state, saved in the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Rounds done.
    pub round: u32,
    /// The kept plans, best first.
    pub beams: Vec<Beam>,
    /// The best score so far.
    pub best: f64,
    /// Rounds in a row whose best improved by less than [`MIN_GAIN`].
    pub stall: u32,
    /// The best score after each round.
    pub history: Vec<f64>,
    /// Scores by plan text.
    pub memo: BTreeMap<String, f64>,
}

/// What a search asks of the model: (the answer, whether it came from the shared cache).
#[derive(Debug, Default, Clone, Copy)]
pub struct Calls {
    /// Model calls made (cached ones included).
    pub asked: u32,
    /// Answered from the fleet's cache.
    pub cached: u32,
    /// Scores found in the memo instead of asking the judge.
    pub memo_hits: u32,
}

fn plan_text(steps: &[String]) -> String {
    steps.join(" > ")
}

/// Why the search stops after `state`, if it does.
pub fn stop_reason(state: &State, early_stop: bool, max_rounds: u32) -> Option<&'static str> {
    if early_stop && state.best >= STOP_SCORE {
        Some("score")
    } else if early_stop && state.stall >= PATIENCE {
        Some("convergence")
    } else if state.round >= max_rounds {
        Some("max_rounds")
    } else {
        None
    }
}

/// Scores plans with the judge (the goal's terms required), through the memo; concurrent calls.
async fn score_all<F, Fut>(
    goal: &[String],
    plans: Vec<Vec<String>>,
    memo: &mut BTreeMap<String, f64>,
    ask: &F,
    calls: &mut Calls,
) -> Result<Vec<Beam>, TaskError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<(String, bool), TaskError>>,
{
    let texts: BTreeSet<String> = plans.iter().map(|p| plan_text(p)).collect();
    let new: Vec<String> = texts.iter().filter(|t| !memo.contains_key(*t)).cloned().collect();
    calls.memo_hits += (plans.len() - new.len()) as u32;
    let required = goal.join(", ");
    let answers =
        futures::future::join_all(new.iter().map(|t| ask(format!("SCORE\nrequired: {required}\n---\n{t}")))).await;
    for (text, answer) in new.iter().zip(answers) {
        let (content, cached) = answer?;
        calls.asked += 1;
        calls.cached += u32::from(cached);
        let score = serde_json::from_str::<Value>(&content)
            .ok()
            .and_then(|v| v.get("score").and_then(Value::as_f64))
            .ok_or_else(|| {
            TaskError::retryable(format!("the judge gave no score: {content}")).with_code("bad_verdict")
        })?;
        memo.insert(text.clone(), score);
    }
    Ok(plans
        .into_iter()
        .map(|steps| {
            let score = memo.get(&plan_text(&steps)).copied().unwrap_or(0.0);
            Beam { steps, score }
        })
        .collect())
}

/// The best [`K`] distinct plans (by their set of steps) of `pool`: higher score, then fewer
/// steps, then by text.
pub fn select(mut pool: Vec<Beam>) -> Vec<Beam> {
    pool.sort_by(|a, b| {
        b.score.total_cmp(&a.score).then(a.steps.len().cmp(&b.steps.len())).then(a.steps.cmp(&b.steps))
    });
    let mut seen = BTreeSet::new();
    pool.into_iter().filter(|b| seen.insert(b.steps.iter().cloned().collect::<BTreeSet<_>>())).take(K).collect()
}

/// The first state: the agents' steps, scored.
pub async fn initial<F, Fut>(
    goal: &[String],
    steps: Vec<String>,
    ask: &F,
    calls: &mut Calls,
) -> Result<State, TaskError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<(String, bool), TaskError>>,
{
    let mut state = State::default();
    let plans = steps.into_iter().map(|s| vec![s]).collect();
    state.beams = select(score_all(goal, plans, &mut state.memo, ask, calls).await?);
    state.best = state.beams.first().map_or(0.0, |b| b.score);
    Ok(state)
}

/// One round: [`FANOUT`] candidates per beam (concurrent model calls), scored, the best [`K`]
/// of beams and candidates kept.
pub async fn round<F, Fut>(
    seed: u64,
    goal: &[String],
    vocab: &[String],
    state: &mut State,
    ask: &F,
    calls: &mut Calls,
) -> Result<(), TaskError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<(String, bool), TaskError>>,
{
    let r = state.round + 1;
    let mut asks = Vec::new();
    for beam in &state.beams {
        // The latest steps first: the stand-in model keeps only the start of a prompt.
        let recent: Vec<&str> = beam.steps.iter().rev().map(String::as_str).collect();
        for j in 0..FANOUT {
            asks.push((beam, j, format!("Goal {seed}, round {r}, option {j}: next after {}", recent.join(", "))));
        }
    }
    let answers = futures::future::join_all(asks.iter().map(|(_, _, p)| ask(p.clone()))).await;
    let mut candidates = Vec::new();
    for ((beam, j, _), answer) in asks.iter().zip(answers) {
        let (content, cached) = answer?;
        calls.asked += 1;
        calls.cached += u32::from(cached);
        if let Some(term) = pick(&content, *j, vocab).filter(|t| !beam.steps.contains(t)) {
            let mut steps = beam.steps.clone();
            steps.push(term);
            candidates.push(steps);
        }
    }
    let mut pool = score_all(goal, candidates, &mut state.memo, ask, calls).await?;
    pool.extend(state.beams.iter().cloned());
    state.beams = select(pool);
    let best = state.beams.first().map_or(0.0, |b| b.score);
    state.stall = if best - state.best < MIN_GAIN { state.stall + 1 } else { 0 };
    state.best = state.best.max(best);
    state.round = r;
    state.history.push(state.best);
    Ok(())
}

/// The search step: from the agents' first steps (or the last checkpoint), rounds until a stop
/// rule holds; progress after every round, a checkpoint every [`CHECKPOINT_EVERY`].
async fn search(providers: Providers, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let invalid = |m: &str| TaskError::fatal(m.to_string()).with_code("invalid_payload");
    let seed = payload.get("seed").and_then(Value::as_u64).unwrap_or(0);
    let goal = strings(payload.get("goal"));
    let vocab = strings(payload.get("vocab"));
    if goal.is_empty() || vocab.is_empty() {
        return Err(invalid("a search needs a goal and a vocabulary"));
    }
    let early_stop = payload.get("early_stop").and_then(Value::as_bool).unwrap_or(true);
    let max_rounds = payload.get("max_rounds").and_then(Value::as_u64).unwrap_or(MAX_ROUNDS.into()).min(100) as u32;
    let ask = |prompt: String| {
        let (providers, ctx) = (providers.clone(), ctx.clone());
        async move {
            let answer = providers.chat(&ctx, chat_request(MODEL, prompt)).await?;
            let content = answer.get("content").and_then(Value::as_str).unwrap_or_default().to_string();
            Ok((content, answer.get("cached").and_then(Value::as_bool).unwrap_or(false)))
        }
    };
    let mut calls = Calls::default();
    let mut state = match &ctx.checkpoint {
        Some(saved) => serde_json::from_value::<State>(saved.clone())
            .map_err(|e| TaskError::fatal(format!("unreadable checkpoint: {e}")).with_code("bad_checkpoint"))?,
        None => {
            let firsts: Vec<String> = ctx
                .parent_result("agents")
                .and_then(|a| a.get("results"))
                .and_then(Value::as_array)
                .map(|rs| rs.iter().filter_map(|r| r.get("step").and_then(Value::as_str)).map(str::to_string).collect())
                .unwrap_or_default();
            if firsts.is_empty() {
                return Err(TaskError::fatal("no agent proposed a first step").with_code("missing_parent"));
            }
            initial(&goal, firsts, &ask, &mut calls).await?
        }
    };
    let started_from = state.round + 1;
    let stopped = loop {
        if let Some(why) = stop_reason(&state, early_stop, max_rounds) {
            break why;
        }
        if ctx.cancel.is_cancelled() {
            return Err(TaskError::fatal("cancelled").with_code("cancelled"));
        }
        round(seed, &goal, &vocab, &mut state, &ask, &mut calls).await?;
        ctx.progress(json!({ "round": state.round, "best": state.best }));
        if state.round % CHECKPOINT_EVERY == 0 {
            ctx.checkpoint(&state).await?;
        }
    };
    Ok(json!({
        "rounds": state.round,
        "started_from": started_from,
        "stopped": stopped,
        "best": state.best,
        "plan": state.beams.first().map(|b| b.steps.clone()),
        "history": state.history,
        "calls": calls.asked,
        "cached": calls.cached,
        "memo_hits": calls.memo_hits,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stand-in model, answered in process.
    async fn mock(prompt: String) -> Result<(String, bool), TaskError> {
        let content = taskfleet_mock_api::judge_content(&prompt)
            .unwrap_or_else(|| taskfleet_mock_api::echo_content(PROVIDER, &prompt));
        Ok((content, false))
    }

    async fn simulate(seed: u64, early_stop: bool) -> State {
        let (goal, vocab) = goal_of(seed);
        let mut calls = Calls::default();
        let firsts = (0..AGENTS as usize)
            .map(|i| {
                let answer = taskfleet_mock_api::echo_content(
                    PROVIDER,
                    &format!("Agent {i}, goal {seed}: propose a first step."),
                );
                pick(&answer, i, &vocab).expect("a step")
            })
            .collect();
        let mut state = initial(&goal, firsts, &mock, &mut calls).await.expect("initial");
        while stop_reason(&state, early_stop, MAX_ROUNDS).is_none() {
            round(seed, &goal, &vocab, &mut state, &mock, &mut calls).await.expect("a round");
        }
        state
    }

    #[test]
    fn no_term_is_part_of_another() {
        for a in VOCAB {
            for b in VOCAB {
                assert!(a == b || !a.contains(b), "{b} in {a}");
            }
        }
    }

    #[tokio::test]
    async fn the_search_improves_and_stops_early() {
        for seed in 1..=3 {
            let early = simulate(seed, true).await;
            let full = simulate(seed, false).await;
            assert_eq!(full.round, MAX_ROUNDS);
            assert!(early.round < MAX_ROUNDS, "seed {seed}: {early:?}");
            assert!(full.best >= early.best);
            assert!(early.history.windows(2).all(|w| w[1] >= w[0]));
            println!("seed {seed}: early {} rounds best {}, full best {}", early.round, early.best, full.best);
        }
    }

    #[test]
    fn select_keeps_the_best_distinct_plans() {
        let b = |s: &[&str], score| Beam { steps: s.iter().map(|x| x.to_string()).collect(), score };
        let kept =
            select(vec![b(&["a", "b"], 0.5), b(&["b", "a"], 0.5), b(&["a"], 0.5), b(&["c"], 0.9), b(&["d"], 0.1)]);
        assert_eq!(kept, vec![b(&["c"], 0.9), b(&["a"], 0.5), b(&["a", "b"], 0.5)]);
    }

    #[test]
    fn stop_rules() {
        let s = |round, best, stall| State { round, best, stall, ..State::default() };
        assert_eq!(stop_reason(&s(3, 0.95, 0), true, 15), Some("score"));
        assert_eq!(stop_reason(&s(3, 0.5, 2), true, 15), Some("convergence"));
        assert_eq!(stop_reason(&s(3, 0.95, 2), false, 15), None);
        assert_eq!(stop_reason(&s(15, 0.5, 0), false, 15), Some("max_rounds"));
    }

    #[test]
    fn the_spec_is_a_valid_run() {
        let s = spec(1, true, "ex-beam");
        taskfleet_proto::plan_nodes(&s.nodes, &s.queue, s.priority, 1 << 20).expect("valid run");
    }
}
