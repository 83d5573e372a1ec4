//! The event consumer: counts every task event (its own durable consumer on the event stream)
//! into the live figures and Prometheus, holding each message's acknowledgement until the
//! rollup that counts it is written (see [`crate::flusher`]).

use crate::{Ctx, lock};
use async_nats::jetstream::{AckKind, Message};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use taskfleet_proto::{EventBatch, MAX_MESSAGE_BYTES, TaskEvent, now_ms};

/// Longest silence of the consumer before `/healthz` fails: idle it ticks every
/// [`taskfleet_bus::IDLE_TICK`] (5 s), and counting a batch takes only memory; 60 s leaves room
/// for a slow re-open of the consumer.
const MAX_SILENCE: Duration = Duration::from_secs(60);

/// Consumes events until `stop` resolves.
pub(crate) async fn run(ctx: &Arc<Ctx>, stop: impl Future<Output = ()>) {
    let topology = &ctx.topology;
    let beat = ctx.liveness.register("event consumer", MAX_SILENCE);
    taskfleet_bus::consume_batches(
        "aggregator events",
        256,
        // Bodies are dropped once counted (only ack subjects are held), so this bounds the
        // decoded batch in memory; a pull must fit the largest message the server takes.
        (8 << 20).max(2 * ctx.client.server_info().max_payload),
        stop,
        || beat.tick(),
        || async {
            let opened = topology.bind_aggregator_consumer().await;
            ctx.consumer_bound.store(opened.is_ok(), Ordering::Relaxed);
            opened
        },
        |msgs| count_batch(ctx.clone(), msgs),
    )
    .await;
}

/// Counts the events of every message and holds their acknowledgements; an undecodable
/// message is terminated (nothing can make it readable later) and counted.
async fn count_batch(ctx: Arc<Ctx>, msgs: Vec<Message>) {
    let now = now_ms();
    let mut events = 0u64;
    let mut keep = Vec::with_capacity(msgs.len());
    {
        let mut stats = lock(&ctx.stats);
        for msg in msgs {
            match taskfleet_bus::decode_message::<EventBatch>(&msg, MAX_MESSAGE_BYTES) {
                Ok(batch) => {
                    events += batch.events.len() as u64;
                    for ev in &batch.events {
                        stats.observe(ev, now);
                        observe_prometheus(ev);
                    }
                    if let Some(reply) = msg.reply.clone() {
                        keep.push(reply);
                    }
                }
                Err(e) => {
                    metrics::counter!("taskfleet_aggregator_malformed_events_total").increment(1);
                    tracing::warn!(error = %e, "undecodable event message, terminating it");
                    tokio::spawn(async move {
                        let _ = msg.ack_with(AckKind::Term).await;
                    });
                }
            }
        }
        lock(&ctx.held).extend(keep);
    }
    metrics::counter!("taskfleet_aggregator_events_total").increment(events);
}

/// Prometheus histograms and counters per queue, kind and priority (seconds, as Prometheus
/// names them).
fn observe_prometheus(ev: &TaskEvent) {
    let labels =
        [("queue", ev.queue.clone()), ("kind", ev.task_kind.clone()), ("priority", ev.priority.as_str().to_string())];
    metrics::counter!(
        "taskfleet_task_events_total",
        &[&labels[..], &[("event", ev.kind.as_str().to_string())]].concat()
    )
    .increment(1);
    if let Some(t) = ev.timings.filter(|t| t.finished_at > 0 && t.started_at > 0) {
        if ev.attempt == 1 {
            metrics::histogram!("taskfleet_task_queue_wait_seconds", &labels)
                .record(t.started_at.saturating_sub(t.created_at) as f64 / 1e3);
        }
        metrics::histogram!("taskfleet_task_run_seconds", &labels)
            .record(t.finished_at.saturating_sub(t.started_at) as f64 / 1e3);
        if ev.kind.is_final() {
            metrics::histogram!("taskfleet_task_end_to_end_seconds", &labels)
                .record(t.finished_at.saturating_sub(t.created_at) as f64 / 1e3);
        }
    }
    if ev.cache_hit {
        metrics::counter!("taskfleet_task_cache_hits_total", &labels).increment(1);
    }
    if let Some(tok) = ev.tokens {
        metrics::counter!("taskfleet_task_tokens_total", &[&labels[..], &[("type", "prompt".to_string())]].concat())
            .increment(tok.prompt);
        metrics::counter!(
            "taskfleet_task_tokens_total",
            &[&labels[..], &[("type", "completion".to_string())]].concat()
        )
        .increment(tok.completion);
    }
    if let Some(c) = ev.cost_usd {
        metrics::counter!("taskfleet_task_cost_microdollars_total", &labels).increment((c * 1e6).round() as u64);
    }
}
