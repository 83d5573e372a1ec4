//! Helpers for the end-to-end tests: a fleet of real taskfleet processes in a private
//! [`TestEnv`], and ways to submit to it and watch Postgres.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use taskfleet_bus::send_submission;
use taskfleet_proto::{Role, Subjects, TaskEnvelope};
use taskfleet_test_support::{FleetProcess, TestEnv, free_port, role_password};
pub use taskfleet_test_support::{HttpAnswer, http_request};

/// Coordinator and workers started against one private environment. Processes are killed
/// and the environment removed when it drops.
pub struct Fleet {
    /// The services and namespaces.
    pub env: TestEnv,
    /// The coordinator, once started.
    pub coordinator: Option<FleetProcess>,
    /// Address of the coordinator's HTTP endpoints.
    pub coordinator_http: String,
    /// Workers started so far.
    pub workers: Vec<FleetProcess>,
    /// Address of the HTTP endpoints of each worker started, in start order (a test that
    /// removes a process from `workers` leaves this list as it is).
    pub worker_http: Vec<String>,
    /// The aggregator, once started.
    pub aggregator: Option<FleetProcess>,
    /// Address of the aggregator's HTTP endpoints.
    pub aggregator_http: String,
    extra: Vec<(String, String)>,
}

impl Fleet {
    /// A fleet with nothing started yet.
    pub fn new(test: &str) -> Fleet {
        Fleet {
            env: TestEnv::new(test),
            coordinator: None,
            coordinator_http: format!("127.0.0.1:{}", free_port()),
            workers: Vec::new(),
            worker_http: Vec::new(),
            aggregator: None,
            aggregator_http: format!("127.0.0.1:{}", free_port()),
            extra: Vec::new(),
        }
    }

    /// Adds an environment variable for every process started afterwards.
    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.extra.push((key.to_string(), value.to_string()));
        self
    }

    /// Points every process started afterwards (and [`TestEnv::pg_pool`]) at another Postgres
    /// server, e.g. a private [`taskfleet_test_support::PgCluster`] that the test may stop.
    pub fn use_database(&mut self, url: &str) -> &mut Self {
        self.env.database_url = url.to_string();
        self
    }

    /// Points every process started afterwards (and [`Fleet::nats`]) at other NATS servers,
    /// e.g. a [`taskfleet_test_support::cluster::NatsCluster`]: one URL or a comma-separated list.
    pub fn use_nats(&mut self, url: &str) -> &mut Self {
        self.env.nats.url = url.to_string();
        self
    }

    fn env_with(&self, more: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = self.env.fleet_env();
        env.extend(self.extra.iter().cloned());
        env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    /// Starts the coordinator and waits until it is ready.
    pub fn start_coordinator(&mut self) {
        self.start_coordinator_on("127.0.0.1", &[]);
    }

    /// Starts the coordinator listening on `host` (e.g. `0.0.0.0`) at the port of
    /// [`Fleet::coordinator_http`], and waits until it is ready there (on 127.0.0.1).
    pub fn start_coordinator_on(&mut self, host: &str, more: &[(&str, &str)]) {
        let port = self.coordinator_http.rsplit_once(':').map(|(_, p)| p.to_string()).unwrap_or_default();
        let bind = format!("{host}:{port}");
        let mut all = vec![("TASKFLEET_COORDINATOR_HTTP_ADDR", bind.as_str())];
        all.extend_from_slice(more);
        let mut p = FleetProcess::spawn("taskfleet-coordinator", &[], &self.env_with(&all));
        p.wait_http_ok(&self.coordinator_http, "/readyz", Duration::from_secs(60));
        self.coordinator = Some(p);
    }

    /// Starts the aggregator and waits until it is ready.
    pub fn start_aggregator(&mut self) {
        let env = self.env_with(&[("TASKFLEET_AGGREGATOR_HTTP_ADDR", self.aggregator_http.as_str())]);
        let mut p = FleetProcess::spawn("taskfleet-aggregator", &[], &env);
        p.wait_http_ok(&self.aggregator_http, "/readyz", Duration::from_secs(60));
        self.aggregator = Some(p);
    }

    /// The aggregator's `/v1/stats` snapshot.
    pub fn stats(&self) -> serde_json::Value {
        match taskfleet_test_support::http_get(&self.aggregator_http, "/v1/stats") {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
            _ => serde_json::Value::Null,
        }
    }

    /// Starts a worker with extra settings and waits until it is ready.
    pub fn start_worker(&mut self, more: &[(&str, &str)]) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut all = vec![("TASKFLEET_WORKER_HTTP_ADDR", addr.as_str())];
        all.extend_from_slice(more);
        let env = self.env_with(&all);
        let mut p = FleetProcess::spawn("taskfleet-worker", &[], &env);
        p.wait_http_ok(&addr, "/readyz", Duration::from_secs(60));
        self.workers.push(p);
        self.worker_http.push(addr);
    }

    /// Subject names of this fleet.
    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.env.subject_prefix, &self.env.stream_prefix)
    }

    /// A NATS client for the fleet's server (any of them, when the URL is a list).
    pub async fn nats(&self) -> async_nats::Client {
        let servers: Vec<&str> = self.env.nats.url.split(',').map(str::trim).collect();
        let options = match self.env.nats.has_authorization() {
            true => async_nats::ConnectOptions::with_user_and_password("admin".into(), role_password(Role::Admin)),
            false => async_nats::ConnectOptions::new(),
        };
        options.connect(servers).await.expect("connect to test NATS")
    }

    /// Publishes envelopes to their queues' submit subjects and waits for every JetStream ack.
    pub async fn submit_all(&self, client: &async_nats::Client, envs: &[TaskEnvelope]) {
        let js = async_nats::jetstream::new(client.clone());
        let subjects = self.subjects();
        let mut acks = Vec::with_capacity(envs.len());
        for env in envs {
            let sent = send_submission(&js, &subjects, env, async_nats::HeaderMap::new()).await;
            acks.push(sent.expect("publish submission"));
            if acks.len() >= 1000 {
                for a in acks.drain(..) {
                    a.stored().await.expect("submission stored");
                }
            }
        }
        for a in acks {
            a.stored().await.expect("submission stored");
        }
    }

    /// Task counts by state in Postgres.
    pub async fn counts(&self, pool: &sqlx::PgPool) -> BTreeMap<String, i64> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
        rows.into_iter().collect()
    }

    /// Waits until `n` tasks are in a final state, or panics with the counts and logs.
    pub async fn wait_final(&self, pool: &sqlx::PgPool, n: i64, timeout: Duration) -> BTreeMap<String, i64> {
        let deadline = Instant::now() + timeout;
        loop {
            let counts = self.counts(pool).await;
            let done: i64 = ["succeeded", "failed", "dead", "cancelled"].iter().filter_map(|s| counts.get(*s)).sum();
            if done >= n {
                return counts;
            }
            if Instant::now() > deadline {
                panic!("only {done} of {n} tasks final after {timeout:?}: {counts:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The tail of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in self.coordinator.iter().chain(self.workers.iter()).chain(self.aggregator.iter()) {
            let log = p.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("--- {} ---\n", p.name));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Sends one request to the coordinator's API and returns its JSON reply (or error body).
    pub async fn api(&self, client: &async_nats::Client, verb: &str, body: &serde_json::Value) -> serde_json::Value {
        let subject = self.subjects().api(verb);
        let asking = client.request(subject, serde_json::to_vec(body).expect("encode request").into());
        let msg = tokio::time::timeout(Duration::from_secs(30), asking)
            .await
            .expect("API answer in time")
            .expect("API request");
        serde_json::from_slice(&msg.payload).expect("JSON reply")
    }

    /// Submits a run; returns its id and its node → task id map.
    pub async fn submit_run(
        &self,
        client: &async_nats::Client,
        spec: serde_json::Value,
    ) -> (uuid::Uuid, BTreeMap<String, uuid::Uuid>) {
        let reply = self.api(client, "run.submit", &spec).await;
        let run_id = reply["run_id"].as_str().and_then(|s| s.parse().ok());
        let tasks = serde_json::from_value(reply["tasks"].clone()).ok();
        match (run_id, tasks) {
            (Some(id), Some(tasks)) => (id, tasks),
            _ => panic!("run.submit refused: {reply}"),
        }
    }

    /// Waits until a run is no longer `running`; returns its view (`run.get`).
    pub async fn wait_run(&self, client: &async_nats::Client, id: uuid::Uuid, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.api(client, "run.get", &serde_json::json!({ "id": id })).await;
            if view["state"] != "running" {
                return view;
            }
            if Instant::now() > deadline {
                panic!("run {id} still running after {timeout:?}: {view}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the `taskfleet` CLI against this fleet.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let bin = taskfleet_test_support::target_dir().join("taskfleet");
        let env = self.env_with(&[]);
        let login = taskfleet_test_support::role_credentials("taskfleet", &env);
        std::process::Command::new(bin).args(args).envs(env).envs(login).output().expect("run taskfleet CLI")
    }
}

/// An `http` task searching `query` through the provider (or chain) named `search`, with 5
/// attempts and a short backoff.
pub fn search(query: &str) -> TaskEnvelope {
    let mut t = TaskEnvelope::new(
        "http",
        serde_json::json!({ "provider": "search", "method": "POST", "path": "/v1/search", "json": { "query": query } }),
    );
    t.max_attempts = 5;
    t.retry = Some(taskfleet_proto::RetryBackoff { base_ms: 20, factor: 2.0, max_ms: 100 });
    t
}
