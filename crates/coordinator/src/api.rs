//! The task API, over NATS request/reply (`<prefix>.api.<verb>`, JSON bodies; what the CLI
//! uses) and over HTTP (`/v1/...`). Both answer from Postgres. The bodies are those of
//! `taskfleet_proto`'s API types; a failure answers [`ApiErrorBody`] (over HTTP with the
//! status of its kind).
//!
//! | verb | request | reply |
//! |---|---|---|
//! | `task.get` | [`TaskIdRequest`] | the task |
//! | `task.list` | [`ListRequest`] | `[task, …]` newest first |
//! | `task.counts` | [`CountsRequest`] | `{"<state>": n, …}` |
//! | `task.cancel` | [`TaskIdRequest`] | [`CancelReply`] |
//! | `task.replay` | [`ReplayRequest`] | [`ReplayReply`] |
//! | `task.runnable` | [`RunnableRequest`] | [`RunnableReply`] (workers ask before running a redelivered or later-generation message) |
//! | `task.parents` | `ParentsRequest` | `ParentsReply` (a step whose parents' outcomes were too large to travel with it) |
//! | `task.checkpoint` | `CheckpointRequest` | `CheckpointReply`, once stored |
//! | `run.submit` | `RunSpec` (JSON or MessagePack) | `RunSubmitted`, once the whole run is committed |
//! | `run.get` | `RunGetRequest` | `RunView` |
//! | `run.list` | `RunListRequest` | `[RunSummary, …]` newest first |
//! | `run.cancel`, `run.resume` | [`RunIdRequest`] | `RunChange` |

use crate::{Ctx, runs};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use taskfleet_proto::{
    ApiError, ApiErrorBody, ApiErrorKind, CancelReply, CountsRequest, ListRequest, Priority, QueueOpenReply,
    QueueOpenRequest, ReplayReply, ReplayRequest, RunIdRequest, RunnableReply, RunnableRequest, TaskId, TaskIdRequest,
    VERB_QUEUE_OPEN, VERB_RUN_CANCEL, VERB_RUN_GET, VERB_RUN_LIST, VERB_RUN_RESUME, VERB_RUN_SUBMIT, VERB_TASK_CANCEL,
    VERB_TASK_CHECKPOINT, VERB_TASK_COUNTS, VERB_TASK_GET, VERB_TASK_LIST, VERB_TASK_PARENTS, VERB_TASK_REPLAY,
    VERB_TASK_RUNNABLE, validate_queue,
};
use tokio_util::sync::CancellationToken;

/// Queue group shared by coordinator replicas, so each request is answered once.
const API_GROUP: &str = "taskfleet-coordinator";
/// Most tasks one `task.runnable` request may ask about.
const MAX_RUNNABLE_QUERIES: usize = 10_000;

/// A verb's reply body, or why there is none.
pub(crate) type Answer = Result<Value, ApiError>;

pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ApiErrorKind::BadRequest, message)
}

fn not_found(id: TaskId) -> ApiError {
    ApiError::new(ApiErrorKind::NotFound, format!("no task {id}"))
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ApiErrorKind::Unavailable, e.to_string())
}

pub(crate) fn reply(body: impl Serialize) -> Answer {
    Ok(serde_json::to_value(body).unwrap_or(Value::Null))
}

/// Answers one API request (an empty body reads as `{}`).
async fn answer(ctx: &Ctx, verb: &str, body: &[u8]) -> Answer {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    fn request<T: DeserializeOwned>(verb: &str, body: &[u8]) -> Result<T, ApiError> {
        serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid request body for {verb}: {e}")))
    }
    match verb {
        VERB_TASK_GET => task(ctx, request::<TaskIdRequest>(verb, body)?.id).await,
        VERB_TASK_LIST => list(ctx, request(verb, body)?).await,
        VERB_TASK_COUNTS => counts(ctx, request(verb, body)?).await,
        VERB_TASK_CANCEL => cancel(ctx, request::<TaskIdRequest>(verb, body)?.id).await,
        VERB_TASK_REPLAY => replay(ctx, request(verb, body)?).await,
        VERB_TASK_RUNNABLE => runnable(ctx, request(verb, body)?).await,
        VERB_QUEUE_OPEN => open_queues(ctx, request(verb, body)?).await,
        VERB_TASK_PARENTS => runs::parents(ctx, request(verb, body)?).await,
        VERB_TASK_CHECKPOINT => runs::checkpoint(ctx, request(verb, body)?).await,
        VERB_RUN_SUBMIT => runs::submit(ctx, body).await,
        VERB_RUN_GET => runs::get(ctx, request(verb, body)?).await,
        VERB_RUN_LIST => runs::list(ctx, request(verb, body)?).await,
        VERB_RUN_CANCEL => runs::cancel(ctx, request::<RunIdRequest>(verb, body)?.id).await,
        VERB_RUN_RESUME => runs::resume(ctx, request::<RunIdRequest>(verb, body)?.id).await,
        other => Err(bad_request(format!("unknown API verb {other:?}"))),
    }
}

/// One task as stored.
async fn task(ctx: &Ctx, id: TaskId) -> Answer {
    ctx.store.get_task(id).await.map_err(unavailable)?.map_or_else(|| Err(not_found(id)), reply)
}

/// Tasks, newest first.
async fn list(ctx: &Ctx, r: ListRequest) -> Answer {
    reply(ctx.store.list_tasks(&r).await.map_err(unavailable)?)
}

/// Task counts by state.
async fn counts(ctx: &Ctx, r: CountsRequest) -> Answer {
    let rows = ctx.store.count_by_state(r.queue.as_deref()).await.map_err(unavailable)?;
    reply(rows.into_iter().collect::<BTreeMap<String, i64>>())
}

/// Whether workers may run the messages they ask about.
async fn runnable(ctx: &Ctx, r: RunnableRequest) -> Answer {
    if r.tasks.len() > MAX_RUNNABLE_QUERIES {
        return Err(bad_request(format!("at most {MAX_RUNNABLE_QUERIES} tasks per request")));
    }
    let (answers, checkpoints) = ctx.store.runnable(&r.tasks).await.map_err(unavailable)?;
    reply(RunnableReply { answers, checkpoints })
}

/// Most queues one `queue.open` may name.
const MAX_OPEN_QUEUES: usize = 64;

/// Creates (or updates) the dispatch consumers of the queues a worker is about to pull: only
/// the coordinator creates consumers, so a worker's NATS user needs no right to.
async fn open_queues(ctx: &Ctx, r: QueueOpenRequest) -> Answer {
    if r.queues.len() > MAX_OPEN_QUEUES {
        return Err(bad_request(format!("at most {MAX_OPEN_QUEUES} queues per request")));
    }
    let allowed = &ctx.config.coordinator.queues;
    let mut consumers = Vec::new();
    for queue in &r.queues {
        validate_queue("queue", queue).map_err(|e| bad_request(e.to_string()))?;
        if !allowed.is_empty() && !allowed.contains(queue) {
            return Err(bad_request(format!("queue {queue:?} is not among coordinator.queues")));
        }
        for p in Priority::ALL {
            let consumer = ctx.topology.dispatch_consumer(queue, p).await.map_err(unavailable)?;
            consumers.push(consumer.cached_info().name.clone());
        }
    }
    reply(QueueOpenReply { consumers })
}

/// Cancels a task: final state `cancelled` in Postgres (with its pending dependents), then its
/// id in the cancellation bucket, so a worker holding it skips it or stops it.
async fn cancel(ctx: &Ctx, id: TaskId) -> Answer {
    let outcome = ctx.store.cancel(id).await.map_err(unavailable)?;
    let previous = outcome.previous.ok_or_else(|| not_found(id))?;
    if outcome.cancelled {
        crate::recorder::announce_cancelled(ctx, &[id]).await;
        metrics::counter!("taskfleet_coordinator_cancelled_total").increment(outcome.finalized.len() as u64);
        crate::recorder::notify_committed(ctx, &outcome.finalized).await;
        crate::recorder::notify_runs_ended(ctx, &outcome.runs_ended).await;
        if let Err(e) = crate::dispatch::publish_rows(&ctx.topology, &outcome.released).await {
            tracing::error!(error = %e, "cannot dispatch dependents released by a cancellation now");
        }
    }
    reply(CancelReply {
        cancelled: outcome.cancelled,
        previous,
        dependents_cancelled: outcome.finalized.len().saturating_sub(1),
    })
}

/// Moves dead tasks back to `queued` and dispatches them with a fresh attempt budget.
async fn replay(ctx: &Ctx, r: ReplayRequest) -> Answer {
    if r.ids.is_none() && !r.all {
        return Err(bad_request("name task ids, or ask for all dead tasks with \"all\": true"));
    }
    let replayed = ctx.store.replay_dead(r.ids.as_deref(), r.queue.as_deref(), 10_000).await.map_err(unavailable)?;
    if let Err(e) = crate::dispatch::publish_rows(&ctx.topology, &replayed).await {
        // The rows are queued; the rescuer dispatches them once it finds them idle.
        tracing::error!(error = %e, "cannot dispatch replayed tasks now");
    }
    metrics::counter!("taskfleet_coordinator_replayed_total").increment(replayed.len() as u64);
    reply(ReplayReply { replayed: replayed.iter().map(|t| t.envelope.id).collect() })
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
        // Not a request: a stream's message that a user with `MSG.NEXT` rights had delivered
        // here keeps its own subject (and its reply is JetStream's ack subject, so an answer
        // would acknowledge it). Left alone, it is redelivered after its ack wait.
        let Some(verb) = msg.subject.strip_prefix(prefix.as_str()).map(str::to_string) else { continue };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let body = match answer(&ctx, &verb, &msg.payload).await {
                Ok(value) => serde_json::to_vec(&value),
                Err(e) => serde_json::to_vec(&e.into_body()),
            };
            if let Err(e) = ctx.client.publish(reply, Bytes::from(body.unwrap_or_default())).await {
                tracing::debug!(error = %e, "cannot send API reply");
            }
        });
    }
}

/// An answer over HTTP: the reply with 200, or the error body with its kind's status.
fn to_response(answer: Answer) -> Response {
    match answer {
        Ok(value) => (StatusCode::OK, Json(value)).into_response(),
        Err(e) => {
            let status = StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, Json(ApiErrorBody { error: e })).into_response()
        }
    }
}

/// HTTP routes: `GET /v1/tasks/{id}`, `GET /v1/tasks?state=&queue=&limit=`, `GET /v1/counts?queue=`.
/// `main` serves them behind [`crate::http_auth::protect`]: a bearer token, or loopback peers only.
pub(crate) fn http_routes(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route(
            "/v1/tasks/{id}",
            get(|State(ctx): State<Arc<Ctx>>, Path(id): Path<String>| async move {
                match uuid::Uuid::parse_str(&id) {
                    Ok(id) => to_response(task(&ctx, id).await),
                    Err(e) => to_response(Err(bad_request(format!("invalid task id: {e}")))),
                }
            }),
        )
        .route(
            "/v1/tasks",
            get(|State(ctx): State<Arc<Ctx>>, Query(r): Query<ListRequest>| async move {
                to_response(list(&ctx, r).await)
            }),
        )
        .route(
            "/v1/counts",
            get(|State(ctx): State<Arc<Ctx>>, Query(r): Query<CountsRequest>| async move {
                to_response(counts(&ctx, r).await)
            }),
        )
        .fallback(|| async { to_response(Err(ApiError::new(ApiErrorKind::NotFound, "no such route"))) })
        .with_state(ctx)
}
