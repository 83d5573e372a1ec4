//! Traces end to end: the CLI, the coordinator and the worker export their spans over OTLP/HTTP
//! to a receiver in this test, and one task's spans, from all three services, form one trace
//! with the right parent/child tree, including the child tasks a handler submits and every
//! retry of a failing task; a trace the client's sampler drops is dropped everywhere.

use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value as AnyValueKind};
use prost::Message;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Rec {
    service: String,
    name: String,
    trace: String,
    id: String,
    /// Empty for a root span.
    parent: String,
    attrs: HashMap<String, String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    status: i32,
}

impl Rec {
    fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map(String::as_str).unwrap_or("")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_str(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValueKind::StringValue(s)) => s.clone(),
        Some(AnyValueKind::IntValue(i)) => i.to_string(),
        Some(AnyValueKind::BoolValue(b)) => b.to_string(),
        Some(AnyValueKind::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), value_str(kv.value.as_ref()))).collect()
}

/// A local OTLP/HTTP trace receiver: `POST /v1/traces` with protobuf bodies.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Rec>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Rec>>> = Default::default();
        let store = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: bytes::Bytes| {
                let store = store.clone();
                async move {
                    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                        return (StatusCode::BAD_REQUEST, Vec::new());
                    };
                    let mut got = Vec::new();
                    for rs in req.resource_spans {
                        let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
                        let service = resource.get("service.name").cloned().unwrap_or_default();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                got.push(Rec {
                                    service: service.clone(),
                                    name: s.name,
                                    trace: hex(&s.trace_id),
                                    id: hex(&s.span_id),
                                    parent: hex(&s.parent_span_id),
                                    attrs: attrs(&s.attributes),
                                    status: s.status.map(|st| st.code).unwrap_or(0),
                                });
                            }
                        }
                    }
                    if let Ok(mut all) = store.lock() {
                        all.extend(got);
                    }
                    (StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind OTLP receiver");
        let endpoint = format!("http://{}", listener.local_addr().expect("receiver address"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { endpoint, spans }
    }

    fn spans(&self) -> Vec<Rec> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The spans of `trace` as an indented tree, for failure messages.
fn tree(spans: &[Rec], trace: &str) -> String {
    let in_trace: Vec<&Rec> = spans.iter().filter(|s| s.trace == trace).collect();
    let ids: BTreeSet<&str> = in_trace.iter().map(|s| s.id.as_str()).collect();
    fn walk(out: &mut String, all: &[&Rec], node: &Rec, depth: usize) {
        out.push_str(&format!(
            "{}{} [{}] task={} {}\n",
            "  ".repeat(depth),
            node.name,
            node.service,
            node.attr("task_id"),
            ["attempt", "event", "outcome", "result", "deferred", "held"]
                .iter()
                .filter(|k| !node.attr(k).is_empty())
                .map(|k| format!("{k}={}", node.attr(k)))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        for c in all.iter().filter(|c| c.parent == node.id) {
            walk(out, all, c, depth + 1);
        }
    }
    let mut out = format!("trace {trace}: {} spans\n", in_trace.len());
    for root in in_trace.iter().filter(|s| !ids.contains(s.parent.as_str())) {
        walk(&mut out, &in_trace, root, 1);
    }
    out
}

/// Every span of the test, one line each, for failure messages when no trace was found.
fn dump(spans: &[Rec]) -> String {
    spans
        .iter()
        .map(|s| format!("{} [{}] trace={} id={} parent={} {:?}", s.name, s.service, s.trace, s.id, s.parent, s.attrs))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

/// The one span matching `pred`.
fn one<'a>(spans: &[&'a Rec], what: &str, pred: impl Fn(&Rec) -> bool) -> Result<&'a Rec, String> {
    let found: Vec<&&Rec> = spans.iter().filter(|s| pred(s)).collect();
    match found.as_slice() {
        [s] => Ok(s),
        [] => Err(format!("no {what} span yet")),
        more => Err(format!("{} {what} spans, expected one", more.len())),
    }
}

/// The root `task.submit` span of `task` and the spans of its trace; no span of any of
/// `tasks` may be outside it.
fn trace_of<'a>(spans: &'a [Rec], task: &str) -> Result<(&'a Rec, Vec<&'a Rec>), String> {
    let all: Vec<&Rec> = spans.iter().collect();
    let submit = one(&all, "task.submit", |s| s.name == "task.submit" && s.attr("task_id") == task)?;
    ensure(submit.service == "taskfleet", || format!("task.submit comes from {:?}", submit.service))?;
    ensure(submit.parent.is_empty(), || "task.submit is not a root span".into())?;
    let in_trace: Vec<&Rec> = spans.iter().filter(|s| s.trace == submit.trace).collect();
    Ok((submit, in_trace))
}

/// Checks the trace of a `fanout` task with two `echo` children (cache policy, one rate limit):
///
/// ```text
/// task.submit (taskfleet)
/// └ task.intake (coordinator)
///   └ task.run (worker)
///     ├ handler
///     │ ├ task.intake (child 1) ─ task.run ─ cache.lookup, rate_limit.wait, handler, task.record
///     │ └ task.intake (child 2) ─ task.run ─ … (a deferred run and the run that ran it)
///     └ task.record (coordinator)
/// ```
fn check_fanout(spans: &[Rec], parent_task: &str) -> Result<String, String> {
    let (submit, in_trace) = trace_of(spans, parent_task)?;
    let intake =
        one(&in_trace, "task.intake of the parent", |s| s.name == "task.intake" && s.attr("task_id") == parent_task)?;
    ensure(intake.service == "taskfleet-coordinator", || format!("task.intake from {:?}", intake.service))?;
    ensure(intake.parent == submit.id, || "task.intake is not a child of task.submit".into())?;
    let run = one(&in_trace, "task.run of the parent", |s| s.name == "task.run" && s.attr("task_id") == parent_task)?;
    ensure(run.service == "taskfleet-worker", || format!("task.run from {:?}", run.service))?;
    ensure(run.parent == intake.id, || "task.run is not a child of task.intake".into())?;
    ensure(run.attr("outcome") == "succeeded", || format!("parent task.run outcome {:?}", run.attr("outcome")))?;
    let handler = one(&in_trace, "handler of the parent", |s| s.name == "handler" && s.parent == run.id)?;
    let record =
        one(&in_trace, "task.record of the parent", |s| s.name == "task.record" && s.attr("task_id") == parent_task)?;
    ensure(record.service == "taskfleet-coordinator", || format!("task.record from {:?}", record.service))?;
    ensure(record.parent == run.id && record.attr("event") == "succeeded", || {
        format!("task.record (event {}) is not a child of task.run", record.attr("event"))
    })?;

    let children: Vec<&&Rec> = in_trace.iter().filter(|s| s.name == "task.intake" && s.parent == handler.id).collect();
    ensure(children.len() == 2, || {
        format!("{} child task.intake spans under the handler, expected 2", children.len())
    })?;
    let mut limit_waits = 0;
    for child in &children {
        let id = child.attr("task_id");
        let runs: Vec<&&Rec> = in_trace.iter().filter(|s| s.name == "task.run" && s.attr("task_id") == id).collect();
        ensure(!runs.is_empty(), || format!("no task.run of child {id} yet"))?;
        ensure(runs.iter().all(|r| r.parent == child.id), || {
            format!("a task.run of child {id} is not under its intake")
        })?;
        let ran: Vec<&&&Rec> = runs.iter().filter(|r| r.attr("outcome") == "succeeded").collect();
        ensure(ran.len() == 1, || format!("child {id}: {} task.run spans succeeded, expected 1", ran.len()))?;
        let ran = ran[0];
        one(&in_trace, "handler of a child", |s| s.name == "handler" && s.parent == ran.id)?;
        for r in &runs {
            let lookup =
                one(&in_trace, "cache.lookup of a child run", |s| s.name == "cache.lookup" && s.parent == r.id)?;
            ensure(lookup.attr("result") == "miss", || format!("cache.lookup result {:?}", lookup.attr("result")))?;
            if r.attr("deferred") == "true" {
                let wait = one(&in_trace, "rate_limit.wait of a deferred run", |s| {
                    s.name == "rate_limit.wait" && s.parent == r.id
                })?;
                ensure(wait.attr("deferred") == "true" && wait.attr("held") == "true", || {
                    format!("rate_limit.wait of a deferred run: {:?}", wait.attrs)
                })?;
            }
        }
        limit_waits +=
            in_trace.iter().filter(|s| s.name == "rate_limit.wait" && runs.iter().any(|r| r.id == s.parent)).count();
        let record = one(&in_trace, "task.record of a child", |s| s.name == "task.record" && s.attr("task_id") == id)?;
        ensure(record.parent == ran.id, || format!("child {id}: task.record is not under the run that succeeded"))?;
    }
    // Each child takes a token of the `children` limit: at least one wait per child.
    ensure(limit_waits >= 2, || format!("{limit_waits} rate_limit.wait spans under the children's runs"))?;

    let services: BTreeSet<&str> = in_trace.iter().map(|s| s.service.as_str()).collect();
    ensure(services == BTreeSet::from(["taskfleet", "taskfleet-coordinator", "taskfleet-worker"]), || {
        format!("services in the trace: {services:?}")
    })?;
    // One task = one trace: no span of these tasks anywhere else.
    let tasks: BTreeSet<&str> =
        children.iter().map(|c| c.attr("task_id")).chain([parent_task]).collect::<BTreeSet<_>>();
    let strays = spans.iter().filter(|s| tasks.contains(s.attr("task_id")) && s.trace != submit.trace).count();
    ensure(strays == 0, || format!("{strays} spans of these tasks outside their trace"))?;
    Ok(tree(spans, &submit.trace))
}

/// Checks that a run is one trace: a `run` span from the coordinator, and every `task.run` of
/// every task of the run (released, spawned or first) in its trace.
fn check_run(spans: &[Rec], run_id: &str, tasks: &[String]) -> Result<String, String> {
    let run =
        one(&spans.iter().collect::<Vec<_>>(), "the run span", |s| s.name == "run" && s.attr("run_id") == run_id)?;
    ensure(run.service == "taskfleet-coordinator", || format!("run span from {:?}", run.service))?;
    for task in tasks {
        let runs: Vec<&Rec> = spans.iter().filter(|s| s.name == "task.run" && s.attr("task_id") == task).collect();
        ensure(!runs.is_empty(), || format!("no task.run of task {task} yet"))?;
        ensure(runs.iter().all(|r| r.trace == run.trace), || {
            format!("a task.run of {task} is outside the run's trace")
        })?;
    }
    Ok(tree(spans, &run.trace))
}

/// Checks the trace of a task that fails retryably twice (`max_attempts` 2): both attempts are
/// `task.run` spans under the one `task.intake`, each with its recorded event under it.
fn check_retries(spans: &[Rec], task: &str) -> Result<String, String> {
    let (submit, in_trace) = trace_of(spans, task)?;
    let intake = one(&in_trace, "task.intake", |s| s.name == "task.intake" && s.attr("task_id") == task)?;
    ensure(intake.parent == submit.id, || "task.intake is not a child of task.submit".into())?;
    let mut runs: Vec<&&Rec> = in_trace.iter().filter(|s| s.name == "task.run").collect();
    ensure(runs.len() == 2, || format!("{} task.run spans, expected 2", runs.len()))?;
    runs.sort_by_key(|r| r.attr("attempt").to_string());
    for (run, (attempt, outcome)) in runs.iter().zip([("1", "retrying"), ("2", "dead")]) {
        ensure(run.parent == intake.id, || format!("attempt {attempt}: task.run is not under task.intake"))?;
        ensure(run.attr("attempt") == attempt && run.attr("outcome") == outcome && run.status == 2, || {
            format!("attempt {attempt}: {:?} status {}", run.attrs, run.status)
        })?;
        let record = one(&in_trace, "task.record", |s| s.name == "task.record" && s.attr("event") == outcome)?;
        ensure(record.parent == run.id, || format!("task.record of {outcome} is not under attempt {attempt}"))?;
    }
    Ok(tree(spans, &submit.trace))
}

/// Waits up to `timeout` for `check` to pass on the spans received so far.
async fn wait_for(
    receiver: &Receiver,
    fleet: &Fleet,
    timeout: Duration,
    check: impl Fn(&[Rec]) -> Result<String, String>,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let spans = receiver.spans();
        match check(&spans) {
            Ok(tree) => return tree,
            Err(e) if Instant::now() > deadline => {
                let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace.as_str()).collect();
                let trees: Vec<String> = traces.iter().map(|t| tree(&spans, t)).collect();
                panic!(
                    "{e} after {timeout:?}\n{}\n--- all spans ---\n{}\n{}",
                    trees.join("\n"),
                    dump(&spans),
                    fleet.logs()
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs `taskfleet submit … --wait` (the receiver keeps answering its exporter on the
/// runtime's other thread) and returns the exit code, the task id and the output.
fn submit(fleet: &Fleet, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    all.extend(["--wait", "--wait-timeout", "60s"]);
    let out = tokio::task::block_in_place(|| fleet.cli(&all));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = stdout.lines().next().and_then(|l| l.trim().parse::<uuid::Uuid>().ok()).unwrap_or_else(|| {
        panic!("no task id from the CLI: {stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), fleet.logs())
    });
    (out.status.code().unwrap_or(-1), id.to_string(), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_one_trace_across_services() {
    let receiver = Receiver::start().await;
    let mut fleet = Fleet::new("traces");
    fleet
        .set("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        // Export within 100 ms instead of the default 5 s.
        .set("OTEL_BSP_SCHEDULE_DELAY", "100")
        .set("TASKFLEET_POLICIES_CACHE", "echo=1m")
        // One token a second for the two children: one of them is deferred for its booked slot.
        .set("TASKFLEET_POLICIES_RATE_LIMITS", "children=1/s burst 1")
        .set("TASKFLEET_POLICIES_KIND_LIMITS", "echo=children")
        .set("TASKFLEET_WORKER_RETRY_BASE", "50ms")
        .set("TASKFLEET_WORKER_RETRY_MAX", "100ms");
    fleet.start_coordinator();
    fleet.start_worker(&[]);

    // A task that submits two children.
    let (code, parent, out) = submit(&fleet, &["--kind", "fanout", "--payload", r#"{"count": 2}"#]);
    assert_eq!(code, 0, "{out}\n{}", fleet.logs());
    let shown = wait_for(&receiver, &fleet, Duration::from_secs(15), |spans| check_fanout(spans, &parent)).await;
    println!("{shown}");

    // A run: its steps, released dependents and spawned children alike, are one trace under
    // the coordinator's `run` span.
    let file = std::env::temp_dir().join(format!("traced_run_{}.json", uuid::Uuid::now_v7()));
    let spec = r#"{"name": "traced", "nodes": [
        {"name": "plan", "kind": "echo"},
        {"name": "research", "kind": "spawn", "payload": {"count": 2, "kind": "sleep"}, "depends_on": ["plan"]},
        {"name": "write", "kind": "collect", "depends_on": ["research"]}]}"#;
    std::fs::write(&file, spec).expect("write the run file");
    let out = tokio::task::block_in_place(|| {
        fleet.cli(&["run", "submit", file.to_str().unwrap_or_default(), "--wait", "--timeout", "60s"])
    });
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", fleet.logs());
    let run_id = stdout.lines().next().unwrap_or_default().trim().to_string();
    let pool = fleet.env.pg_pool().await;
    let tasks: Vec<(uuid::Uuid,)> = sqlx::query_as("SELECT id FROM tasks WHERE run_id = $1::uuid")
        .bind(&run_id)
        .fetch_all(&pool)
        .await
        .expect("the run's tasks");
    let tasks: Vec<String> = tasks.into_iter().map(|(id,)| id.to_string()).collect();
    assert_eq!(tasks.len(), 6, "plan, research, two children, their join, write");
    let shown = wait_for(&receiver, &fleet, Duration::from_secs(15), |spans| check_run(spans, &run_id, &tasks)).await;
    println!("{shown}");

    // A task that fails retryably on both of its attempts.
    let (code, failing, out) =
        submit(&fleet, &["--kind", "sleep", "--payload", r#"{"fail": "retryable"}"#, "--max-attempts", "2"]);
    assert_eq!(code, 1, "the task should end dead: {out}\n{}", fleet.logs());
    let shown = wait_for(&receiver, &fleet, Duration::from_secs(15), |spans| check_retries(spans, &failing)).await;
    println!("{shown}");

    // A client whose sampler drops the trace: the services follow its decision (parent-based
    // sampling, the default) and export nothing for the task.
    fleet.set("OTEL_TRACES_SAMPLER", "always_off");
    let (code, dropped, out) = submit(&fleet, &["--kind", "echo", "--payload", r#"{"unsampled": true}"#]);
    assert_eq!(code, 0, "{out}\n{}", fleet.logs());
    // Long enough for the exporters (100 ms schedule) to ship anything they had.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leaked: Vec<Rec> = receiver.spans().into_iter().filter(|s| s.attr("task_id") == dropped).collect();
    assert!(leaked.is_empty(), "spans of an unsampled task were exported: {}", dump(&leaked));
}
