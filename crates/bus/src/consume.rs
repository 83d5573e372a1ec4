//! A resilient batch-consuming loop over a durable pull consumer.

use async_nats::jetstream::{Message, consumer::PullConsumer};
use futures::StreamExt;
use std::future::Future;
use std::time::Duration;

/// How often an idle [`consume_batches`] calls its `tick`.
pub const IDLE_TICK: Duration = Duration::from_secs(5);

/// Hands messages back to JetStream for redelivery after `delay` (a negative acknowledgement
/// each): what a consumer does with a batch it cannot process now, e.g. while Postgres is down.
/// A lost nak only means the redelivery waits for `ack_wait` instead.
pub async fn hand_back(msgs: &[Message], delay: Duration) {
    for m in msgs {
        let _ = m.ack_with(async_nats::jetstream::AckKind::Nak(Some(delay))).await;
    }
}

/// Consumes a durable consumer until `stop` resolves: hands every group of messages that are
/// ready at once (at most `max` messages and, unless one message is larger, `max_bytes` of
/// bodies; a lone message is not held back) to `handle`, and re-opens the
/// pull stream with backoff whenever it ends or fails (a restarted nats-server, a deleted
/// consumer that `open` re-creates). Individual pull status errors are logged and skipped.
///
/// Every pull is limited to `max_bytes`, which bounds the messages buffered in memory to about
/// twice that (the next pull is requested when half of the current one is consumed).
/// `max_bytes` must exceed the largest message (e.g. twice the server's `max_payload`): the
/// server never delivers a message larger than a pull's limit.
///
/// `tick` is called on every turn of the loop, and at least every [`IDLE_TICK`] while the
/// consumer is idle or being re-opened: the caller's liveness beat.
pub async fn consume_batches<O, OF, H, HF>(
    name: &str,
    max: usize,
    max_bytes: usize,
    stop: impl Future<Output = ()>,
    tick: impl Fn(),
    open: O,
    mut handle: H,
) where
    O: Fn() -> OF,
    OF: Future<Output = Result<PullConsumer, crate::BusError>>,
    H: FnMut(Vec<Message>) -> HF,
    HF: Future<Output = ()>,
{
    tokio::pin!(stop);
    let mut delay = Duration::from_millis(100);
    loop {
        tick();
        let stream = match open().await {
            Ok(consumer) => consumer
                .stream()
                .max_messages_per_batch(max)
                .max_bytes_per_batch(max_bytes)
                .expires(Duration::from_secs(30))
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| crate::BusError::new(crate::BusErrorKind::Consume, name, e)),
            Err(e) => Err(e),
        };
        let mut chunks = match stream {
            Ok(s) => s.ready_chunks(max),
            Err(e) => {
                tracing::warn!(consumer = name, error = %e, "cannot open pull stream, retrying");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        loop {
            tick();
            let chunk = tokio::select! {
                _ = &mut stop => return,
                c = chunks.next() => c,
                _ = tokio::time::sleep(IDLE_TICK) => continue,
            };
            let Some(chunk) = chunk else {
                tracing::warn!(consumer = name, "pull stream ended, re-opening it");
                break;
            };
            // A broken pull (missed heartbeats, server restart) arrives as an error item and
            // the stream goes on by itself: log it and keep the messages.
            let mut msgs = Vec::with_capacity(chunk.len());
            let mut bytes = 0;
            for m in chunk {
                match m {
                    Ok(m) => {
                        if !msgs.is_empty() && bytes + m.payload.len() > max_bytes {
                            handle(std::mem::take(&mut msgs)).await;
                            bytes = 0;
                        }
                        bytes += m.payload.len();
                        msgs.push(m);
                    }
                    Err(e) => tracing::debug!(consumer = name, error = %e, "pull status"),
                }
            }
            if !msgs.is_empty() {
                handle(msgs).await;
            }
        }
    }
}
