//! `status.nodes` does not grow with the number of nodes a ModelSet has ever seen: the
//! entries of nodes that are gone are pruned, only live nodes count for Synced, and
//! each message is bounded. The size test is a measurement, run explicitly:
//! `cargo test --test node_entries -- --ignored --nocapture`.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use sdfleet::crd::ModelSet;
use sdfleet::crd::modelset::{NODE_MESSAGE_MAX, NodeSync, NodeSyncState};
use serde_json::json;
use support::{ControllerProcess, TestNamespace, Testbed, eventually, install_crds, unique_suffix};

/// The stored object's size in bytes, as the apiserver returns it (managedFields included).
async fn size(client: &kube::Client, ns: &str, name: &str) -> usize {
    let raw: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<ModelSet>(&()));
    serde_json::to_vec(&raw.get(name).await.unwrap())
        .unwrap()
        .len()
}

async fn report(sets: &Api<ModelSet>, name: &str, node: &str, revision: &str) {
    let entry = NodeSync {
        node: node.into(),
        revision: revision.into(),
        state: NodeSyncState::Failed,
        bytes_done: 0,
        // As long as an agent may write: the worst case per entry.
        message: NodeSync::bounded(&"x".repeat(5000)),
        command_id: None,
    };
    sets.patch_status(
        name,
        &PatchParams::apply(&format!("sdfleet-agent-{node}")).force(),
        &Patch::Apply(ModelSet::node_entries_patch(name, &[entry])),
    )
    .await
    .unwrap();
}

#[tokio::test]
#[ignore = "writes 1,000 node entries (about a minute on 2 cores); run with --ignored"]
async fn a_thousand_node_lifetimes_leave_only_the_live_nodes() {
    const LIFETIMES: usize = 1000;
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "lifetimes").await;
    let sets: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let ms = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": "m"},
        "spec": {"source": {"s3": {"bucket": "no-such-bucket-lifetimes"}}, "sync": {"pollInterval": "2s"}}});
    sets.patch("m", &PatchParams::apply("team"), &Patch::Apply(ms))
        .await
        .unwrap();
    // Three nodes that live on; a thousand that came and went (their Node objects gone).
    let nodes: Api<Node> = Api::all(client.clone());
    let live: Vec<String> = (0..3)
        .map(|i| format!("live-{}-{i}", unique_suffix()))
        .collect();
    for n in &live {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let empty = size(&client, &ns.name, "m").await;
    let t = Instant::now();
    for i in 0..LIFETIMES {
        report(&sets, "m", &format!("gone-{i}"), "r1").await;
    }
    for n in &live {
        report(&sets, "m", n, "r1").await;
    }
    let unpruned = size(&client, &ns.name, "m").await;
    println!(
        "{LIFETIMES} departed + {} live entries (messages of {NODE_MESSAGE_MAX} chars) written in {:.1} s: object {} KiB (empty: {} KiB)",
        live.len(),
        t.elapsed().as_secs_f64(),
        unpruned / 1024,
        empty / 1024
    );
    // The controller prunes the departed nodes' entries.
    let _controller = ControllerProcess::start_with_env(tb, &ns.name, &[], &tb.aws_env());
    let t = Instant::now();
    let remaining = eventually(
        "the departed entries pruned",
        Duration::from_secs(120),
        || async {
            let status = sets.get("m").await.ok()?.status?;
            (status.nodes.len() == live.len()).then_some(status.nodes)
        },
    )
    .await;
    let pruned = size(&client, &ns.name, "m").await;
    println!(
        "after pruning ({:.1} s): {} entries, object {} KiB",
        t.elapsed().as_secs_f64(),
        remaining.len(),
        pruned / 1024
    );
    assert!(remaining.iter().all(|e| live.contains(&e.node)));
    assert!(pruned < unpruned / 50, "{pruned} bytes left of {unpruned}");
    for n in &live {
        let _ = nodes.delete(n, &Default::default()).await;
    }
}
