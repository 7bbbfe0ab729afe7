//! Shared by the integration tests: brings the testbed up once per test run and gives
//! each test its own namespace. The testbed is `tests/testbed/testbed`; `up` is
//! idempotent, so every test binary may call it and all share one control plane.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The variables of `.testbed/env` (KUBECONFIG, AWS_ENDPOINT_URL, ...).
pub struct Testbed {
    pub env: BTreeMap<String, String>,
}

static TESTBED: OnceLock<Testbed> = OnceLock::new();

impl Testbed {
    /// Brings the testbed up (or reuses the running one) and reads its env file.
    pub fn get() -> &'static Testbed {
        TESTBED.get_or_init(|| {
            let root = repo_root();
            let status = std::process::Command::new(root.join("tests/testbed/testbed"))
                .arg("up")
                .status()
                .expect("run tests/testbed/testbed up");
            assert!(status.success(), "testbed up failed");
            let text =
                std::fs::read_to_string(root.join(".testbed/env")).expect("read .testbed/env");
            Testbed {
                env: parse_env(&text),
            }
        })
    }

    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from .testbed/env"))
    }

    pub fn kubeconfig(&self) -> &Path {
        Path::new(self.var("KUBECONFIG"))
    }

    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("read kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        Client::try_from(config).expect("client")
    }

    /// An AWS SDK config pointed at moto on loopback.
    pub async fn aws(&self) -> aws_config::SdkConfig {
        let creds = aws_sdk_s3::config::Credentials::new(
            self.var("AWS_ACCESS_KEY_ID"),
            self.var("AWS_SECRET_ACCESS_KEY"),
            None,
            None,
            "testbed",
        );
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(self.var("AWS_ENDPOINT_URL"))
            .region(aws_config::Region::new(self.var("AWS_REGION").to_string()))
            .credentials_provider(creds)
            .load()
            .await
    }

    /// The AWS variables of the testbed (moto's endpoint, dummy credentials, region),
    /// for processes that must reach moto.
    pub fn aws_env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// A `kubectl` command bound to the testbed.
    pub fn kubectl(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.var("SDFLEET_TESTBED_KUBECTL"));
        cmd.arg("--kubeconfig").arg(self.kubeconfig());
        cmd
    }
}

fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// A namespace of the test's own, deleted when dropped (best effort, in the background).
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{}", unique_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"sdfleet.io/test": "true"}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        TestNamespace {
            name,
            client: client.clone(),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api = Api::<Namespace>::all(self.client.clone());
        let name = self.name.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            });
        }
    }
}

pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:x}{}",
        (nanos ^ std::process::id()) & 0xfffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it returns Some, at most `timeout` and at most `timeout / step`
/// attempts; panics with `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let step = Duration::from_millis(250);
    let start = Instant::now();
    let max_attempts = (timeout.as_millis() / step.as_millis()).max(1) as u64;
    for _ in 0..max_attempts {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            break;
        }
        tokio::time::sleep(step).await;
    }
    panic!("timed out after {:?} waiting for {what}", start.elapsed());
}

/// Installs sdfleet's CRDs from `crds/` (idempotent) and waits until they are served.
pub fn install_crds(tb: &Testbed) {
    let crds = repo_root().join("crds");
    let out = tb
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply crds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tb
        .kubectl()
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/comfyuideployments.sdfleet.io",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crd not established: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The real controller binary, run as a process against the testbed, watching one
/// namespace. Killed when dropped.
pub struct ControllerProcess {
    pub child: std::process::Child,
    pub metrics_port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

pub fn sdfleet_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sdfleet"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ControllerProcess {
    pub fn start(tb: &Testbed, namespace: &str, extra: &[&str]) -> ControllerProcess {
        Self::start_with_env(tb, namespace, extra, &[])
    }

    /// As `start`, with extra environment (e.g. `KUBECONFIG` of another identity, `POD_NAME`).
    pub fn start_with_env(
        tb: &Testbed,
        namespace: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ControllerProcess {
        let mut args: Vec<String> = [
            "controller",
            "--cloud",
            "kwok",
            "--cluster-name",
            "testbed",
            "--region",
            "us-west-2",
            "--namespace",
            namespace,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(tb, args, env)
    }

    fn spawn(tb: &Testbed, args: Vec<String>, env: Vec<(String, String)>) -> ControllerProcess {
        let metrics_port = free_port();
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("sdfleet-controller-{metrics_port}.log")),
        )
        .unwrap();
        let child = std::process::Command::new(sdfleet_bin())
            .args(&args)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("KUBECONFIG", tb.kubeconfig())
            .env("RUST_LOG", "info,sdfleet=debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sdfleet controller");
        ControllerProcess {
            child,
            metrics_port,
            args,
            env,
        }
    }

    /// Kills the process (SIGKILL, as a crash would) and starts a new one with the same flags.
    pub fn restart_after_kill(&mut self, tb: &Testbed) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        *self = Self::spawn(tb, self.args.clone(), self.env.clone());
    }

    /// Sends SIGTERM and waits (at most 20 s) for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        panic!("the controller did not exit within 20 s of SIGTERM");
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// `/metrics` of the controller, or None while it is not serving.
    pub async fn metrics(&self) -> Option<String> {
        http_get(self.metrics_port, "/metrics").await
    }

    /// The sum of every sample of `family` in `/metrics`.
    pub async fn metric_sum(&self, family: &str) -> Option<f64> {
        let text = self.metrics().await?;
        Some(
            text.lines()
                .filter(|l| l.starts_with(family) && !l.starts_with('#'))
                .filter(|l| l[family.len()..].starts_with(['{', ' ']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process that is killed when the test ends, passing or panicking.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1; the body on 200, None otherwise.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}

/// Installs the Helm chart into `namespace` as release `release` (for its RBAC and
/// objects; the controller itself runs as a local process in the tests).
pub fn helm_install(
    tb: &Testbed,
    release: &str,
    namespace: &str,
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(tb.var("SDFLEET_TESTBED_HELM"))
        .args(["install", release])
        .arg(repo_root().join("charts/sdfleet"))
        .args([
            "--namespace",
            namespace,
            "--create-namespace",
            "--kubeconfig",
        ])
        .arg(tb.kubeconfig())
        .args([
            "--set",
            "controller.clusterName=testbed,controller.region=us-west-2,controller.cloud=kwok",
        ])
        .args(extra)
        .output()
        .expect("run helm")
}

/// Installs the chart (one replica) as a new release `<name><suffix>` in its own
/// namespace `sdfleet-<name>-<suffix>`; returns both. For tests that need the chart's
/// ServiceAccounts and RBAC.
pub fn install_release(tb: &Testbed, name: &str) -> (String, String) {
    let suffix = unique_suffix();
    let (release, namespace) = (
        format!("{name}{suffix}"),
        format!("sdfleet-{name}-{suffix}"),
    );
    let out = helm_install(tb, &release, &namespace, &["--set", "replicaCount=1"]);
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (release, namespace)
}

/// A kubeconfig that acts as the ServiceAccount `namespace/name` (impersonation), so a
/// process using it has exactly that account's RBAC.
pub fn impersonating_kubeconfig(tb: &Testbed, namespace: &str, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(tb.kubeconfig()).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim_start().starts_with("client-key-data:") {
            out.push_str(&format!(
                "    as: system:serviceaccount:{namespace}:{name}\n"
            ));
            out.push_str(&format!(
                "    as-groups: [system:serviceaccounts, \"system:serviceaccounts:{namespace}\", system:authenticated]\n"
            ));
        }
    }
    let path = std::env::temp_dir().join(format!("sdfleet-kubeconfig-{namespace}-{name}"));
    std::fs::write(&path, out).unwrap();
    path
}

/// An S3 client on moto (path-style addressing, as moto needs).
pub async fn s3_client(tb: &Testbed) -> aws_sdk_s3::Client {
    let aws = tb.aws().await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&aws)
            .force_path_style(true)
            .build(),
    )
}

/// A new bucket in us-west-2 named `<prefix>-<unique>`.
pub async fn create_bucket(s3: &aws_sdk_s3::Client, prefix: &str) -> String {
    let name = format!("{prefix}-{}", unique_suffix());
    s3.create_bucket()
        .bucket(&name)
        .create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::UsWest2)
                .build(),
        )
        .send()
        .await
        .unwrap();
    name
}

/// A queue receiving the bucket's ObjectCreated/ObjectRemoved notifications; its URL.
pub async fn notify_to_new_queue(
    s3: &aws_sdk_s3::Client,
    sqs: &aws_sdk_sqs::Client,
    bucket: &str,
) -> String {
    use aws_sdk_sqs::types::QueueAttributeName;
    let queue = sqs
        .create_queue()
        .queue_name(bucket)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&queue)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap();
    let arn = attrs.attributes().unwrap()[&QueueAttributeName::QueueArn].clone();
    let config = aws_sdk_s3::types::QueueConfiguration::builder()
        .queue_arn(arn)
        .events(aws_sdk_s3::types::Event::from("s3:ObjectCreated:*"))
        .events(aws_sdk_s3::types::Event::from("s3:ObjectRemoved:*"))
        .build()
        .unwrap();
    s3.put_bucket_notification_configuration()
        .bucket(bucket)
        .notification_configuration(
            aws_sdk_s3::types::NotificationConfiguration::builder()
                .queue_configurations(config)
                .build(),
        )
        .send()
        .await
        .unwrap();
    queue
}
