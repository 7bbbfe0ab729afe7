//! The shape users install, as pods on the testbed's real node (a kubelet with
//! containerd, Node authorization and NodeRestriction on): the Helm chart with the images
//! `scripts/image.sh` builds; the controller in its pod under the chart's ServiceAccount;
//! a fleet with a ModelSet on moto and a gateway; the node agent's pod, with its init
//! container and hostPath, syncing the models under its own bound token and lifting the
//! startup taint; ComfyUI (the protocol double's image) with the models mounted
//! read-only; the real endpoints controller listing it; the gateway's pod dispatching to
//! its pod IP; a job through the gateway's Service with its output in S3; SIGTERM to the
//! gateway's PID 1; and the fleet's deletion taking everything away.
//!
//! Nothing here runs as a host process under a borrowed identity: every request the
//! operator makes comes from a pod's own token.
//!
//! The real node plays the fleet's Karpenter node: the test gives it the NodePool's and
//! ModelSet's labels and the startup taint, as Karpenter would at launch (Karpenter's
//! kwok provider makes only simulated nodes). ComfyUI's replicas go from 0 to 1 once
//! the models are there, so the pod lands on the real node rather than waiting for
//! Karpenter to add a simulated one.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use sdfleet::crd::ComfyUIDeployment;
use serde_json::json;
use support::gateway::{ApiClient, sdxl_workflow};
use support::*;

const WAIT: Duration = Duration::from_secs(180);
const CKPT: &str = "sd_xl_base_1.0.safetensors";
/// Namespaces whose pods get moto's endpoint and credentials from the testbed's stand-in
/// for EKS Pod Identity (tests/testbed/node.sh).
const POD_IDENTITY: (&str, &str) = ("testbed.sdfleet.io/pod-identity", "moto");

/// The real node, given to the fleet for the test and handed back as it was on drop.
struct RealNode {
    name: String,
    /// Its taints as the testbed registers it, put back on drop.
    testbed_taints: serde_json::Value,
    labels: Vec<String>,
    annotations: Vec<String>,
    client: Client,
}

impl RealNode {
    /// What Karpenter puts on a node it launches for the fleet's NodePool: the template's
    /// labels, taints and startup taints; the testbed's own taint goes.
    async fn give_to(client: &Client, tb: &Testbed, pool: &str) -> RealNode {
        let pools: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &ApiResource::from_gvk(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodePool")),
        );
        let template = eventually(&format!("NodePool {pool}"), WAIT, || async {
            Some(pools.get(pool).await.ok()?.data["spec"]["template"].clone())
        })
        .await;
        // Karpenter adds the pool's own label to the template's.
        let mut labels = template["metadata"]["labels"].clone();
        labels["karpenter.sh/nodepool"] = json!(pool);
        let mut taints = template["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        taints.extend(
            template["spec"]["startupTaints"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        let node = RealNode {
            name: tb.var("SDFLEET_TESTBED_NODE_NAME").to_string(),
            testbed_taints: testbed_taints(tb),
            labels: labels.as_object().unwrap().keys().cloned().collect(),
            annotations: template["metadata"]["annotations"]
                .as_object()
                .map(|a| a.keys().cloned().collect())
                .unwrap_or_default(),
            client: client.clone(),
        };
        let annotations = template["metadata"]["annotations"].clone();
        let patch = json!({"metadata": {"labels": labels, "annotations": annotations},
            "spec": {"taints": taints}});
        node.api()
            .patch(&node.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
        node
    }

    fn api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }
}

/// The node as the testbed registers it: a GPU node that only tests that ask may use.
fn testbed_taints(tb: &Testbed) -> serde_json::Value {
    json!([
        {"key": tb.var("SDFLEET_TESTBED_NODE_TAINT"), "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "effect": "NoSchedule"},
    ])
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let (api, name) = (self.api(), self.name.clone());
        let labels: serde_json::Map<String, serde_json::Value> = self
            .labels
            .iter()
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect();
        let annotations: serde_json::Map<String, serde_json::Value> = self
            .annotations
            .iter()
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect();
        let patch = json!({
            "metadata": {"labels": labels, "annotations": annotations},
            "spec": {"taints": self.testbed_taints},
        });
        // Drop runs outside the test's runtime when it panics: a runtime of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let _ = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await;
            })
        })
        .join();
    }
}

/// The Helm release, uninstalled on drop (its controller pod must not outlive the test).
struct Release {
    tb: &'static Testbed,
    name: String,
    namespace: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let wait = ["--wait", "--timeout", "60s"];
        let _ = support::helm_uninstall(self.tb, &self.name, &self.namespace, &wait);
    }
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both images, built by the script users run, imported into the real node's containerd.
fn import_images(tb: &Testbed) {
    run(
        std::process::Command::new(repo_root().join("scripts/image.sh"))
            .arg("--import")
            .arg(tb.var("SDFLEET_TESTBED_CONTAINERD")),
    );
}

async fn labelled_namespace(client: &Client, prefix: &str) -> TestNamespace {
    let ns = TestNamespace::new(client, prefix).await;
    let patch = json!({"metadata": {"labels": {POD_IDENTITY.0: POD_IDENTITY.1}}});
    Api::<Namespace>::all(client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    ns
}

/// Deletes the test's FleetClass (cluster-scoped) however the test ends.
struct ClassGuard {
    api: Api<sdfleet::crd::FleetClass>,
    name: String,
}

impl Drop for ClassGuard {
    fn drop(&mut self) {
        let (api, name) = (self.api.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async { api.delete(&name, &DeleteParams::default()).await })
        })
        .join();
    }
}

/// A pod on `node` in `ns` whose csi.sdfleet.io volume names `model_set`, which the
/// node has none of for `ns`: the kubelet reports the plugin's refusal, and the pod
/// never runs. (Pod Security `restricted` shape, the testbed's pause image.)
async fn refused_models_mount(client: &Client, ns: &str, model_set: &str, node: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "foreign-models"},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65535, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "c", "image": "localhost/pause:testbed", "imagePullPolicy": "Never",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": true}],
            }],
            "volumes": [{"name": "models", "csi": {"driver": "csi.sdfleet.io", "readOnly": true,
                          "volumeAttributes": {"modelSet": model_set}}}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    let message = eventually("the kubelet reports the refused mount", WAIT, || async {
        let list = events
            .list(
                &ListParams::default()
                    .fields("involvedObject.name=foreign-models,reason=FailedMount"),
            )
            .await
            .ok()?;
        list.items.into_iter().find_map(|e| e.message)
    })
    .await;
    assert!(
        message.contains("this node has no models")
            && message.contains(&format!("{ns}/{model_set}")),
        "{message}"
    );
    let phase = pods
        .get("foreign-models")
        .await
        .unwrap()
        .status
        .unwrap()
        .phase;
    assert_eq!(
        phase.as_deref(),
        Some("Pending"),
        "{ns}/{model_set}: {message}"
    );
    pods.delete("foreign-models", &DeleteParams::default())
        .await
        .unwrap();
}

/// The pod of `selector` in `ns`, once Running and Ready on `node`.
/// Submits a job through the Service until one is taken (until kube-proxy has the
/// Service's endpoints, a connection is refused), and waits until it ends.
async fn first_job(api: &ApiClient, what: &str) -> serde_json::Value {
    let job = eventually(what, WAIT, || async {
        let resp = api
            .post("/api/v2/jobs")
            .json(&json!({"prompt": sdxl_workflow(CKPT, 2)}))
            .send()
            .await
            .ok()?;
        let code = resp.status().as_u16();
        let job: serde_json::Value = resp.json().await.ok()?;
        (code == 201).then_some(job)
    })
    .await;
    api.wait_final(job["id"].as_str().unwrap(), Duration::from_secs(120))
        .await
}

async fn running_pod(client: &Client, ns: &str, selector: &str, node: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("a ready pod {selector} in {ns} on {node}"),
        WAIT,
        || async {
            let list = pods
                .list(&ListParams::default().labels(selector))
                .await
                .ok()?;
            list.items.into_iter().find(|p| {
                let status = p.status.as_ref();
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                    && status.and_then(|s| s.phase.as_deref()) == Some("Running")
                    && status
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        },
    )
    .await
}

/// The host PID of a container of `pod`, from the node's containerd.
fn container_pid(tb: &Testbed, pod: &Pod) -> u32 {
    let id = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap();
    let id = id.trim_start_matches("containerd://");
    let tasks = run(std::process::Command::new("ctr").args([
        "--address",
        tb.var("SDFLEET_TESTBED_CONTAINERD"),
        "-n",
        "k8s.io",
        "tasks",
        "ls",
    ]));
    tasks
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no task {id} in:\n{tasks}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_installed_chart_serves_a_job_from_pods_on_the_real_node() {
    let tb = Testbed::get();
    let client = tb.client().await;
    install_crds(tb);
    import_images(tb);
    let node_name = tb.var("SDFLEET_TESTBED_NODE_NAME").to_string();
    // As registered, whatever a run stopped half-way left on it.
    Api::<Node>::all(client.clone())
        .patch(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": testbed_taints(tb)}})),
        )
        .await
        .unwrap();
    let system = labelled_namespace(&client, "e2e-system").await;
    let team = labelled_namespace(&client, "e2e-team").await;
    // The team's namespace enforces Pod Security `restricted`: its pods may have no
    // hostPath, so ComfyUI's models come through the csi.sdfleet.io volume.
    Api::<Namespace>::all(client.clone())
        .patch(
            &team.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await
        .unwrap();

    // The chart as users install it, with the images built here. The controller watches
    // the team's namespace only: the suite's other controllers own the rest. It runs on
    // the real node (the only node with a kubelet), tolerating the node's taints.
    let release = format!("e2e{}", unique_suffix());
    let tolerations = json!([
        {"key": tb.var("SDFLEET_TESTBED_NODE_TAINT"), "operator": "Exists", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]);
    let out = helm_install(
        tb,
        &release,
        &system.name,
        &[
            "--set",
            &format!(
                "replicaCount=1,image.repository=localhost/sdfleet,image.tag=dev,image.pullPolicy=Never,controller.watchNamespace={},controller.logJson=false",
                team.name
            ),
            "--set",
            "nodeSelector.sdfleet\\.io/testbed-role=real-gpu",
            // The CSI driver, with the testbed kubelet's root and the registrar's stand-in.
            "--set",
            &format!(
                "csi.enabled=true,csi.kubeletDir={},csi.registrar.image={},csi.registrar.pullPolicy=Never",
                tb.var("SDFLEET_TESTBED_KUBELET_DIR"),
                tb.var("SDFLEET_TESTBED_REGISTRAR_IMAGE")
            ),
            "--set-json",
            &format!("tolerations={tolerations}"),
        ],
    );
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _release = Release {
        tb,
        name: release.clone(),
        namespace: system.name.clone(),
    };
    let controller = running_pod(
        &client,
        &system.name,
        &format!("app.kubernetes.io/name=sdfleet,app.kubernetes.io/instance={release}"),
        &node_name,
    )
    .await;
    assert_eq!(
        controller
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .as_deref(),
        Some(format!("{release}-sdfleet").as_str()),
        "the controller runs under the chart's ServiceAccount"
    );

    // Models in S3 (moto), the outputs bucket, the API keys (hashes), the store volume.
    let s3 = s3_client(tb).await;
    let models = create_bucket(&s3, "e2e-models").await;
    let outputs = create_bucket(&s3, "e2e-outputs").await;
    let checkpoint = b"not really a checkpoint, but its bytes must arrive".to_vec();
    s3.put_object()
        .bucket(&models)
        .key(format!("checkpoints/{CKPT}"))
        .body(checkpoint.clone().into())
        .send()
        .await
        .unwrap();
    // More models than the ModelSet's status holds: the rest of the catalog is in
    // ConfigMaps beside it, which the gateway reads under its own role.
    futures::future::join_all(
        (0..sdfleet::controller::modelset::catalog_maps::MODELS_IN_STATUS).map(|i| {
            s3.put_object()
                .bucket(&models)
                .key(format!("loras/lora_{i:03}.safetensors"))
                .body(b"lora".to_vec().into())
                .send()
        }),
    )
    .await
    .into_iter()
    .for_each(|r| {
        r.unwrap();
    });
    let key = format!("key-{}", unique_suffix());
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sdxl-keys"},
        "stringData": {"ci": sdfleet::gateway::auth::hash_key(&key)},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &team.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // The store's volume: what a provisioner would give (the testbed has none), owned by
    // the gateway's user as a fresh EBS volume with fsGroup would be.
    let store_dir = std::env::temp_dir().join(format!("sdfleet-e2e-store-{}", team.name));
    std::fs::create_dir_all(&store_dir).unwrap();
    std::os::unix::fs::chown(&store_dir, Some(65532), Some(65532)).unwrap();
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": format!("{}-store", team.name)},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                 "hostPath": {"path": store_dir.to_str().unwrap()},
                 "claimRef": {"namespace": team.name, "name": "sdxl-gateway-store"}},
    }))
    .unwrap();
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();

    // The team's class: the testbed's default, for the team's namespace only, and its
    // pods' S3 volumes mounted with their own account's role (one per team), not the
    // S3 CSI driver's.
    let class_name = team_class(
        &client,
        &team.name,
        json!({
            "nodeClass": {"role": "KarpenterNodeRole-testbed"},
            "s3": {"allowedBuckets": ["*"],
                   "volumeServiceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/comfy-volumes-{namespace}"}},
            "ingress": {"allowedSchemes": ["internal"]},
        }),
    )
    .await;
    let _class = ClassGuard {
        api: Api::all(client.clone()),
        name: class_name.clone(),
    };
    let model_set = json!({
        "apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
        "metadata": {"name": "sdxl-models"},
        "spec": {"className": class_name,
                 "source": {"s3": {"bucket": models, "region": "us-west-2"}},
                 "sync": {"method": "Agent", "pollInterval": "10s"}},
    });
    let modelsets: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &team.name,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("sdfleet.io", "v1alpha1", "ModelSet")),
    );
    modelsets
        .patch(
            "sdxl-models",
            &PatchParams::apply("e2e-user").force(),
            &Patch::Apply(model_set),
        )
        .await
        .unwrap();
    // The testbed has one node with a kubelet: the gateway shares the fleet's GPU node,
    // so it tolerates that node's tenant taint, its own namespace's (the only one a
    // fleet may tolerate).
    let mut gateway_tolerations = tolerations.clone();
    gateway_tolerations.as_array_mut().unwrap().push(json!(
        {"key": sdfleet::names::TENANT_TAINT, "operator": "Equal", "value": team.name, "effect": "NoSchedule"}
    ));
    let fleet = |replicas: i32| {
        json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "metadata": {"name": "sdxl"},
            "spec": {
                "className": class_name,
                "image": "localhost/comfyui-double:dev",
                "replicas": replicas,
                // Pod Security `restricted` asks for a non-root user.
                "runAsUser": 65532,
                "modelSet": "sdxl-models",
                "gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 1},
                "storage": {"outputs": {"bucket": outputs, "prefix": "out/"}},
                "ingress": {"enabled": false},
                "gateway": {
                    "apiKeysSecret": "sdxl-keys",
                    "nodeSelector": {"sdfleet.io/testbed-role": "real-gpu"},
                    "tolerations": gateway_tolerations,
                },
            },
        })
    };
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &team.name);
    let apply_fleet = |replicas: i32| {
        let cuds = cuds.clone();
        let manifest = fleet(replicas);
        async move {
            cuds.patch(
                "sdxl",
                &PatchParams::apply("e2e-user").force(),
                &Patch::Apply(manifest),
            )
            .await
            .unwrap();
        }
    };
    apply_fleet(0).await;
    let pool = sdfleet::names::FleetNames::new(&team.name, "sdxl").nodepool();
    let node = RealNode::give_to(&client, tb, &pool).await;

    // The agent's pod, on the real node under its own token: its init container prepares
    // the models directory, it syncs the checkpoint and lifts the startup taint.
    let agent = running_pod(
        &client,
        &system.name,
        &format!(
            "sdfleet.io/owner-namespace={},sdfleet.io/owner-name=sdxl",
            team.name
        ),
        &node_name,
    )
    .await;
    assert_eq!(
        agent.spec.as_ref().unwrap().service_account_name.as_deref(),
        Some("sdfleet-agent")
    );
    eventually("the agent lifts the startup taint", WAIT, || async {
        let n = node.api().get(&node_name).await.ok()?;
        let taints = n.spec?.taints.unwrap_or_default();
        (!taints
            .iter()
            .any(|t| t.key == "sdfleet.io/models-not-ready"))
        .then_some(())
    })
    .await;
    let synced = std::path::Path::new("/mnt/k8s-disks/0/sdfleet/models")
        .join(&team.name)
        .join("sdxl-models/checkpoints")
        .join(CKPT);
    assert_eq!(
        std::fs::read(&synced).unwrap(),
        checkpoint,
        "the model on the node's disk"
    );
    let meta = std::fs::metadata(&synced).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        65532,
        "written by the agent's unprivileged user"
    );

    // The chart's CSI node plugin on the node (privileged, no API token), registered
    // with the kubelet by the registrar sidecar.
    let csi_pod = running_pod(
        &client,
        &system.name,
        "app.kubernetes.io/name=sdfleet-csi-node",
        &node_name,
    )
    .await;
    assert_eq!(
        csi_pod
            .spec
            .as_ref()
            .unwrap()
            .automount_service_account_token,
        Some(false)
    );
    eventually("the kubelet lists csi.sdfleet.io", WAIT, || async {
        let csinode = Api::<k8s_openapi::api::storage::v1::CSINode>::all(client.clone())
            .get(&node_name)
            .await
            .ok()?;
        csinode
            .spec
            .drivers
            .iter()
            .any(|d| d.name == "csi.sdfleet.io")
            .then_some(())
    })
    .await;

    // ComfyUI's pod on the real node; the endpoints controller lists its pod IP.
    apply_fleet(1).await;
    let comfy = running_pod(
        &client,
        &team.name,
        "app.kubernetes.io/name=comfyui,app.kubernetes.io/instance=sdxl",
        &node_name,
    )
    .await;
    let pod_ip = comfy.status.as_ref().unwrap().pod_ip.clone().unwrap();
    // Its models came through the CSI driver: the volume is csi.sdfleet.io's, and the
    // kubelet's mount of it on the node is the ModelSet's directory, read-only. (The
    // double sees the checkpoint through it: the jobs below validate against it.)
    let models_volume = comfy
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "models")
        .cloned()
        .unwrap();
    assert!(models_volume.host_path.is_none());
    // Its outputs volume was mounted as its own account, the class's role for this team:
    // the kubelet gave the S3 driver that account's token (the testbed's driver records
    // whom it would assume the role as).
    assert_eq!(
        comfy.spec.as_ref().unwrap().service_account_name.as_deref(),
        Some("sdxl-comfyui")
    );
    let account =
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &team.name)
            .get("sdxl-comfyui")
            .await
            .unwrap();
    assert_eq!(
        account.annotations()["eks.amazonaws.com/role-arn"],
        format!("arn:aws:iam::123456789012:role/comfy-volumes-{}", team.name)
    );
    let handle = format!(
        "sdfleet-{}",
        sdfleet::names::FleetNames::new(&team.name, "sdxl").volume("outputs")
    );
    let identity = std::fs::read_to_string(
        std::path::Path::new(tb.var("SDFLEET_TESTBED_S3_VOLUMES"))
            .join(".identities")
            .join(&handle),
    )
    .unwrap();
    assert_eq!(
        identity.trim(),
        format!("system:serviceaccount:{}:sdxl-comfyui", team.name)
    );
    assert_eq!(models_volume.csi.unwrap().driver, "csi.sdfleet.io");
    let uid = comfy.metadata.uid.clone().unwrap();
    let mount_point = std::path::Path::new(tb.var("SDFLEET_TESTBED_KUBELET_DIR"))
        .join("pods")
        .join(&uid)
        .join("volumes/kubernetes.io~csi/models/mount");
    let (_, options) = mounts()
        .into_iter()
        .find(|(point, _)| *point == mount_point)
        .unwrap_or_else(|| panic!("no mount at {}", mount_point.display()));
    assert!(
        options.iter().any(|o| o == "ro"),
        "the models mount is read-only: {options:?}"
    );
    assert_eq!(
        std::fs::read(mount_point.join("checkpoints").join(CKPT)).unwrap(),
        checkpoint,
        "the pod's volume is the ModelSet's directory"
    );
    // Another team's pod that names this team's ModelSet, on this very node: the kubelet
    // says the pod's namespace, so the plugin looks under that namespace's directory,
    // finds nothing, and the pod never starts. So does this team's pod naming a ModelSet
    // the node has not got.
    let other = TestNamespace::new(&client, "e2e-other").await;
    for (ns, model_set) in [
        (other.name.as_str(), "sdxl-models"),
        (team.name.as_str(), "not-here"),
    ] {
        refused_models_mount(&client, ns, model_set, &node_name).await;
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &team.name);
    eventually("the fleet's EndpointSlice lists the pod", WAIT, || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=sdxl"))
            .await
            .ok()?;
        list.items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .any(|e| e.addresses.contains(&pod_ip))
            .then_some(())
    })
    .await;

    // The gateway's pod; a job through its Service (kube-proxy's rules on this host).
    let gateway = running_pod(
        &client,
        &team.name,
        "app.kubernetes.io/name=sdfleet-gateway,app.kubernetes.io/instance=sdxl",
        &node_name,
    )
    .await;
    assert_eq!(
        gateway
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .as_deref(),
        Some("sdxl-gateway")
    );
    let service = Api::<Service>::namespaced(client.clone(), &team.name)
        .get("sdxl-gateway")
        .await
        .unwrap();
    let cluster_ip = service.spec.unwrap().cluster_ip.unwrap();
    let api = ApiClient::new(&format!("http://{cluster_ip}"), &key);
    let done = first_job(&api, "the gateway takes a job").await;
    let id = done["id"].as_str().unwrap().to_string();
    assert_eq!(done["state"], "succeeded", "{done}");
    let url = done["outputs"][0]["url"].as_str().unwrap();
    let fetched = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200, "the output's presigned URL: {url}");
    assert!(!fetched.bytes().await.unwrap().is_empty());
    println!("job {id} on pod {pod_ip}: output at {url}");

    // SIGTERM to the gateway's PID 1, as the kubelet sends at a rollout: it exits by
    // itself (status 0) and the kubelet starts it again. A process that ignored it would
    // still be running.
    let pid = container_pid(tb, &gateway);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &team.name);
    let gateway_name = gateway.name_any();
    let exit = eventually(
        "the gateway exits on SIGTERM",
        Duration::from_secs(25),
        || async {
            let p = pods.get(&gateway_name).await.ok()?;
            let cs = p.status?.container_statuses?.into_iter().next()?;
            let terminated = cs.last_state?.terminated?;
            Some(terminated.exit_code)
        },
    )
    .await;
    assert_eq!(exit, 0, "the gateway exits cleanly on SIGTERM");

    // Three gateway replicas on PostgreSQL (the testbed's, as pods reach it), as the
    // controller renders them under the chart's identity and policy: every replica
    // ready (they reach the store), a PodDisruptionBudget, and a job through the Service,
    // whichever replica takes it.
    let db: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sdxl-jobs-db"},
        "stringData": {"url": tb.var("SDFLEET_TESTBED_POD_POSTGRES_URL")},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &team.name)
        .create(&PostParams::default(), &db)
        .await
        .unwrap();
    let mut replicated = fleet(1);
    replicated["spec"]["gateway"]["replicas"] = json!(3);
    replicated["spec"]["gateway"]["store"] = json!({"postgres": {"secretName": "sdxl-jobs-db"}});
    cuds.patch(
        "sdxl",
        &PatchParams::apply("e2e-user").force(),
        &Patch::Apply(replicated),
    )
    .await
    .unwrap();
    // The switch is a rollout: done when the Deployment has three new replicas ready and
    // no old one (the embedded store's pod serves until then, from its own file).
    let deployments = Api::<Deployment>::namespaced(client.clone(), &team.name);
    let rolled_out = |marker: &'static str| {
        let deployments = deployments.clone();
        async move {
            eventually("the gateway's rollout to finish", WAIT, || async {
                let d = deployments.get("sdxl-gateway").await.ok()?;
                let spec = d.spec.as_ref()?.template.spec.as_ref()?;
                let args = serde_json::to_string(&spec.containers[0].args).ok()?;
                let s = d.status?;
                let done = args.contains(marker)
                    && s.observed_generation >= d.metadata.generation
                    && s.updated_replicas == Some(3)
                    && s.ready_replicas == Some(3)
                    && s.replicas == Some(3);
                done.then_some(())
            })
            .await
        }
    };
    rolled_out("--postgres-url-file").await;
    let budget = Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(
        client.clone(),
        &team.name,
    )
    .get("sdxl-gateway")
    .await
    .expect("the gateway's PodDisruptionBudget");
    assert_eq!(
        budget.spec.unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let done = first_job(&api, "a replica takes a job").await;
    assert_eq!(done["state"], "succeeded", "{done}");

    // A rolling update of the gateway (a spec change: every replica replaced, one at a
    // time, by the Deployment controller) under a steady stream of jobs through the
    // Service: every request answered without a 5xx, every accepted job run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut accepted, mut failures) = (Vec::new(), Vec::new());
            for n in 0..5_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let sent = api
                    .post("/api/v2/jobs")
                    .header("Idempotency-Key", format!("rollout-{n}"))
                    .json(&json!({"prompt": sdxl_workflow(CKPT, 1)}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 201 => {
                        let job: serde_json::Value = r.json().await.unwrap();
                        accepted.push(job["id"].as_str().unwrap().to_string());
                    }
                    Ok(r) => failures.push(format!("submit {n}: {}", r.status())),
                    Err(e) => failures.push(format!("submit {n}: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (accepted, failures)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rolled = fleet(1);
    rolled["spec"]["gateway"]["replicas"] = json!(3);
    rolled["spec"]["gateway"]["store"] = json!({"postgres": {"secretName": "sdxl-jobs-db"}});
    rolled["spec"]["gateway"]["queueCap"] = json!(150);
    cuds.patch(
        "sdxl",
        &PatchParams::apply("e2e-user").force(),
        &Patch::Apply(rolled),
    )
    .await
    .unwrap();
    rolled_out("\"150\"").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (accepted, failures) = stream.await.unwrap();
    println!(
        "rollout: {} jobs accepted, {} requests failed",
        accepted.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the rollout: {failures:#?}"
    );
    assert!(accepted.len() >= 20, "too few requests to show anything");
    for id in &accepted {
        let job = api.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }

    // Deleting the fleet removes everything it made, on the node too.
    cuds.delete("sdxl", &DeleteParams::default()).await.unwrap();
    eventually("the fleet and its children gone", WAIT, || async {
        let gone_fleet = cuds.get_opt("sdxl").await.ok()?.is_none();
        let deployments = Api::<Deployment>::namespaced(client.clone(), &team.name)
            .list(&ListParams::default())
            .await
            .ok()?;
        let agents = Api::<DaemonSet>::namespaced(client.clone(), &system.name)
            .list(
                &ListParams::default().labels(&format!("sdfleet.io/owner-namespace={}", team.name)),
            )
            .await
            .ok()?;
        let on_node = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
            .await
            .ok()?;
        (gone_fleet
            && deployments.items.is_empty()
            && agents.items.is_empty()
            && on_node.items.is_empty())
        .then_some(())
    })
    .await;
    // The kubelet had the plugin unpublish ComfyUI's models: no mount left, no directory.
    assert!(
        !mounts().iter().any(|(point, _)| *point == mount_point),
        "the models mount outlived its pod"
    );
    assert!(!mount_point.exists());
    drop(node);
}
