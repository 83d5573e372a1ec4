//! `taskfleet submit`.

use crate::client::Fleet;
use anyhow::{Context, anyhow};
use async_nats::HeaderMap;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use taskfleet_bus::{decode_message, send_submission};
use taskfleet_proto::{CommittedBatch, MAX_MESSAGE_BYTES, Priority, SubmitReply, TaskEnvelope, headers};
use taskfleet_telemetry::{KeyValue, SpanKind};

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Task kind (handler name).
    #[arg(long)]
    kind: String,
    /// Payload as JSON, or `@FILE` to read it from a file (`@-`: standard input).
    #[arg(long, default_value = "null")]
    payload: String,
    /// Queue.
    #[arg(long, default_value = "default")]
    queue: String,
    /// critical, high, normal, low, or `mixed` (round robin over all four, with --count).
    #[arg(long, default_value = "normal")]
    priority: String,
    /// Attempts before the task is dead (default: the coordinator's for the kind).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Per-attempt timeout, e.g. `30s`.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Idempotency key: a second submission with the same key creates nothing new.
    #[arg(long)]
    key: Option<String>,
    /// Ids of tasks that must succeed first.
    #[arg(long = "depends-on")]
    depends_on: Vec<uuid::Uuid>,
    /// A fleet-wide rate limit (from `policies.rate_limits`) the task takes a token from; repeatable.
    #[arg(long = "limit")]
    limits: Vec<String>,
    /// Submit this many generated tasks, each with its index `n` written into the payload at
    /// `--index-at` (into an object payload, or `{"i": n}` for a null one).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Where the index goes in each generated payload, as a JSON pointer (objects on the way are
    /// created), e.g. `/json/i` for an `http` task's body.
    #[arg(long, default_value = "/i")]
    index_at: String,
    /// Publishes awaiting their JetStream acknowledgement at once, with --count.
    #[arg(long, default_value_t = 2048)]
    in_flight: usize,
    /// Wait for the coordinator to commit the task(s) to Postgres and print its answer.
    #[arg(long)]
    confirm: bool,
    /// Wait until every task is final, and report end-to-end throughput.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
    /// Print no progress bars.
    #[arg(long)]
    quiet: bool,
}

fn priority_for(spec: &str, i: usize) -> anyhow::Result<Priority> {
    if spec == "mixed" {
        return Ok(Priority::ALL[i % 4]);
    }
    spec.parse().map_err(|e| anyhow!("{e}"))
}

fn envelope(args: &SubmitArgs, payload: &serde_json::Value, i: usize) -> anyhow::Result<TaskEnvelope> {
    let mut payload = payload.clone();
    if args.count > 1 {
        if payload.is_null() {
            payload = serde_json::json!({});
        }
        set_at(&mut payload, &args.index_at, i.into())?;
    }
    let mut env =
        TaskEnvelope::new(&args.kind, payload).with_queue(&args.queue).with_priority(priority_for(&args.priority, i)?);
    env.max_attempts = args.max_attempts.unwrap_or(0);
    env.timeout_ms = args.timeout.as_millis() as u64;
    env.depends_on = args.depends_on.clone();
    env.limits = args.limits.clone();
    env.idempotency_key = match (&args.key, args.count) {
        (Some(k), 1) => Some(k.clone()),
        (Some(k), _) => Some(format!("{k}-{i}")),
        (None, _) => None,
    };
    env.validate(usize::MAX).map_err(|e| anyhow!("{e}"))?;
    Ok(env)
}

/// Writes `value` at a JSON pointer, creating objects on the way.
fn set_at(target: &mut serde_json::Value, pointer: &str, value: serde_json::Value) -> anyhow::Result<()> {
    let Some(path) = pointer.strip_prefix('/') else {
        return Err(anyhow!("--index-at {pointer:?} must start with /"));
    };
    let mut here = target;
    let parts: Vec<String> = path.split('/').map(|p| p.replace("~1", "/").replace("~0", "~")).collect();
    for (n, part) in parts.iter().enumerate() {
        let serde_json::Value::Object(map) = here else {
            return Err(anyhow!("--index-at {pointer:?}: the payload has no object at {part:?}"));
        };
        if n + 1 == parts.len() {
            map.insert(part.clone(), value);
            return Ok(());
        }
        here = map.entry(part.clone()).or_insert_with(|| serde_json::json!({}));
    }
    Ok(())
}

fn bar(quiet: bool, len: usize, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub async fn run(fleet: &Fleet, args: SubmitArgs) -> anyhow::Result<i32> {
    let text = match args.payload.strip_prefix('@') {
        Some("-") => std::io::read_to_string(std::io::stdin()).context("cannot read the payload from stdin")?,
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read the payload from {path}"))?,
        None => args.payload.clone(),
    };
    let payload: serde_json::Value = serde_json::from_str(&text).context("--payload is not valid JSON")?;
    let envs: Vec<TaskEnvelope> =
        (0..args.count.max(1)).map(|i| envelope(&args, &payload, i)).collect::<anyhow::Result<_>>()?;
    let ids: HashSet<uuid::Uuid> = envs.iter().map(|e| e.id).collect();

    // Subscribe before publishing so no notification or reply can be missed.
    let mut committed = if args.wait {
        Some(fleet.client.subscribe(fleet.subjects.committed(&args.queue)).await.map_err(|e| anyhow!("{e}"))?)
    } else {
        None
    };
    let inbox = fleet.client.new_inbox();
    let mut replies = if args.confirm {
        Some(fleet.client.subscribe(inbox.clone()).await.map_err(|e| anyhow!("{e}"))?)
    } else {
        None
    };

    let started = Instant::now();
    let pb = bar(args.quiet || args.count == 1, envs.len(), "submitted");
    let mut acks = FuturesUnordered::new();
    let mut duplicates = 0usize;
    // When spans are exported, each submission is the root of its task's trace: a `task.submit`
    // span, open until JetStream stores the submission, whose context rides in the headers.
    let traced = taskfleet_telemetry::exporting();
    for env in &envs {
        let mut h = HeaderMap::new();
        if args.confirm {
            h.insert(headers::REPLY_TO, inbox.as_str());
        }
        let span = traced.then(|| {
            let span = taskfleet_telemetry::root_span("task.submit", SpanKind::Producer, || {
                vec![
                    KeyValue::new("task_id", env.id.to_string()),
                    KeyValue::new("kind", env.kind.clone()),
                    KeyValue::new("queue", env.queue.clone()),
                    KeyValue::new("priority", env.priority.as_str()),
                ]
            });
            span.inject(&mut h);
            span
        });
        let sent = send_submission(&fleet.js, &fleet.subjects, env, h).await?;
        acks.push(async move {
            let stored = sent.stored().await;
            // The span ends once JetStream has stored the submission.
            drop(span);
            stored
        });
        while acks.len() >= args.in_flight {
            if let Some(r) = acks.next().await {
                duplicates += usize::from(r?.duplicate);
                pb.inc(1);
            }
        }
    }
    while let Some(r) = acks.next().await {
        duplicates += usize::from(r?.duplicate);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let submit_secs = started.elapsed().as_secs_f64();
    if args.count == 1 {
        println!("{}", envs[0].id);
    } else {
        println!(
            "submitted {} tasks in {:.2}s ({:.0} tasks/s){}",
            envs.len(),
            submit_secs,
            envs.len() as f64 / submit_secs,
            if duplicates > 0 { format!(", {duplicates} dropped as duplicates by JetStream") } else { String::new() }
        );
    }
    if duplicates > 0 && args.count == 1 {
        eprintln!("note: JetStream dropped this submission as a duplicate of one within the dedup window");
    }

    let mut code = 0;
    if let Some(sub) = replies.as_mut() {
        let mut pending = envs.len() - duplicates;
        while pending > 0 {
            let msg = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .map_err(|_| anyhow!("no confirmation from the coordinator within 30s"))?
                .ok_or_else(|| anyhow!("reply subscription closed"))?;
            let reply: SubmitReply = serde_json::from_slice(&msg.payload).context("invalid confirmation")?;
            if !reply.ok {
                code = 1;
                eprintln!("rejected: {}", reply.error.as_deref().unwrap_or("?"));
            } else if args.count == 1 {
                println!("{}", serde_json::to_string(&reply)?);
            }
            pending -= 1;
        }
    }

    if let Some(sub) = committed.as_mut() {
        let pb = bar(args.quiet, ids.len(), "finished");
        let mut states: HashMap<&'static str, usize> = HashMap::new();
        let mut done: HashSet<uuid::Uuid> = HashSet::new();
        let deadline = tokio::time::Instant::now() + args.wait_timeout;
        while done.len() < ids.len() {
            let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(anyhow!("notification subscription closed")),
                Err(_) => {
                    pb.finish_and_clear();
                    eprintln!(
                        "{} of {} tasks final after {}",
                        done.len(),
                        ids.len(),
                        humantime::format_duration(args.wait_timeout)
                    );
                    return Ok(2);
                }
            };
            let Ok(batch) = decode_message::<CommittedBatch>(&msg, MAX_MESSAGE_BYTES) else {
                continue;
            };
            for t in batch.tasks {
                if ids.contains(&t.id) && done.insert(t.id) {
                    *states.entry(t.state.as_str()).or_default() += 1;
                    pb.inc(1);
                }
            }
        }
        pb.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        let mut summary: Vec<String> = states.iter().map(|(s, n)| format!("{s}={n}")).collect();
        summary.sort();
        println!(
            "{} tasks final in {:.2}s end to end ({:.0} tasks/s): {}",
            done.len(),
            secs,
            done.len() as f64 / secs,
            summary.join(" ")
        );
        if states.get("succeeded").copied().unwrap_or(0) != done.len() {
            code = 1;
        }
        if args.count == 1 {
            let task = fleet.get(envs[0].id).await?;
            println!("{}", serde_json::to_string_pretty(&task)?);
        }
    }
    Ok(code)
}
