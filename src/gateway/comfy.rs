//! The gateway's side of ComfyUI's own server protocol, for one pod: `/prompt` with a
//! chosen `prompt_id`, `/queue`, `/history/{id}`, `/interrupt`, `/upload/image`, `/view`,
//! and the `/ws` event stream of one fixed client id.

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::job::Output;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The pod is unreachable or answered with a server error: try another.
    #[error("pod {pod}: {message}")]
    Transport { pod: String, message: String },
    /// ComfyUI refused the prompt (400): the workflow is wrong, not the pod.
    #[error("ComfyUI refused the prompt: {message}")]
    Rejected { message: String, node_errors: Value },
}

/// A pod's ComfyUI server.
#[derive(Clone)]
pub struct PodClient {
    pub name: String,
    /// `http://ip:port`
    pub base: String,
    pub client_id: String,
    http: reqwest::Client,
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
            http,
        }
    }

    fn transport(&self, e: impl std::fmt::Display) -> PodError {
        PodError::Transport {
            pod: self.name.clone(),
            message: e.to_string(),
        }
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value, PodError> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else if status == reqwest::StatusCode::BAD_REQUEST {
            Err(PodError::Rejected {
                message: body
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("bad request")
                    .to_string(),
                node_errors: body.get("node_errors").cloned().unwrap_or(Value::Null),
            })
        } else {
            Err(self.transport(format!("HTTP {status}")))
        }
    }

    /// Queues the prompt under `prompt_id` for this gateway's client id.
    pub async fn submit(&self, prompt_id: &str, prompt: &Value) -> Result<(), PodError> {
        let body = json!({"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id});
        self.json(self.http.post(format!("{}/prompt", self.base)).json(&body))
            .await
            .map(|_| ())
    }

    /// Interrupts `prompt_id` only if it is the one running (ComfyUI ignores others).
    pub async fn interrupt(&self, prompt_id: &str) -> Result<(), PodError> {
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
        let body = self.json(self.http.post(url).multipart(form)).await?;
        let stored = body.get("name").and_then(Value::as_str).unwrap_or(name);
        Ok(match body.get("subfolder").and_then(Value::as_str) {
            Some(sub) if !sub.is_empty() => format!("{sub}/{stored}"),
            _ => stored.to_string(),
        })
    }

    /// The bytes of an output file.
    pub async fn view(&self, output: &Output) -> Result<Bytes, PodError> {
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
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !resp.status().is_success() {
            return Err(self.transport(format!(
                "/view {}: HTTP {}",
                output.filename,
                resp.status()
            )));
        }
        resp.bytes().await.map_err(|e| self.transport(e))
    }

    /// Opens the event stream of this gateway's client id. Yields events about prompts
    /// until the socket closes.
    pub async fn events(
        &self,
    ) -> Result<impl futures::Stream<Item = PodEvent> + Send + Unpin + use<>, PodError> {
        let url = format!(
            "{}/ws?clientId={}",
            self.base.replacen("http", "ws", 1),
            self.client_id
        );
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| self.transport(e))?;
        // The stream ends at the socket's first error or close instead of hanging on it.
        Ok(Box::pin(
            socket
                .take_while(|msg| futures::future::ready(msg.is_ok()))
                .filter_map(|msg| async move {
                    match msg {
                        Ok(Message::Text(text)) => PodEvent::parse(&text),
                        _ => None,
                    }
                }),
        ))
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
}
