//! Bad input never crashes a service, always gets a clear error, and is counted.

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;
use taskfleet_e2e::Fleet;
use taskfleet_proto::{EventBatch, EventKind, SubmitReply, decode, headers};
use taskfleet_test_support::http_get;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_oversize_submissions_are_rejected_clearly() {
    let mut fleet = Fleet::new("bad_input");
    fleet.set("TASKFLEET_COORDINATOR_KINDS", "echo,sleep").set("TASKFLEET_COORDINATOR_MAX_BODY_BYTES", "4096");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let js = async_nats::jetstream::new(client.clone());
    let subjects = fleet.subjects();
    let mut events = client.subscribe(subjects.events_of_queue("default")).await.unwrap();

    let big = format!(r#"{{"kind":"echo","payload":"{}"}}"#, "x".repeat(10_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"{ this is not json".to_vec(), "malformed"),
        ("missing kind", br#"{"payload":{"a":1}}"#.to_vec(), "malformed"),
        ("unknown kind", br#"{"kind":"summon.dragon"}"#.to_vec(), "unknown_kind"),
        ("oversize", big.into_bytes(), "too_large"),
        ("msgpack garbage", vec![0xc1, 0xff, 0x00, 0x93], "malformed"),
        ("bad priority", br#"{"kind":"echo","priority":"urgent"}"#.to_vec(), "malformed"),
        ("bad attempts", br#"{"kind":"echo","max_attempts":5000}"#.to_vec(), "invalid"),
    ];
    for (name, body, reason) in &cases {
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.unwrap();
        let mut h = HeaderMap::new();
        h.insert(headers::REPLY_TO, inbox.as_str());
        js.send_publish(
            subjects.submit("default"),
            PublishMessage::build().payload(Bytes::from(body.clone())).headers(h),
        )
        .await
        .unwrap()
        .await
        .unwrap_or_else(|e| panic!("{name}: JetStream refused the publish: {e}"));
        let reply =
            tokio::time::timeout(Duration::from_secs(10), replies.next()).await.expect("a reply").expect("reply");
        let reply: SubmitReply = serde_json::from_slice(&reply.payload).unwrap();
        assert!(!reply.ok, "{name} was accepted");
        let got = serde_json::to_value(reply.reason).unwrap();
        assert_eq!(got, serde_json::json!(reason), "{name}: {:?}", reply.error);
        assert!(reply.error.as_deref().is_some_and(|e| e.len() > 10), "{name}: error must explain: {:?}", reply.error);
    }

    // Each rejection is also an event on the queue's event subject.
    let mut rejected = 0;
    while rejected < cases.len() {
        let msg =
            tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("rejection events").unwrap();
        let batch: EventBatch = decode(&msg.payload, None, 1 << 20).unwrap();
        rejected += batch.events.iter().filter(|e| e.kind == EventKind::Rejected && e.error.is_some()).count();
    }

    // The coordinator is still up, counts the rejections, and a plain-JSON `nats pub` (core
    // NATS, no headers) still runs to completion.
    let (status, metrics) = http_get(&fleet.coordinator_http, "/metrics").unwrap();
    assert_eq!(status, 200);
    for reason in ["malformed", "unknown_kind", "too_large", "invalid"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("taskfleet_coordinator_submissions_total") && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no counter for {reason}:\n{metrics}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
    client
        .publish(subjects.submit("default"), Bytes::from_static(br#"{"kind":"echo","payload":{"ok":true}}"#))
        .await
        .unwrap();
    let pool = fleet.env.pg_pool().await;
    let counts = fleet.wait_final(&pool, 1, Duration::from_secs(30)).await;
    assert_eq!(counts.get("succeeded"), Some(&1), "{counts:?}");
    assert!(fleet.coordinator.as_mut().unwrap().is_running());
}

/// A kind no worker knows fails at the worker with a clear, non-retryable error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kind_fails_at_the_worker() {
    let mut fleet = Fleet::new("unknown_kind");
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    let out = fleet.cli(&["submit", "--kind", "no.such.kind", "--wait", "--wait-timeout", "30s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(r#""state": "failed""#) && stdout.contains("unknown_kind"), "{stdout}");
    assert!(stdout.contains(r#""attempt": 1"#), "not retried: {stdout}");
}
