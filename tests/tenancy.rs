//! Several teams in one cluster: fleets whose names would join to the same string get
//! separate cluster-scoped children, deleting one leaves the other whole, and an object
//! sdfleet did not make is never changed or deleted (the fleet reports NameConflict).

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use sdfleet::crd::ComfyUIDeployment;
use serde_json::{Value, json};
use support::{ControllerProcess, Testbed, eventually, install_crds, unique_suffix};

const WAIT: Duration = Duration::from_secs(120);

fn nodepools(client: &Client) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodePool"));
    Api::all_with(client.clone(), &ar)
}

/// A namespace with exactly this name (the test needs names that join alike).
async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"sdfleet.io/test": "true"}}}),
    )
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

fn fleet(name: &str) -> Value {
    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment", "metadata": {"name": name},
        "spec": {"image": "comfyui:test", "replicas": 0,
                 "ingress": {"enabled": false}}})
}

async fn apply(client: &Client, ns: &str, name: &str) {
    apply_manifest(client, ns, name, fleet(name)).await;
}

async fn apply_manifest(client: &Client, ns: &str, name: &str, manifest: Value) {
    Api::<ComfyUIDeployment>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("test-user"),
            &Patch::Apply(manifest),
        )
        .await
        .unwrap();
}

/// The fleet's Ready condition as (status, reason, message), once it has one.
async fn ready(client: &Client, ns: &str, name: &str) -> Option<(String, String, String)> {
    let cud = Api::<ComfyUIDeployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    let c = cud
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status, c.reason, c.message))
}

/// Deletes the fleet and waits until it is gone (its finalizer done).
async fn delete_and_wait(client: &Client, ns: &str, name: &str) {
    let fleets = Api::<ComfyUIDeployment>::namespaced(client.clone(), ns);
    fleets.delete(name, &DeleteParams::default()).await.unwrap();
    eventually(&format!("{ns}/{name} to be gone"), WAIT, || async {
        fleets.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

fn owner(pool: &DynamicObject) -> (String, String) {
    let labels = pool.labels();
    (
        labels
            .get("sdfleet.io/owner-namespace")
            .cloned()
            .unwrap_or_default(),
        labels
            .get("sdfleet.io/owner-name")
            .cloned()
            .unwrap_or_default(),
    )
}

#[tokio::test]
async fn tenants_whose_names_join_alike_get_separate_children() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    // team/a-b and team-a/b: "<ns>-<name>" is the same string for both.
    let team = format!("tenant{}", unique_suffix());
    let team_a = format!("{team}-a");
    namespace(&client, &team).await;
    namespace(&client, &team_a).await;
    let _one = ControllerProcess::start(tb, &team, &[]);
    let _two = ControllerProcess::start(tb, &team_a, &[]);
    apply(&client, &team, "a-b").await;
    apply(&client, &team_a, "b").await;
    for (ns, name) in [(&team, "a-b"), (&team_a, "b")] {
        eventually(&format!("{ns}/{name} Ready"), WAIT, || async {
            ready(&client, ns, name).await.filter(|r| r.0 == "True")
        })
        .await;
    }
    let pools = nodepools(&client);
    let first = pools.get(&format!("{team}.a-b")).await.unwrap();
    let second = pools.get(&format!("{team_a}.b")).await.unwrap();
    assert_eq!(owner(&first), (team.clone(), "a-b".to_string()));
    assert_eq!(owner(&second), (team_a.clone(), "b".to_string()));

    // Deleting one fleet leaves the other's children whole.
    delete_and_wait(&client, &team, "a-b").await;
    assert!(
        pools
            .get_opt(&format!("{team}.a-b"))
            .await
            .unwrap()
            .is_none()
    );
    let still = pools.get(&format!("{team_a}.b")).await.unwrap();
    assert_eq!(owner(&still), (team_a.clone(), "b".to_string()));
    assert!(still.metadata.deletion_timestamp.is_none());
    assert_eq!(ready(&client, &team_a, "b").await.unwrap().0, "True");
    for ns in [&team, &team_a] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &DeleteParams::background())
            .await;
    }
}

#[tokio::test]
async fn an_object_sdfleet_did_not_make_is_never_changed_or_deleted() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = format!("handmade{}", unique_suffix());
    namespace(&client, &ns).await;
    let _controller = ControllerProcess::start(tb, &ns, &[]);
    // An admin's NodePool under the name the fleet's would have.
    let pool_name = format!("{ns}.gpu");
    let admin_pool = json!({"apiVersion": "karpenter.sh/v1", "kind": "NodePool",
        "metadata": {"name": pool_name, "labels": {"team": "platform"}},
        "spec": {"template": {"spec": {
            "nodeClassRef": {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "default"},
            "requirements": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}},
            "limits": {"cpu": "1"}}});
    let pools = nodepools(&client);
    pools
        .patch(
            &pool_name,
            &PatchParams::apply("admin"),
            &Patch::Apply(&admin_pool),
        )
        .await
        .unwrap();
    let before = pools.get(&pool_name).await.unwrap();

    apply(&client, &ns, "gpu").await;
    let (status, _, message) = eventually("NameConflict", WAIT, || async {
        ready(&client, &ns, "gpu")
            .await
            .filter(|r| r.1 == "NameConflict")
    })
    .await;
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!("NodePool {pool_name}")),
        "{message}"
    );
    assert!(message.contains("not made by sdfleet"), "{message}");

    // Deleting the fleet leaves the admin's NodePool exactly as it was.
    delete_and_wait(&client, &ns, "gpu").await;
    let after = pools.get(&pool_name).await.unwrap();
    // (Karpenter writes the NodePool's status meanwhile; its spec and labels are the admin's.)
    assert_eq!(after.data["spec"], before.data["spec"]);
    assert_eq!(after.labels(), before.labels());
    let managers: Vec<String> = after
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(!managers.iter().any(|m| m == "sdfleet"), "{managers:?}");
    assert!(after.metadata.deletion_timestamp.is_none());
    pools
        .delete(&pool_name, &DeleteParams::default())
        .await
        .unwrap();
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
}

/// The README's recipe for a team's GPU total: a ResourceQuota on
/// `requests.nvidia.com/gpu` in its namespace. Pods past it are never created, and the
/// fleet says why it waits (no node would help).
#[tokio::test]
async fn a_resource_quota_caps_a_teams_gpus_and_the_fleet_says_why_it_waits() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = format!("quota{}", unique_suffix());
    namespace(&client, &ns).await;
    let _controller = ControllerProcess::start(tb, &ns, &[]);
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "gpus"},
        "spec": {"hard": {"requests.nvidia.com/gpu": "1"}},
    }))
    .unwrap();
    let quotas = Api::namespaced(client.clone(), &ns);
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // Enforced once the quota controller has counted the namespace.
    eventually("the quota counted", WAIT, || async {
        let q: k8s_openapi::api::core::v1::ResourceQuota = quotas.get("gpus").await.ok()?;
        q.status?
            .hard?
            .contains_key("requests.nvidia.com/gpu")
            .then_some(())
    })
    .await;

    let mut two = fleet("gpu");
    two["spec"]["replicas"] = json!(2);
    apply_manifest(&client, &ns, "gpu", two).await;
    let (status, reason, message) = eventually("the fleet names the quota", WAIT, || async {
        ready(&client, &ns, "gpu")
            .await
            .filter(|r| r.2.contains("exceeded quota"))
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "WaitingForPods")
    );
    assert!(message.contains("pods cannot be created"), "{message}");
    assert!(message.contains("requests.nvidia.com/gpu"), "{message}");
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/instance=gpu"))
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 1, "one GPU's worth of pods");
    delete_and_wait(&client, &ns, "gpu").await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
}
