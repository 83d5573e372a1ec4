//! The aggregator's dashboard page in headless Chromium, and `taskfleet top`, against a real
//! fleet with tasks running. Needs Debian's `chromium` (`make services` installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use taskfleet_proto::TaskEnvelope;

/// Debian's Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium with `args` and a private profile; kills it after `timeout`.
fn chromium(args: &[String], timeout: Duration) -> Output {
    let profile = tempfile::tempdir().expect("temp dir for the Chromium profile");
    let mut child = Command::new(CHROMIUM)
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                break;
            }
        }
    }
    child.wait_with_output().expect("Chromium's output")
}

/// The text of the element with `id` in a dumped DOM (up to the next tag).
fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[start..];
    let open_end = rest.find('>')? + 1;
    let text = &rest[open_end..];
    Some(text[..text.find('<').unwrap_or(text.len())].trim())
}

/// A figure as the page shows it ("1,234.5"), or `None` for "–" and the like.
fn number(text: Option<&str>) -> Option<f64> {
    text?.replace(',', "").parse().ok()
}

/// What is wrong with a dumped DOM, or `None` if it shows live figures of this fleet.
fn check_dom(dom: &str, worker: &str) -> Option<String> {
    if !dom.contains("data-updated=\"") {
        return Some("no data-updated on <body>: the page never rendered a snapshot".into());
    }
    if !dom.contains("data-state=\"ok\"") {
        return Some(format!("the page is not in state ok; banner: {:?}", text_of(dom, "banner")));
    }
    match number(text_of(dom, "completed")) {
        Some(n) if n > 0.0 => {}
        _ => return Some(format!("completed shows {:?}", text_of(dom, "completed"))),
    }
    match number(text_of(dom, "throughput")) {
        Some(n) if n > 0.0 => {}
        _ => return Some(format!("throughput shows {:?}", text_of(dom, "throughput"))),
    }
    match number(text_of(dom, "workers")) {
        Some(n) if n >= 1.0 => {}
        _ => return Some(format!("workers shows {:?}", text_of(dom, "workers"))),
    }
    if !dom.contains(&format!("data-worker=\"{worker}\"")) {
        return Some(format!("no row for worker {worker} in the workers table"));
    }
    if number(text_of(dom, "p95")).is_none() {
        return Some(format!("p95 shows {:?}", text_of(dom, "p95")));
    }
    if number(text_of(dom, "chart-throughput-now").map(|t| t.trim_end_matches("/s"))).is_none() {
        return Some(format!("the throughput chart shows {:?}", text_of(dom, "chart-throughput-now")));
    }
    if !dom.contains(r#"<tr data-run="research">"#) {
        return Some("no row for the run name `research` in the runs table".into());
    }
    if !dom.contains(r#"<li class="firing" data-rule="busy">"#) {
        return Some("the firing alert `busy` is not in the alerts list".into());
    }
    None
}

/// `target/test-artifacts`, beside the test binaries' `target/debug`.
fn artifacts_dir() -> PathBuf {
    let debug = taskfleet_test_support::target_dir();
    let dir = debug.parent().unwrap_or(&debug).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// While `sleep` tasks trickle in, the dashboard in headless Chromium shows non-zero live
/// figures, this fleet's worker, a named run and a firing alert; a screenshot is kept in
/// `target/test-artifacts`. Then `taskfleet top --once` shows the same figures in the terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_top_show_live_figures() {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: run `make services` (deploy/dev-services.sh installs Debian's chromium)"
    );
    const WORKER: &str = "dashboard-w1";
    let mut fleet = Fleet::new("dashboard");
    fleet.start_coordinator();
    fleet.start_worker(&[("TASKFLEET_WORKER_ID", WORKER), ("TASKFLEET_WORKER_STATUS_INTERVAL", "1s")]);
    // An alert that fires as soon as tasks finish, so that the page shows one.
    fleet
        .set("TASKFLEET_AGGREGATOR_ALERT_RULES", "busy=throughput_per_s > 0.5")
        .set("TASKFLEET_AGGREGATOR_ALERT_INTERVAL", "500ms")
        .set("TASKFLEET_AGGREGATOR_ALERT_MIN_SAMPLES", "5");
    fleet.start_aggregator();
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let addr = fleet.aggregator_http.clone();
    let url = format!("http://{addr}/");

    // A steady trickle: 10 tasks of 20 ms every 100 ms until the browser checks are done (at
    // most 90 s).
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = async {
        // And one named run (one task), for the runs table.
        fleet
            .submit_run(&client, serde_json::json!({"name": "research", "nodes": [{"name": "a", "kind": "echo"}]}))
            .await;
        let mut submitted = 1usize;
        let deadline = Instant::now() + Duration::from_secs(90);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let envs: Vec<TaskEnvelope> = (0..10)
                .map(|i| TaskEnvelope::new("sleep", serde_json::json!({ "ms": 20, "i": submitted + i })))
                .collect();
            fleet.submit_all(&client, &envs).await;
            submitted += envs.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        submitted
    };

    let browse = async {
        // Let the aggregator see finished tasks, a worker report, the alert and two chart points
        // (one per 5 s) first.
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let a = addr.clone();
            let stats = tokio::task::spawn_blocking(move || taskfleet_test_support::http_get(&a, "/v1/stats"))
                .await
                .expect("stats thread");
            let ready = stats
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                .is_some_and(|s| {
                    s["fleet"]["completed_total"].as_f64().unwrap_or(0.0) > 0.0
                        && s["workers"].as_array().is_some_and(|w| !w.is_empty())
                        && s["alerts"].as_array().is_some_and(|a| !a.is_empty())
                        && s["history"].as_array().is_some_and(|h| h.len() >= 2)
                });
            if ready || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // The page polls /v1/stats every second; --virtual-time-budget lets it run 5 s of
        // (virtual) time before the DOM is dumped. Retried a few times in case of a slow start.
        let mut problem = String::new();
        let mut dom = String::new();
        for _ in 0..5 {
            let args = vec!["--virtual-time-budget=5000".to_string(), "--dump-dom".to_string(), url.clone()];
            let out = tokio::task::spawn_blocking(move || chromium(&args, Duration::from_secs(60)))
                .await
                .expect("chromium thread");
            dom = String::from_utf8_lossy(&out.stdout).into_owned();
            match check_dom(&dom, WORKER) {
                None => {
                    problem.clear();
                    break;
                }
                Some(p) => {
                    problem = format!("{p}\n--- chromium stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }

        // The screenshot, while tasks still run.
        let shot = artifacts_dir().join("dashboard.png");
        let _ = std::fs::remove_file(&shot);
        let args = vec![
            "--virtual-time-budget=5000".to_string(),
            "--hide-scrollbars".to_string(),
            "--window-size=1400,1000".to_string(),
            format!("--screenshot={}", shot.display()),
            url.clone(),
        ];
        let out = tokio::task::spawn_blocking(move || chromium(&args, Duration::from_secs(60)))
            .await
            .expect("chromium thread");
        stop.store(true, Ordering::Relaxed);
        (problem, dom, shot, out)
    };

    let (submitted, (problem, dom, shot, shot_out)) = tokio::join!(trickle, browse);
    assert!(
        problem.is_empty(),
        "the dashboard does not show live figures: {problem}\n--- DOM ---\n{dom}\n{}",
        fleet.logs()
    );
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "no screenshot at {} ({} bytes); chromium said:\n{}",
        shot.display(),
        png.len(),
        String::from_utf8_lossy(&shot_out.stderr)
    );
    println!("dashboard screenshot: {}", shot.display());

    // Every task finishes, and the aggregator counts them all.
    let counts = fleet.wait_final(&pool, submitted as i64, Duration::from_secs(120)).await;
    assert_eq!(counts.get("succeeded").copied(), Some(submitted as i64), "{counts:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let completed = fleet.stats()["fleet"]["completed_total"].as_f64().unwrap_or(0.0);
        if completed >= submitted as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "aggregator counts {completed} of {submitted} tasks\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // `taskfleet top --once`: the same figures in the terminal.
    let out = fleet.cli(&["top", "--once", "--aggregator", &format!("http://{addr}")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "taskfleet top failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let throughput: Option<f64> =
        stdout.split("throughput ").nth(1).and_then(|rest| rest.split("/s").next()).and_then(|n| n.trim().parse().ok());
    assert!(throughput.is_some_and(|t| t > 0.0), "no throughput figure in:\n{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with(WORKER)), "no row for worker {WORKER} in:\n{stdout}");
    assert!(stdout.contains("FIRING  busy: "), "no firing alert in:\n{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("research ")), "no row for the run name research in:\n{stdout}");
    let completed: Option<f64> =
        stdout.split("completed ").nth(1).and_then(|rest| rest.split_whitespace().next()).and_then(|n| n.parse().ok());
    assert!(completed.is_some_and(|n| n >= submitted as f64), "completed >= {submitted} expected in:\n{stdout}");

    // `--json` prints the raw snapshot.
    let out = fleet.cli(&["top", "--once", "--json", "--aggregator", &format!("http://{addr}")]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("top --json prints JSON");
    assert!(json["fleet"]["completed_total"].as_f64().is_some_and(|n| n >= submitted as f64), "{json}");
}
