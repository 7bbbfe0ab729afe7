//! A job read, listed, canceled, followed (SSE), and the fleet's models.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::super::auth::Caller;
use super::super::engine::CancelOutcome;
use super::super::job::{Job, JobState};
use super::super::store::{Cursor, ListQuery};
use super::answer::{ApiError, bad, may_see, not_found, view, visible_job};
use super::state::ApiState;

pub(super) async fn read(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = visible_job(&state, &caller, &id).await?;
    Ok(Json(view(&state, &job).await))
}

#[derive(Deserialize)]
pub(super) struct ListParams {
    /// Comma-separated states.
    state: Option<String>,
    limit: Option<usize>,
    /// The previous page's `next`.
    cursor: Option<String>,
}

pub(super) async fn list(
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

pub(super) async fn cancel(
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

pub(super) async fn events(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (job, rx) = state
        .engine
        .subscribe(&id)
        .await
        .map_err(ApiError::store)?
        .filter(|(job, _)| may_see(&caller, job))
        .ok_or_else(|| not_found(&id))?;
    // A client back after a drop (this replica or another) gets every change it missed,
    // from the job's history, instead of a snapshot that would skip the ones between.
    let resumed_after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let first: Vec<Event> = match resumed_after {
        Some(after) => missed_changes(&state, &job, after).await,
        None => vec![snapshot(&state, &job).await],
    };
    let live = futures::stream::unfold(rx, |rx| async move {
        let mut rx = rx?;
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let mut event = Event::default().event(e.kind).data(e.data.to_string());
                    if let Some(seq) = e.seq {
                        event = event.id(seq.to_string());
                    }
                    return Some((event, if e.last { None } else { Some(rx) }));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    let stream = futures::stream::iter(first).chain(live).map(Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}

/// The job as it is now, numbered as its latest change.
async fn snapshot(state: &ApiState, job: &Job) -> Event {
    Event::default()
        .event("snapshot")
        .id(job.seq().to_string())
        .data(view(state, job).await.to_string())
}

/// The changes of state after `after`, as the events the stream sent for them: `state`
/// for each, and `done` with the whole job for the final one.
async fn missed_changes(state: &ApiState, job: &Job, after: u32) -> Vec<Event> {
    if job.history.first().is_some_and(|c| c.seq > after + 1) {
        // Older than the history kept: the job as it is now.
        return vec![snapshot(state, job).await];
    }
    let mut events = Vec::new();
    for change in job.history.iter().filter(|c| c.seq > after) {
        let event = if change.state.is_final() {
            Event::default()
                .event("done")
                .data(view(state, job).await.to_string())
        } else {
            let mut data = json!({"job": job.id, "state": change.state, "at": change.at});
            if let Some(pod) = &change.pod {
                data["pod"] = json!(pod);
            }
            if change.cancel_requested {
                data["cancel_requested"] = json!(true);
            }
            if let Some(reason) = &change.reason {
                data["requeued"] = json!(reason);
            }
            Event::default().event("state").data(data.to_string())
        };
        events.push(event.id(change.seq.to_string()));
    }
    events
}

pub(super) async fn models(State(state): State<Arc<ApiState>>) -> Json<Value> {
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
