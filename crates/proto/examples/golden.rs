//! Writes the golden encoded examples in `proto/golden/`: each value as MessagePack
//! (`.msgpack`) and as JSON (`.json`). Run from the workspace root after a deliberate change to
//! the wire format: `cargo run -p taskfleet-proto --example golden`.

use taskfleet_proto::*;
use uuid::Uuid;

fn write<T: serde::Serialize>(name: &str, value: &T) -> std::io::Result<()> {
    let dir = std::path::Path::new("proto/golden");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{name}.msgpack")), encode(value))?;
    let mut json = serde_json::to_string_pretty(value).unwrap_or_default();
    json.push('\n');
    std::fs::write(dir.join(format!("{name}.json")), json)
}

fn main() -> std::io::Result<()> {
    let id = Uuid::parse_str("01936d6e-8f2a-7c3b-9e4d-5f6a7b8c9d0e").expect("valid uuid");
    let dep = Uuid::parse_str("01936d6e-8f2a-7c3b-9e4d-000000000001").expect("valid uuid");
    let mut full = TaskEnvelope::new(
        "llm.chat",
        serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Summarise the attached report."}],
            "max_tokens": 256
        }),
    );
    full.id = id;
    full.queue = "research".into();
    full.priority = Priority::High;
    full.max_attempts = 5;
    full.timeout_ms = 120_000;
    full.idempotency_key = Some("report-2026-11-23".into());
    full.depends_on = vec![dep];
    full.created_at = 1_763_900_000_000;
    write("envelope_full", &full)?;

    let mut minimal = TaskEnvelope::new("echo", serde_json::json!({"text": "hello"}));
    minimal.id = id;
    minimal.created_at = 1_763_900_000_000;
    minimal.max_attempts = DEFAULT_MAX_ATTEMPTS;
    write("envelope_minimal", &minimal)?;

    let mut ok = TaskEvent::new(id, EventKind::Succeeded, "research");
    ok.task_kind = "llm.chat".into();
    ok.priority = Priority::High;
    ok.attempt = 2;
    ok.at = 1_763_900_001_500;
    ok.worker = Some("worker-7f9c".into());
    ok.result = Some(serde_json::json!({"summary": "Revenue grew 12%."}));
    ok.timings = Some(Timings {
        created_at: 1_763_900_000_000,
        received_at: 1_763_900_000_020,
        started_at: 1_763_900_000_021,
        finished_at: 1_763_900_001_500,
    });
    ok.tokens = Some(TokenUsage { prompt: 812, completion: 64 });
    ok.cost_usd = Some(0.000160);
    let mut retry = TaskEvent::new(dep, EventKind::Retrying, "research");
    retry.task_kind = "http".into();
    retry.attempt = 1;
    retry.at = 1_763_900_000_900;
    retry.error =
        Some(TaskErrorInfo { code: "http_429".into(), message: "rate limited by provider".into(), retryable: true });
    retry.retry_in_ms = Some(2_000);
    write("event_batch", &EventBatch::new(vec![ok, retry]))?;

    // A join's dispatch: its parents' outcomes, a failure among them (a `continue` edge).
    let mut join = TaskEnvelope::new("collect", serde_json::Value::Null);
    join.id = id;
    join.created_at = 1_763_900_000_000;
    join.max_attempts = DEFAULT_MAX_ATTEMPTS;
    join.run_id = Some(dep);
    join.node = Some("join".into());
    join.parents = vec![
        ParentOutcome {
            id: dep,
            node: Some("0".into()),
            state: TaskState::Succeeded,
            result: Some(serde_json::json!({"url": "https://example.org/a"})),
            error: None,
        },
        ParentOutcome {
            id: Uuid::parse_str("01936d6e-8f2a-7c3b-9e4d-000000000002").expect("valid uuid"),
            node: Some("1".into()),
            state: TaskState::Dead,
            result: None,
            error: Some(TaskErrorInfo { code: "http_503".into(), message: "unavailable".into(), retryable: true }),
        },
    ];
    join.checkpoint = Some(serde_json::json!({"done": 1}));
    write("dispatch_join", &join)?;

    // An attempt that spawned two searches and their join.
    let mut spawned = TaskEvent::new(id, EventKind::Spawned, "research");
    spawned.task_kind = "plan".into();
    spawned.attempt = 1;
    spawned.at = 1_763_900_000_500;
    spawned.result = Some(serde_json::json!({"queries": 2}));
    spawned.spawn = Some(Box::new(Spawn {
        children: vec![
            NodeSpec::new("", "http", serde_json::json!({"q": "rust"})),
            NodeSpec::new("", "http", serde_json::json!({"q": "nats"})),
        ],
        join: NodeSpec::new("", "collect", serde_json::Value::Null),
        on_child_failure: OnFailure::Continue,
    }));
    write("event_spawned", &EventBatch::new(vec![spawned]))?;

    write("committed_batch", &CommittedBatch { tasks: vec![CommittedTask { id, state: TaskState::Succeeded }] })?;
    write(
        "submit_reply_rejected",
        &SubmitReply {
            ok: false,
            task_id: None,
            duplicate: false,
            reason: Some(RejectReason::UnknownKind),
            error: Some("unknown task kind \"summon.dragon\"; accepted kinds: echo, sleep".into()),
        },
    )?;
    Ok(())
}
