//! What the semantic cache's search costs: lookups in a worker's exact cosine index
//! ([`VectorIndex`]) at N entries of D dimensions, the cost of building it, and (with Redis)
//! storing the entries in the fleet's streams, a fresh worker's sync of all of them, its memory
//! per entry, and lookups through [`SemanticStore`](taskfleet_shared_state::SemanticStore)
//! (sync, scan on the blocking pool, and the hit's result read by id).
//!
//! `cargo run --release -p taskfleet-shared-state --example semantic_bench` (`ENTRIES`, default
//! 100000; `DIMS`, 256; `QUERIES`, 1000; `REDIS_URL`, default `redis://127.0.0.1:6379`, `-` to
//! skip the Redis part). Queries are stored vectors plus noise (cosine ≈ 0.9 to their source,
//! ≈ 0 to the rest), so every lookup is a hit at threshold 0.8.

use std::time::{Duration, Instant};
use taskfleet_config::RedisConfig;
use taskfleet_shared_state::{SemanticKey, SemanticLookup, SharedState, VectorIndex, cosine};

fn var(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: reproducible vectors without a dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vector(&mut self, dims: usize) -> Vec<f32> {
        (0..dims).map(|_| self.next_f32()).collect()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{what}: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs ({} lookups)",
        us(percentile(&times, 0.5)),
        us(percentile(&times, 0.99)),
        us(times[times.len() - 1]),
        times.len()
    );
}

fn main() {
    let (entries, dims, queries) = (var("ENTRIES", 100_000), var("DIMS", 256), var("QUERIES", 1000));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let vectors: Vec<Vec<f32>> = (0..entries).map(|_| rng.vector(dims)).collect();
    let probes: Vec<(usize, Vec<f32>)> = (0..queries)
        .map(|i| {
            let source = (i * 7919) % entries;
            let noise = rng.vector(dims);
            (source, vectors[source].iter().zip(&noise).map(|(v, n)| v + 0.45 * n).collect())
        })
        .collect();
    let similarity: f32 = probes.iter().map(|(s, q)| cosine(&vectors[*s], q)).sum::<f32>() / queries as f32;
    println!("{entries} entries of {dims} dims, {queries} queries (mean cosine to their source {similarity:.2})");

    // Building: what a worker does when it syncs entries (normalise, append to the matrix).
    let started = Instant::now();
    let mut index = VectorIndex::new(dims);
    for (i, v) in vectors.iter().enumerate() {
        index.insert(v, u64::MAX, i);
    }
    let built = started.elapsed();
    println!(
        "exact index build: {:.0} ms ({:.2} µs per entry), {:.0} MiB of vectors",
        built.as_secs_f64() * 1e3,
        built.as_secs_f64() * 1e6 / entries as f64,
        (entries * dims * 4) as f64 / (1 << 20) as f64
    );

    let mut times = Vec::with_capacity(queries);
    let mut right = 0;
    for (source, q) in &probes {
        let t = Instant::now();
        let found = index.nearest(q, 0);
        times.push(t.elapsed());
        if found.is_some_and(|(i, s)| *i == *source && s >= 0.8) {
            right += 1;
        }
    }
    println!("exact lookups found the source at ≥ 0.8 for {right} of {queries} queries");
    report("exact lookup (scan)", times);

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if url == "-" {
        return;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return eprintln!("no runtime: {e}"),
    };
    runtime.block_on(redis_part(&url, &vectors, &probes));
}

/// Stores the entries in a private stream, then measures a fresh worker's first lookup (a full
/// sync) and its lookups after (incremental syncs with nothing new, then the scan).
async fn redis_part(url: &str, vectors: &[Vec<f32>], probes: &[(usize, Vec<f32>)]) {
    let prefix = format!("taskfleet-bench:{}:", std::process::id());
    let cfg = RedisConfig {
        url: url.into(),
        key_prefix: prefix.clone(),
        op_timeout: Duration::from_secs(30),
        ..RedisConfig::default()
    };
    let connect = async || SharedState::connect_and_wait(&cfg, Duration::from_secs(5)).await;
    let (writer, reader) = match (connect().await, connect().await) {
        (Ok(w), Ok(r)) if w.is_up() => (w.semantic(1 << 20), r.semantic(1 << 20).with_sync_interval(Duration::ZERO)),
        _ => return eprintln!("Redis at {url} unreachable: skipping the Redis part"),
    };
    let key = SemanticKey {
        name: "bench".into(),
        model: "bench".into(),
        ttl: Duration::from_secs(3600),
        max_entries: vectors.len() as u64,
    };
    let result =
        serde_json::json!({ "text": "a result of about a hundred bytes, standing in for what a handler returns." });
    let started = Instant::now();
    let chunks: Vec<Vec<Vec<f32>>> = vectors.chunks(vectors.len().div_ceil(32)).map(|c| c.to_vec()).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let (writer, key, result) = (writer.clone(), key.clone(), result.clone());
        tasks.push(tokio::spawn(async move {
            for v in chunk {
                if writer.store(&key, &v, &result, Some(0.001)).await.is_err() {
                    return false;
                }
            }
            true
        }));
    }
    for t in tasks {
        if !t.await.unwrap_or(false) {
            return eprintln!("a store failed: skipping the rest of the Redis part");
        }
    }
    let stored = started.elapsed();
    println!(
        "redis: stored {} entries in {:.1} s ({:.0} µs each, 32 at a time)",
        vectors.len(),
        stored.as_secs_f64(),
        stored.as_secs_f64() * 1e6 / vectors.len() as f64
    );
    let mut first = Vec::new();
    let started = Instant::now();
    while reader.local_len(&key).await < vectors.len() && started.elapsed() < Duration::from_secs(120) {
        let t = Instant::now();
        reader.lookup(&key, &probes[0].1, 0.8).await;
        first.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let elapsed = started.elapsed();
    first.sort_by(f64::total_cmp);
    let (len, bytes) = (reader.local_len(&key).await, reader.local_bytes(&key).await);
    println!(
        "redis: a fresh worker read all {len} entries in {:.2} s over {} lookups (median {:.0} ms, longest {:.0} ms)",
        elapsed.as_secs_f64(),
        first.len(),
        first.get(first.len() / 2).copied().unwrap_or_default(),
        first.last().copied().unwrap_or_default(),
    );
    println!(
        "redis: the reader's index holds {:.1} MiB, {:.0} bytes per entry ({} of vector)",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / len.max(1) as f64,
        vectors[0].len() * 4
    );
    let mut times = Vec::new();
    let mut hits = 0;
    for (_, q) in probes {
        let t = Instant::now();
        if matches!(reader.lookup(&key, q, 0.8).await, SemanticLookup::Hit(_)) {
            hits += 1;
        }
        times.push(t.elapsed());
    }
    println!("redis: {hits} of {} lookups hit", probes.len());
    report("lookup with an incremental sync each (sync interval 0), the scan and the hit's read", times);
    let _ = writer_cleanup(&cfg, &prefix).await;
}

async fn writer_cleanup(cfg: &RedisConfig, prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(cfg.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("DEL")
        .arg(format!("{prefix}semantic:bench:bench"))
        .arg(format!("{prefix}semantic-results:bench:bench"))
        .query_async::<()>(&mut conn)
        .await
}
