//! The shared store of the semantic cache, and the in-memory index every worker searches.
//!
//! An entry is a key text's embedding (unit-normalised, little-endian `f32` bytes), the result
//! JSON, what computing it cost and when it was stored. Entries of one policy (a kind, and the
//! embedding model, so that vectors of different models never meet) are appended to one Redis
//! Stream, `<prefix>semantic:<name>:<model>`: the entry id is Redis' clock at the append, each
//! append trims the entries older than the TTL (`XADD … MINID`) and refreshes the key's expiry,
//! so an idle policy's stream disappears by itself.
//!
//! Redis 7.0 has no vector search and Postgres here has no pgvector, so the search is in each
//! worker's memory: a [`VectorIndex`] per policy (an exact cosine scan over a contiguous `f32`
//! matrix). Before a lookup the worker fetches the entries appended since its last fetch, with
//! one `XRANGE` from the last id it has seen, at most once per
//! [`SemanticStore::sync_interval`]: an entry stored by one worker is a hit on every other
//! within that interval. When Redis does not answer the lookup is a
//! [`SemanticLookup::Unavailable`] (the caller runs the task without the cache), counted in
//! `taskfleet_redis_fallback_total{op="semantic_sync"}`.

use crate::{SharedState, SharedStateError};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Appends an entry stamped with Redis' clock, drops the entries older than the TTL and
/// refreshes the stream's expiry. KEYS[1] = stream; ARGV = vector, result, cost, ttl ms.
const APPEND: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
local id = redis.call('XADD', KEYS[1], 'MINID', '=', math.max(now - ttl, 0), '*', 'v', ARGV[1], 'r', ARGV[2], 'c', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
return id
"#;

/// Entries fetched per `XRANGE`; a worker catching up on a larger backlog asks again.
const SYNC_BATCH: usize = 2_000;

/// Most `XRANGE` calls of one sync (a worker starting beside a full cache reads it over several
/// lookups rather than stalling one).
const SYNC_ROUNDS: usize = 25;

/// Where a policy's entries live and how long they stay.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SemanticKey {
    /// The policy's name: a task kind, or a name a handler chooses.
    pub name: String,
    /// The embedding model (entries of different models are kept apart).
    pub model: String,
    /// How long an entry stays usable.
    pub ttl: Duration,
}

/// A stored result close enough to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticHit {
    /// The stored result.
    pub result: Value,
    /// What computing it cost, in US dollars (what this hit saves).
    pub cost_usd: Option<f64>,
    /// Cosine similarity between the query and the stored key text.
    pub similarity: f32,
}

/// The answer of [`SemanticStore::lookup`].
#[derive(Debug, Clone, PartialEq)]
pub enum SemanticLookup {
    /// The most similar live entry, at or above the threshold.
    Hit(SemanticHit),
    /// No live entry is that similar.
    Miss,
    /// Redis did not answer the sync: run without the cache.
    Unavailable,
}

/// An in-memory exact nearest-neighbour index over unit vectors, oldest first: cosine
/// similarity is a dot product over a contiguous row-major `f32` matrix. Rows expire at a time
/// given on insertion; expired rows are skipped by searches and dropped from the front by
/// [`VectorIndex::evict_expired`] (rows are inserted in stored-at order, so the expired ones
/// are at the front when every row has the same TTL).
#[derive(Debug, Clone)]
pub struct VectorIndex<T> {
    dim: usize,
    data: Vec<f32>,
    rows: Vec<(u64, T)>,
    /// Rows before this one are evicted (compacted away once they are half of the matrix).
    head: usize,
}

impl<T> VectorIndex<T> {
    /// An empty index of `dim`-dimensional vectors.
    pub fn new(dim: usize) -> VectorIndex<T> {
        VectorIndex { dim, data: Vec::new(), rows: Vec::new(), head: 0 }
    }

    /// Dimensions of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Live and not yet evicted rows.
    pub fn len(&self) -> usize {
        self.rows.len() - self.head
    }

    /// True when no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a row (normalised here) that expires at `expires_at_ms`. A vector of the wrong
    /// dimension, or of zero length, is refused (returns false).
    pub fn insert(&mut self, vector: &[f32], expires_at_ms: u64, value: T) -> bool {
        let Some(unit) = normalized(vector).filter(|v| v.len() == self.dim) else { return false };
        self.data.extend_from_slice(&unit);
        self.rows.push((expires_at_ms, value));
        true
    }

    /// Drops expired rows from the front.
    pub fn evict_expired(&mut self, now_ms: u64) {
        while self.head < self.rows.len() && self.rows[self.head].0 <= now_ms {
            self.head += 1;
        }
        if self.head > 0 && self.head * 2 >= self.rows.len() {
            self.rows.drain(..self.head);
            self.data.drain(..self.head * self.dim);
            self.head = 0;
        }
    }

    /// The most similar row not expired at `now_ms`, with its cosine similarity to `query`
    /// (normalised here); `None` when the index holds none or the query is unusable.
    pub fn nearest(&self, query: &[f32], now_ms: u64) -> Option<(&T, f32)> {
        let q = normalized(query).filter(|v| v.len() == self.dim)?;
        let mut best: Option<(usize, f32)> = None;
        for (i, row) in self.data.chunks_exact(self.dim).enumerate().skip(self.head) {
            if self.rows[i].0 <= now_ms {
                continue;
            }
            let s = dot(&q, row);
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
        best.map(|(i, s)| (&self.rows[i].1, s))
    }
}

/// Dot product in eight independent lanes (vectorised by the compiler).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Cosine similarity of two vectors (0 when either has zero length or they differ in length).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    match (normalized(a), normalized(b)) {
        (Some(a), Some(b)) if a.len() == b.len() => dot(&a, &b),
        _ => 0.0,
    }
}

/// `v` scaled to unit length; `None` for an empty, zero or non-finite vector.
fn normalized(v: &[f32]) -> Option<Vec<f32>> {
    let norm = dot(v, v).sqrt();
    (norm.is_finite() && norm > 0.0).then(|| v.iter().map(|x| x / norm).collect())
}

/// What a row of a worker's index points at.
#[derive(Debug)]
struct Stored {
    result: Value,
    cost_usd: Option<f64>,
}

/// One policy's index in this worker, and how far it has read the stream.
#[derive(Debug)]
struct Partition {
    index: Option<VectorIndex<Arc<Stored>>>,
    /// Id of the last stream entry read (`0-0` before the first).
    last_id: String,
    /// When the last sync succeeded; `None` forces the next lookup to sync.
    synced_at: Option<Instant>,
}

/// The semantic cache's store: the Redis streams and this worker's indexes. Cheap to clone;
/// clones share the indexes.
#[derive(Clone, Debug)]
pub struct SemanticStore {
    state: SharedState,
    partitions: Arc<Mutex<HashMap<SemanticKey, Arc<tokio::sync::Mutex<Partition>>>>>,
    sync_interval: Duration,
    max_bytes: usize,
    append: Arc<redis::Script>,
}

impl SemanticStore {
    pub(crate) fn new(state: SharedState, max_bytes: usize) -> SemanticStore {
        SemanticStore {
            state,
            partitions: Default::default(),
            sync_interval: Duration::from_millis(100),
            max_bytes,
            append: Arc::new(redis::Script::new(APPEND)),
        }
    }

    /// Sets how stale a lookup's view of the fleet's entries may be (default 100 ms).
    pub fn with_sync_interval(mut self, every: Duration) -> SemanticStore {
        self.sync_interval = every;
        self
    }

    /// How stale a lookup's view of the fleet's entries may be.
    pub fn sync_interval(&self) -> Duration {
        self.sync_interval
    }

    fn partition(&self, key: &SemanticKey) -> Arc<tokio::sync::Mutex<Partition>> {
        let mut map = match self.partitions.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(key.clone())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Partition { index: None, last_id: "0-0".into(), synced_at: None }))
            })
            .clone()
    }

    fn stream(&self, key: &SemanticKey) -> String {
        self.state.key(&["semantic", &key.name, &key.model])
    }

    /// Entries in this worker's index of `key` (after its last sync).
    pub async fn local_len(&self, key: &SemanticKey) -> usize {
        let part = self.partition(key);
        let part = part.lock().await;
        part.index.as_ref().map_or(0, VectorIndex::len)
    }

    /// The most similar live entry of `key` whose similarity to `vector` is at least
    /// `threshold`, after fetching the entries other workers stored (if the last fetch is older
    /// than the sync interval).
    pub async fn lookup(&self, key: &SemanticKey, vector: &[f32], threshold: f32) -> SemanticLookup {
        let part = self.partition(key);
        let mut part = part.lock().await;
        if part.synced_at.is_none_or(|t| t.elapsed() >= self.sync_interval) {
            if self.sync(key, &mut part).await.is_err() {
                return SemanticLookup::Unavailable;
            }
            part.synced_at = Some(Instant::now());
        }
        let now = crate::now_us() as u64 / 1000;
        let Some(index) = part.index.as_mut() else { return SemanticLookup::Miss };
        index.evict_expired(now);
        match index.nearest(vector, now) {
            Some((stored, similarity)) if similarity >= threshold => SemanticLookup::Hit(SemanticHit {
                result: stored.result.clone(),
                cost_usd: stored.cost_usd,
                similarity,
            }),
            _ => SemanticLookup::Miss,
        }
    }

    /// Reads the entries appended after the last one this worker has, into its index.
    async fn sync(&self, key: &SemanticKey, part: &mut Partition) -> Result<(), SharedStateError> {
        let stream = self.stream(key);
        let ttl_ms = key.ttl.as_millis() as u64;
        for _ in 0..SYNC_ROUNDS {
            let start = format!("({}", part.last_id);
            let stream = stream.clone();
            let entries: Vec<(String, Vec<Vec<u8>>)> = self
                .state
                .run("semantic_sync", async move |mut conn| {
                    redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg(&start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(SYNC_BATCH)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let fetched = entries.len();
            for (id, fields) in entries {
                let stored_ms = id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()).unwrap_or(0);
                if let Some((vector, stored)) = decode(&fields) {
                    let index = part.index.get_or_insert_with(|| VectorIndex::new(vector.len()));
                    if !index.insert(&vector, stored_ms.saturating_add(ttl_ms), Arc::new(stored)) {
                        tracing::debug!(stream = %self.stream(key), %id, "semantic entry of another dimension ignored");
                    }
                }
                part.last_id = id;
            }
            if fetched < SYNC_BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Appends an entry: `vector` is the key text's embedding, `cost_usd` what computing
    /// `result` cost. A result larger than `policies.cache_max_bytes` is not stored (`Ok`).
    /// This worker's next lookup of `key` syncs, so it sees the entry at once.
    pub async fn store(
        &self,
        key: &SemanticKey,
        vector: &[f32],
        result: &Value,
        cost_usd: Option<f64>,
    ) -> Result<(), SharedStateError> {
        let result = serde_json::to_vec(result).unwrap_or_default();
        if result.len() > self.max_bytes {
            metrics::counter!("taskfleet_cache_too_large_total", "kind" => key.name.clone()).increment(1);
            return Ok(());
        }
        let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        let cost = cost_usd.map(|c| c.to_string()).unwrap_or_default();
        let (stream, ttl_ms, script) = (self.stream(key), key.ttl.as_millis().max(1) as u64, self.append.clone());
        self.state
            .run("semantic_store", async move |mut conn| {
                script.key(&stream).arg(bytes).arg(result).arg(cost).arg(ttl_ms).invoke_async::<String>(&mut conn).await
            })
            .await?;
        self.partition(key).lock().await.synced_at = None;
        Ok(())
    }
}

/// An entry's fields (`v`, `r`, `c`, in any order) as its vector and stored result.
fn decode(fields: &[Vec<u8>]) -> Option<(Vec<f32>, Stored)> {
    let (mut vector, mut result, mut cost) = (None, None, None);
    for pair in fields.chunks_exact(2) {
        match pair[0].as_slice() {
            b"v" => vector = Some(&pair[1]),
            b"r" => result = Some(&pair[1]),
            b"c" => cost = Some(&pair[1]),
            _ => {}
        }
    }
    let vector = vector.filter(|v| !v.is_empty() && v.len() % 4 == 0)?;
    let vector = vector.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let result = serde_json::from_slice(result?).ok()?;
    let cost_usd = cost.and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse().ok());
    Some((vector, Stored { result, cost_usd }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use taskfleet_config::RedisConfig;

    fn unit(dim: usize, i: usize) -> Vec<f32> {
        let mut v = vec![0.0; dim];
        v[i] = 1.0;
        v
    }

    #[test]
    fn cosine_and_dot() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-6);
        assert!((cosine(&[1.0, 1.0], &[1.0, 0.0]) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), 0.0);
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), a.iter().map(|x| x * x).sum::<f32>());
    }

    #[test]
    fn index_nearest_threshold_and_expiry() {
        let mut index = VectorIndex::new(4);
        assert!(index.nearest(&unit(4, 0), 0).is_none());
        assert!(index.insert(&[2.0, 0.0, 0.0, 0.0], 100, "x"));
        assert!(index.insert(&[0.0, 1.0, 0.0, 0.0], 200, "y"));
        assert!(index.insert(&[1.0, 1.0, 0.0, 0.0], 300, "xy"));
        assert!(!index.insert(&[1.0, 0.0], 300, "short"));
        assert!(!index.insert(&[0.0; 4], 300, "zero"));
        let (v, s) = index.nearest(&[0.9, 0.1, 0.0, 0.0], 0).unwrap();
        assert_eq!(*v, "x");
        assert!(s > 0.99);
        // Expired rows are skipped, then evicted.
        assert_eq!(*index.nearest(&[0.9, 0.1, 0.0, 0.0], 100).unwrap().0, "xy");
        index.evict_expired(200);
        assert_eq!(index.len(), 1);
        assert_eq!(*index.nearest(&unit(4, 1), 200).unwrap().0, "xy");
        index.evict_expired(300);
        assert!(index.is_empty() && index.nearest(&unit(4, 1), 300).is_none());
        assert!(index.insert(&unit(4, 2), 400, "z"));
        assert_eq!(index.nearest(&unit(4, 2), 300).map(|(v, _)| *v), Some("z"));
    }

    fn redis(prefix: &taskfleet_test_support::RedisPrefix, key_prefix: &str) -> RedisConfig {
        RedisConfig { url: prefix.url.clone(), key_prefix: key_prefix.into(), op_timeout: Duration::from_millis(500) }
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
        let key = SemanticKey { name: "echo".into(), model: "emb".into(), ttl: Duration::from_secs(60) };

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
        let short = SemanticKey { name: "short".into(), model: "emb".into(), ttl: Duration::from_millis(300) };
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
}
