//! What a step of a workflow asks of the coordinator, and what it leaves to be recorded with
//! its outcome: the parents' outcomes when they were too large to travel with the task, a
//! durable checkpoint, a spawn and an early stop.

use crate::TaskError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;
use taskfleet_proto::{
    ApiErrorBody, CheckpointReply, CheckpointRequest, ParentOutcome, ParentsReply, ParentsRequest, QueueOpenReply,
    QueueOpenRequest, Spawn, Subjects, TaskId, VERB_QUEUE_OPEN, VERB_TASK_CHECKPOINT, VERB_TASK_PARENTS,
};

/// How long a request to the coordinator waits for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler asked for besides its result, settled with it: nothing of it happens unless
/// the attempt succeeds.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Effects {
    /// Children and a join to add; the task then waits for the join.
    pub spawn: Option<Spawn>,
    /// End the task's run with this task's result.
    pub stop_run: bool,
}

/// The coordinator's API, as a step reaches it.
#[derive(Debug, Clone)]
pub(crate) struct Coordinator {
    pub client: async_nats::Client,
    pub subjects: Subjects,
}

impl Coordinator {
    /// Sends one API request and reads its reply.
    async fn ask<Q: Serialize, A: DeserializeOwned>(&self, verb: &str, request: &Q) -> Result<A, String> {
        let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        let asking = self.client.request(self.subjects.api(verb), body.into());
        let msg = tokio::time::timeout(REQUEST_TIMEOUT, asking)
            .await
            .map_err(|_| format!("the coordinator did not answer {verb} within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("{verb}: {e}"))?;
        serde_json::from_slice::<A>(&msg.payload).map_err(|e| match ApiErrorBody::parse(&msg.payload) {
            Some(err) => format!("{verb}: {}", err.message),
            None => format!("{verb}: unreadable reply: {e}"),
        })
    }

    /// Asks the coordinator to create the dispatch consumers of `queues`; their names.
    pub async fn open_queues(&self, queues: &[String]) -> Result<Vec<String>, String> {
        let request = QueueOpenRequest { queues: queues.to_vec() };
        Ok(self.ask::<_, QueueOpenReply>(VERB_QUEUE_OPEN, &request).await?.consumers)
    }

    /// Every parent's outcome of `task`, page by page, and the previous loop iteration's.
    pub async fn parents(&self, task: TaskId) -> Result<(Vec<ParentOutcome>, Option<ParentOutcome>), TaskError> {
        let mut out = Vec::new();
        let mut previous = None;
        loop {
            let request = ParentsRequest { id: task, offset: out.len() as u32, limit: None };
            let page: ParentsReply = self.ask(VERB_TASK_PARENTS, &request).await.map_err(|e| {
                TaskError::retryable(format!("cannot read the parents' outcomes: {e}")).with_code("parents_unavailable")
            })?;
            let got = page.parents.len();
            out.extend(page.parents);
            previous = previous.or(page.previous);
            if got == 0 || out.len() >= page.total as usize {
                return Ok((out, previous));
            }
        }
    }

    /// Stores a checkpoint of `task`; returns once Postgres has it. While the coordinator
    /// cannot take it (restarting, Postgres down), it tries again with a growing pause until
    /// `until`, so a brief outage does not cost the attempt.
    pub async fn checkpoint(
        &self,
        task: TaskId,
        generation: u32,
        checkpoint: serde_json::Value,
        until: tokio::time::Instant,
    ) -> Result<bool, TaskError> {
        let request = CheckpointRequest { id: task, checkpoint, generation: Some(generation) };
        let mut pause = Duration::from_millis(100);
        loop {
            match self.ask::<_, CheckpointReply>(VERB_TASK_CHECKPOINT, &request).await {
                Ok(reply) => return Ok(reply.saved),
                Err(e) if tokio::time::Instant::now() + pause >= until => {
                    return Err(
                        TaskError::retryable(format!("cannot save the checkpoint: {e}")).with_code("checkpoint_failed")
                    );
                }
                Err(e) => {
                    tracing::debug!(task_id = %task, error = %e, "checkpoint not stored yet, trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
