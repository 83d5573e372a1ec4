//! Pulling: one loop per dispatch consumer, filling its priority lane up to the prefetch
//! budget.

use crate::WorkerStats;
use crate::lanes::{Delivery, Lanes};
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use taskfleet_proto::Priority;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How often a puller ticks its liveness beat at the least: each pull request expires after
/// 5 s, and waits for a free prefetch place or for the next message tick this often too.
const TICK: Duration = Duration::from_secs(5);

/// Longest silence of a puller before `/healthz` fails: many times [`TICK`], so only a loop
/// stuck in one await (not an idle queue, a busy worker or a NATS outage) trips it.
pub(crate) const MAX_SILENCE: Duration = Duration::from_secs(60);

/// Pulls one consumer into its lane, keeping at most `prefetch` of its tasks buffered.
pub(crate) async fn run(
    consumer: PullConsumer,
    priority: Priority,
    prefetch: usize,
    lanes: Arc<Lanes>,
    stop: CancellationToken,
    stats: Arc<WorkerStats>,
    beat: taskfleet_service::Beat,
) {
    let budget = Arc::new(Semaphore::new(prefetch));
    let name = consumer.cached_info().name.clone();
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        beat.tick();
        // Wait for at least one free place, then ask for as many as are free.
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = budget.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = tokio::time::sleep(TICK) => continue,
        };
        let mut permits = vec![first];
        while let Ok(p) = budget.clone().try_acquire_owned() {
            permits.push(p);
        }
        let want = permits.len();
        // No idle heartbeat on purpose: async-nats' `Batch` swallows a heartbeat without
        // re-arming its waker, so a message arriving after one would sit unread until the
        // client-side timeout and then be dropped with the batch (lost until `ack_wait`).
        // Without heartbeats the server's 408 at `expires` ends an idle batch cleanly.
        let batch = consumer.batch().max_messages(want).expires(Duration::from_secs(5)).messages().await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "pull request failed, retrying");
                drop(permits);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            beat.tick();
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = batch.next() => n,
                _ = tokio::time::sleep(TICK) => continue,
            };
            match next {
                Some(Ok(msg)) => {
                    let Some(permit) = permits.pop() else {
                        // More than asked for cannot happen; hand it back rather than overfill.
                        let _ = msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                        continue;
                    };
                    stats.buffered.fetch_add(1, Ordering::Relaxed);
                    if let Some(d) = lanes.push(Delivery {
                        msg,
                        priority: priority.index(),
                        permit: Some(permit),
                        granted: Vec::new(),
                        deferred_since: None,
                    }) {
                        stats.buffered.fetch_sub(1, Ordering::Relaxed);
                        let _ = d.msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(consumer = %name, error = %e, "pull batch ended with an error");
                    break;
                }
                None => break,
            }
        }
    }
}
