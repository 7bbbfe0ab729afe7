//! Autoscaling on the testbed, end to end, under the Helm chart's RBAC and admission
//! policies: the controller as the chart's ServiceAccount, the gateway exactly as
//! rendered as its own ServiceAccount, Karpenter (kwok) launching and consolidating GPU
//! nodes, and fake ComfyUI processes standing in for the fleet's kwok pods (each pod,
//! once it has an address, is mapped to a free fake; see `bridge`).
//!
//! One fleet goes through the whole day: from zero on one job (cold start), a burst
//! capped first by maxReplicas then by the NodePool's GPU limit, a scale-down that keeps
//! the pod still running a job, back to zero with its nodes consolidated; its spec is
//! never touched by any of it.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use sdfleet::crd::ComfyUIDeployment;
use sdfleet::crd::autoscaling::ScalingDecision;
use serde_json::{Value, json};
use support::fleet::*;
use support::gateway::*;
use support::*;

const WAIT: Duration = Duration::from_secs(180);

fn fleet_manifest(bucket: &str) -> Value {
    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
    "metadata": {"name": "sdxl"},
    "spec": {
        "image": "comfyui:test",
        "gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 4},
        "disruption": {"consolidateAfter": "5s"},
        "storage": {"outputs": {"bucket": bucket, "prefix": "out/"}},
        "ingress": {"enabled": false},
        "gateway": {"allowUnauthenticated": true, "queueCap": 100},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 6, "targetJobsPerReplica": 4,
                        "scaleDownDelaySeconds": 10, "maxColdStartWaitSeconds": 1},
    }})
}

/// The fleet's last scaling decision, once `wanted` holds for it.
async fn decision_where(
    cuds: &Api<ComfyUIDeployment>,
    what: &str,
    wanted: impl Fn(&ScalingDecision) -> bool,
) -> ScalingDecision {
    eventually(what, WAIT, || async {
        let d = cuds
            .get("sdxl")
            .await
            .ok()?
            .status?
            .autoscaling?
            .last_decision?;
        wanted(&d).then_some(d)
    })
    .await
}

async fn deployment_replicas(deployments: &Api<Deployment>) -> Option<i32> {
    deployments.get("sdxl").await.ok()?.spec?.replicas
}

#[tokio::test]
async fn a_fleet_scales_from_zero_on_demand_to_its_caps_and_back_keeping_busy_pods_and_its_spec() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let (release, release_ns) = install_release(tb, "as");
    let ns = TestNamespace::new(&client, "autoscale").await;
    let _controller = start_controller(tb, &ns.name, &release, &release_ns);
    let s3 = s3_client(tb).await;
    let bucket = create_bucket(&s3, "autoscale").await;
    create_gateway_store(&client, &ns.name).await;

    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    let manifest = fleet_manifest(&bucket);
    cuds.patch(
        "sdxl",
        &PatchParams::apply("test-user").force(),
        &Patch::Apply(&manifest),
    )
    .await
    .unwrap();
    let applied = cuds.get("sdxl").await.unwrap();
    let (generation, spec) = (applied.metadata.generation, applied.spec.clone());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        "the gateway's Deployment and the fleet's at 0 replicas",
        WAIT,
        || async {
            deployments.get("sdxl-gateway").await.ok()?;
            (deployment_replicas(&deployments).await? == 0).then_some(())
        },
    )
    .await;
    let pool = eventually("the fleet's NodePool in its status", WAIT, || async {
        cuds.get("sdxl").await.ok()?.status?.node_pool
    })
    .await;
    assert_eq!(
        nodes_of_pool(&client, &pool).await,
        0,
        "no GPU node at zero"
    );

    // The gateway as rendered, as its ServiceAccount, in front of the fakes.
    let rendered = rendered_gateway_args(&client, &ns.name).await;
    assert!(
        rendered.contains(&"--publish-demand".to_string()),
        "{rendered:?}"
    );
    let (gateway, bridge) = start_rendered_gateway(tb, &client, &ns.name).await;
    let api = ApiClient::new(&gateway.url(""), "unused");
    // The gateway reports an empty fleet: demand 0, nothing decided.
    eventually("demand 0 published", WAIT, || async {
        let d = cuds.get("sdxl").await.ok()?.status?.demand?;
        (d.jobs() == 0).then_some(())
    })
    .await;

    // 1. From zero: one job is held (cold start), a node launches, the job runs.
    let submitted = k8s_openapi::jiff::Timestamp::now();
    let asked = Instant::now();
    let (code, job) = api
        .submit_and_wait(json!({"prompt": sdxl_workflow(CKPT, 2)}), 30)
        .await;
    // maxColdStartWaitSeconds (1; Karpenter alone batches pods for 1 s) caps the sync wait while no pod is ready.
    assert_eq!(code, 202, "{job}");
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "the cold-start wait caps the sync wait"
    );
    assert_eq!(job["waiting"]["reason"], "ColdStart", "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let decision = decision_where(&cuds, "a scale-up decision", |d| d.to >= 1).await;
    let decided_after = decision.time.0.duration_since(submitted);
    println!(
        "scale-up decision {} ms after the job was submitted: {}",
        decided_after.as_millis(),
        decision.message
    );
    assert_eq!(
        (decision.from, decision.to, decision.reason.as_str()),
        (0, 1, "Demand")
    );
    // From a watch event, not a requeue timer (the fastest of those is 5 s).
    assert!(
        decided_after < k8s_openapi::jiff::SignedDuration::from_secs(5),
        "{decided_after:?}"
    );
    let done = api.wait_final(&id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", gateway.log_text());
    assert!(
        nodes_of_pool(&client, &pool).await >= 1,
        "Karpenter launched a node"
    );
    assert_eq!(done["timings"]["cold_start"], true, "{done}");
    let phases = &done["timings"]["cold_start_phases"];
    assert!(
        phases["node_seconds"].as_f64().unwrap() > 0.0,
        "a node had to launch: {done}"
    );
    for phase in ["models_seconds", "image_seconds", "ready_seconds"] {
        assert!(phases[phase].as_f64().is_some(), "{phase} in {done}");
    }
    let cold = cuds
        .get("sdxl")
        .await
        .unwrap()
        .status
        .unwrap()
        .autoscaling
        .unwrap()
        .cold_start
        .unwrap();
    assert!(cold.ready_at.is_some());

    // A long job (80 s) starts before the burst: when the burst has drained and the
    // idle delay passed, the scale-down keeps its pod (busy: the highest deletion
    // cost, do-not-disrupt) and it finishes there.
    let (code, long) = api
        .submit(json!({"prompt": sdxl_workflow(CKPT, 400)}))
        .await;
    assert_eq!(code, 201);
    let long_id = long["id"].as_str().unwrap().to_string();
    let busy_pod = eventually("the long job running", WAIT, || async {
        let j = api.job(&long_id).await;
        (j["state"] == "running")
            .then(|| j["pod"].as_str().map(str::to_string))
            .flatten()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    eventually("the busy pod marked do-not-disrupt", WAIT, || async {
        let p = pods.get(&busy_pod).await.ok()?;
        (p.annotations()
            .get("karpenter.sh/do-not-disrupt")
            .map(String::as_str)
            == Some("true"))
        .then_some(())
    })
    .await;
    // 2. A burst of 40 at 4 per replica: 10 wanted, maxReplicas 6, and the NodePool's
    // limit of 4 GPUs lets 4 run; the status says why the other 2 wait.
    let mut burst = Vec::new();
    for _ in 0..40 {
        let (code, job) = api.submit(json!({"prompt": sdxl_workflow(CKPT, 5)})).await;
        assert_eq!(code, 201, "{job}");
        burst.push(job["id"].as_str().unwrap().to_string());
    }
    eventually("6 replicas decided", WAIT, || async {
        let a = cuds.get("sdxl").await.ok()?.status?.autoscaling?;
        (a.desired_replicas == 6).then_some(())
    })
    .await;
    assert_eq!(deployment_replicas(&deployments).await, Some(6));
    let status = eventually("CapacityAvailable False (NoCapacity)", WAIT, || async {
        let s = cuds.get("sdxl").await.ok()?.status?;
        s.conditions
            .iter()
            .find(|c| c.type_ == "CapacityAvailable" && c.status == "False")
            .cloned()
    })
    .await;
    assert_eq!(status.reason, "NoCapacity");
    assert!(
        status.message.contains("holds 4 of its 4 nvidia.com/gpu"),
        "{}",
        status.message
    );
    let last = burst.last().unwrap();
    let waiting = api.job(last).await;
    if waiting["state"] == "queued" {
        assert_eq!(waiting["waiting"]["reason"], "NoCapacity", "{waiting}");
    }
    assert_eq!(
        nodes_of_pool(&client, &pool).await,
        4,
        "capped at the NodePool's limit"
    );

    // 3. The burst drains (one of its jobs waits behind the long one on its pod), the
    // delay passes: down to the busy pod, while its job still runs.
    eventually("scaled down to the busy pod", WAIT, || async {
        (deployment_replicas(&deployments).await? == 1).then_some(())
    })
    .await;
    let still = api.job(&long_id).await;
    assert_eq!(
        still["state"], "running",
        "scale-down began while it ran: {still}"
    );
    // The status follows the Deployment within the same pass.
    let down = decision_where(&cuds, "the Idle decision in status", |d| d.to == 1).await;
    assert_eq!(down.reason, "Idle", "{}", down.message);
    let done = api.wait_final(&long_id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1, "never handed to another pod: {done}");
    assert!(
        pods.get(&busy_pod).await.is_ok(),
        "the busy pod stayed to the end of its job"
    );
    for id in &burst {
        let done = api.wait_final(id, WAIT).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }

    // Back to minReplicas 0 after the delay, and the empty nodes go.
    eventually("0 replicas", WAIT, || async {
        (deployment_replicas(&deployments).await? == 0).then_some(())
    })
    .await;
    eventually("the GPU nodes consolidated away", WAIT, || async {
        (nodes_of_pool(&client, &pool).await == 0).then_some(())
    })
    .await;

    // 4. No drift for Argo CD: scaling never wrote the spec.
    let after = cuds.get("sdxl").await.unwrap();
    assert_eq!(
        after.metadata.generation, generation,
        "the spec was never written"
    );
    assert_eq!(after.spec, spec);
    let spec_managers: BTreeSet<String> = after
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter(|m| m.subresource.is_none())
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:spec").is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(spec_managers, BTreeSet::from(["test-user".to_string()]));
    // The gateway wrote the demand, and only that, under its own manager.
    let events = tb
        .kubectl()
        .args([
            "get",
            "events",
            "-n",
            &ns.name,
            "--field-selector",
            "reason=Scaled",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&events.stdout).trim().is_empty(),
        "Scaled events"
    );

    drop(bridge);
    drop(gateway);
    cuds.delete("sdxl", &Default::default()).await.unwrap();
    eventually("the fleet gone", WAIT, || async {
        cuds.get_opt("sdxl").await.ok()?.is_none().then_some(())
    })
    .await;
    uninstall_release(tb, &release, &release_ns);
}

/// The admission policy: a gateway writes only `status.demand`, and only its own fleet's.
#[tokio::test]
async fn a_gateway_may_write_only_its_own_fleets_demand() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let (release, release_ns) = install_release(tb, "asp");
    let ns = TestNamespace::new(&client, "autoscale-policy").await;
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    for name in ["mine", "theirs"] {
        let mut m = fleet_manifest("bucket-x");
        m["metadata"]["name"] = json!(name);
        cuds.patch(
            name,
            &PatchParams::apply("test-user").force(),
            &Patch::Apply(&m),
        )
        .await
        .unwrap();
    }
    // The gateway's RBAC as the controller would bind it (no controller runs here).
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "mine-gateway", "namespace": ns.name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{release}-sdfleet-gateway")},
        "subjects": [{"kind": "ServiceAccount", "name": "mine-gateway", "namespace": ns.name}]});
    let bindings: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
        )),
    );
    bindings
        .patch(
            "mine-gateway",
            &PatchParams::apply("test-user"),
            &Patch::Apply(&binding),
        )
        .await
        .unwrap();
    let as_gateway = impersonating_kubeconfig(tb, &ns.name, "mine-gateway");
    let gw = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&as_gateway).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let gw_cuds: Api<ComfyUIDeployment> = Api::namespaced(gw, &ns.name);
    let params = PatchParams::apply(sdfleet::gateway::fleet_status::FIELD_MANAGER).force();
    let demand = |name: &str| {
        sdfleet::gateway::fleet_status::demand_patch(
            name,
            &sdfleet::gateway::demand::Demand {
                queued: 3,
                running: 1,
                busy_pods: vec!["p".into()],
                recent_models: Vec::new(),
            },
        )
    };
    // A new RoleBinding takes a moment to reach the apiserver's authorizer: only a 403
    // is retried.
    eventually(
        "its own demand written",
        Duration::from_secs(30),
        || async {
            match gw_cuds
                .patch_status("mine", &params, &Patch::Apply(demand("mine")))
                .await
            {
                Ok(_) => Some(()),
                Err(kube::Error::Api(e)) if e.code == 403 => None,
                Err(e) => panic!("its own demand: {e}"),
            }
        },
    )
    .await;
    let stored = cuds
        .get("mine")
        .await
        .unwrap()
        .status
        .unwrap()
        .demand
        .unwrap();
    assert_eq!((stored.queued, stored.running), (3, 1));
    // The chart's policy was installed a moment ago: the apiserver loads it shortly after.
    let dry_run = PatchParams {
        dry_run: true,
        ..params.clone()
    };
    let theirs = Patch::Apply(demand("theirs"));
    support::wait_for_policy(|| gw_cuds.patch_status("theirs", &dry_run, &theirs)).await;
    let err = gw_cuds
        .patch_status("theirs", &params, &Patch::Apply(demand("theirs")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("its own fleet only"), "{err}");
    let mut forged = demand("mine");
    forged["status"]["autoscaling"] = json!({"desiredReplicas": 6});
    let err = gw_cuds
        .patch_status("mine", &params, &Patch::Apply(forged))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only status.demand"), "{err}");
    uninstall_release(tb, &release, &release_ns);
}
