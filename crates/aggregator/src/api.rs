//! The aggregator's HTTP endpoints: the dashboard page (`/`) and the `/v1/stats` snapshot.

use crate::{Ctx, lock};
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::{Router, routing::get};
use std::sync::{Arc, LazyLock};
use taskfleet_proto::CONTENT_TYPE_JSON;

/// The dashboard as one self-contained page: `dashboard.html` with `dashboard.css` and
/// `dashboard.js` put in place of their markers (kept apart in the source to stay readable).
static DASHBOARD: LazyLock<String> = LazyLock::new(|| {
    include_str!("dashboard.html").replacen("/* dashboard.css */", include_str!("dashboard.css"), 1).replacen(
        "/* dashboard.js */",
        include_str!("dashboard.js"),
        1,
    )
});

/// HTTP routes: `GET /` (the dashboard) and `GET /v1/stats` (the latest snapshot, JSON).
pub(crate) fn http_routes(ctx: Arc<Ctx>) -> Router {
    Router::new().route("/", get(|| async { Html(DASHBOARD.as_str()) })).route(
        "/v1/stats",
        get(move || {
            let body = lock(&ctx.snapshot).clone();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE_JSON)], body.as_ref().clone()).into_response() }
        }),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_dashboard_is_one_page_with_its_style_and_script() {
        let page = super::DASHBOARD.as_str();
        assert!(!page.contains("/* dashboard.css */") && !page.contains("/* dashboard.js */"));
        assert!(page.contains(include_str!("dashboard.css")) && page.contains(include_str!("dashboard.js")));
        assert_eq!(page.matches("<script").count(), 1);
    }
}
