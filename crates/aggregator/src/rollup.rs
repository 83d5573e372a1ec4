//! Conversion between a series' per-minute [`Slot`] and the rollup row stored in Postgres
//! (histograms in HdrHistogram's V2 encoding).

use crate::slot::{Counts, Slot, histogram};
use crate::stats::SeriesKey;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use taskfleet_store::Rollup;

/// The row of one series' minute.
pub fn to_rollup(minute: u64, key: SeriesKey, slot: &Slot) -> Rollup {
    let c = &slot.counts;
    let n = |v: u64| v as i64;
    Rollup {
        minute_ms: minute as i64,
        queue: key.queue,
        kind: key.kind,
        priority: key.priority,
        finals: n(c.finals),
        succeeded: n(c.succeeded),
        failed: n(c.failed),
        dead: n(c.dead),
        cancelled: n(c.cancelled),
        retries: n(c.retries),
        attempts: n(c.attempts),
        cache_hits: n(c.cache_hits),
        prompt_tokens: n(c.prompt_tokens),
        completion_tokens: n(c.completion_tokens),
        cost_usd: c.cost_usd,
        saved_usd: c.saved_usd,
        queue_wait: serialize(&slot.queue_wait),
        run: serialize(&slot.run),
        end_to_end: serialize(&slot.end_to_end),
    }
}

/// The series and slot a row holds (negative counts read as zero, unreadable histograms as empty).
pub fn from_rollup(r: Rollup) -> (SeriesKey, Slot) {
    let n = |v: i64| v.max(0) as u64;
    let counts = Counts {
        finals: n(r.finals),
        succeeded: n(r.succeeded),
        failed: n(r.failed),
        dead: n(r.dead),
        cancelled: n(r.cancelled),
        retries: n(r.retries),
        attempts: n(r.attempts),
        cache_hits: n(r.cache_hits),
        prompt_tokens: n(r.prompt_tokens),
        completion_tokens: n(r.completion_tokens),
        cost_usd: r.cost_usd,
        saved_usd: r.saved_usd,
    };
    let slot = Slot {
        counts,
        queue_wait: deserialize(r.queue_wait),
        run: deserialize(r.run),
        end_to_end: deserialize(r.end_to_end),
    };
    (SeriesKey { queue: r.queue, kind: r.kind, priority: r.priority }, slot)
}

fn serialize(h: &Histogram<u64>) -> Option<Vec<u8>> {
    if h.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    V2Serializer::new().serialize(h, &mut out).ok()?;
    Some(out)
}

fn deserialize(bytes: Option<Vec<u8>>) -> Histogram<u64> {
    let mut h = histogram();
    if let Some(b) = bytes
        && let Ok(d) = Deserializer::new().deserialize::<u64, _>(&mut b.as_slice())
    {
        let _ = h.add(&d);
    }
    h
}
