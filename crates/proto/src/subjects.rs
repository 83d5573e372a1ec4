//! NATS subject and stream names, all derived from one prefix so that several fleets (or
//! several tests) share a server without seeing each other.

use crate::Priority;

/// Header names taskfleet reads and writes.
pub mod headers {
    /// Body encoding, `application/msgpack` (default) or `application/json`.
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// Where the coordinator sends a [`crate::SubmitReply`] once the task is committed in
    /// Postgres or has been rejected (a "confirmed submit").
    pub const REPLY_TO: &str = "Taskfleet-Reply-To";
    /// On dispatch messages: handler attempts already recorded before this dispatch; the
    /// attempt a worker runs is this plus one, however often the message is delivered.
    pub const ATTEMPT_OFFSET: &str = "Taskfleet-Attempt-Offset";
    /// On dispatch messages: the task's dispatch generation (1 for the first dispatch; each
    /// retry, deferral, rescue or replay dispatches the next one).
    pub const GENERATION: &str = "Taskfleet-Generation";
    /// JetStream's deduplication id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
}

/// Subject and stream names for one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    stream_prefix: String,
}

impl Subjects {
    /// Names under subject prefix `prefix` (e.g. `taskfleet`) and stream-name prefix
    /// `stream_prefix` (e.g. `TASKFLEET`).
    pub fn new(prefix: impl Into<String>, stream_prefix: impl Into<String>) -> Self {
        Subjects { prefix: prefix.into(), stream_prefix: stream_prefix.into() }
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where clients submit tasks for `queue`.
    pub fn submit(&self, queue: &str) -> String {
        format!("{}.submit.{queue}", self.prefix)
    }
    /// Every submit subject.
    pub fn submit_all(&self) -> String {
        format!("{}.submit.>", self.prefix)
    }
    /// Where the coordinator dispatches ready tasks of `queue` at `priority`.
    pub fn dispatch(&self, queue: &str, priority: Priority) -> String {
        format!("{}.dispatch.{queue}.{}", self.prefix, priority.as_str())
    }
    /// Every dispatch subject.
    pub fn dispatch_all(&self) -> String {
        format!("{}.dispatch.>", self.prefix)
    }
    /// Where task events of `queue` at `priority` go. Events have priority lanes like
    /// dispatches, so that recording a critical task's result never waits behind a backlog of
    /// low ones.
    pub fn events(&self, queue: &str, priority: Priority) -> String {
        format!("{}.events.{queue}.{}", self.prefix, priority.as_str())
    }
    /// Every event subject of `queue`.
    pub fn events_of_queue(&self, queue: &str) -> String {
        format!("{}.events.{queue}.*", self.prefix)
    }
    /// Every event subject of `priority`, across queues.
    pub fn events_of_priority(&self, priority: Priority) -> String {
        format!("{}.events.*.{}", self.prefix, priority.as_str())
    }
    /// Every event subject.
    pub fn events_all(&self) -> String {
        format!("{}.events.>", self.prefix)
    }
    /// Dead-letter subject of `queue`: the envelope of every task that died there.
    pub fn dead(&self, queue: &str) -> String {
        format!("{}.dead.{queue}", self.prefix)
    }
    /// Every dead-letter subject.
    pub fn dead_all(&self) -> String {
        format!("{}.dead.>", self.prefix)
    }
    /// Core-NATS notification of committed final states for `queue`.
    pub fn committed(&self, queue: &str) -> String {
        format!("{}.committed.{queue}", self.prefix)
    }
    /// Every committed-notification subject.
    pub fn committed_all(&self) -> String {
        format!("{}.committed.>", self.prefix)
    }
    /// Core-NATS worker status reports ([`crate::WorkerStatus`]).
    pub fn worker_status(&self) -> String {
        format!("{}.workers.status", self.prefix)
    }
    /// Core-NATS alert state changes ([`crate::Alert`]).
    pub fn alerts(&self) -> String {
        format!("{}.alerts", self.prefix)
    }
    /// Core-NATS snapshots of the aggregator's live figures (the `/v1/stats` JSON).
    pub fn stats(&self) -> String {
        format!("{}.stats", self.prefix)
    }
    /// The coordinator's request/reply API, e.g. `api("task.get")`.
    pub fn api(&self, verb: &str) -> String {
        format!("{}.api.{verb}", self.prefix)
    }
    /// Every API subject.
    pub fn api_all(&self) -> String {
        format!("{}.api.>", self.prefix)
    }
    /// The queue name from a `<prefix>.<kind>.<queue>[...]` subject.
    pub fn queue_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix('.')?;
        rest.split('.').nth(1)
    }
    /// Stream holding submissions (WorkQueue retention, deduplication window).
    pub fn submit_stream(&self) -> String {
        format!("{}_SUBMIT", self.stream_prefix)
    }
    /// Stream holding dispatched tasks (WorkQueue retention).
    pub fn dispatch_stream(&self) -> String {
        format!("{}_DISPATCH", self.stream_prefix)
    }
    /// Stream holding task events (limits retention; the coordinator and aggregator each have
    /// their own durable consumer).
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_prefix)
    }
    /// Dead-letter stream (limits retention, long max age).
    pub fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.stream_prefix)
    }
    /// Key-value bucket of cancelled task ids, watched by every worker.
    pub fn cancel_bucket(&self) -> String {
        format!("{}_CANCELLED", self.stream_prefix)
    }
    /// Durable consumer that workers of `queue` share for `priority`.
    pub fn dispatch_consumer(&self, queue: &str, priority: Priority) -> String {
        format!("dispatch-{queue}-{}", priority.as_str())
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new("taskfleet", "TASKFLEET")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let s = Subjects::new("t1", "T1");
        assert_eq!(s.submit("default"), "t1.submit.default");
        assert_eq!(s.dispatch("q", Priority::High), "t1.dispatch.q.high");
        assert_eq!(s.queue_of("t1.dispatch.q.high"), Some("q"));
        assert_eq!(s.queue_of("t1.submit.default"), Some("default"));
        assert_eq!(s.events("q", Priority::Critical), "t1.events.q.critical");
        assert_eq!(s.queue_of(&s.events("q", Priority::Low)), Some("q"));
        assert_eq!(s.events_of_priority(Priority::Low), "t1.events.*.low");
        assert_eq!(s.queue_of("t2.submit.default"), None);
        assert_eq!(s.dispatch_consumer("q", Priority::Low), "dispatch-q-low");
    }
}
