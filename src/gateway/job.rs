//! A job: one ComfyUI prompt run for a client, from submit to a final state. Its id is
//! the `prompt_id` it runs under on a pod, so a pod can be asked about it by name.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    Expired,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Canceled,
        JobState::Expired,
    ];

    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
            JobState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Where a job is in its run: the node ComfyUI is executing and its step counter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub value: u64,
    pub max: u64,
}

/// One file a job produced, as ComfyUI named it and where the gateway stored it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub node: String,
    pub filename: String,
    #[serde(default)]
    pub subfolder: String,
    /// ComfyUI's folder type: `output` or `temp`.
    #[serde(rename = "type", default)]
    pub folder_type: String,
    /// The object key in the outputs bucket, once uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// Why a job failed, typed so that clients can act on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// `missing_model`, `invalid_workflow`, `invalid_input`, `execution_error`,
    /// `interrupted`, `run_timeout`, `input_failed`, `output_failed`, `expired`,
    /// `pod_lost`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The node's input the error is about (from ComfyUI's `node_errors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// ComfyUI's own details (e.g. the value refused and the values allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

impl JobError {
    pub fn new(kind: &str, message: impl Into<String>) -> JobError {
        JobError {
            kind: kind.into(),
            message: message.into(),
            node: None,
            input: None,
            details: None,
        }
    }
}

/// An input file the job brings: uploaded to the chosen pod before the prompt, and
/// every workflow input equal to `name` is replaced by the name ComfyUI gave it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputFile {
    pub name: String,
    /// `base64:<data>` or `s3://bucket/key`.
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub fleet: String,
    pub state: JobState,
    /// The API-format prompt as it is sent to the pod (save prefixes rewritten).
    pub prompt: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputFile>,
    /// The checkpoint the workflow loads, for placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// `<key id>/<Idempotency-Key>`: scoped by API key, so two keys never share one.
    /// It lives as long as the job (the store's idempotency entry too): whoever deletes
    /// jobs for retention removes both in one commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// SHA-256 hex of the canonical submit body, to tell a retry from another request
    /// under the same idempotency key. Absent in jobs stored before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    pub created_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
    /// A job that has not started by then ends `expired`.
    pub expires_at: Millis,
    /// The pod the job was handed to (its name), while it is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Times it was handed to a pod (more than one after a pod was lost).
    #[serde(default)]
    pub attempts: u32,
    /// The pod had to load another checkpoint first.
    #[serde(default)]
    pub checkpoint_switch: bool,
    /// The pod had run nothing since it came up.
    #[serde(default)]
    pub cold_start: bool,
    /// The phases of the fleet's start from no ready pod that this job waited on
    /// (node, models, image, ready; seconds), from the operator's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_phases: Option<Value>,
    #[serde(default)]
    pub cancel_requested: bool,
    /// The client's hint within its own share: higher goes first (never ahead of
    /// another share's turn).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<Output>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// Every change of state a client can see, numbered from 1 (0 is the submit): an
    /// event stream resumes after the last one its client got (`Last-Event-ID`), on any
    /// replica, and a job that ran twice says why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<StateChange>,
}

/// One change of a job's state, as its history keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    pub seq: u32,
    pub state: JobState,
    pub at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// Why it went back to the queue (a lost pod, a gateway that took over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A job keeps at most this many changes (the oldest go): a few per attempt.
const HISTORY_CAP: usize = 64;

fn rfc3339(ms: Millis) -> Value {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| Value::String(t.to_string()))
        .unwrap_or(Value::Null)
}

impl Job {
    /// The number of its latest change (0: none since submit).
    pub fn seq(&self) -> u32 {
        self.history.last().map_or(0, |c| c.seq)
    }

    /// Records the state it is in now as its next change.
    pub fn record_change(&mut self, at: Millis, reason: Option<String>) {
        if self.history.len() >= HISTORY_CAP {
            self.history.remove(0);
        }
        let change = StateChange {
            seq: self.seq() + 1,
            state: self.state,
            at,
            pod: self.pod.clone(),
            cancel_requested: self.cancel_requested,
            reason,
        };
        self.history.push(change);
    }

    /// The job as clients see it (without presigned URLs: the API adds them).
    pub fn public_view(&self) -> Value {
        let secs = |a: Option<Millis>, b: Option<Millis>| match (a, b) {
            (Some(a), Some(b)) => json!(b.saturating_sub(a) as f64 / 1000.0),
            _ => Value::Null,
        };
        json!({
            "id": self.id,
            "url": format!("/api/v2/jobs/{}", self.id),
            "fleet": self.fleet,
            "state": self.state,
            "cancel_requested": self.cancel_requested,
            "priority": self.priority,
            "progress": self.progress,
            "timings": {
                "created_at": rfc3339(self.created_at),
                "dispatched_at": self.dispatched_at.map(rfc3339),
                "started_at": self.started_at.map(rfc3339),
                "finished_at": self.finished_at.map(rfc3339),
                "queue_seconds": secs(Some(self.created_at), self.started_at),
                "run_seconds": secs(self.started_at, self.finished_at),
                "cold_start": self.cold_start,
                "cold_start_phases": self.cold_start_phases,
                "checkpoint_switch": self.checkpoint_switch,
            },
            "expires_at": rfc3339(self.expires_at),
            "pod": self.pod,
            "attempts": self.attempts,
            "outputs": self.outputs,
            "error": self.error,
            "history": self.history,
        })
    }

    /// A job of fleet `sdxl` with nothing else set, for unit tests.
    #[cfg(test)]
    pub fn for_test(id: &str, state: JobState, created_at: Millis) -> Job {
        Job {
            id: id.into(),
            fleet: "sdxl".into(),
            state,
            prompt: serde_json::json!({}),
            inputs: vec![],
            checkpoint: None,
            webhook: None,
            idempotency_key: None,
            request_hash: None,
            key_id: None,
            created_at,
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            expires_at: now_millis() + 60_000,
            pod: None,
            attempts: 0,
            checkpoint_switch: false,
            cold_start: false,
            cold_start_phases: None,
            cancel_requested: false,
            priority: 0,
            progress: None,
            outputs: vec![],
            error: None,
            history: vec![],
        }
    }
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}
