//! The chart's admission policies, evaluated by the real apiserver: an agent's token
//! (which sits on every GPU node) may only lift sdfleet's taint from its own node and
//! write its own node's report (ModelSync); the controller's may only write objects sdfleet labels.

mod support;

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use sdfleet::crd::ModelSync;
use serde_json::{Value, json};
use support::{TestNamespace, Testbed, client_from, install_crds, unique_suffix, wait_for_policy};

/// A client acting as the chart's agent ServiceAccount whose token names `node`.
async fn agent_of(tb: &Testbed, release_ns: &str, node: &str) -> Client {
    client_from(&support::agent_kubeconfig(tb, release_ns, node)).await
}

fn tainted_node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"sdfleet.io/test": "true"}},
        "spec": {"taints": [
            {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"},
            {"key": "sdfleet.io/models-not-ready", "effect": "NoSchedule"}]}})
}

/// The patch an agent sends to lift the startup taint: the node's current taints but
/// that one, at its current version (other controllers taint nodes too: retried on a
/// conflict, a bounded number of times).
async fn untaint(as_agent: &Api<Node>, admin: &Api<Node>, name: &str) -> Result<Node, kube::Error> {
    let mut last = None;
    for _ in 0..5 {
        let node = admin.get(name).await.unwrap();
        let rest: Vec<_> = node
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.key != "sdfleet.io/models-not-ready")
            .collect();
        let patch = json!({"metadata": {"resourceVersion": node.metadata.resource_version},
            "spec": {"taints": rest}});
        match as_agent
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 409 => last = Some(kube::Error::Api(e)),
            result => return result,
        }
    }
    Err(last.unwrap())
}

fn refused(result: Result<impl std::fmt::Debug, kube::Error>, says: &str) {
    match result {
        Err(kube::Error::Api(e)) => assert!(e.message.contains(says), "{}", e.message),
        other => panic!("expected the apiserver to refuse ({says}), got {other:?}"),
    }
}

#[tokio::test]
async fn an_agent_may_change_only_its_own_node_and_entry() {
    let tb = Testbed::get();
    install_crds(tb);
    let admin = tb.client().await;
    let (_, release_ns) = support::install_release(tb, "admission");
    let (mine, other) = (
        format!("gpu-mine-{}", unique_suffix()),
        format!("gpu-other-{}", unique_suffix()),
    );
    let admin_nodes: Api<Node> = Api::all(admin.clone());
    for name in [&mine, &other] {
        admin_nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(tainted_node(name)).unwrap(),
            )
            .await
            .unwrap();
    }
    let agent = agent_of(tb, &release_ns, &mine).await;
    let nodes: Api<Node> = Api::all(agent.clone());
    let dry_run = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let probe = Patch::Merge(json!({"metadata": {"labels": {"probe": "x"}}}));
    wait_for_policy(|| nodes.patch(&other, &dry_run, &probe)).await;

    refused(
        untaint(&nodes, &admin_nodes, &other).await,
        "may not change node",
    );
    let label = json!({"metadata": {"labels": {"evil": "true"}}});
    refused(
        nodes
            .patch(&mine, &PatchParams::default(), &Patch::Merge(label))
            .await,
        "may only remove the sdfleet.io/models-not-ready taint",
    );
    untaint(&nodes, &admin_nodes, &mine)
        .await
        .expect("its own node's startup taint");

    // Reports: its own node's ModelSync only.
    let ns = TestNamespace::new(&admin, "admission").await;
    let syncs: Api<ModelSync> = Api::namespaced(agent.clone(), &ns.name);
    let report = |node: &str| {
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSync",
            "metadata": {"name": format!("m.{node}")},
            "spec": {"modelSet": "m", "node": node, "revision": "r", "state": "Synced"}})
    };
    refused(
        syncs
            .patch(
                &format!("m.{other}"),
                &PatchParams::apply("sdfleet-agent").force(),
                &Patch::Apply(report(&other)),
            )
            .await,
        "may only write the ModelSync of its own node",
    );
    syncs
        .patch(
            &format!("m.{mine}"),
            &PatchParams::apply("sdfleet-agent").force(),
            &Patch::Apply(report(&mine)),
        )
        .await
        .expect("its own node's report");
    // Renaming its report to another node's is an update the policy refuses too.
    let mut forged = report(&other);
    forged["metadata"]["name"] = format!("m.{mine}").into();
    refused(
        syncs
            .patch(
                &format!("m.{mine}"),
                &PatchParams::apply("sdfleet-agent").force(),
                &Patch::Apply(forged),
            )
            .await,
        "may only write the ModelSync of its own node",
    );
    // A token that names no node may change nothing.
    let nameless = client_from(&support::impersonating_kubeconfig(
        tb,
        &release_ns,
        "sdfleet-agent",
    ))
    .await;
    refused(
        untaint(&Api::all(nameless), &admin_nodes, &other).await,
        "names no node",
    );
    for name in [&mine, &other] {
        let _ = admin_nodes.delete(name, &Default::default()).await;
    }
}

#[tokio::test]
async fn the_controller_may_write_only_what_sdfleet_labels() {
    let tb = Testbed::get();
    install_crds(tb);
    let admin = tb.client().await;
    let (release, release_ns) = support::install_release(tb, "ctl-admission");
    let controller = client_from(&support::impersonating_kubeconfig(
        tb,
        &release_ns,
        &format!("{release}-sdfleet"),
    ))
    .await;
    let ns = TestNamespace::new(&admin, "ctl-admission").await;
    let maps: Api<ConfigMap> = Api::namespaced(controller, &ns.name);
    let plain: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "team-settings"}, "data": {"a": "b"}}))
            .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    wait_for_policy(|| maps.create(&dry_run, &plain)).await;
    refused(
        maps.create(&PostParams::default(), &plain).await,
        "sdfleet writes only objects labelled app.kubernetes.io/managed-by=sdfleet",
    );
    let ours: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "m-catalog-0",
        "labels": {"app.kubernetes.io/managed-by": "sdfleet", "sdfleet.io/catalog-of": "m"}}}))
    .unwrap();
    maps.create(&PostParams::default(), &ours)
        .await
        .expect("a labelled catalog ConfigMap");
    // An object a team made stays out of reach even by name.
    Api::<ConfigMap>::namespaced(admin, &ns.name)
        .create(&PostParams::default(), &plain)
        .await
        .unwrap();
    refused(
        maps.delete("team-settings", &Default::default()).await,
        "is not one",
    );
}
