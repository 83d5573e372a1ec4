//! Publishing many JetStream messages at once.

use crate::{BusError, BusErrorKind};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::future::try_join_all;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Subject.
    pub subject: String,
    /// Body.
    pub payload: Bytes,
    /// Headers (trace context, content type …).
    pub headers: HeaderMap,
    /// JetStream deduplication id, if any.
    pub msg_id: Option<String>,
}

/// Publishes every message without waiting in between, then waits for all acknowledgements:
/// one round trip's latency for the whole set instead of one per message. Returns an error if
/// any message was not stored; the caller retries the set (the dedup ids make that safe).
pub async fn publish_all(js: &jetstream::Context, messages: Vec<Outgoing>) -> Result<(), BusError> {
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        let mut publish = PublishMessage::build().payload(m.payload).headers(m.headers);
        if let Some(id) = m.msg_id {
            publish = publish.message_id(id);
        }
        let subject = m.subject;
        let ack = js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| BusError::new(BusErrorKind::Publish, subject.as_str(), e))?;
        acks.push(async move { ack.await.map_err(|e| BusError::new(BusErrorKind::Publish, subject, e)) });
    }
    try_join_all(acks).await?;
    Ok(())
}
