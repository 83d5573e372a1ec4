//! The workers' status reports (`<prefix>.workers.status`, JSON), into the live figures.

use crate::{Ctx, lock};
use futures::StreamExt;
use std::sync::Arc;
use taskfleet_proto::WorkerStatus;

/// Subscribes to the status reports and records each one until the subscription ends.
pub(crate) async fn start(ctx: Arc<Ctx>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut sub = ctx.client.subscribe(ctx.topology.subjects.worker_status()).await?;
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            match serde_json::from_slice::<WorkerStatus>(&msg.payload) {
                Ok(status) => lock(&ctx.stats).worker_status(status),
                Err(e) => tracing::debug!(error = %e, "unreadable worker status"),
            }
        }
    }))
}
