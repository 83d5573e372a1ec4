//! `taskfleet`: the command line of a taskfleet fleet. Talks to NATS: submissions go to
//! JetStream, queries go to the coordinator's request/reply API; `top` reads the aggregator's HTTP
//! `/v1/stats`.

mod bench;
mod client;
mod run;
mod submit;
mod top;
mod workflow_bench;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use taskfleet_proto::{
    CancelReply, CountsRequest, ListRequest, PasswordSource, ReplayReply, ReplayRequest, Subjects, TaskIdRequest,
    VERB_TASK_CANCEL, VERB_TASK_COUNTS, VERB_TASK_LIST, VERB_TASK_REPLAY, authorization_block,
};

#[derive(Parser)]
#[command(name = "taskfleet", version, about = "Submit and inspect taskfleet tasks")]
struct Cli {
    /// NATS server URL (default: the fleet configuration's, `TASKFLEET_NATS_URL`).
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Subject prefix of the fleet (default: `TASKFLEET_NATS_SUBJECT_PREFIX` or `taskfleet`).
    #[arg(long, global = true)]
    subject_prefix: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit one task, or `--count N` generated ones.
    Submit(submit::SubmitArgs),
    /// Show a task.
    Status {
        /// Task id.
        id: uuid::Uuid,
    },
    /// Block until a task is final, then print it. Exit code 0 if it succeeded, 1 otherwise.
    Wait {
        /// Task id.
        id: uuid::Uuid,
        /// Give up after this long (exit code 2).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// List recent tasks, newest first.
    Ls {
        /// Only tasks in this state (pending, queued, running, retrying, succeeded, failed, dead, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only tasks of this queue.
        #[arg(long)]
        queue: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task: a queued one never runs, a running one is signalled (its handler sees
    /// the cancellation token); pending dependents are cancelled too.
    Cancel {
        /// Task id.
        id: uuid::Uuid,
    },
    /// Bring dead tasks back: queued again with a fresh attempt budget.
    Replay {
        /// Task ids.
        ids: Vec<uuid::Uuid>,
        /// Every dead task (of --queue, if given).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// With --all, only this queue.
        #[arg(long, requires = "all")]
        queue: Option<String>,
    },
    /// Dead-letter commands.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Measure the fleet (see the README's benchmarks).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Create the database schema if needed, apply every pending migration (whatever
    /// `database.migrate_on_start` says) and exit: the separate migration step for fleets whose
    /// services run with migrations off and a role without DDL rights. Talks to Postgres only
    /// (`TASKFLEET_DATABASE_URL`, `TASKFLEET_DATABASE_SCHEMA`), with a role that may change the schema.
    Migrate,
    /// Task counts by state.
    Counts {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Live fleet figures from the aggregator, refreshed every second until Ctrl-C.
    Top(top::TopArgs),
    /// Print the nats-server `authorization` block that gives each role of this fleet
    /// (coordinator, worker, aggregator, client, admin) its permissions, for the configured
    /// subject and stream prefixes. Passwords are references to the nats-server's environment
    /// variables `<PREFIX><ROLE>` (e.g. `NATS_PASSWORD_WORKER`).
    NatsPermissions {
        /// Prefix of the environment variables holding the passwords.
        #[arg(long, default_value = "NATS_PASSWORD_")]
        password_env_prefix: String,
    },
    /// Runs: DAGs of named tasks submitted as one unit.
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
}

#[derive(Subcommand)]
enum RunCommand {
    /// Submit a run from a JSON or YAML file (`-`: standard input); prints the run id, then
    /// each node's task id.
    Submit(run::SubmitArgs),
    /// Draw a run: its state and totals, then its tasks, parents first.
    Show(run::ShowArgs),
    /// List runs, newest first.
    Ls(run::ListArgs),
    /// Block until a run is over, then print its output. Exit code 0 if it succeeded, 1 if it
    /// failed or was cancelled, 2 on timeout.
    Wait(run::WaitArgs),
    /// Cancel a run and its unfinished tasks.
    Cancel(run::IdArgs),
    /// Run a failed or cancelled run again from what succeeded.
    Resume(run::IdArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Per-task latency at a steady low rate: submit → worker's event, submit → committed.
    Latency(bench::LatencyArgs),
    /// Publishes synthetic `succeeded` events straight into the event stream (for measuring
    /// the aggregator's throughput); run it against a fleet without workers or coordinator.
    Events(bench::EventsArgs),
    /// What dependencies cost: independent steps against a DAG, a 10,000-child fan-out with
    /// one join, and the release latency of a dependent step.
    Workflows(workflow_bench::WorkflowArgs),
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List dead tasks with their last error, newest first.
    Ls {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let mut telemetry = None;
    let result = run(cli, &mut telemetry).await;
    // `process::exit` runs no destructors: flush the spans still buffered first.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(cli: Cli, telemetry: &mut Option<taskfleet_telemetry::Telemetry>) -> anyhow::Result<i32> {
    // `top` reads the aggregator over HTTP: it needs neither the fleet configuration nor NATS.
    let command = match cli.command {
        Command::Top(args) => return top::run(args).await,
        command => command,
    };
    let mut config = taskfleet_config::Config::load().map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(url) = cli.nats_url {
        config.nats.url = url;
    }
    if let Some(p) = cli.subject_prefix {
        config.nats.subject_prefix = p;
    }
    // Spans (exported when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) under the service name
    // `taskfleet`; the log shows warnings only unless `TASKFLEET_LOG` asks for more.
    if std::env::var_os("TASKFLEET_LOG").is_none() {
        config.telemetry.log = "warn".into();
    }
    if let Command::Migrate = command {
        return migrate(&config.database).await;
    }
    // A bulk submit makes a span per task faster than the exporter ships them: a deeper queue.
    *telemetry = Some(taskfleet_telemetry::init_with_queue("taskfleet", &config.telemetry, 1 << 16)?);
    if let Command::NatsPermissions { password_env_prefix } = &command {
        let subjects = Subjects::new(&config.nats.subject_prefix, &config.nats.stream_prefix);
        print!("{}", authorization_block(&subjects, &PasswordSource::Env(password_env_prefix.clone())));
        return Ok(0);
    }
    let fleet = client::Fleet::connect(&config).await.context("connecting to NATS")?;
    match command {
        Command::Submit(args) => submit::run(&fleet, args).await,
        Command::Status { id } => {
            let task = fleet.get(id).await?;
            println!("{}", serde_json::to_string_pretty(&task)?);
            Ok(0)
        }
        Command::Wait { id, timeout } => {
            let task = fleet.wait(id, timeout).await?;
            match task {
                Some(task) => {
                    println!("{}", serde_json::to_string_pretty(&task)?);
                    Ok(if task.get("state").and_then(|s| s.as_str()) == Some("succeeded") { 0 } else { 1 })
                }
                None => {
                    eprintln!("task {id} is not final after {}", humantime::format_duration(timeout));
                    Ok(2)
                }
            }
        }
        Command::Ls { state, queue, limit, json } => {
            let rows: Vec<Value> = fleet.api(VERB_TASK_LIST, &ListRequest { state, queue, limit: Some(limit) }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            println!(
                "{:<36}  {:<10}  {:<12}  {:<8}  {:<9}  {:>7}  CREATED",
                "ID", "QUEUE", "KIND", "PRIORITY", "STATE", "ATTEMPT"
            );
            for t in &rows {
                let s = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
                println!(
                    "{:<36}  {:<10}  {:<12}  {:<8}  {:<9}  {:>7}  {}",
                    s("id"),
                    s("queue"),
                    s("kind"),
                    s("priority"),
                    s("state"),
                    t.get("attempt").and_then(|v| v.as_i64()).unwrap_or(0),
                    s("created_at")
                );
            }
            Ok(0)
        }
        Command::Cancel { id } => {
            let CancelReply { cancelled, previous, .. } = fleet.api(VERB_TASK_CANCEL, &TaskIdRequest { id }).await?;
            let previous = previous.as_str();
            if cancelled {
                println!("cancelled {id} (was {previous})");
                Ok(0)
            } else {
                eprintln!("task {id} is already final ({previous})");
                Ok(1)
            }
        }
        Command::Replay { ids, all, queue } => {
            if ids.is_empty() && !all {
                anyhow::bail!("name task ids, or pass --all");
            }
            let request = if all {
                ReplayRequest { all: true, queue, ..Default::default() }
            } else {
                ReplayRequest { ids: Some(ids.clone()), ..Default::default() }
            };
            let ReplayReply { replayed } = fleet.api(VERB_TASK_REPLAY, &request).await?;
            for id in &replayed {
                println!("{id}");
            }
            eprintln!("replayed {} dead task(s)", replayed.len());
            Ok(if !all && replayed.len() < ids.len() { 1 } else { 0 })
        }
        Command::Dead { command: DeadCommand::Ls { queue, limit } } => {
            let request = ListRequest { state: Some("dead".into()), queue, limit: Some(limit) };
            let rows: Vec<Value> = fleet.api(VERB_TASK_LIST, &request).await?;
            println!("{:<36}  {:<10}  {:<12}  {:>7}  {:<20}  ERROR", "ID", "QUEUE", "KIND", "ATTEMPT", "CODE");
            for t in &rows {
                let s = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
                let err = t.get("error").cloned().unwrap_or_default();
                println!(
                    "{:<36}  {:<10}  {:<12}  {:>7}  {:<20}  {}",
                    s("id"),
                    s("queue"),
                    s("kind"),
                    t.get("attempt").and_then(|v| v.as_i64()).unwrap_or(0),
                    err.get("code").and_then(|v| v.as_str()).unwrap_or("-"),
                    err.get("message").and_then(|v| v.as_str()).unwrap_or("-")
                );
            }
            Ok(0)
        }
        Command::Bench { command: BenchCommand::Latency(args) } => bench::latency(&fleet, args).await,
        Command::Bench { command: BenchCommand::Events(args) } => bench::events(&fleet, args).await,
        Command::Bench { command: BenchCommand::Workflows(args) } => workflow_bench::workflows(&fleet, args).await,
        Command::Migrate => Ok(0),
        Command::Counts { queue } => {
            let counts: BTreeMap<String, i64> = fleet.api(VERB_TASK_COUNTS, &CountsRequest { queue }).await?;
            println!("{}", serde_json::to_string_pretty(&counts)?);
            Ok(0)
        }
        Command::Top(args) => top::run(args).await,
        Command::NatsPermissions { .. } => Ok(0),
        Command::Run { command } => match command {
            RunCommand::Submit(args) => run::submit(&fleet, args).await,
            RunCommand::Show(args) => run::show(&fleet, args).await,
            RunCommand::Ls(args) => run::list(&fleet, args).await,
            RunCommand::Wait(args) => run::wait(&fleet, args).await,
            RunCommand::Cancel(args) => run::cancel(&fleet, args).await,
            RunCommand::Resume(args) => run::resume(&fleet, args).await,
        },
    }
}

/// `taskfleet migrate`: applies the pending migrations and says what it did.
async fn migrate(database: &taskfleet_config::DatabaseConfig) -> anyhow::Result<i32> {
    let (store, applied) = taskfleet_store::Store::migrate(database)
        .await
        .with_context(|| format!("migrating schema {:?} at {}", database.schema, database.redacted_url()))?;
    if applied.is_empty() {
        println!("schema {}: up to date", store.schema());
    } else {
        println!("schema {}: applied {} migration(s):", store.schema(), applied.len());
        for migration in &applied {
            println!("  {migration}");
        }
    }
    Ok(0)
}
