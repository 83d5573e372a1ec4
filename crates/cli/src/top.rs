//! `taskfleet top`: the aggregator's live figures in the terminal, the same ones its dashboard
//! page shows. Reads `GET <aggregator>/v1/stats` every interval and redraws the screen.

use anyhow::{Context, anyhow};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;
use taskfleet_proto::{AlertState, Latency, RunFigures, SeriesFigures, Snapshot, WorkerFigures};

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

/// One screenful: header, fleet figures, series, runs by name, workers, firing alerts.
pub fn render(s: &Snapshot, source: &str) -> String {
    let mut out = String::new();
    render_fleet(&mut out, s, source);
    render_series(&mut out, &s.series);
    render_runs(&mut out, &s.runs);
    render_workers(&mut out, &s.workers, s.generated_at);
    render_alerts(&mut out, s);
    out
}

/// The header and the fleet's figures.
fn render_fleet(out: &mut String, s: &Snapshot, source: &str) {
    let f = &s.fleet;
    let e2e = &f.end_to_end_ms;
    let generated = if s.generated_at == 0 { DASH.into() } else { clock(s.generated_at as f64) };
    let _ = writeln!(out, "taskfleet top  {source}  {generated}  window {}s", s.window_s);
    let _ = writeln!(
        out,
        "workers {}  utilisation {}% ({}/{} in flight)  throughput {}/s  completed {} ({} ok, {} failed, {} dead, {} cancelled)",
        count(f.workers),
        pct(f.utilization),
        count(f.in_flight),
        count(f.capacity),
        fixed(Some(f.throughput_per_s), 1),
        f.completed_total,
        f.succeeded_total,
        f.failed_total,
        f.dead_total,
        f.cancelled_total,
    );
    let _ = writeln!(
        out,
        "end-to-end ms p50 {}  p95 {}  p99 {}  max {}   queue wait p95 {}  run p95 {}",
        ms(e2e.p50),
        ms(e2e.p95),
        ms(e2e.p99),
        ms(e2e.max),
        ms(f.queue_wait_ms.p95),
        ms(f.run_ms.p95),
    );
    let _ = writeln!(
        out,
        "errors {}%  retries {}%  cache hits {}%  cost ${} (${}/task)  saved ${}  tokens {} prompt + {} completion",
        pct(f.error_rate),
        pct(f.retry_rate),
        pct(f.cache_hit_rate),
        usd(Some(f.cost_usd_total)),
        usd(f.cost_per_task_usd),
        usd(Some(f.saved_usd_total)),
        f.tokens_total.prompt,
        f.tokens_total.completion,
    );
}

/// The table of series, sorted by queue, kind and priority.
fn render_series(out: &mut String, series: &[SeriesFigures]) {
    out.push_str("\nSERIES\n");
    let mut rows: Vec<&SeriesFigures> = series.iter().collect();
    rows.sort_by(|a, b| (&a.queue, &a.kind, &a.priority).cmp(&(&b.queue, &b.kind, &b.priority)));
    let p95 = |l: &Latency| ms(l.p95);
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let g = &r.figures;
            vec![
                r.queue.clone(),
                r.kind.clone(),
                r.priority.clone(),
                fixed(Some(g.throughput_per_s), 1),
                g.completed_total.to_string(),
                g.failed_total.to_string(),
                g.dead_total.to_string(),
                pct(g.error_rate),
                pct(g.retry_rate),
                pct(g.cache_hit_rate),
                p95(&g.queue_wait_ms),
                p95(&g.run_ms),
                ms(g.end_to_end_ms.p50),
                p95(&g.end_to_end_ms),
                ms(g.end_to_end_ms.p99),
                usd(Some(g.cost_usd_total)),
            ]
        })
        .collect();
    let header = [
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
    ];
    table(out, &header, 3, &rows, "(no tasks seen yet)");
}

/// The table of runs by name, in the aggregator's order: window counts (started, ended by
/// state, durations) then totals since the aggregator started.
fn render_runs(out: &mut String, runs: &[RunFigures]) {
    out.push_str("\nRUNS\n");
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.running.to_string(),
                r.started.to_string(),
                r.succeeded.to_string(),
                r.failed.to_string(),
                r.cancelled.to_string(),
                r.started_total.to_string(),
                (r.succeeded_total + r.failed_total + r.cancelled_total).to_string(),
                ms(r.duration_ms.p50),
                ms(r.duration_ms.p95),
                (r.tokens_total.prompt + r.tokens_total.completion).to_string(),
                usd(Some(r.cost_usd_total)),
                usd(r.cost_per_run_usd),
                usd(Some(r.saved_usd_total)),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "RUNNING",
        "STARTED",
        "OK",
        "FAILED",
        "CANCELLED",
        "ALL-STARTED",
        "ALL-ENDED",
        "DUR50",
        "DUR95",
        "TOKENS",
        "COST$",
        "$/RUN",
        "SAVED$",
    ];
    table(out, &header, 1, &rows, "(no runs seen yet)");
}

/// The table of workers, sorted by id; `now` (ms since the epoch, 0 when unknown) ages their
/// last reports.
fn render_workers(out: &mut String, workers: &[WorkerFigures], now: u64) {
    out.push_str("\nWORKERS\n");
    let mut sorted: Vec<&WorkerFigures> = workers.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let rows: Vec<Vec<String>> = sorted
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                if w.queues.is_empty() { DASH.into() } else { w.queues.join(",") },
                format!("{}/{}", w.in_flight, w.max_concurrent),
                fixed(Some(w.cpu_percent), 1),
                fixed(Some(w.rss_bytes as f64 / 1_048_576.0), 1),
                fixed(Some(w.memory_percent), 1),
                if now == 0 || w.last_seen_ms == 0 {
                    DASH.into()
                } else {
                    format!("{:.1}s ago", ((now as f64 - w.last_seen_ms as f64) / 1e3).max(0.0))
                },
            ]
        })
        .collect();
    let header = ["ID", "QUEUES", "IN-FLIGHT", "CPU%", "MEM-MiB", "MEM%", "LAST-SEEN"];
    table(out, &header, 2, &rows, "(no workers seen)");
}

/// The alert counts and every firing alert.
fn render_alerts(out: &mut String, s: &Snapshot) {
    let firing: Vec<_> = s.alerts.iter().filter(|a| a.state == AlertState::Firing).collect();
    let resolved = s.alerts.len() - firing.len();
    let _ = writeln!(out, "\nALERTS  {} firing, {resolved} resolved", firing.len());
    for a in firing {
        let message = if a.message.is_empty() {
            format!("{} {} {} {}", a.metric, fixed(Some(a.value), 2), a.op, fixed(Some(a.threshold), 2))
        } else {
            a.message.clone()
        };
        let since = if a.since == 0 { DASH.into() } else { clock(a.since as f64) };
        // Messages usually start with the rule's name already.
        let text = if message.starts_with(&a.rule) { message } else { format!("{}: {message}", a.rule) };
        let _ = writeln!(out, "FIRING  {text}  (since {since})");
    }
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

/// A count the aggregator may not have.
fn count(v: Option<u64>) -> String {
    v.map_or_else(|| DASH.into(), |v| v.to_string())
}

/// Milliseconds: two decimals below 10, one below 100, none above.
fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v.abs() < 10.0 => format!("{v:.2}"),
        Some(v) if v.is_finite() && v.abs() < 100.0 => format!("{v:.1}"),
        Some(v) if v.is_finite() => format!("{}", v.round() as i64),
        _ => DASH.into(),
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
      "runs": [ { "name": "research", "running": 2, "started": 5, "succeeded": 3, "failed": 1, "cancelled": 0,
        "started_total": 9, "succeeded_total": 6, "failed_total": 1, "cancelled_total": 0,
        "duration_ms": { "count": 4, "p50": 1500.0, "p95": 4200.0, "p99": 4200.0, "max": 4200.0 },
        "tokens_total": { "prompt": 300, "completion": 200 }, "attempts_total": 20, "cost_usd_total": 0.7,
        "cost_per_run_usd": 0.1, "saved_usd_total": 0.25 } ],
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
        let run = out.lines().find(|l| l.starts_with("research")).expect("a run row");
        let cells: Vec<&str> = run.split_whitespace().collect();
        assert_eq!(
            cells,
            ["research", "2", "5", "3", "1", "0", "9", "7", "1500", "4200", "500", "0.7000", "0.1000", "0.2500"]
        );
    }

    #[test]
    fn empty_and_partial_answers_render() {
        let snap: Snapshot = serde_json::from_str(r#"{"fleet": {"error_rate": null}}"#).expect("parses");
        let out = render(&snap, "x");
        assert!(out.starts_with("taskfleet top  x  -  window 0s\n"), "{out}");
        assert!(out.contains("workers -  utilisation -% (-/- in flight)  throughput 0.0/s  completed 0"), "{out}");
        assert!(out.contains("(no tasks seen yet)") && out.contains("(no workers"));
        assert!(out.contains("RUNS\n") && out.contains("(no runs seen yet)"));
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
