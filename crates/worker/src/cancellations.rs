//! Cancellations: the ids in the cancellation bucket, followed by a watch loop. A queued task
//! whose id is there is skipped when it arrives; a running one has its attempt cancelled. An
//! id deleted from the bucket (a resumed run's task) may run again.

use crate::running::Running;
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Ids of cancelled tasks seen in the bucket.
#[derive(Default)]
pub(crate) struct Cancellations(Mutex<HashSet<uuid::Uuid>>);

impl Cancellations {
    /// Whether task `id` was cancelled.
    pub fn contains(&self, id: &uuid::Uuid) -> bool {
        self.0.lock().map(|c| c.contains(id)).unwrap_or(false)
    }

    fn insert(&self, id: uuid::Uuid) {
        if let Ok(mut c) = self.0.lock() {
            c.insert(id);
        }
    }

    fn remove(&self, id: &uuid::Uuid) {
        if let Ok(mut c) = self.0.lock() {
            c.remove(id);
        }
    }
}

/// Follows the cancellation bucket (restarting the watch when it fails) until `stop`.
pub(crate) async fn run(
    bucket: async_nats::jetstream::kv::Store,
    cancellations: Arc<Cancellations>,
    running: Running,
    stop: CancellationToken,
) {
    use async_nats::jetstream::kv::Operation;
    while !stop.is_cancelled() {
        let mut watch = match bucket.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch cancellations, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let entry = tokio::select! {
                _ = stop.cancelled() => return,
                e = watch.next() => e,
            };
            let entry = match entry {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cancellation watch failed, restarting it");
                    break;
                }
                None => break,
            };
            let Ok(id) = entry.key.parse::<uuid::Uuid>() else { continue };
            if entry.operation != Operation::Put {
                // Withdrawn: the task runs again (its run was resumed).
                cancellations.remove(&id);
                continue;
            }
            cancellations.insert(id);
            if running.cancel_task(id) > 0 {
                tracing::info!(task_id = %id, "cancelling a running task");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
