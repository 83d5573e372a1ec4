//! The semantic store against a real Redis (a key prefix of its own per test).

use super::*;
use serde_json::json;
use taskfleet_config::RedisConfig;

fn unit(dim: usize, i: usize) -> Vec<f32> {
    let mut v = vec![0.0; dim];
    v[i] = 1.0;
    v
}

fn redis(prefix: &taskfleet_test_support::RedisPrefix, key_prefix: &str) -> RedisConfig {
    RedisConfig {
        url: prefix.url.clone(),
        key_prefix: key_prefix.into(),
        op_timeout: Duration::from_millis(500),
        ..RedisConfig::default()
    }
}

#[tokio::test]
async fn entries_sync_across_workers_expire_and_respect_the_threshold() {
    let prefix = taskfleet_test_support::RedisPrefix::new("semantic");
    let cfg = redis(&prefix, &prefix.prefix);
    let a = SharedState::connect_and_wait(&cfg, Duration::from_secs(5)).await.unwrap().semantic(1 << 20);
    let b = SharedState::connect_and_wait(&cfg, Duration::from_secs(5)).await.unwrap().semantic(1 << 20);
    // Another fleet (its own key prefix) on the same Redis sees nothing of this one's.
    let other_cfg = redis(&prefix, &format!("{}other:", prefix.prefix));
    let other = SharedState::connect_and_wait(&other_cfg, Duration::from_secs(5)).await.unwrap().semantic(1 << 20);
    let key = SemanticKey { name: "echo".into(), model: "emb".into(), ttl: Duration::from_secs(60), max_entries: 100 };

    assert_eq!(a.lookup(&key, &unit(8, 0), 0.8).await, SemanticLookup::Miss);
    assert_eq!(b.lookup(&key, &unit(8, 0), 0.8).await, SemanticLookup::Miss);
    let mut stored = unit(8, 0);
    stored[1] = 0.5;
    a.store(&key, &stored, &json!({"text": "hi"}), Some(0.25)).await.unwrap();
    // The writer sees its own entry at once; the other worker after its sync interval.
    let SemanticLookup::Hit(hit) = a.lookup(&key, &unit(8, 0), 0.8).await else { panic!("no hit on a") };
    assert_eq!((hit.result, hit.cost_usd), (json!({"text": "hi"}), Some(0.25)));
    assert!((hit.similarity - 2.0 / 5f32.sqrt()).abs() < 1e-5, "{}", hit.similarity);
    tokio::time::sleep(b.sync_interval()).await;
    assert!(matches!(b.lookup(&key, &unit(8, 0), 0.8).await, SemanticLookup::Hit(_)));
    // Below the threshold, or unrelated: a miss.
    assert_eq!(b.lookup(&key, &unit(8, 0), 0.95).await, SemanticLookup::Miss);
    assert_eq!(b.lookup(&key, &unit(8, 3), 0.8).await, SemanticLookup::Miss);
    assert_eq!(other.lookup(&key, &unit(8, 0), 0.8).await, SemanticLookup::Miss);
    // Another model is another index.
    let model2 = SemanticKey { model: "emb2".into(), ..key.clone() };
    assert_eq!(a.lookup(&model2, &unit(8, 0), 0.8).await, SemanticLookup::Miss);
    // Incremental: b has read one entry, then the next one only.
    a.store(&key, &unit(8, 3), &json!(3), None).await.unwrap();
    tokio::time::sleep(b.sync_interval()).await;
    let SemanticLookup::Hit(hit) = b.lookup(&key, &unit(8, 3), 0.8).await else { panic!("no hit") };
    assert_eq!((hit.result, hit.cost_usd), (json!(3), None));
    assert_eq!(b.local_len(&key).await, 2);

    // A short TTL: the entry is a hit, then expires in every index and in Redis.
    let short = SemanticKey { ttl: Duration::from_millis(300), name: "short".into(), ..key.clone() };
    a.store(&short, &unit(8, 5), &json!("brief"), None).await.unwrap();
    assert!(matches!(a.lookup(&short, &unit(8, 5), 0.8).await, SemanticLookup::Hit(_)));
    assert!(matches!(b.lookup(&short, &unit(8, 5), 0.8).await, SemanticLookup::Hit(_)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(a.lookup(&short, &unit(8, 5), 0.8).await, SemanticLookup::Miss);
    assert_eq!(b.lookup(&short, &unit(8, 5), 0.8).await, SemanticLookup::Miss);
    assert_eq!(b.local_len(&short).await, 0);
    let fresh = SharedState::connect_and_wait(&cfg, Duration::from_secs(5)).await.unwrap().semantic(1 << 20);
    assert_eq!(fresh.lookup(&short, &unit(8, 5), 0.8).await, SemanticLookup::Miss);

    // Too large a result is not stored.
    let tiny = SharedState::connect_and_wait(&cfg, Duration::from_secs(5)).await.unwrap().semantic(8);
    tiny.store(&key, &unit(8, 6), &json!("a result longer than eight bytes"), None).await.unwrap();
    assert_eq!(tiny.lookup(&key, &unit(8, 6), 0.8).await, SemanticLookup::Miss);

    // Redis unreachable: the lookup is unavailable and the store fails; nothing panics.
    let down = RedisConfig { url: "redis://127.0.0.1:1".into(), ..cfg };
    let down = SharedState::connect(&down).unwrap().semantic(1 << 20);
    assert_eq!(down.lookup(&key, &unit(8, 0), 0.8).await, SemanticLookup::Unavailable);
    assert!(down.store(&key, &unit(8, 0), &json!(1), None).await.is_err());
}

async fn connect(cfg: &RedisConfig) -> SemanticStore {
    SharedState::connect_and_wait(cfg, Duration::from_secs(5)).await.unwrap().semantic(1 << 20)
}

async fn xlen(cfg: &RedisConfig, key: &str) -> usize {
    let client = redis::Client::open(cfg.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("XLEN").arg(key).query_async(&mut conn).await.unwrap()
}

fn spread(dim: usize, i: usize) -> Vec<f32> {
    // Distinct unit-ish vectors: a peak at i (mod dim) and a little of the next index.
    let mut v = vec![0.0; dim];
    v[i % dim] = 1.0;
    v[(i / dim + i + 1) % dim] += 0.01 * (i / dim) as f32;
    v
}

#[tokio::test]
async fn hits_read_their_result_by_id_and_memory_holds_only_vectors() {
    let prefix = taskfleet_test_support::RedisPrefix::new("semantic-fetch");
    let cfg = redis(&prefix, &prefix.prefix);
    let (a, b) = (connect(&cfg).await, connect(&cfg).await);
    let key = SemanticKey { name: "fetch".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 100 };
    a.store(&key, &unit(4, 0), &json!({"long": "x".repeat(10_000)}), Some(1.5)).await.unwrap();
    a.store(&key, &unit(4, 1), &json!("second"), None).await.unwrap();
    let SemanticLookup::Hit(hit) = b.lookup(&key, &unit(4, 0), 0.9).await else { panic!("no hit") };
    assert_eq!((hit.result, hit.cost_usd), (json!({"long": "x".repeat(10_000)}), Some(1.5)));
    // The index holds vectors and ids, not the 10 KB result.
    assert_eq!(b.local_len(&key).await, 2);
    assert!(b.local_bytes(&key).await < 1_000, "{}", b.local_bytes(&key).await);
    let (vectors, results) = (b.vectors_key(&key), b.results_key(&key));
    assert_eq!((xlen(&cfg, &vectors).await, xlen(&cfg, &results).await), (2, 2));
    // The result is read at the hit: gone from Redis, the hit is a miss.
    let client = redis::Client::open(cfg.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("DEL").arg(&results).query_async::<()>(&mut conn).await.unwrap();
    assert_eq!(b.lookup(&key, &unit(4, 1), 0.9).await, SemanticLookup::Miss);
}

#[tokio::test]
async fn lookups_during_another_lookups_sync_see_what_it_reads() {
    let prefix = taskfleet_test_support::RedisPrefix::new("semantic-concurrent");
    let cfg = redis(&prefix, &prefix.prefix);
    let (a, b) = (connect(&cfg).await, connect(&cfg).await);
    let key = SemanticKey { name: "conc".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 1000 };
    for i in 0..300 {
        a.store(&key, &spread(8, i), &json!(i), None).await.unwrap();
    }
    // 20 lookups at once on a worker that has read nothing yet: one syncs, the others wait
    // for it instead of searching an empty index.
    let lookups: Vec<_> = (0..20)
        .map(|i| {
            let (b, key) = (b.clone(), key.clone());
            tokio::spawn(
                async move { matches!(b.lookup(&key, &spread(8, 280 + i), 0.999).await, SemanticLookup::Hit(_)) },
            )
        })
        .collect();
    let mut hits = Vec::new();
    for l in lookups {
        hits.push(l.await.unwrap());
    }
    assert!(hits.iter().all(|h| *h), "{hits:?}");
}

#[tokio::test]
async fn the_cap_holds_in_redis_and_in_every_index() {
    let prefix = taskfleet_test_support::RedisPrefix::new("semantic-cap");
    let cfg = redis(&prefix, &prefix.prefix);
    let (a, b) = (connect(&cfg).await, connect(&cfg).await);
    let key = SemanticKey { name: "cap".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 10 };
    // b reads the first 5, then the rest after they were trimmed in Redis.
    for i in 0..5 {
        a.store(&key, &unit(32, i), &json!(i), None).await.unwrap();
    }
    assert_eq!(
        b.lookup(&key, &unit(32, 0), 0.9).await.clone(),
        SemanticLookup::Hit(SemanticHit { result: json!(0), cost_usd: None, similarity: 1.0 })
    );
    for i in 5..25 {
        a.store(&key, &unit(32, i), &json!(i), None).await.unwrap();
    }
    assert_eq!(xlen(&cfg, &a.vectors_key(&key)).await, 10);
    assert_eq!(xlen(&cfg, &a.results_key(&key)).await, 10);
    let fresh = connect(&cfg).await;
    for store in [&a, &b, &fresh] {
        tokio::time::sleep(store.sync_interval()).await;
        assert_eq!(store.lookup(&key, &unit(32, 4), 0.9).await, SemanticLookup::Miss);
        assert_eq!(store.local_len(&key).await, 10);
        let SemanticLookup::Hit(hit) = store.lookup(&key, &unit(32, 24), 0.9).await else { panic!("no hit") };
        assert_eq!(hit.result, json!(24));
    }
}

#[tokio::test]
async fn a_change_of_dimensions_rebuilds_the_index() {
    let prefix = taskfleet_test_support::RedisPrefix::new("semantic-dims");
    let cfg = redis(&prefix, &prefix.prefix);
    let (a, b) = (connect(&cfg).await, connect(&cfg).await);
    let key = SemanticKey { name: "dims".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 100 };
    for i in 0..3 {
        a.store(&key, &unit(8, i), &json!(i), None).await.unwrap();
    }
    assert!(matches!(b.lookup(&key, &unit(8, 1), 0.9).await, SemanticLookup::Hit(_)));
    assert_eq!(b.local_len(&key).await, 3);
    // The model now answers in 16 dimensions: the new entries replace the old index.
    a.store(&key, &unit(16, 9), &json!("wide"), None).await.unwrap();
    a.store(&key, &unit(16, 10), &json!("wider"), None).await.unwrap();
    for store in [&a, &b, &connect(&cfg).await] {
        tokio::time::sleep(store.sync_interval()).await;
        let SemanticLookup::Hit(hit) = store.lookup(&key, &unit(16, 9), 0.9).await else { panic!("no hit") };
        assert_eq!(hit.result, json!("wide"));
        assert_eq!(store.local_len(&key).await, 2);
        assert_eq!(store.lookup(&key, &unit(8, 1), 0.9).await, SemanticLookup::Miss);
    }
}

#[tokio::test]
async fn a_sync_that_times_out_reads_less_and_catches_up() {
    let prefix = taskfleet_test_support::RedisPrefix::new("semantic-timeout");
    let cfg = redis(&prefix, &prefix.prefix);
    let writer = connect(&cfg).await;
    let key = SemanticKey { name: "big".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 2_000 };
    let (entries, dim) = (1_000, 2_048);
    for i in 0..entries {
        writer.store(&key, &spread(dim, i), &json!(i), None).await.unwrap();
    }
    // A reader whose first call asks for all 8 MiB of vectors, under a 5 ms timeout.
    let slow = RedisConfig { op_timeout: Duration::from_millis(5), ..cfg.clone() };
    let mut reader = connect(&slow).await;
    reader.first_count = 4 * entries;
    assert_eq!(reader.lookup(&key, &spread(dim, 0), 0.9).await, SemanticLookup::Unavailable);
    assert!(reader.partition(&key).cursor.lock().await.count < 4 * entries);
    // Later lookups read smaller batches, and catch up.
    let started = Instant::now();
    let mut lookups = 0;
    while reader.local_len(&key).await < entries {
        assert!(started.elapsed() < Duration::from_secs(30), "stuck at {}", reader.local_len(&key).await);
        reader.lookup(&key, &spread(dim, 0), 0.9).await;
        lookups += 1;
    }
    assert!(lookups > 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match reader.lookup(&key, &spread(dim, entries - 1), 0.9).await {
            SemanticLookup::Hit(hit) => break assert_eq!(hit.result, json!(entries - 1)),
            other => assert!(Instant::now() < deadline, "{other:?}"),
        }
    }
    let count = reader.partition(&key).cursor.lock().await.count;
    assert!(count <= SYNC_REPLY_BYTES / (dim * 4), "{count}");
}
