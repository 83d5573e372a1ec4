//! `POST /v1/embeddings`: OpenAI-shaped embeddings that stand in for a real model's. A text's
//! vector is built from its lowercase words and their character trigrams, hashed into
//! `dimensions` signed buckets and normalised, so texts sharing most of their words are close
//! (cosine similarity near 1), unrelated texts are near 0, and equal texts get equal vectors.

use crate::api::count_tokens;
use serde::{Deserialize, Serialize};

/// Dimensions of a vector when the request names none.
pub const DEFAULT_DIMENSIONS: usize = 256;
/// Most dimensions a request may ask for.
pub const MAX_DIMENSIONS: usize = 3072;
/// Most texts one request may embed (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// One text or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// A single text.
    One(String),
    /// Several texts, embedded in order.
    Many(Vec<String>),
}

/// The JSON body of `POST /v1/embeddings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    /// Model name; any non-blank name is accepted.
    pub model: String,
    /// What to embed.
    pub input: EmbeddingInput,
    /// Length of each vector ([`DEFAULT_DIMENSIONS`] if absent, at most [`MAX_DIMENSIONS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<usize>,
}

/// One vector of an [`EmbeddingResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: String,
    /// Position of its text in the request.
    pub index: usize,
    /// The vector, of unit length.
    pub embedding: Vec<f32>,
}

/// Token counts of an embeddings request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    /// Sum of [`count_tokens`] over the texts.
    pub prompt_tokens: u32,
    /// The same (embeddings have no completion).
    pub total_tokens: u32,
}

/// The answer to `POST /v1/embeddings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: String,
    /// One vector per text, in order.
    pub data: Vec<Embedding>,
    /// The model, as requested.
    pub model: String,
    /// Token counts.
    pub usage: EmbeddingUsage,
}

impl EmbeddingRequest {
    /// The texts, after checking what serde cannot: a model, 1..=[`MAX_INPUTS`] non-empty texts,
    /// 1..=[`MAX_DIMENSIONS`] dimensions.
    pub(crate) fn texts(&self) -> Result<Vec<&str>, String> {
        if self.model.trim().is_empty() {
            return Err("'model' must not be blank".into());
        }
        let texts: Vec<&str> = match &self.input {
            EmbeddingInput::One(t) => vec![t.as_str()],
            EmbeddingInput::Many(ts) => ts.iter().map(String::as_str).collect(),
        };
        if texts.is_empty() || texts.len() > MAX_INPUTS {
            return Err(format!("'input' must hold 1..={MAX_INPUTS} texts"));
        }
        if texts.iter().any(|t| t.is_empty()) {
            return Err("'input' texts must not be empty".into());
        }
        if !(1..=MAX_DIMENSIONS).contains(&self.dimensions.unwrap_or(DEFAULT_DIMENSIONS)) {
            return Err(format!("'dimensions' must be in 1..={MAX_DIMENSIONS}"));
        }
        Ok(texts)
    }
}

/// FNV-1a, 64 bits: a stable hash of a feature.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The mock's vector of `text`: its words (weight 2) and their character trigrams (weight 1),
/// each added with a sign to a bucket picked by its hash, then scaled to unit length.
pub fn embed(text: &str, dimensions: usize) -> Vec<f32> {
    let n = dimensions.max(1);
    let mut v = vec![0f32; n];
    let mut add = |feature: &[u8], weight: f32| {
        let h = fnv1a(feature);
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        v[(h % n as u64) as usize] += sign * weight;
    };
    let lower = text.to_lowercase();
    for word in lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        add(word.as_bytes(), 2.0);
        let chars: Vec<char> = format!(" {word} ").chars().collect();
        for w in chars.windows(3) {
            add(w.iter().collect::<String>().as_bytes(), 1.0);
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The answer to a checked request.
pub(crate) fn embeddings_response(req: &EmbeddingRequest, texts: &[&str]) -> EmbeddingResponse {
    let dimensions = req.dimensions.unwrap_or(DEFAULT_DIMENSIONS);
    let tokens: u32 = texts.iter().map(|t| count_tokens(t)).fold(0u32, u32::saturating_add);
    EmbeddingResponse {
        object: "list".into(),
        data: texts
            .iter()
            .enumerate()
            .map(|(index, t)| Embedding { object: "embedding".into(), index, embedding: embed(t, dimensions) })
            .collect(),
        model: req.model.clone(),
        usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn similar_texts_are_close_and_unrelated_ones_are_not() {
        let a = embed("How do I cook fresh pasta at home?", 256);
        let b = embed("how to cook fresh pasta at home", 256);
        let c = embed("Quarterly revenue of semiconductor vendors", 256);
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-5, "unit length");
        assert_eq!(a, embed("How do I cook fresh pasta at home?", 256), "deterministic");
        assert!(cosine(&a, &b) > 0.8, "paraphrase: {}", cosine(&a, &b));
        assert!(cosine(&a, &c).abs() < 0.3, "unrelated: {}", cosine(&a, &c));
    }

    #[test]
    fn requests_are_checked() {
        let req = |v: serde_json::Value| serde_json::from_value::<EmbeddingRequest>(v).expect("parses");
        assert_eq!(req(serde_json::json!({"model": "e", "input": ["a", "b"]})).texts().map(|t| t.len()), Ok(2));
        assert!(req(serde_json::json!({"model": "e", "input": []})).texts().is_err());
        assert!(req(serde_json::json!({"model": "e", "input": [""]})).texts().is_err());
        assert!(req(serde_json::json!({"model": " ", "input": "a"})).texts().is_err());
        assert!(req(serde_json::json!({"model": "e", "input": "a", "dimensions": 0})).texts().is_err());
        let r = req(serde_json::json!({"model": "e", "input": "abcdefgh", "dimensions": 8}));
        let out = embeddings_response(&r, &r.texts().unwrap_or_default());
        assert_eq!((out.data[0].embedding.len(), out.usage.prompt_tokens), (8, 2));
    }
}
