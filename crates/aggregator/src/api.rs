//! The aggregator's HTTP endpoints: the dashboard page (`/`) and the `/v1/stats` snapshot.

use crate::{Ctx, lock};
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::{Router, routing::get};
use std::sync::Arc;
use taskfleet_proto::CONTENT_TYPE_JSON;

/// HTTP routes: `GET /` (the dashboard) and `GET /v1/stats` (the latest snapshot, JSON).
pub(crate) fn http_routes(ctx: Arc<Ctx>) -> Router {
    Router::new().route("/", get(|| async { Html(include_str!("dashboard.html")) })).route(
        "/v1/stats",
        get(move || {
            let body = lock(&ctx.snapshot).clone();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE_JSON)], body.as_ref().clone()).into_response() }
        }),
    )
}
