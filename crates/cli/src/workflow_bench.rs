//! `taskfleet bench workflows`: what dependencies cost. In one invocation, against a running
//! fleet: a run of independent `echo` steps and a DAG of the same size (each step after
//! `parents` steps of the layer before), alternately; the same number of plain tasks
//! submitted one by one; a run-time fan-out of `children` with one join; and the release
//! latency of `chains` two-step runs sent at a low rate (the parent's handler ending → the
//! child's handler starting).

use crate::bench::percentile;
use crate::client::Fleet;
use anyhow::{anyhow, bail};
use async_nats::HeaderMap;
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use taskfleet_bus::{decode_message, send_submission};
use taskfleet_proto::{
    CommittedBatch, MAX_MESSAGE_BYTES, RunGetRequest, RunState, RunSubmitted, RunView, TaskEnvelope, VERB_RUN_GET,
    VERB_RUN_SUBMIT,
};

#[derive(clap::Args)]
pub struct WorkflowArgs {
    /// Steps per layer of the DAG.
    #[arg(long, default_value_t = 1000)]
    width: usize,
    /// Layers of the DAG.
    #[arg(long, default_value_t = 10)]
    depth: usize,
    /// Parents of each step after the first layer.
    #[arg(long, default_value_t = 2)]
    parents: usize,
    /// Rounds of (independent run, DAG run).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Children of the fan-out.
    #[arg(long, default_value_t = 10_000)]
    children: usize,
    /// Two-step runs for the release latency.
    #[arg(long, default_value_t = 300)]
    chains: usize,
    /// Two-step runs per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
}

/// Name of the step `i` of layer `layer`.
fn step(layer: usize, i: usize) -> String {
    format!("l{layer}n{i}")
}

/// A run of `width × depth` echo steps; with `parents > 0`, each step after the first layer
/// depends on steps `i, i+1, …` (mod width) of the layer before.
fn layered_run(width: usize, depth: usize, parents: usize) -> Value {
    let mut nodes = Vec::with_capacity(width * depth);
    for layer in 0..depth {
        for i in 0..width {
            let deps: Vec<String> = if layer == 0 || parents == 0 {
                Vec::new()
            } else {
                (0..parents.min(width)).map(|p| step(layer - 1, (i + p) % width)).collect()
            };
            nodes.push(json!({"name": step(layer, i), "kind": "echo", "depends_on": deps}));
        }
    }
    json!({"name": "bench", "nodes": nodes})
}

/// Submits a run and waits for its end; returns its view (without tasks) and the seconds from
/// submit to the end being visible.
async fn run_to_end(fleet: &Fleet, spec: &Value, timeout: Duration) -> anyhow::Result<(RunView, f64)> {
    let t0 = Instant::now();
    let submitted: RunSubmitted = fleet.api(VERB_RUN_SUBMIT, spec).await?;
    let view = wait_run(fleet, submitted.run_id, 0, timeout).await?;
    Ok((view, t0.elapsed().as_secs_f64()))
}

/// Waits for a run's end, then reads it with its first `tasks` tasks.
async fn wait_run(fleet: &Fleet, id: uuid::Uuid, tasks: u32, timeout: Duration) -> anyhow::Result<RunView> {
    let Some(view) = fleet.wait_run(id, timeout).await? else { bail!("run {id} still running after {timeout:?}") };
    if tasks == 0 {
        return Ok(view);
    }
    fleet.api(VERB_RUN_GET, &RunGetRequest { id, tasks: Some(tasks) }).await
}

/// `n` plain echo tasks submitted one by one (acknowledged by JetStream), waited for through
/// the coordinator's commit notifications.
async fn plain_tasks(fleet: &Fleet, n: usize) -> anyhow::Result<f64> {
    let queue = taskfleet_proto::DEFAULT_QUEUE;
    let mut committed = fleet.client.subscribe(fleet.subjects.committed(queue)).await.map_err(|e| anyhow!("{e}"))?;
    let envs: Vec<TaskEnvelope> =
        (0..n).map(|i| TaskEnvelope::new("echo", json!({ "i": i })).with_queue(queue)).collect();
    let mut waiting: HashSet<uuid::Uuid> = envs.iter().map(|e| e.id).collect();
    let t0 = Instant::now();
    let submitting = async {
        let mut acks = Vec::with_capacity(1000);
        for env in &envs {
            acks.push(send_submission(&fleet.js, &fleet.subjects, env, HeaderMap::new()).await?);
            if acks.len() == 1000 {
                for a in acks.drain(..) {
                    a.stored().await?;
                }
            }
        }
        for a in acks {
            a.stored().await?;
        }
        anyhow::Ok(())
    };
    let watching = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while !waiting.is_empty() {
            let Ok(Some(m)) = tokio::time::timeout_at(deadline, committed.next()).await else {
                bail!("{} plain tasks did not finish", waiting.len());
            };
            if let Ok(batch) = decode_message::<CommittedBatch>(&m, MAX_MESSAGE_BYTES) {
                for t in batch.tasks {
                    waiting.remove(&t.id);
                }
            }
        }
        anyhow::Ok(())
    };
    let (sent, seen) = tokio::join!(submitting, watching);
    sent?;
    seen?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Independent steps against a DAG of the same size, alternately, and plain tasks.
async fn dag_cost(fleet: &Fleet, args: &WorkflowArgs) -> anyhow::Result<()> {
    let n = args.width * args.depth;
    let edges = args.width * (args.depth - 1) * args.parents.min(args.width);
    let independent = layered_run(args.width, args.depth, 0);
    let dag = layered_run(args.width, args.depth, args.parents);
    let timeout = Duration::from_secs(600);
    let mut ratios = Vec::new();
    for round in 1..=args.rounds {
        let (v1, t_ind) = run_to_end(fleet, &independent, timeout).await?;
        let (v2, t_dag) = run_to_end(fleet, &dag, timeout).await?;
        if v1.state != RunState::Succeeded || v2.state != RunState::Succeeded {
            bail!("a benchmark run did not succeed: {:?} / {:?}", v1.state, v2.state);
        }
        let ratio = t_ind / t_dag;
        ratios.push(ratio);
        println!(
            "round {round}: {n} independent steps {:>7.0} tasks/s ({t_ind:.2} s) | DAG {}x{} with {edges} edges {:>7.0} tasks/s \
             ({t_dag:.2} s) | DAG/independent {:.0}% | {:.1} µs per edge",
            n as f64 / t_ind,
            args.width,
            args.depth,
            n as f64 / t_dag,
            ratio * 100.0,
            (t_dag - t_ind) / edges.max(1) as f64 * 1e6,
        );
    }
    let t_plain = plain_tasks(fleet, n).await?;
    println!("{n} plain tasks submitted one by one: {:.0} tasks/s ({t_plain:.2} s)", n as f64 / t_plain);
    println!(
        "DAG throughput / independent run throughput, median of {}: {:.0}%",
        ratios.len(),
        percentile(&mut ratios, 0.5) * 100.0
    );
    Ok(())
}

/// One spawn of `children` with a `collect` join, and a step after it.
async fn fan_out(fleet: &Fleet, children: usize) -> anyhow::Result<()> {
    let spec = json!({"name": "fanout", "nodes": [
        {"name": "fan", "kind": "spawn", "payload": {"count": children}},
        {"name": "after", "kind": "collect", "depends_on": ["fan"]}
    ]});
    let (view, secs) = run_to_end(fleet, &spec, Duration::from_secs(600)).await?;
    let results = fan_results(&view)?;
    println!(
        "fan-out of {children} children with one join: {} in {secs:.2} s ({:.0} tasks/s); the join saw {results} results; \
         {} attempts in all for {} tasks",
        view.state.as_str(),
        view.totals.tasks as f64 / secs,
        view.totals.attempts,
        view.totals.tasks,
    );
    if results != children {
        bail!("the join did not see every child: {results} of {children}");
    }
    Ok(())
}

/// How many results the fan-out's join handed on: `after` collects the spawner's result,
/// which is the join's.
fn fan_results(view: &RunView) -> anyhow::Result<usize> {
    let after = view.output.as_ref().and_then(|o| o.get("after")).ok_or_else(|| anyhow!("no output of `after`"))?;
    Ok(after["results"][0]["results"].as_array().map_or(0, Vec::len))
}

/// `chains` runs of two steps at `rate`: parent handler end → child handler start.
async fn release_latency(fleet: &Fleet, args: &WorkflowArgs) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.01)));
    let mut ids = Vec::with_capacity(args.chains);
    for i in 0..args.chains {
        tick.tick().await;
        let spec = json!({"nodes": [
            {"name": "a", "kind": "echo", "payload": {"i": i}},
            {"name": "b", "kind": "echo", "depends_on": ["a"]}
        ]});
        let submitted: RunSubmitted = fleet.api(VERB_RUN_SUBMIT, &spec).await?;
        ids.push(submitted.run_id);
    }
    let mut gaps = Vec::with_capacity(ids.len());
    for id in ids {
        let view = wait_run(fleet, id, 10, Duration::from_secs(60)).await?;
        let at = |node: &str| view.tasks.iter().find(|t| t.node.as_deref() == Some(node));
        if let (Some(a), Some(b)) = (at("a"), at("b"))
            && let (Some(done), Some(start)) = (a.finished_at, b.started_at)
        {
            gaps.push(start as f64 - done as f64);
        }
    }
    println!(
        "{} two-step runs at {}/s: parent's handler end -> child's handler start p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        gaps.len(),
        args.rate,
        percentile(&mut gaps, 0.5),
        percentile(&mut gaps, 0.99),
        percentile(&mut gaps, 1.0),
    );
    Ok(())
}

/// Runs the three measurements.
pub async fn workflows(fleet: &Fleet, args: WorkflowArgs) -> anyhow::Result<i32> {
    if args.width == 0 || args.depth < 2 {
        bail!("--width must be at least 1 and --depth at least 2");
    }
    release_latency(fleet, &args).await?;
    dag_cost(fleet, &args).await?;
    fan_out(fleet, args.children).await?;
    Ok(0)
}
