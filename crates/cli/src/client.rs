//! The CLI's connection to a fleet.

use anyhow::{Context, anyhow};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;
use taskfleet_bus::decode_message;
use taskfleet_proto::{
    ApiErrorBody, CommittedBatch, MAX_MESSAGE_BYTES, RunGetRequest, RunView, Subjects, TaskIdRequest, VERB_RUN_GET,
    VERB_TASK_GET,
};

/// A NATS connection plus the fleet's subject names.
pub struct Fleet {
    /// The NATS connection.
    pub client: async_nats::Client,
    /// JetStream on it.
    pub js: async_nats::jetstream::Context,
    /// The fleet's subject names.
    pub subjects: Subjects,
}

impl Fleet {
    /// Connects to the fleet's NATS server.
    pub async fn connect(config: &taskfleet_config::Config) -> anyhow::Result<Fleet> {
        let client = taskfleet_bus::connect_options(&config.nats)
            .await?
            .name("taskfleet-cli")
            .connection_timeout(Duration::from_secs(5))
            .connect(taskfleet_bus::server_addrs(&config.nats)?)
            .await
            .with_context(|| format!("cannot reach NATS at {}", config.nats.redacted_url()))?;
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .max_ack_inflight(4096)
            .build(client.clone());
        Ok(Fleet { client, js, subjects: config.subjects() })
    }

    /// Calls a verb of the coordinator's API; an error answer becomes its
    /// [`taskfleet_proto::ApiError`].
    pub async fn api<R: DeserializeOwned>(&self, verb: &str, request: &impl Serialize) -> anyhow::Result<R> {
        let bytes = Bytes::from(serde_json::to_vec(request)?);
        let reply = tokio::time::timeout(Duration::from_secs(10), self.client.request(self.subjects.api(verb), bytes))
            .await
            .map_err(|_| anyhow!("the coordinator did not answer {verb} within 10s"))?
            .map_err(|e| anyhow!("{verb} request failed (is a coordinator running?): {e}"))?;
        if let Some(error) = ApiErrorBody::parse(&reply.payload) {
            return Err(error.into());
        }
        serde_json::from_slice(&reply.payload).with_context(|| format!("unexpected answer to {verb}"))
    }

    /// A task as stored.
    pub async fn get(&self, id: uuid::Uuid) -> anyhow::Result<Value> {
        self.api(VERB_TASK_GET, &TaskIdRequest { id }).await
    }

    /// Waits for run `id` to end; `None` on timeout. Listens for its end notice (subscribed
    /// before asking, so an end between the two is not missed) and asks again now and then in
    /// case a notice was lost. Only the run's state and totals are read.
    pub async fn wait_run(&self, id: uuid::Uuid, timeout: Duration) -> anyhow::Result<Option<RunView>> {
        let mut sub = self.client.subscribe(self.subjects.run_ended(&id)).await.map_err(|e| anyhow!("{e}"))?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let view: RunView = self.api(VERB_RUN_GET, &RunGetRequest { id, tasks: Some(0) }).await?;
            if view.state.is_final() {
                return Ok(Some(view));
            }
            let next = deadline.min(tokio::time::Instant::now() + Duration::from_secs(5));
            match tokio::time::timeout_at(next, sub.next()).await {
                Ok(Some(_)) | Err(_) if tokio::time::Instant::now() < deadline => {}
                Ok(None) => return Err(anyhow!("run notification subscription closed")),
                _ => return Ok(None),
            }
        }
    }

    /// Waits for `id` to be final. Subscribes to commit notifications before asking, so a
    /// completion between the two is not missed.
    pub async fn wait(&self, id: uuid::Uuid, timeout: Duration) -> anyhow::Result<Option<Value>> {
        let mut sub = self.client.subscribe(self.subjects.committed_all()).await.map_err(|e| anyhow!("{e}"))?;
        let is_final = |t: &Value| {
            t.get("state")
                .and_then(|s| s.as_str())
                .and_then(taskfleet_proto::TaskState::parse)
                .is_some_and(|s| s.is_final())
        };
        let task = self.get(id).await?;
        if is_final(&task) {
            return Ok(Some(task));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Re-check now and then in case a notification was lost (core NATS is best effort).
            let msg =
                tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_secs(5)), sub.next())
                    .await;
            match msg {
                Ok(Some(m)) => {
                    let Ok(batch) = decode_message::<CommittedBatch>(&m, MAX_MESSAGE_BYTES) else {
                        continue;
                    };
                    if !batch.tasks.iter().any(|t| t.id == id) {
                        continue;
                    }
                }
                Ok(None) => return Err(anyhow!("notification subscription closed")),
                Err(_) if tokio::time::Instant::now() >= deadline => return Ok(None),
                Err(_) => {}
            }
            let task = self.get(id).await?;
            if is_final(&task) {
                return Ok(Some(task));
            }
        }
    }
}
