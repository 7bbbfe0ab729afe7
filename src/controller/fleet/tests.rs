//! Reconcile-level tests against a scripted apiserver (`mock_apiserver`): what the
//! fleet reconciler sends for an unreadable object, and cleanup's stages. The testbed
//! stays the place for end-to-end behaviour.

use std::sync::{Arc, Mutex};

use http::StatusCode;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::cleanup::cleanup;
use super::reconcile::reconcile;
use super::watches::child_changes;
use crate::controller::runtime::context::Context;
use crate::controller::runtime::context::Settings;
use crate::controller::runtime::resources::FleetResources;
use crate::crd::ComfyUIDeployment;
use crate::mock_apiserver::{self as mock, Seen};
use crate::names::FleetNames;
use crate::render::ChildKind;
use crate::render::nodeclass::Cloud;
use crate::render::settings::{AgentSettings, ClusterSettings};
use crate::telemetry::Metrics;
use kube::api::DynamicObject;

fn context(client: kube::Client) -> Arc<Context> {
    let settings = Settings {
        cloud: Cloud::Kwok,
        cluster: ClusterSettings {
            cluster_name: Some("test".into()),
            region: Some("us-west-2".into()),
            agent: AgentSettings::default(),
            gateway: Default::default(),
        },
        namespace: None,
        resync: std::time::Duration::from_secs(300),
        max_concurrent_reconciles: 0,
    };
    Arc::new(Context::new(client, settings, Arc::new(Metrics::default())))
}

/// A stored fleet whose spec no longer parses (`image` is a number).
fn unreadable() -> Value {
    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
        "metadata": {"name": "bad", "namespace": "studio", "generation": 3, "resourceVersion": "7"},
        "spec": {"image": 5, "nodeClass": {"role": "R"}}})
}

#[tokio::test]
async fn an_unreadable_fleet_gets_invalid_spec_once_and_waits_for_an_edit() {
    let stored = Arc::new(Mutex::new(unreadable()));
    let object = stored.clone();
    let (client, seen) = mock::apiserver(move |req: &Seen| {
        let mut object = object.lock().unwrap();
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/apis/sdfleet.io/v1alpha1/namespaces/studio/comfyuideployments/bad") => {
                (StatusCode::OK, object.clone())
            }
            (
                "PATCH",
                "/apis/sdfleet.io/v1alpha1/namespaces/studio/comfyuideployments/bad/status",
            ) => {
                object["status"] = req.body["status"].clone();
                (StatusCode::OK, object.clone())
            }
            _ => panic!("unexpected request {req:?}"),
        }
    });
    let ctx = context(client);
    let guard: DeserializeGuard<ComfyUIDeployment> = serde_json::from_value(unreadable()).unwrap();
    assert!(guard.0.is_err(), "the fixture must be unreadable");
    let guard = Arc::new(guard);

    let action = reconcile(guard.clone(), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    let status = stored.lock().unwrap()["status"].clone();
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .starts_with("cannot read the spec: "),
        "{ready}"
    );
    assert_eq!(status["observedGeneration"], 3);

    // Again, with that status stored: read, nothing written.
    reconcile(guard, ctx).await.unwrap();
    let methods: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.method.clone())
        .collect();
    assert_eq!(methods, ["GET", "PATCH", "GET"]);
}

/// Every list of the fleet's children answers from `children` (by resource plural);
/// deletes are recorded.
fn children_server(children: Vec<(&'static str, Value)>) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    mock::apiserver(move |req: &Seen| match req.method.as_str() {
        "GET" => {
            assert!(
                req.query.contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dsdfleet%2Csdfleet.io%2Fowner-namespace%3Dstudio%2Csdfleet.io%2Fowner-name%3Dsdxl"),
                "lists select by the fleet's owner labels: {req:?}"
            );
            let plural = req.path.rsplit('/').next().unwrap_or_default();
            mock::list(
                children
                    .iter()
                    .filter(|(p, _)| *p == plural)
                    .map(|(_, v)| v.clone())
                    .collect(),
            )
        }
        "DELETE" => {
            assert_eq!(req.body["propagationPolicy"], "Foreground", "{req:?}");
            (
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
        }
        _ => panic!("unexpected request {req:?}"),
    })
}

fn child(api_version: &str, kind: &str, name: &str, deleting: bool) -> Value {
    let mut v = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}});
    if deleting {
        v["metadata"]["deletionTimestamp"] = json!("2026-11-24T00:00:00Z");
    }
    v
}

/// The paths the pass deleted, in order.
fn deleted_paths(seen: &[Seen]) -> Vec<&str> {
    seen.iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path.as_str())
        .collect()
}

async fn one_pass(children: Vec<(&'static str, Value)>) -> (Vec<String>, Vec<Seen>) {
    let (client, seen) = children_server(children);
    let metrics = Metrics::default();
    let fleet = FleetNames::new("studio", "sdxl");
    let agent = AgentSettings::default();
    let resources = FleetResources {
        client: &client,
        metrics: &metrics,
        fleet: &fleet,
        node_class: Cloud::Kwok.provider(),
        agent: &agent,
        cache: None,
    };
    let remaining = cleanup(&resources).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    (remaining, seen)
}

#[tokio::test]
async fn cleanup_deletes_the_workload_first_and_the_node_class_last() {
    // Pass 1: the Deployment and the NodePool exist; only the workload stage runs.
    let (remaining, seen) = one_pass(vec![
        ("deployments", child("apps/v1", "Deployment", "sdxl", false)),
        (
            "nodepools",
            child("karpenter.sh/v1", "NodePool", "studio.sdxl", false),
        ),
    ])
    .await;
    assert_eq!(remaining, ["Deployment/sdxl"]);
    let deletes = deleted_paths(&seen);
    assert_eq!(
        deletes,
        ["/apis/apps/v1/namespaces/studio/deployments/sdxl"]
    );
    assert!(
        !seen.iter().any(|s| s.path.contains("nodepools")),
        "the NodePool's stage waits for the workload: {seen:?}"
    );

    // Pass 2: a volume still being deleted is waited for, not deleted again.
    let (remaining, seen) = one_pass(vec![
        (
            "persistentvolumes",
            child("v1", "PersistentVolume", "studio.sdxl-outputs", true),
        ),
        (
            "nodepools",
            child("karpenter.sh/v1", "NodePool", "studio.sdxl", false),
        ),
    ])
    .await;
    assert_eq!(remaining, ["PersistentVolume/studio.sdxl-outputs"]);
    assert!(!seen.iter().any(|s| s.method == "DELETE"), "{seen:?}");

    // Pass 3: the NodePool goes before the node class.
    let (remaining, seen) = one_pass(vec![
        (
            "nodepools",
            child("karpenter.sh/v1", "NodePool", "studio.sdxl", false),
        ),
        (
            "kwoknodeclasses",
            child(
                "karpenter.kwok.sh/v1alpha1",
                "KWOKNodeClass",
                "studio.sdxl",
                false,
            ),
        ),
    ])
    .await;
    assert_eq!(remaining, ["NodePool/studio.sdxl"]);
    let deletes = deleted_paths(&seen);
    assert_eq!(deletes, ["/apis/karpenter.sh/v1/nodepools/studio.sdxl"]);

    // Pass 4: the node class; pass 5: nothing left, the finalizer may go.
    let (remaining, _) = one_pass(vec![(
        "kwoknodeclasses",
        child(
            "karpenter.kwok.sh/v1alpha1",
            "KWOKNodeClass",
            "studio.sdxl",
            false,
        ),
    )])
    .await;
    assert_eq!(remaining, ["KWOKNodeClass/studio.sdxl"]);
    let (remaining, seen) = one_pass(vec![]).await;
    assert!(remaining.is_empty());
    // Every kind was looked at, the agent DaemonSet in the operator's namespace.
    assert_eq!(seen.len(), ChildKind::ALL.len(), "{seen:?}");
    assert!(
        seen.iter()
            .any(|s| s.path == "/apis/apps/v1/namespaces/sdfleet-system/daemonsets")
    );
}

/// A child's status starts its fleet's reconcile only where the fleet's status reads it;
/// its spec (drift) and metadata always do.
#[test]
fn child_status_starts_a_reconcile_only_where_the_fleet_reads_it() {
    let child = |kind: &str, spec: Value, status: Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": kind,
            "metadata": {"name": "c", "namespace": "n", "generation": 1, "labels": {"a": "b"}},
            "spec": spec, "status": status,
        }))
        .unwrap()
    };
    let daemon_set = |spec, ready| child("DaemonSet", spec, json!({"numberReady": ready}));
    let same = child_changes(ChildKind::AgentDaemonSet, &daemon_set(json!({"x": 1}), 1));
    assert_eq!(
        same,
        child_changes(ChildKind::AgentDaemonSet, &daemon_set(json!({"x": 1}), 5)),
        "an agent pod more, nothing to do"
    );
    assert_ne!(
        same,
        child_changes(ChildKind::AgentDaemonSet, &daemon_set(json!({"x": 2}), 1)),
        "drift of the spec"
    );
    let mut relabelled = daemon_set(json!({"x": 1}), 1);
    relabelled.metadata.labels = None;
    assert_ne!(same, child_changes(ChildKind::AgentDaemonSet, &relabelled));
    let deployment = |ready| {
        child(
            "Deployment",
            json!({"replicas": 2}),
            json!({"readyReplicas": ready}),
        )
    };
    assert_ne!(
        child_changes(ChildKind::Deployment, &deployment(1)),
        child_changes(ChildKind::Deployment, &deployment(2)),
        "ready replicas are the fleet's status"
    );
}
