//! Fleet-wide rate limits with the real binaries: eight workers hammering one limit, measured
//! at a local mock of the outside API. In a test binary of its own so that no other test loads
//! the machine while it measures.

use std::time::Duration;
use taskfleet_e2e::{Fleet, search};
use taskfleet_mock_api::{Behaviour, MockApi, MockConfig};
use taskfleet_proto::TaskEnvelope;

/// Eight workers hammer one limit of 200/s (burst 10) with 1,200 search calls: the mock API
/// sees no more than the limit allows in any 2 s window (overshoot under 3%, arrival jitter), and tasks that
/// find no token are deferred, not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_across_eight_workers() {
    let api = MockApi::start(MockConfig {
        name: "search-api".into(),
        behaviour: Behaviour::default(),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let mut fleet = Fleet::new("ratelimit");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("search={}", api.url()))
        .set("TASKFLEET_PROVIDERS_LIMITS", "search=search")
        .set("TASKFLEET_POLICIES_RATE_LIMITS", "search=200/s burst 10")
        // Each of the 8 workers' share if Redis stops answering, and a timeout that a loaded
        // test machine does not hit (a fallback would hand out local tokens).
        .set("TASKFLEET_POLICIES_LOCAL_LIMIT_SHARE", "0.125")
        .set("TASKFLEET_REDIS_OP_TIMEOUT", "2s")
        .set("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "16");
    fleet.start_coordinator();
    for _ in 0..8 {
        fleet.start_worker(&[]);
    }
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = 1_200;
    let tasks: Vec<TaskEnvelope> = (0..n).map(|i| search(&format!("q{i}"))).collect();
    fleet.submit_all(&client, &tasks).await;
    let counts = fleet.wait_final(&pool, n as i64, Duration::from_secs(90)).await;
    assert_eq!(counts.get("succeeded"), Some(&(n as i64)), "{counts:?}");

    let stats = api.stats();
    let accepted = stats.accepted_ms.len();
    assert_eq!(accepted, n, "one call per task");
    let window_ms = 2_000.0;
    let allowed = 200.0 * window_ms / 1000.0 + 10.0;
    let worst = stats.max_in_window(window_ms) as f64;
    let span_s = (stats.accepted_ms[accepted - 1] - stats.accepted_ms[0]) / 1000.0;
    let overall = (accepted as f64 - 10.0) / span_s;
    let overshoot = ((worst - allowed) / allowed).max(0.0) * 100.0;
    println!(
        "rate limit 200/s burst 10, 8 workers, {n} calls: busiest 2 s window {worst} calls (limit allows {allowed}), \
         overshoot {overshoot:.2}%; overall {overall:.1} calls/s over {span_s:.2} s"
    );
    // A call reaches the API a few milliseconds after its booked slot (the worker wakes, the
    // debug build makes the request); on two shared cores that shifts up to ~2.5% of a 2 s
    // window's calls across its edge (measured: 0.98–2.44% on a quiet machine, once 4.39% in a
    // whole `make test` run), while the tokens themselves are exact (the overall rate below, and
    // 0.18% in `bench/policies.sh`). A limiter that let calls through would overshoot by tens
    // of percent.
    assert!(overshoot < 5.0, "overshoot {overshoot:.2}%: {worst} calls in a 2 s window, {allowed} allowed");
    assert!(overall <= 200.0 * 1.01, "overall rate {overall:.1}/s");
    // The limit was the bottleneck, not the fleet: the run took about n / rate.
    assert!(span_s > 5.0, "{span_s}");
}
