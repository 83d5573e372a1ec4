//! The task API, over NATS request/reply (`<prefix>.api.<verb>`, JSON bodies; what the CLI
//! uses) and over HTTP (`/v1/...`). Both answer from Postgres.
//!
//! | verb | request | reply |
//! |---|---|---|
//! | `task.get` | `{"id": "<uuid>"}` | the task, or `{"error": …}` |
//! | `task.list` | `{"state"?, "queue"?, "limit"?}` | `[task, …]` newest first |
//! | `task.counts` | `{"queue"?}` | `{"<state>": n, …}` |
//! | `task.cancel` | `{"id": "<uuid>"}` | `{"cancelled": bool, "previous": state}` |
//! | `task.replay` | `{"ids": [..]}` or `{"all": true, "queue"?}` | `{"replayed": [ids]}` |
//! | `task.runnable` | `{"tasks": [{"id", "generation"}, ..]}` | `{"answers": ["run" \| "final" \| "stale" \| "unknown", ..]}` (workers ask before running a redelivered or later-generation message) |

use crate::Ctx;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use taskfleet_store::ListFilter;
use tokio_util::sync::CancellationToken;

/// Queue group shared by coordinator replicas, so each request is answered once.
const API_GROUP: &str = "taskfleet-coordinator";

#[derive(Deserialize)]
struct IdRequest {
    id: uuid::Uuid,
}

#[derive(Deserialize)]
struct ReplayRequest {
    #[serde(default)]
    ids: Option<Vec<uuid::Uuid>>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    queue: Option<String>,
}

#[derive(Deserialize, Default)]
struct CountsRequest {
    #[serde(default)]
    queue: Option<String>,
}

/// Answers one API request; errors become `{"error": "..."}` bodies, never a crash.
async fn answer(ctx: &Ctx, verb: &str, body: &[u8]) -> Value {
    let parse_err = |e: serde_json::Error| json!({ "error": format!("invalid request body for {verb}: {e}") });
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    let result =
        match verb {
            "task.get" => match serde_json::from_slice::<IdRequest>(body) {
                Err(e) => return parse_err(e),
                Ok(r) => ctx.store.get_task(r.id).await.map(|t| match t {
                    Some(t) => serde_json::to_value(t).unwrap_or(Value::Null),
                    None => json!({ "error": format!("no task {}", r.id), "not_found": true }),
                }),
            },
            "task.list" => match serde_json::from_slice::<ListFilter>(body) {
                Err(e) => return parse_err(e),
                Ok(f) => ctx.store.list_tasks(&f).await.map(|t| serde_json::to_value(t).unwrap_or(Value::Null)),
            },
            "task.counts" => match serde_json::from_slice::<CountsRequest>(body) {
                Err(e) => return parse_err(e),
                Ok(r) => ctx
                    .store
                    .count_by_state(r.queue.as_deref())
                    .await
                    .map(|rows| Value::Object(rows.into_iter().map(|(s, n)| (s, json!(n))).collect())),
            },
            "task.cancel" => match serde_json::from_slice::<IdRequest>(body) {
                Err(e) => return parse_err(e),
                Ok(r) => return cancel(ctx, r.id).await,
            },
            "task.replay" => match serde_json::from_slice::<ReplayRequest>(body) {
                Err(e) => return parse_err(e),
                Ok(r) => return replay(ctx, r).await,
            },
            "task.runnable" => match serde_json::from_slice::<taskfleet_proto::RunnableRequest>(body) {
                Err(e) => return parse_err(e),
                Ok(r) if r.tasks.len() > 10_000 => return json!({ "error": "at most 10000 tasks per request" }),
                Ok(r) => ctx.store.runnable(&r.tasks).await.map(|answers| {
                    serde_json::to_value(taskfleet_proto::RunnableReply { answers }).unwrap_or(Value::Null)
                }),
            },
            other => return json!({ "error": format!("unknown API verb {other:?}") }),
        };
    result.unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

/// Cancels a task: final state `cancelled` in Postgres (with its pending dependents), then its
/// id in the cancellation bucket, so a worker holding it skips it or stops it.
async fn cancel(ctx: &Ctx, id: uuid::Uuid) -> Value {
    let outcome = match ctx.store.cancel(id).await {
        Ok(o) => o,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let Some(previous) = outcome.previous else {
        return json!({ "error": format!("no task {id}"), "not_found": true });
    };
    if outcome.cancelled {
        if let Err(e) = ctx.cancel_bucket.put(id.to_string(), Bytes::new()).await {
            // Postgres already says cancelled; a worker that still runs it records an attempt
            // whose outcome is ignored.
            tracing::warn!(task_id = %id, error = %e, "cannot announce a cancellation to workers");
        }
        metrics::counter!("taskfleet_coordinator_cancelled_total").increment(outcome.finalized.len() as u64);
        crate::recorder::notify_committed(ctx, &outcome.finalized).await;
    }
    json!({ "cancelled": outcome.cancelled, "previous": previous.as_str(),
            "dependents_cancelled": outcome.finalized.len().saturating_sub(1) })
}

/// Moves dead tasks back to `queued` and dispatches them with a fresh attempt budget.
async fn replay(ctx: &Ctx, r: ReplayRequest) -> Value {
    if r.ids.is_none() && !r.all {
        return json!({ "error": "name task ids, or ask for all dead tasks with \"all\": true" });
    }
    let replayed = match ctx.store.replay_dead(r.ids.as_deref(), r.queue.as_deref(), 10_000).await {
        Ok(t) => t,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let subjects = &ctx.topology.subjects;
    let out = replayed
        .iter()
        .map(|t| crate::dispatch::redispatch_message(subjects, &t.envelope, None, t.attempt_offset, t.generation))
        .collect();
    if let Err(e) = crate::dispatch::publish(&ctx.topology, out).await {
        // The rows are queued; the rescuer dispatches them once it finds them idle.
        tracing::error!(error = %e, "cannot dispatch replayed tasks now");
    }
    metrics::counter!("taskfleet_coordinator_replayed_total").increment(replayed.len() as u64);
    json!({ "replayed": replayed.iter().map(|t| t.envelope.id).collect::<Vec<_>>() })
}

/// Serves the NATS API until shutdown.
pub(crate) async fn serve_nats(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let subject = ctx.topology.subjects.api_all();
    let prefix = format!("{}.api.", ctx.topology.subjects.prefix());
    let mut sub = ctx
        .client
        .queue_subscribe(subject, API_GROUP.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to the API subject: {e}"))?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let ctx = ctx.clone();
        let verb = msg.subject.strip_prefix(prefix.as_str()).unwrap_or("").to_string();
        tokio::spawn(async move {
            let value = answer(&ctx, &verb, &msg.payload).await;
            let bytes = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
            if let Err(e) = ctx.client.publish(reply, bytes).await {
                tracing::debug!(error = %e, "cannot send API reply");
            }
        });
    }
}

fn to_response(v: Value) -> Response {
    let status = match v.get("error") {
        None => StatusCode::OK,
        Some(_) if v.get("not_found").is_some() => StatusCode::NOT_FOUND,
        Some(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Json(v)).into_response()
}

/// HTTP routes: `GET /v1/tasks/{id}`, `GET /v1/tasks?state=&queue=&limit=`, `GET /v1/counts?queue=`.
pub(crate) fn http_routes(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route(
            "/v1/tasks/{id}",
            get(|State(ctx): State<Arc<Ctx>>, Path(id): Path<String>| async move {
                match uuid::Uuid::parse_str(&id) {
                    Ok(id) => to_response(
                        answer(&ctx, "task.get", &serde_json::to_vec(&json!({ "id": id })).unwrap_or_default()).await,
                    ),
                    Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "error": format!("invalid task id: {e}") })))
                        .into_response(),
                }
            }),
        )
        .route(
            "/v1/tasks",
            get(|State(ctx): State<Arc<Ctx>>, Query(f): Query<ListFilter>| async move {
                to_response(answer(&ctx, "task.list", &serde_json::to_vec(&f).unwrap_or_default()).await)
            }),
        )
        .route(
            "/v1/counts",
            get(|State(ctx): State<Arc<Ctx>>, Query(q): Query<std::collections::HashMap<String, String>>| async move {
                let body = json!({ "queue": q.get("queue") });
                to_response(answer(&ctx, "task.counts", &serde_json::to_vec(&body).unwrap_or_default()).await)
            }),
        )
        .with_state(ctx)
}
