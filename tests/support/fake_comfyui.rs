//! A ComfyUI server for tests, faithful to the protocol of ComfyUI's `server.py` and
//! `execution.py` (no GPU here, so it cannot be the real one):
//! - `POST /prompt` `{prompt, client_id, prompt_id?}` honours a client-chosen
//!   `prompt_id`; 400 with `error` and `node_errors` for an unknown `class_type`
//!   (`invalid_prompt`) or a model not in its list (`value_not_in_list`), or a
//!   `LoadImage` of a file it does not have;
//! - `GET /queue` (`queue_running`/`queue_pending` entries `[number, prompt_id, prompt,
//!   extra_data, outputs]`), `POST /queue {delete: [...]}`; `GET /history/{id}` (`{}`
//!   until the prompt ends); `POST /interrupt {prompt_id}` (only that prompt, if it
//!   runs); `POST /upload/image` (renames `x.png` to `x (1).png` on a collision);
//!   `GET /view`; `GET /system_stats`;
//! - `/ws?clientId=` sends `status` on connect and to everyone on queue changes, and to
//!   the prompt's client only: `execution_start`, `execution_cached`, `executing`,
//!   `progress`, `executed`, `execution_success` / `execution_error` /
//!   `execution_interrupted`, then `executing` with a null node.
//!
//! It runs one prompt at a time: nodes in id order, `steps` × `step_time` for a sampler,
//! `switch_penalty` when the checkpoint changes. Save nodes pick their file counter by
//! listing the output directory, as ComfyUI does, so pods sharing a directory race the
//! same way. Faults: `kill` (the listener and every connection drop, as a killed pod),
//! `drop_websockets`, a slow start, a failing node class, a hang.
//!
//! Where it differs: no graph (no links, no caching, no topological order), no model
//! loading (the penalty stands for it), output files are small text, not PNGs, no
//! binary preview frames, static `system_stats`, and uploads are not checked as images.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Multipart, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};

const KNOWN_CLASSES: &[&str] = &[
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "KSamplerAdvanced",
    "VAEDecode",
    "VAELoader",
    "LoraLoader",
    "UNETLoader",
    "SaveImage",
    "PreviewImage",
    "LoadImage",
];

#[derive(Clone)]
pub struct FakeConfig {
    pub step_time: Duration,
    pub switch_penalty: Duration,
    /// Model files it has, relative to `models/` (`checkpoints/x.safetensors`).
    pub models: Vec<String>,
    /// ComfyUI's `output/` (may be shared by several fakes, as an S3 prefix would be).
    pub output_dir: PathBuf,
}

#[derive(Default, Clone)]
pub struct Faults {
    /// Every node of this class fails with `execution_error`.
    pub fail_class: Option<String>,
    /// The next prompt never finishes (until interrupted).
    pub hang: bool,
    /// Seconds before a prompt's first event.
    pub slow_start: Duration,
    /// The next this many `POST /prompt` answer 503: a failed hand-off (not a
    /// validation error, which is a 400).
    pub refuse_prompts: usize,
}

struct Item {
    number: u64,
    prompt_id: String,
    prompt: Value,
    extra: Value,
}

impl Item {
    fn entry(&self) -> Value {
        json!([self.number, self.prompt_id, self.prompt, self.extra, []])
    }
    fn client(&self) -> Option<String> {
        self.extra
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

#[derive(Default)]
struct Inner {
    number: u64,
    running: Option<Item>,
    pending: VecDeque<Item>,
    history: HashMap<String, Value>,
    loaded: Option<String>,
    interrupt: bool,
    /// Prompt ids in the order they started: what ran here.
    started: Vec<String>,
    uploads: Vec<String>,
    /// Checkpoint loads (the first load counts: a fresh pod has nothing loaded).
    switches: usize,
}

struct Shared {
    name: String,
    config: FakeConfig,
    /// `config.models` at start; `set_models` replaces it (a double rescanning its models).
    models: Mutex<Vec<String>>,
    input_dir: PathBuf,
    inner: Mutex<Inner>,
    work: Notify,
    sockets: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<String>>>>,
    faults: Mutex<Faults>,
    kill: watch::Sender<bool>,
}

pub struct FakeComfy {
    pub name: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FakeComfy {
    pub async fn start(name: &str, config: FakeConfig) -> FakeComfy {
        Self::start_on(name, config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// On a given address: in a pod (the image of examples/fake_comfyui.rs), the pod IP's
    /// port, where the gateway and the kubelet's probes reach it.
    pub async fn start_on(name: &str, config: FakeConfig, listen: SocketAddr) -> FakeComfy {
        let input_dir =
            std::env::temp_dir().join(format!("fake-comfy-in-{name}-{}", super::unique_suffix()));
        std::fs::create_dir_all(&input_dir).unwrap();
        std::fs::create_dir_all(&config.output_dir).unwrap();
        let (kill, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            models: Mutex::new(config.models.clone()),
            config,
            input_dir,
            inner: Mutex::new(Inner::default()),
            work: Notify::new(),
            sockets: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            kill,
        });
        let app = Router::new()
            .route("/prompt", post(post_prompt).get(get_prompt))
            .route("/queue", get(get_queue).post(post_queue))
            .route("/history/{id}", get(get_history))
            .route("/interrupt", post(post_interrupt))
            .route("/upload/image", post(upload_image))
            .route("/view", get(view))
            .route("/system_stats", get(system_stats))
            .route("/ws", get(ws))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, app, shared.kill.subscribe()));
        let worker = tokio::spawn(run_worker(shared.clone()));
        FakeComfy {
            name: name.to_string(),
            addr,
            shared,
            tasks: vec![server, worker],
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// As a killed pod: the listener and every connection close, nothing runs on.
    pub fn kill(&mut self) {
        let _ = self.shared.kill.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    pub fn drop_websockets(&self) {
        self.shared.sockets.lock().unwrap().clear();
    }

    /// The model files it has from now on (as `FakeConfig::models`).
    pub fn set_models(&self, models: Vec<String>) {
        *self.shared.models.lock().unwrap() = models;
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap() = faults;
    }

    /// Prompt ids that started here, in order.
    pub fn started(&self) -> Vec<String> {
        self.shared.inner.lock().unwrap().started.clone()
    }

    /// How many times a prompt had to load a checkpoint other than the one loaded.
    pub fn switches(&self) -> usize {
        self.shared.inner.lock().unwrap().switches
    }

    pub fn running(&self) -> Option<String> {
        self.shared
            .inner
            .lock()
            .unwrap()
            .running
            .as_ref()
            .map(|i| i.prompt_id.clone())
    }

    pub fn uploads(&self) -> Vec<String> {
        self.shared.inner.lock().unwrap().uploads.clone()
    }

    /// Puts a file in `input/` (a name an upload will collide with).
    pub fn add_input(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.shared.input_dir.join(name), bytes).unwrap();
    }

    pub fn input_bytes(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.shared.input_dir.join(name)).ok()
    }
}

impl Drop for FakeComfy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Serves connections until killed; then drops every one of them.
async fn serve(listener: tokio::net::TcpListener, app: Router, mut kill: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    // HTTP/1.1 with upgrades (the websocket), as ComfyUI's aiohttp serves.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                });
            }
            _ = kill.changed() => return,
        }
    }
}

impl Shared {
    /// To the prompt's client only (ComfyUI's `send_sync(event, data, sid)`).
    fn send(&self, client: Option<&str>, kind: &str, data: Value) {
        let msg = json!({"type": kind, "data": data}).to_string();
        let mut sockets = self.sockets.lock().unwrap();
        match client {
            Some(c) => {
                if let Some(list) = sockets.get_mut(c) {
                    list.retain(|tx| tx.send(msg.clone()).is_ok());
                }
            }
            None => {
                for list in sockets.values_mut() {
                    list.retain(|tx| tx.send(msg.clone()).is_ok());
                }
            }
        }
    }

    fn status(&self) -> Value {
        let inner = self.inner.lock().unwrap();
        let remaining = inner.pending.len() + inner.running.is_some() as usize;
        json!({"status": {"exec_info": {"queue_remaining": remaining}}})
    }

    fn broadcast_status(&self) {
        let status = self.status();
        self.send(None, "status", status);
    }
}

fn bad_request(error: Value, node_errors: Value) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "node_errors": node_errors})),
    )
        .into_response()
}

async fn post_prompt(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    {
        let mut faults = s.faults.lock().unwrap();
        if faults.refuse_prompts > 0 {
            faults.refuse_prompts -= 1;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    let Some(prompt) = body.get("prompt").and_then(Value::as_object) else {
        return bad_request(
            json!({"type": "no_prompt", "message": "No prompt provided", "details": "", "extra_info": {}}),
            json!({}),
        );
    };
    let mut node_errors = serde_json::Map::new();
    for (id, node) in prompt {
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or("");
        let fail_class = s.faults.lock().unwrap().fail_class.clone();
        if !KNOWN_CLASSES.contains(&class) && fail_class.as_deref() != Some(class) {
            return bad_request(
                json!({"type": "invalid_prompt", "message": format!("Cannot execute because node {class} does not exist."), "details": format!("Node ID '#{id}'"), "extra_info": {}}),
                json!({}),
            );
        }
        let inputs = node
            .get("inputs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for (input, folder) in [
            ("ckpt_name", "checkpoints"),
            ("lora_name", "loras"),
            ("vae_name", "vae"),
            ("unet_name", "unet"),
        ] {
            if let Some(name) = inputs.get(input).and_then(Value::as_str)
                && !s
                    .models
                    .lock()
                    .unwrap()
                    .contains(&format!("{folder}/{name}"))
            {
                node_errors.insert(id.clone(), json!({
                    "errors": [{"type": "value_not_in_list", "message": "Value not in list", "details": format!("{input}: '{name}' not in list"), "extra_info": {"input_name": input}}],
                    "dependent_outputs": [],
                    "class_type": class,
                }));
            }
        }
        if class == "LoadImage"
            && let Some(image) = inputs.get("image").and_then(Value::as_str)
            && !s.input_dir.join(image).exists()
        {
            node_errors.insert(id.clone(), json!({
                "errors": [{"type": "custom_validation_failed", "message": "Failed to validate prompt for output", "details": format!("Invalid image file: {image}"), "extra_info": {}}],
                "dependent_outputs": [],
                "class_type": class,
            }));
        }
    }
    if !node_errors.is_empty() {
        return bad_request(
            json!({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}}),
            Value::Object(node_errors),
        );
    }
    let prompt_id = body
        .get("prompt_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("fake-{}", super::unique_suffix()));
    let number = {
        let mut inner = s.inner.lock().unwrap();
        inner.number += 1;
        let number = inner.number;
        let extra = json!({"client_id": body.get("client_id").cloned().unwrap_or(Value::Null)});
        inner.pending.push_back(Item {
            number,
            prompt_id: prompt_id.clone(),
            prompt: Value::Object(prompt.clone()),
            extra,
        });
        number
    };
    s.work.notify_one();
    s.broadcast_status();
    Json(json!({"prompt_id": prompt_id, "number": number, "node_errors": {}})).into_response()
}

async fn get_prompt(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(s.status())
}

async fn get_queue(State(s): State<Arc<Shared>>) -> Json<Value> {
    let inner = s.inner.lock().unwrap();
    Json(json!({
        "queue_running": inner.running.iter().map(Item::entry).collect::<Vec<_>>(),
        "queue_pending": inner.pending.iter().map(Item::entry).collect::<Vec<_>>(),
    }))
}

async fn post_queue(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Json<Value> {
    {
        let mut inner = s.inner.lock().unwrap();
        if body.get("clear").and_then(Value::as_bool) == Some(true) {
            inner.pending.clear();
        }
        for id in body
            .get("delete")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            inner
                .pending
                .retain(|i| Some(i.prompt_id.as_str()) != id.as_str());
        }
    }
    s.broadcast_status();
    Json(json!({}))
}

async fn get_history(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Json<Value> {
    let inner = s.inner.lock().unwrap();
    Json(match inner.history.get(&id) {
        Some(h) => json!({id: h}),
        None => json!({}),
    })
}

async fn post_interrupt(State(s): State<Arc<Shared>>, body: Option<Json<Value>>) -> Json<Value> {
    let wanted = body
        .as_ref()
        .and_then(|b| b.get("prompt_id"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut inner = s.inner.lock().unwrap();
    let running = inner.running.as_ref().map(|i| i.prompt_id.clone());
    // ComfyUI interrupts only when the prompt asked for is the one running.
    if running.is_some() && (wanted.is_none() || wanted == running) {
        inner.interrupt = true;
    }
    Json(json!({}))
}

async fn upload_image(State(s): State<Arc<Shared>>, mut form: Multipart) -> Response {
    while let Ok(Some(field)) = form.next_field().await {
        if field.name() != Some("image") {
            continue;
        }
        let name = field.file_name().unwrap_or("image.png").to_string();
        let Ok(bytes) = field.bytes().await else {
            break;
        };
        let path = Path::new(&name);
        let (stem, ext) = (
            path.file_stem()
                .and_then(|x| x.to_str())
                .unwrap_or("image")
                .to_string(),
            path.extension()
                .and_then(|x| x.to_str())
                .map(|e| format!(".{e}"))
                .unwrap_or_default(),
        );
        let mut stored = name.clone();
        let mut i = 1;
        while s.input_dir.join(&stored).exists() {
            stored = format!("{stem} ({i}){ext}");
            i += 1;
        }
        std::fs::write(s.input_dir.join(&stored), &bytes).unwrap();
        s.inner.lock().unwrap().uploads.push(stored.clone());
        return Json(json!({"name": stored, "subfolder": "", "type": "input"})).into_response();
    }
    StatusCode::BAD_REQUEST.into_response()
}

async fn view(State(s): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let filename = q.get("filename").cloned().unwrap_or_default();
    let subfolder = q.get("subfolder").cloned().unwrap_or_default();
    if filename.contains("..") || subfolder.contains("..") {
        return StatusCode::FORBIDDEN.into_response();
    }
    let base = match q.get("type").map(String::as_str) {
        Some("input") => s.input_dir.clone(),
        _ => s.config.output_dir.clone(),
    };
    match std::fs::read(base.join(&subfolder).join(&filename)) {
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn system_stats(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "system": {"os": "posix", "comfyui_version": "fake", "python_version": "none", "embedded_python": false},
        "devices": [{"name": format!("fake-gpu {}", s.name), "type": "cuda", "index": 0, "vram_total": 24_000_000_000u64, "vram_free": 20_000_000_000u64}],
    }))
}

async fn ws(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client = q
        .get("clientId")
        .cloned()
        .unwrap_or_else(|| format!("anon-{}", super::unique_suffix()));
    upgrade.on_upgrade(move |socket| socket_loop(s, client, socket))
}

async fn socket_loop(s: Arc<Shared>, client: String, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut kill = s.kill.subscribe();
    let hello = json!({"type": "status", "data": {"status": s.status()["status"], "sid": client}})
        .to_string();
    if socket.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    s.sockets
        .lock()
        .unwrap()
        .entry(client.clone())
        .or_default()
        .push(tx);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(text) => if socket.send(Message::Text(text.into())).await.is_err() { return },
                // Dropped by `drop_websockets`.
                None => return,
            },
            incoming = socket.recv() => if !matches!(incoming, Some(Ok(_))) { return },
            _ = kill.changed() => return,
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

enum Outcome {
    Success,
    Error {
        node: String,
        class: String,
        message: String,
    },
    Interrupted {
        node: String,
        class: String,
    },
}

async fn run_worker(s: Arc<Shared>) {
    loop {
        let item = {
            let mut inner = s.inner.lock().unwrap();
            match inner.pending.pop_front() {
                Some(item) => {
                    inner.interrupt = false;
                    inner.started.push(item.prompt_id.clone());
                    let id = item.prompt_id.clone();
                    let (prompt, extra, number) =
                        (item.prompt.clone(), item.extra.clone(), item.number);
                    inner.running = Some(item);
                    Some((id, prompt, extra, number))
                }
                None => None,
            }
        };
        let Some((id, prompt, extra, number)) = item else {
            s.work.notified().await;
            continue;
        };
        let client = extra
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let c = client.as_deref();
        let faults = s.faults.lock().unwrap().clone();
        tokio::time::sleep(faults.slow_start).await;
        let mut messages = Vec::new();
        let mut emit = |kind: &str, data: Value, history: bool| {
            if history {
                messages.push(json!([kind, data.clone()]));
            }
            s.send(c, kind, data);
        };
        emit(
            "execution_start",
            json!({"prompt_id": id, "timestamp": now_ms()}),
            true,
        );
        emit(
            "execution_cached",
            json!({"nodes": [], "prompt_id": id, "timestamp": now_ms()}),
            true,
        );
        let mut ids: Vec<&String> = prompt.as_object().unwrap().keys().collect();
        ids.sort_by_key(|k| (k.parse::<u64>().unwrap_or(u64::MAX), k.to_string()));
        let mut outputs = serde_json::Map::new();
        let mut outcome = Outcome::Success;
        'nodes: for node_id in ids {
            let node = &prompt[node_id.as_str()];
            let class = node["class_type"].as_str().unwrap_or("").to_string();
            let inputs = &node["inputs"];
            emit(
                "executing",
                json!({"node": node_id, "display_node": node_id, "prompt_id": id}),
                false,
            );
            if faults.fail_class.as_deref() == Some(class.as_str()) {
                outcome = Outcome::Error {
                    node: node_id.clone(),
                    class,
                    message: "injected failure".into(),
                };
                break;
            }
            if let Some(ckpt) = inputs
                .get("ckpt_name")
                .or_else(|| inputs.get("unet_name"))
                .and_then(Value::as_str)
            {
                let switch = s.inner.lock().unwrap().loaded.as_deref() != Some(ckpt);
                if switch {
                    tokio::time::sleep(s.config.switch_penalty).await;
                    let mut inner = s.inner.lock().unwrap();
                    inner.loaded = Some(ckpt.to_string());
                    inner.switches += 1;
                }
            }
            if class.starts_with("KSampler") {
                let steps = inputs.get("steps").and_then(Value::as_u64).unwrap_or(20);
                let mut step = 0;
                while step < steps || faults.hang {
                    tokio::time::sleep(s.config.step_time).await;
                    if s.inner.lock().unwrap().interrupt {
                        outcome = Outcome::Interrupted {
                            node: node_id.clone(),
                            class,
                        };
                        break 'nodes;
                    }
                    if step < steps {
                        step += 1;
                        emit(
                            "progress",
                            json!({"value": step, "max": steps, "prompt_id": id, "node": node_id}),
                            false,
                        );
                    }
                }
            }
            if class == "SaveImage" || class == "PreviewImage" {
                let (folder_type, base) = if class == "SaveImage" {
                    ("output", s.config.output_dir.clone())
                } else {
                    ("temp", std::env::temp_dir())
                };
                let prefix = inputs
                    .get("filename_prefix")
                    .and_then(Value::as_str)
                    .unwrap_or("ComfyUI");
                let (subfolder, stem) = match prefix.rsplit_once('/') {
                    Some((sub, stem)) => (sub.to_string(), stem.to_string()),
                    None => (String::new(), prefix.to_string()),
                };
                let dir = base.join(&subfolder);
                std::fs::create_dir_all(&dir).unwrap();
                // ComfyUI's counter: one more than the highest `<stem>_<n>_` in the folder.
                let counter = std::fs::read_dir(&dir)
                    .unwrap()
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        name.strip_prefix(&format!("{stem}_"))?
                            .split('_')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .max()
                    .unwrap_or(0)
                    + 1;
                // The gap between choosing a counter and writing is where pods sharing a
                // folder collide.
                tokio::time::sleep(Duration::from_millis(2)).await;
                let filename = format!("{stem}_{counter:05}_.png");
                std::fs::write(
                    dir.join(&filename),
                    format!("fake-image prompt={id} node={node_id} pod={}", s.name),
                )
                .unwrap();
                let output = json!({"images": [{"filename": filename, "subfolder": subfolder, "type": folder_type}]});
                outputs.insert(node_id.clone(), output.clone());
                emit(
                    "executed",
                    json!({"node": node_id, "display_node": node_id, "output": output, "prompt_id": id}),
                    false,
                );
            }
        }
        let status = match &outcome {
            Outcome::Success => {
                emit(
                    "execution_success",
                    json!({"prompt_id": id, "timestamp": now_ms()}),
                    true,
                );
                json!({"status_str": "success", "completed": true})
            }
            Outcome::Error {
                node,
                class,
                message,
            } => {
                emit(
                    "execution_error",
                    json!({
                        "prompt_id": id, "node_id": node, "node_type": class, "executed": [],
                        "exception_message": message, "exception_type": "RuntimeError", "traceback": [],
                        "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms(),
                    }),
                    true,
                );
                json!({"status_str": "error", "completed": false})
            }
            Outcome::Interrupted { node, class } => {
                emit(
                    "execution_interrupted",
                    json!({"prompt_id": id, "node_id": node, "node_type": class, "executed": [], "timestamp": now_ms()}),
                    true,
                );
                json!({"status_str": "error", "completed": false})
            }
        };
        emit("executing", json!({"node": null, "prompt_id": id}), false);
        let mut status = status;
        status["messages"] = Value::Array(messages);
        {
            let mut inner = s.inner.lock().unwrap();
            inner.running = None;
            inner.history.insert(
                id.clone(),
                json!({
                    "prompt": [number, id, prompt, extra, []],
                    "outputs": outputs,
                    "status": status,
                    "meta": {},
                }),
            );
        }
        s.broadcast_status();
    }
}

impl FakeComfy {
    /// The prompt a finished job ran with, from this pod's history.
    pub fn prompt_of(&self, id: &str) -> Option<Value> {
        let inner = self.shared.inner.lock().unwrap();
        inner.history.get(id).map(|h| h["prompt"][2].clone())
    }
}
