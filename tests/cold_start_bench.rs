//! Cold start end to end on the testbed: a fleet at zero gets one job, and the clock runs
//! from its submit to the job running on a new node. Two fleets, one after the other in
//! one run, over the same ModelSet of several GB served by a fast local S3 server
//! (versitygw, started by `bench/cold-start-bench.py`, which runs this and writes
//! bench/cold-start.md):
//! - case A: the ModelSet without `hot`, so the node's whole ModelSet syncs before its
//!   startup taint lifts (the behaviour before hot models);
//! - case B: the same ModelSet with the job's checkpoint as its hot set.
//!
//! Everything but the GPU is real: the controller as the chart's ServiceAccount, Karpenter
//! (kwok) launching the node, the node agent (a release build, as root on this machine;
//! started the moment the node appears, as its DaemonSet pod would be) syncing from the
//! S3 server to this machine's disk, the gateway as rendered, and a fake ComfyUI for the
//! pod. Node boot, the GPU driver and the image pull are not here: the README's table
//! adds them from published figures. Ignored in the suite: it is a benchmark.
//!
//! Input (set by the driver): SDFLEET_BENCH_S3_ENDPOINT, SDFLEET_BENCH_BUCKET,
//! SDFLEET_BENCH_HOT (the hot checkpoint's file name under `checkpoints/`),
//! SDFLEET_BENCH_AGENT_BIN, and the server's credentials in AWS_ACCESS_KEY_ID and
//! AWS_SECRET_ACCESS_KEY.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use sdfleet::crd::{ComfyUIDeployment, ModelSet};
use serde_json::{Value, json};
use support::fleet::*;
use support::gateway::*;
use support::*;

/// Bounds every wait: a whole ModelSet of 12 GB syncs in well under this here.
const WAIT: Duration = Duration::from_secs(900);
const STARTUP_TAINT: &str = "sdfleet.io/models-not-ready";

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by bench/cold-start-bench.py"))
}

fn tainted(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == STARTUP_TAINT))
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 100.0).round() / 100.0
}

/// One case: a fresh namespace, controller, fleet at zero and gateway; one job through.
async fn one_case(tb: &Testbed, case: &str, hot: Option<&str>) -> Value {
    let (endpoint, bucket, ckpt) = (
        var("SDFLEET_BENCH_S3_ENDPOINT"),
        var("SDFLEET_BENCH_BUCKET"),
        var("SDFLEET_BENCH_HOT"),
    );
    let agent_bin = PathBuf::from(var("SDFLEET_BENCH_AGENT_BIN"));
    let client = tb.client().await;
    let (release, release_ns) = install_release(tb, &format!("cs{}", case.to_lowercase()));
    let ns = TestNamespace::new(&client, &format!("coldstart-{}", case.to_lowercase())).await;
    let keys: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k == "AWS_ACCESS_KEY_ID" || k == "AWS_SECRET_ACCESS_KEY")
        .collect();
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _controller = start_controller_with_env(tb, &ns.name, &release, &release_ns, &[], &keys);
    let s3 = s3_client(tb).await;
    let outputs = create_bucket(&s3, "coldstart").await;
    create_gateway_store(&client, &ns.name).await;

    let ssa = PatchParams::apply("bench").force();
    let sets: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let mut set_spec = json!({"source": {"s3": {"bucket": bucket, "region": "us-east-1",
                                                "endpoint": endpoint}},
                              "sync": {"pollInterval": "1h"}});
    if let Some(hot) = hot {
        set_spec["hot"] = json!([hot]);
    }
    sets.patch(
        "models",
        &ssa,
        &Patch::Apply(
            json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
                             "metadata": {"name": "models"}, "spec": set_spec}),
        ),
    )
    .await
    .unwrap();
    eventually("the ModelSet Ready with its catalog", WAIT, || async {
        let s = sets.get("models").await.ok()?.status?;
        (!s.revision.is_empty()).then_some(())
    })
    .await;
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    cuds.patch(
        "sdxl",
        &ssa,
        &Patch::Apply(
            json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "metadata": {"name": "sdxl"},
            "spec": {"image": "comfyui:test", "modelSet": "models",
                     "gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 1},
                     "disruption": {"consolidateAfter": "30s"},
                     "storage": {"outputs": {"bucket": outputs, "prefix": "out/"}},
                     "ingress": {"enabled": false},
                     "gateway": {"allowUnauthenticated": true, "queueCap": 10},
                     "autoscaling": {"minReplicas": 0, "maxReplicas": 1,
                                     "scaleDownDelaySeconds": 600,
                                     "maxColdStartWaitSeconds": 1}}}),
        ),
    )
    .await
    .unwrap();
    let pool = eventually("the fleet's NodePool", WAIT, || async {
        cuds.get("sdxl").await.ok()?.status?.node_pool
    })
    .await;
    let (gateway, _bridge) =
        start_rendered_gateway_serving(tb, &client, &ns.name, vec![format!("checkpoints/{ckpt}")])
            .await;
    let api = ApiClient::new(&gateway.url(""), "unused");
    let root = std::env::temp_dir().join(format!("sdfleet-coldstart-{}", ns.name));
    std::fs::create_dir_all(&root).unwrap();

    // The job, and a watch on its node: the agent starts the moment the node exists.
    let submitted = Instant::now();
    let (code, job) = api.submit(json!({"prompt": sdxl_workflow(&ckpt, 1)})).await;
    assert!(code == 201 || code == 202, "{code} {job}");
    let id = job["id"].as_str().unwrap().to_string();
    let nodes: Api<Node> = Api::all(client.clone());
    let by_pool = ListParams::default().labels(&format!("karpenter.sh/nodepool={pool}"));
    let mut agent = None;
    let (mut node_at, mut untainted_at, mut running_at) = (None, None, None);
    let mut seen_taint = false;
    let deadline = Instant::now() + WAIT;
    while running_at.is_none() && Instant::now() < deadline {
        if let Ok(list) = nodes.list(&by_pool).await
            && let Some(node) = list.items.first()
        {
            // The agent's DaemonSet pod starts on a registered node, which carries the
            // startup taint (the kubelet registers with it; kwok's node gets it a moment
            // after it appears).
            if agent.is_none() && tainted(node) {
                node_at = Some(submitted.elapsed());
                let name = node.name_any();
                let log = std::fs::File::create(
                    std::env::temp_dir().join(format!("sdfleet-coldstart-agent-{name}.log")),
                )
                .unwrap();
                agent = Some(KillOnDrop(
                    std::process::Command::new(&agent_bin)
                        .args(["agent", "--node-name", &name, "--resync-seconds", "3600"])
                        .arg("--models-root")
                        .arg(&root)
                        .env("KUBECONFIG", agent_kubeconfig(tb, &release_ns, &name))
                        .envs(keys.iter().copied())
                        .stdout(std::process::Stdio::null())
                        .stderr(log)
                        .spawn()
                        .unwrap(),
                ));
            }
            // Karpenter registers the node first and taints it a moment later.
            seen_taint |= tainted(node);
            if untainted_at.is_none() && seen_taint && !tainted(node) {
                untainted_at = Some(submitted.elapsed());
            }
        }
        if api.job(&id).await["state"] == "running" || api.job(&id).await["state"] == "succeeded" {
            running_at = Some(submitted.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running_at = running_at.expect("the job running within the bound");
    let done = api.wait_final(&id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let (node_at, untainted_at) = (node_at.unwrap(), untainted_at.unwrap());
    let decision = cuds
        .get("sdxl")
        .await
        .unwrap()
        .status
        .and_then(|s| s.autoscaling)
        .and_then(|a| a.last_decision)
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/instance=sdxl"))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .unwrap();
    let pod_ready = pod
        .status
        .and_then(|s| s.conditions)
        .and_then(|c| c.into_iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time)
        .unwrap();
    let synced_bytes: u64 = walk_bytes(&root);
    // Times on the apiserver's clock, as offsets from the decision, kept to whole seconds
    // (the API's resolution); the rest from this process's monotonic clock.
    let result = json!({
        "case": case,
        "hot": hot,
        "submit_to_node_s": secs(node_at),
        "models_s": secs(untainted_at - node_at),
        "submit_to_taint_lifted_s": secs(untainted_at),
        "taint_lifted_to_running_s": secs(running_at - untainted_at),
        "submit_to_running_s": secs(running_at),
        "decision_to_pod_ready_s": pod_ready.0.duration_since(decision.time.0).as_secs_f64(),
        "bytes_on_node_at_end": synced_bytes,
        "job_timings": done["timings"],
    });
    drop(agent);
    cuds.delete("sdxl", &DeleteParams::default()).await.unwrap();
    eventually("the fleet gone", WAIT, || async {
        cuds.get("sdxl").await.is_err().then_some(())
    })
    .await;
    let _ = std::fs::remove_dir_all(&root);
    uninstall_release(tb, &release, &release_ns);
    result
}

fn walk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

#[tokio::test]
#[ignore = "benchmark: bench/cold-start-bench.py"]
async fn a_fleet_at_zero_runs_its_first_job_whole_set_against_hot_set() {
    let tb = Testbed::get();
    install_crds(tb);
    let hot = format!("checkpoints/{}", var("SDFLEET_BENCH_HOT"));
    // B first half the time would be fairer still; the driver alternates by its round.
    let order: Vec<(&str, Option<&str>)> = if std::env::var("SDFLEET_BENCH_B_FIRST").is_ok() {
        vec![("B", Some(hot.as_str())), ("A", None)]
    } else {
        vec![("A", None), ("B", Some(hot.as_str()))]
    };
    for (case, hot) in order {
        let result = one_case(tb, case, hot).await;
        println!("COLDSTART {result}");
    }
}
