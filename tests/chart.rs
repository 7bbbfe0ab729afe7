//! The Helm chart: lint-clean, renders objects the apiserver accepts, rejects bad values
//! at install with a clear message, installs into the testbed.

mod support;

use support::{TestNamespace, Testbed, repo_root, unique_suffix};

fn helm(tb: &Testbed) -> std::process::Command {
    let mut cmd = std::process::Command::new(tb.var("SDFLEET_TESTBED_HELM"));
    cmd.arg("--kubeconfig").arg(tb.kubeconfig());
    cmd
}

fn chart() -> String {
    repo_root()
        .join("charts/sdfleet")
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run() {
    let tb = Testbed::get();
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "chart-dry").await;
    let scoped = format!(
        "networkPolicy.enabled=true,controller.clusterName=c,controller.region=eu-west-1,controller.watchNamespace={}",
        ns.name
    );
    for extra in [vec![], vec!["--set", scoped.as_str()]] {
        let out = helm(tb)
            .args([
                "template",
                "dry",
                &chart(),
                "--kube-version",
                "v1.35.4",
                "--namespace",
                &ns.name,
            ])
            .args(&extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        for kind in [
            "kind: Deployment",
            "kind: ClusterRole",
            "kind: ServiceAccount",
            "kind: Role",
            "kind: PodDisruptionBudget",
            "kind: FlowSchema",
        ] {
            assert!(rendered.contains(kind), "{kind} not rendered");
        }
        if !extra.is_empty() {
            // Scoped to one namespace: what lives in namespaces comes from a Role there,
            // and the ClusterRole keeps only cluster-scoped kinds.
            let cluster_role = rendered
                .split("\n---")
                .find(|d| d.contains("kind: ClusterRole\n") && !d.contains("-agent"))
                .unwrap();
            assert!(!cluster_role.contains("deployments"), "{cluster_role}");
            assert!(!cluster_role.contains("configmaps"), "{cluster_role}");
            assert!(rendered.contains(&format!(
                "kind: Role\nmetadata:\n  name: dry-sdfleet\n  namespace: {}",
                ns.name
            )));
        }
        assert!(
            !rendered.contains("secrets"),
            "the chart must not grant access to Secrets"
        );
        // No wildcard in what the chart grants (the FlowSchemas' wildcards only match
        // the controller's own requests).
        for rbac in rendered
            .split("\n---")
            .filter(|d| d.contains("kind: ClusterRole\n") || d.contains("kind: Role\n"))
        {
            assert!(
                !rbac.contains("'*'") && !rbac.contains("[\"*\"]") && !rbac.contains("- '*'"),
                "{rbac}"
            );
        }
        let mut apply = tb
            .kubectl()
            .args(["apply", "--dry-run=server", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        apply
            .stdin
            .take()
            .unwrap()
            .write_all(rendered.as_bytes())
            .unwrap();
        let out = apply.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "dry-run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bad_values_fail_at_install_with_a_clear_message() {
    let tb = Testbed::get();
    for (set, expect) in [
        ("controller.cloud=gcp", "/controller/cloud"),
        ("replicaCount=0", "/replicaCount"),
        ("controller.region=Oregon", "/controller/region"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ] {
        let out = helm(tb)
            .args([
                "install",
                "bad",
                &chart(),
                "--dry-run",
                "--namespace",
                "default",
                "--set",
                set,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(err.contains(expect), "{set}: {err}");
    }
}

#[test]
fn helm_install_into_the_testbed() {
    let tb = Testbed::get();
    let suffix = unique_suffix();
    let (release, ns) = (format!("inst{suffix}"), format!("sdfleet-inst-{suffix}"));
    let out = support::helm_install(tb, &release, &ns, &["--wait", "--timeout", "120s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tb
        .kubectl()
        .args([
            "-n",
            &ns,
            "get",
            "deployment",
            &format!("{release}-sdfleet"),
            "-o",
            "jsonpath={.status.readyReplicas}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2",
        "two controller replicas (kwok runs the pods)"
    );
    let out = helm(tb)
        .args(["uninstall", &release, "--namespace", &ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = tb
        .kubectl()
        .args(["delete", "namespace", &ns, "--wait=false"])
        .output();
}

/// The apiserver's priority and fairness puts the controller's requests in their own
/// priority level (the chart's FlowSchemas), and its Lease renewals in
/// `leader-election`, while the node agents stay in `workload-low`: a thousand agents
/// reporting at once do not queue the controller behind them. Read from the headers
/// with which the apiserver names the priority level of each request.
#[tokio::test]
async fn the_controller_is_served_apart_from_the_node_agents() {
    use kube::api::{Api, ListParams};
    use sdfleet::crd::ModelSet;

    let tb = Testbed::get();
    support::install_crds(tb);
    let (release, release_ns) = support::install_release(tb, "apf");
    let admin = tb.client().await;
    let levels: Api<k8s_openapi::api::flowcontrol::v1::PriorityLevelConfiguration> =
        Api::all(admin.clone());
    let mut uid_of = std::collections::HashMap::new();
    for level in ["workload-high", "workload-low", "leader-election"] {
        let uid = levels.get(level).await.unwrap().metadata.uid.unwrap();
        uid_of.insert(uid, level);
    }
    let level_of = |client: kube::Client, path: String| {
        let uid_of = uid_of.clone();
        async move {
            let request = http::Request::get(path).body(Vec::new()).unwrap();
            let response = client.send(request.map(Into::into)).await.unwrap();
            let uid = response
                .headers()
                .get("X-Kubernetes-PF-PriorityLevel-UID")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            uid_of.get(&uid).copied().unwrap_or("another level")
        }
    };
    let controller = support::client_from(&support::impersonating_kubeconfig(
        tb,
        &release_ns,
        &format!("{release}-sdfleet"),
    ))
    .await;
    let agent = support::client_from(&support::agent_kubeconfig(tb, &release_ns, "apf-node")).await;
    // The apiserver names the level even of a refused request: first make sure the
    // controller's identity is allowed the list whose level is read below.
    Api::<ModelSet>::all(controller.clone())
        .list(&ListParams::default().limit(1))
        .await
        .unwrap();
    let lists = "/apis/sdfleet.io/v1alpha1/modelsets?limit=1".to_string();
    let lease =
        format!("/apis/coordination.k8s.io/v1/namespaces/{release_ns}/leases/sdfleet-controller");
    assert_eq!(
        level_of(controller.clone(), lists.clone()).await,
        "workload-high"
    );
    assert_eq!(level_of(controller, lease).await, "leader-election");
    assert_eq!(level_of(agent, lists).await, "workload-low");

    support::uninstall_release(tb, &release, &release_ns);
    let schemas: Api<k8s_openapi::api::flowcontrol::v1::FlowSchema> = Api::all(admin);
    let left = schemas
        .get_opt(&format!("{release}-sdfleet-workload"))
        .await
        .unwrap();
    assert!(left.is_none(), "uninstall leaves no FlowSchema behind");
}

/// With `controller.watchNamespace`, the controller runs under the chart's identity with
/// only a Role in that namespace (plus cluster-scoped kinds): a fleet there still becomes
/// Ready, and the identity cannot touch Deployments elsewhere.
#[tokio::test]
async fn a_namespace_scoped_install_runs_its_fleets_under_a_role() {
    use kube::api::{Api, Patch, PatchParams};
    use sdfleet::crd::ComfyUIDeployment;
    use serde_json::json;

    let tb = Testbed::get();
    support::install_crds(tb);
    let client = tb.client().await;
    let fleets_ns = TestNamespace::new(&client, "scoped").await;
    let suffix = unique_suffix();
    let (release, release_ns) = (
        format!("scoped{suffix}"),
        format!("sdfleet-scoped-{suffix}"),
    );
    let scope = format!(
        "replicaCount=1,controller.watchNamespace={}",
        fleets_ns.name
    );
    let out = support::helm_install(tb, &release, &release_ns, &["--set", &scope]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sa = format!("system:serviceaccount:{release_ns}:{release}-sdfleet");
    for (ns, want) in [(fleets_ns.name.as_str(), "yes"), ("default", "no")] {
        let out = tb
            .kubectl()
            .args([
                "auth",
                "can-i",
                "create",
                "deployments",
                "-n",
                ns,
                "--as",
                &sa,
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "create deployments in {ns}"
        );
    }
    let kubeconfig =
        support::impersonating_kubeconfig(tb, &release_ns, &format!("{release}-sdfleet"));
    let _controller = support::ControllerProcess::start_with_env(
        tb,
        &fleets_ns.name,
        &["--operator-namespace", &release_ns],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let fleets: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &fleets_ns.name);
    let fleet = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment", "metadata": {"name": "f"},
        "spec": {"image": "comfyui:test", "replicas": 0,
                 "storage": {"outputs": {"bucket": "comfyui-out", "prefix": "f/"}}}});
    fleets
        .patch("f", &PatchParams::apply("team"), &Patch::Apply(fleet))
        .await
        .unwrap();
    support::eventually(
        "the fleet Ready under the Role",
        std::time::Duration::from_secs(90),
        || async {
            let status = fleets.get("f").await.ok()?.status?;
            status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == "True")
                .map(|_| ())
        },
    )
    .await;
}
