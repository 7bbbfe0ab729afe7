//! The HTTP API (the shapes of Comfy's job API v2): submit, read, events (SSE), cancel,
//! list, models; `/openapi.json` describes it. API keys guard everything but health and
//! the OpenAPI document, and a key sees only its own jobs (an admin key, every job):
//! another key's job answers 404 as if it did not exist.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::auth::Caller;
use jobs::{cancel, events, list, models, read};
use openapi::openapi;
use submit::submit;

mod answer;
pub(crate) use answer::ApiError;
mod jobs;
mod openapi;
mod state;
mod submit;

pub use openapi::openapi_document;
pub use state::{ApiState, FleetConfig};

pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/api/v2/jobs", post(submit).get(list))
        .route("/api/v2/jobs/{id}", get(read))
        .route("/api/v2/jobs/{id}/events", get(events))
        .route("/api/v2/jobs/{id}/cancel", post(cancel))
        .route("/api/v2/models", get(models))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(32 * 1024 * 1024));
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .merge(api)
        .with_state(state)
}

async fn authenticate(
    State(state): State<Arc<ApiState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if !state.keys.required() {
        // No keys: no one to tell apart, so everything is visible as to an admin.
        req.extensions_mut().insert(Caller {
            key_id: "anonymous".into(),
            admin: true,
        });
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()));
    let Some(caller) = presented.and_then(|k| state.keys.verify(k)) else {
        tracing::info!(%method, %path, "refused: no valid API key");
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer <key>)",
        )
        .into_response();
    };
    let key_id = caller.key_id.clone();
    let resp = {
        req.extensions_mut().insert(caller);
        next.run(req).await
    };
    tracing::info!(key_id = %key_id, %method, %path, status = resp.status().as_u16(), "request");
    resp
}

#[cfg(test)]
mod tests {
    use super::answer::may_see;
    use super::submit::{prefer_wait, request_hash};
    use super::*;
    use crate::gateway::job::{Job, JobState};
    use axum::http::{HeaderMap, HeaderValue};
    use serde_json::{Value, json};

    #[test]
    fn openapi_lists_every_api_route() {
        let doc = openapi_document();
        for path in [
            "/api/v2/jobs",
            "/api/v2/jobs/{id}",
            "/api/v2/jobs/{id}/events",
            "/api/v2/jobs/{id}/cancel",
            "/api/v2/models",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path}");
        }
        let states = doc["components"]["schemas"]["Job"]["properties"]["state"]["enum"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(states, JobState::ALL.len());
    }

    #[test]
    fn the_request_hash_ignores_key_order_and_spacing_only() {
        let a: Value = serde_json::from_str(
            r#"{"prompt": {"1": {"inputs": {"x": 1, "y": "z"}}}, "fleet": "f"}"#,
        )
        .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"fleet":"f","prompt":{"1":{"inputs":{"y":"z","x":1}}}}"#)
                .unwrap();
        let c = json!({"fleet": "f", "prompt": {"1": {"inputs": {"x": 2, "y": "z"}}}});
        assert_eq!(request_hash(&a), request_hash(&b));
        assert_ne!(request_hash(&a), request_hash(&c));
        // Keys that need escaping are quoted as JSON, so no two bodies collide by text.
        assert_ne!(
            request_hash(&json!({"a\":1,\"b": 2})),
            request_hash(&json!({"a": 1, "b": 2}))
        );
    }

    #[test]
    fn a_key_sees_its_own_jobs_and_an_admin_every_job() {
        let mut job: Job = serde_json::from_value(json!({
            "id": "j", "fleet": "f", "state": "queued", "prompt": {}, "created_at": 1,
            "expires_at": 2, "key_id": "team-a"
        }))
        .unwrap();
        let caller = |key_id: &str, admin| Caller {
            key_id: key_id.into(),
            admin,
        };
        assert!(may_see(&caller("team-a", false), &job));
        assert!(!may_see(&caller("team-b", false), &job));
        assert!(may_see(&caller("ops", true), &job));
        // A job of no key (stored before keys were recorded): only admins.
        job.key_id = None;
        assert!(!may_see(&caller("team-a", false), &job));
        assert!(may_see(&caller("ops", true), &job));
    }

    #[test]
    fn prefer_wait_header() {
        let mut h = HeaderMap::new();
        h.insert("prefer", HeaderValue::from_static("respond-async, wait=30"));
        assert_eq!(prefer_wait(&h), Some(30));
    }
}
