//! The HTTP API (the shapes of Comfy's job API v2): submit, read, events (SSE), cancel,
//! list, models; `/openapi.json` describes it. API keys guard everything but health and
//! the OpenAPI document, and a key sees only its own jobs (an admin key, every job):
//! another key's job answers 404 as if it did not exist.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::auth::{ApiKeys, Caller};
use super::discovery::Catalogs;
use super::engine::{Admission, CancelOutcome, Engine};
use super::job::{InputFile, Job, JobState, now_millis};
use super::outputs::parse_s3_url;
use super::store::{Cursor, ListQuery};
use super::workflow;

/// A fleet this gateway fronts.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub name: String,
    /// The Service whose EndpointSlices list the fleet's pods.
    pub service: String,
    pub model_set: Option<String>,
}

pub struct ApiState {
    pub engine: Arc<Engine>,
    pub keys: Arc<ApiKeys>,
    pub fleets: Vec<FleetConfig>,
    pub catalogs: Arc<Catalogs>,
    /// Stored workflows: `<name>.json` (API format).
    pub workflows_dir: Option<PathBuf>,
    /// The longest a sync request waits before it answers with the job's URL.
    pub max_wait: Duration,
    /// With autoscaling: the longest a sync request waits on a fleet with no ready pod.
    pub max_cold_start_wait: Option<Duration>,
}

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

struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    extra: Value,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            extra: Value::Null,
            retry_after: None,
        }
    }
    fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
    /// The job store failed (a full or broken volume): nothing was promised, try again.
    fn store(e: super::store::StoreError) -> ApiError {
        tracing::error!(error = %e, "job store error");
        ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            )
        }
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

/// The view with a fresh presigned URL per stored output.
async fn view(state: &ApiState, job: &Job) -> Value {
    let mut v = Job::public_view(job);
    if job.state == JobState::Queued && job.pod.is_none() {
        // Why it waits, when it is not just the queue.
        let signal = state.engine.signals.get(&job.fleet);
        if let Some(message) = signal.no_capacity {
            v["waiting"] = json!({"reason": "NoCapacity", "message": message});
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

#[derive(Deserialize)]
struct InputSource {
    base64: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct SubmitRequest {
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
}

#[derive(Deserialize)]
struct WaitQuery {
    /// Sync mode: wait up to this many seconds for the job to end.
    wait: Option<u64>,
}

fn bad(kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, kind, message)
}

fn unprocessable(kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, kind, message)
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no job {id}"))
}

/// Whether the caller may see and control the job: its own, or any for an admin key.
fn may_see(caller: &Caller, job: &Job) -> bool {
    caller.admin || job.key_id.as_deref() == Some(caller.key_id.as_str())
}

/// The job, if it exists and the caller may see it: another key's job is answered
/// exactly as an unknown id, so ids do not leak across keys.
async fn visible_job(state: &ApiState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    match state.engine.get(id).await.map_err(ApiError::store)? {
        Some(job) if may_see(caller, &job) => Ok(job),
        _ => Err(not_found(id)),
    }
}

/// SHA-256 hex of the body with object keys sorted and no whitespace: the same request
/// sent again (keys in another order, other spacing) hashes the same.
fn request_hash(body: &Value) -> String {
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

fn stored_workflow(state: &ApiState, name: &str) -> Result<Value, ApiError> {
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
fn choose_fleet(
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

async fn submit(
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
        progress: None,
        outputs: vec![],
        error: None,
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
fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("wait=")?.parse().ok())
}

/// The job once it ends, or as it is after `wait`.
async fn wait_for_end(state: &ApiState, id: &str, wait: Duration) -> Result<Option<Job>, ApiError> {
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

async fn read(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = visible_job(&state, &caller, &id).await?;
    Ok(Json(view(&state, &job).await))
}

#[derive(Deserialize)]
struct ListParams {
    /// Comma-separated states.
    state: Option<String>,
    limit: Option<usize>,
    /// The previous page's `next`.
    cursor: Option<String>,
}

async fn list(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let mut states = Vec::new();
    for s in q
        .state
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        states.push(
            JobState::parse(s)
                .ok_or_else(|| bad("invalid_request", format!("unknown state {s:?}")))?,
        );
    }
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(text) => Some(
            Cursor::decode(text)
                .ok_or_else(|| bad("invalid_request", "cursor: not a `next` of this API"))?,
        ),
        None => None,
    };
    let page = state
        .engine
        .store
        .list(ListQuery {
            key_id: (!caller.admin).then(|| caller.key_id.clone()),
            states: states.clone(),
            limit: q.limit.unwrap_or(100).clamp(1, 1000),
            cursor,
        })
        .await
        .map_err(ApiError::store)?;
    let mut jobs = Vec::with_capacity(page.jobs.len());
    for job in page.jobs {
        // The store can be a moment behind a live job.
        let live = state.engine.live(&job.id).unwrap_or(job);
        if states.is_empty() || states.contains(&live.state) {
            jobs.push(Job::public_view(&live));
        }
    }
    Ok(Json(
        json!({"jobs": jobs, "next": page.next.map(|c| c.encode())}),
    ))
}

async fn cancel(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    visible_job(&state, &caller, &id).await?;
    match state.engine.cancel(&id).await.map_err(ApiError::store)? {
        CancelOutcome::NotFound => Err(not_found(&id)),
        CancelOutcome::Done(job) if job.state.is_final() && job.state != JobState::Canceled => {
            Err(ApiError {
                extra: json!({"job": Job::public_view(&job)}),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    "already_finished",
                    format!("job {id} already ended {}", job.state.as_str()),
                )
            })
        }
        CancelOutcome::Done(job) => {
            let status = if job.state.is_final() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok((status, Json(Job::public_view(&job))).into_response())
        }
    }
}

async fn events(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (job, rx) = state
        .engine
        .subscribe(&id)
        .await
        .map_err(ApiError::store)?
        .filter(|(job, _)| may_see(&caller, job))
        .ok_or_else(|| not_found(&id))?;
    let snapshot = Event::default()
        .event("snapshot")
        .data(view(&state, &job).await.to_string());
    let live = futures::stream::unfold(rx, |rx| async move {
        let mut rx = rx?;
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let event = Event::default().event(e.kind).data(e.data.to_string());
                    return Some((event, if e.last { None } else { Some(rx) }));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    let stream = futures::stream::once(async move { snapshot })
        .chain(live)
        .map(Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}

async fn models(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let fleets: Vec<Value> = state
        .fleets
        .iter()
        .map(|f| {
            let (queued, in_flight) = state.engine.load(&f.name);
            let mut v = json!({"fleet": f.name, "model_set": f.model_set, "queued": queued, "in_flight": in_flight});
            if let Some(c) = state.catalogs.get(&f.name) {
                v["ready"] = json!(c.ready);
                v["revision"] = json!(c.revision);
                v["models"] = json!(c.keys.iter().collect::<Vec<_>>());
            }
            v
        })
        .collect();
    Json(json!({"fleets": fleets}))
}

async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

/// The OpenAPI 3.1 document of this API.
pub fn openapi_document() -> Value {
    let job_id =
        json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let job =
        json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}});
    let error = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "sdfleet gateway", "version": env!("CARGO_PKG_VERSION"),
                 "description": "A job API in front of ComfyUI fleets: the shapes of Comfy's job API v2."},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/api/v2/jobs": {
                "post": {
                    "summary": "Submit a job",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},
                        {"name": "wait", "in": "query", "description": "Sync mode: wait up to this many seconds (also `Prefer: wait=N`)", "schema": {"type": "integer"}}
                    ],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SubmitRequest"}}}},
                    "responses": {"201": job, "200": job, "202": job, "400": error, "401": error,
                        "422": {"description": "missing_model, forbidden_reference (a string input naming another directory ` [output]`/` [temp]`, a `..` segment or an absolute path; `node` and `input` say where), invalid_input_name, idempotency_key_reused (the key was used with another body)", "content": error["content"].clone()},
                        "429": error}
                },
                "get": {
                    "summary": "List the caller's jobs (an admin key: every job), newest first",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string"}, "description": "Comma-separated states"},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "The previous page's `next`"}
                    ],
                    "responses": {"200": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                        "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                        "next": {"type": ["string", "null"], "description": "Set while more may follow (a page can be short and still have one): pass it as `cursor`"}}}}}},
                        "400": error}
                }
            },
            "/api/v2/jobs/{id}": {"get": {"summary": "Read a job", "parameters": job_id, "responses": {"200": job, "404": error}}},
            "/api/v2/jobs/{id}/events": {"get": {"summary": "This job's events (SSE): a snapshot, then progress, state, output and done",
                "parameters": job_id, "responses": {"200": {"content": {"text/event-stream": {}}}, "404": error}}},
            "/api/v2/jobs/{id}/cancel": {"post": {"summary": "Cancel a job", "parameters": job_id, "responses": {"200": job, "202": job, "404": error, "409": error}}},
            "/api/v2/models": {"get": {"summary": "The fleets' ModelSet catalogs with readiness", "responses": {"200": {"content": {"application/json": {}}}}}}
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            },
            "schemas": {
                "SubmitRequest": {"type": "object", "properties": {
                    "prompt": {"type": "object", "description": "ComfyUI API-format workflow"},
                    "workflow": {"type": "string", "description": "A stored workflow's name"},
                    "overrides": {"type": "object", "description": "{node id: {input: value}}"},
                    "inputs": {"type": "object", "additionalProperties": {"type": "object", "properties": {"base64": {"type": "string"}, "url": {"type": "string", "description": "s3://bucket/key"}}}},
                    "fleet": {"type": "string", "description": "Unset: route by model"},
                    "webhook": {"type": "string", "description": "http(s) URL, delivered only to public addresses unless the FleetClass allows a range; no userinfo, no redirects followed"}
                }},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"}, "url": {"type": "string"}, "fleet": {"type": "string"},
                    "state": {"type": "string", "enum": JobState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>()},
                    "cancel_requested": {"type": "boolean"},
                    "progress": {"type": ["object", "null"], "properties": {"node": {"type": "string"}, "value": {"type": "integer"}, "max": {"type": "integer"}}},
                    "timings": {"type": "object"},
                    "expires_at": {"type": "string", "format": "date-time"},
                    "outputs": {"type": "array", "items": {"type": "object", "properties": {
                        "node": {"type": "string"}, "filename": {"type": "string"}, "subfolder": {"type": "string"},
                        "type": {"type": "string"}, "key": {"type": "string"}, "size": {"type": "integer"}, "url": {"type": "string"}}}},
                    "error": {"type": ["object", "null"], "properties": {"type": {"type": "string"}, "message": {"type": "string"}, "node": {"type": "string"}}}
                }},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
