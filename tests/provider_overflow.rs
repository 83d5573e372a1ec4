//! A provider chain under load with the real binaries: when the first provider's rate limit has
//! no token, calls overflow to the next provider whose limit has one, and no provider gets more
//! calls than its limit allows; a provider answering 429 is skipped the same way.
//!
//! The mocks enforce the fleet's limits themselves (5/s, a bucket of 1, plus a 10% margin for
//! timing jitter), so a call the fleet lets through beyond a limit shows as a 429.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use taskfleet_e2e::{Fleet, search};
use taskfleet_mock_api::{Behaviour, MockApi, MockConfig, RunningMock};
use taskfleet_proto::TaskEnvelope;

/// The tests measure calls per second: one fleet at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A mock with the server-side limit of the fleet's `5/s` (burst 1), 10% over for jitter.
async fn mock(name: &str, rate_429: f64) -> RunningMock {
    let behaviour = Behaviour { limit_per_s: 5.5, limit_burst: 1.0, rate_429, ..Behaviour::default() };
    MockApi::start(MockConfig { name: name.into(), behaviour, ..MockConfig::default() }).await.unwrap()
}

fn chain_fleet(name: &str, a: &RunningMock, b: &RunningMock, c: &RunningMock) -> Fleet {
    let mut fleet = Fleet::new(name);
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("a={},b={},c={}", a.url(), b.url(), c.url()))
        .set("TASKFLEET_PROVIDERS_CHAINS", "search=a>b>c")
        .set("TASKFLEET_PROVIDERS_LIMITS", "a=a,b=b,c=c")
        .set("TASKFLEET_POLICIES_RATE_LIMITS", "a=5/s,b=5/s,c=5/s")
        .set("TASKFLEET_WORKER_MAX_CONCURRENT_TASKS", "32");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet
}

async fn by_provider(pool: &sqlx::PgPool) -> BTreeMap<String, usize> {
    let providers: Vec<String> =
        sqlx::query_scalar("SELECT result->>'provider' FROM tasks").fetch_all(pool).await.unwrap();
    let mut by_provider = BTreeMap::<String, usize>::new();
    for p in providers {
        *by_provider.entry(p).or_default() += 1;
    }
    by_provider
}

/// Providers `a>b>c` at 5/s each and 30 `http` tasks submitted at once: every task succeeds,
/// b and c take what a's limit cannot, and no mock sees more than a limit's worth (5 a second
/// plus the burst of 1) in any second, nor answers a single 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_overflows_to_its_fallbacks_on_rate_limits() {
    let _serial = SERIAL.lock().await;
    let (a, b, c) = (mock("a", 0.0).await, mock("b", 0.0).await, mock("c", 0.0).await);
    let fleet = chain_fleet("overflow", &a, &b, &c);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let tasks: Vec<TaskEnvelope> = (0..30).map(|i| search(&format!("q{i}"))).collect();
    let started = Instant::now();
    fleet.submit_all(&client, &tasks).await;
    let counts = fleet.wait_final(&pool, 30, Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert_eq!(counts.get("succeeded"), Some(&30), "{counts:?}\n{}", fleet.logs());

    let by_provider = by_provider(&pool).await;
    println!("30 calls over a>b>c at 5/s each: {by_provider:?} in {took:?}");
    for m in [&a, &b, &c] {
        let stats = m.stats();
        let busiest = stats.max_in_window(1000.0);
        println!("{}: {} calls, busiest second {busiest}, 429s {}", stats.provider, stats.count(200), stats.count(429));
        assert!(busiest <= 6, "{} got {busiest} calls in one second: {:?}", stats.provider, stats.accepted_ms);
        assert_eq!(stats.count(429), 0, "{} was called beyond its limit", stats.provider);
    }
    assert!(b.stats().count(200) > 0 && c.stats().count(200) > 0, "no overflow: {by_provider:?}");
    assert_eq!(a.stats().count(200) + b.stats().count(200) + c.stats().count(200), 30);
}

/// `a` answers every call 429 (`Retry-After: 1`): in the chain `a>b>c` its calls overflow to b
/// and c within the same attempt (no retry, no failure), and every task succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_overflows_past_a_provider_answering_429() {
    let _serial = SERIAL.lock().await;
    let (a, b, c) = (mock("a", 1.0).await, mock("b", 0.0).await, mock("c", 0.0).await);
    let fleet = chain_fleet("overflow429", &a, &b, &c);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let tasks: Vec<TaskEnvelope> = (0..10).map(|i| search(&format!("q{i}"))).collect();
    let started = Instant::now();
    fleet.submit_all(&client, &tasks).await;
    let counts = fleet.wait_final(&pool, 10, Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert_eq!(counts.get("succeeded"), Some(&10), "{counts:?}\n{}", fleet.logs());

    let by_provider = by_provider(&pool).await;
    let (sa, sb, sc) = (a.stats(), b.stats(), c.stats());
    println!(
        "10 calls over a>b>c, a answering 429: {by_provider:?} in {took:?}; a: {} 429s, b: {} 429s, c: {} 429s",
        sa.count(429),
        sb.count(429),
        sc.count(429)
    );
    assert!(sa.count(429) > 0, "a was never called");
    assert_eq!(sa.count(200), 0);
    assert_eq!(sb.count(200) + sc.count(200), 10, "{by_provider:?}");
    assert_eq!((sb.count(429), sc.count(429)), (0, 0), "b or c was called beyond its limit");
    assert!(!by_provider.contains_key("a"), "{by_provider:?}");
    // Each task succeeded at its first attempt: the 429 was not an error of the attempt.
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempt FROM tasks").fetch_all(&pool).await.unwrap();
    assert!(attempts.iter().all(|&n| n == 1), "attempts {attempts:?}");
}
