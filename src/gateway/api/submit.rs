//! `POST /api/v2/jobs`: a job admitted (or refused, naming why), and sync mode's wait.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::super::auth::Caller;
use super::super::engine::Admission;
use super::super::job::{InputFile, Job, JobState, now_millis};
use super::super::outputs::parse_s3_url;
use super::super::workflow;
use super::answer::{ApiError, bad, unprocessable, view};
use super::state::ApiState;

#[derive(Deserialize)]
pub(super) struct InputSource {
    base64: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct SubmitRequest {
    /// An API-format workflow.
    prompt: Option<Value>,
    /// Or the name of a stored workflow, with per-node input overrides.
    workflow: Option<String>,
    #[serde(default)]
    overrides: Map<String, Value>,
    #[serde(default)]
    inputs: BTreeMap<String, InputSource>,
    /// A fleet by name; unset: the fleet whose catalog has every model, least loaded.
    fleet: Option<String>,
    webhook: Option<String>,
    /// A hint within the caller's own share (`-1000..=1000`, higher first).
    #[serde(default)]
    priority: i32,
}

#[derive(Deserialize)]
pub(super) struct WaitQuery {
    /// Sync mode: wait up to this many seconds for the job to end.
    wait: Option<u64>,
}

/// SHA-256 hex of the body with object keys sorted and no whitespace: the same request
/// sent again (keys in another order, other spacing) hashes the same.
pub(super) fn request_hash(body: &Value) -> String {
    fn canonical(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    canonical(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    use sha2::{Digest, Sha256};
    let mut text = String::new();
    canonical(body, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}

pub(super) fn stored_workflow(state: &ApiState, name: &str) -> Result<Value, ApiError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    let dir = state
        .workflows_dir
        .as_ref()
        .filter(|_| valid)
        .ok_or_else(|| bad("unknown_workflow", format!("no stored workflow {name:?}")))?;
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_workflow",
            format!("no stored workflow {name:?}"),
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ApiError::internal(format!("stored workflow {name}: {e}")))
}

/// The fleet for a job: the named one, or the least loaded whose catalog has every model.
pub(super) fn choose_fleet(
    state: &ApiState,
    requested: Option<&str>,
    refs: &[workflow::ModelRef],
) -> Result<String, ApiError> {
    if let Some(name) = requested {
        return state
            .fleets
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.name.clone())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_fleet",
                    format!("this gateway fronts no fleet {name:?}"),
                )
            });
    }
    let mut best: Option<(usize, String)> = None;
    for fleet in &state.fleets {
        if !state
            .catalogs
            .missing(&fleet.name, fleet.model_set.is_some(), refs)
            .is_some_and(|m| m.is_empty())
        {
            continue;
        }
        let (queued, in_flight) = state.engine.load(&fleet.name);
        if best
            .as_ref()
            .is_none_or(|(load, _)| queued + in_flight < *load)
        {
            best = Some((queued + in_flight, fleet.name.clone()));
        }
    }
    match best {
        Some((_, name)) => Ok(name),
        None if state.fleets.len() == 1 => Ok(state.fleets[0].name.clone()),
        None => Err(ApiError {
            extra: json!({"missing": refs.iter().map(|r| json!({"node": r.node, "input": r.input, "name": r.name})).collect::<Vec<_>>()}),
            ..ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "missing_model",
                "no fleet of this gateway has every model the workflow loads",
            )
        }),
    }
}

pub(super) async fn submit(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(query): Query<WaitQuery>,
    headers: HeaderMap,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| bad("invalid_request", e.body_text()))?;
    let body_hash = request_hash(&body);
    let req =
        SubmitRequest::deserialize(&body).map_err(|e| bad("invalid_request", e.to_string()))?;
    drop(body);
    let key_id = caller.key_id;
    let mut prompt = match (req.prompt, req.workflow.as_deref()) {
        (Some(p), None) => p,
        (None, Some(name)) => stored_workflow(&state, name)?,
        _ => {
            return Err(bad(
                "invalid_request",
                "give exactly one of `prompt` (API-format workflow) and `workflow` (a stored workflow's name)",
            ));
        }
    };
    workflow::apply_overrides(&mut prompt, &req.overrides)
        .map_err(|e| bad("invalid_workflow", e.to_string()))?;
    workflow::validate(&prompt).map_err(|e| bad("invalid_workflow", e.to_string()))?;
    workflow::check_references(&prompt).map_err(|e| ApiError {
        extra: json!({"node": e.node, "input": e.input}),
        ..unprocessable("forbidden_reference", e.to_string())
    })?;
    // Each name becomes a file name in the pod's `input/`: checked before any source is
    // read or any pod is asked.
    if let Some((name, why)) = req
        .inputs
        .keys()
        .find_map(|name| Some((name, workflow::input_name_problem(name)?)))
    {
        return Err(ApiError {
            extra: json!({"input": name}),
            ..unprocessable("invalid_input_name", format!("input {name:?}: {why}"))
        });
    }
    let refs = workflow::model_refs(&prompt);
    let fleet = choose_fleet(&state, req.fleet.as_deref(), &refs)?;
    let unknown = state.engine.unknown_node_types(&fleet, &prompt);
    if let Some((node, class)) = unknown.first() {
        let list: Vec<Value> = unknown
            .iter()
            .map(|(node, class)| json!({"node": node, "class_type": class}))
            .collect();
        return Err(ApiError {
            extra: json!({"node": node, "unknown": list}),
            ..unprocessable(
                "unknown_node_type",
                format!("node {node}: fleet {fleet}'s ComfyUI has no node type {class:?}"),
            )
        });
    }
    let has_model_set = state
        .fleets
        .iter()
        .any(|f| f.name == fleet && f.model_set.is_some());
    match state.catalogs.missing(&fleet, has_model_set, &refs) {
        None => {
            return Err(ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "catalog_not_ready",
                    format!("the model catalog of fleet {fleet} is not loaded yet"),
                )
            });
        }
        Some(missing) if !missing.is_empty() => {
            let list: Vec<Value> = missing
                .iter()
                .map(|r| json!({"node": r.node, "input": r.input, "name": r.name}))
                .collect();
            let names: Vec<&str> = missing.iter().map(|r| r.name.as_str()).collect();
            return Err(ApiError {
                extra: json!({"missing": list}),
                ..ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "missing_model",
                    format!("not in fleet {fleet}'s ModelSet: {}", names.join(", ")),
                )
            });
        }
        Some(_) => {}
    }
    if !(-1000..=1000).contains(&req.priority) {
        return Err(bad(
            "invalid_priority",
            format!("priority {} is outside -1000..=1000", req.priority),
        ));
    }
    if let Some(url) = &req.webhook {
        if !state.engine.webhooks.enabled() {
            return Err(bad(
                "webhooks_disabled",
                "this gateway has no webhook secret (spec.gateway.webhookSecret)",
            ));
        }
        // The earliest refusal: scheme, userinfo and refused IP literals (names are
        // checked again at each connection, since DNS can change).
        if let Err(e) = state.engine.webhooks.check_url(url) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_webhook",
                e.to_string(),
            ));
        }
    }
    let mut inputs = Vec::new();
    for (name, source) in req.inputs {
        let source = match (source.base64, source.url) {
            (Some(b), None) => format!("base64:{b}"),
            (None, Some(url)) => {
                let (bucket, _) = parse_s3_url(&url).ok_or_else(|| {
                    bad(
                        "invalid_input",
                        format!("input {name}: url must be s3://bucket/key"),
                    )
                })?;
                if !state
                    .engine
                    .settings
                    .input_buckets
                    .iter()
                    .any(|b| b == bucket)
                {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "input_bucket_not_allowed",
                        format!("input {name}: bucket {bucket} is not allowed"),
                    ));
                }
                url
            }
            _ => {
                return Err(bad(
                    "invalid_input",
                    format!("input {name}: give exactly one of base64 and url"),
                ));
            }
        };
        inputs.push(InputFile { name, source });
    }
    let id = uuid::Uuid::new_v4().to_string();
    workflow::prefix_outputs(&mut prompt, &id);
    let now = now_millis();
    let job = Job {
        id,
        fleet,
        state: JobState::Queued,
        checkpoint: workflow::checkpoint(&prompt),
        prompt,
        inputs,
        webhook: req.webhook,
        idempotency_key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(|k| format!("{key_id}/{k}")),
        request_hash: Some(body_hash.clone()),
        key_id: Some(key_id),
        created_at: now,
        dispatched_at: None,
        started_at: None,
        finished_at: None,
        expires_at: now + state.engine.settings.ttl.as_millis() as u64,
        pod: None,
        attempts: 0,
        checkpoint_switch: false,
        cold_start: false,
        cold_start_phases: None,
        cancel_requested: false,
        priority: req.priority,
        progress: None,
        outputs: vec![],
        error: None,
        history: vec![],
    };
    let (job, status) = match state.engine.submit(job).await.map_err(ApiError::store)? {
        Admission::Accepted(job) => (job, StatusCode::CREATED),
        // A retry: the job it made. Jobs stored before bodies were hashed have no hash
        // and count as the same request.
        Admission::Existing(job) if job.request_hash.as_ref().is_none_or(|h| *h == body_hash) => {
            (job, StatusCode::OK)
        }
        Admission::Existing(_) => {
            return Err(unprocessable(
                "idempotency_key_reused",
                "this Idempotency-Key was used with another request body: use a new key for a new request",
            ));
        }
        Admission::QueueFull { retry_after } => {
            return Err(ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    "the fleet's queue is full",
                )
            });
        }
    };
    tracing::info!(job = %job.id, fleet = %job.fleet, "job queued");
    let wait = query
        .wait
        .or_else(|| prefer_wait(&headers))
        .map(Duration::from_secs)
        .map(|w| w.min(state.max_wait))
        .map(|w| match state.max_cold_start_wait {
            Some(cold) if state.engine.ready_pods(&job.fleet) == 0 => w.min(cold),
            _ => w,
        });
    let job = match wait {
        Some(wait) if !job.state.is_final() => {
            wait_for_end(&state, &job.id, wait).await?.unwrap_or(job)
        }
        _ => job,
    };
    let synced = wait.is_some();
    let status = match (synced, job.state.is_final()) {
        (true, true) => StatusCode::OK,
        (true, false) => StatusCode::ACCEPTED,
        (false, _) => status,
    };
    let mut resp = (status, Json(view(&state, &job).await)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v2/jobs/{}", job.id)) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    Ok(resp)
}

/// `Prefer: wait=N` (RFC 7240).
pub(super) fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("wait=")?.parse().ok())
}

/// The job once it ends, or as it is after `wait`.
pub(super) async fn wait_for_end(
    state: &ApiState,
    id: &str,
    wait: Duration,
) -> Result<Option<Job>, ApiError> {
    let Some((job, rx)) = state.engine.subscribe(id).await.map_err(ApiError::store)? else {
        return Ok(None);
    };
    let Some(mut rx) = rx else {
        return Ok(Some(job));
    };
    let ended = tokio::time::timeout(wait, async {
        loop {
            match rx.recv().await {
                Ok(event) if event.last => return true,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return true,
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = ended;
    state.engine.get(id).await.map_err(ApiError::store)
}
