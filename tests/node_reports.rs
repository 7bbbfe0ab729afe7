//! The nodes' reports live in small objects of their own (`ModelSync`), so no object
//! grows with the number of nodes: the ModelSet is untouched by reports, each report is
//! bounded (its message too), a departed node's report is removed by the garbage
//! collector (its Node owns it), and the controller deletes every report of a deleted
//! ModelSet before letting it go.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use sdfleet::crd::modelset::{NODE_MESSAGE_MAX, NodeSync, NodeSyncState};
use sdfleet::crd::{ModelSet, ModelSync};
use serde_json::json;
use support::{
    ControllerProcess, TestNamespace, Testbed, eventually, impersonating_kubeconfig, install_crds,
    install_release, uninstall_release, unique_suffix,
};

const WAIT: Duration = Duration::from_secs(90);

async fn report(syncs: &Api<ModelSync>, ms: &ModelSet, node: &Node) -> usize {
    let entry = NodeSync {
        node: node.metadata.name.clone().unwrap(),
        revision: "r1".into(),
        state: NodeSyncState::Failed,
        bytes_done: 0,
        // As long as an agent may write: the worst case per report.
        message: NodeSync::bounded(&"x".repeat(5000)),
        command_id: None,
        hot_ready: false,
        gpu_allocatable_at: None,
        hot_recent: Vec::new(),
    };
    let body = ModelSync::apply_body(ms, node, &BTreeMap::new(), &entry);
    let name = body["metadata"]["name"].as_str().unwrap().to_string();
    let stored = syncs
        .patch(
            &name,
            &PatchParams::apply("sdfleet-agent").force(),
            &Patch::Apply(body),
        )
        .await
        .unwrap();
    serde_json::to_vec(&stored).unwrap().len()
}

async fn names(syncs: &Api<ModelSync>) -> Vec<String> {
    let mut names: Vec<String> = syncs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.spec.report.node)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn reports_stay_small_and_go_with_their_node_or_model_set() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "reports").await;
    let sets: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let ms = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": "m"},
        "spec": {"source": {"s3": {"bucket": "no-such-bucket-reports"}}}});
    let ms = sets
        .patch("m", &PatchParams::apply("team"), &Patch::Apply(ms))
        .await
        .unwrap();
    let size_of_model_set = || async {
        serde_json::to_vec(&sets.get("m").await.unwrap())
            .unwrap()
            .len()
    };
    let before = size_of_model_set().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let mut live = Vec::new();
    for i in 0..3 {
        let name = format!("report-{}-{i}", unique_suffix());
        live.push(
            nodes
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
                )
                .await
                .unwrap(),
        );
    }
    let syncs: Api<ModelSync> = Api::namespaced(client.clone(), &ns.name);
    for node in &live {
        let size = report(&syncs, &ms, node).await;
        // The message is bounded, so a report is too (managedFields included).
        assert!(size < NODE_MESSAGE_MAX + 2048, "a report of {size} bytes");
    }
    assert_eq!(
        size_of_model_set().await,
        before,
        "reports leave the ModelSet as it was"
    );
    let mut all: Vec<String> = live
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    all.sort();
    assert_eq!(names(&syncs).await, all);

    // A node goes: the garbage collector removes its report, and only its.
    let gone = all.remove(0);
    nodes.delete(&gone, &DeleteParams::default()).await.unwrap();
    eventually("the departed node's report collected", WAIT, || async {
        (names(&syncs).await == all).then_some(())
    })
    .await;
    // The ModelSet goes: the controller deletes its reports (its finalizer holds the
    // ModelSet until then). The controller acts as the chart's ServiceAccount, so its
    // RBAC on the reports (deletecollection) is the chart's.
    let (release, release_ns) = install_release(tb, "reports");
    let as_controller = impersonating_kubeconfig(tb, &release_ns, &format!("{release}-sdfleet"));
    let mut env = tb.aws_env();
    env.push(("KUBECONFIG", as_controller.to_str().unwrap()));
    let controller =
        ControllerProcess::start_with_env(tb, &ns.name, &["--agent-namespace", &release_ns], &env);
    eventually(
        "the controller's finalizer on the ModelSet",
        WAIT,
        || async {
            let ms = sets.get("m").await.ok()?;
            ms.metadata.finalizers.filter(|f| !f.is_empty()).map(|_| ())
        },
    )
    .await;
    sets.delete("m", &DeleteParams::default()).await.unwrap();
    eventually(
        "every report of the deleted ModelSet collected",
        WAIT,
        || async { names(&syncs).await.is_empty().then_some(()) },
    )
    .await;
    for n in &all {
        let _ = nodes.delete(n, &DeleteParams::default()).await;
    }
    drop(controller);
    uninstall_release(tb, &release, &release_ns);
}
