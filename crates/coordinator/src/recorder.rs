//! Recording worker events in Postgres, batched, then releasing dependents and telling
//! watchers which tasks became final.

use crate::{Ctx, dispatch};
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_bus::COORDINATOR_CONSUMER;
use taskfleet_proto::{
    CommittedBatch, CommittedTask, EventBatch, TaskEvent, decode, encode, headers,
};
use tokio_util::sync::CancellationToken;

/// Event messages pulled per request; each carries up to a worker's event batch.
const MESSAGES_PER_PULL: usize = 256;

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let consumer = ctx
        .topology
        .events_consumer(COORDINATOR_CONSUMER, (MESSAGES_PER_PULL * 8) as i64)
        .await?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(MESSAGES_PER_PULL)
        .expires(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("cannot pull events: {e}"))?;
    let mut chunks = messages.ready_chunks(MESSAGES_PER_PULL);
    let limit = ctx.config.coordinator.event_batch_size;
    loop {
        let chunk = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = chunks.next() => match c { Some(c) => c, None => return Err(anyhow::anyhow!("event stream ended")) },
        };
        // Group messages so that each transaction holds about `event_batch_size` events.
        let mut group: Vec<Message> = Vec::new();
        let mut events: Vec<TaskEvent> = Vec::new();
        for m in chunk.into_iter().filter_map(|m| m.ok()) {
            let ct = m
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::CONTENT_TYPE))
                .map(|v| v.as_str().to_string());
            match decode::<EventBatch>(&m.payload, ct.as_deref(), 64 << 20) {
                Ok(batch) => {
                    events.extend(batch.events);
                    group.push(m);
                }
                Err(e) => {
                    // Nothing can make this message readable later: count it and drop it.
                    metrics::counter!("taskfleet_coordinator_malformed_events_total").increment(1);
                    tracing::error!(subject = %m.subject, error = %e, "undecodable event message, terminating it");
                    let _ = m.ack_with(AckKind::Term).await;
                }
            }
            if events.len() >= limit {
                record(
                    &ctx,
                    std::mem::take(&mut group),
                    std::mem::take(&mut events),
                )
                .await;
            }
        }
        if !group.is_empty() {
            record(&ctx, group, events).await;
        }
    }
}

async fn record(ctx: &Ctx, msgs: Vec<Message>, events: Vec<TaskEvent>) {
    let outcome = match ctx.store.record_events(&events).await {
        Ok(o) => o,
        Err(e) => {
            metrics::counter!("taskfleet_coordinator_store_errors_total", "op" => "record")
                .increment(1);
            tracing::error!(error = %e, events = events.len(), "cannot record events; will retry");
            for m in &msgs {
                let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
            return;
        }
    };
    metrics::counter!("taskfleet_coordinator_events_total").increment(events.len() as u64);
    metrics::counter!("taskfleet_coordinator_events_ignored_total")
        .increment(outcome.ignored as u64);
    metrics::counter!("taskfleet_coordinator_finalized_total")
        .increment(outcome.finalized.len() as u64);

    if !outcome.released.is_empty() {
        let out = outcome
            .released
            .iter()
            .map(|env| dispatch::message(&ctx.topology, env, None))
            .collect();
        if let Err(e) = dispatch::publish(&ctx.topology, out).await {
            // The released rows are committed as queued. Redelivering these events would find
            // the parents already final and release nothing, so the rescuer must pick them up.
            tracing::error!(error = %e, tasks = outcome.released.len(), "cannot dispatch released dependents");
        }
    }
    for m in &msgs {
        if let Err(e) = m.ack().await {
            tracing::warn!(error = %e, "acknowledging an event message failed; it will be redelivered and ignored");
        }
    }
    let mut by_queue: HashMap<&str, Vec<CommittedTask>> = HashMap::new();
    for f in &outcome.finalized {
        by_queue
            .entry(f.queue.as_str())
            .or_default()
            .push(CommittedTask {
                id: f.id,
                state: f.state,
            });
    }
    for (queue, tasks) in by_queue {
        let body = Bytes::from(encode(&CommittedBatch { tasks }));
        if let Err(e) = ctx
            .client
            .publish(ctx.topology.subjects.committed(queue), body)
            .await
        {
            tracing::debug!(error = %e, "cannot publish committed notification");
        }
    }
}
