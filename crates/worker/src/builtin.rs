//! Handlers every worker binary registers: `echo`, `sleep` and `fanout` for tests, demos and
//! benchmarks, and the workflow building blocks `spawn` (a run-time fan-out with a join),
//! `collect` (a join), `counter` (a loop step), `steps` (a long step that checkpoints) and
//! `stop` (ends its run early).

use crate::{NodeSpec, OnFailure, Spawn, TaskContext, TaskError};
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

fn invalid(message: String) -> TaskError {
    TaskError::fatal(message).with_code("invalid_payload")
}

/// Most children one `spawn` task may ask for (the coordinator's
/// `workflows.max_children_per_spawn` may allow fewer).
pub const SPAWN_MAX: u64 = 100_000;

/// Spawns `{"count": N}` children of `{"kind": K}` (default `echo`), each with the payload
/// `{"payload": P}` plus its index `"i"` (P's fields and `"i"` when P is an object, else
/// `{"i": i, "payload": P}`), and a join of `{"join": J}` (default `collect`) that
/// receives all their outcomes; with `{"on_child_failure": "continue"}` the join runs even
/// when children fail. The task then waits, holding no worker, and ends with the join's result.
pub async fn spawn(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let count = payload.get("count").and_then(Value::as_u64).unwrap_or(1);
    if count > SPAWN_MAX {
        return Err(invalid(format!("count {count} is more than {SPAWN_MAX}")));
    }
    let kind = payload.get("kind").and_then(Value::as_str).unwrap_or("echo");
    let join = payload.get("join").and_then(Value::as_str).unwrap_or("collect");
    let on_child_failure: OnFailure = match payload.get("on_child_failure") {
        None => OnFailure::Fail,
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| invalid(format!("on_child_failure: {e}")))?,
    };
    let inner = payload.get("payload").cloned().unwrap_or(Value::Null);
    let child_payload = |i: u64| match &inner {
        Value::Object(fields) => {
            let mut fields = fields.clone();
            fields.insert("i".into(), i.into());
            Value::Object(fields)
        }
        Value::Null => json!({ "i": i }),
        other => json!({ "i": i, "payload": other }),
    };
    let children = (0..count).map(|i| NodeSpec::new("", kind, child_payload(i))).collect();
    ctx.spawn(Spawn { children, join: NodeSpec::new("", join, Value::Null), on_child_failure })?;
    Ok(json!({ "spawned": count }))
}

/// A join: returns `{"results": [...], "failed": n}`, the parents' results in order (`null`
/// for a parent that did not succeed) and how many did not.
pub async fn collect(ctx: TaskContext, _payload: Value) -> Result<Value, TaskError> {
    let results: Vec<Value> = ctx.parents.iter().map(|p| p.result.clone().unwrap_or(Value::Null)).collect();
    let failed = ctx.parents.iter().filter(|p| p.result.is_none()).count();
    Ok(json!({ "results": results, "failed": failed }))
}

/// A loop step: returns `{"n": n}`, one more than the previous iteration's `n` (or than the
/// payload's `start`, default 0), and `{"parents": k}` the number of parents it saw.
pub async fn counter(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let before = match &ctx.previous {
        Some(p) => p.result.as_ref().and_then(|r| r.get("n")).and_then(Value::as_i64).unwrap_or(0),
        None => payload.get("start").and_then(Value::as_i64).unwrap_or(0),
    };
    Ok(json!({ "n": before + 1, "parents": ctx.parents.len(), "iteration": ctx.iteration }))
}

/// A long step: runs `{"steps": N}` steps of `{"ms": M}` milliseconds each, saving a
/// checkpoint `{"done": k}` after each, and starting from the last checkpoint when an earlier
/// attempt saved one. Returns `{"done": N, "resumed_from": k}`.
pub async fn steps(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    let total = payload.get("steps").and_then(Value::as_u64).unwrap_or(1);
    let ms = payload.get("ms").and_then(Value::as_u64).unwrap_or(0);
    let from = ctx.checkpoint.as_ref().and_then(|c| c.get("done")).and_then(Value::as_u64).unwrap_or(0);
    for done in from..total {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = ctx.cancel.cancelled() => return Err(TaskError::fatal("cancelled").with_code("cancelled")),
        }
        ctx.checkpoint(json!({ "done": done + 1 })).await?;
    }
    Ok(json!({ "done": total, "resumed_from": from }))
}

/// Ends its run early with its payload as the run's output.
pub async fn stop(ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
    ctx.stop_run();
    Ok(payload)
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

    #[tokio::test]
    async fn workflow_builtins() {
        let ctx = TaskContext::for_test("spawn");
        spawn(ctx.clone(), json!({"count": 3, "on_child_failure": "continue", "payload": {"ms": 5}})).await.unwrap();
        let effects = ctx.effects.lock().unwrap().clone();
        let s = effects.spawn.unwrap();
        assert_eq!(
            s.children[2].payload,
            json!({"ms": 5, "i": 2}),
            "a child's payload is the given one with its index"
        );
        assert_eq!((s.children.len(), s.join.kind.as_str(), s.on_child_failure), (3, "collect", OnFailure::Continue));
        assert_eq!(spawn(ctx, json!({"count": 1})).await.unwrap_err().code, "invalid_spawn", "one spawn per attempt");

        let mut ctx = TaskContext::for_test("collect");
        let outcome = |result: Option<Value>| taskfleet_proto::ParentOutcome {
            id: uuid::Uuid::now_v7(),
            node: None,
            state: if result.is_some() {
                taskfleet_proto::TaskState::Succeeded
            } else {
                taskfleet_proto::TaskState::Failed
            },
            result,
            error: None,
        };
        ctx.parents = std::sync::Arc::new(vec![outcome(Some(json!(1))), outcome(None)]);
        assert_eq!(collect(ctx.clone(), Value::Null).await.unwrap(), json!({"results": [1, null], "failed": 1}));
        ctx.previous = Some(std::sync::Arc::new(outcome(Some(json!({"n": 4})))));
        assert_eq!(counter(ctx, Value::Null).await.unwrap()["n"], 5);

        let ctx = TaskContext::for_test("stop");
        assert_eq!(stop(ctx.clone(), json!({"best": 1})).await.unwrap(), json!({"best": 1}));
        assert!(ctx.effects.lock().unwrap().stop_run);
        // Outside a worker a checkpoint cannot be stored.
        assert_eq!(
            steps(TaskContext::for_test("steps"), json!({"steps": 1})).await.unwrap_err().code,
            "checkpoint_failed"
        );
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
