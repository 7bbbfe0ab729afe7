//! The node agent, run as a local process for a testbed (kwok) GPU node: ComfyUI pods
//! wait on the node's startup taint until the agent has synced the fleet's ModelSet,
//! reported Synced and lifted the taint; later puts and deletes reach the directory.
//!
//! As installed: the controller and the agent act as the chart's ServiceAccounts (the
//! agent's token naming its node, as kubelet's bound tokens do), and the agent runs
//! under `setpriv` with exactly the uid, gid and capabilities of the rendered DaemonSet,
//! on a models root owned by root with mode 0755 (what kubelet makes of the hostPath),
//! after the rendered init step. (No container runtime runs here: see the README.)

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use sdfleet::crd::modelset::NodeSyncState;
use sdfleet::crd::{ComfyUIDeployment, FleetClass, ModelSet, ModelSync};
use serde_json::{Value, json};
use support::{
    ControllerProcess, TestNamespace, Testbed, eventually, install_crds, team_class, unique_suffix,
};

const WAIT: Duration = Duration::from_secs(120);
/// The class's role for reading a team's models (moto issues sessions for any role).
const TENANT_ROLE: &str = "arn:aws:iam::123456789012:role/sdfleet-tenant-models";

/// Serves `body` at `/name` on 127.0.0.1 (a web server as a model hub is one); its port.
async fn serve_file(name: &'static str, body: Vec<u8>) -> u16 {
    let app = axum::Router::new().route(
        &format!("/{name}"),
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn has_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "sdfleet.io/models-not-ready"))
}

/// The pod spec of the agent DaemonSet the controller renders for fleet `sdxl` in `ns`.
fn rendered_daemonset(ns: &str) -> Value {
    use sdfleet::render::{ChildKind, RenderContext, build, nodeclass::Cloud, settings};
    let cud: ComfyUIDeployment = serde_json::from_value(json!({
        "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
        "metadata": {"name": "sdxl", "namespace": ns},
        "spec": {"image": "comfyui:test", "modelSet": "sdxl-models", "nodeClass": {"role": "r"}}}))
    .unwrap();
    let cluster = settings::ClusterSettings {
        cluster_name: Some("testbed".into()),
        region: Some("us-west-2".into()),
        agent: settings::AgentSettings::default(),
        gateway: Default::default(),
    };
    let ctx = RenderContext {
        cluster: &cluster,
        node_class: Cloud::Kwok.provider(),
        model_sync: Default::default(),
    };
    let children = build(&cud, &ctx).unwrap();
    let ds = children
        .iter()
        .find(|c| c.kind == ChildKind::AgentDaemonSet)
        .unwrap();
    ds.manifest["spec"]["template"]["spec"].clone()
}

/// A command that runs the sdfleet binary `bin` as a container with `security` would:
/// its uid and gid, no supplementary groups, exactly its added capabilities, and no new
/// privileges.
fn as_rendered(security: &Value, bin: &Path) -> std::process::Command {
    let uid = security["runAsUser"].as_u64().expect("rendered runAsUser");
    let gid = security["runAsGroup"]
        .as_u64()
        .expect("rendered runAsGroup");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    let added: Vec<String> = security["capabilities"]["add"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| format!("+{}", c.as_str().unwrap().to_lowercase()))
                .collect()
        })
        .unwrap_or_default();
    let caps = std::iter::once("-all".to_string())
        .chain(added)
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        format!("--bounding-set={caps}"),
        format!("--inh-caps={caps}"),
    ]);
    if security["allowPrivilegeEscalation"] == false {
        cmd.arg("--no-new-privs");
    }
    cmd.arg(bin);
    cmd
}

/// The test binary's sdfleet, copied where any user may run it (the build directory is
/// under root's home).
fn world_readable_binary() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdfleet-bin-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("sdfleet");
    std::fs::copy(support::sdfleet_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// The controller of namespace `ns`, as the chart's ServiceAccount of `release`, with
/// its AWS calls sent to `aws` (moto, or a recorder in front of it).
fn start_controller(
    tb: &Testbed,
    ns: &str,
    release: &str,
    release_ns: &str,
    aws: &str,
) -> ControllerProcess {
    let as_controller =
        support::impersonating_kubeconfig(tb, release_ns, &format!("{release}-sdfleet"));
    let mut env = tb.aws_env();
    env.push(("KUBECONFIG", as_controller.to_str().unwrap()));
    env.push(("AWS_ENDPOINT_URL", aws));
    ControllerProcess::start_with_env(tb, ns, &["--operator-namespace", release_ns], &env)
}

/// The name of fleet `sdxl`'s GPU node in `ns`, once it is up with its startup taint.
async fn tainted_gpu_node(nodes: &Api<Node>, ns: &str) -> String {
    let pool = format!("{ns}.sdxl");
    let node = eventually("a GPU node with the startup taint", WAIT, || async {
        let list = nodes
            .list(&ListParams::default().labels(&format!("karpenter.sh/nodepool={pool}")))
            .await
            .ok()?;
        list.items.into_iter().find(has_taint)
    })
    .await;
    node.name_any()
}

/// The node agent of `node_name`, started as the rendered DaemonSet runs it: its init
/// container first (as root with only its capabilities), then the agent under the chart's
/// agent identity (a node-bound token) and its rendered user; and its models root.
fn start_agent(
    tb: &Testbed,
    ns: &str,
    release_ns: &str,
    node_name: &str,
    aws: &str,
) -> (support::KillOnDrop, PathBuf) {
    let as_agent = support::agent_kubeconfig(tb, release_ns, node_name);

    // The models root as kubelet creates a DirectoryOrCreate hostPath: root:root 0755.
    let root = std::env::temp_dir().join(format!("sdfleet-agent-{}", unique_suffix()));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ds = rendered_daemonset(ns);
    let bin = world_readable_binary();
    // The init container, as rendered: root with only its capabilities.
    let init = &ds["initContainers"][0];
    let init_args: Vec<String> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("--root=/models", &format!("--root={}", root.display()))
        })
        .collect();
    let out = as_rendered(&init["securityContext"], &bin)
        .args(&init_args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("sdfleet-agent-{node_name}.log")))
            .unwrap();
    // Killed however the test ends; its stdout must not hold the test's output open.
    let agent = support::KillOnDrop(
        as_rendered(&ds["containers"][0]["securityContext"], &bin)
            .args([
                "agent",
                "--node-name",
                node_name,
                // Far beyond the test: every change below must reach the agent by its watch.
                "--resync-seconds",
                "3600",
                "--models-root",
            ])
            .arg(&root)
            .env("KUBECONFIG", &as_agent)
            // A home the agent's user may read (root's is not).
            .env("HOME", std::env::temp_dir())
            .envs(tb.aws_env())
            .env("AWS_ENDPOINT_URL", aws)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    (agent, root)
}

#[tokio::test]
async fn agent_syncs_reports_and_lifts_the_startup_taint() {
    let tb = Testbed::get();
    install_crds(tb);
    let aws = tb.aws().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&aws)
            .force_path_style(true)
            .build(),
    );
    let bucket = support::create_bucket(&s3, "agent").await;
    let put = |key: &'static str, body: &'static [u8]| {
        let (s3, bucket) = (s3.clone(), bucket.clone());
        async move {
            s3.put_object()
                .bucket(&bucket)
                .key(key)
                .body(ByteStream::from_static(body))
                .send()
                .await
                .unwrap()
        }
    };
    put("checkpoints/sdxl.safetensors", b"checkpoint weights").await;
    put("vae/sdxl_vae.safetensors", b"vae weights").await;

    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "agent").await;
    let (release, release_ns) = support::install_release(tb, "agent");
    // The controller and the agent reach moto through a recorder: the class reads as a
    // tenant role, and every S3 call must be signed by a session of that role.
    let recorder = support::Recorder::start(tb.var("AWS_ENDPOINT_URL")).await;
    let controller = start_controller(tb, &ns.name, &release, &release_ns, &recorder.url);
    let ssa = PatchParams::apply("test-user").force();
    // The team's own class: its namespace, its bucket, read as the class's tenant role.
    let class = team_class(
        &client,
        &ns.name,
        json!({"s3": {"allowedBuckets": [bucket], "tenantRoleArn": TENANT_ROLE}}),
    )
    .await;
    let classes: Api<FleetClass> = Api::all(client.clone());
    let sets: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let ms = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": "sdxl-models"},
        "spec": {"className": class,
                 "source": {"s3": {"bucket": bucket, "region": "us-west-2"}}, "sync": {"pollInterval": "2s"}}});
    sets.patch("sdxl-models", &ssa, &Patch::Apply(ms))
        .await
        .unwrap();
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cud = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment", "metadata": {"name": "sdxl"},
        "spec": {"image": "comfyui:test", "modelSet": "sdxl-models", "className": class,
                 "gpu": {"instanceTypes": ["g5.2xlarge"]}, "ingress": {"enabled": false},
                 "disruption": {"consolidateAfter": "5s"}}});
    cuds.patch("sdxl", &ssa, &Patch::Apply(cud)).await.unwrap();

    // The GPU node comes up with the startup taint, and the ComfyUI pod waits.
    let nodes: Api<Node> = Api::all(client.clone());
    let node_name = tainted_gpu_node(&nodes, &ns.name).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let comfy = ListParams::default().labels("app.kubernetes.io/instance=sdxl");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in pods.list(&comfy).await.unwrap() {
        assert_eq!(
            p.status.and_then(|s| s.phase).as_deref(),
            Some("Pending"),
            "a ComfyUI pod ran before its models"
        );
    }

    // The agent runs as the chart's agent ServiceAccount, so the chart's RBAC and its
    // admission policy are what let it watch its node and its ModelSet, report in its
    // own node's ModelSync and lift its own node's taint.
    let (agent, root) = start_agent(tb, &ns.name, &release_ns, &node_name, &recorder.url);
    let dir = root.join(&ns.name).join("sdxl-models");
    // The agent reports in its own node's ModelSync.
    let reports: Api<ModelSync> = Api::namespaced(client.clone(), &ns.name);
    let report_name = ModelSync::name_for("sdxl-models", &node_name);

    let revision = eventually(
        "the agent to report Synced at the revision",
        WAIT,
        || async {
            let status = sets.get("sdxl-models").await.ok()?.status?;
            let mine = reports.get(&report_name).await.ok()?.spec.report;
            (mine.state == NodeSyncState::Synced
                && mine.revision == status.revision
                && !status.revision.is_empty())
            .then(|| status.revision.clone())
        },
    )
    .await;
    // The controller (listing) and the agent (syncing) read as the class's role, for this
    // team's ModelSet: AssumeRole with the team's session tags, and every S3 call signed
    // by a key such a call returned, none by their own identities.
    let seen = recorder.seen();
    let sessions: Vec<String> = seen
        .iter()
        .filter(|r| r.body.contains("Action=AssumeRole"))
        .map(|r| {
            let role = TENANT_ROLE.replace(':', "%3A").replace('/', "%2F");
            for part in [
                format!("RoleArn={role}"),
                format!("Tags.member.1.Value={}", ns.name),
                "Tags.member.2.Value=sdxl-models".to_string(),
            ] {
                assert!(r.body.contains(&part), "{part} missing from {}", r.body);
            }
            r.response
                .split("<AccessKeyId>")
                .nth(1)
                .and_then(|x| x.split("</AccessKeyId>").next())
                .unwrap()
                .to_string()
        })
        .collect();
    let reads: Vec<_> = seen
        .iter()
        .filter(|r| r.uri.starts_with(&format!("/{bucket}")))
        .collect();
    assert!(!sessions.is_empty() && reads.len() >= 3, "{seen:#?}");
    for r in &reads {
        assert!(
            sessions
                .iter()
                .any(|k| r.authorization.contains(&format!("Credential={k}/"))),
            "an S3 call not signed by a tenant session: {r:?}"
        );
    }
    // The node advertises its GPU (kwok's g5.2xlarge): the agent wrote down when it saw
    // it, for the cold start's GPU phase.
    let gpu_at = eventually("the GPU's time in the report", WAIT, || async {
        reports
            .get(&report_name)
            .await
            .ok()?
            .spec
            .report
            .gpu_allocatable_at
    })
    .await;
    let node = nodes.get(&node_name).await.unwrap();
    assert!(
        gpu_at.0 >= node.metadata.creation_timestamp.unwrap().0,
        "{gpu_at:?}"
    );
    assert_eq!(
        std::fs::read(dir.join("checkpoints/sdxl.safetensors")).unwrap(),
        b"checkpoint weights"
    );
    assert_eq!(
        std::fs::read(dir.join("vae/sdxl_vae.safetensors")).unwrap(),
        b"vae weights"
    );
    eventually("the startup taint to be lifted", WAIT, || async {
        (!has_taint(&nodes.get(&node_name).await.ok()?)).then_some(())
    })
    .await;
    eventually("the ComfyUI pod to run on the node", WAIT, || async {
        pods.list(&comfy).await.ok()?.items.into_iter().find(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name.as_str())
        })
    })
    .await;
    eventually("ModelsReady on the fleet", WAIT, || async {
        let status = cuds.get("sdxl").await.ok()?.status?;
        status
            .conditions
            .iter()
            .find(|c| c.type_ == "ModelsReady" && c.status == "True")
            .map(|_| ())
    })
    .await;

    // A later put reaches the directory; a later delete removes the file.
    put("loras/new.safetensors", b"new lora").await;
    eventually("the new model on the node", WAIT, || async {
        std::fs::read(dir.join("loras/new.safetensors"))
            .ok()
            .filter(|b| b == b"new lora")
    })
    .await;
    s3.delete_object()
        .bucket(&bucket)
        .key("vae/sdxl_vae.safetensors")
        .send()
        .await
        .unwrap();
    eventually("the deleted model gone from the node", WAIT, || async {
        (!dir.join("vae/sdxl_vae.safetensors").exists()).then_some(())
    })
    .await;
    let latest = sets.get("sdxl-models").await.unwrap().status.unwrap();
    assert_ne!(latest.revision, revision);

    // A key that is also a folder cannot be written: the node reports Failed, naming it
    // (the rest arrives), and the fleet's ModelsReady says so.
    put("loras/clash", b"a file").await;
    put("loras/clash/inner", b"a file in a folder of the same name").await;
    let failed = eventually("the agent to report the refused key", WAIT, || async {
        let mine = reports.get(&report_name).await.ok()?.spec.report;
        (mine.state == NodeSyncState::Failed).then(|| mine.message.clone())
    })
    .await;
    assert!(failed.contains("loras/clash"), "{failed}");
    assert_eq!(
        std::fs::read(dir.join("loras/clash/inner")).unwrap(),
        b"a file in a folder of the same name"
    );
    eventually("ModelsReady False with SyncFailed", WAIT, || async {
        let status = cuds.get("sdxl").await.ok()?.status?;
        status
            .conditions
            .iter()
            .find(|c| c.type_ == "ModelsReady" && c.status == "False" && c.reason == "SyncFailed")
            .map(|_| ())
    })
    .await;

    // The same ModelSet from files by URL (a web server on this machine), once the class
    // allows their URLs: the controller lists the list, and the agent fetches each file
    // through the same store trait, checks its SHA-256, and removes what the bucket gave.
    let by_url = b"weights served over http".to_vec();
    let port = serve_file("model", by_url.clone()).await;
    classes
        .patch(
            &class,
            &PatchParams::apply("test-user"),
            &Patch::Merge(json!({"spec": {"models": {"allowedURLs": [format!("http://127.0.0.1:{port}/*")]}}})),
        )
        .await
        .unwrap();
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&by_url));
    sets.patch(
        "sdxl-models",
        &PatchParams::apply("test-user"),
        &Patch::Merge(json!({"spec": {"source": {"s3": null, "urls": [{
            "path": "checkpoints/by-url.safetensors", "url": format!("http://127.0.0.1:{port}/model"),
            "sha256": sha256, "size": by_url.len()}]}}})),
    )
    .await
    .unwrap();
    eventually(
        "the agent to report Synced at the list's revision",
        WAIT,
        || async {
            let status = sets.get("sdxl-models").await.ok()?.status?;
            let mine = reports.get(&report_name).await.ok()?.spec.report;
            (status.object_count == 1
                && mine.state == NodeSyncState::Synced
                && mine.revision == status.revision)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        std::fs::read(dir.join("checkpoints/by-url.safetensors")).unwrap(),
        by_url
    );
    assert!(
        !dir.join("checkpoints/sdxl.safetensors").exists(),
        "the bucket's model stayed after the source changed"
    );
    // Back to the bucket for the rest.
    sets.patch(
        "sdxl-models",
        &PatchParams::apply("test-user"),
        &Patch::Merge(json!({"spec": {"source": {"urls": null, "s3": {"bucket": bucket, "region": "us-west-2"}}}})),
    )
    .await
    .unwrap();
    // Admitted and synced again (the clash with it) before the controller stops.
    eventually("the bucket's models back on the node", WAIT, || async {
        let mine = reports.get(&report_name).await.ok()?.spec.report;
        (mine.state == NodeSyncState::Failed && mine.message.contains("loras/clash")).then_some(())
    })
    .await;

    // The agent decides for itself: with the controller stopped (the ModelSet's status
    // still says admitted), the admin narrows the class to another bucket. The agent
    // reads nothing more and its node says why.
    drop(controller);
    classes
        .patch(
            &class,
            &PatchParams::apply("test-user"),
            &Patch::Merge(json!({"spec": {"s3": {"allowedBuckets": ["another-bucket"]}}})),
        )
        .await
        .unwrap();
    let refused = eventually("the agent to refuse the narrowed class", WAIT, || async {
        let mine = reports.get(&report_name).await.ok()?.spec.report;
        (mine.state == NodeSyncState::Failed
            && mine.message.contains(&format!("FleetClass {class}")))
        .then_some(mine.message)
    })
    .await;
    assert!(refused.contains(&bucket), "{refused}");
    let status = sets.get("sdxl-models").await.unwrap().status.unwrap();
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "the status still admits it: the agent's own check refused it"
    );
    drop(agent);
    let _controller = start_controller(
        tb,
        &ns.name,
        &release,
        &release_ns,
        tb.var("AWS_ENDPOINT_URL"),
    );
    cuds.delete("sdxl", &DeleteParams::default()).await.unwrap();
    eventually("the fleet to be deleted", WAIT, || async {
        cuds.get_opt("sdxl").await.ok()?.is_none().then_some(())
    })
    .await;
    let _ = classes.delete(&class, &DeleteParams::default()).await;
    let _ = std::fs::remove_dir_all(&root);
}

/// Hot models first (`spec.hot`): a new node takes pods once the hot models are on it,
/// complete and verified, and syncs the rest after. The rest is served by a web server
/// that holds it until the test lets it go, so what the node looks like in between is
/// seen, not raced.
#[tokio::test]
async fn a_node_takes_pods_once_its_hot_models_are_on_it_and_gets_the_rest_after() {
    let tb = Testbed::get();
    install_crds(tb);
    let hot = b"the checkpoint a first job loads".to_vec();
    let rest = b"a LoRA nobody asked for yet".to_vec();
    let recent = b"the checkpoint the fleet's recent jobs used".to_vec();
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    // A file the server answers at once.
    let served = |body: &[u8]| {
        let body = body.to_vec();
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        })
    };
    let app = axum::Router::new()
        .route("/recent", served(&recent))
        .route("/hot", served(&hot))
        .route(
            "/rest",
            axum::routing::get({
                let rest = rest.clone();
                move || {
                    let (rest, mut gate) = (rest.clone(), gate.clone());
                    async move {
                        let _ = gate.wait_for(|open| *open).await;
                        rest
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "agent-hot").await;
    let (release, release_ns) = support::install_release(tb, "agent-hot");
    let _controller = start_controller(
        tb,
        &ns.name,
        &release,
        &release_ns,
        tb.var("AWS_ENDPOINT_URL"),
    );
    let ssa = PatchParams::apply("test-user").force();
    let class = team_class(
        &client,
        &ns.name,
        json!({"models": {"allowedURLs": [format!("http://127.0.0.1:{port}/*")]}}),
    )
    .await;
    let classes: Api<FleetClass> = Api::all(client.clone());
    let file = |path: &str, name: &str, body: &[u8]| {
        json!({"path": path, "url": format!("http://127.0.0.1:{port}/{name}"),
               "sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body)), "size": body.len()})
    };
    let sets: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let ms = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": "sdxl-models"},
        "spec": {"className": class, "hot": ["checkpoints/sdxl*"],
                 "source": {"urls": [file("checkpoints/sdxl.safetensors", "hot", &hot),
                                     file("checkpoints/juggernaut.safetensors", "recent", &recent),
                                     file("loras/later.safetensors", "rest", &rest)]}}});
    sets.patch("sdxl-models", &ssa, &Patch::Apply(ms))
        .await
        .unwrap();
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    // Autoscaled (one replica): its gateway publishes demand, recent checkpoints included.
    let cud = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment", "metadata": {"name": "sdxl"},
        "spec": {"image": "comfyui:test", "modelSet": "sdxl-models", "className": class,
                 "gpu": {"instanceTypes": ["g5.2xlarge"]}, "ingress": {"enabled": false},
                 "disruption": {"consolidateAfter": "5s"},
                 "gateway": {"allowUnauthenticated": true},
                 "autoscaling": {"minReplicas": 1, "maxReplicas": 1}}});
    cuds.patch("sdxl", &ssa, &Patch::Apply(cud)).await.unwrap();
    // The fleet's gateway has seen jobs of a checkpoint outside spec.hot (its demand,
    // written here as the gateway writes it).
    cuds.patch_status(
        "sdxl",
        &PatchParams::apply("test-gateway").force(),
        &Patch::Apply(
            json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "status": {"demand": {"queued": 0, "running": 0,
                                  "recentModels": ["checkpoints/juggernaut.safetensors"]}}}),
        ),
    )
    .await
    .unwrap();

    let nodes: Api<Node> = Api::all(client.clone());
    let node_name = tainted_gpu_node(&nodes, &ns.name).await;
    let (_agent, root) = start_agent(
        tb,
        &ns.name,
        &release_ns,
        &node_name,
        tb.var("AWS_ENDPOINT_URL"),
    );
    let dir = root.join(&ns.name).join("sdxl-models");
    let reports: Api<ModelSync> = Api::namespaced(client.clone(), &ns.name);
    let report_name = ModelSync::name_for("sdxl-models", &node_name);

    // With the rest still held by the server: the taint is off, the node says the hot
    // models are there and the rest is syncing, and the ComfyUI pod is placed.
    eventually(
        "the startup taint lifted after the hot models",
        WAIT,
        || async { (!has_taint(&nodes.get(&node_name).await.ok()?)).then_some(()) },
    )
    .await;
    let mine = reports.get(&report_name).await.unwrap().spec.report;
    assert!(
        mine.hot_ready && mine.state == NodeSyncState::Syncing,
        "{mine:?}"
    );
    // The hot models: spec.hot's, and the fleet's recent checkpoint, which the report
    // names so that the gateway may send jobs of it to the node.
    assert_eq!(
        mine.bytes_done,
        (hot.len() + recent.len()) as u64,
        "{mine:?}"
    );
    assert_eq!(
        mine.hot_recent,
        vec!["checkpoints/juggernaut.safetensors".to_string()]
    );
    assert!(mine.message.contains("hot models on the node"), "{mine:?}");
    assert_eq!(
        std::fs::read(dir.join("checkpoints/sdxl.safetensors")).unwrap(),
        hot
    );
    assert_eq!(
        std::fs::read(dir.join("checkpoints/juggernaut.safetensors")).unwrap(),
        recent
    );
    assert!(
        !dir.join("loras/later.safetensors").exists(),
        "the held file is at its final path"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let comfy = ListParams::default().labels("app.kubernetes.io/instance=sdxl");
    eventually("the ComfyUI pod placed on the node", WAIT, || async {
        pods.list(&comfy)
            .await
            .ok()?
            .items
            .iter()
            .any(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node_name))
            .then_some(())
    })
    .await;

    // The rest arrives: the node holds the whole catalog.
    open_gate.send(true).unwrap();
    eventually("the agent to report Synced", WAIT, || async {
        let status = sets.get("sdxl-models").await.ok()?.status?;
        let mine = reports.get(&report_name).await.ok()?.spec.report;
        (mine.state == NodeSyncState::Synced && mine.revision == status.revision && !mine.hot_ready)
            .then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read(dir.join("loras/later.safetensors")).unwrap(),
        rest
    );
    cuds.delete("sdxl", &DeleteParams::default()).await.unwrap();
    eventually("the fleet to be deleted", WAIT, || async {
        cuds.get_opt("sdxl").await.ok()?.is_none().then_some(())
    })
    .await;
    let _ = classes.delete(&class, &DeleteParams::default()).await;
    let _ = std::fs::remove_dir_all(&root);
}
