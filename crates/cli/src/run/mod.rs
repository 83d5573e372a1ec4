//! `taskfleet run`: submit a run (a DAG of named nodes) from a JSON or YAML file (`spec`),
//! draw it (`draw`), wait for it, list, cancel and resume runs. Every command is a verb of the
//! coordinator's request/reply API (`run.submit`, `run.get`, `run.list`, `run.cancel`,
//! `run.resume`), called through [`Fleet::api`].

mod draw;
mod spec;

use crate::client::Fleet;
use draw::{draw, header};
use spec::read_spec;
use std::time::Duration;
use taskfleet_proto::{
    RunChange, RunGetRequest, RunIdRequest, RunState, RunSubmitted, RunView, VERB_RUN_CANCEL, VERB_RUN_GET,
    VERB_RUN_RESUME, VERB_RUN_SUBMIT,
};
use uuid::Uuid;

/// Arguments of `taskfleet run submit`.
#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The run (a RunSpec) as JSON or YAML: `.yaml`/`.yml` files are read as YAML, others as
    /// JSON or else YAML; `-` reads standard input.
    file: String,
    /// Then wait until the run is over, as `taskfleet run wait` does.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this long (exit code 2).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, requires = "wait")]
    timeout: Duration,
}

/// Arguments of `taskfleet run show`.
#[derive(clap::Args)]
pub struct ShowArgs {
    /// Run id.
    id: Uuid,
    /// Print the coordinator's answer (the RunView) as JSON instead of drawing it.
    #[arg(long)]
    json: bool,
    /// Tasks listed at most, oldest first (default: the coordinator's, 1000; at most 5000).
    /// Totals always cover every task.
    #[arg(long)]
    tasks: Option<u32>,
}

/// Arguments of `taskfleet run wait`.
#[derive(clap::Args)]
pub struct WaitArgs {
    /// Run id.
    id: Uuid,
    /// Give up after this long (exit code 2).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Arguments of `taskfleet run ls`.
#[derive(clap::Args)]
pub struct ListArgs {
    /// Only runs in this state (`running`, `succeeded`, `failed`, `cancelled`).
    #[arg(long, value_parser = parse_run_state)]
    state: Option<RunState>,
    /// Most runs listed.
    #[arg(long, default_value_t = 20)]
    limit: u32,
}

fn parse_run_state(s: &str) -> Result<RunState, String> {
    RunState::parse(s).ok_or_else(|| format!("{s:?} is not one of running, succeeded, failed, cancelled"))
}

/// `run ls`: one line per run, newest first: id, state, tasks done of all, age, name.
pub async fn list(fleet: &Fleet, args: ListArgs) -> anyhow::Result<i32> {
    let runs: Vec<taskfleet_proto::RunSummary> = fleet
        .api(
            taskfleet_proto::VERB_RUN_LIST,
            &taskfleet_proto::RunListRequest { state: args.state, limit: Some(args.limit) },
        )
        .await?;
    let now = taskfleet_proto::now_ms();
    println!("{:<36}  {:<9}  {:>13}  {:>9}  name", "run", "state", "tasks done", "age");
    for r in runs {
        let age = humantime::format_duration(Duration::from_secs(now.saturating_sub(r.created_at) / 1000));
        let done = format!("{}/{}", r.tasks.saturating_sub(r.remaining), r.tasks);
        println!(
            "{:<36}  {:<9}  {:>13}  {:>9}  {}",
            r.id,
            r.state.as_str(),
            done,
            age.to_string(),
            r.name.unwrap_or_default()
        );
    }
    Ok(0)
}

/// Arguments of `taskfleet run cancel` and `taskfleet run resume`.
#[derive(clap::Args)]
pub struct IdArgs {
    /// Run id.
    id: Uuid,
}

/// `run submit`: reads the run, submits it, prints the run id and then each node's task id;
/// with `--wait`, then waits as [`wait`] does and exits with its code.
pub async fn submit(fleet: &Fleet, args: SubmitArgs) -> anyhow::Result<i32> {
    let spec = read_spec(&args.file)?;
    let submitted: RunSubmitted = fleet.api(VERB_RUN_SUBMIT, &spec).await?;
    println!("{}", submitted.run_id);
    let width = submitted.tasks.keys().map(|n| n.chars().count()).max().unwrap_or(0);
    for (node, task) in &submitted.tasks {
        println!("{node:<width$}  {task}");
    }
    if submitted.duplicate {
        eprintln!("run {} exists already: nothing new was created", submitted.run_id);
    }
    if !args.wait {
        return Ok(0);
    }
    wait(fleet, WaitArgs { id: submitted.run_id, timeout: args.timeout }).await
}

/// `run show`: the run drawn as text (see [`draw`]), or its RunView as JSON with `--json`.
pub async fn show(fleet: &Fleet, args: ShowArgs) -> anyhow::Result<i32> {
    let view: RunView = fleet.api(VERB_RUN_GET, &RunGetRequest { id: args.id, tasks: args.tasks }).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", draw(&view));
    }
    Ok(0)
}

/// `run wait`: polls `run.get` until the run is not `running`, then prints its state line
/// (standard error) and its output as JSON (standard output). Exit code 0 if it succeeded, 1 if
/// it failed or was cancelled, 2 if it is still running after the timeout.
pub async fn wait(fleet: &Fleet, args: WaitArgs) -> anyhow::Result<i32> {
    let Some(view) = fleet.wait_run(args.id, args.timeout).await? else {
        eprintln!("run {} is still running after {}", args.id, humantime::format_duration(args.timeout));
        return Ok(2);
    };
    eprint!("{}", header(&view, taskfleet_proto::now_ms(), false));
    println!("{}", serde_json::to_string_pretty(&view.output)?);
    Ok(if view.state == RunState::Succeeded { 0 } else { 1 })
}

/// `run cancel`: prints the coordinator's RunChange as JSON.
pub async fn cancel(fleet: &Fleet, args: IdArgs) -> anyhow::Result<i32> {
    let change: RunChange = fleet.api(VERB_RUN_CANCEL, &RunIdRequest { id: args.id }).await?;
    println!("{}", serde_json::to_string_pretty(&change)?);
    if change.previous.is_final() {
        eprintln!("run {} was already {}: nothing changed", args.id, change.previous.as_str());
    }
    Ok(0)
}

/// `run resume`: prints the coordinator's RunChange as JSON. A run that is neither failed nor
/// cancelled is refused by the coordinator (an error, exit code 1).
pub async fn resume(fleet: &Fleet, args: IdArgs) -> anyhow::Result<i32> {
    let change: RunChange = fleet.api(VERB_RUN_RESUME, &RunIdRequest { id: args.id }).await?;
    println!("{}", serde_json::to_string_pretty(&change)?);
    Ok(0)
}
