//! A provider chain under load with the real binaries: when the first provider's rate limit has
//! no token, calls overflow to the next provider whose limit has one, and no provider gets more
//! calls than its limit allows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use taskfleet_e2e::{Fleet, search};
use taskfleet_mock_api::{Behaviour, MockApi, MockConfig, RunningMock};
use taskfleet_proto::TaskEnvelope;

async fn mock(name: &str) -> RunningMock {
    MockApi::start(MockConfig { name: name.into(), behaviour: Behaviour::default(), ..MockConfig::default() })
        .await
        .unwrap()
}

/// Providers `a>b>c` at 5/s each and 30 `http` tasks submitted at once: every task succeeds,
/// b and c take what a's limit cannot, and no mock sees more than a limit's worth (5 a second
/// plus the burst of 1) in any second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_overflows_to_its_fallbacks_on_rate_limits() {
    let (a, b, c) = (mock("a").await, mock("b").await, mock("c").await);
    let mut fleet = Fleet::new("overflow");
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("a={},b={},c={}", a.url(), b.url(), c.url()))
        .set("TASKFLEET_PROVIDERS_CHAINS", "search=a>b>c")
        .set("TASKFLEET_PROVIDERS_LIMITS", "a=a,b=b,c=c")
        .set("TASKFLEET_POLICIES_RATE_LIMITS", "a=5/s,b=5/s,c=5/s")
        .set("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "32");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let tasks: Vec<TaskEnvelope> = (0..30).map(|i| search(&format!("q{i}"))).collect();
    let started = Instant::now();
    fleet.submit_all(&client, &tasks).await;
    let counts = fleet.wait_final(&pool, 30, Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert_eq!(counts.get("succeeded"), Some(&30), "{counts:?}\n{}", fleet.logs());

    let providers: Vec<String> =
        sqlx::query_scalar("SELECT result->>'provider' FROM tasks").fetch_all(&pool).await.unwrap();
    let mut by_provider = BTreeMap::<String, usize>::new();
    for p in providers {
        *by_provider.entry(p).or_default() += 1;
    }
    println!("30 calls over a>b>c at 5/s each: {by_provider:?} in {took:?}");
    for m in [&a, &b, &c] {
        let stats = m.stats();
        let busiest = stats.max_in_window(1000.0);
        println!("{}: {} calls, busiest second {busiest}", stats.provider, stats.count(200));
        assert!(busiest <= 6, "{} got {busiest} calls in one second: {:?}", stats.provider, stats.accepted_ms);
        assert_eq!(stats.count(429), 0);
    }
    assert!(b.stats().count(200) > 0 && c.stats().count(200) > 0, "no overflow: {by_provider:?}");
    assert_eq!(a.stats().count(200) + b.stats().count(200) + c.stats().count(200), 30);
}
