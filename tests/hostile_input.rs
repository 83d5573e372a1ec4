//! Hostile and bad input: every malformed or invalid submission, everything Postgres would
//! refuse, every junk subject and forbidden reply subject gets its clear rejection (reply,
//! `rejected` event, counter), is terminated in JetStream, and never holds back the good
//! submissions of the same batch; no service crashes.

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use taskfleet_proto::{
    EventBatch, EventKind, MAX_CREATED_AT_MS, MAX_PAYLOAD_DEPTH, SubmitReply, TaskEnvelope, decode, encode, headers,
};
use taskfleet_test_support::http_get;

/// One submission: where it goes, its body and headers, and the rejection code expected
/// (`None`: accepted).
struct Sub {
    name: String,
    subject: String,
    body: Vec<u8>,
    reply_to: Option<String>,
    msg_id: Option<String>,
    expect: Option<&'static str>,
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!("leaf"), |v, _| json!([v]))
}

/// A `{"kind": "echo", …}` JSON body with `fields` added.
fn json_body(fields: Value) -> Vec<u8> {
    let mut body = json!({"kind": "echo"});
    if let (Some(b), Some(f)) = (body.as_object_mut(), fields.as_object()) {
        b.extend(f.clone());
    }
    serde_json::to_vec(&body).unwrap()
}

/// Publishes every submission (JSON bodies are recognised by their leading `{`) without waiting in between, then waits for JetStream's acks.
async fn publish(client: &async_nats::Client, subs: &[Sub]) {
    let js = async_nats::jetstream::new(client.clone());
    let mut acks = Vec::new();
    for s in subs {
        let mut h = HeaderMap::new();
        if let Some(r) = &s.reply_to {
            h.insert(headers::REPLY_TO, r.as_str());
        }
        let mut m = PublishMessage::build().payload(Bytes::from(s.body.clone())).headers(h);
        if let Some(id) = &s.msg_id {
            m = m.message_id(id.as_str());
        }
        acks.push(js.send_publish(s.subject.clone(), m).await.expect("publish"));
    }
    for a in acks {
        a.await.expect("JetStream stores every submission");
    }
}

/// Dispatch messages stored for subjects matching `filter`.
async fn dispatched(fleet: &Fleet, client: &async_nats::Client, filter: &str) -> usize {
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(fleet.subjects().dispatch_stream()).await.unwrap();
    let mut subjects = stream.info_with_subjects(filter).await.unwrap();
    let mut n = 0;
    while let Some(Ok((_, count))) = subjects.next().await {
        n += count;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_submissions_are_refused_clearly_and_the_rest_of_the_batch_runs() {
    let mut fleet = Fleet::new("hostile");
    fleet.set("TASKFLEET_COORDINATOR_QUEUES", "default,llm").set("TASKFLEET_COORDINATOR_KINDS", "echo,poison");
    fleet.set("TASKFLEET_COORDINATOR_MAX_BODY_BYTES", "4096");
    fleet.start_coordinator();
    let pool = fleet.env.pg_pool().await;
    // A row Postgres refuses although validation lets it through: isolated by the store.
    sqlx::query("ALTER TABLE tasks ADD CONSTRAINT no_poison CHECK (kind <> 'poison')").execute(&pool).await.unwrap();
    // Everything is published while no coordinator runs, so that it arrives as one batch.
    fleet.coordinator.as_mut().unwrap().terminate(Duration::from_secs(10));

    let client = fleet.nats().await;
    let subjects = fleet.subjects();
    let prefix = subjects.prefix().to_string();
    let submit = subjects.submit("default");
    let kv_victim = format!("$KV.{}.victim", subjects.cancel_bucket());
    let own = format!("{prefix}.hostile.reply");
    let mut watched = Vec::new();
    for forbidden in [&kv_victim, "$JS.API.STREAM.LIST", &own, &submit] {
        watched.push((forbidden.to_string(), client.subscribe(forbidden.to_string()).await.unwrap()));
    }
    let mut events = client.subscribe(subjects.events_all()).await.unwrap();

    let sub = |name: &str, subject: &str, body: Vec<u8>, expect: Option<&'static str>| Sub {
        name: name.into(),
        subject: subject.into(),
        body,
        reply_to: Some(client.new_inbox()),
        msg_id: None,
        expect,
    };
    #[derive(serde::Serialize)]
    struct NanBody {
        kind: &'static str,
        payload: f64,
    }
    let llm = TaskEnvelope::new("echo", json!("stays queued")).with_queue("llm");
    let mut hostile = vec![
        sub(
            "NUL in a payload string (JSON)",
            &submit,
            br#"{"kind":"echo","payload":{"t":"a\u0000b"}}"#.to_vec(),
            Some("invalid"),
        ),
        sub(
            "NUL in a payload key (MessagePack)",
            &submit,
            encode(&json!({"kind": "echo", "payload": {"k\u{0}": 1}})),
            Some("invalid"),
        ),
        sub("NUL in idempotency_key", &submit, json_body(json!({"idempotency_key": "k\u{0}"})), Some("invalid")),
        sub("created_at after 9999", &submit, json_body(json!({"created_at": MAX_CREATED_AT_MS + 1})), Some("invalid")),
        sub("created_at u64::MAX", &submit, json_body(json!({"created_at": u64::MAX})), Some("invalid")),
        sub("payload too deep (JSON)", &submit, json_body(json!({"payload": nested(100)})), Some("invalid")),
        sub(
            "payload too deep (MessagePack)",
            &submit,
            encode(&json!({"kind": "echo", "payload": nested(300)})),
            Some("invalid"),
        ),
        sub(
            "NaN payload (MessagePack)",
            &submit,
            encode(&NanBody { kind: "echo", payload: f64::NAN }),
            Some("invalid"),
        ),
        sub("junk subject", &format!("{prefix}.submit.a.b"), json_body(json!({})), Some("invalid")),
        sub("overlong queue", &format!("{prefix}.submit.{}", "q".repeat(65)), json_body(json!({})), Some("invalid")),
        sub("body queue differs", &submit, json_body(json!({"queue": "llm"})), Some("invalid")),
        sub("queue outside the allow-list", &subjects.submit("other"), json_body(json!({})), Some("unknown_queue")),
        sub("refused by Postgres", &submit, json_body(json!({"kind": "poison"})), Some("unstorable")),
        sub("not JSON", &submit, b"{ this is not json".to_vec(), Some("malformed")),
        sub("MessagePack garbage", &submit, vec![0xc1, 0xff, 0x00, 0x93], Some("malformed")),
        sub("missing kind", &submit, br#"{"payload":{"a":1}}"#.to_vec(), Some("malformed")),
        sub("bad priority", &submit, json_body(json!({"priority": "urgent"})), Some("malformed")),
        sub("unknown kind", &submit, json_body(json!({"kind": "summon.dragon"})), Some("unknown_kind")),
        sub("oversize", &submit, json_body(json!({"payload": "x".repeat(10_000)})), Some("too_large")),
        sub("too many attempts", &submit, json_body(json!({"max_attempts": 5000})), Some("invalid")),
    ];
    for (name, reply) in [
        ("reply to $KV", kv_victim.as_str()),
        ("reply to $JS.API", "$JS.API.STREAM.LIST"),
        ("reply to a fleet subject", own.as_str()),
        ("reply to the submit subject", submit.as_str()),
    ] {
        let mut s = sub(name, &submit, json_body(json!({})), Some("invalid_reply_to"));
        s.reply_to = Some(reply.into());
        hostile.push(s);
    }
    // Good ones: at the depth limit, extreme numbers, and the same queued task twice.
    hostile.push(sub(
        "payload at the depth limit",
        &submit,
        json_body(json!({"payload": nested(MAX_PAYLOAD_DEPTH)})),
        None,
    ));
    let extreme = json!({"payload": [u64::MAX, i64::MIN, f64::MAX, 5e-324, "\u{1F600}\u{1}"]});
    hostile.push(sub("extreme numbers", &submit, json_body(extreme), None));
    let mut first = sub("queued task", &subjects.submit("llm"), encode(&llm), None);
    first.msg_id = Some(llm.id.to_string());
    hostile.push(first);
    let mut again = sub("queued task again, same batch", &subjects.submit("llm"), encode(&llm), None);
    again.msg_id = Some(format!("{}-again", llm.id));
    hostile.push(again);

    // Interleave a good echo task after every one of them.
    let mut subs = Vec::new();
    let mut good = 0;
    for (i, h) in hostile.into_iter().enumerate() {
        subs.push(h);
        subs.push(sub(&format!("good {i}"), &submit, encode(&TaskEnvelope::new("echo", json!({"i": i}))), None));
        good += 1;
    }
    let mut replies = Vec::new();
    for s in &subs {
        let inbox = s.reply_to.clone().filter(|r| r.starts_with("_INBOX."));
        replies.push(match inbox {
            Some(r) => Some(client.subscribe(r).await.unwrap()),
            None => None,
        });
    }
    publish(&client, &subs).await;
    let started = Instant::now();
    fleet.start_coordinator();
    fleet.start_worker(&[]);

    // Every submission with a valid inbox gets its answer.
    let mut rejected_expected: BTreeMap<&str, usize> = BTreeMap::new();
    for (s, r) in subs.iter().zip(replies.iter_mut()) {
        if let Some(code) = s.expect {
            *rejected_expected.entry(code).or_default() += 1;
        }
        let Some(r) = r else { continue };
        let msg = tokio::time::timeout(Duration::from_secs(30), r.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no reply\n{}", s.name, fleet.logs()))
            .unwrap();
        let reply: SubmitReply = serde_json::from_slice(&msg.payload).unwrap();
        match s.expect {
            None => assert!(reply.ok, "{}: {reply:?}", s.name),
            Some(code) => {
                assert!(!reply.ok, "{} was accepted", s.name);
                assert_eq!(reply.reason.map(|r| r.as_str()), Some(code), "{}: {:?}", s.name, reply.error);
                let error = reply.error.clone().unwrap_or_default();
                assert!(error.len() > 15, "{}: the error must explain: {error}", s.name);
                if code == "unstorable" {
                    assert!(error.contains("no_poison"), "{}: the database's words: {error}", s.name);
                }
            }
        }
        if s.name.starts_with("queued task again") {
            assert!(reply.duplicate, "{reply:?}");
        }
    }
    // Every rejection is an event; those of refused subjects under the queue `invalid`.
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let mut invalid_queue = 0;
    while got.values().sum::<usize>() < rejected_expected.values().sum() {
        let msg = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap_or_else(|_| panic!("rejection events: {got:?} of {rejected_expected:?}"))
            .unwrap();
        let batch: EventBatch = decode(&msg.payload, None, 1 << 20).unwrap();
        for ev in batch.events.iter().filter(|e| e.kind == EventKind::Rejected) {
            *got.entry(ev.error.as_ref().unwrap().code.clone()).or_default() += 1;
            invalid_queue += usize::from(ev.queue == "invalid");
        }
    }
    let expected: BTreeMap<String, usize> = rejected_expected.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(got, expected);
    assert_eq!(invalid_queue, 3, "junk subject, overlong queue and a queue outside the allow-list");

    // The good ones all ran, none waited for the bad ones.
    let counts = fleet.wait_final(&pool, good + 2, Duration::from_secs(30)).await;
    assert_eq!(counts.get("succeeded"), Some(&(good + 2)), "{counts:?}");
    assert_eq!(counts.get("queued"), Some(&1), "the llm task, once: {counts:?}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // A fresh duplicate of the still-queued task: acknowledged as such, never dispatched again.
    let inbox = client.new_inbox();
    let mut r = client.subscribe(inbox.clone()).await.unwrap();
    let mut dup = sub("queued task, later", &subjects.submit("llm"), encode(&llm), None);
    dup.reply_to = Some(inbox);
    dup.msg_id = Some(format!("{}-later", llm.id));
    publish(&client, std::slice::from_ref(&dup)).await;
    let msg = tokio::time::timeout(Duration::from_secs(10), r.next()).await.expect("reply").unwrap();
    let reply: SubmitReply = serde_json::from_slice(&msg.payload).unwrap();
    assert!(reply.ok && reply.duplicate && reply.task_id == Some(llm.id), "{reply:?}");
    assert_eq!(dispatched(&fleet, &client, &format!("{prefix}.dispatch.llm.>")).await, 1, "one live dispatch");

    // Nothing was published to the forbidden reply subjects.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (subject, mut s) in watched {
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), s.next()).await {
            assert!(serde_json::from_slice::<SubmitReply>(&m.payload).is_err(), "a reply went to {subject}");
        }
    }
    // Every submission left the work queue (refused ones terminated), and the reasons are counted
    // without a label for any junk queue.
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(subjects.submit_stream()).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    let (_, metrics) = http_get(&fleet.coordinator_http, "/metrics").unwrap();
    for reason in
        ["malformed", "too_large", "unknown_kind", "invalid", "unknown_queue", "invalid_reply_to", "unstorable"]
    {
        assert!(metrics.contains(&format!("reason=\"{reason}\"")), "no counter for {reason}:\n{metrics}");
    }
    assert!(!metrics.contains("qqqqqqqq") && !metrics.contains("\"other\""), "{metrics}");
    // A plain `nats pub` (core NATS, no headers) still runs, and the coordinator is still up.
    client.publish(submit.clone(), Bytes::from_static(br#"{"kind":"echo","payload":{"ok":true}}"#)).await.unwrap();
    let counts = fleet.wait_final(&pool, good + 3, Duration::from_secs(30)).await;
    assert_eq!(counts.get("succeeded"), Some(&(good + 3)), "{counts:?}");
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

/// Any character, NUL, control characters and astral planes included.
fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

/// JSON values with extreme numbers, any text, and nesting around the depth limit.
fn payload() -> impl Strategy<Value = Value> {
    let edges = vec![u64::MAX as f64, f64::MAX, f64::MIN, f64::MIN_POSITIVE, 5e-324, 1e16, -1e18, 1.8e19, 0.1, -0.0];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        proptest::sample::select(edges).prop_map(|f| json!(f)),
        text(12).prop_map(Value::String),
    ];
    let tree = leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(text(8), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let wrap = prop_oneof![3 => 0..3usize, 1 => (MAX_PAYLOAD_DEPTH - 6)..(MAX_PAYLOAD_DEPTH + 3)];
    (tree, wrap).prop_map(|(v, k)| (0..k).fold(v, |v, i| if i % 2 == 0 { json!([v]) } else { json!({ "k": v }) }))
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Equal as JSON values, numbers compared by value (`1e16` is `10000000000000000`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(x), Some(y), ..) => x == y,
            (.., Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// A task row as read back: id, kind, priority, payload, idempotency key, `created_at` in ms.
type Row = (uuid::Uuid, String, String, sqlx::types::Json<Value>, Option<String>, i64);

/// A submission body; its id is a UUID string in JSON and 16 bytes in MessagePack.
#[derive(serde::Serialize)]
struct Body {
    id: uuid::Uuid,
    kind: String,
    priority: &'static str,
    payload: Value,
    idempotency_key: Option<String>,
    created_at: u64,
}

/// Random schema-valid envelopes go through intake into Postgres and come back out equal, or
/// are refused as `invalid` exactly when they break a rule (NUL, depth, `created_at`); every one
/// is answered within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_envelopes_round_trip_through_postgres() {
    const CASES: usize = 200;
    let mut fleet = Fleet::new("hostile_prop");
    fleet.start_coordinator(); // no worker: rows stay as intake wrote them
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let subjects = fleet.subjects();

    let created = prop_oneof![Just(0), 1..=MAX_CREATED_AT_MS, (MAX_CREATED_AT_MS + 1)..=u64::MAX];
    let prio = proptest::sample::select(vec!["critical", "high", "normal", "low"]);
    let strategy =
        ("[a-z]{1,8}(\\.[a-z]{1,8})?", prio, payload(), proptest::option::of(text(20)), created, any::<bool>());
    let mut runner = TestRunner::new(ProptestConfig::default());
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await.unwrap();
    let mut cases = Vec::new();
    let mut subs = Vec::new();
    for i in 0..CASES {
        let (kind, prio, payload, key, created_at, msgpack) = strategy.new_tree(&mut runner).unwrap().current();
        let key = key.map(|k| format!("{i}:{k}"));
        let id = uuid::Uuid::now_v7();
        let refuse = has_nul(&payload)
            || depth(&payload) > MAX_PAYLOAD_DEPTH
            || created_at > MAX_CREATED_AT_MS
            || key.as_deref().is_some_and(|k| k.contains('\0'));
        let body = Body { id, kind, priority: prio, payload, idempotency_key: key, created_at };
        let bytes = if msgpack { encode(&body) } else { serde_json::to_vec(&body).unwrap() };
        subs.push(Sub {
            name: format!("case {i}"),
            subject: subjects.submit("default"),
            body: bytes,
            reply_to: Some(format!("{inbox}.{i}")),
            msg_id: Some(id.to_string()),
            expect: refuse.then_some("invalid"),
        });
        cases.push((id, body, refuse));
    }
    let started = Instant::now();
    publish(&client, &subs).await;
    let mut answered = BTreeMap::new();
    while answered.len() < CASES {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(30), replies.next()).await else {
            panic!("only {} of {CASES} answered after {:?}\n{}", answered.len(), started.elapsed(), fleet.logs());
        };
        let i: usize = msg.subject.rsplit('.').next().unwrap().parse().unwrap();
        answered.insert(i, serde_json::from_slice::<SubmitReply>(&msg.payload).unwrap());
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, kind, priority, payload, idempotency_key, (extract(epoch FROM created_at) * 1000)::int8 FROM tasks",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let rows: BTreeMap<_, _> = rows.into_iter().map(|r| (r.0, r)).collect();
    for (i, (id, body, refuse)) in cases.iter().enumerate() {
        let (reply, sent) = (&answered[&i], &subs[i]);
        if *refuse {
            assert_eq!(reply.reason.map(|r| r.as_str()), Some("invalid"), "case {i} {}: {reply:?}", body.payload);
            assert!(!rows.contains_key(id), "case {i} was written");
            continue;
        }
        assert!(reply.ok, "case {i} {}: {reply:?}", body.payload);
        let row = rows.get(id).unwrap_or_else(|| panic!("case {i}: no row"));
        // What intake decoded (and dispatched) is stored exactly, and it is the value sent.
        let decoded = taskfleet_proto::decode_envelope(&sent.body, None, 1 << 20).unwrap();
        assert_eq!(row.3.0, decoded.payload, "case {i}: stored payload differs from the dispatched one");
        assert!(same(&row.3.0, &body.payload), "case {i}: {} came back as {}", body.payload, row.3.0);
        assert_eq!((row.1.as_str(), row.2.as_str()), (body.kind.as_str(), body.priority), "case {i}");
        assert_eq!(row.4, body.idempotency_key, "case {i}");
        if body.created_at > 0 {
            assert_eq!(row.5 as u64, body.created_at, "case {i}");
        }
    }
    // Both outcomes are exercised, not only one.
    let refused = cases.iter().filter(|c| c.2).count();
    assert!((20..=CASES - 50).contains(&refused), "{refused} of {CASES} refused");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}

/// A burst of large submissions is taken in batches bounded by bytes: the coordinator's peak
/// memory stays far below the burst's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_submissions_is_taken_in_bounded_batches() {
    const N: usize = 200;
    const SIZE: usize = 400 * 1024;
    let mut fleet = Fleet::new("hostile_burst");
    fleet.set("TASKFLEET_COORDINATOR_SUBMIT_BATCH_MAX_BYTES", &(2 << 20).to_string());
    fleet.start_coordinator();
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;
    let text = "x".repeat(SIZE);
    let envs: Vec<TaskEnvelope> = (0..N).map(|i| TaskEnvelope::new("echo", json!({"i": i, "text": text}))).collect();
    fleet.submit_all(&client, &envs).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&pool).await.unwrap();
        if rows == N as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "{rows} of {N} written\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid = fleet.coordinator.as_ref().and_then(|c| c.pid()).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // 80 MiB of bodies: held at once they would be several times that (bodies, decoded
    // envelopes, dispatch copies).
    let burst_mib = (N * SIZE) >> 20;
    assert!(peak_kib < 150 * 1024, "coordinator peak RSS {} MiB for a {burst_mib} MiB burst", peak_kib / 1024);
    eprintln!("coordinator peak RSS {} MiB for a {burst_mib} MiB burst", peak_kib / 1024);
}
