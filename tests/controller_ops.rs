//! Operating the controller: leader election between two processes, and the metrics
//! and health endpoints.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use sdfleet::crd::{ComfyUIDeployment, ModelSet};
use serde_json::json;
use support::{ControllerProcess, TestNamespace, Testbed, eventually, http_get, install_crds};

fn fleet(name: &str, replicas: i32) -> serde_json::Value {
    json!({
        "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment", "metadata": {"name": name},
        "spec": {"image": "comfyui:test", "replicas": replicas, "ingress": {"enabled": false}}
    })
}

#[tokio::test]
async fn standby_takes_over_when_the_leader_is_killed() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "leader").await;
    let args = [
        "--leader-elect",
        "--leader-election-namespace",
        ns.name.as_str(),
    ];
    let mut a = ControllerProcess::start_with_env(tb, &ns.name, &args, &[("POD_NAME", "ctl-a")]);
    let mut b = ControllerProcess::start_with_env(tb, &ns.name, &args, &[("POD_NAME", "ctl-b")]);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = || async {
        leases
            .get_opt("sdfleet-controller")
            .await
            .ok()??
            .spec?
            .holder_identity
    };
    let leader = eventually("a leader", Duration::from_secs(60), || async {
        holder().await
    })
    .await;

    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let ssa = PatchParams::apply("test-user").force();
    cuds.patch("ha", &ssa, &Patch::Apply(fleet("ha", 0)))
        .await
        .unwrap();
    eventually(
        "the leader to create the Deployment",
        Duration::from_secs(60),
        || async { deployments.get_opt("ha").await.ok()? },
    )
    .await;
    // Only the leader reconciles.
    let (leading, standby) = if leader == "ctl-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        leading
            .metric_sum("sdfleet_reconciles_total")
            .await
            .unwrap()
            > 0.0
    );
    assert_eq!(
        standby
            .metric_sum("sdfleet_reconciles_total")
            .await
            .unwrap(),
        0.0
    );

    // Kill the leader as a crash would; change the fleet after the kill.
    leading.child.kill().unwrap();
    leading.child.wait().unwrap();
    let killed = Instant::now();
    cuds.patch("ha", &ssa, &Patch::Apply(fleet("ha", 2)))
        .await
        .unwrap();
    let new_leader = eventually(
        "the standby to take the lease",
        Duration::from_secs(30),
        || async { holder().await.filter(|h| *h != leader) },
    )
    .await;
    eventually(
        "the new leader to reconcile the change",
        Duration::from_secs(30),
        || async { (deployments.get("ha").await.ok()?.spec?.replicas == Some(2)).then_some(()) },
    )
    .await;
    let takeover = killed.elapsed();
    println!("takeover by {new_leader} and reconcile of the change: {takeover:?}");
    assert!(standby.is_running());
    // Within the lease (15 s) plus one renew period; the issue asks for 20 s.
    assert!(
        takeover < Duration::from_secs(20),
        "takeover took {takeover:?}"
    );

    cuds.delete("ha", &DeleteParams::default()).await.unwrap();
    eventually("cleanup", Duration::from_secs(60), || async {
        cuds.get_opt("ha").await.ok()?.is_none().then_some(())
    })
    .await;

    // A leader stopped cleanly (SIGTERM) exits 0 and lets the lease go at once, so a
    // rolling update does not wait out the lease.
    let status = standby.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    eventually(
        "the stopped leader to release the lease",
        Duration::from_secs(5),
        || async {
            let lease = leases.get("sdfleet-controller").await.ok()?;
            let holder = lease.spec?.holder_identity;
            holder.is_none_or(|h| h.is_empty()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn metrics_and_health_endpoints_serve_the_documented_series() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "metrics").await;
    let controller = ControllerProcess::start(tb, &ns.name, &[]);
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    let ssa = PatchParams::apply("test-user").force();
    cuds.patch("m", &ssa, &Patch::Apply(fleet("m", 0)))
        .await
        .unwrap();
    // A fleet whose IngressClass does not exist: a reconcile error by reason.
    let mut broken = fleet("broken", 0);
    broken["spec"]["ingress"] = json!({"enabled": true, "className": "no-such-class"});
    cuds.patch("broken", &ssa, &Patch::Apply(broken))
        .await
        .unwrap();
    // A ModelSet whose bucket does not exist: the ModelSet controller's own series.
    let sets: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let set = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
        "metadata": {"name": "nowhere"},
        "spec": {"source": {"s3": {"bucket": "sdfleet-no-such-bucket"}}}});
    sets.patch("nowhere", &ssa, &Patch::Apply(set))
        .await
        .unwrap();
    let text = eventually(
        "fleet gauges and an error in /metrics",
        Duration::from_secs(60),
        || async {
            controller.metrics().await.filter(|t| {
                t.contains("sdfleet_fleet_desired_replicas{")
                    && t.contains("sdfleet_reconcile_errors_total{controller=\"comfyuideployment\"")
                    && t.contains("sdfleet_reconcile_errors_total{controller=\"modelset\"")
            })
        },
    )
    .await;
    for series in [
        "sdfleet_reconciles_total{controller=\"comfyuideployment\",result=\"success\"}",
        "sdfleet_reconciles_total{controller=\"modelset\",result=\"error\"}",
        "sdfleet_reconcile_errors_total{controller=\"modelset\",reason=\"ListFailed\"}",
        "sdfleet_reconcile_duration_seconds_count{controller=\"comfyuideployment\"}",
        "sdfleet_reconcile_duration_seconds_count{controller=\"modelset\"}",
        "sdfleet_kube_writes_total{",
        "sdfleet_drift_repairs_total",
        "sdfleet_fleet_desired_replicas{",
        "sdfleet_fleet_ready_replicas{",
        "sdfleet_reconcile_errors_total{controller=\"comfyuideployment\",reason=\"MissingDependency\"}",
        "sdfleet_reconciles_total{controller=\"comfyuideployment\",result=\"error\"}",
    ] {
        assert!(
            text.contains(series),
            "{series} missing from /metrics:\n{text}"
        );
    }
    assert!(text.contains(&format!("namespace=\"{}\"", ns.name)));
    assert_eq!(
        http_get(controller.metrics_port, "/healthz")
            .await
            .as_deref(),
        Some("ok")
    );
    assert_eq!(
        http_get(controller.metrics_port, "/readyz")
            .await
            .as_deref(),
        Some("ok")
    );
    for name in ["m", "broken"] {
        cuds.delete(name, &DeleteParams::default()).await.unwrap();
        eventually("cleanup", Duration::from_secs(60), || async {
            cuds.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
    }

    // SIGTERM: a graceful stop with exit status 0, within a bounded wait.
    let mut controller = controller;
    let status = controller.terminate().await;
    assert!(status.success(), "exit status {status:?}");
}
