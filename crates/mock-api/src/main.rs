//! `taskfleet-mock-api`: a stand-in for outside LLM and search APIs, for tests, examples and
//! benchmarks. See the library's documentation for the routes.

use clap::Parser;
use std::net::SocketAddr;
use taskfleet_mock_api::{Behaviour, DEFAULT_ADDR, MockApi, MockConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "taskfleet-mock-api", version, about = "Mock LLM (OpenAI-style) and search API")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "TASKFLEET_MOCK_ADDR", default_value = DEFAULT_ADDR)]
    addr: SocketAddr,
    /// Provider name, shown in replies, search results and stats.
    #[arg(long, env = "TASKFLEET_MOCK_NAME", default_value = "mock")]
    name: String,
    /// Wait before every answer, in milliseconds.
    #[arg(long, env = "TASKFLEET_MOCK_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Extra wait, uniform in 0..=jitter, in milliseconds.
    #[arg(long, env = "TASKFLEET_MOCK_JITTER_MS", default_value_t = 0)]
    jitter_ms: u64,
    /// Probability (0..1) of answering 500.
    #[arg(long, env = "TASKFLEET_MOCK_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// Probability (0..1) of answering 429 with Retry-After.
    #[arg(long, env = "TASKFLEET_MOCK_RATE_429", default_value_t = 0.0)]
    rate_429: f64,
    /// Retry-After of the injected 429s, in seconds.
    #[arg(long, env = "TASKFLEET_MOCK_RETRY_AFTER_S", default_value_t = 1)]
    retry_after_s: u64,
    /// Server-side limit in requests a second (token bucket, 429 beyond it); 0 for none.
    #[arg(long, env = "TASKFLEET_MOCK_LIMIT_PER_S", default_value_t = 0.0)]
    limit_per_s: f64,
    /// Requests the limit allows at once; 0 for max(1, limit-per-s).
    #[arg(long, env = "TASKFLEET_MOCK_LIMIT_BURST", default_value_t = 0.0)]
    limit_burst: f64,
    /// Seed of the RNG behind jitter and injected errors.
    #[arg(long, env = "TASKFLEET_MOCK_SEED", default_value_t = 0)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let behaviour = Behaviour {
        latency_ms: args.latency_ms,
        jitter_ms: args.jitter_ms,
        error_rate: args.error_rate,
        rate_429: args.rate_429,
        retry_after_s: args.retry_after_s,
        limit_per_s: args.limit_per_s,
        limit_burst: args.limit_burst,
    };
    let mock = MockApi::start(MockConfig { addr: args.addr, name: args.name, seed: args.seed, behaviour }).await?;
    mock.run_until(taskfleet_service::wait_for_signal()).await?;
    tracing::info!("mock API stopped");
    Ok(())
}
