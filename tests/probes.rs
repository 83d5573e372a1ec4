//! The health endpoints of the real binaries: `/healthz` (liveness: every watched loop ticks)
//! and `/readyz` (readiness: the dependencies are there, else 503 naming what is missing),
//! around a SIGKILL and a restart of the fleet's own nats-server.

use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use taskfleet_test_support::http_get;

/// Polls `path` on `addr` until it answers `status`, for at most `timeout`; the last answer.
fn wait_status(addr: &str, path: &str, status: u16, timeout: Duration) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = http_get(addr, path).unwrap_or((0, String::new()));
        if got.0 == status || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_nats_and_liveness_holds() {
    let mut fleet = Fleet::new("probes");
    assert!(fleet.env.nats.is_private(), "the probe test kills its own nats-server; unset TASKFLEET_TEST_NATS_URL");
    fleet.start_coordinator();
    fleet.start_aggregator();
    fleet.start_worker(&[]);
    let services = [
        ("coordinator", fleet.coordinator_http.clone()),
        ("aggregator", fleet.aggregator_http.clone()),
        ("worker", fleet.worker_http[0].clone()),
    ];
    for (name, addr) in &services {
        assert_eq!(http_get(addr, "/healthz").unwrap(), (200, "ok".into()), "{name} /healthz");
        assert_eq!(http_get(addr, "/readyz").unwrap(), (200, "ready".into()), "{name} /readyz");
    }

    fleet.env.nats.kill();
    for (name, addr) in &services {
        let (status, body) = wait_status(addr, "/readyz", 503, Duration::from_secs(10));
        assert_eq!(status, 503, "{name} /readyz without NATS: {body}\n{}", fleet.logs());
        assert!(body.contains("nats disconnected"), "{name} names what is missing: {body}");
        // Not ready is not dead: no restart for an outage of a dependency.
        assert_eq!(http_get(addr, "/healthz").unwrap(), (200, "ok".into()), "{name} /healthz without NATS");
    }

    tokio::task::block_in_place(|| fleet.env.nats.restart());
    for (name, addr) in &services {
        let (status, body) = wait_status(addr, "/readyz", 200, Duration::from_secs(30));
        assert_eq!((status, body.as_str()), (200, "ready"), "{name} /readyz after NATS is back\n{}", fleet.logs());
        assert_eq!(http_get(addr, "/healthz").unwrap(), (200, "ok".into()), "{name} /healthz after the outage");
    }
}
