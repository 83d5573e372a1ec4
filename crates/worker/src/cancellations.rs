//! Cancellations: the ids in the cancellation bucket, followed by a reading loop. A queued task
//! whose id is there is skipped when it arrives; a running one has its attempt cancelled. An
//! id deleted from the bucket (a resumed run's task) may run again.

use crate::running::Running;
use futures::{FutureExt, StreamExt};
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

/// How often the bucket is read even without an announcement: announcements sent while the
/// connection was down are lost, the entries are not.
const RESYNC: Duration = Duration::from_secs(5);

/// Follows the cancellation bucket until `stop`: reads every entry after the last one read, in
/// stream order, whenever a change is announced on the bucket's subjects (a plain subscription
/// to `$KV.<bucket>.>`) and at least every [`RESYNC`]. Entries are read one message at a time
/// (`STREAM.MSG.GET`), so the worker never creates a consumer (see
/// [`taskfleet_proto::Permissions`]).
pub(crate) async fn run(
    client: async_nats::Client,
    stream: async_nats::jetstream::stream::Stream<()>,
    bucket: String,
    cancellations: Arc<Cancellations>,
    running: Running,
    stop: CancellationToken,
) {
    let filter = format!("$KV.{bucket}.>");
    let reader =
        Reader { stream, key_prefix: format!("$KV.{bucket}."), filter: filter.clone(), cancellations, running };
    let mut next = 1u64;
    let mut wake: Option<async_nats::Subscriber> = None;
    while !stop.is_cancelled() {
        if wake.is_none() {
            match client.subscribe(filter.clone()).await {
                Ok(sub) => wake = Some(sub),
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to cancellations; reading them every 5 s"),
            }
        }
        next = reader.catch_up(next).await;
        let announced = async {
            match wake.as_mut() {
                Some(sub) => {
                    let ended = sub.next().await.is_none();
                    // A burst of announcements needs one read.
                    while let Some(Some(_)) = sub.next().now_or_never() {}
                    ended
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            ended = announced => if ended { wake = None },
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

/// Reads the bucket's entries by stream sequence and applies them.
struct Reader {
    stream: async_nats::jetstream::stream::Stream<()>,
    key_prefix: String,
    filter: String,
    cancellations: Arc<Cancellations>,
    running: Running,
}

impl Reader {
    /// Applies every entry from stream sequence `next` on; returns the sequence to read next.
    async fn catch_up(&self, mut next: u64) -> u64 {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        loop {
            let read =
                self.stream.raw_message_builder().sequence(next).next_by_subject(self.filter.clone()).send().await;
            match read {
                Ok(msg) => {
                    self.apply(&msg);
                    next = msg.sequence + 1;
                }
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return next,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read cancellations, retrying");
                    return next;
                }
            }
        }
    }

    fn apply(&self, msg: &async_nats::jetstream::message::StreamMessage) {
        let Some(Ok(id)) = msg.subject.strip_prefix(self.key_prefix.as_str()).map(str::parse::<uuid::Uuid>) else {
            return;
        };
        let withdrawn =
            msg.headers.get("KV-Operation").is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        if withdrawn {
            // The task runs again (its run was resumed).
            self.cancellations.remove(&id);
            return;
        }
        self.cancellations.insert(id);
        if self.running.cancel_task(id) > 0 {
            tracing::info!(task_id = %id, "cancelling a running task");
        }
    }
}
