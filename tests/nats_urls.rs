//! `nats.url` as a list of seed servers, and credentials kept out of the logs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use taskfleet_proto::TaskEnvelope;
use taskfleet_test_support::{free_port, target_dir};

/// A coordinator and a worker given a dead seed server (with credentials) before the test's
/// live one connect through the live one and run a task; the CLI takes the same list. No log
/// shows the password, the start-up line shows it redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_starts_with_a_list_of_seed_servers_and_logs_no_password() {
    let mut fleet = Fleet::new("nats_urls");
    let live = fleet.env.nats.url.clone();
    let list = format!("nats://user:hunter2@127.0.0.1:{}, {live}", free_port());
    fleet.set("TASKFLEET_NATS_URL", &list);
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let task = TaskEnvelope::new("echo", serde_json::json!({ "seeds": 2 }));
    fleet.submit_all(&client, std::slice::from_ref(&task)).await;
    let counts = fleet.wait_final(&pool, 1, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&1), "{counts:?}\n{}", fleet.logs());

    let status = fleet.cli(&["status", &task.id.to_string()]);
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "CLI with a server list: {stdout}\n{}", String::from_utf8_lossy(&status.stderr));
    assert!(stdout.contains(r#""state": "succeeded""#), "{stdout}");

    for p in fleet.coordinator.iter().chain(fleet.workers.iter()) {
        let log = p.log();
        assert!(!log.contains("hunter2"), "{} logged the password:\n{log}", p.name);
        assert!(log.contains("user:***@127.0.0.1"), "{} logs its servers redacted:\n{log}", p.name);
    }
}

/// A malformed entry in the list stops each service at start, exit code 1, with a message
/// naming `nats.url` and the entry (its password redacted).
#[test]
fn a_malformed_seed_server_stops_the_service_at_start() {
    for bin in ["taskfleet-coordinator", "taskfleet-worker", "taskfleet-aggregator"] {
        for (url, why) in [
            (
                "nats://127.0.0.1:4222,nats://user:hunter2@127.0.0.1:42x2",
                r#""nats://user:***@127.0.0.1:42x2" (entry 2 of 2) has the port"#,
            ),
            ("nats://127.0.0.1:4222,,nats://127.0.0.1:4223", "(entry 2 of 3) is empty"),
            ("http://127.0.0.1:4222", r#"has the scheme "http""#),
        ] {
            let (code, stderr) = run_to_exit(bin, &[("TASKFLEET_NATS_URL", url)]);
            assert_eq!(code, Some(1), "{bin} with {url:?}: {stderr}");
            assert!(stderr.contains("invalid configuration: nats.url: "), "{bin} with {url:?}: {stderr}");
            assert!(stderr.contains(why), "{bin} with {url:?}: {stderr}");
            assert!(!stderr.contains("hunter2"), "{bin} with {url:?}: {stderr}");
        }
    }
}

/// Runs `bin` with `env` until it exits (at most 20s): its exit code and stderr.
fn run_to_exit(bin: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(target_dir().join(bin))
        .envs(env.iter().copied())
        .env("TASKFLEET_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin} (run cargo build --workspace): {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{bin} still running after 20s: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}
