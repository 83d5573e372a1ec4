//! Handlers every worker binary registers: `echo` and `sleep`, for tests, demos and benchmarks.

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
    }
}
