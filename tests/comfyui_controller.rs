//! The real controller (the `sdfleet` binary) on the testbed: one ComfyUIDeployment
//! becomes a running GPU fleet on Karpenter-provisioned (kwok) nodes; updates, drift,
//! deletion, missing dependencies, restarts and steady state behave as users rely on.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::ApiResource;
use kube::{Client, ResourceExt};
use sdfleet::crd::ComfyUIDeployment;
use sdfleet::crd::comfyui::ComfyUIDeploymentStatus;
use serde_json::{Value, json};
use support::{ControllerProcess, TestNamespace, Testbed, eventually, install_crds};

const WAIT: Duration = Duration::from_secs(180);

fn cud_manifest(name: &str, spec_extra: Value) -> Value {
    let mut spec = json!({
        "image": "comfyui:test",
        "gpu": {"instanceTypes": ["g5.2xlarge", "g4dn.2xlarge"], "limit": 8},
        "disruption": {"consolidateAfter": "5s"},
        "storage": {"outputs": {"bucket": "comfyui-outputs-test", "prefix": "out/"}},
    });
    for (k, v) in spec_extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment", "metadata": {"name": name}, "spec": spec})
}

fn ar(group: &str, version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(group, version, kind))
}

struct Fleet {
    client: Client,
    ns: String,
    name: String,
    cuds: Api<ComfyUIDeployment>,
    nodepools: Api<DynamicObject>,
    nodeclasses: Api<DynamicObject>,
}

impl Fleet {
    fn new(client: &Client, ns: &str, name: &str) -> Fleet {
        Fleet {
            client: client.clone(),
            ns: ns.into(),
            name: name.into(),
            cuds: Api::namespaced(client.clone(), ns),
            nodepools: Api::all_with(client.clone(), &ar("karpenter.sh", "v1", "NodePool")),
            nodeclasses: Api::all_with(
                client.clone(),
                &ar("karpenter.kwok.sh", "v1alpha1", "KWOKNodeClass"),
            ),
        }
    }

    fn pool_name(&self) -> String {
        format!("{}.{}", self.ns, self.name)
    }

    async fn apply(&self, manifest: &Value) {
        // The test is the user: its own field manager, as kubectl apply would be.
        self.cuds
            .patch(
                &self.name,
                &PatchParams::apply("test-user").force(),
                &Patch::Apply(manifest),
            )
            .await
            .unwrap();
    }

    async fn status(&self) -> Option<ComfyUIDeploymentStatus> {
        self.cuds.get_opt(&self.name).await.ok()??.status
    }

    async fn condition(&self, type_: &str) -> Option<(String, String, String)> {
        let status = self.status().await?;
        let c = status.conditions.into_iter().find(|c| c.type_ == type_)?;
        Some((c.status, c.reason, c.message))
    }

    async fn wait_ready(&self, replicas: i32) -> ComfyUIDeploymentStatus {
        eventually(
            &format!(
                "{}/{} Ready with {replicas} ready replicas",
                self.ns, self.name
            ),
            WAIT,
            || async {
                let status = self.status().await?;
                let ready = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                (ready && status.ready_replicas == replicas && status.observed_generation.is_some())
                    .then_some(status)
            },
        )
        .await
    }

    /// Names of every object of each child kind labelled as this fleet's.
    async fn children(&self) -> BTreeSet<String> {
        let selector = format!(
            "app.kubernetes.io/managed-by=sdfleet,sdfleet.io/owner-namespace={},sdfleet.io/owner-name={}",
            self.ns, self.name
        );
        let lp = ListParams::default().labels(&selector);
        let mut out = BTreeSet::new();
        let c = &self.client;
        fn named(kind: &'static str, names: Vec<String>) -> impl Iterator<Item = String> {
            names.into_iter().map(move |n| format!("{kind}/{n}"))
        }
        let live = |o: &DynamicObject| o.metadata.deletion_timestamp.is_none();
        out.extend(named(
            "NodePool",
            self.nodepools
                .list(&lp)
                .await
                .unwrap()
                .items
                .iter()
                .filter(|o| live(o))
                .map(|o| o.name_any())
                .collect(),
        ));
        out.extend(named(
            "KWOKNodeClass",
            self.nodeclasses
                .list(&lp)
                .await
                .unwrap()
                .items
                .iter()
                .filter(|o| live(o))
                .map(|o| o.name_any())
                .collect(),
        ));
        out.extend(named(
            "Deployment",
            names(
                Api::<Deployment>::namespaced(c.clone(), &self.ns)
                    .list(&lp)
                    .await
                    .unwrap()
                    .items,
            ),
        ));
        out.extend(named(
            "Service",
            names(
                Api::<Service>::namespaced(c.clone(), &self.ns)
                    .list(&lp)
                    .await
                    .unwrap()
                    .items,
            ),
        ));
        out.extend(named(
            "Ingress",
            names(
                Api::<Ingress>::namespaced(c.clone(), &self.ns)
                    .list(&lp)
                    .await
                    .unwrap()
                    .items,
            ),
        ));
        out.extend(named(
            "PersistentVolumeClaim",
            names(
                Api::<PersistentVolumeClaim>::namespaced(c.clone(), &self.ns)
                    .list(&lp)
                    .await
                    .unwrap()
                    .items,
            ),
        ));
        out.extend(named(
            "PersistentVolume",
            names(
                Api::<PersistentVolume>::all(c.clone())
                    .list(&lp)
                    .await
                    .unwrap()
                    .items,
            ),
        ));
        out
    }
}

fn names<K: kube::Resource>(items: Vec<K>) -> Vec<String> {
    items
        .iter()
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect()
}

fn all_children(ns: &str, name: &str, with_ingress: bool, with_outputs: bool) -> BTreeSet<String> {
    let mut s: BTreeSet<String> = [
        format!("NodePool/{ns}.{name}"),
        format!("KWOKNodeClass/{ns}.{name}"),
        format!("Deployment/{name}"),
        format!("Service/{name}"),
    ]
    .into();
    if with_ingress {
        s.insert(format!("Ingress/{name}"));
    }
    if with_outputs {
        s.insert(format!("PersistentVolumeClaim/{name}-outputs"));
        s.insert(format!("PersistentVolume/{ns}.{name}-outputs"));
    }
    s
}

#[tokio::test]
async fn fleet_lifecycle_create_update_drift_delete() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "cud-life").await;
    let mut controller = ControllerProcess::start(tb, &ns.name, &[]);
    lifecycle(tb, &client, &ns, &mut controller).await;
}

/// The same scenario with the controller holding only the Helm chart's RBAC: it acts as
/// the chart's ServiceAccount (impersonation) and elects itself leader on the chart's Lease.
#[tokio::test]
async fn fleet_lifecycle_under_the_charts_rbac() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let (release, release_ns) = support::install_release(tb, "rbac");
    let sa = format!("{release}-sdfleet");
    let as_sa = format!("system:serviceaccount:{release_ns}:{sa}");
    for verb in ["get", "list", "watch"] {
        let out = tb
            .kubectl()
            .args([
                "auth",
                "can-i",
                verb,
                "secrets",
                "--all-namespaces",
                "--as",
                &as_sa,
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "the chart's ServiceAccount can {verb} Secrets"
        );
    }
    let out = tb
        .kubectl()
        .args([
            "auth",
            "can-i",
            "patch",
            "nodepools.karpenter.sh",
            "--as",
            &as_sa,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");

    let ns = TestNamespace::new(&client, "cud-rbac").await;
    let kubeconfig = support::impersonating_kubeconfig(tb, &release_ns, &sa);
    let mut controller = ControllerProcess::start_with_env(
        tb,
        &ns.name,
        // As in the chart's pods, whose POD_NAMESPACE is the release namespace.
        &[
            "--leader-elect",
            "--leader-election-namespace",
            &release_ns,
            "--agent-namespace",
            &release_ns,
        ],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("POD_NAME", "rbac-controller"),
        ],
    );
    lifecycle(tb, &client, &ns, &mut controller).await;
    drop(controller);
    support::uninstall_release(tb, &release, &release_ns);
}

async fn lifecycle(
    tb: &Testbed,
    client: &Client,
    ns: &TestNamespace,
    controller: &mut ControllerProcess,
) {
    let client = client.clone();
    let fleet = Fleet::new(&client, &ns.name, "sdxl");

    // Create: every child, a GPU node of a listed type, pods running on it, Ready.
    fleet.apply(&cud_manifest("sdxl", json!({}))).await;
    let status = fleet.wait_ready(1).await;
    assert_eq!(status.replicas, 1);
    assert_eq!(
        status.node_pool.as_deref(),
        Some(fleet.pool_name().as_str())
    );
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=sdxl,app.kubernetes.io/name=comfyui")
    );
    assert_eq!(
        fleet.children().await,
        all_children(&ns.name, "sdxl", true, true)
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let pool_nodes = nodes
        .list(
            &ListParams::default().labels(&format!("karpenter.sh/nodepool={}", fleet.pool_name())),
        )
        .await
        .unwrap();
    assert!(!pool_nodes.items.is_empty());
    for node in &pool_nodes.items {
        let t = &node.labels()["node.kubernetes.io/instance-type"];
        assert!(["g5.2xlarge", "g4dn.2xlarge"].contains(&t.as_str()), "{t}");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let running = pods
        .list(&ListParams::default().labels("app.kubernetes.io/instance=sdxl"))
        .await
        .unwrap();
    let pod = running
        .items
        .iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .expect("a running pod");
    let pod_node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
    assert!(pool_nodes.items.iter().any(|n| n.name_any() == pod_node));
    let pv: PersistentVolume = Api::all(client.clone())
        .get(&format!("{}.sdxl-outputs", ns.name))
        .await
        .unwrap();
    assert_eq!(
        pv.spec
            .as_ref()
            .unwrap()
            .persistent_volume_reclaim_policy
            .as_deref(),
        Some("Retain")
    );
    let pvc: PersistentVolumeClaim = Api::namespaced(client.clone(), &ns.name)
        .get("sdxl-outputs")
        .await
        .unwrap();
    assert_eq!(pvc.status.unwrap().phase.as_deref(), Some("Bound"));
    let (s, _, _) = fleet.condition("NodePoolReady").await.unwrap();
    assert_eq!(s, "True");

    // Update: instance types reach the NodePool.
    fleet
        .apply(&cud_manifest(
            "sdxl",
            json!({"gpu": {"instanceTypes": ["g6.2xlarge"], "limit": 8}}),
        ))
        .await;
    eventually("the NodePool to list g6.2xlarge only", WAIT, || async {
        let pool = fleet.nodepools.get(&fleet.pool_name()).await.ok()?;
        (pool.data["spec"]["template"]["spec"]["requirements"][0]["values"]
            == json!(["g6.2xlarge"]))
        .then_some(())
    })
    .await;

    // Scale through the scale subresource, as kubectl scale and an HPA do.
    let out = tb
        .kubectl()
        .args(["-n", &ns.name, "scale", "cud/sdxl", "--replicas", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually("the Deployment to have 3 replicas", WAIT, || async {
        (deployments.get("sdxl").await.ok()?.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    fleet.wait_ready(3).await;

    // Disabling ingress and removing outputs prune those children (S3 untouched: Retain).
    let mut manifest = cud_manifest(
        "sdxl",
        json!({"gpu": {"instanceTypes": ["g6.2xlarge"], "limit": 8}, "ingress": {"enabled": false}}),
    );
    manifest["spec"].as_object_mut().unwrap().remove("storage");
    manifest["spec"]["replicas"] = json!(3);
    fleet.apply(&manifest).await;
    eventually("Ingress, PVC and PV to be pruned", WAIT, || async {
        (fleet.children().await == all_children(&ns.name, "sdxl", false, false)).then_some(())
    })
    .await;

    // Drift: a NodePool deleted by hand comes back.
    fleet
        .nodepools
        .delete(&fleet.pool_name(), &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted NodePool to be recreated", WAIT, || async {
        let pool = fleet.nodepools.get_opt(&fleet.pool_name()).await.ok()??;
        pool.metadata.deletion_timestamp.is_none().then_some(())
    })
    .await;

    // Delete: every child goes, cluster-scoped ones included.
    fleet
        .cuds
        .delete("sdxl", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the resource and all its children to be gone",
        WAIT,
        || async {
            let gone = fleet.cuds.get_opt("sdxl").await.ok()?.is_none();
            (gone && fleet.children().await.is_empty()).then_some(())
        },
    )
    .await;
    assert!(controller.is_running());
}

#[tokio::test]
async fn missing_dependency_is_reported_and_controller_keeps_running() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "cud-preflight").await;
    let mut controller = ControllerProcess::start(tb, &ns.name, &[]);
    let fleet = Fleet::new(&client, &ns.name, "nginx-fleet");
    let class = format!("missing-{}", ns.name);
    fleet
        .apply(&cud_manifest(
            "nginx-fleet",
            json!({"ingress": {"className": class}}),
        ))
        .await;

    let (status, reason, message) = eventually("Ready=False MissingDependency", WAIT, || async {
        fleet
            .condition("Ready")
            .await
            .filter(|(s, r, _)| s == "False" && r == "MissingDependency")
    })
    .await;
    assert_eq!(status, "False");
    assert_eq!(reason, "MissingDependency");
    assert!(
        message.contains(&format!("IngressClass {class}")),
        "{message}"
    );
    assert!(
        message.contains("AWS Load Balancer Controller"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        controller.is_running(),
        "the controller must not exit on a missing dependency"
    );

    // Installing the dependency lets the fleet converge (retried with backoff).
    let classes: Api<IngressClass> = Api::all(client.clone());
    let ic: IngressClass = serde_json::from_value(
        json!({"metadata": {"name": class}, "spec": {"controller": "ingress.k8s.aws/alb"}}),
    )
    .unwrap();
    classes.create(&Default::default(), &ic).await.unwrap();
    fleet.wait_ready(1).await;
    fleet
        .cuds
        .delete("nginx-fleet", &DeleteParams::default())
        .await
        .unwrap();
    eventually("cleanup", WAIT, || async {
        fleet.children().await.is_empty().then_some(())
    })
    .await;
    classes
        .delete(&class, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn restart_mid_reconcile_converges_without_duplicates_or_orphans() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "cud-restart").await;
    let mut controller = ControllerProcess::start(tb, &ns.name, &[]);
    let fleet = Fleet::new(&client, &ns.name, "restart");
    fleet.apply(&cud_manifest("restart", json!({}))).await;
    // Kill as soon as the first children exist: the reconcile is mid-way.
    eventually("the first child to be created", WAIT, || async {
        (!fleet.children().await.is_empty()).then_some(())
    })
    .await;
    controller.restart_after_kill(tb);
    fleet.wait_ready(1).await;
    assert_eq!(
        fleet.children().await,
        all_children(&ns.name, "restart", true, true)
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let pool_nodes = nodes
        .list(
            &ListParams::default().labels(&format!("karpenter.sh/nodepool={}", fleet.pool_name())),
        )
        .await
        .unwrap();
    assert_eq!(
        pool_nodes.items.len(),
        1,
        "one pod needs exactly one GPU node"
    );

    fleet
        .cuds
        .delete("restart", &DeleteParams::default())
        .await
        .unwrap();
    eventually("cleanup", WAIT, || async {
        fleet.children().await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn steady_state_sends_no_writes() {
    const FLEETS: usize = 20;
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "cud-steady").await;
    // Every fleet is reconciled again several times while the test watches: steady
    // state means those reconciles write nothing.
    let controller = ControllerProcess::start(tb, &ns.name, &["--resync-seconds", "15"]);
    let fleets: Vec<Fleet> = (0..FLEETS)
        .map(|i| Fleet::new(&client, &ns.name, &format!("f{i}")))
        .collect();
    for f in &fleets {
        // Zero replicas: 20 fleets of GPU nodes are not the point here; all children still exist.
        f.apply(&cud_manifest(&f.name, json!({"replicas": 0})))
            .await;
    }
    for f in &fleets {
        f.wait_ready(0).await;
    }
    // Let in-flight status writes and events settle, then measure.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = controller
        .metric_sum("sdfleet_kube_writes_total")
        .await
        .expect("metrics");
    let reconciles_before = controller
        .metric_sum("sdfleet_reconciles_total")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = controller
        .metric_sum("sdfleet_kube_writes_total")
        .await
        .unwrap();
    let reconciles_after = controller
        .metric_sum("sdfleet_reconciles_total")
        .await
        .unwrap();
    assert!(
        before > 0.0,
        "the controller counted its writes while converging"
    );
    assert_eq!(
        after,
        before,
        "writes during 60 s of steady state ({} reconciles)",
        reconciles_after - reconciles_before
    );
    assert!(
        reconciles_after - reconciles_before >= 2.0 * FLEETS as f64,
        "each fleet was reconciled at least twice in 60 s ({} reconciles)",
        reconciles_after - reconciles_before
    );
    // Every fleet still has all its children (nothing was skipped that should exist).
    for f in fleets.iter().take(3) {
        assert_eq!(
            f.children().await,
            all_children(&ns.name, &f.name, true, true)
        );
    }
    for f in &fleets {
        f.cuds
            .delete(&f.name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for f in &fleets {
        eventually("cleanup", WAIT, || async {
            f.children().await.is_empty().then_some(())
        })
        .await;
    }
}

/// `sdfleet render` prints what the controller applies: for each example fleet (and the
/// first one with the example ModelSet), every child the controller made on the testbed
/// is what `render` prints for the same files and flags, and there is no other. Equal
/// means exact here: applied again as the controller's field manager (a dry run), the
/// rendered child changes nothing in the live object. Only an autoscaled Deployment's
/// replicas, which the controller decides at run time, are taken from the cluster.
#[tokio::test]
async fn the_controller_applies_what_render_prints_for_every_example() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let class = format!("render-{}", support::unique_suffix());
    // (example, with the example ModelSet)
    let cases = [
        ("examples/sdxl.yaml", false),
        ("examples/sdxl.yaml", true),
        ("examples/gateway.yaml", false),
        ("examples/gateway-replicated.yaml", false),
        ("examples/autoscaling.yaml", false),
    ];
    let checks = cases
        .iter()
        .map(|(file, with_models)| render_equals_applied(tb, &client, &class, file, *with_models));
    futures::future::join_all(checks).await;
    let classes: Api<DynamicObject> =
        Api::all_with(client.clone(), &ar("sdfleet.io", "v1alpha1", "FleetClass"));
    let _ = classes.delete(&class, &DeleteParams::default()).await;
}

/// The documents of an example file as a user applies them, in `ns` and of `class`
/// (the examples' class is the cluster default, which a shared testbed must not get).
fn example_docs(file: &str, ns: &str, class: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(support::repo_root().join(file)).unwrap();
    // The examples' namespace, hosts included.
    let text = text.replace("studio", ns);
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap()
        .into_iter()
        .filter(|d| d["kind"] != "Namespace")
        .map(|mut d| {
            if d["kind"] == "FleetClass" {
                d["metadata"] = json!({"name": class});
            } else {
                d["metadata"]["namespace"] = json!(ns);
                d["spec"]["className"] = json!(class);
            }
            d
        })
        .collect()
}

async fn render_equals_applied(
    tb: &Testbed,
    client: &Client,
    class: &str,
    file: &str,
    with_models: bool,
) {
    let ns = TestNamespace::new(client, "render").await;
    // The example class admits namespaces labelled as tenants.
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"sdfleet.io/tenant": "true"}}})),
        )
        .await
        .unwrap();
    let mut docs = example_docs("examples/fleetclass.yaml", &ns.name, class);
    let mut fleet_docs = example_docs(file, &ns.name, class);
    if with_models {
        docs.extend(example_docs("examples/modelset.yaml", &ns.name, class));
        for d in &mut fleet_docs {
            d["spec"]["modelSet"] = json!("sdxl-models");
        }
    }
    docs.extend(fleet_docs);
    // What render prints, from the same documents and the test controller's flags.
    let input = std::env::temp_dir().join(format!("{}.yaml", ns.name));
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect();
    std::fs::write(&input, text.join("\n---\n")).unwrap();
    let out = std::process::Command::new(support::sdfleet_bin())
        .arg("render")
        .args(support::CLUSTER_ARGS)
        .args(["--agent-namespace", &ns.name, "-f"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered: Vec<Value> =
        serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert!(
        rendered.len() >= 5,
        "render {file} printed {} children",
        rendered.len()
    );

    // The same documents applied, and the controller that makes the fleet's children.
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "sdxl-api-keys", "namespace": ns.name},
        "stringData": {"keys": "k1:team"}});
    for doc in docs.iter().chain([&secret]) {
        apply_doc(client, doc).await;
    }
    // The node agents' DaemonSet in the test's namespace (the default one is not there).
    let _controller = ControllerProcess::start(tb, &ns.name, &["--agent-namespace", &ns.name]);
    let autoscaled = docs.iter().any(|d| d["spec"]["autoscaling"].is_object());
    let cuds: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ar("sdfleet.io", "v1alpha1", "ComfyUIDeployment"),
    );
    // The one value render cannot know: the fleet's uid, in the owner references.
    let uid = cuds.get("sdxl").await.unwrap().uid().unwrap();
    let mut rendered = rendered;
    for child in &mut rendered {
        if let Some(owners) = child["metadata"]["ownerReferences"].as_array_mut() {
            for owner in owners {
                owner["uid"] = json!(uid);
            }
        }
    }
    for child in &rendered {
        let (api, name) = dynamic_api(client, child).await;
        let what = format!("{file}: {} {name}", child["kind"]);
        let live = eventually(&format!("{what} exists"), WAIT, || {
            let api = api.clone();
            let name = name.clone();
            async move { api.get(&name).await.ok() }
        })
        .await;
        let mut rendered = child.clone();
        if autoscaled && child["kind"] == "Deployment" {
            rendered["spec"]["replicas"] = json!(live.data["spec"]["replicas"]);
        }
        // The controller may be in the middle of its first passes: wait, bounded, until
        // the render applies as a no-op.
        let diff = eventually_equal(&api, &name, &rendered).await;
        assert!(
            diff.is_empty(),
            "{what}: render differs from what the controller applied: {diff:?}"
        );
    }
    // No child that render does not print: every kind the controller labels, by owner.
    let selector = format!(
        "sdfleet.io/owner-namespace={},sdfleet.io/owner-name",
        ns.name
    );
    let mut kinds: Vec<(String, String)> = rendered
        .iter()
        .map(|c| {
            (
                c["apiVersion"].as_str().unwrap().to_string(),
                c["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    let mut applied = BTreeSet::new();
    for (api_version, kind) in &kinds {
        let probe = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}});
        let (_, _, all) = dynamic_apis(client, &probe, &ns.name).await;
        for o in all
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
        {
            applied.insert(format!("{kind}/{}", o.name_any()));
        }
    }
    let printed: BTreeSet<String> = rendered
        .iter()
        .map(|c| {
            format!(
                "{}/{}",
                c["kind"].as_str().unwrap(),
                c["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        applied.is_subset(&printed),
        "{file}: applied but not rendered: {:?}",
        applied.difference(&printed).collect::<Vec<_>>()
    );
    // The fleet goes before its namespace, so its cleanup runs while the controller does.
    let _ = cuds.delete("sdxl", &DeleteParams::default()).await;
    eventually(&format!("{file}: fleet deleted"), WAIT, || {
        let cuds = cuds.clone();
        async move { cuds.get_opt("sdxl").await.unwrap().is_none().then_some(()) }
    })
    .await;
    let _ = std::fs::remove_file(&input);
}

async fn apply_doc(client: &Client, doc: &Value) {
    let (api, name) = dynamic_api(client, doc).await;
    api.patch(
        &name,
        &PatchParams::apply("sdfleet-test").force(),
        &Patch::Apply(doc),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {} {name}: {e}", doc["kind"]));
}

/// The API of `doc`'s kind in its namespace (if namespaced), and its name.
async fn dynamic_api(client: &Client, doc: &Value) -> (Api<DynamicObject>, String) {
    let ns = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (api, name, _) = dynamic_apis(client, doc, &ns).await;
    (api, name)
}

/// As `dynamic_api`, and the API of the kind across the cluster (for cluster-scoped
/// kinds and the operator's namespace alike).
async fn dynamic_apis(
    client: &Client,
    doc: &Value,
    ns: &str,
) -> (Api<DynamicObject>, String, Api<DynamicObject>) {
    let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            doc["apiVersion"].as_str().unwrap().to_string(),
        ),
    };
    let gvk = kube::core::GroupVersionKind::gvk(&group, &version, doc["kind"].as_str().unwrap());
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
    let name = doc["metadata"]["name"].as_str().unwrap().to_string();
    let all = Api::all_with(client.clone(), &resource);
    let api = match caps.scope {
        kube::discovery::Scope::Namespaced => {
            let ns = doc["metadata"]["namespace"].as_str().unwrap_or(ns);
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        kube::discovery::Scope::Cluster => all.clone(),
    };
    (api, name, all)
}

/// The fields where the live object would change if `rendered` were applied by the
/// controller's field manager now; empty once it is a no-op (tried for up to a minute).
async fn eventually_equal(api: &Api<DynamicObject>, name: &str, rendered: &Value) -> Vec<String> {
    let params = PatchParams {
        dry_run: true,
        ..PatchParams::apply("sdfleet").force()
    };
    let mut diff = Vec::new();
    for _ in 0..60 {
        let live = api.get(name).await.unwrap();
        let after = api
            .patch(name, &params, &Patch::Apply(rendered))
            .await
            .unwrap();
        let (mut live, mut after) = (
            serde_json::to_value(live).unwrap(),
            serde_json::to_value(after).unwrap(),
        );
        for o in [&mut live, &mut after] {
            o["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("managedFields");
        }
        diff = differences("", &live, &after);
        if diff.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    diff
}

/// The JSON paths where `a` and `b` differ.
fn differences(path: &str, a: &Value, b: &Value) -> Vec<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter()
                .flat_map(|k| {
                    differences(
                        &format!("{path}.{k}"),
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    )
                })
                .collect()
        }
        _ if a == b => vec![],
        _ => vec![format!("{path}: {a} → {b}")],
    }
}
