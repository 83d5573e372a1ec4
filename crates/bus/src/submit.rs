//! Submitting tasks and reading fleet messages: the two steps every client repeats.

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use serde::de::DeserializeOwned;
use taskfleet_proto::{CONTENT_TYPE_MSGPACK, DecodeError, Subjects, TaskEnvelope, encode, headers};

/// A submission that could not be stored. Both kinds are retryable: the message id makes a
/// resubmission within the dedup window store nothing twice.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The message could not be sent to JetStream (connection lost, too many unacknowledged).
    #[error("cannot publish the submission of task {task_id} to {subject}")]
    Send {
        /// The task.
        task_id: taskfleet_proto::TaskId,
        /// Its submit subject.
        subject: String,
        /// The client's error.
        #[source]
        source: PublishError,
    },
    /// JetStream did not acknowledge storing it (timeout, stream full, no stream).
    #[error("JetStream did not store the submission of task {task_id} on {subject}")]
    NotStored {
        /// The task.
        task_id: taskfleet_proto::TaskId,
        /// Its submit subject.
        subject: String,
        /// The server's or client's error.
        #[source]
        source: PublishError,
    },
}

/// A submission sent to JetStream whose acknowledgement is still to come; await
/// [`SentSubmission::stored`] to learn whether it was stored.
#[derive(Debug)]
pub struct SentSubmission {
    task_id: taskfleet_proto::TaskId,
    subject: String,
    ack: PublishAckFuture,
}

impl SentSubmission {
    /// Waits for JetStream's acknowledgement (`duplicate` is set when the dedup window already
    /// held the message id).
    pub async fn stored(self) -> Result<PublishAck, SubmitError> {
        let SentSubmission { task_id, subject, ack } = self;
        ack.await.map_err(|source| SubmitError::NotStored { task_id, subject, source })
    }
}

/// Sends a submission to its queue's submit subject without waiting for the acknowledgement,
/// so that a caller can keep many in flight: the body is the MessagePack envelope, `headers`
/// (trace context, reply subject … or none) get the content type, and the JetStream message id
/// is the envelope's [`TaskEnvelope::dedup_key`].
pub async fn send_submission(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    env: &TaskEnvelope,
    mut headers: HeaderMap,
) -> Result<SentSubmission, SubmitError> {
    headers.insert(headers::CONTENT_TYPE, CONTENT_TYPE_MSGPACK);
    let subject = subjects.submit(&env.queue);
    let publish = PublishMessage::build().payload(encode(env).into()).headers(headers).message_id(env.dedup_key());
    match js.send_publish(subject.clone(), publish).await {
        Ok(ack) => Ok(SentSubmission { task_id: env.id, subject, ack }),
        Err(source) => Err(SubmitError::Send { task_id: env.id, subject, source }),
    }
}

/// Submits a task as [`send_submission`] does and returns once JetStream has stored it.
pub async fn publish_submission(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    env: &TaskEnvelope,
    headers: HeaderMap,
) -> Result<PublishAck, SubmitError> {
    send_submission(js, subjects, env, headers).await?.stored().await
}

/// Decodes a message's body in the encoding its `Content-Type` header names (sniffed when it
/// has none), refusing bodies over `limit` bytes.
pub fn decode_message<T: DeserializeOwned>(msg: &async_nats::Message, limit: usize) -> Result<T, DecodeError> {
    let content_type = msg.headers.as_ref().and_then(|h| h.get(headers::CONTENT_TYPE)).map(|v| v.as_str());
    taskfleet_proto::decode(&msg.payload, content_type, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_proto::{CONTENT_TYPE_JSON, EventBatch, encode_json};

    fn message(body: &[u8], content_type: Option<&str>) -> async_nats::Message {
        let headers = content_type.map(|ct| {
            let mut h = HeaderMap::new();
            h.insert(headers::CONTENT_TYPE, ct);
            h
        });
        async_nats::Message {
            subject: "t.events.default.normal".into(),
            reply: None,
            payload: body.to_vec().into(),
            headers,
            status: None,
            description: None,
            length: body.len(),
        }
    }

    #[test]
    fn decodes_by_the_content_type_header() {
        let batch = EventBatch::new(vec![]);
        let json = encode_json(&batch);
        assert_eq!(decode_message::<EventBatch>(&message(&json, Some(CONTENT_TYPE_JSON)), 1 << 20).unwrap(), batch);
        assert_eq!(decode_message::<EventBatch>(&message(&encode(&batch), None), 1 << 20).unwrap(), batch);
        let refused = decode_message::<EventBatch>(&message(&json, Some("text/plain")), 1 << 20).unwrap_err();
        assert!(matches!(refused, DecodeError::UnsupportedContentType(_)), "{refused}");
        let too_large = decode_message::<EventBatch>(&message(&json, None), 2).unwrap_err();
        assert!(matches!(too_large, DecodeError::TooLarge { .. }), "{too_large}");
    }
}

/// Why a run was not submitted.
#[derive(Debug, thiserror::Error)]
pub enum RunSubmitError {
    /// No coordinator answered (none running, or not in time): the run may or may not be
    /// stored; submitting the same `RunSpec` again (same id) is safe.
    #[error("no answer from a coordinator to run.submit: {0}")]
    NoAnswer(String),
    /// The coordinator refused the run (invalid, over a limit) or could not store it.
    #[error("run refused: {0}")]
    Refused(taskfleet_proto::ApiError),
    /// The answer could not be read.
    #[error("unreadable answer to run.submit: {0}")]
    Unreadable(String),
}

/// Submits a run to the coordinator (`run.submit`) and returns once the whole run is
/// committed in Postgres. Resubmitting the same spec (same id) creates nothing new.
pub async fn submit_run(
    client: &async_nats::Client,
    subjects: &taskfleet_proto::Subjects,
    spec: &taskfleet_proto::RunSpec,
    timeout: std::time::Duration,
) -> Result<taskfleet_proto::RunSubmitted, RunSubmitError> {
    let body = taskfleet_proto::encode(spec);
    let asking = client.request(subjects.api(taskfleet_proto::VERB_RUN_SUBMIT), body.into());
    let reply = tokio::time::timeout(timeout, asking)
        .await
        .map_err(|_| RunSubmitError::NoAnswer(format!("none within {timeout:?}")))?
        .map_err(|e| RunSubmitError::NoAnswer(e.to_string()))?;
    if let Some(error) = taskfleet_proto::ApiErrorBody::parse(&reply.payload) {
        return Err(RunSubmitError::Refused(error));
    }
    serde_json::from_slice(&reply.payload).map_err(|e| RunSubmitError::Unreadable(e.to_string()))
}
