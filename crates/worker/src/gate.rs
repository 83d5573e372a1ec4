//! The gate: before running a dispatch message that may be stale (delivered before, or of a
//! later dispatch generation than the first), a worker asks the coordinator whether the task
//! is still to run (`<prefix>.api.task.runnable`). A final task, or a message superseded by a
//! later generation, is terminated instead of run, so a task never runs after its final
//! state. First deliveries of first dispatches, the hot path, are never asked about.
//!
//! Questions are batched (one request per few milliseconds, however many redeliveries arrive
//! at once after an outage). When the coordinator does not answer in time the message runs:
//! at-least-once beats waiting, and the coordinator still records one final state.

use std::time::Duration;
use taskfleet_proto::{Runnable, RunnableQuery, RunnableReply, RunnableRequest};
use tokio::sync::{mpsc, oneshot};

/// Questions gathered into one request, at most.
const MAX_BATCH: usize = 500;
/// How long the first question waits for others to share its request.
const LINGER: Duration = Duration::from_millis(2);
/// How long a request waits for the coordinator's answer.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The coordinator's answer about one message, and the task's last checkpoint when it runs.
pub(crate) type Answer = (Runnable, Option<serde_json::Value>);

type Question = (RunnableQuery, oneshot::Sender<Answer>);

/// Handle to ask the coordinator; cheap to clone.
#[derive(Clone)]
pub(crate) struct Gate {
    tx: mpsc::UnboundedSender<Question>,
}

impl Gate {
    /// Starts the task that sends the questions to `subject` (the `task.runnable` verb).
    pub fn spawn(client: async_nats::Client, subject: String) -> Gate {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(ask_loop(client, subject, rx));
        Gate { tx }
    }

    /// Whether the message of `generation` for task `id` should run, and the task's last
    /// checkpoint.
    pub async fn check(&self, id: uuid::Uuid, generation: i32) -> Answer {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((RunnableQuery { id, generation }, tx)).is_err() {
            return (Runnable::Run, None);
        }
        rx.await.unwrap_or((Runnable::Run, None))
    }
}

async fn ask_loop(client: async_nats::Client, subject: String, mut rx: mpsc::UnboundedReceiver<Question>) {
    let mut buf: Vec<Question> = Vec::new();
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        tokio::time::sleep(LINGER).await;
        while buf.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(q) => buf.push(q),
                Err(_) => break,
            }
        }
        let (queries, answer_to): (Vec<RunnableQuery>, Vec<oneshot::Sender<Answer>>) = buf.drain(..).unzip();
        let client = client.clone();
        let subject = subject.clone();
        tokio::spawn(async move {
            let mut reply = ask(&client, subject, &queries).await;
            for (i, tx) in answer_to.into_iter().enumerate() {
                let answer = reply.as_ref().and_then(|r| r.answers.get(i).copied()).unwrap_or(Runnable::Run);
                let checkpoint = reply.as_mut().and_then(|r| r.checkpoints.get_mut(i)).and_then(Option::take);
                let _ = tx.send((answer, checkpoint));
            }
        });
    }
}

/// One request; `None` when the coordinator cannot be asked or answers nonsense.
async fn ask(client: &async_nats::Client, subject: String, queries: &[RunnableQuery]) -> Option<RunnableReply> {
    let body = serde_json::to_vec(&RunnableRequest { tasks: queries.to_vec() }).ok()?;
    let reply = match tokio::time::timeout(TIMEOUT, client.request(subject, body.into())).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, tasks = queries.len(), "cannot ask the coordinator whether redelivered tasks still run; running them");
            return None;
        }
        Err(_) => {
            tracing::warn!(
                tasks = queries.len(),
                "the coordinator did not say in time whether redelivered tasks still run; running them"
            );
            return None;
        }
    };
    match serde_json::from_slice::<RunnableReply>(&reply.payload) {
        Ok(r) if r.answers.len() == queries.len() => Some(r),
        _ => {
            tracing::warn!(reply = %String::from_utf8_lossy(&reply.payload), "unexpected answer to task.runnable; running the tasks");
            None
        }
    }
}
