//! A fleet as users run it, for the autoscaling tests and benchmark: the controller as
//! the chart's ServiceAccount scoped to one namespace, the gateway exactly as rendered
//! as its own ServiceAccount, and a fake ComfyUI for each of the fleet's kwok pods.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::chart::impersonating_kubeconfig;
use super::fake_comfyui::{FakeComfy, FakeConfig};
use super::gateway::{GatewayProcess, local_args};
use super::process::ControllerProcess;
use super::testbed::{Testbed, eventually};

pub const CKPT: &str = "sd_xl_base_1.0.safetensors";
const POD_SELECTOR: &str = "app.kubernetes.io/name=comfyui,app.kubernetes.io/instance=sdxl";

/// The controller for `namespace`, as the chart's ServiceAccount of `release`.
pub fn start_controller(
    tb: &Testbed,
    namespace: &str,
    release: &str,
    release_ns: &str,
) -> ControllerProcess {
    start_controller_with(tb, namespace, release, release_ns, &[])
}

/// As `start_controller`, with more arguments (e.g. `--cloud aws`).
pub fn start_controller_with(
    tb: &Testbed,
    namespace: &str,
    release: &str,
    release_ns: &str,
    extra: &[&str],
) -> ControllerProcess {
    start_controller_with_env(tb, namespace, release, release_ns, extra, &[])
}

/// As `start_controller_with`, with more environment (e.g. another S3's credentials).
pub fn start_controller_with_env(
    tb: &Testbed,
    namespace: &str,
    release: &str,
    release_ns: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> ControllerProcess {
    let controller_sa = format!("{release}-sdfleet");
    let kubeconfig = impersonating_kubeconfig(tb, release_ns, &controller_sa);
    let gateway_role = format!("{controller_sa}-gateway");
    let mut args = vec![
        "--agent-namespace",
        release_ns,
        "--gateway-cluster-role",
        &gateway_role,
    ];
    args.extend_from_slice(extra);
    let mut env = env.to_vec();
    env.push(("KUBECONFIG", kubeconfig.to_str().unwrap()));
    ControllerProcess::start_with_env(tb, namespace, &args, &env)
}

/// The store volume of fleet `sdxl`'s gateway (the testbed has no provisioner).
pub async fn create_gateway_store(client: &Client, namespace: &str) {
    let pv_name = format!("{namespace}-gateway-store");
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                 "hostPath": {"path": format!("/tmp/{pv_name}")},
                 "claimRef": {"namespace": namespace, "name": "sdxl-gateway-store"}},
    }))
    .unwrap();
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
}

/// Stops the fakes' mapping when dropped.
pub struct Bridge(Arc<AtomicBool>);

impl Drop for Bridge {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Gives each pod of fleet `sdxl`, once it has an address, a fake ComfyUI of its own (a
/// new pod is a fresh ComfyUI), mapped in the gateway's `--endpoint-map-file`.
/// Bounded: 30 minutes and 200 pods at most. Each fake has `models`.
pub fn bridge(
    client: Client,
    namespace: String,
    output_dir: PathBuf,
    file: PathBuf,
    models: Vec<String>,
) -> Bridge {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    tokio::spawn(async move {
        let pods: Api<Pod> = Api::namespaced(client, &namespace);
        let mut fakes: BTreeMap<String, FakeComfy> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(1800);
        while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline && fakes.len() < 200 {
            if let Ok(list) = pods.list(&ListParams::default().labels(POD_SELECTOR)).await {
                for pod in &list.items {
                    let name = pod.name_any();
                    let has_ip = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.as_ref())
                        .is_some();
                    if has_ip && !fakes.contains_key(&name) {
                        let config = FakeConfig {
                            step_time: Duration::from_millis(200),
                            switch_penalty: Duration::ZERO,
                            models: models.clone(),
                            output_dir: output_dir.clone(),
                        };
                        fakes.insert(name.clone(), FakeComfy::start(&name, config).await);
                    }
                }
                let text: String = fakes
                    .iter()
                    .map(|(pod, fake)| format!("{pod}={}\n", fake.addr))
                    .collect();
                let tmp = file.with_extension("tmp");
                if std::fs::write(&tmp, text).is_ok() {
                    let _ = std::fs::rename(&tmp, &file);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Bridge(stop)
}

/// The args of fleet `sdxl`'s rendered gateway Deployment.
pub async fn rendered_gateway_args(client: &Client, namespace: &str) -> Vec<String> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let d = eventually(
        "the gateway's Deployment",
        Duration::from_secs(180),
        || async { deployments.get("sdxl-gateway").await.ok() },
    )
    .await;
    d.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap()
}

/// Fleet `sdxl`'s gateway with its rendered args, as its ServiceAccount, in front of a
/// fake for each pod; serving once it has listed the fleet's pods.
pub async fn start_rendered_gateway(
    tb: &Testbed,
    client: &Client,
    namespace: &str,
) -> (GatewayProcess, Bridge) {
    start_rendered_gateway_serving(tb, client, namespace, vec![format!("checkpoints/{CKPT}")]).await
}

/// As `start_rendered_gateway`, with fakes that have `models`.
pub async fn start_rendered_gateway_serving(
    tb: &Testbed,
    client: &Client,
    namespace: &str,
    models: Vec<String>,
) -> (GatewayProcess, Bridge) {
    let rendered = rendered_gateway_args(client, namespace).await;
    let work = std::env::temp_dir().join(format!("fleet-{namespace}"));
    std::fs::create_dir_all(&work).unwrap();
    let map_file = work.join("endpoints");
    std::fs::write(&map_file, "").unwrap();
    let bridge = bridge(
        client.clone(),
        namespace.to_string(),
        work.join("output"),
        map_file.clone(),
        models,
    );
    let mut args = local_args(&rendered, namespace, &work, tb);
    args.extend(["--endpoint-map-file".into(), map_file.display().to_string()]);
    let as_gateway = impersonating_kubeconfig(tb, namespace, "sdxl-gateway");
    let gateway = GatewayProcess::start_as(tb, args, &as_gateway);
    eventually("the gateway serving", Duration::from_secs(60), || async {
        gateway.metric("sdfleet_gateway_ready_pods").await
    })
    .await;
    (gateway, bridge)
}

/// Nodes of a NodePool that are not being deleted.
pub async fn nodes_of_pool(client: &Client, pool: &str) -> usize {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .list(&ListParams::default().labels(&format!("karpenter.sh/nodepool={pool}")))
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|n| n.metadata.deletion_timestamp.is_none())
                .count()
        })
        .unwrap_or(0)
}
