//! `taskfleet top`: the aggregator's live figures in the terminal, the same ones its dashboard
//! page shows. Reads `GET <aggregator>/v1/stats` every interval and redraws the screen.

use anyhow::{Context, anyhow};
use serde::Deserialize;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Placeholder for a figure the aggregator does not have (null or missing).
const DASH: &str = "-";

/// Arguments of `taskfleet top`.
#[derive(clap::Args)]
pub struct TopArgs {
    /// Base URL of the aggregator's HTTP endpoints.
    #[arg(long, env = "TASKFLEET_AGGREGATOR_URL", default_value = "http://127.0.0.1:9090")]
    aggregator: String,
    /// Print one frame and exit (exit code 1 if the aggregator cannot be read).
    #[arg(long)]
    once: bool,
    /// Print the raw `/v1/stats` snapshot as JSON instead of the tables (one line per refresh
    /// without `--once`).
    #[arg(long)]
    json: bool,
    /// Time between refreshes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

/// One `/v1/stats` answer. Every field is optional so that a partial or newer answer still renders.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// When the aggregator computed it, ms since the epoch.
    pub generated_at: Option<f64>,
    /// Length of the sliding window, seconds.
    pub window_s: Option<f64>,
    /// The whole fleet.
    pub fleet: Figures,
    /// Per queue, kind and priority.
    pub series: Vec<Series>,
    /// Workers seen recently.
    pub workers: Vec<WorkerRow>,
    /// Firing and recently resolved alerts.
    pub alerts: Vec<Alert>,
}

/// The figures of the fleet or of one series. Rates are over the window, `*_total` since start.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Figures {
    /// Final states per second.
    pub throughput_per_s: Option<f64>,
    /// Tasks in a final state.
    pub completed_total: Option<f64>,
    /// Succeeded tasks.
    pub succeeded_total: Option<f64>,
    /// Failed tasks.
    pub failed_total: Option<f64>,
    /// Dead tasks.
    pub dead_total: Option<f64>,
    /// Cancelled tasks.
    pub cancelled_total: Option<f64>,
    /// Retries.
    pub retries_total: Option<f64>,
    /// Results served from the cache.
    pub cache_hits_total: Option<f64>,
    /// (failed + dead) / final.
    pub error_rate: Option<f64>,
    /// Retrying events / attempts.
    pub retry_rate: Option<f64>,
    /// Cache hits / succeeded.
    pub cache_hit_rate: Option<f64>,
    /// Prompt and completion tokens.
    pub tokens_total: Option<Tokens>,
    /// Spend, USD.
    pub cost_usd_total: Option<f64>,
    /// Spend avoided by cache hits, USD.
    pub saved_usd_total: Option<f64>,
    /// Spend per final task over the window, USD.
    pub cost_per_task_usd: Option<f64>,
    /// Submit → started.
    pub queue_wait_ms: Option<Quantiles>,
    /// Started → finished.
    pub run_ms: Option<Quantiles>,
    /// Submit → final state.
    pub end_to_end_ms: Option<Quantiles>,
    /// Live workers (fleet only).
    pub workers: Option<f64>,
    /// In flight / capacity (fleet only).
    pub utilization: Option<f64>,
    /// Tasks running now (fleet only).
    pub in_flight: Option<f64>,
    /// Task slots of all workers (fleet only).
    pub capacity: Option<f64>,
}

/// Token counts.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: Option<f64>,
    /// Completion tokens.
    pub completion: Option<f64>,
}

/// Latency quantiles in ms; null when nothing was measured.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Quantiles {
    /// Samples.
    pub count: Option<f64>,
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

/// One queue/kind/priority series.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Series {
    /// Queue.
    pub queue: String,
    /// Task kind.
    pub kind: String,
    /// Priority.
    pub priority: String,
    /// Its figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// One worker's last report.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WorkerRow {
    /// Worker id.
    pub id: String,
    /// Queues it consumes.
    pub queues: Vec<String>,
    /// Tasks running.
    pub in_flight: Option<f64>,
    /// Task slots.
    pub max_concurrent: Option<f64>,
    /// Process CPU, percent of one core.
    pub cpu_percent: Option<f64>,
    /// Resident memory, bytes.
    pub rss_bytes: Option<f64>,
    /// Resident memory, percent of the machine's.
    pub memory_percent: Option<f64>,
    /// Last report, ms since the epoch.
    pub last_seen_ms: Option<f64>,
}

/// An alert rule's state.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Alert {
    /// Rule name.
    pub rule: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// Metric it watches.
    pub metric: String,
    /// The metric's value.
    pub value: Option<f64>,
    /// The rule's threshold.
    pub threshold: Option<f64>,
    /// Comparison (`>`, `<`).
    pub op: String,
    /// Since when it is in this state, ms since the epoch.
    pub since: Option<f64>,
    /// Human-readable description.
    pub message: String,
}

/// Runs `taskfleet top`.
pub async fn run(args: TopArgs) -> anyhow::Result<i32> {
    // reqwest is built without a bundled crypto provider; https aggregators need this one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(5)).build().context("building the HTTP client")?;
    let url = format!("{}/v1/stats", args.aggregator.trim_end_matches('/'));

    if args.once {
        let raw = fetch(&client, &url).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&raw)?);
        } else {
            let snap: Snapshot = serde_json::from_value(raw).context("unexpected /v1/stats answer")?;
            print!("{}", render(&snap, &args.aggregator));
        }
        return Ok(0);
    }

    let clear = std::io::stdout().is_terminal() && !args.json;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let frame = tokio::select! {
            _ = &mut ctrl_c => break,
            raw = fetch(&client, &url) => match raw {
                Ok(raw) if args.json => format!("{}\n", serde_json::to_string(&raw)?),
                Ok(raw) => match serde_json::from_value::<Snapshot>(raw) {
                    Ok(snap) => render(&snap, &args.aggregator),
                    Err(e) => format!("unexpected /v1/stats answer from {url}: {e}\n"),
                },
                Err(e) if args.json => {
                    eprintln!("{e:#}");
                    String::new()
                }
                Err(e) => format!("{e:#}\nretrying every {}…\n", humantime::format_duration(args.interval)),
            },
        };
        let mut out = std::io::stdout().lock();
        // Clear the screen and home the cursor, then draw the whole frame in one write.
        let prefix = if clear { "\x1b[H\x1b[2J" } else { "" };
        if out.write_all(format!("{prefix}{frame}").as_bytes()).and_then(|_| out.flush()).is_err() {
            // stdout closed (e.g. `| head`): nothing more to show.
            return Ok(0);
        }
        drop(out);
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
    Ok(0)
}

async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<serde_json::Value> {
    let resp = client.get(url).send().await.with_context(|| format!("aggregator unreachable at {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(anyhow!("aggregator at {url} answered {status}"));
    }
    resp.json().await.with_context(|| format!("{url} sent invalid JSON"))
}

/// One screenful: header, fleet figures, series, workers, firing alerts.
pub fn render(s: &Snapshot, source: &str) -> String {
    let f = &s.fleet;
    let e2e = f.end_to_end_ms.as_ref();
    let q = |h: Option<&Quantiles>, pick: fn(&Quantiles) -> Option<f64>| ms(h.and_then(pick));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "taskfleet top  {source}  {}  window {}s",
        s.generated_at.map(clock).unwrap_or_else(|| DASH.into()),
        int(s.window_s)
    );
    let _ = writeln!(
        out,
        "workers {}  utilisation {}% ({}/{} in flight)  throughput {}/s  completed {} ({} ok, {} failed, {} dead, {} cancelled)",
        int(f.workers),
        pct(f.utilization),
        int(f.in_flight),
        int(f.capacity),
        fixed(f.throughput_per_s, 1),
        int(f.completed_total),
        int(f.succeeded_total),
        int(f.failed_total),
        int(f.dead_total),
        int(f.cancelled_total),
    );
    let _ = writeln!(
        out,
        "end-to-end ms p50 {}  p95 {}  p99 {}  max {}   queue wait p95 {}  run p95 {}",
        q(e2e, |h| h.p50),
        q(e2e, |h| h.p95),
        q(e2e, |h| h.p99),
        q(e2e, |h| h.max),
        q(f.queue_wait_ms.as_ref(), |h| h.p95),
        q(f.run_ms.as_ref(), |h| h.p95),
    );
    let tokens = f.tokens_total.as_ref();
    let _ = writeln!(
        out,
        "errors {}%  retries {}%  cache hits {}%  cost ${} (${}/task)  saved ${}  tokens {} prompt + {} completion",
        pct(f.error_rate),
        pct(f.retry_rate),
        pct(f.cache_hit_rate),
        usd(f.cost_usd_total),
        usd(f.cost_per_task_usd),
        usd(f.saved_usd_total),
        int(tokens.and_then(|t| t.prompt)),
        int(tokens.and_then(|t| t.completion)),
    );

    out.push_str("\nSERIES\n");
    let mut rows: Vec<&Series> = s.series.iter().collect();
    rows.sort_by(|a, b| (&a.queue, &a.kind, &a.priority).cmp(&(&b.queue, &b.kind, &b.priority)));
    let series: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let g = &r.figures;
            let e = g.end_to_end_ms.as_ref();
            vec![
                r.queue.clone(),
                r.kind.clone(),
                r.priority.clone(),
                fixed(g.throughput_per_s, 1),
                int(g.completed_total),
                int(g.failed_total),
                int(g.dead_total),
                pct(g.error_rate),
                pct(g.retry_rate),
                pct(g.cache_hit_rate),
                q(g.queue_wait_ms.as_ref(), |h| h.p95),
                q(g.run_ms.as_ref(), |h| h.p95),
                q(e, |h| h.p50),
                q(e, |h| h.p95),
                q(e, |h| h.p99),
                usd(g.cost_usd_total),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "QUEUE",
            "KIND",
            "PRIORITY",
            "/S",
            "COMPLETED",
            "FAILED",
            "DEAD",
            "ERR%",
            "RETRY%",
            "CACHE%",
            "WAIT95",
            "RUN95",
            "E2E50",
            "E2E95",
            "E2E99",
            "COST$",
        ],
        3,
        &series,
        "(no tasks seen yet)",
    );

    out.push_str("\nWORKERS\n");
    let mut workers: Vec<&WorkerRow> = s.workers.iter().collect();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    let now = s.generated_at;
    let workers: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                if w.queues.is_empty() { DASH.into() } else { w.queues.join(",") },
                format!("{}/{}", int(w.in_flight), int(w.max_concurrent)),
                fixed(w.cpu_percent, 1),
                fixed(w.rss_bytes.map(|b| b / 1_048_576.0), 1),
                fixed(w.memory_percent, 1),
                match (now, w.last_seen_ms) {
                    (Some(now), Some(seen)) => format!("{:.1}s ago", ((now - seen) / 1e3).max(0.0)),
                    _ => DASH.into(),
                },
            ]
        })
        .collect();
    table(
        &mut out,
        &["ID", "QUEUES", "IN-FLIGHT", "CPU%", "MEM-MiB", "MEM%", "LAST-SEEN"],
        2,
        &workers,
        "(no workers seen)",
    );

    let firing: Vec<&Alert> = s.alerts.iter().filter(|a| a.state == "firing").collect();
    let resolved = s.alerts.len() - firing.len();
    let _ = writeln!(out, "\nALERTS  {} firing, {resolved} resolved", firing.len());
    for a in firing {
        let message = if a.message.is_empty() {
            format!("{} {} {} {}", a.metric, fixed(a.value, 2), a.op, fixed(a.threshold, 2))
        } else {
            a.message.clone()
        };
        let since = a.since.map(clock).unwrap_or_else(|| DASH.into());
        // Messages usually start with the rule's name already.
        let text = if message.starts_with(&a.rule) { message } else { format!("{}: {message}", a.rule) };
        let _ = writeln!(out, "FIRING  {text}  (since {since})");
    }
    out
}

/// Appends a table: the first `left` columns are left-aligned, the rest right-aligned.
fn table(out: &mut String, header: &[&str], left: usize, rows: &[Vec<String>], empty: &str) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if i < left {
                let _ = write!(s, "{cell:<w$}");
            } else {
                let _ = write!(s, "{cell:>w$}");
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    out.push_str(&line(&mut header.iter().copied()));
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    if rows.is_empty() {
        out.push_str(empty);
        out.push('\n');
    }
}

fn fixed(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => DASH.into(),
    }
}

fn int(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{}", v.round() as i64),
        _ => DASH.into(),
    }
}

/// Milliseconds: two decimals below 10, one below 100, none above.
fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v.abs() < 10.0 => format!("{v:.2}"),
        Some(v) if v.is_finite() && v.abs() < 100.0 => format!("{v:.1}"),
        v => int(v),
    }
}

/// A rate in [0, 1] as a percentage, without the sign.
fn pct(v: Option<f64>) -> String {
    match v.map(|v| v * 100.0) {
        Some(p) if p.is_finite() && p != 0.0 && p.abs() < 0.1 => format!("{p:.3}"),
        p => fixed(p, 1),
    }
}

/// Dollars with enough decimals to see small per-task costs.
fn usd(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => {
            let a = v.abs();
            if a == 0.0 || a >= 1.0 {
                format!("{v:.2}")
            } else if a >= 0.001 {
                format!("{v:.4}")
            } else if a >= 0.000_001 {
                format!("{v:.6}")
            } else {
                format!("{v:.2e}")
            }
        }
        _ => DASH.into(),
    }
}

/// `HH:MM:SS UTC` of a time in ms since the epoch.
fn clock(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        return DASH.into();
    }
    let secs = (ms / 1e3) as u64 % 86_400;
    format!("{:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "generated_at": 1763900000000, "window_s": 60,
      "fleet": { "throughput_per_s": 120.5, "completed_total": 12345, "succeeded_total": 12000,
        "failed_total": 3, "dead_total": 1, "cancelled_total": 0, "retries_total": 10, "cache_hits_total": 300,
        "error_rate": 0.01, "retry_rate": 0.02, "cache_hit_rate": null,
        "tokens_total": { "prompt": 1000, "completion": 2000 },
        "cost_usd_total": 1.23, "saved_usd_total": 2.34, "cost_per_task_usd": 0.0001,
        "queue_wait_ms": { "count": 100, "p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0 },
        "run_ms": { "count": 0, "p50": null, "p95": null, "p99": null, "max": null },
        "end_to_end_ms": { "count": 100, "p50": 23.0, "p95": 80.0, "p99": 120.0, "max": 6100.0 },
        "workers": 2, "utilization": 0.25, "in_flight": 32, "capacity": 128 },
      "series": [ { "queue": "default", "kind": "echo", "priority": "normal", "throughput_per_s": 3.25,
        "completed_total": 7, "workers": null, "utilization": null, "end_to_end_ms": { "count": 7, "p50": 5.5,
        "p95": null, "p99": null, "max": null } } ],
      "workers": [ { "id": "w-1", "queues": ["default"], "in_flight": 3, "max_concurrent": 64,
        "cpu_percent": 12.5, "rss_bytes": 12582912, "memory_percent": 1.2, "last_seen_ms": 1763899999500 } ],
      "alerts": [
        { "rule": "p95_latency", "state": "firing", "metric": "p95_ms", "value": 6100.0, "threshold": 5000.0,
          "op": ">", "since": 1763900000000, "message": "p95 end-to-end 6100 ms > 5000 ms" },
        { "rule": "error_rate", "state": "resolved", "metric": "error_rate", "value": 0.0, "threshold": 0.05,
          "op": ">", "since": 1763900000000, "message": "old news" } ],
      "history": [ { "t": 1763900000000, "throughput_per_s": 120.5 } ],
      "something_new": true
    }"#;

    #[test]
    fn renders_the_contract_sample() {
        let snap: Snapshot = serde_json::from_str(SAMPLE).expect("sample parses");
        let out = render(&snap, "http://agg:9090");
        assert!(out.starts_with("taskfleet top  http://agg:9090  12:13:20 UTC  window 60s\n"), "{out}");
        assert!(out.contains("workers 2  utilisation 25.0% (32/128 in flight)  throughput 120.5/s  completed 12345"));
        assert!(out.contains("end-to-end ms p50 23.0  p95 80.0  p99 120  max 6100   queue wait p95 2.00  run p95 -"));
        assert!(out.contains("errors 1.0%  retries 2.0%  cache hits -%  cost $1.23 ($0.000100/task)  saved $2.34"));
        assert!(out.contains("tokens 1000 prompt + 2000 completion"));
        let series = out.lines().find(|l| l.starts_with("default")).expect("a series row");
        assert!(series.contains("echo") && series.contains("3.2") && series.contains("5.50"), "{series}");
        let worker = out.lines().find(|l| l.starts_with("w-1")).expect("a worker row");
        assert!(worker.contains("3/64") && worker.contains("12.0") && worker.ends_with("0.5s ago"), "{worker}");
        assert!(out.contains("ALERTS  1 firing, 1 resolved\nFIRING  p95_latency: p95 end-to-end 6100 ms > 5000 ms"));
        assert!(!out.contains("old news"), "resolved alerts are only counted");
    }

    #[test]
    fn empty_and_partial_answers_render() {
        let snap: Snapshot = serde_json::from_str(r#"{"fleet": {"error_rate": null}}"#).expect("parses");
        let out = render(&snap, "x");
        assert!(out.contains("throughput -/s") && out.contains("(no tasks seen yet)") && out.contains("(no workers"));
    }

    #[test]
    fn formats() {
        assert_eq!(pct(Some(0.0)), "0.0");
        assert_eq!(pct(Some(0.0001)), "0.010");
        assert_eq!(usd(Some(0.0)), "0.00");
        assert_eq!(usd(Some(0.05)), "0.0500");
        assert_eq!(usd(Some(1e-8)), "1.00e-8");
        assert_eq!(ms(Some(1234.4)), "1234");
        assert_eq!(clock(0.0), "00:00:00 UTC");
    }
}
