//! The taskfleet benchmark workload on apalis 0.7 with its Redis storage (`apalis-redis`): N no-op
//! jobs pushed concurrently over one multiplexed connection (pipelined), run by W worker
//! processes (this binary with `--worker`) of concurrency C, until every job is completed, i.e.
//! acknowledged by apalis into Redis: the job moved to the namespace's `done` set and its result
//! stored in its `data::result` hash, both kept (apalis keeps them by default). Prints one JSON
//! line on stdout, everything else goes to stderr:
//! {"system":"apalis","tasks":N,"seconds":S,"tasks_per_s":R,"p50_ms":..,"p99_ms":..}
//!
//! Latency is job creation (producer, wall clock) to completion: the moment Redis answered the
//! worker's `done_job` script for that job (worker, wall clock). The workers see that moment by
//! wrapping apalis' Redis connection; the job's result is its payload, which carries the
//! creation time.
//!
//!   apalis-bench --redis redis://127.0.0.1:6390 --tasks 100000 --workers 2 --concurrency 64

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::*;
use apalis_redis::{Config, ConnectionManager, RedisStorage};
use futures::stream::{self, StreamExt};
use redis::aio::ConnectionLike;
use redis::{Arg, Cmd, Pipeline, RedisFuture, Value};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    i: u64,
    /// Creation time, µs since the Unix epoch.
    t0: u64,
}

#[derive(Serialize)]
struct Output {
    system: &'static str,
    tasks: u64,
    completed: usize,
    seconds: f64,
    tasks_per_s: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

struct Args {
    redis: String,
    tasks: u64,
    workers: usize,
    concurrency: usize,
    buffer_size: usize,
    poll_ms: u64,
    namespace: String,
    worker: bool,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let get = |name: &str, dflt: &str| -> String {
        argv.iter()
            .position(|a| a == &format!("--{name}"))
            .and_then(|i| argv.get(i + 1).cloned())
            .unwrap_or_else(|| dflt.to_string())
    };
    let concurrency: usize = get("concurrency", "64").parse().expect("--concurrency");
    Args {
        redis: get("redis", "redis://127.0.0.1:6379"),
        tasks: get("tasks", "100000").parse().expect("--tasks"),
        workers: get("workers", "2").parse().expect("--workers"),
        concurrency,
        // Jobs fetched per poll; the prefetch that lets one worker keep `concurrency` jobs busy.
        buffer_size: get("buffer-size", &concurrency.to_string()).parse().expect("--buffer-size"),
        poll_ms: get("poll-ms", "10").parse().expect("--poll-ms"),
        namespace: get("namespace", &format!("apalis-bench-{}", std::process::id())),
        worker: argv.iter().any(|a| a == "--worker"),
    }
}

fn config(args: &Args) -> Config {
    Config::default()
        .set_namespace(&args.namespace)
        .set_buffer_size(args.buffer_size)
        .set_poll_interval(Duration::from_millis(args.poll_ms))
}

/// apalis' Redis connection, unchanged, except that a successful `done_job` script (the ack that
/// moves a job to the done set and stores its result) records the job's latency.
#[derive(Clone)]
struct Observed {
    inner: ConnectionManager,
    latencies: Arc<Mutex<Vec<u64>>>,
}

/// The job's result (its payload, JSON) if `cmd` is apalis' `done_job` script:
/// EVALSHA|EVAL <sha|body> 3 <inflight> <ns>:done <ns>:data <task id> <now> <result>.
fn done_job_result(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            Arg::Simple(s) => Some(s),
            Arg::Cursor => None,
        })
        .collect();
    let name = args.first()?;
    if !(name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL")) {
        return None;
    }
    if args.len() != 9 || args[2] != b"3" || !args[4].ends_with(b":done") {
        return None;
    }
    Some(args[8].to_vec())
}

impl ConnectionLike for Observed {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let res = self.inner.req_packed_command(cmd).await;
            if let Ok(Value::Int(1)) = res {
                if let Some(result) = done_job_result(cmd) {
                    let done = now_us();
                    // apalis 0.7 stores the result JSON-encoded twice: the handler's output
                    // encoded by the ack layer, then those bytes encoded again by the storage.
                    let inner = serde_json::from_slice::<Vec<u8>>(&result).unwrap_or(result);
                    match serde_json::from_slice::<Job>(&inner) {
                        Ok(job) => self.latencies.lock().unwrap().push(done.saturating_sub(job.t0)),
                        Err(e) => eprintln!("apalis worker: unexpected job result: {e}"),
                    }
                }
            }
            res
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.inner.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

async fn echo(job: Job) -> Result<Job, Error> {
    Ok(job)
}

/// Worker process: one apalis worker of concurrency C; every 20 ms, writes the latencies (µs) of
/// the jobs completed since on one stdout line. Exits when stdin closes.
async fn worker(args: Args) {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let conn = Observed {
        inner: apalis_redis::connect(args.redis.as_str()).await.expect("redis connect"),
        latencies: latencies.clone(),
    };
    let storage: RedisStorage<Job, Observed> = RedisStorage::new_with_config(conn, config(&args));
    let w = WorkerBuilder::new(format!("bench-worker-{}", std::process::id()))
        .concurrency(args.concurrency)
        .backend(storage)
        .build_fn(echo);
    let monitor = Monitor::new()
        .register(w)
        .on_event(|e| {
            if let Event::Error(err) = e.inner() {
                // At startup each apalis-redis worker re-enqueues the jobs of consumers seen before
                // "now", which unregisters the workers that started a moment earlier; their next
                // poll fails once with this error and registers them again. Nothing is lost.
                let note = if err.to_string().contains("consumer not registered") {
                    " (benign: a sibling worker's startup unregistered this one; it registers again)"
                } else {
                    ""
                };
                eprintln!("apalis worker: {err}{note}");
            }
        })
        .run_with_signal(async {
            let mut buf = [0u8; 64];
            while let Ok(n) = tokio::io::stdin().read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            Ok(())
        });
    let reporter = async {
        let mut out = tokio::io::stdout();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let batch = std::mem::take(&mut *latencies.lock().unwrap());
            if batch.is_empty() {
                continue;
            }
            let mut line = String::with_capacity(batch.len() * 8);
            for l in batch {
                line.push_str(&l.to_string());
                line.push(' ');
            }
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        r = monitor => if let Err(e) = r { eprintln!("apalis worker: {e}") },
        _ = reporter => {},
    }
    std::process::exit(0);
}

async fn driver(args: Args) {
    let conn = apalis_redis::connect(args.redis.as_str()).await.expect("redis connect");
    let storage: RedisStorage<Job> = RedisStorage::new_with_config(conn.clone(), config(&args));
    let exe = std::env::current_exe().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
    let mut children = Vec::new();
    for _ in 0..args.workers {
        let mut child = tokio::process::Command::new(&exe)
            .args(["--worker", "--redis", &args.redis, "--namespace", &args.namespace])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--buffer-size", &args.buffer_size.to_string()])
            .args(["--poll-ms", &args.poll_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let batch: Vec<u64> = line.split_ascii_whitespace().map(|s| s.parse().unwrap()).collect();
                if tx.send(batch).is_err() {
                    return;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let start = now_us();
    let producer = {
        let storage = storage.clone();
        let tasks = args.tasks;
        tokio::spawn(async move {
            // Up to 1000 pushes in flight on the multiplexed connection: pipelined.
            stream::iter(0..tasks)
                .map(|i| {
                    let mut s = storage.clone();
                    async move { s.push(Job { i, t0: now_us() }).await }
                })
                .buffer_unordered(1000)
                .for_each(|r| async move {
                    r.expect("push");
                })
                .await;
            eprintln!("apalis: {tasks} jobs pushed in {:.1}s", (now_us() - start) as f64 / 1e6);
        })
    };

    let mut latencies: Vec<u64> = Vec::with_capacity(args.tasks as usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    let mut last_progress = tokio::time::Instant::now();
    while (latencies.len() as u64) < args.tasks {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(batch)) => latencies.extend(batch),
            Ok(None) => {
                eprintln!("apalis: every worker exited");
                break;
            }
            Err(_) => {
                eprintln!("apalis: timed out");
                break;
            }
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            eprintln!("apalis: {} of {} completed", latencies.len(), args.tasks);
            last_progress = tokio::time::Instant::now();
        }
    }
    let seconds = (now_us() - start) as f64 / 1e6;
    producer.await.unwrap();
    for c in &mut children {
        drop(c.stdin.take());
    }
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }

    let mut redis = conn.clone();
    let done: i64 =
        redis::cmd("ZCARD").arg(storage.get_config().done_jobs_set()).query_async(&mut redis).await.unwrap_or(-1);
    eprintln!("apalis: {} completions reported, {done} jobs in the done set", latencies.len());
    // Clean up this run's keys (as bench.mjs obliterates its queue).
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{}*", args.namespace)).query_async(&mut redis).await.unwrap_or_default();
    for k in keys {
        let _: Result<(), _> = redis::cmd("UNLINK").arg(k).query_async(&mut redis).await;
    }

    latencies.sort_unstable();
    let n = latencies.len();
    let pct = |p: f64| {
        if n == 0 {
            None
        } else {
            Some(latencies[((n as f64 * p) as usize).min(n - 1)] as f64 / 1000.0)
        }
    };
    let out = Output {
        system: "apalis",
        tasks: args.tasks,
        completed: n,
        seconds,
        tasks_per_s: n as f64 / seconds,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    };
    println!("{}", serde_json::to_string(&out).unwrap());
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    if args.worker {
        worker(args).await
    } else {
        driver(args).await
    }
}
