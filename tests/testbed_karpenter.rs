//! The testbed really provisions GPU nodes: Karpenter's kwok provider creates a node of
//! a listed GPU instance type for a pending GPU pod, the pod runs on it, and the empty
//! node is consolidated away after the workload goes.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use support::{TestNamespace, Testbed, eventually, unique_suffix};

const GPU_TYPES: [&str; 2] = ["g5.2xlarge", "g4dn.2xlarge"];

fn resource(group: &str, version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

#[tokio::test]
async fn karpenter_provisions_gpu_node_runs_pod_and_consolidates() {
    let tb = Testbed::get();
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "tb-karpenter").await;
    let name = format!("tb-gpu-{}", unique_suffix());
    let ssa = PatchParams::apply("sdfleet-test").force();

    let nodeclass_ar = resource("karpenter.kwok.sh", "v1alpha1", "KWOKNodeClass");
    let nodeclasses: Api<DynamicObject> = Api::all_with(client.clone(), &nodeclass_ar);
    let nodeclass = json!({
        "apiVersion": "karpenter.kwok.sh/v1alpha1", "kind": "KWOKNodeClass",
        "metadata": {"name": name}, "spec": {}
    });
    nodeclasses
        .patch(&name, &ssa, &Patch::Apply(&nodeclass))
        .await
        .unwrap();

    let nodepool_ar = resource("karpenter.sh", "v1", "NodePool");
    let nodepools: Api<DynamicObject> = Api::all_with(client.clone(), &nodepool_ar);
    let nodepool = json!({
        "apiVersion": "karpenter.sh/v1", "kind": "NodePool",
        "metadata": {"name": name},
        "spec": {
            "template": {"spec": {
                "nodeClassRef": {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": name},
                "requirements": [
                    {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": GPU_TYPES},
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot", "on-demand"]},
                ],
                "taints": [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}],
                "expireAfter": "Never",
            }},
            "disruption": {"consolidationPolicy": "WhenEmpty", "consolidateAfter": "5s"},
            "limits": {"nvidia.com/gpu": "4"},
        }
    });
    nodepools
        .patch(&name, &ssa, &Patch::Apply(&nodepool))
        .await
        .unwrap();

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "gpu-app"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "gpu-app"}},
            "template": {
                "metadata": {"labels": {"app": "gpu-app"}},
                "spec": {
                    "nodeSelector": {"karpenter.sh/nodepool": name},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "app", "image": "registry.invalid/pause:1",
                        "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1", "cpu": "1"}}
                    }]
                }
            }
        }
    });
    deployments
        .patch("gpu-app", &ssa, &Patch::Apply(&deployment))
        .await
        .unwrap();

    let nodes: Api<Node> = Api::all(client.clone());
    let by_pool = ListParams::default().labels(&format!("karpenter.sh/nodepool={name}"));
    let node = eventually(
        "Karpenter to create a GPU node",
        Duration::from_secs(120),
        || async { nodes.list(&by_pool).await.ok()?.items.into_iter().next() },
    )
    .await;
    let node_name = node.metadata.name.clone().unwrap();
    let instance_type =
        node.metadata.labels.as_ref().unwrap()["node.kubernetes.io/instance-type"].clone();
    assert!(
        GPU_TYPES.contains(&instance_type.as_str()),
        "unexpected instance type {instance_type}"
    );
    let gpus = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("nvidia.com/gpu"));
    assert!(
        gpus.is_some(),
        "node {node_name} has no nvidia.com/gpu allocatable"
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = eventually(
        "the GPU pod to run on the new node",
        Duration::from_secs(120),
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=gpu-app"))
                .await
                .ok()?;
            list.items
                .into_iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        },
    )
    .await;
    assert_eq!(
        pod.spec.unwrap().node_name.as_deref(),
        Some(node_name.as_str())
    );

    deployments
        .delete("gpu-app", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually(
        "the empty node to be consolidated away",
        Duration::from_secs(180),
        || async {
            match nodes.get_opt(&node_name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        },
    )
    .await;

    nodepools
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    nodeclasses
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
}

/// The EC2NodeClass CRD on the testbed is Karpenter's real one: its schema and CEL rules
/// accept a valid object and reject invalid ones.
#[tokio::test]
async fn ec2nodeclass_crd_is_the_real_one() {
    let tb = Testbed::get();
    let client = tb.client().await;
    let ar = resource("karpenter.k8s.aws", "v1", "EC2NodeClass");
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::apply("sdfleet-test").force()
    };
    let name = format!("tb-ec2-{}", unique_suffix());
    let object = |spec: serde_json::Value| json!({"apiVersion": "karpenter.k8s.aws/v1", "kind": "EC2NodeClass", "metadata": {"name": name}, "spec": spec});
    let selector = json!([{"tags": {"karpenter.sh/discovery": "testbed"}}]);

    let valid = object(json!({
        "amiSelectorTerms": [{"alias": "al2023@latest"}],
        "role": "KarpenterNodeRole-testbed",
        "subnetSelectorTerms": selector, "securityGroupSelectorTerms": selector,
    }));
    api.patch(&name, &dry, &Patch::Apply(&valid))
        .await
        .expect("valid EC2NodeClass accepted");

    let both = object(json!({
        "amiSelectorTerms": [{"alias": "al2023@latest"}],
        "role": "KarpenterNodeRole-testbed", "instanceProfile": "KarpenterNodeInstanceProfile",
        "subnetSelectorTerms": selector, "securityGroupSelectorTerms": selector,
    }));
    let err = api
        .patch(&name, &dry, &Patch::Apply(&both))
        .await
        .expect_err("role + instanceProfile rejected");
    assert!(err.to_string().contains("instanceProfile"), "{err}");

    let no_ami = object(json!({
        "role": "KarpenterNodeRole-testbed",
        "subnetSelectorTerms": selector, "securityGroupSelectorTerms": selector,
    }));
    let err = api
        .patch(&name, &dry, &Patch::Apply(&no_ami))
        .await
        .expect_err("missing amiSelectorTerms rejected");
    assert!(err.to_string().contains("amiSelectorTerms"), "{err}");
}

/// The EC2NodeClasses sdfleet renders for a faster image pull (a Bottlerocket data volume
/// restored from a snapshot with the image pulled, or SOCI's parallel pull) are accepted
/// by Karpenter's real CRD; and sdfleet's own CRD refuses them where they cannot work.
#[tokio::test]
async fn image_pull_node_classes_pass_karpenters_crd_and_ours_refuses_what_cannot_work() {
    let tb = Testbed::get();
    support::install_crds(tb);
    let client = tb.client().await;
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &resource("karpenter.k8s.aws", "v1", "EC2NodeClass"),
    );
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::apply("sdfleet-test").force()
    };
    let fleet = |image_pull: serde_json::Value| -> sdfleet::crd::ComfyUIDeployment {
        serde_json::from_value(json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "metadata": {"name": "sdxl", "namespace": "studio", "uid": "0"},
            "spec": {"image": "comfyui:1", "gpu": {"instanceTypes": ["g5.2xlarge"]},
                     "nodeClass": {"amiAlias": "bottlerocket@latest", "role": "KarpenterNodeRole-testbed",
                                   "imagePull": image_pull}}
        }))
        .unwrap()
    };
    let cluster = sdfleet::render::settings::ClusterSettings {
        agent: Default::default(),
        gateway: Default::default(),
        cluster_name: Some("testbed".into()),
        region: Some("us-west-2".into()),
    };
    let provider = sdfleet::render::nodeclass::Cloud::Aws.provider();
    let ctx = sdfleet::render::RenderContext {
        cluster: &cluster,
        node_class: provider,
        model_sync: Default::default(),
    };
    for image_pull in [
        json!({"snapshotID": "snap-0123456789abcdef0"}),
        json!({"soci": {"maxConcurrentDownloadsPerImage": 20, "maxConcurrentUnpacksPerImage": 4}}),
    ] {
        let children = sdfleet::render::build(&fleet(image_pull.clone()), &ctx).unwrap();
        let mut node_class = children[0].manifest.clone();
        assert_eq!(node_class["kind"], "EC2NodeClass");
        let name = format!("tb-pull-{}", unique_suffix());
        node_class["metadata"] = json!({"name": name});
        api.patch(&name, &dry, &Patch::Apply(&node_class))
            .await
            .unwrap_or_else(|e| {
                panic!("Karpenter's CRD refused the node class for {image_pull}: {e}")
            });
    }

    // On the FleetClass, where node settings are decided.
    let classes: Api<DynamicObject> =
        Api::all_with(client, &resource("sdfleet.io", "v1alpha1", "FleetClass"));
    let class = |node_class: serde_json::Value| {
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "FleetClass",
               "metadata": {"name": "pull"}, "spec": {"nodeClass": node_class}})
    };
    let cases = [
        (
            json!({"role": "r", "imagePull": {"snapshotID": "snap-0123456789abcdef0"}}),
            "needs a Bottlerocket AMI",
        ),
        (
            json!({"role": "r", "amiAlias": "bottlerocket@latest",
                   "imagePull": {"snapshotID": "snap-0123456789abcdef0", "soci": {}}}),
            "exactly one of imagePull.snapshotID and imagePull.soci",
        ),
        (
            json!({"role": "r", "amiAlias": "bottlerocket@latest", "imagePull": {"snapshotID": "ami-123"}}),
            "snapshotID",
        ),
    ];
    for (node_class, expect) in cases {
        let err = classes
            .patch("pull", &dry, &Patch::Apply(&class(node_class.clone())))
            .await
            .expect_err("accepted");
        assert!(err.to_string().contains(expect), "{node_class}: {err}");
    }
}
