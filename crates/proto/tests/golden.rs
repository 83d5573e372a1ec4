//! The golden examples in `proto/golden/` decode to the values their JSON twins describe, and
//! encoding those values gives the same bytes: the wire format has not drifted.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use taskfleet_proto::*;

fn golden_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto/golden")
}

fn check<T: DeserializeOwned + Serialize + PartialEq + Debug>(name: &str) -> T {
    let dir = golden_dir();
    let packed = std::fs::read(dir.join(format!("{name}.msgpack"))).unwrap_or_else(|e| panic!("{name}.msgpack: {e}"));
    let json = std::fs::read(dir.join(format!("{name}.json"))).unwrap_or_else(|e| panic!("{name}.json: {e}"));
    let from_packed: T = decode(&packed, Some(CONTENT_TYPE_MSGPACK), 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
    let from_json: T = decode(&json, Some(CONTENT_TYPE_JSON), 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(from_packed, from_json, "{name}: MessagePack and JSON disagree");
    assert_eq!(encode(&from_packed), packed, "{name}: encoding changed");
    from_packed
}

#[test]
fn envelopes() {
    let full: TaskEnvelope = check("envelope_full");
    assert_eq!(full.kind, "llm.chat");
    assert_eq!(full.priority, Priority::High);
    assert_eq!(full.depends_on.len(), 1);
    full.validate(1 << 20).unwrap();
    let minimal: TaskEnvelope = check("envelope_minimal");
    assert_eq!(minimal.queue, "default");
    let join: TaskEnvelope = check("dispatch_join");
    assert_eq!(join.parents.len(), 2);
    assert_eq!(join.parents[1].error.as_ref().map(|e| e.code.as_str()), Some("http_503"));
}

#[test]
fn events_and_replies() {
    let batch: EventBatch = check("event_batch");
    assert_eq!(batch.events[0].kind, EventKind::Succeeded);
    assert_eq!(batch.events[1].error.as_ref().map(|e| e.retryable), Some(true));
    let committed: CommittedBatch = check("committed_batch");
    assert_eq!(committed.tasks[0].state, TaskState::Succeeded);
    let spawned: EventBatch = check("event_spawned");
    assert_eq!(spawned.events[0].kind, EventKind::Spawned);
    assert_eq!(spawned.events[0].spawn.as_ref().map(|s| s.children.len()), Some(2));
    let reply: SubmitReply = check("submit_reply_rejected");
    assert_eq!(reply.reason, Some(RejectReason::UnknownKind));
}
