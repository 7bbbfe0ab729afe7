//! The gateway as a process of the test, its API over loopback, and the cluster side of
//! fake ComfyUI pods: EndpointSlices of the fleet's Service that point at them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

use super::fake_comfyui::FakeComfy;
use super::process::{free_port, sdfleet_bin};
use super::testbed::{Testbed, eventually};

/// `sdfleet gateway`, killed on drop. `restart_after_kill` keeps its store.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub port: u16,
    pub metrics_port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    bin: PathBuf,
    pub log: PathBuf,
}

impl GatewayProcess {
    /// Starts the gateway with `args` (after `gateway`); listen addresses are added here.
    pub fn start(tb: &Testbed, args: Vec<String>) -> GatewayProcess {
        Self::start_as(tb, args, tb.kubeconfig())
    }

    /// As `start`, with another build's binary (a benchmark's peer).
    pub fn start_bin(tb: &Testbed, args: Vec<String>, bin: &Path) -> GatewayProcess {
        Self::spawn_bin(args, Self::env_of(tb, tb.kubeconfig()), bin.to_path_buf())
    }

    fn env_of(tb: &Testbed, kubeconfig: &Path) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = tb
            .aws_env()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        env
    }

    /// As `start`, with the identity of `kubeconfig` (e.g. the gateway's ServiceAccount).
    pub fn start_as(tb: &Testbed, args: Vec<String>, kubeconfig: &Path) -> GatewayProcess {
        Self::spawn(args, Self::env_of(tb, kubeconfig))
    }

    fn spawn(args: Vec<String>, env: Vec<(String, String)>) -> GatewayProcess {
        Self::spawn_bin(args, env, sdfleet_bin())
    }

    fn spawn_bin(args: Vec<String>, env: Vec<(String, String)>, bin: PathBuf) -> GatewayProcess {
        let (port, metrics_port) = (free_port(), free_port());
        let log = std::env::temp_dir().join(format!(
            "sdfleet-gateway-{port}-{}.log",
            super::unique_suffix()
        ));
        let child = std::process::Command::new(&bin)
            .arg("gateway")
            .args(&args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "info,sdfleet=debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sdfleet gateway");
        GatewayProcess {
            child,
            port,
            metrics_port,
            args,
            env,
            bin,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGKILL, then the same flags and store again (on new ports).
    pub fn restart_after_kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        *self = Self::spawn_bin(self.args.clone(), self.env.clone(), self.bin.clone());
    }

    /// SIGTERM, as a rollout or a node drain sends it: the process must exit within
    /// `grace` (a pod's grace period), then runs again with the same flags and store.
    pub fn restart_after_term(&mut self, grace: Duration) {
        // SAFETY: kill(2) on the child's own pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway did not exit within {grace:?} of SIGTERM ({})",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        *self = Self::spawn_bin(self.args.clone(), self.env.clone(), self.bin.clone());
    }

    /// A second gateway process with the same flags and its own store `store` (as a
    /// rollout's new pod beside the old one), on new ports.
    pub fn start_another(&self, store: &Path) -> GatewayProcess {
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--store") {
            args[i + 1] = store.display().to_string();
        }
        Self::spawn_bin(args, self.env.clone(), self.bin.clone())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A metric's value (first sample whose line starts with `prefix`).
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let text = super::http::http_get(self.metrics_port, "/metrics").await?;
        text.lines()
            .find(|l| l.starts_with(prefix))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    /// Waits until its `/readyz` answers 200 (a replica on PostgreSQL: it reaches the
    /// store, holder or not).
    pub async fn wait_serving(&self) {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        eventually(
            &format!("gateway ready ({})", self.log.display()),
            Duration::from_secs(30),
            || async {
                let resp = http.get(self.url("/readyz")).send().await.ok()?;
                (resp.status() == 200).then_some(())
            },
        )
        .await;
    }

    /// Waits until it serves and dispatches to `pods` pods of `fleet`.
    pub async fn wait_ready(&self, fleet: &str, pods: usize) {
        let prefix = format!("sdfleet_gateway_ready_pods{{fleet=\"{fleet}\"}} {pods}");
        eventually(
            &format!("gateway with {pods} pods ({})", self.log.display()),
            Duration::from_secs(60),
            || async {
                let text = super::http::http_get(self.metrics_port, "/metrics").await?;
                text.lines().any(|l| l == prefix).then_some(())
            },
        )
        .await;
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A text-to-image workflow in ComfyUI's API format: checkpoint, prompt, latent,
/// sampler (`steps` progress events), decode, save. Each call has a new seed, as clients
/// send: ComfyUI (and the double) caches a node whose inputs did not change, and a repeated
/// prompt would run only its save node.
pub fn sdxl_workflow(ckpt: &str, steps: u64) -> Value {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: AtomicU64 = AtomicU64::new(1);
    let seed = SEED.fetch_add(1, Ordering::Relaxed);
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"steps": steps, "seed": seed, "model": ["1", 0], "positive": ["2", 0], "latent_image": ["3", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    })
}

/// `--webhook-allow-cidr` for loopback: the tests' webhook receivers listen on
/// 127.0.0.1, which the gateway refuses by default.
pub fn allow_loopback_webhooks() -> Vec<String> {
    vec!["--webhook-allow-cidr".into(), "127.0.0.0/8".into()]
}

/// The pod IP a fake pod has in its EndpointSlice (the apiserver refuses loopback
/// addresses there); the gateway maps `pod_ip:8188` to the fake with `--endpoint-map`.
pub fn pod_ip(index: usize) -> String {
    format!("10.200.{}.{}", index / 250, index % 250 + 1)
}

/// `--endpoint-map` for the fakes: pod address → loopback address.
pub fn endpoint_map_args(fakes: &[FakeComfy]) -> Vec<String> {
    fakes
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            [
                "--endpoint-map".to_string(),
                format!("{}:8188={}", pod_ip(i), f.addr),
            ]
        })
        .collect()
}

/// An EndpointSlice of `service` with one ready endpoint, the fake pod number `index`,
/// as the EndpointSlice controller would list a real pod.
pub async fn publish_pod(
    client: &Client,
    namespace: &str,
    service: &str,
    index: usize,
    fake: &FakeComfy,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{}", fake.name),
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "sdfleet-tests",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8188, "protocol": "TCP"}],
        "endpoints": [{
            "addresses": [pod_ip(index)],
            "conditions": {"ready": true},
            "nodeName": format!("node-{index}"),
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": fake.name},
        }],
    });
    api.patch(
        &format!("{service}-{}", fake.name),
        &PatchParams::apply("sdfleet-tests").force(),
        &Patch::Apply(slice),
    )
    .await
    .expect("apply EndpointSlice");
}

/// The pod leaves the Service (deleted, or no longer ready).
pub async fn unpublish_pod(client: &Client, namespace: &str, service: &str, fake: &FakeComfy) {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let _ = api
        .delete(
            &format!("{service}-{}", fake.name),
            &DeleteParams::default(),
        )
        .await;
}

/// A client of the gateway's API with one key.
#[derive(Clone)]
pub struct ApiClient {
    pub http: reqwest::Client,
    pub base: String,
    pub key: String,
}

impl ApiClient {
    pub fn new(base: &str, key: &str) -> ApiClient {
        ApiClient {
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
        }
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Submits; returns (status, body).
    pub async fn submit(&self, body: Value) -> (u16, Value) {
        let resp = self.post("/api/v2/jobs").json(&body).send().await.unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    /// Submits in sync mode (`?wait=SECS`); returns (status, body).
    pub async fn submit_and_wait(&self, body: Value, secs: u64) -> (u16, Value) {
        let resp = self
            .post(&format!("/api/v2/jobs?wait={secs}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get(&format!("/api/v2/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls until the job is in a final state (bounded).
    /// Polls the job until it ends; panics with its last view after `timeout`.
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> Value {
        let last = std::sync::Mutex::new(Value::Null);
        let ended = tokio::time::timeout(
            timeout,
            eventually(&format!("job {id} to end"), timeout * 2, || async {
                let job = self.job(id).await;
                *last.lock().unwrap() = job.clone();
                let state = job["state"].as_str().unwrap_or("");
                ["succeeded", "failed", "canceled", "expired"]
                    .contains(&state)
                    .then_some(job)
            }),
        )
        .await;
        match ended {
            Ok(job) => job,
            Err(_) => panic!(
                "job {id} did not end within {timeout:?}; last seen: {}",
                last.lock().unwrap()
            ),
        }
    }

    /// The job's SSE stream until it closes or `timeout`: (event, data) pairs.
    pub async fn events(&self, id: &str, timeout: Duration) -> Vec<(String, Value)> {
        let resp = self
            .get(&format!("/api/v2/jobs/{id}/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            for e in drain_sse(&mut buf) {
                out.push((
                    e.kind,
                    serde_json::from_str(&e.data).unwrap_or(Value::String(e.data)),
                ));
            }
        }
        out
    }
}

/// One server-sent event with data: its type, its id (a number, if it has one) and its
/// data.
pub struct SseEvent {
    pub kind: String,
    pub id: Option<u32>,
    pub data: String,
}

/// Takes the complete events (each ended by a blank line) out of `buf`; comments and
/// keep-alives (no data) are dropped.
pub fn drain_sse(buf: &mut String) -> Vec<SseEvent> {
    let mut out = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let mut event = SseEvent {
            kind: "message".into(),
            id: None,
            data: String::new(),
        };
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                event.kind = e.trim().to_string();
            } else if let Some(i) = line.strip_prefix("id:") {
                event.id = i.trim().parse().ok();
            } else if let Some(d) = line.strip_prefix("data:") {
                event.data.push_str(d.trim_start());
            }
        }
        if !event.data.is_empty() {
            out.push(event);
        }
    }
    out
}

/// A directory holding one API key as the admin's Secret would (id → SHA-256 hex), as
/// the kubelet mounts it.
pub fn api_keys_dir(dir: &Path, id: &str, key: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(id), sdfleet::gateway::auth::hash_key(key)).unwrap();
}

/// Adds key `id` with `words` after its hash (role, share settings) to the keys
/// directory `dir` of the gateway at `base`, and waits until the gateway (which re-reads
/// it every 5 s) takes it.
pub async fn add_key(dir: &Path, base: &str, id: &str, words: &str) -> ApiClient {
    let key = format!("{id}-{}", super::testbed::unique_suffix());
    let hash = sdfleet::gateway::auth::hash_key(&key);
    std::fs::write(dir.join(id), format!("{hash} {words}")).unwrap();
    let api = ApiClient::new(base, &key);
    eventually(
        &format!("the gateway to take key {id}"),
        Duration::from_secs(30),
        || async {
            let resp = api.get("/api/v2/jobs?limit=1").send().await.ok()?;
            (resp.status() == 200).then_some(())
        },
    )
    .await;
    api
}

/// Whether `as_user` may `verb` `resource` in `ns` (`kubectl auth can-i`).
pub fn can_i(tb: &Testbed, as_user: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let out = tb
        .kubectl()
        .args(["auth", "can-i", verb, resource, "-n", ns, "--as", as_user])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// The rendered container args with the paths and addresses of this machine: the
/// store and keys in a temporary directory, S3 on moto, the fake pods' addresses.
pub fn local_args(rendered: &[String], ns: &str, work: &Path, tb: &Testbed) -> Vec<String> {
    let mut out = vec!["--namespace".to_string(), ns.to_string()];
    let mut it = rendered.iter().skip(1); // "gateway"
    while let Some(flag) = it.next() {
        let value = match flag.as_str() {
            "--no-auth" | "--publish-demand" => {
                out.push(flag.clone());
                continue;
            }
            _ => it.next().cloned().unwrap_or_default(),
        };
        match flag.as_str() {
            // The test picks free loopback ports.
            "--listen" | "--metrics-listen" => {}
            "--store" => out.extend([flag.clone(), work.join("jobs.redb").display().to_string()]),
            "--api-keys-dir" => out.extend([flag.clone(), work.join("keys").display().to_string()]),
            _ => out.extend([flag.clone(), value]),
        }
    }
    out.extend(["--s3-endpoint".into(), tb.var("AWS_ENDPOINT_URL").into()]);
    out
}
