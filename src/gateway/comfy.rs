//! The gateway's side of ComfyUI's own server protocol, for one pod: `/prompt` with a
//! chosen `prompt_id`, `/queue`, `/history/{id}`, `/interrupt`, `/upload/image`, `/view`,
//! `/system_stats`, and the `/ws` event stream of this gateway process's client id.
//!
//! Every call has a deadline and the websocket is pinged: a node that dies without a TCP
//! reset black-holes traffic, and nothing else would ever notice.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::job::{JobError, Output};

/// Deadline of a control call (`/prompt`, `/queue`, `/history`, `/interrupt`, ...).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a file transfer (`/upload/image`, `/view`): files can be large.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
/// `/object_info` of a ComfyUI with many custom nodes runs to megabytes; a pod worker
/// waits on it before it serves its pod, so it is bounded well below a transfer.
const OBJECT_INFO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The pod is unreachable, timed out or answered with a server error: maybe the pod.
    #[error("pod {pod}: {message}")]
    Transport { pod: String, message: String },
    /// ComfyUI refused the prompt (400 with `node_errors`): the workflow is wrong, not
    /// the pod.
    #[error("ComfyUI refused the prompt: {message}")]
    Rejected {
        message: String,
        error: Value,
        node_errors: Value,
    },
    /// Any other 4xx: the request was wrong (an input ComfyUI will not take), not the pod.
    #[error("ComfyUI refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
}

impl PodError {
    /// The pod may be down (as opposed to the request being wrong).
    pub fn is_transport(&self) -> bool {
        matches!(self, PodError::Transport { .. })
    }
}

/// A pod's ComfyUI server.
#[derive(Clone)]
pub struct PodClient {
    pub name: String,
    /// `http://ip:port`
    pub base: String,
    /// This gateway process's client id; each websocket connection adds its number
    /// (`<id>-<n>`): ComfyUI keeps one socket per client id, and a reconnect under the same
    /// id is made deaf when the old socket's cleanup runs after it (server.py's
    /// `websocket_handler` pops the id in its `finally`). Prompts sent before a reconnect
    /// end through the periodic resync instead of events.
    pub client_id: String,
    connection: std::sync::Arc<std::sync::atomic::AtomicU64>,
    http: reqwest::Client,
    /// How long the websocket may stay silent (pings unanswered) before it counts as dead.
    pub silence_limit: Duration,
    /// ComfyUI interrupts by `prompt_id` (from 0.3.57, September 2025); older servers
    /// interrupt whatever runs. Read from `/system_stats` on connect.
    pub targeted_interrupt: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What `/queue` says: prompt ids running and waiting, with the client that sent each.
#[derive(Debug, Default, PartialEq)]
pub struct QueueView {
    pub running: Vec<(String, Option<String>)>,
    pub pending: Vec<(String, Option<String>)>,
}

impl QueueView {
    pub fn contains(&self, id: &str) -> bool {
        self.running
            .iter()
            .chain(&self.pending)
            .any(|(p, _)| p == id)
    }
    pub fn is_running(&self, id: &str) -> bool {
        self.running.iter().any(|(p, _)| p == id)
    }
}

/// A finished prompt as `/history/{id}` keeps it.
#[derive(Debug, PartialEq)]
pub struct HistoryEntry {
    pub succeeded: bool,
    pub error: Option<String>,
    pub outputs: Vec<Output>,
}

/// One event of ComfyUI's websocket that concerns a prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PodEvent {
    Started {
        prompt_id: String,
    },
    Executing {
        prompt_id: String,
        node: String,
    },
    Progress {
        prompt_id: String,
        node: Option<String>,
        value: u64,
        max: u64,
    },
    Executed {
        prompt_id: String,
        outputs: Vec<Output>,
    },
    Succeeded {
        prompt_id: String,
    },
    Failed {
        prompt_id: String,
        node: Option<String>,
        message: String,
    },
    Interrupted {
        prompt_id: String,
    },
}

impl PodEvent {
    pub fn prompt_id(&self) -> &str {
        match self {
            PodEvent::Started { prompt_id }
            | PodEvent::Executing { prompt_id, .. }
            | PodEvent::Progress { prompt_id, .. }
            | PodEvent::Executed { prompt_id, .. }
            | PodEvent::Succeeded { prompt_id }
            | PodEvent::Failed { prompt_id, .. }
            | PodEvent::Interrupted { prompt_id } => prompt_id,
        }
    }

    /// Parses a websocket text frame; `None` for what is not about a prompt (`status`,
    /// `execution_cached`, previews, other nodes' custom events).
    pub fn parse(text: &str) -> Option<PodEvent> {
        let msg: Value = serde_json::from_str(text).ok()?;
        let data = msg.get("data")?;
        let prompt_id = data.get("prompt_id")?.as_str()?.to_string();
        let node = data
            .get("node")
            .or_else(|| data.get("node_id"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Some(match msg.get("type")?.as_str()? {
            "execution_start" => PodEvent::Started { prompt_id },
            // `executing` with a null node marked the end in older ComfyUI;
            // `execution_success` says it now.
            "executing" => PodEvent::Executing {
                prompt_id,
                node: node?,
            },
            "progress" => PodEvent::Progress {
                prompt_id,
                node,
                value: data.get("value")?.as_u64()?,
                max: data.get("max")?.as_u64()?,
            },
            "executed" => PodEvent::Executed {
                outputs: outputs_of(node.as_deref().unwrap_or(""), data.get("output")?),
                prompt_id,
            },
            "execution_success" => PodEvent::Succeeded { prompt_id },
            "execution_error" => PodEvent::Failed {
                message: format!(
                    "{}: {}",
                    data.get("exception_type")
                        .and_then(Value::as_str)
                        .unwrap_or("error"),
                    data.get("exception_message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                ),
                node,
                prompt_id,
            },
            "execution_interrupted" => PodEvent::Interrupted { prompt_id },
            _ => return None,
        })
    }
}

/// Files in one node's UI output (`{images: [{filename, subfolder, type}], gifs: ...}`).
pub fn outputs_of(node: &str, output: &Value) -> Vec<Output> {
    let mut out = Vec::new();
    for list in output.as_object().into_iter().flat_map(|o| o.values()) {
        for item in list.as_array().into_iter().flatten() {
            let Some(filename) = item.get("filename").and_then(Value::as_str) else {
                continue;
            };
            let text = |k: &str| {
                item.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            out.push(Output {
                node: node.to_string(),
                filename: filename.to_string(),
                subfolder: text("subfolder"),
                folder_type: text("type"),
                key: None,
                size: None,
            });
        }
    }
    out
}

fn queue_entries(list: Option<&Value>) -> Vec<(String, Option<String>)> {
    // Each entry is `[number, prompt_id, prompt, extra_data, outputs_to_execute, ...]`.
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let id = e.get(1)?.as_str()?.to_string();
            let client = e
                .get(3)
                .and_then(|x| x.get("client_id"))
                .and_then(Value::as_str)
                .map(str::to_string);
            Some((id, client))
        })
        .collect()
}

impl PodClient {
    pub fn new(name: &str, base: &str, client_id: &str, http: reqwest::Client) -> PodClient {
        PodClient {
            name: name.into(),
            base: base.trim_end_matches('/').into(),
            client_id: client_id.into(),
            connection: Default::default(),
            http,
            silence_limit: Duration::from_secs(30),
            targeted_interrupt: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// The client id of the current websocket connection.
    pub fn connection_client_id(&self) -> String {
        let n = self.connection.load(std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n}", self.client_id)
    }

    /// Whether a prompt's `client_id` is one of this process's connections.
    pub fn is_ours(&self, client_id: &str) -> bool {
        client_id
            .strip_prefix(&self.client_id)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    fn transport(&self, e: impl std::fmt::Display) -> PodError {
        PodError::Transport {
            pod: self.name.clone(),
            message: e.to_string(),
        }
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value, PodError> {
        self.json_within(req, CALL_TIMEOUT).await
    }

    async fn json_within(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Value, PodError> {
        let resp = req
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.transport(e.without_url()))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| self.transport(e.without_url()))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        if status.is_server_error() {
            return Err(self.transport(format!("HTTP {status}")));
        }
        // `/prompt` answers 400 with `{error: {type, message, ...}, node_errors}`
        // (server.py's post_prompt); other refusals are plain text.
        if body.get("error").is_some_and(Value::is_object) {
            return Err(PodError::Rejected {
                message: body
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("bad request")
                    .to_string(),
                error: body.get("error").cloned().unwrap_or(Value::Null),
                node_errors: body.get("node_errors").cloned().unwrap_or(Value::Null),
            });
        }
        let mut message: String = text.chars().take(300).collect();
        if message.trim().is_empty() {
            message = status.to_string();
        }
        Err(PodError::Refused {
            status: status.as_u16(),
            message,
        })
    }

    /// `/system_stats`: whether the pod answers at all, and its ComfyUI version.
    pub async fn system_stats(&self) -> Result<Value, PodError> {
        self.json(self.http.get(format!("{}/system_stats", self.base)))
            .await
    }

    /// Reads the pod's ComfyUI version (to choose how to interrupt); `None` when it does
    /// not answer.
    pub async fn learn_version(&self) -> Option<String> {
        let stats = self.system_stats().await.ok()?;
        let version = stats
            .pointer("/system/comfyui_version")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        self.targeted_interrupt.store(
            interrupts_by_prompt_id(&version),
            std::sync::atomic::Ordering::Relaxed,
        );
        Some(version)
    }

    /// The node types the pod's ComfyUI has (`/object_info`'s keys: built-in and custom
    /// nodes).
    pub async fn node_types(&self) -> Result<std::collections::BTreeSet<String>, PodError> {
        let info = self
            .json_within(
                self.http.get(format!("{}/object_info", self.base)),
                OBJECT_INFO_TIMEOUT,
            )
            .await?;
        Ok(info
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// Queues the prompt under `prompt_id` for this gateway's client id.
    pub async fn submit(&self, prompt_id: &str, prompt: &Value) -> Result<(), PodError> {
        let body = json!({"prompt": prompt, "client_id": self.connection_client_id(), "prompt_id": prompt_id});
        self.json(self.http.post(format!("{}/prompt", self.base)).json(&body))
            .await
            .map(|_| ())
    }

    /// Interrupts `prompt_id` only if it is the one running. Newer ComfyUI checks the
    /// `prompt_id` itself; an older one interrupts whatever runs, so the gateway asks
    /// `/queue` first (a prompt that ends between the two calls leaves a small window).
    pub async fn interrupt(&self, prompt_id: &str) -> Result<(), PodError> {
        if !self
            .targeted_interrupt
            .load(std::sync::atomic::Ordering::Relaxed)
            && !self.queue().await?.is_running(prompt_id)
        {
            return Ok(());
        }
        let req = self.http.post(format!("{}/interrupt", self.base));
        self.json(req.json(&json!({"prompt_id": prompt_id})))
            .await
            .map(|_| ())
    }

    /// Removes queued (not running) prompts from the pod's queue.
    pub async fn delete_queued(&self, ids: &[&str]) -> Result<(), PodError> {
        let req = self.http.post(format!("{}/queue", self.base));
        self.json(req.json(&json!({"delete": ids})))
            .await
            .map(|_| ())
    }

    pub async fn queue(&self) -> Result<QueueView, PodError> {
        let body = self
            .json(self.http.get(format!("{}/queue", self.base)))
            .await?;
        Ok(QueueView {
            running: queue_entries(body.get("queue_running")),
            pending: queue_entries(body.get("queue_pending")),
        })
    }

    /// The finished prompt, or `None` while it is unknown or not finished.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, PodError> {
        let url = format!("{}/history/{prompt_id}", self.base);
        let body = self.json(self.http.get(url)).await?;
        let Some(entry) = body.get(prompt_id) else {
            return Ok(None);
        };
        let status = entry.get("status");
        let completed = status
            .and_then(|s| s.get("completed"))
            .and_then(Value::as_bool);
        let status_str = status
            .and_then(|s| s.get("status_str"))
            .and_then(Value::as_str);
        let error = status
            .and_then(|s| s.get("messages"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|m| m.get(0).and_then(Value::as_str) == Some("execution_error"))
            .and_then(|m| m.get(1))
            .map(|d| {
                d.get("exception_message")
                    .and_then(Value::as_str)
                    .unwrap_or("execution error")
                    .to_string()
            });
        let outputs = entry
            .get("outputs")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .flat_map(|(node, out)| outputs_of(node, out))
            .collect();
        Ok(Some(HistoryEntry {
            succeeded: completed == Some(true) || status_str == Some("success"),
            error: error
                .or_else(|| (status_str == Some("error")).then(|| "execution error".into())),
            outputs,
        }))
    }

    /// Uploads an input image; returns the name ComfyUI stored it under (it renames on a
    /// collision, e.g. `photo (1).png`).
    pub async fn upload_image(&self, name: &str, bytes: Bytes) -> Result<String, PodError> {
        let part = reqwest::multipart::Part::stream(bytes).file_name(name.to_string());
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("type", "input");
        let url = format!("{}/upload/image", self.base);
        let body = self
            .json_within(self.http.post(url).multipart(form), TRANSFER_TIMEOUT)
            .await?;
        let stored = body.get("name").and_then(Value::as_str).unwrap_or(name);
        Ok(match body.get("subfolder").and_then(Value::as_str) {
            Some(sub) if !sub.is_empty() => format!("{sub}/{stored}"),
            _ => stored.to_string(),
        })
    }

    /// An output file as a streaming response (its body is read by the caller, within
    /// the transfer deadline).
    pub async fn view(&self, output: &Output) -> Result<reqwest::Response, PodError> {
        let url = format!("{}/view", self.base);
        let query = [
            ("filename", output.filename.as_str()),
            ("subfolder", output.subfolder.as_str()),
            (
                "type",
                if output.folder_type.is_empty() {
                    "output"
                } else {
                    &output.folder_type
                },
            ),
        ];
        let resp = self
            .http
            .get(url)
            .query(&query)
            .timeout(TRANSFER_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport(e.without_url()))?;
        if !resp.status().is_success() {
            return Err(self.transport(format!(
                "/view {}: HTTP {}",
                output.filename,
                resp.status()
            )));
        }
        Ok(resp)
    }

    /// Opens the event stream under a new connection's client id (prompts submitted from
    /// now on use it). Yields events about prompts until the socket closes or goes silent.
    pub async fn events(
        &self,
    ) -> Result<impl futures::Stream<Item = PodEvent> + Send + Unpin + use<>, PodError> {
        self.connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = format!(
            "{}/ws?clientId={}",
            self.base.replacen("http", "ws", 1),
            self.connection_client_id()
        );
        let (socket, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| self.transport("websocket connect timed out"))?
            .map_err(|e| self.transport(e))?;
        let (mut sink, stream) = socket.split();
        // Pings keep a silent pod honest: aiohttp answers them, a dead node does not.
        let every = self.silence_limit / 3;
        let pinger = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
        });
        let state = (
            stream,
            AbortOnDrop(pinger),
            self.silence_limit,
            self.name.clone(),
        );
        // The stream ends at the socket's first error or close, or after the silence
        // limit with no frame at all (not even a pong), instead of hanging on it.
        Ok(Box::pin(futures::stream::unfold(
            state,
            |(mut stream, pinger, limit, pod)| async move {
                loop {
                    match tokio::time::timeout(limit, stream.next()).await {
                        Err(_) => {
                            tracing::warn!(%pod, ?limit, "websocket silent: the pod counts as unreachable");
                            return None;
                        }
                        Ok(None | Some(Err(_))) => return None,
                        Ok(Some(Ok(Message::Text(text)))) => {
                            if let Some(event) = PodEvent::parse(&text) {
                                return Some((event, (stream, pinger, limit, pod)));
                            }
                        }
                        Ok(Some(Ok(_))) => {}
                    }
                }
            },
        )))
    }
}

/// A `/prompt` refusal as a typed job error: the first node error with its node, input
/// and ComfyUI's details; a model input whose value is not in the pod's list is
/// `missing_model`. Without node errors (an unknown node type, no output node), the
/// top-level error.
pub fn rejection_error(message: &str, error: &Value, node_errors: &Value) -> JobError {
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut nodes: Vec<(&String, &Value)> = node_errors
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    nodes.sort_by(|a, b| a.0.cmp(b.0));
    for (node, entry) in nodes {
        let Some(first) = entry
            .get("errors")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        else {
            continue;
        };
        let input = first
            .pointer("/extra_info/input_name")
            .and_then(Value::as_str)
            .map(str::to_string);
        let kind = text(first, "type");
        let is_model_input = input.as_deref().is_some_and(|i| {
            i.trim_end_matches(|c: char| c.is_ascii_digit())
                .ends_with("_name")
        });
        let job_kind = match kind.as_str() {
            "value_not_in_list" if is_model_input => "missing_model",
            "value_not_in_list" => "invalid_input",
            _ => "invalid_workflow",
        };
        let class = text(entry, "class_type");
        let details = Some(text(first, "details")).filter(|d| !d.is_empty());
        return JobError {
            kind: job_kind.into(),
            message: format!(
                "node {node} ({class}): {}{}",
                text(first, "message"),
                details
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            ),
            node: Some(node.clone()),
            input,
            details,
        };
    }
    let details = Some(text(error, "details")).filter(|d| !d.is_empty());
    JobError {
        kind: "invalid_workflow".into(),
        message: message.to_string(),
        node: None,
        input: None,
        details,
    }
}

/// Stops the websocket's pinger with the stream that owns it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether ComfyUI `version` (`0.3.57`, `v0.3.56`, ...) interrupts by `prompt_id`: from
/// 0.3.57 on. Unknown or unparsable versions count as new (the current release line).
pub fn interrupts_by_prompt_id(version: &str) -> bool {
    let parts: Vec<u64> = version
        .trim_start_matches('v')
        .split('.')
        .map_while(|p| p.parse().ok())
        .collect();
    match parts.as_slice() {
        [major, minor, patch, ..] => (*major, *minor, *patch) >= (0, 3, 57),
        [major, minor] => (*major, *minor) > (0, 3),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_events_that_concern_a_prompt() {
        let p = |s: &str| PodEvent::parse(s);
        assert_eq!(
            p(r#"{"type":"progress","data":{"value":3,"max":20,"prompt_id":"a","node":"3"}}"#),
            Some(PodEvent::Progress {
                prompt_id: "a".into(),
                node: Some("3".into()),
                value: 3,
                max: 20
            })
        );
        assert_eq!(
            p(r#"{"type":"executing","data":{"node":null,"prompt_id":"a"}}"#),
            None
        );
        assert_eq!(
            p(r#"{"type":"status","data":{"status":{"exec_info":{"queue_remaining":0}}}}"#),
            None
        );
        assert_eq!(
            p(
                r#"{"type":"execution_error","data":{"prompt_id":"a","node_id":"7","exception_type":"RuntimeError","exception_message":"OOM"}}"#
            ),
            Some(PodEvent::Failed {
                prompt_id: "a".into(),
                node: Some("7".into()),
                message: "RuntimeError: OOM".into()
            })
        );
        let executed = p(
            r#"{"type":"executed","data":{"node":"9","prompt_id":"a","output":{"images":[{"filename":"x_00001_.png","subfolder":"a","type":"output"}]}}}"#,
        );
        let Some(PodEvent::Executed { outputs, .. }) = executed else {
            panic!()
        };
        assert_eq!(outputs[0].filename, "x_00001_.png");
        assert_eq!(outputs[0].subfolder, "a");
        assert_eq!(outputs[0].node, "9");
    }

    #[test]
    fn node_errors_become_typed_errors() {
        let node_errors = json!({"4": {"errors": [{"type": "value_not_in_list",
            "message": "Value not in list",
            "details": "ckpt_name: 'nope.safetensors' not in ['a.safetensors']",
            "extra_info": {"input_name": "ckpt_name", "received_value": "nope.safetensors"}}],
            "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}});
        let e = rejection_error("Prompt outputs failed validation", &json!({}), &node_errors);
        assert_eq!(e.kind, "missing_model");
        assert_eq!(e.node.as_deref(), Some("4"));
        assert_eq!(e.input.as_deref(), Some("ckpt_name"));
        assert!(e.details.as_deref().unwrap().contains("nope.safetensors"));
        assert!(
            !e.message.contains('{'),
            "no raw JSON in the message: {}",
            e.message
        );

        let image = json!({"10": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
            "details": "image: 'x.png' not in []", "extra_info": {"input_name": "image"}}],
            "class_type": "LoadImage"}});
        assert_eq!(
            rejection_error("", &json!({}), &image).kind,
            "invalid_input"
        );

        let unknown = json!({"type": "invalid_prompt", "message": "Cannot execute because node Foo does not exist.", "details": "Node ID '#3'"});
        let e = rejection_error(
            "Cannot execute because node Foo does not exist.",
            &unknown,
            &json!({}),
        );
        assert_eq!(e.kind, "invalid_workflow");
        assert_eq!(e.details.as_deref(), Some("Node ID '#3'"));
    }

    #[test]
    fn a_connection_client_id_is_the_process_id_and_its_number() {
        let c = PodClient::new("p", "http://x", "gw-abc", reqwest::Client::new());
        assert_eq!(c.connection_client_id(), "gw-abc-0");
        assert!(c.is_ours("gw-abc-0") && c.is_ours("gw-abc-12"));
        assert!(!c.is_ours("gw-abc") && !c.is_ours("gw-abcd-1") && !c.is_ours("gw-abc-"));
        assert!(!c.is_ours("gw-abc-1x"));
    }

    #[test]
    fn interrupt_by_prompt_id_from_its_version() {
        assert!(interrupts_by_prompt_id("0.3.57"));
        assert!(interrupts_by_prompt_id("v0.4.0"));
        assert!(interrupts_by_prompt_id("1.0"));
        assert!(!interrupts_by_prompt_id("0.3.56"));
        assert!(!interrupts_by_prompt_id("0.2.7"));
        assert!(interrupts_by_prompt_id(""));
    }
}
