//! The shared store of the semantic cache, and the in-memory index every worker searches.
//!
//! An entry is a key text's embedding (little-endian `f32` bytes), the result JSON, what
//! computing it cost and when it was stored. Entries of one policy (a kind, and the embedding
//! model, so that vectors of different models never meet) are appended to two Redis Streams
//! under the same ids: `<prefix>semantic:<name>:<model>` holds the vectors,
//! `<prefix>semantic-results:<name>:<model>` the results and costs. An id is Redis' clock at the
//! append; each append drops the entries older than the TTL (`XADD … MINID`) and beyond the
//! policy's cap (`XTRIM … MAXLEN`), and refreshes both keys' expiry, so an idle policy's
//! streams disappear by themselves.
//!
//! Redis 7.0 has no vector search and Postgres here has no pgvector, so the search is in each
//! worker's memory: a [`VectorIndex`] per policy (an exact cosine scan over a contiguous `f32`
//! matrix) of the vectors and their ids only, at most the policy's cap of them. Before a lookup
//! the worker reads the vectors appended since the last one it has (`XRANGE` from that id, at
//! most once per [`SYNC_INTERVAL`]), in rounds small enough to answer well within
//! `redis.op_timeout` (about [`SYNC_REPLY_BYTES`] each, fewer after a timeout) and at most
//! [`SYNC_ROUNDS`] of them per lookup (a worker catching up on a large stream goes on at its
//! next lookups). A hit's result is read by its id (`XRANGE id id`, one more round trip on a
//! hit only). No lock is held across a Redis call: one lookup at a time syncs a policy (the
//! others search the index as it is), the fetched vectors are added under a short write lock,
//! and a scan holds a read lock (on the blocking thread pool when the index is large). When
//! Redis does not answer the lookup is a [`SemanticLookup::Unavailable`] (the caller runs the
//! task without the cache), counted in `taskfleet_redis_fallback_total{op="semantic_sync"}`
//! (or `semantic_fetch`).

use crate::{SharedState, SharedStateError};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Appends an entry stamped with Redis' clock to both streams, drops the entries older than the
/// TTL or beyond the cap and refreshes the streams' expiry. KEYS = vectors, results; ARGV =
/// vector, result, cost, ttl ms, most entries. The trim is exact (`=`): an approximate one
/// (`~`) only drops whole stream nodes of 100 entries, and would let a small cap be exceeded.
const APPEND: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
local minid = math.max(now - ttl, 0)
local id = redis.call('XADD', KEYS[1], 'MINID', '=', minid, '*', 'v', ARGV[1])
redis.call('XADD', KEYS[2], 'MINID', '=', minid, id, 'r', ARGV[2], 'c', ARGV[3])
redis.call('XTRIM', KEYS[1], 'MAXLEN', '=', ARGV[5])
redis.call('XTRIM', KEYS[2], 'MAXLEN', '=', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return id
"#;

/// How stale a lookup's view of the fleet's entries may be: an entry stored by one worker is a
/// hit on every other within this. Not a setting: it is small next to the embedding call every
/// lookup makes first (tens of milliseconds and more), and what it costs when nothing is new is
/// one empty `XRANGE` per policy per worker per interval.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// About how many bytes of vectors one sync `XRANGE` asks for (its `COUNT` is this over an
/// entry's size: 492 entries at 256 dimensions, 84 at 1,536), so that the reply comes well
/// within `redis.op_timeout` (about 1 ms over a local network).
pub const SYNC_REPLY_BYTES: usize = 512 * 1024;

/// `COUNT` of the first `XRANGE` of a policy, before its vectors' size is known (at most 768
/// KiB at 3,072 dimensions).
const SYNC_FIRST_COUNT: usize = 64;

/// Most `XRANGE` calls of one lookup's sync (about 4 MiB of vectors): a worker starting beside
/// a large stream reads it over its first lookups rather than stalling one.
pub const SYNC_ROUNDS: usize = 8;

/// Indexes of more floats than this (about 1,000 vectors of 256 dimensions, a scan of well
/// under 0.1 ms) are scanned on the blocking thread pool rather than on the async runtime.
const INLINE_SCAN_FLOATS: usize = 1 << 18;

/// Bytes a vector entry adds to a sync reply besides its floats (id, field name, framing).
const ENTRY_OVERHEAD: usize = 40;

/// Where a policy's entries live, how long they stay and how many are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SemanticKey {
    /// The policy's name: a task kind, or a name a handler chooses.
    pub name: String,
    /// The embedding model (entries of different models are kept apart).
    pub model: String,
    /// How long an entry stays usable.
    pub ttl: Duration,
    /// Most entries kept, in Redis and in every worker's index (the oldest are dropped).
    pub max_entries: u64,
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
    /// Rows before this one are evicted (compacted away once they are a quarter of the matrix).
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
        self.compact();
    }

    /// Drops the oldest rows until at most `max` are held.
    pub fn keep_newest(&mut self, max: usize) {
        self.head = self.head.max(self.rows.len().saturating_sub(max));
        self.compact();
    }

    /// Bytes the index holds (its vectors and rows, with the vectors' spare capacity).
    pub fn memory_bytes(&self) -> usize {
        self.data.capacity() * size_of::<f32>() + self.rows.capacity() * size_of::<(u64, T)>()
    }

    /// True when the oldest held row has expired at `now_ms`.
    fn front_expired(&self, now_ms: u64) -> bool {
        self.rows.get(self.head).is_some_and(|(expires, _)| *expires <= now_ms)
    }

    /// Moves the held rows to the front once the evicted ones are a quarter of the matrix (at
    /// most a third more rows than held, and each insertion copies about three rows).
    fn compact(&mut self) {
        if self.head > 0 && self.head * 4 >= self.rows.len() {
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

/// A stream entry's id, `MS-SEQ` (`ms` is when Redis stored it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct EntryId {
    ms: u64,
    seq: u64,
}

impl std::str::FromStr for EntryId {
    type Err = ();

    fn from_str(s: &str) -> Result<EntryId, ()> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        Ok(EntryId { ms: ms.parse().map_err(|_| ())?, seq: seq.parse().map_err(|_| ())? })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An `XRANGE` reply: ids and their fields' names and values.
type Entries = Vec<(String, Vec<Vec<u8>>)>;

/// A worker's index of one policy: vectors and their entries' ids (the results stay in Redis).
type Index = Option<VectorIndex<EntryId>>;

/// How far a worker has read one policy's vectors.
#[derive(Debug)]
struct Cursor {
    /// The last entry read (`0-0` before the first).
    last: EntryId,
    /// When the last sync caught up; `None` makes the next lookup sync.
    synced_at: Option<Instant>,
    /// `COUNT` of the next `XRANGE` (halved after a timeout, doubled after a reply up to
    /// about [`SYNC_REPLY_BYTES`]).
    count: usize,
}

/// One policy in this worker.
#[derive(Debug)]
struct Partition {
    /// Held by the one lookup that syncs (across its Redis calls; the others wait for it at
    /// most one Redis call's timeout, then search the index as it is).
    cursor: tokio::sync::Mutex<Cursor>,
    /// Written only to add what a sync read (and drop what expired), never across a Redis call.
    index: Arc<tokio::sync::RwLock<Index>>,
    /// This worker stored an entry: its next lookup syncs whatever the interval.
    stale: AtomicBool,
}

/// The semantic cache's store: the Redis streams and this worker's indexes. Cheap to clone;
/// clones share the indexes.
#[derive(Clone, Debug)]
pub struct SemanticStore {
    state: SharedState,
    partitions: Arc<Mutex<HashMap<SemanticKey, Arc<Partition>>>>,
    sync_interval: Duration,
    max_bytes: usize,
    /// `COUNT` of a policy's first `XRANGE` ([`SYNC_FIRST_COUNT`]; tests raise it).
    first_count: usize,
    append: Arc<redis::Script>,
}

impl SemanticStore {
    pub(crate) fn new(state: SharedState, max_bytes: usize) -> SemanticStore {
        SemanticStore {
            state,
            partitions: Default::default(),
            sync_interval: SYNC_INTERVAL,
            max_bytes,
            first_count: SYNC_FIRST_COUNT,
            append: Arc::new(redis::Script::new(APPEND)),
        }
    }

    /// Sets how stale a lookup's view of the fleet's entries may be (default
    /// [`SYNC_INTERVAL`]; benchmarks and tests use zero).
    pub fn with_sync_interval(mut self, every: Duration) -> SemanticStore {
        self.sync_interval = every;
        self
    }

    /// How stale a lookup's view of the fleet's entries may be.
    pub fn sync_interval(&self) -> Duration {
        self.sync_interval
    }

    fn partition(&self, key: &SemanticKey) -> Arc<Partition> {
        let mut map = match self.partitions.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Partition {
                    cursor: tokio::sync::Mutex::new(Cursor {
                        last: EntryId::default(),
                        synced_at: None,
                        count: self.first_count,
                    }),
                    index: Default::default(),
                    stale: AtomicBool::new(false),
                })
            })
            .clone()
    }

    fn vectors_key(&self, key: &SemanticKey) -> String {
        self.state.key(&["semantic", &key.name, &key.model])
    }

    fn results_key(&self, key: &SemanticKey) -> String {
        self.state.key(&["semantic-results", &key.name, &key.model])
    }

    /// Entries in this worker's index of `key` (after its last sync).
    pub async fn local_len(&self, key: &SemanticKey) -> usize {
        self.partition(key).index.read().await.as_ref().map_or(0, VectorIndex::len)
    }

    /// Bytes this worker's index of `key` holds.
    pub async fn local_bytes(&self, key: &SemanticKey) -> usize {
        self.partition(key).index.read().await.as_ref().map_or(0, VectorIndex::memory_bytes)
    }

    /// The most similar live entry of `key` whose similarity to `vector` is at least
    /// `threshold`, after reading the entries other workers stored (if the last read is older
    /// than the sync interval; a lookup arriving while another reads waits for that read, at
    /// most `redis.op_timeout`).
    pub async fn lookup(&self, key: &SemanticKey, vector: &[f32], threshold: f32) -> SemanticLookup {
        let part = self.partition(key);
        // While another lookup syncs, wait for it (what it reads may be this lookup's hit), but
        // no longer than one Redis call: past that, search the index as it is.
        let cursor = match part.cursor.try_lock() {
            Ok(cursor) => Some(cursor),
            Err(_) => tokio::time::timeout(self.state.op_timeout(), part.cursor.lock()).await.ok(),
        };
        if let Some(mut cursor) = cursor {
            let due = part.stale.swap(false, Ordering::AcqRel)
                || cursor.synced_at.is_none_or(|t| t.elapsed() >= self.sync_interval);
            if due && self.sync(key, &part, &mut cursor).await.is_err() {
                part.stale.store(true, Ordering::Release);
                return SemanticLookup::Unavailable;
            }
        }
        let Some((id, similarity)) = Self::nearest(&part, vector).await else { return SemanticLookup::Miss };
        if similarity < threshold {
            return SemanticLookup::Miss;
        }
        match self.fetch(key, id).await {
            Ok(Some((result, cost_usd))) => SemanticLookup::Hit(SemanticHit { result, cost_usd, similarity }),
            Ok(None) => {
                tracing::debug!(stream = %self.results_key(key), %id, "semantic hit whose result is gone: a miss");
                SemanticLookup::Miss
            }
            Err(_) => SemanticLookup::Unavailable,
        }
    }

    /// The index's most similar live entry, scanned on the blocking pool when the index is large.
    async fn nearest(part: &Partition, vector: &[f32]) -> Option<(EntryId, f32)> {
        let now = now_ms();
        let index = part.index.clone().read_owned().await;
        let ix = index.as_ref()?;
        if ix.len() * ix.dim() < INLINE_SCAN_FLOATS {
            return ix.nearest(vector, now).map(|(id, s)| (*id, s));
        }
        let vector = vector.to_vec();
        let scan = move || index.as_ref().and_then(|ix| ix.nearest(&vector, now)).map(|(id, s)| (*id, s));
        tokio::task::spawn_blocking(scan).await.ok().flatten()
    }

    /// An entry's result and cost, by its id (`None` when it is gone).
    async fn fetch(&self, key: &SemanticKey, id: EntryId) -> Result<Option<(Value, Option<f64>)>, SharedStateError> {
        let (stream, id) = (self.results_key(key), id.to_string());
        let entries: Entries = self
            .state
            .run("semantic_fetch", async move |mut conn| {
                redis::cmd("XRANGE").arg(&stream).arg(&id).arg(&id).query_async(&mut conn).await
            })
            .await?;
        Ok(entries.first().and_then(|(_, fields)| decode_result(fields)))
    }

    /// Reads the vectors appended after the last one this worker has into its index, in at most
    /// [`SYNC_ROUNDS`] calls. An error of the first call is the lookup's; after a later one the
    /// lookup goes on with what was read (the next lookup syncs again).
    async fn sync(&self, key: &SemanticKey, part: &Partition, cursor: &mut Cursor) -> Result<(), SharedStateError> {
        let stream = self.vectors_key(key);
        for round in 0..SYNC_ROUNDS {
            let count = cursor.count;
            let (s, start) = (stream.clone(), format!("({}", cursor.last));
            let reply: Result<Entries, _> = self
                .state
                .run("semantic_sync", async move |mut conn| {
                    redis::cmd("XRANGE")
                        .arg(&s)
                        .arg(&start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(count)
                        .query_async(&mut conn)
                        .await
                })
                .await;
            let entries = match reply {
                Ok(entries) => entries,
                Err(e) => {
                    if matches!(e, SharedStateError::Timeout(_)) && count > 1 {
                        cursor.count = (count / 2).max(1);
                        tracing::warn!(%stream, count = cursor.count, "semantic sync timed out: reading fewer entries a call");
                    }
                    cursor.synced_at = None;
                    return if round == 0 { Err(e) } else { Ok(()) };
                }
            };
            let fetched = entries.len();
            let mut rows = Vec::with_capacity(fetched);
            for (id, fields) in entries {
                let Ok(id) = id.parse::<EntryId>() else { continue };
                cursor.last = id;
                match decode_vector(&fields) {
                    Some(vector) => rows.push((id, vector)),
                    None => tracing::debug!(%stream, %id, "semantic entry without a usable vector ignored"),
                }
            }
            let target = match self.apply(key, part, rows).await {
                Some(dim) => (SYNC_REPLY_BYTES / (dim * size_of::<f32>() + ENTRY_OVERHEAD)).max(1),
                None => self.first_count,
            };
            cursor.count = count.saturating_mul(2).min(target);
            if fetched < count {
                cursor.synced_at = Some(Instant::now());
                return Ok(());
            }
        }
        // Behind still: the next lookup reads on.
        cursor.synced_at = None;
        Ok(())
    }

    /// Adds `rows` (in stream order) to the index, rebuilding it when a vector's dimension
    /// differs from the index's (the model's dimensions changed: the older vectors cannot be
    /// compared with the new ones), then drops what expired and what is beyond the cap. Returns
    /// the index's dimension.
    async fn apply(&self, key: &SemanticKey, part: &Partition, rows: Vec<(EntryId, Vec<f32>)>) -> Option<usize> {
        let now = now_ms();
        let max = usize::try_from(key.max_entries).unwrap_or(usize::MAX).max(1);
        if rows.is_empty() {
            let index = part.index.read().await;
            let ix = index.as_ref()?;
            if !ix.front_expired(now) && ix.len() <= max {
                return Some(ix.dim());
            }
        }
        let (index, name, ttl_ms) = (part.index.clone(), key.name.clone(), key.ttl.as_millis() as u64);
        let stream = self.vectors_key(key);
        // On the blocking pool: a compaction moves the whole matrix.
        let add = move || {
            let mut index = index.blocking_write();
            for (id, vector) in rows {
                if let Some(ix) = index.as_ref().filter(|ix| ix.dim() != vector.len()) {
                    tracing::warn!(%stream, %id, from = ix.dim(), to = vector.len(), dropped = ix.len(),
                                   "semantic entries of another dimension: index rebuilt");
                    metrics::counter!("taskfleet_semantic_index_rebuilds_total", "kind" => name.clone()).increment(1);
                    *index = None;
                }
                let ix = index.get_or_insert_with(|| VectorIndex::new(vector.len()));
                if !ix.insert(&vector, id.ms.saturating_add(ttl_ms), id) {
                    tracing::debug!(%stream, %id, "semantic entry of a zero vector ignored");
                }
            }
            let ix = index.as_mut()?;
            ix.evict_expired(now);
            ix.keep_newest(max);
            Some(ix.dim())
        };
        tokio::task::spawn_blocking(add).await.ok().flatten()
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
        let (vectors, results, script) = (self.vectors_key(key), self.results_key(key), self.append.clone());
        let (ttl_ms, max) = (key.ttl.as_millis().max(1) as u64, key.max_entries.max(1));
        self.state
            .run("semantic_store", async move |mut conn| {
                script
                    .key(&vectors)
                    .key(&results)
                    .arg(bytes)
                    .arg(result)
                    .arg(cost)
                    .arg(ttl_ms)
                    .arg(max)
                    .invoke_async::<String>(&mut conn)
                    .await
            })
            .await?;
        self.partition(key).stale.store(true, Ordering::Release);
        Ok(())
    }
}

fn now_ms() -> u64 {
    crate::now_us() as u64 / 1000
}

/// The value of field `name` in an entry's fields.
fn field<'a>(fields: &'a [Vec<u8>], name: &[u8]) -> Option<&'a [u8]> {
    fields.chunks_exact(2).find(|pair| pair[0] == name).map(|pair| pair[1].as_slice())
}

/// An entry's vector (field `v`).
fn decode_vector(fields: &[Vec<u8>]) -> Option<Vec<f32>> {
    let v = field(fields, b"v").filter(|v| !v.is_empty() && v.len() % 4 == 0)?;
    Some(v.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// An entry's result and cost (fields `r`, `c`).
fn decode_result(fields: &[Vec<u8>]) -> Option<(Value, Option<f64>)> {
    let result = serde_json::from_slice(field(fields, b"r")?).ok()?;
    let cost = field(fields, b"c").and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse().ok());
    Some((result, cost))
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
        // The cap drops the oldest.
        for i in 0..10 {
            assert!(index.insert(&unit(4, i % 4), 1000, "n"));
        }
        index.keep_newest(3);
        assert_eq!(index.len(), 3);
        assert!(index.memory_bytes() >= 3 * 4 * 4);
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
        let key =
            SemanticKey { name: "echo".into(), model: "emb".into(), ttl: Duration::from_secs(60), max_entries: 100 };

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
        let key =
            SemanticKey { name: "fetch".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 100 };
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
        let key =
            SemanticKey { name: "conc".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 1000 };
        for i in 0..300 {
            a.store(&key, &spread(8, i), &json!(i), None).await.unwrap();
        }
        // 20 lookups at once on a worker that has read nothing yet: one syncs, the others wait
        // for it instead of searching an empty index.
        let lookups: Vec<_> = (0..20)
            .map(|i| {
                let (b, key) = (b.clone(), key.clone());
                tokio::spawn(async move {
                    matches!(b.lookup(&key, &spread(8, 280 + i), 0.999).await, SemanticLookup::Hit(_))
                })
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
        let key =
            SemanticKey { name: "dims".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 100 };
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
        let key =
            SemanticKey { name: "big".into(), model: "m".into(), ttl: Duration::from_secs(60), max_entries: 2_000 };
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
}
