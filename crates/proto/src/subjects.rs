//! NATS subject and stream names, all derived from one prefix so that several fleets (or
//! several tests) share a server without seeing each other.

use crate::{DecodeError, Priority};

/// Longest accepted `Taskfleet-Reply-To` subject, in bytes.
pub const MAX_REPLY_TO_LEN: usize = 256;

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
    /// Core-NATS notice that a run ended ([`crate::RunEndedNotice`]), one subject per run so a
    /// watcher hears only its own.
    pub fn run_ended(&self, run: &uuid::Uuid) -> String {
        format!("{}.runs.{run}.ended", self.prefix)
    }
    /// Every run-ended notice subject.
    pub fn run_ended_all(&self) -> String {
        format!("{}.runs.*.ended", self.prefix)
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
    /// The queue of a submit subject, which must be exactly `<prefix>.submit.<queue>` with a
    /// valid queue name ([`crate::validate_queue`]).
    pub fn submit_queue<'a>(&self, subject: &'a str) -> Result<&'a str, DecodeError> {
        let queue = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix(".submit."))
            .ok_or_else(|| DecodeError::Invalid { field: "subject", reason: "not a submit subject".into() })?;
        crate::validate_queue("queue", queue)?;
        Ok(queue)
    }
    /// Checks a `Taskfleet-Reply-To` subject: a plain subject (no wildcards, spaces or empty
    /// tokens, at most [`MAX_REPLY_TO_LEN`] bytes) starting with `allowed_prefix`, and never a
    /// system subject (`$KV.`, `$JS.`, `$SYS.`, anything starting with `$`) nor one of this
    /// fleet's own subjects, whatever the prefix allows.
    pub fn check_reply_to(&self, subject: &str, allowed_prefix: &str) -> Result<(), DecodeError> {
        let refuse = |reason: &str| Err(DecodeError::InvalidReplyTo { subject: subject.into(), reason: reason.into() });
        if subject.is_empty() || subject.len() > MAX_REPLY_TO_LEN {
            return refuse("must be 1..=256 bytes");
        }
        let bad_token = |t: &str| t.is_empty() || t == "*" || t == ">";
        if subject.chars().any(|c| c.is_whitespace() || c.is_control()) || subject.split('.').any(bad_token) {
            return refuse("not a plain NATS subject");
        }
        if subject.starts_with('$') {
            return refuse("replies never go to system subjects ($KV, $JS, $SYS, ...)");
        }
        if subject == self.prefix || subject.starts_with(&format!("{}.", self.prefix)) {
            return refuse("replies never go to the fleet's own subjects");
        }
        if !subject.starts_with(allowed_prefix) {
            return refuse(&format!("replies go only to subjects starting with {allowed_prefix:?}"));
        }
        Ok(())
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

    #[test]
    fn submit_queue_is_strict() {
        let s = Subjects::new("t1", "T1");
        assert_eq!(s.submit_queue("t1.submit.default"), Ok("default"));
        assert_eq!(s.submit_queue(&s.submit(&"q".repeat(64))).map(str::len), Ok(64));
        for junk in ["t1.submit.a.b", "t1.submit.", "t2.submit.a", "t1.dispatch.a", "t1.submit.é", "t1.submit.%"] {
            assert!(s.submit_queue(junk).is_err(), "{junk}");
        }
        assert!(s.submit_queue(&s.submit(&"q".repeat(65))).is_err());
    }

    #[test]
    fn replies_only_to_inboxes() {
        let s = Subjects::new("t1", "T1");
        assert!(s.check_reply_to("_INBOX.abc.1", "_INBOX.").is_ok());
        let refused = [
            "$KV.TASKFLEET_CANCELLED.x",
            "$JS.API.STREAM.LIST",
            "$SYS.REQ.SERVER.PING",
            "t1.submit.default",
            "t1",
            "_INBOX.*",
            "_INBOX.>",
            "_INBOX..a",
            "_INBOX.a b",
            "other.inbox",
            "",
        ];
        for r in refused {
            let e = s.check_reply_to(r, "_INBOX.").unwrap_err();
            assert_eq!(e.reason(), crate::RejectReason::InvalidReplyTo, "{r}");
        }
        // Whatever the configured prefix allows, system and fleet subjects stay refused.
        assert!(s.check_reply_to("$KV.X.y", "$").is_err());
        assert!(s.check_reply_to("t1.api.x", "t1").is_err());
        assert!(s.check_reply_to(&"_INBOX.".repeat(40), "_INBOX.").is_err());
    }
}
