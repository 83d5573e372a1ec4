//! Publishing task events in batches, and acknowledging dispatch messages only once their
//! events are stored.

use async_nats::jetstream::{self, AckKind, Message, message::PublishMessage};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_proto::{
    CONTENT_TYPE_MSGPACK, EventBatch, EventKind, Priority, Subjects, TaskErrorInfo, TaskEvent, encode, headers,
};
use tokio::sync::{Semaphore, mpsc};

/// What to do with the dispatch message once its event is stored in JetStream.
// Nearly every event carries its message (`Ack`); boxing it would cost an allocation per task.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AfterPublish {
    /// Done with it.
    Ack(Message),
    /// Nothing (progress and start events).
    Nothing,
}

/// Event batches published and awaiting their acknowledgement at once.
const MAX_IN_FLIGHT: usize = 64;

pub(crate) struct Outbound {
    pub event: TaskEvent,
    pub after: AfterPublish,
}

/// An event encoded for its batch.
struct Encoded {
    bytes: Vec<u8>,
    after: AfterPublish,
}

/// Handle for queuing events; cheap to clone.
#[derive(Clone)]
pub(crate) struct EventSender {
    tx: mpsc::UnboundedSender<Outbound>,
}

impl EventSender {
    pub fn send(&self, event: TaskEvent, after: AfterPublish) {
        if let Err(mpsc::error::SendError(out)) = self.tx.send(Outbound { event, after }) {
            // The publisher is gone (shutdown). Without an ack JetStream redelivers the task
            // after ack_wait, so nothing is lost.
            tracing::warn!(task_id = %out.event.task_id, "event publisher stopped; task will be redelivered");
        }
    }
}

/// Starts the publisher task. It collects events for up to `linger` or `batch_size` events
/// (a lone event is not held back), publishes them as [`EventBatch`]es per queue and priority,
/// each at most `max_bytes` long (below the server's `max_payload`), and after the JetStream
/// acknowledgement performs each event's [`AfterPublish`]. Publishing never waits for earlier
/// batches' acknowledgements, so several batches are in flight at once.
/// How often an idle (or waiting) publisher ticks its liveness beat.
const IDLE_TICK: Duration = Duration::from_secs(5);

pub(crate) fn spawn_publisher(
    js: jetstream::Context,
    subjects: Subjects,
    batch_size: usize,
    linger: Duration,
    max_bytes: usize,
    beat: taskfleet_service::Beat,
) -> (EventSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let handle = tokio::spawn(async move {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut buf: Vec<Outbound> = Vec::with_capacity(batch_size);
        loop {
            beat.tick();
            // Idle: wake every 5 s to tick.
            match tokio::time::timeout(IDLE_TICK, rx.recv_many(&mut buf, batch_size)).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => continue,
            }
            // A lone event with nothing else in flight goes out at once (low load: latency
            // matters). When several were waiting, or earlier batches are still in flight, more
            // are on their way: wait `linger` to fill the batch.
            let busy = buf.len() > 1 || in_flight.available_permits() < MAX_IN_FLIGHT;
            if busy && buf.len() < batch_size && !linger.is_zero() {
                tokio::time::sleep(linger).await;
                while buf.len() < batch_size {
                    match rx.try_recv() {
                        Ok(o) => buf.push(o),
                        Err(_) => break,
                    }
                }
            }
            let mut by_lane: HashMap<(String, Priority), Vec<Encoded>> = HashMap::new();
            for o in buf.drain(..) {
                let lane = (o.event.queue.clone(), o.event.priority);
                by_lane.entry(lane).or_default().push(encode_within(o, max_bytes));
            }
            for ((queue, priority), encoded) in by_lane {
                for batch in cut_by_bytes(encoded, max_bytes) {
                    // Waiting for batches in flight (NATS slow or reconnecting) is not a wedge.
                    let permit = loop {
                        match tokio::time::timeout(IDLE_TICK, in_flight.clone().acquire_owned()).await {
                            Ok(Ok(p)) => break p,
                            Ok(Err(_)) => return,
                            Err(_) => beat.tick(),
                        }
                    };
                    let js = js.clone();
                    let subject = subjects.events(&queue, priority);
                    tokio::spawn(async move {
                        publish_batch(&js, subject, batch).await;
                        drop(permit);
                    });
                }
            }
        }
        // Wait for the batches still in flight.
        let _ = in_flight.acquire_many(MAX_IN_FLIGHT as u32).await;
    });
    (EventSender { tx }, handle)
}

/// Encodes an event, making it fit in one message: an attempt whose result is too large to
/// publish ends `failed` with `result_too_large` (running it again would give the same
/// result), one whose spawn is too large ends `failed` with `spawn_too_large`, and a progress
/// report too large loses its value.
fn encode_within(o: Outbound, max_bytes: usize) -> Encoded {
    let Outbound { mut event, after } = o;
    if let Some(problem) = event.result.as_ref().and_then(|r| taskfleet_proto::check_json(r).err()) {
        event.spawn = None;
        // Postgres could not store it (a NUL character) or the fleet could not read it back
        // (nested too deep): a clear failure now, not a rejected batch later.
        metrics::counter!("taskfleet_worker_results_unstorable_total").increment(1);
        unstorable(&mut event, format!("the result cannot be stored: {problem}"));
        return Encoded { bytes: encode(&event), after };
    }
    let bytes = encode(&event);
    let room = max_bytes.saturating_sub(EventBatch::ENVELOPE_BYTES);
    if bytes.len() <= room {
        return Encoded { bytes, after };
    }
    metrics::counter!("taskfleet_worker_results_too_large_total").increment(1);
    tracing::warn!(task_id = %event.task_id, bytes = bytes.len(), limit = room, kind = event.kind.as_str(),
                   "event too large to publish; its result is dropped");
    let message = format!(
        "the attempt's {} bytes of events exceed the largest message the NATS server takes ({room} bytes)",
        bytes.len()
    );
    if event.spawn.is_some() {
        // Children and join that do not fit one message: the spawn cannot be recorded.
        event.kind = EventKind::Failed;
        event.error = Some(TaskErrorInfo { code: "spawn_too_large".into(), message, retryable: false });
    } else if matches!(event.kind, EventKind::Succeeded | EventKind::Retrying | EventKind::Dead | EventKind::Failed) {
        event.kind = EventKind::Failed;
        event.error = Some(TaskErrorInfo { code: "result_too_large".into(), message, retryable: false });
        event.retry_in_ms = None;
    }
    event.spawn = None;
    event.stop_run = false;
    event.result = None;
    if let Some(e) = &mut event.error {
        e.message.truncate(4096);
    }
    Encoded { bytes: encode(&event), after }
}

/// Ends an attempt's event as `failed` with `result_unstorable` (a progress report just loses
/// its value).
fn unstorable(event: &mut TaskEvent, message: String) {
    if event.kind != EventKind::Progress && event.kind != EventKind::Started {
        event.kind = EventKind::Failed;
        event.error = Some(TaskErrorInfo { code: "result_unstorable".into(), message, retryable: false });
        event.retry_in_ms = None;
    }
    event.result = None;
}

/// Splits a lane's events into batches of at most `max_bytes` each.
fn cut_by_bytes(encoded: Vec<Encoded>, max_bytes: usize) -> Vec<Vec<Encoded>> {
    let room = max_bytes.saturating_sub(EventBatch::ENVELOPE_BYTES);
    let mut batches: Vec<Vec<Encoded>> = Vec::new();
    let mut size = 0;
    for e in encoded {
        if batches.is_empty() || size + e.bytes.len() > room {
            batches.push(Vec::new());
            size = 0;
        }
        size += e.bytes.len();
        if let Some(b) = batches.last_mut() {
            b.push(e);
        }
    }
    batches
}

/// Publishes one batch, retrying until JetStream stores it: finished work is never thrown
/// away while the worker lives. While it retries (NATS unreachable), the batch's dispatch
/// messages get in-progress acks so that they are not redelivered to run again; if the worker
/// stops first they are redelivered after `ack_wait` (at-least-once).
async fn publish_batch(js: &jetstream::Context, subject: String, batch: Vec<Encoded>) {
    let (parts, afters): (Vec<Vec<u8>>, Vec<AfterPublish>) = batch.into_iter().map(|e| (e.bytes, e.after)).unzip();
    let n = parts.len();
    let body = bytes::Bytes::from(EventBatch::assemble(&parts));
    drop(parts);
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let publish = PublishMessage::build().payload(body.clone()).header(headers::CONTENT_TYPE, CONTENT_TYPE_MSGPACK);
        let result = match js.send_publish(subject.clone(), publish).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                metrics::counter!("taskfleet_worker_event_batches_total").increment(1);
                metrics::counter!("taskfleet_worker_events_total").increment(n as u64);
                for after in afters {
                    apply(after).await;
                }
                return;
            }
            Err(e) => {
                metrics::counter!("taskfleet_worker_event_publish_failures_total").increment(1);
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::warn!(%subject, attempt, events = n, error = %e, "publishing events failed; retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                for after in &afters {
                    keep_alive(after).await;
                }
            }
        }
    }
}

/// An in-progress ack for the dispatch message behind an event that waits to be published.
async fn keep_alive(after: &AfterPublish) {
    if let AfterPublish::Ack(m) = after {
        let _ = m.ack_with(AckKind::Progress).await;
    }
}

async fn apply(after: AfterPublish) {
    let AfterPublish::Ack(msg) = after else { return };
    if let Err(e) = msg.ack().await {
        // A lost ack means a redelivery, which the coordinator recognises by task id.
        tracing::warn!(error = %e, "acknowledging a dispatch message failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(result_bytes: usize) -> Outbound {
        let mut e = TaskEvent::new(uuid::Uuid::now_v7(), EventKind::Succeeded, "default");
        e.result = Some(serde_json::Value::String("x".repeat(result_bytes)));
        Outbound { event: e, after: AfterPublish::Nothing }
    }

    #[test]
    fn batches_are_cut_below_the_byte_limit() {
        let encoded: Vec<Encoded> = (0..40).map(|_| encode_within(outbound(300_000), 1 << 20)).collect();
        let batches = cut_by_bytes(encoded, 1 << 20);
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 40);
        for b in &batches {
            let parts: Vec<&[u8]> = b.iter().map(|e| e.bytes.as_slice()).collect();
            assert!(EventBatch::assemble(&parts).len() <= 1 << 20);
        }
        assert_eq!(batches.len(), 14, "three 300 KB results per 1 MiB message");
    }

    #[test]
    fn a_result_postgres_cannot_hold_fails_its_task_clearly() {
        let mut o = outbound(10);
        o.event.result = Some(serde_json::json!({ "body": "a\u{0}b" }));
        let ev: TaskEvent = taskfleet_proto::decode(&encode_within(o, 1 << 20).bytes, None, 1 << 20).expect("decodes");
        assert_eq!((ev.kind, ev.error.expect("an error").code.as_str()), (EventKind::Failed, "result_unstorable"));
    }

    #[test]
    fn a_result_larger_than_a_message_fails_its_task_clearly() {
        let e = encode_within(outbound(2 << 20), 1 << 20);
        let ev: TaskEvent = taskfleet_proto::decode(&e.bytes, None, 1 << 20).expect("decodes");
        assert_eq!(ev.kind, EventKind::Failed);
        assert_eq!(ev.error.expect("an error").code, "result_too_large");
        assert!(ev.result.is_none());
    }

    #[test]
    fn a_spawn_larger_than_a_message_fails_its_task_clearly() {
        let mut o = outbound(10);
        o.event.kind = EventKind::Spawned;
        let children = (0..20_000)
            .map(|i| taskfleet_proto::NodeSpec::new("", "search", serde_json::json!({ "query": format!("topic {i}") })))
            .collect();
        let join = taskfleet_proto::NodeSpec::new("", "collect", serde_json::Value::Null);
        o.event.spawn = Some(Box::new(taskfleet_proto::Spawn { children, join, on_child_failure: Default::default() }));
        let e = encode_within(o, 1 << 20);
        assert!(e.bytes.len() < 1 << 20);
        let ev: TaskEvent = taskfleet_proto::decode(&e.bytes, None, 1 << 20).expect("decodes");
        assert_eq!((ev.kind, ev.error.expect("an error").code.as_str()), (EventKind::Failed, "spawn_too_large"));
        assert!(ev.spawn.is_none());
    }
}
