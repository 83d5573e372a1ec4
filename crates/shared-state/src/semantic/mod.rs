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
//! others wait for it at most `redis.op_timeout`, then search the index as it is), the fetched
//! vectors are added under a short write lock,
//! and a scan holds a read lock (on the blocking thread pool when the index is large). When
//! Redis does not answer the lookup is a [`SemanticLookup::Unavailable`] (the caller runs the
//! task without the cache), counted in `taskfleet_redis_fallback_total{op="semantic_sync"}`
//! (or `semantic_fetch`).

mod index;

pub use index::{VectorIndex, cosine, dot};

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
mod tests;
