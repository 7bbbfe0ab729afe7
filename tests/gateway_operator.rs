//! The operator's part of the gateway, on the testbed, under the Helm chart's RBAC: a
//! fleet's `spec.gateway` becomes a ServiceAccount, a RoleBinding to the chart's gateway
//! ClusterRole, a store claim, a Deployment, a Service and an Ingress; they are updated,
//! repaired and pruned like the fleet's own children; and the gateway exactly as
//! rendered (its args, its ServiceAccount's RBAC) serves a job from a fake ComfyUI pod.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolume, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use sdfleet::crd::ComfyUIDeployment;
use serde_json::{Value, json};
use support::fake_comfyui::{FakeComfy, FakeConfig};
use support::gateway::*;
use support::*;

const WAIT: Duration = Duration::from_secs(180);
const CKPT: &str = "sd_xl_base_1.0.safetensors";

fn fleet_manifest(bucket: &str, gateway: Option<Value>) -> Value {
    let mut spec = json!({
        "image": "comfyui:test",
        // No ComfyUI pods of the cluster's own: the fake pods below are the fleet's.
        "replicas": 0,
        "gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 4},
        "storage": {"outputs": {"bucket": bucket, "prefix": "out/"}},
        "ingress": {"enabled": false},
    });
    if let Some(gw) = gateway {
        spec["gateway"] = gw;
    }
    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
           "metadata": {"name": "sdxl"}, "spec": spec})
}

/// Every namespaced child of the fleet, as `Kind/name`.
async fn children(client: &Client, ns: &str) -> BTreeSet<String> {
    let selector = format!(
        "app.kubernetes.io/managed-by=sdfleet,sdfleet.io/owner-namespace={ns},sdfleet.io/owner-name=sdxl"
    );
    let mut out = BTreeSet::new();
    for (group, version, kind) in [
        ("", "v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
        ("", "v1", "PersistentVolumeClaim"),
        ("", "v1", "Service"),
        ("apps", "v1", "Deployment"),
        ("networking.k8s.io", "v1", "Ingress"),
    ] {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        for o in api
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
        {
            if o.metadata.deletion_timestamp.is_none() {
                out.insert(format!("{kind}/{}", o.name_any()));
            }
        }
    }
    out
}

fn names(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

const FLEET_CHILDREN: &[&str] = &[
    "Deployment/sdxl",
    "PersistentVolumeClaim/sdxl-outputs",
    "Service/sdxl",
];
const GATEWAY_CHILDREN: &[&str] = &[
    "Deployment/sdxl-gateway",
    "Ingress/sdxl-gateway",
    "PersistentVolumeClaim/sdxl-gateway-store",
    "RoleBinding/sdxl-gateway",
    "Service/sdxl-gateway",
    "ServiceAccount/sdxl-gateway",
];

#[tokio::test]
async fn a_fleets_gateway_is_applied_repaired_and_pruned_and_serves_as_rendered_under_its_own_rbac()
{
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let (release, release_ns) = install_release(tb, "gw");
    let ns = TestNamespace::new(&client, "gw-op").await;
    let mut controller = support::fleet::start_controller(tb, &ns.name, &release, &release_ns);
    let s3 = s3_client(tb).await;
    let bucket = create_bucket(&s3, "gw-op").await;

    // What the admin provides: the API keys' Secret (hashes only) and the store's volume
    // (EBS through a StorageClass on EKS; the testbed has no provisioner).
    let key = format!("key-{}", unique_suffix());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sdxl-keys"},
        "stringData": {"ci": sdfleet::gateway::auth::hash_key(&key)},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let pv_name = format!("{}-gateway-store", ns.name);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                 "hostPath": {"path": format!("/tmp/{pv_name}")},
                 "claimRef": {"namespace": ns.name, "name": "sdxl-gateway-store"}},
    }))
    .unwrap();
    pvs.create(&PostParams::default(), &pv).await.unwrap();

    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    let apply = |manifest: Value| {
        let cuds = cuds.clone();
        async move {
            cuds.patch(
                "sdxl",
                &PatchParams::apply("test-user").force(),
                &Patch::Apply(manifest),
            )
            .await
            .unwrap();
        }
    };
    let gateway = json!({"apiKeysSecret": "sdxl-keys", "queueCap": 5});
    apply(fleet_manifest(&bucket, Some(gateway.clone()))).await;

    // Created: the gateway's children beside the fleet's.
    let all: BTreeSet<String> = names(FLEET_CHILDREN)
        .union(&names(GATEWAY_CHILDREN))
        .cloned()
        .collect();
    eventually("the fleet's and the gateway's children", WAIT, || async {
        (children(&client, &ns.name).await == all).then_some(())
    })
    .await;
    // The gateway pod runs (on a simulated CPU node): GatewayReady, and the fleet Ready.
    let status = eventually("GatewayReady and Ready", WAIT, || async {
        let status = cuds.get("sdxl").await.ok()?.status?;
        let is_true = |t: &str| {
            status
                .conditions
                .iter()
                .any(|c| c.type_ == t && c.status == "True")
        };
        (is_true("GatewayReady") && is_true("Ready")).then_some(status)
    })
    .await;
    let gw_status = status.gateway.unwrap();
    assert_eq!(
        gw_status.url,
        format!("http://sdxl-gateway.{}.svc", ns.name)
    );
    assert_eq!(gw_status.ready_replicas, 1);

    // The gateway's identity: the fleet's EndpointSlices and ModelSets here, nothing else.
    let gateway_user = format!("system:serviceaccount:{}:sdxl-gateway", ns.name);
    assert!(can_i(
        tb,
        &gateway_user,
        "watch",
        "endpointslices.discovery.k8s.io",
        &ns.name
    ));
    assert!(can_i(
        tb,
        &gateway_user,
        "list",
        "modelsets.sdfleet.io",
        &ns.name
    ));
    assert!(!can_i(
        tb,
        &gateway_user,
        "list",
        "endpointslices.discovery.k8s.io",
        "default"
    ));
    assert!(!can_i(tb, &gateway_user, "get", "secrets", &ns.name));
    assert!(!can_i(tb, &gateway_user, "create", "pods", &ns.name));

    // The gateway as rendered: its args, run here with its ServiceAccount's RBAC, in
    // front of a fake ComfyUI pod listed in the fleet Service's EndpointSlice.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let rendered: Vec<String> = deployments
        .get("sdxl-gateway")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(rendered[..3], ["gateway", "--fleet", "sdxl"]);
    let work = std::env::temp_dir().join(format!("gw-op-{}", ns.name));
    api_keys_dir(&work.join("keys"), "ci", &key);
    let fake = FakeComfy::start(
        "sdxl-pod-0",
        FakeConfig {
            step_time: Duration::from_millis(10),
            switch_penalty: Duration::ZERO,
            models: vec![format!("checkpoints/{CKPT}")],
            output_dir: work.join("output"),
        },
    )
    .await;
    publish_pod(&client, &ns.name, "sdxl", 0, &fake).await;
    let mut args = local_args(&rendered, &ns.name, &work, tb);
    args.extend(endpoint_map_args(std::slice::from_ref(&fake)));
    let as_gateway = impersonating_kubeconfig(tb, &ns.name, "sdxl-gateway");
    let process = GatewayProcess::start_as(tb, args, &as_gateway);
    process.wait_ready("sdxl", 1).await;
    let api = ApiClient::new(&process.url(""), &key);
    let (code, job) = api.submit(json!({"prompt": sdxl_workflow(CKPT, 3)})).await;
    assert_eq!(code, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let done = api.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", process.log_text());
    let key_name = done["outputs"][0]["key"].as_str().unwrap();
    assert!(
        key_name.starts_with(&format!("out/{id}/")),
        "outputs under the fleet's prefix: {key_name}"
    );
    let fetched = reqwest::get(done["outputs"][0]["url"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    // The rendered queue cap holds: with the pod gone from the Service, 5 wait, 3 are refused.
    unpublish_pod(&client, &ns.name, "sdxl", &fake).await;
    process.wait_ready("sdxl", 0).await;
    let mut refused = 0;
    for _ in 0..8 {
        let (code, _) = api.submit(json!({"prompt": sdxl_workflow(CKPT, 3)})).await;
        refused += u32::from(code == 429);
    }
    assert_eq!(refused, 3, "queueCap 5: 8 submitted");
    drop(process);

    // Updated: a new queue cap reaches the Deployment's args.
    apply(fleet_manifest(
        &bucket,
        Some(json!({"apiKeysSecret": "sdxl-keys", "queueCap": 7})),
    ))
    .await;
    eventually(
        "--queue-cap 7 in the gateway's Deployment",
        WAIT,
        || async {
            let d = deployments.get("sdxl-gateway").await.ok()?;
            let args = d.spec?.template.spec?.containers[0].args.clone()?;
            let i = args.iter().position(|a| a == "--queue-cap")?;
            (args[i + 1] == "7").then_some(())
        },
    )
    .await;

    // Drift: a RoleBinding deleted by hand and a Deployment edited by hand come back.
    let bindings: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
        )),
    );
    bindings
        .delete("sdxl-gateway", &DeleteParams::default())
        .await
        .unwrap();
    deployments
        .patch(
            "sdxl-gateway",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    eventually(
        "the RoleBinding back and the Deployment at 1 replica",
        WAIT,
        || async {
            let binding = bindings.get_opt("sdxl-gateway").await.ok()??;
            let d = deployments.get("sdxl-gateway").await.ok()?;
            (binding.metadata.deletion_timestamp.is_none() && d.spec?.replicas == Some(1))
                .then_some(())
        },
    )
    .await;

    // Pruned: without spec.gateway the gateway's children go, the fleet's stay, and the
    // status forgets the gateway. S3 keeps the outputs.
    apply(fleet_manifest(&bucket, None)).await;
    eventually("only the fleet's children", WAIT, || async {
        (children(&client, &ns.name).await == names(FLEET_CHILDREN)).then_some(())
    })
    .await;
    eventually(
        "no GatewayReady condition and no status.gateway",
        WAIT,
        || async {
            let status = cuds.get("sdxl").await.ok()?.status?;
            (status.gateway.is_none()
                && status.conditions.iter().all(|c| c.type_ != "GatewayReady"))
            .then_some(())
        },
    )
    .await;
    let kept = s3.get_object().bucket(&bucket).key(key_name).send().await;
    assert!(kept.is_ok(), "outputs in S3 are never deleted");

    cuds.delete("sdxl", &DeleteParams::default()).await.unwrap();
    eventually("the fleet and its children gone", WAIT, || async {
        (cuds.get_opt("sdxl").await.ok()?.is_none() && children(&client, &ns.name).await.is_empty())
            .then_some(())
    })
    .await;
    assert!(controller.is_running());
    drop(controller);
    let _ = pvs.delete(&pv_name, &DeleteParams::default()).await;
    support::uninstall_release(tb, &release, &release_ns);
}
