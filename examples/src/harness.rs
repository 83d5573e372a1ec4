//! What every example needs: the fleet it runs on (found as the CLI finds it, from `TASKFLEET_*`
//! variables or `TASKFLEET_CONFIG`), a worker of its own with the example's handlers, stand-in
//! APIs (`taskfleet-mock-api`, in process), runs submitted and awaited, and the figures it prints.
//!
//! Each example takes tasks from a queue of its own (`ex-<name>`), so the fleet's other workers
//! never see its kinds, and keeps its caches and limits under a Redis key prefix of its own,
//! fresh for every invocation, so its figures do not depend on an earlier run's cache.

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use taskfleet_config::Config;
use taskfleet_mock_api::{Behaviour, MockApi, MockConfig, RunningMock, Stats};
use taskfleet_proto::{ApiErrorBody, RunGetRequest, RunSpec, RunState, RunView, Subjects, VERB_RUN_GET};
use taskfleet_worker::Worker;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How an example is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A small, fast run (the end-to-end tests use it): per-minute limits become per-second,
    /// latencies shrink, fewer runs; the output says so.
    pub quick: bool,
}

impl Options {
    /// What "a minute" of a stated limit is in this run: 60 s, or 1 s when quick.
    pub fn minute(&self) -> Duration {
        if self.quick { Duration::from_secs(1) } else { Duration::from_secs(60) }
    }

    /// A stated latency in this run: as stated, or a tenth when quick.
    pub fn latency_ms(&self, stated: u64) -> u64 {
        if self.quick { (stated / 10).max(1) } else { stated }
    }

    /// `full` normally, `quick` in a quick run.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// One row of the table `make examples` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// The workload.
    pub workload: String,
    /// What is measured.
    pub figure: String,
    /// What it must be.
    pub target: String,
    /// What it was.
    pub measured: String,
    /// Whether it met the target.
    pub pass: bool,
}

impl Figure {
    /// A row.
    pub fn new(
        workload: &str,
        figure: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        pass: bool,
    ) -> Figure {
        Figure {
            workload: workload.to_string(),
            figure: figure.into(),
            target: target.into(),
            measured: measured.into(),
            pass,
        }
    }
}

/// Prints rows as a Markdown table.
pub fn print_table(rows: &[Figure]) {
    println!("| workload | figure | target | measured | pass |");
    println!("|---|---|---|---|---|");
    for r in rows {
        let pass = if r.pass { "yes" } else { "NO" };
        println!("| {} | {} | {} | {} | {pass} |", r.workload, r.figure, r.target, r.measured);
    }
}

/// The fleet an example runs on.
pub struct Fleet {
    /// The configuration found in the environment (NATS, Postgres and Redis of the fleet).
    pub base: Config,
    /// A connection to its NATS.
    pub client: async_nats::Client,
    /// Its subject names.
    pub subjects: Subjects,
}

impl Fleet {
    /// Connects to the fleet named by the environment.
    pub async fn connect() -> anyhow::Result<Fleet> {
        let base = Config::load().context("reading the fleet's configuration")?;
        let client = taskfleet_bus::connect(&base.nats, "taskfleet-examples", Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the fleet's NATS (is `make dev` running?): {e}"))?;
        let subjects = base.subjects();
        Ok(Fleet { base, client, subjects })
    }

    /// The configuration of `example`'s worker: the fleet's connections (from the environment),
    /// a queue and Redis key prefix of its own, and the example's `settings`, given as the
    /// documented `TASKFLEET_*` variables (so they are parsed and validated as a deployment's).
    pub fn worker_config(&self, example: &str, settings: &[(&str, String)]) -> anyhow::Result<Config> {
        let run = Uuid::now_v7().simple().to_string();
        let mut env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("TASKFLEET_")).collect();
        env.push(("TASKFLEET_WORKER_QUEUES".into(), queue(example)));
        env.push(("TASKFLEET_WORKER_ID".into(), format!("ex-{example}-{}", std::process::id())));
        env.push((
            "TASKFLEET_REDIS_KEY_PREFIX".into(),
            format!("{}ex:{example}:{}:", self.base.redis.key_prefix, &run[run.len() - 8..]),
        ));
        env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let file = std::env::var_os("TASKFLEET_CONFIG").map(std::path::PathBuf::from);
        Config::load_from(file.as_deref(), env).with_context(|| format!("the {example} example's worker settings"))
    }

    /// Starts a worker in this process; it runs until [`WorkerHandle::stop`].
    pub fn spawn_worker(&self, worker: Worker) -> WorkerHandle {
        let stop = CancellationToken::new();
        let (client, token) = (self.client.clone(), stop.clone());
        let join = tokio::spawn(async move { worker.run(client, token).await.map_err(|e| anyhow::anyhow!("{e}")) });
        WorkerHandle { stop, join }
    }

    /// Submits a run; returns once it is committed.
    pub async fn submit(&self, spec: &RunSpec) -> anyhow::Result<Uuid> {
        let submitted = taskfleet_bus::submit_run(&self.client, &self.subjects, spec, Duration::from_secs(30)).await?;
        Ok(submitted.run_id)
    }

    /// The run's view (`run.get`) with at most `tasks` of its tasks.
    pub async fn get(&self, id: Uuid, tasks: u32) -> anyhow::Result<RunView> {
        let body = serde_json::to_vec(&RunGetRequest { id, tasks: Some(tasks) })?;
        let asking = self.client.request(self.subjects.api(VERB_RUN_GET), body.into());
        let reply = tokio::time::timeout(Duration::from_secs(10), asking)
            .await
            .context("no answer to run.get (is a coordinator running?)")??;
        if let Some(e) = ApiErrorBody::parse(&reply.payload) {
            bail!("run.get {id}: {}", e.message);
        }
        Ok(serde_json::from_slice(&reply.payload)?)
    }

    /// Waits until the run has ended; returns its view with (up to 5,000 of) its tasks.
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> anyhow::Result<RunView> {
        let deadline = Instant::now() + timeout;
        let mut sub = self.client.subscribe(self.subjects.run_ended(&id)).await?;
        loop {
            if self.get(id, 0).await?.state != RunState::Running {
                return self.get(id, 5000).await;
            }
            if Instant::now() > deadline {
                bail!("run {id} still running after {timeout:?}");
            }
            // The end notice, or a look again in a while (a notice can be missed).
            let _ = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut sub)).await;
        }
    }

    /// Submits every spec at once and waits for all of them; each view with its duration
    /// (creation to end, as the coordinator recorded them).
    pub async fn run_all(&self, specs: &[RunSpec], timeout: Duration) -> anyhow::Result<Vec<(RunView, Duration)>> {
        let ids = futures::future::try_join_all(specs.iter().map(|s| self.submit(s))).await?;
        let views = futures::future::try_join_all(ids.iter().map(|id| self.wait(*id, timeout))).await?;
        Ok(views.into_iter().map(|v| (v.clone(), run_duration(&v))).collect())
    }
}

/// Creation to end of a finished run.
pub fn run_duration(v: &RunView) -> Duration {
    Duration::from_millis(v.finished_at.unwrap_or(v.created_at).saturating_sub(v.created_at))
}

/// The queue of an example.
pub fn queue(example: &str) -> String {
    format!("ex-{example}")
}

/// A worker started by [`Fleet::spawn_worker`].
pub struct WorkerHandle {
    stop: CancellationToken,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl WorkerHandle {
    /// Drains and stops the worker.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.join.await?
    }
}

/// The stand-in APIs of an example, by provider name.
#[derive(Default)]
pub struct Mocks {
    running: BTreeMap<String, RunningMock>,
}

impl Mocks {
    /// Starts a mock provider `name` on a free port; returns its base URL for
    /// `providers.urls` (`…/v1`).
    pub async fn start(&mut self, name: &str, behaviour: Behaviour) -> anyhow::Result<String> {
        let addr = "127.0.0.1:0".parse()?;
        let mock = MockApi::start(MockConfig { addr, name: name.to_string(), seed: 7, behaviour }).await?;
        let url = format!("{}/v1", mock.url());
        self.running.insert(name.to_string(), mock);
        Ok(url)
    }

    /// A provider's counters.
    pub fn stats(&self, name: &str) -> Stats {
        match self.running.get(name) {
            Some(m) => m.stats(),
            None => panic!("no mock named {name}"),
        }
    }

    /// The running mock `name`.
    pub fn get(&self, name: &str) -> &RunningMock {
        match self.running.get(name) {
            Some(m) => m,
            None => panic!("no mock named {name}"),
        }
    }

    /// Stops every mock.
    pub async fn shutdown(self) {
        for (_, m) in self.running {
            let _ = m.shutdown().await;
        }
    }
}

/// A mock behaviour with this latency (and a tenth of it as jitter).
pub fn latency(ms: u64) -> Behaviour {
    Behaviour { latency_ms: ms, jitter_ms: ms / 10, ..Behaviour::default() }
}

/// `p` (0..=100) percentile of `values`, nearest rank; 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A chat request of one user message.
pub fn chat_request(model: &str, prompt: String) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": prompt }] })
}

/// The text of a chat answer (`Providers::chat`'s result).
pub fn answer_text(answer: &Value) -> String {
    answer.get("content").and_then(Value::as_str).unwrap_or_default().to_string()
}

/// The strings of a JSON array (none when it is not one).
pub fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Seconds with two decimals.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 95.0), 95.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn quick_runs_scale_minutes_and_latencies() {
        let quick = Options { quick: true };
        assert_eq!(quick.minute(), Duration::from_secs(1));
        assert_eq!(quick.latency_ms(300), 30);
        assert_eq!(Options::default().latency_ms(300), 300);
    }
}
