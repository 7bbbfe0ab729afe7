//! `/openapi.json`: the API as its clients see it.

use axum::response::Json;
use serde_json::{Value, json};

use super::super::job::JobState;

pub(super) async fn openapi() -> Json<Value> {
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
            "/api/v2/jobs/{id}/events": {"get": {"summary": "This job's events (SSE): a snapshot, then progress, state, output and done. Each state change's `id` is its number in the job's history: reconnect with `Last-Event-ID` to get every change missed, on any replica",
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
                    "webhook": {"type": "string", "description": "http(s) URL, delivered only to public addresses unless the FleetClass allows a range; no userinfo, no redirects followed"},
                    "priority": {"type": "integer", "minimum": -1000, "maximum": 1000, "default": 0, "description": "A hint within the caller's own fair share: higher first; never ahead of another share's turn"}
                }},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"}, "url": {"type": "string"}, "fleet": {"type": "string"},
                    "state": {"type": "string", "enum": JobState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>()},
                    "cancel_requested": {"type": "boolean"},
                    "priority": {"type": "integer"},
                    "queue_position": {"type": "integer", "description": "While queued: jobs ahead of it in the fleet's fair-share order"},
                    "waiting": {"type": "object", "properties": {"reason": {"type": "string"}, "message": {"type": "string"}}},
                    "progress": {"type": ["object", "null"], "properties": {"node": {"type": "string"}, "value": {"type": "integer"}, "max": {"type": "integer"}}},
                    "timings": {"type": "object"},
                    "expires_at": {"type": "string", "format": "date-time"},
                    "outputs": {"type": "array", "items": {"type": "object", "properties": {
                        "node": {"type": "string"}, "filename": {"type": "string"}, "subfolder": {"type": "string"},
                        "type": {"type": "string"}, "key": {"type": "string"}, "size": {"type": "integer"}, "url": {"type": "string"}}}},
                    "error": {"type": ["object", "null"], "properties": {"type": {"type": "string"}, "message": {"type": "string"}, "node": {"type": "string"}}},
                    "attempts": {"type": "integer", "description": "Hand-offs to a pod: more than one after a pod (or the gateway replica that dispatched it) was lost"},
                    "history": {"type": "array", "description": "Every change of state, numbered from 1 (the SSE event ids)", "items": {"type": "object", "properties": {
                        "seq": {"type": "integer"}, "state": {"type": "string"}, "at": {"type": "integer", "description": "Unix milliseconds"},
                        "pod": {"type": "string"}, "cancel_requested": {"type": "boolean"}, "reason": {"type": "string", "description": "Why it went back to the queue"}}}}
                }},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}
            }
        }
    })
}
