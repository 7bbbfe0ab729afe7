//! The testbed itself: brought up once per test run (`up` is idempotent, so every test
//! binary may call it and all share one control plane), its variables, a client, and
//! per-test namespaces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The variables of `.testbed/env.json` (KUBECONFIG, AWS_ENDPOINT_URL, ...).
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
            let text = std::fs::read_to_string(root.join(".testbed/env.json"))
                .expect("read .testbed/env.json");
            Testbed {
                env: serde_json::from_str(&text).expect("parse .testbed/env.json"),
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

/// A FleetClass for namespace `ns` only, with `grants` (its `s3` or `models` part, or
/// any other, over a placeholder `nodeClass`); its name.
pub async fn team_class(client: &Client, ns: &str, grants: Value) -> String {
    let class = format!("team-{}", unique_suffix());
    let mut spec = json!({"nodeClass": {"role": "r"},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}});
    if let (Some(spec), Some(grants)) = (spec.as_object_mut(), grants.as_object()) {
        spec.extend(grants.clone());
    }
    Api::<sdfleet::crd::FleetClass>::all(client.clone())
        .patch(
            &class,
            &PatchParams::apply("test-user").force(),
            &Patch::Apply(
                json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "FleetClass",
                "metadata": {"name": class}, "spec": spec}),
            ),
        )
        .await
        .unwrap();
    class
}

/// This process's mounts: each mount point with its options, from /proc/self/mountinfo
/// (the tests' paths have none of the characters the kernel escapes there).
pub fn mounts() -> Vec<(PathBuf, Vec<String>)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ').skip(4);
            let point = PathBuf::from(fields.next()?);
            let options = fields.next()?.split(',').map(str::to_string).collect();
            Some((point, options))
        })
        .collect()
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

/// Installs sdfleet's CRDs from `crds/` (idempotent) and waits until they are served:
/// `tests/testbed/testbed install-crds`, the one implementation the demo and the
/// benchmarks use too.
pub fn install_crds(_tb: &Testbed) {
    let out = std::process::Command::new(repo_root().join("tests/testbed/testbed"))
        .arg("install-crds")
        .output()
        .expect("run tests/testbed/testbed install-crds");
    assert!(
        out.status.success(),
        "install-crds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test tool (`helm`, `glua`, `kubectl`), built if missing, without bringing the
/// testbed up: for tests that need the tool but no cluster.
pub fn tool(name: &str) -> PathBuf {
    let out = std::process::Command::new(repo_root().join("tests/testbed/testbed"))
        .args(["tool", name])
        .output()
        .expect("run tests/testbed/testbed tool");
    assert!(
        out.status.success(),
        "testbed tool {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
