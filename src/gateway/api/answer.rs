//! What a handler answers: the typed errors (`{error: {type, message}}` with its status),
//! and a job as a caller may see it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde_json::{Value, json};

use super::state::ApiState;
use crate::gateway::auth::Caller;
use crate::gateway::job::{Job, JobState};

pub(crate) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) message: String,
    pub(super) extra: Value,
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            extra: Value::Null,
            retry_after: None,
        }
    }
    /// With `Retry-After: secs`: nothing was done, and trying again soon may work.
    pub(crate) fn retry_after(self, secs: u64) -> ApiError {
        ApiError {
            retry_after: Some(secs),
            ..self
        }
    }
    pub(super) fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
    /// The job store failed (a full or broken volume): nothing was promised, try again.
    pub(super) fn store(e: crate::gateway::store::StoreError) -> ApiError {
        tracing::error!(error = %e, "job store error");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
        .retry_after(5)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"type": self.kind, "message": self.message});
        if let Value::Object(extra) = self.extra {
            error
                .as_object_mut()
                .into_iter()
                .for_each(|e| e.extend(extra.clone()));
        }
        let mut resp = (self.status, Json(json!({"error": error}))).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The view with a fresh presigned URL per stored output.
pub(super) async fn view(state: &ApiState, job: &Job) -> Value {
    let mut v = Job::public_view(job);
    if job.state == JobState::Queued && job.pod.is_none() {
        if let Some(ahead) = state.engine.queue_position(&job.id) {
            v["queue_position"] = json!(ahead);
        }
        // Why it waits, when it is not just the queue.
        let signal = state.engine.signals.get(&job.fleet);
        if let Some(cap) = state.engine.share_at_cap(&job.id) {
            v["waiting"] = json!({"reason": "MaxRunning",
                "message": format!("this key's share (max-running={cap}) already has {cap} jobs on pods; it runs when one of them ends")});
        } else if let Some(message) = signal.no_capacity {
            v["waiting"] = json!({"reason": "NoCapacity", "message": message});
        } else if state.engine.waits_for_models(&job.id) {
            v["waiting"] = json!({"reason": "ModelsSyncing",
                "message": "the fleet's ready pods are on nodes that hold only the ModelSet's hot models so far, and this job needs others; it runs when a node holds them"});
        } else if state.max_cold_start_wait.is_some() && state.engine.ready_pods(&job.fleet) == 0 {
            v["waiting"] = json!({"reason": "ColdStart",
                "message": "the fleet has no ready pod: one is starting (node, models, image)"});
        }
    }
    if let (Some(store), Some(outputs)) = (&state.engine.outputs, v["outputs"].as_array_mut()) {
        for out in outputs.iter_mut() {
            if let Some(key) = out.get("key").and_then(Value::as_str).map(str::to_string) {
                match store.presign(&key).await {
                    Ok(url) => out["url"] = json!(url),
                    Err(e) => tracing::warn!(%key, error = %e, "cannot presign"),
                }
            }
        }
    }
    v
}

pub(super) fn bad(kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, kind, message)
}

pub(super) fn unprocessable(kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, kind, message)
}

pub(super) fn not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no job {id}"))
}

/// Whether the caller may see and control the job: its own, or any for an admin key.
pub(super) fn may_see(caller: &Caller, job: &Job) -> bool {
    caller.admin || job.key_id.as_deref() == Some(caller.key_id.as_str())
}

/// The job, if it exists and the caller may see it: another key's job is answered
/// exactly as an unknown id, so ids do not leak across keys.
pub(super) async fn visible_job(
    state: &ApiState,
    caller: &Caller,
    id: &str,
) -> Result<Job, ApiError> {
    match state.engine.get(id).await.map_err(ApiError::store)? {
        Some(job) if may_see(caller, &job) => Ok(job),
        _ => Err(not_found(id)),
    }
}
