//! The Helm chart as users install it: releases, and kubeconfigs that act as the chart's
//! ServiceAccounts.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::testbed::{Testbed, repo_root, unique_suffix};

/// Installs the Helm chart into `namespace` as release `release` (for its RBAC and
/// objects; the controller itself runs as a local process in the tests). The CSI driver
/// is cluster-scoped (one release per cluster): off unless `extra` turns it on
/// (`csi.enabled=true`, as the installed test does).
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
            "controller.clusterName=testbed,controller.region=us-west-2,controller.cloud=kwok,csi.enabled=false",
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

/// `helm uninstall` of `release` in `namespace`, with `extra` arguments.
pub fn helm_uninstall(
    tb: &Testbed,
    release: &str,
    namespace: &str,
    extra: &[&str],
) -> std::io::Result<std::process::Output> {
    std::process::Command::new(tb.var("SDFLEET_TESTBED_HELM"))
        .args([
            "uninstall",
            release,
            "--namespace",
            namespace,
            "--kubeconfig",
        ])
        .arg(tb.kubeconfig())
        .args(extra)
        .output()
}

/// `helm uninstall` of a release from `install_release` (asserting it succeeds).
pub fn uninstall_release(tb: &Testbed, release: &str, namespace: &str) {
    let out = helm_uninstall(tb, release, namespace, &[]).unwrap();
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// Admission policies take effect once the apiserver has loaded them (it reloads them
/// about every second): wait (bounded) until `probe` (a dry run) is refused.
pub async fn wait_for_policy<F, Fut, T>(mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    for _ in 0..60 {
        match probe().await {
            Err(kube::Error::Api(e)) if e.code != 409 => {
                eprintln!("policy in effect: {}", e.message);
                return;
            }
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    panic!("the chart's admission policy never took effect");
}

/// A client from a kubeconfig file (e.g. one of `impersonating_kubeconfig`).
pub async fn client_from(path: &std::path::Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// A kubeconfig acting as the chart's agent ServiceAccount whose token names `node` (as
/// the bound token kubelet gives the agent's pod does), readable by any user (the agent
/// runs unprivileged).
pub fn agent_kubeconfig(tb: &Testbed, release_ns: &str, node: &str) -> PathBuf {
    let path = impersonating_kubeconfig(tb, release_ns, "sdfleet-agent");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "    as-groups:",
        &format!(
            "    as-user-extra: {{\"authentication.kubernetes.io/node-name\": [\"{node}\"]}}\n    as-groups:"
        ),
    );
    let path = PathBuf::from(format!("{}-{node}", path.display()));
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// `helm template` of the chart with `--set` values `sets` (no cluster: `helm` from
/// `tool`), parsed into its objects.
pub fn render_chart(sets: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = std::process::Command::new(super::testbed::tool("helm"));
    cmd.args(["template", "obs"])
        .arg(repo_root().join("charts/sdfleet"))
        .args(["--kube-version", "v1.35.4", "--namespace", "sdfleet-system"]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.output().expect("run helm template");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .expect("the rendered chart is YAML")
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The chart with every monitoring object on.
pub const MONITORING_ON: [&str; 4] = [
    "grafanaDashboard.enabled=true",
    "prometheusRules.enabled=true",
    "metrics.serviceMonitor.enabled=true",
    "metrics.gatewayPodMonitor.enabled=true",
];

/// The one rendered object of `kind`.
pub fn one_of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind} expected, rendered {}",
        found.len()
    );
    found[0]
}
