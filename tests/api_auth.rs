//! The coordinator's HTTP task API (`/v1/...`) and its credential, with the real binaries:
//! with `coordinator.api_token` every task route (payloads, results, counts, and any path the
//! router does not know, such as a cancel) needs `Authorization: Bearer <token>`, from loopback
//! too; without one the routes answer only to loopback peers (403 to an address of this machine
//! that is not loopback). `/healthz`, `/readyz` and `/metrics` stay open, and neither they nor the
//! aggregator's dashboard and `/v1/stats` carry a payload or a result.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use taskfleet_e2e::{Fleet, HttpAnswer, http_request};
use taskfleet_proto::TaskEnvelope;
use taskfleet_test_support::{FleetProcess, free_port};

const TOKEN: &str = "e2e-api-token-7f3c9a1d5b";

fn get(addr: &str, path: &str, token: Option<&str>) -> HttpAnswer {
    send(addr, "GET", path, token)
}

fn send(addr: &str, method: &str, path: &str, token: Option<&str>) -> HttpAnswer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_request(addr, method, path, &headers).unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// The error body's `kind`, checking it is the API's JSON error shape.
fn error_kind(answer: &HttpAnswer) -> String {
    assert!(answer.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{answer:?}");
    let body: Value = serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "no error message: {answer:?}");
    body["error"]["kind"].as_str().unwrap_or_default().to_string()
}

/// Submits an echo task whose payload (and so result) holds `marker` and a failing task, and
/// waits until both are final; returns the echo task's id.
async fn run_tasks(fleet: &Fleet, marker: &str) -> uuid::Uuid {
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let echo = TaskEnvelope::new("echo", json!({ "secret": marker }));
    let mut failing = TaskEnvelope::new("sleep", json!({ "fail": "fatal", "note": marker }));
    failing.max_attempts = 1;
    fleet.submit_all(&client, &[echo.clone(), failing]).await;
    fleet.wait_final(&pool, 2, Duration::from_secs(60)).await;
    echo.id
}

/// Waits until the aggregator's snapshot counts `n` final states.
fn wait_aggregated(fleet: &Fleet, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.stats()["fleet"]["completed_total"].as_u64().unwrap_or(0) < n {
        assert!(
            Instant::now() < deadline,
            "the aggregator did not count {n} tasks: {}\n{}",
            fleet.stats(),
            fleet.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_task_route_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("api-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut fleet = Fleet::new("api-auth-token");
    fleet.set("TASKFLEET_COORDINATOR_API_TOKEN_FILE", &token_file.display().to_string());
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_aggregator();
    let marker = format!("payload-marker-{}", uuid::Uuid::new_v4().simple());
    let id = run_tasks(&fleet, &marker).await;
    let addr = fleet.coordinator_http.clone();

    let task = format!("/v1/tasks/{id}");
    let cancel = format!("/v1/tasks/{id}/cancel");
    let routes: [(&str, &str); 5] =
        [("GET", &task), ("GET", "/v1/tasks?limit=10"), ("GET", "/v1/counts"), ("POST", &cancel), ("DELETE", &task)];
    for (method, path) in routes {
        let none = send(&addr, method, path, None);
        assert_eq!(none.status, 401, "{method} {path} without a token: {none:?}");
        assert!(none.header("www-authenticate").is_some_and(|c| c.starts_with("Bearer")), "{none:?}");
        assert_eq!(error_kind(&none), "unauthorized");
        assert!(!none.body.contains(&marker));
        for wrong in ["e2e-api-token-7f3c9a1d5", "e2e-api-token-7f3c9a1d5b0", "E2E-API-TOKEN-7F3C9A1D5B", "x"] {
            let answer = send(&addr, method, path, Some(wrong));
            assert_eq!(answer.status, 401, "{method} {path} with a wrong token: {answer:?}");
            assert!(answer.header("www-authenticate").is_some_and(|c| c.starts_with("Bearer")), "{answer:?}");
            assert!(!answer.body.contains(&marker));
        }
        let basic = http_request(&addr, method, path, &[("Authorization", &format!("Basic {TOKEN}"))]).unwrap();
        assert_eq!(basic.status, 401, "{method} {path} with another scheme: {basic:?}");
    }

    // The right token: payload and result, the list, the counts.
    let answer = get(&addr, &task, Some(TOKEN));
    assert_eq!(answer.status, 200, "{answer:?}");
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(body["payload"]["secret"], marker.as_str(), "{body}");
    assert_eq!(body["result"]["secret"], marker.as_str(), "{body}");
    let list = get(&addr, "/v1/tasks?limit=10", Some(TOKEN));
    assert_eq!(list.status, 200, "{list:?}");
    assert!(list.body.contains(&marker), "{list:?}");
    let counts = get(&addr, "/v1/counts", Some(TOKEN));
    assert_eq!(counts.status, 200, "{counts:?}");
    let counts: Value = serde_json::from_str(&counts.body).unwrap();
    assert_eq!((counts["succeeded"].as_i64(), counts["failed"].as_i64()), (Some(1), Some(1)), "{counts}");
    let lower = http_request(&addr, "GET", &task, &[("Authorization", &format!("bearer {TOKEN}"))]).unwrap();
    assert_eq!(lower.status, 200, "the scheme is case-insensitive: {lower:?}");
    // The HTTP API has no cancel route (cancel and replay are NATS verbs): with the token the
    // request passes the guard and the router answers that it does not know it.
    let cancel_answer = send(&addr, "POST", &cancel, Some(TOKEN));
    assert_eq!(cancel_answer.status, 404, "{cancel_answer:?}");
    let delete = send(&addr, "DELETE", &task, Some(TOKEN));
    assert_eq!(delete.status, 405, "{delete:?}");

    // The probes and the metrics stay open, and no open page carries a payload or a result.
    wait_aggregated(&fleet, 2);
    let worker = fleet.worker_http[0].clone();
    let aggregator = fleet.aggregator_http.clone();
    let open = [
        (&addr, "/healthz"),
        (&addr, "/readyz"),
        (&addr, "/metrics"),
        (&worker, "/metrics"),
        (&aggregator, "/metrics"),
        (&aggregator, "/"),
        (&aggregator, "/v1/stats"),
    ];
    for (at, path) in open {
        let answer = get(at, path, None);
        assert_eq!(answer.status, 200, "{at}{path}: {answer:?}");
        assert!(!answer.body.contains(&marker), "{at}{path} shows a payload or result:\n{}", answer.body);
    }
    let stats = fleet.stats();
    assert_eq!(stats["fleet"]["completed_total"].as_u64(), Some(2), "{stats}");
    assert!(!stats.to_string().contains(&marker), "{stats}");

    let log = fleet.coordinator.as_ref().unwrap().log();
    assert!(log.contains("bearer token required"), "the start-up log names the mode:\n{log}");
    assert!(!log.contains(TOKEN), "the token is in the log:\n{log}");
}

/// An address of this machine other than loopback: the source address of a route to the
/// outside (no packet is sent).
fn non_loopback_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("8.8.8.8:80").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_loopback_peers_are_served() {
    let mut fleet = Fleet::new("api-auth-loopback");
    fleet.start_coordinator_on("0.0.0.0", &[]);
    fleet.start_worker(&[]);
    let marker = format!("payload-marker-{}", uuid::Uuid::new_v4().simple());
    let id = run_tasks(&fleet, &marker).await;
    let local = fleet.coordinator_http.clone();
    let task = format!("/v1/tasks/{id}");

    for path in [task.as_str(), "/v1/tasks", "/v1/counts"] {
        let answer = get(&local, path, None);
        assert_eq!(answer.status, 200, "{path} from 127.0.0.1: {answer:?}");
    }
    assert!(get(&local, &task, None).body.contains(&marker));

    let log = fleet.coordinator.as_ref().unwrap().log();
    assert!(log.contains("loopback peers only"), "the start-up log names the mode:\n{log}");

    // From an address of this machine that is not loopback (the unit tests of the peer check
    // in crates/coordinator cover the rule where the machine has none).
    let Some(ip) = non_loopback_address() else {
        println!("no non-loopback address on this machine: the 403 path is covered by the unit tests only");
        return;
    };
    let port = local.rsplit_once(':').map(|(_, p)| p).unwrap();
    let remote = match ip {
        std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    for (method, path) in [("GET", task.as_str()), ("GET", "/v1/tasks"), ("GET", "/v1/counts"), ("POST", "/v1/x")] {
        let answer = send(&remote, method, path, None);
        assert_eq!(answer.status, 403, "{method} {path} from {remote}: {answer:?}");
        assert_eq!(error_kind(&answer), "forbidden");
        assert!(answer.body.contains("coordinator.api_token"), "the error names the setting: {answer:?}");
        assert!(!answer.body.contains(&marker));
        // A token does not help when none is configured.
        assert_eq!(send(&remote, method, path, Some(TOKEN)).status, 403);
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let answer = get(&remote, path, None);
        assert_eq!(answer.status, 200, "{path} from {remote}: {answer:?}");
        assert!(!answer.body.contains(&marker));
    }
}

/// A token shorter than 16 characters, or both a token and a token file, stop the coordinator
/// at start with an error naming the setting and not quoting the token.
#[test]
fn a_bad_token_setting_stops_the_coordinator_at_start() {
    let fleet = Fleet::new("api-auth-bad");
    let dir = tempfile::tempdir().unwrap();
    let short_file = dir.path().join("short");
    std::fs::write(&short_file, "short-secret\n").unwrap();
    let short_file = short_file.display().to_string();
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("TASKFLEET_COORDINATOR_API_TOKEN", "short-secret")], "coordinator.api_token"),
        (&[("TASKFLEET_COORDINATOR_API_TOKEN_FILE", &short_file)], "coordinator.api_token_file"),
        (
            &[("TASKFLEET_COORDINATOR_API_TOKEN", TOKEN), ("TASKFLEET_COORDINATOR_API_TOKEN_FILE", &short_file)],
            "not both",
        ),
    ];
    for (vars, expected) in cases {
        let mut env = fleet.env.fleet_env();
        env.push(("TASKFLEET_COORDINATOR_HTTP_ADDR".into(), format!("127.0.0.1:{}", free_port())));
        env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut p = FleetProcess::spawn("taskfleet-coordinator", &[], &env);
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.is_running() {
            assert!(Instant::now() < deadline, "{vars:?}: the coordinator kept running:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = p.log();
        assert!(log.contains(expected), "{vars:?}: the error does not name {expected:?}:\n{log}");
        assert!(!log.contains("short-secret") && !log.contains(TOKEN), "{vars:?}: the token is in the log:\n{log}");
    }
}
