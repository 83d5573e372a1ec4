//! The in-memory index a worker searches: unit vectors in one contiguous matrix, scanned
//! exactly (a dot product per row).

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
    pub(super) fn front_expired(&self, now_ms: u64) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
