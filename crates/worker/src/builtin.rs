//! Handlers every worker binary registers: `echo`, `sleep` and `fanout`, for tests, demos and
//! benchmarks.

use crate::{TaskContext, TaskError};
use serde_json::{Value, json};
use std::time::Duration;

/// Returns its payload unchanged.
pub async fn echo(_ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    Ok(payload)
}

/// Sleeps `{"ms": N}` milliseconds (honouring cancellation), then returns `{"slept_ms": N}`.
/// With `{"fail": "retryable"|"fatal"}` it fails after sleeping, for exercising retries.
pub async fn sleep(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let ms = payload.get("ms").and_then(Value::as_u64).unwrap_or(0);
    if ms > 0 {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = ctx.cancel.cancelled() => return Err(TaskError::fatal("cancelled").with_code("cancelled")),
        }
    }
    match payload.get("fail").and_then(Value::as_str) {
        Some("retryable") => Err(TaskError::retryable("asked to fail (retryable)").with_code("requested_failure")),
        Some("fatal") => Err(TaskError::fatal("asked to fail (fatal)").with_code("requested_failure")),
        _ => Ok(json!({ "slept_ms": ms })),
    }
}

/// Most children one `fanout` task may submit.
pub const FANOUT_MAX: u64 = 1_000;

/// Submits `{"count": N}` child tasks of `{"kind": K}` (default `echo`, N at most
/// [`FANOUT_MAX`]) in its own queue and priority, each with payload
/// `{"parent": <id>, "i": i, "payload": <payload>}`, and returns `{"children": [ids]}`. The
/// children carry this task's trace context, so they appear in its trace. Child ids derive from
/// the parent's id, so a retried attempt does not create them twice.
pub async fn fanout(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let count = payload.get("count").and_then(Value::as_u64).unwrap_or(1);
    if count > FANOUT_MAX {
        return Err(TaskError::fatal(format!("count {count} is more than {FANOUT_MAX}")).with_code("invalid_payload"));
    }
    let kind = payload.get("kind").and_then(Value::as_str).unwrap_or("echo");
    let inner = payload.get("payload").cloned().unwrap_or(Value::Null);
    let mut children = Vec::with_capacity(count as usize);
    for i in 0..count {
        let mut env = ctx.child_envelope(kind, json!({ "parent": ctx.task_id, "i": i, "payload": inner }));
        env.id = child_id(ctx.task_id, i);
        ctx.submit(&env).await?;
        children.push(env.id);
    }
    Ok(json!({ "children": children }))
}

/// The id of child `i` of `parent`: the parent's UUIDv7 with its last 48 random bits mixed with
/// `i + 1`, so it stays a valid UUIDv7 from the same millisecond.
fn child_id(parent: uuid::Uuid, i: u64) -> uuid::Uuid {
    let mut bytes = *parent.as_bytes();
    for (b, x) in bytes[10..].iter_mut().zip((i + 1).to_be_bytes()[2..].iter()) {
        *b ^= x;
    }
    uuid::Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builtins() {
        let out = echo(TaskContext::for_test("echo"), json!({"a": 1})).await.unwrap();
        assert_eq!(out, json!({"a": 1}));
        let out = sleep(TaskContext::for_test("sleep"), json!({"ms": 5})).await.unwrap();
        assert_eq!(out, json!({"slept_ms": 5}));
        let err = sleep(TaskContext::for_test("sleep"), json!({"fail": "fatal"})).await.unwrap_err();
        assert!(!err.is_retryable());
        // Outside a worker there is no fleet to submit to.
        let err = fanout(TaskContext::for_test("fanout"), json!({"count": 2})).await.unwrap_err();
        assert_eq!(err.code, "submit_failed");
        let err = fanout(TaskContext::for_test("fanout"), json!({"count": 5000})).await.unwrap_err();
        assert_eq!(err.code, "invalid_payload");
    }

    #[test]
    fn child_ids_are_stable_and_distinct() {
        let parent = uuid::Uuid::now_v7();
        let a: Vec<uuid::Uuid> = (0..100).map(|i| child_id(parent, i)).collect();
        let b: Vec<uuid::Uuid> = (0..100).map(|i| child_id(parent, i)).collect();
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<_> = a.iter().chain([&parent]).collect();
        assert_eq!(distinct.len(), 101);
        assert!(a.iter().all(|id| id.get_version_num() == 7 && id.as_bytes()[..10] == parent.as_bytes()[..10]));
    }
}
