//! Publishing task events in batches, and acknowledging dispatch messages only once their
//! events are stored.

use async_nats::jetstream::{self, AckKind, Message, message::PublishMessage};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfleet_proto::{CONTENT_TYPE_MSGPACK, EventBatch, Priority, Subjects, TaskEvent, encode, headers};
use tokio::sync::{Semaphore, mpsc};

/// What to do with the dispatch message once its event is stored in JetStream.
pub(crate) enum AfterPublish {
    /// Done with it.
    Ack(Message),
    /// Redeliver after the delay (a retry).
    Nak(Message, Duration),
    /// Nothing (progress and start events).
    Nothing,
}

/// Event batches published and awaiting their acknowledgement at once.
const MAX_IN_FLIGHT: usize = 64;

pub(crate) struct Outbound {
    pub event: TaskEvent,
    pub after: AfterPublish,
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
/// (a lone event is not held back),
/// publishes one [`EventBatch`] per queue, and after the JetStream acknowledgement performs
/// each event's [`AfterPublish`]. Publishing never waits for earlier batches' acknowledgements,
/// so several batches are in flight at once.
pub(crate) fn spawn_publisher(
    js: jetstream::Context,
    subjects: Subjects,
    batch_size: usize,
    linger: Duration,
) -> (EventSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let handle = tokio::spawn(async move {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut buf: Vec<Outbound> = Vec::with_capacity(batch_size);
        loop {
            if rx.recv_many(&mut buf, batch_size).await == 0 {
                break;
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
            let mut by_lane: HashMap<(String, Priority), Vec<Outbound>> = HashMap::new();
            for o in buf.drain(..) {
                by_lane.entry((o.event.queue.clone(), o.event.priority)).or_default().push(o);
            }
            for ((queue, priority), outs) in by_lane {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                let js = js.clone();
                let subject = subjects.events(&queue, priority);
                tokio::spawn(async move {
                    publish_batch(&js, subject, outs).await;
                    drop(permit);
                });
            }
        }
        // Wait for the batches still in flight.
        let _ = in_flight.acquire_many(MAX_IN_FLIGHT as u32).await;
    });
    (EventSender { tx }, handle)
}

async fn publish_batch(js: &jetstream::Context, subject: String, outs: Vec<Outbound>) {
    let (events, afters): (Vec<TaskEvent>, Vec<AfterPublish>) = outs.into_iter().map(|o| (o.event, o.after)).unzip();
    let n = events.len();
    let body = bytes::Bytes::from(encode(&EventBatch::new(events)));
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=5 {
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
                tracing::warn!(%subject, attempt, events = n, error = %e, "publishing events failed");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    // The events could not be stored. Leave the dispatch messages unacknowledged: JetStream
    // redelivers them after ack_wait and the tasks run again (at-least-once).
    metrics::counter!("taskfleet_worker_event_publish_failures_total").increment(1);
    tracing::error!(%subject, events = n, "giving up on an event batch; its tasks will be redelivered");
}

async fn apply(after: AfterPublish) {
    let (msg, kind) = match after {
        AfterPublish::Ack(m) => (m, AckKind::Ack),
        AfterPublish::Nak(m, d) => (m, AckKind::Nak(Some(d))),
        AfterPublish::Nothing => return,
    };
    if let Err(e) = msg.ack_with(kind).await {
        // A lost ack means a redelivery, which the coordinator recognises by task id.
        tracing::warn!(error = %e, "acknowledging a dispatch message failed");
    }
}
