//! Publishing ready tasks to the dispatch stream.

use async_nats::HeaderMap;
use bytes::Bytes;
use std::time::Duration;
use taskfleet_bus::{Outgoing, Topology, publish_all};
use taskfleet_proto::{CONTENT_TYPE_MSGPACK, Subjects, TaskEnvelope, encode, headers};

/// The first dispatch of a task.
pub(crate) fn message(topology: &Topology, env: &TaskEnvelope, trace: Option<&HeaderMap>) -> Outgoing {
    redispatch_message(&topology.subjects, env, trace, 0, 1)
}

/// A dispatch message. Its dedup id is `<id>:<generation>`: dispatching the same generation
/// twice within the dedup window (a coordinator that crashed between publishing and
/// acknowledging the submission) stores it once, while a retry, deferral, rescue or replay
/// (the next generation) is a new message. `attempt_offset` is the number of handler attempts
/// already recorded. Generations after the first travel in a header, so that a worker can ask
/// whether a later one superseded the message it holds.
pub(crate) fn redispatch_message(
    subjects: &Subjects,
    env: &TaskEnvelope,
    trace: Option<&HeaderMap>,
    attempt_offset: u32,
    generation: i32,
) -> Outgoing {
    let mut h = HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, CONTENT_TYPE_MSGPACK);
    if attempt_offset > 0 {
        h.insert(headers::ATTEMPT_OFFSET, attempt_offset.to_string().as_str());
    }
    if generation > 1 {
        h.insert(headers::GENERATION, generation.to_string().as_str());
    }
    if let Some(trace) = trace {
        for key in ["traceparent", "tracestate"] {
            if let Some(v) = trace.get(key) {
                h.insert(key, v.as_str());
            }
        }
    }
    Outgoing {
        subject: subjects.dispatch(&env.queue, env.priority),
        payload: Bytes::from(encode(env)),
        headers: h,
        msg_id: Some(format!("{}:{generation}", env.id)),
    }
}

/// The dispatch message of a task read from Postgres (released, rescued, promoted, replayed,
/// resumed), with the generation, attempt offset and trace context its row holds.
pub(crate) fn of_row(subjects: &Subjects, t: &taskfleet_store::Redispatch) -> Outgoing {
    let trace = t.traceparent.as_deref().map(|tp| {
        let mut h = HeaderMap::new();
        h.insert("traceparent", tp);
        h
    });
    redispatch_message(subjects, &t.envelope, trace.as_ref(), t.attempt_offset, t.generation)
}

/// Publishes the messages of tasks read from Postgres; see [`publish`].
pub(crate) async fn publish_rows(
    topology: &Topology,
    tasks: &[taskfleet_store::Redispatch],
) -> Result<(), taskfleet_bus::BusError> {
    publish(topology, tasks.iter().map(|t| of_row(&topology.subjects, t)).collect()).await
}

/// Publishes dispatch messages, retrying the whole set a few times (dedup ids make repeats
/// harmless). An error means some tasks may not be in JetStream: their rows stay `queued`
/// and the rescuer dispatches them again.
pub(crate) async fn publish(topology: &Topology, messages: Vec<Outgoing>) -> Result<(), taskfleet_bus::BusError> {
    if messages.is_empty() {
        return Ok(());
    }
    let n = messages.len() as u64;
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        let Err(e) = publish_all(&topology.js, messages.clone()).await else {
            metrics::counter!("taskfleet_coordinator_dispatched_total").increment(n);
            return Ok(());
        };
        tracing::warn!(error = %e, "dispatch publish failed, retrying");
        tokio::time::sleep(delay).await;
        attempts += 1;
        if attempts == 5 {
            return Err(e);
        }
        delay *= 2;
    }
}

/// Publishes the claimed tasks' next dispatch, then commits the claim. When the publish fails
/// the claim is rolled back: the rows stay as they were and are claimed again later.
pub(crate) async fn publish_claimed(topology: &Topology, claimed: taskfleet_store::Claimed) -> anyhow::Result<usize> {
    let n = claimed.tasks.len();
    if n == 0 {
        return Ok(0);
    }
    publish_rows(topology, &claimed.tasks).await?;
    claimed.commit().await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_proto::Priority;

    #[test]
    fn a_first_dispatch_is_deduplicated_by_id_and_carries_no_generation() {
        let subjects = Subjects::new("taskfleet", "TASKFLEET");
        let mut env = TaskEnvelope::new("echo", serde_json::Value::Null);
        env.queue = "llm".into();
        env.priority = Priority::High;
        let out = redispatch_message(&subjects, &env, None, 0, 1);
        assert_eq!(out.subject, subjects.dispatch("llm", Priority::High));
        assert_eq!(out.msg_id, Some(format!("{}:1", env.id)));
        assert!(out.headers.get(headers::GENERATION).is_none());
        assert!(out.headers.get(headers::ATTEMPT_OFFSET).is_none());
    }

    #[test]
    fn a_later_generation_is_a_new_message_with_its_attempt_offset_and_only_the_trace_headers() {
        let subjects = Subjects::new("taskfleet", "TASKFLEET");
        let env = TaskEnvelope::new("echo", serde_json::Value::Null);
        let mut trace = HeaderMap::new();
        trace.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        trace.insert("Taskfleet-Reply-To", "_INBOX.x");
        let out = redispatch_message(&subjects, &env, Some(&trace), 2, 3);
        assert_eq!(out.msg_id, Some(format!("{}:3", env.id)));
        assert_eq!(out.headers.get(headers::GENERATION).map(|v| v.as_str()), Some("3"));
        assert_eq!(out.headers.get(headers::ATTEMPT_OFFSET).map(|v| v.as_str()), Some("2"));
        assert!(out.headers.get("traceparent").is_some());
        assert!(out.headers.get("Taskfleet-Reply-To").is_none(), "only the trace context travels on");
    }
}
