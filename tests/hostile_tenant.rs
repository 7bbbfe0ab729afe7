//! Tenants who try: team B, under the chart's identities and policies (its own
//! ServiceAccount bound to the built-in `edit` role, which the chart aggregates sdfleet's
//! kinds into, plus the status rights the attacker holds), tries each way into
//! team A's nodes, buckets, hosts and classes, and each is refused at apply or by the
//! controller with a condition that names it, and nothing is created for it. The
//! controller's own token cannot write into a system namespace or run a foreign pod.
//! And what a fleet owns converges: a hand edit of its NodePool, EC2NodeClass, volume or
//! NetworkPolicy is undone, and an admin's object under a fleet's name is never touched.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use sdfleet::crd::{ComfyUIDeployment, FleetClass, ModelSet};
use serde_json::{Value, json};
use support::{
    TestNamespace, Testbed, client_from, eventually, impersonating_kubeconfig, install_crds,
    unique_suffix, wait_for_policy,
};

const WAIT: Duration = Duration::from_secs(90);

fn gvk_api(client: &Client, group: &str, version: &str, kind: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Api::all_with(client.clone(), &ar)
}

/// A FleetClass of this `spec`, applied as the platform admin.
async fn apply_class(admin: &Client, name: &str, spec: Value) {
    Api::<FleetClass>::all(admin.clone())
        .patch(
            name,
            &PatchParams::apply("platform-admin"),
            &Patch::Apply(
                json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "FleetClass",
                "metadata": {"name": name}, "spec": spec}),
            ),
        )
        .await
        .unwrap();
}

/// The apiserver refused `result`, and its message says `says`.
fn refused<T: std::fmt::Debug>(result: Result<T, kube::Error>, says: &str) {
    match result {
        Err(kube::Error::Api(e)) => assert!(
            e.message.contains(says),
            "refused, but not for {says:?}: {}",
            e.message
        ),
        other => panic!("expected a refusal ({says}), got {other:?}"),
    }
}

/// `{label: "true"}`.
fn label_true(label: &str) -> Value {
    json!(std::collections::BTreeMap::from([(label, "true")]))
}

/// A release of the chart whose tenant namespaces carry a label of its own (the
/// policies of releases other tests install beside it bind to theirs), uninstalled when
/// dropped, so a failed test leaves no policies behind.
struct Release {
    tb: &'static Testbed,
    name: String,
    namespace: String,
    label: String,
}

impl Release {
    fn install(tb: &'static Testbed, name: &str) -> Release {
        let suffix = unique_suffix();
        let (release, namespace) = (
            format!("{name}{suffix}"),
            format!("sdfleet-{name}-{suffix}"),
        );
        let label = format!("{release}.tenant.example/enabled");
        let out = support::helm_install(
            tb,
            &release,
            &namespace,
            &[
                "--set",
                "replicaCount=1",
                "--set",
                &format!("tenants.namespaceLabel={label}"),
            ],
        );
        assert!(
            out.status.success(),
            "helm install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Release {
            tb,
            name: release,
            namespace,
            label,
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = support::helm_uninstall(self.tb, &self.name, &self.namespace, &[]);
    }
}

/// What both tests start from: a release, tenant namespaces for teams A and B, and
/// team B's deployer.
struct Teams {
    release: Release,
    admin: Client,
    team_a: TestNamespace,
    team_b: TestNamespace,
    tenant: Client,
}

impl Teams {
    async fn new(tb: &'static Testbed, name: &str) -> Teams {
        install_crds(tb);
        let admin = tb.client().await;
        let release = Release::install(tb, name);
        let team_a = tenant_namespace(&admin, "team-a", &release.label).await;
        let team_b = tenant_namespace(&admin, "team-b", &release.label).await;
        let tenant = deployer(tb, &admin, &team_b.name).await;
        Teams {
            release,
            admin,
            team_a,
            team_b,
            tenant,
        }
    }
}

/// A test namespace labelled as a tenant namespace of this release (`label`: "true").
async fn tenant_namespace(client: &Client, prefix: &str, label: &str) -> TestNamespace {
    let ns = TestNamespace::new(client, prefix).await;
    Api::<Namespace>::all(client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": label_true(label)}})),
        )
        .await
        .unwrap();
    ns
}

/// Team B's deployer: a ServiceAccount bound to `edit` in its namespace, plus the status
/// rights a careless admin grants (the attacker of the issue holds them).
async fn deployer(tb: &Testbed, admin: &Client, ns: &str) -> Client {
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "deployer-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "deployer", "namespace": ns}]}))
    .unwrap();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "status-writer"},
        "rules": [{"apiGroups": ["sdfleet.io"],
                   "resources": ["modelsets/status", "comfyuideployments/status"],
                   "verbs": ["get", "update", "patch"]}]}))
    .unwrap();
    let status_binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "deployer-status"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "status-writer"},
        "subjects": [{"kind": "ServiceAccount", "name": "deployer", "namespace": ns}]}))
    .unwrap();
    let pp = PostParams::default();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&pp, &role)
        .await
        .unwrap();
    let bindings = Api::<RoleBinding>::namespaced(admin.clone(), ns);
    bindings.create(&pp, &binding).await.unwrap();
    bindings.create(&pp, &status_binding).await.unwrap();
    // `edit` gets sdfleet's kinds by aggregation, which the controller manager applies a
    // moment after the chart's install: every refusal below must be the policy's, not
    // RBAC's.
    let user = format!("system:serviceaccount:{ns}:deployer");
    for resource in ["comfyuideployments.sdfleet.io", "modelsets.sdfleet.io"] {
        eventually(&format!("{user} may create {resource}"), WAIT, || async {
            support::gateway::can_i(tb, &user, "create", resource, ns).then_some(())
        })
        .await;
    }
    client_from(&impersonating_kubeconfig(tb, ns, "deployer")).await
}

/// The Ready condition (status, reason, message) of a fleet or ModelSet, once it has one.
async fn ready_of<K>(api: &Api<K>, name: &str) -> Option<(String, String, String)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let object = serde_json::to_value(api.get_opt(name).await.ok()??).ok()?;
    let c = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?
        .clone();
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((s("status"), s("reason"), s("message")))
}

/// Waits for `name`'s Ready=False with reason `reason`; returns the message.
async fn refusal<K>(api: &Api<K>, name: &str, reason: &str) -> String
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let (status, _, message) = eventually(&format!("{name} {reason}"), WAIT, || async {
        ready_of(api, name).await.filter(|r| r.1 == reason)
    })
    .await;
    assert_eq!(status, "False", "{name}: {message}");
    message
}

#[tokio::test]
async fn a_hostile_tenant_is_refused_at_apply() {
    let tb = Testbed::get();
    let Teams {
        release,
        admin,
        team_a,
        team_b,
        tenant,
    } = Teams::new(tb, "hostile").await;
    let release_ns = release.namespace.clone();
    let release = release.name.clone();

    // Team A's class: for team A's namespace only.
    let class_a = format!("team-a-{}", unique_suffix());
    apply_class(&admin, &class_a, json!({"nodeClass": {"role": "NodeRole-team-a"},
                         "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": team_a.name}}})).await;
    let fleet = |class: &str| -> ComfyUIDeployment {
        serde_json::from_value(json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "metadata": {"name": "borrow"},
            "spec": {"image": "comfyui:test", "replicas": 0, "className": class, "ingress": {"enabled": false}}}))
        .unwrap()
    };
    let b_fleets: Api<ComfyUIDeployment> = Api::namespaced(tenant.clone(), &team_b.name);
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    // Another team's class: refused at apply.
    let borrowed = fleet(&class_a);
    wait_for_policy(|| b_fleets.create(&dry, &borrowed)).await;
    refused(
        b_fleets
            .create(&PostParams::default(), &fleet(&class_a))
            .await,
        &format!("FleetClass {class_a} is not for namespace {}", team_b.name),
    );
    let b_sets: Api<ModelSet> = Api::namespaced(tenant.clone(), &team_b.name);
    let set: ModelSet = serde_json::from_value(
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
        "metadata": {"name": "borrow"},
        "spec": {"className": class_a, "source": {"s3": {"bucket": "team-a-models"}}}}),
    )
    .unwrap();
    refused(
        b_sets.create(&PostParams::default(), &set).await,
        "is not for namespace",
    );
    // A ModelSet whose name would make its node reports look like another's:
    // `models.ip-10-0-1-2` on node `x` against `models` on node `ip-10-0-1-2.x`.
    let dotted: ModelSet = serde_json::from_value(
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
        "metadata": {"name": "models.ip-10-0-1-2"},
        "spec": {"source": {"s3": {"bucket": "team-b-models"}}}}),
    )
    .unwrap();
    refused(
        b_sets.create(&dry, &dotted).await,
        "metadata.name must hold no '.'",
    );
    // Team A itself may use it (as A's admin: the policy is not a blanket refusal).
    Api::<ComfyUIDeployment>::namespaced(admin.clone(), &team_a.name)
        .create(&dry, &fleet(&class_a))
        .await
        .unwrap();

    // Pods aimed at team A's GPU nodes, or tolerating every taint.
    let b_pods: Api<Pod> = Api::namespaced(tenant.clone(), &team_b.name);
    let pod = |tolerations: Value| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "squatter"},
            "spec": {"nodeSelector": {"karpenter.sh/nodepool": format!("{}.sdxl", team_a.name)},
                     "tolerations": tolerations,
                     "containers": [{"name": "c", "image": "busybox"}]}}))
        .unwrap()
    };
    let gpu = json!({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"});
    let theirs = json!({"key": "sdfleet.io/tenant", "operator": "Equal", "value": team_a.name, "effect": "NoSchedule"});
    let squatter = pod(json!([gpu, theirs]));
    wait_for_policy(|| b_pods.create(&dry, &squatter)).await;
    refused(
        b_pods.create(&dry, &pod(json!([gpu, theirs]))).await,
        "may tolerate sdfleet.io/tenant only with the value",
    );
    refused(
        b_pods
            .create(
                &dry,
                &pod(json!([gpu, {"key": "sdfleet.io/tenant", "operator": "Exists"}])),
            )
            .await,
        "may tolerate sdfleet.io/tenant only with the value",
    );
    refused(
        b_pods
            .create(&dry, &pod(json!([{"operator": "Exists"}])))
            .await,
        "may not tolerate every taint",
    );
    // Its own nodes it may use.
    let own = json!({"key": "sdfleet.io/tenant", "operator": "Equal", "value": team_b.name, "effect": "NoSchedule"});
    b_pods.create(&dry, &pod(json!([gpu, own]))).await.unwrap();

    // A forged status: B holds modelsets/status, and still cannot write it.
    let own_set: ModelSet = serde_json::from_value(
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
        "metadata": {"name": "mine"},
        "spec": {"source": {"s3": {"bucket": "comfyui-models"}}}}),
    )
    .unwrap();
    let created = Api::<ModelSet>::namespaced(admin.clone(), &team_b.name)
        .create(&PostParams::default(), &own_set)
        .await
        .unwrap();
    let forged = json!({"status": {"observedGeneration": created.metadata.generation,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "message": "forged",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let (plain, merge) = (PatchParams::default(), Patch::Merge(&forged));
    let forge = || b_sets.patch_status("mine", &plain, &merge);
    wait_for_policy(forge).await;
    refused(
        forge().await,
        "only the sdfleet controller writes the status",
    );

    // The controller's own token: no Deployment in kube-system, none with a foreign
    // ServiceAccount or a privileged container, though each carries sdfleet's label.
    let controller = client_from(&impersonating_kubeconfig(
        tb,
        &release_ns,
        &format!("{release}-sdfleet"),
    ))
    .await;
    let deployment = |sa: &str, privileged: bool| -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": format!("planted-{}", unique_suffix()),
            "labels": {"app.kubernetes.io/managed-by": "sdfleet"}},
            "spec": {"selector": {"matchLabels": {"app": "x"}},
                     "template": {"metadata": {"labels": {"app": "x"}},
                                  "spec": {"serviceAccountName": sa,
                                           "containers": [{"name": "c", "image": "busybox",
                                                           "securityContext": {"privileged": privileged}}]}}}}))
        .unwrap()
    };
    let system: Api<Deployment> = Api::namespaced(controller.clone(), "kube-system");
    let planted = deployment("default", false);
    wait_for_policy(|| system.create(&dry, &planted)).await;
    refused(
        system.create(&dry, &deployment("default", false)).await,
        "never writes in the system namespace kube-system",
    );
    let in_b: Api<Deployment> = Api::namespaced(controller.clone(), &team_b.name);
    refused(
        in_b.create(&dry, &deployment("deployer", false)).await,
        "not as ServiceAccount deployer",
    );
    refused(
        in_b.create(&dry, &deployment("sdxl-gateway", true)).await,
        "no privileged",
    );
    in_b.create(&dry, &deployment("sdxl-gateway", false))
        .await
        .unwrap();
}

#[tokio::test]
async fn what_a_tenants_class_forbids_is_named_and_never_created() {
    let tb = Testbed::get();
    let Teams {
        release,
        admin,
        team_a,
        team_b,
        tenant,
    } = Teams::new(tb, "forbids").await;
    let (release_ns, label) = (release.namespace.clone(), release.label.clone());
    let release = release.name.clone();
    // One class for every tenant namespace of this release, with per-namespace folders,
    // hosts and gateway role.
    let class = format!("shared-{}", unique_suffix());
    apply_class(&admin, &class, json!({"nodeClass": {"role": "NodeRole-tenants"},
                         "namespaceSelector": {"matchLabels": label_true(&label)},
                         "s3": {"allowedBuckets": ["shared-models/{namespace}/", "comfyui-outputs/{namespace}/"],
                                "allowedEndpoints": ["https://*.corp.example"]},
                         "ingress": {"allowedSchemes": ["internal", "internet-facing"],
                                     "allowedAnnotationKeys": ["alb.ingress.kubernetes.io/*"],
                                     "internetFacingRequiredAnnotations": {"alb.ingress.kubernetes.io/auth-type": "cognito"},
                                     "allowedHosts": ["*.{namespace}.comfy.example.com"]},
                         "gateway": {"serviceAccountAnnotations":
                             {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/comfy-{namespace}"}}})).await;
    let _controller = support::fleet::start_controller(tb, &team_b.name, &release, &release_ns);

    let b = &team_b.name;
    let a = &team_a.name;
    let host = |ns: &str| format!("sdxl.{ns}.comfy.example.com");
    let fleets = [
        (
            "their-outputs",
            json!({"storage": {"outputs": {"bucket": "comfyui-outputs", "prefix": format!("{a}/")}}}),
            format!("spec.storage.outputs \"comfyui-outputs/{a}/\""),
        ),
        (
            "auth-none",
            json!({"ingress": {"enabled": true, "scheme": "internet-facing", "host": host(b),
                "certificateArn": "arn:aws:acm:us-west-2:123456789012:certificate/x",
                "annotations": {"alb.ingress.kubernetes.io/auth-type": "none"}}}),
            "\"alb.ingress.kubernetes.io/auth-type=none\"".to_string(),
        ),
        (
            "scheme-override",
            json!({"ingress": {"enabled": true, "host": host(b),
                "annotations": {"alb.ingress.kubernetes.io/scheme": "internet-facing"}}}),
            "\"alb.ingress.kubernetes.io/scheme\" is not allowed".to_string(),
        ),
        (
            "their-host",
            json!({"ingress": {"enabled": true, "host": host(a)}}),
            format!("spec.ingress.host \"{}\"", host(a)),
        ),
        (
            "own-role",
            json!({"gateway": {"allowUnauthenticated": true,
                "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/Admin"}}}),
            "spec.gateway.serviceAccountAnnotations".to_string(),
        ),
    ];
    let b_fleets: Api<ComfyUIDeployment> = Api::namespaced(tenant.clone(), b);
    let ssa = PatchParams::apply("team-b");
    for (name, extra, _) in &fleets {
        let mut spec = json!({"image": "comfyui:test", "replicas": 0, "className": class,
            "ingress": {"enabled": false}});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        b_fleets
            .patch(
                name,
                &ssa,
                &Patch::Apply(
                    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
                    "metadata": {"name": name}, "spec": spec}),
                ),
            )
            .await
            .unwrap();
    }
    let sets = [
        (
            "their-models",
            json!({"bucket": "shared-models", "prefix": format!("{a}/")}),
            format!("spec.source.s3 \"shared-models/{a}/\""),
        ),
        (
            "string-prefix",
            json!({"bucket": "shared-models", "prefix": b}),
            format!("spec.source.s3 \"shared-models/{b}\""),
        ),
        (
            "userinfo",
            json!({"bucket": "shared-models", "prefix": format!("{b}/"),
                   "endpoint": "https://x@169.254.169.254?.corp.example"}),
            "a URL with a user or password is refused".to_string(),
        ),
    ];
    let b_sets: Api<ModelSet> = Api::namespaced(tenant.clone(), b);
    for (name, s3, _) in &sets {
        b_sets
            .patch(
                name,
                &ssa,
                &Patch::Apply(
                    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
                    "metadata": {"name": name},
                    "spec": {"className": class, "source": {"s3": s3}}}),
                ),
            )
            .await
            .unwrap();
    }
    let watch_fleets: Api<ComfyUIDeployment> = Api::namespaced(admin.clone(), b);
    for (name, _, says) in &fleets {
        let message = refusal(&watch_fleets, name, "ClassForbids").await;
        assert!(message.contains(says.as_str()), "{name}: {message}");
        assert!(
            message.contains(&format!("FleetClass {class}")),
            "{message}"
        );
    }
    let watch_sets: Api<ModelSet> = Api::namespaced(admin.clone(), b);
    for (name, _, says) in &sets {
        let message = refusal(&watch_sets, name, "ClassForbids").await;
        assert!(message.contains(says.as_str()), "{name}: {message}");
    }
    // Nothing was created for any refused fleet.
    let pools = gvk_api(&admin, "karpenter.sh", "v1", "NodePool");
    for (name, _, _) in &fleets {
        assert!(
            pools
                .get_opt(&format!("{b}.{name}"))
                .await
                .unwrap()
                .is_none(),
            "{name}"
        );
    }
    let ingresses: Api<k8s_openapi::api::networking::v1::Ingress> =
        Api::namespaced(admin.clone(), b);
    assert!(
        ingresses
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Within the class: its nodes are tainted for team B alone, and what it owns
    // converges after a hand edit.
    b_fleets
        .patch(
            "within",
            &ssa,
            &Patch::Apply(
                json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
                "metadata": {"name": "within"},
                "spec": {"image": "comfyui:test", "replicas": 0, "className": class,
                         "gpu": {"limit": 4},
                         "ingress": {"enabled": true, "host": host(b)}}}),
            ),
        )
        .await
        .unwrap();
    eventually("within Ready", WAIT, || async {
        ready_of(&watch_fleets, "within")
            .await
            .filter(|r| r.0 == "True")
    })
    .await;
    let pool_name = format!("{b}.within");
    let pool = pools.get(&pool_name).await.unwrap();
    let taints = &pool.data["spec"]["template"]["spec"]["taints"];
    assert!(
        taints
            .as_array()
            .unwrap()
            .contains(&json!({"key": "sdfleet.io/tenant", "value": b, "effect": "NoSchedule"})),
        "{taints}"
    );
    // A hand edit of the GPU limit (4 → 99), by another field manager.
    pools
        .patch(
            &pool_name,
            &PatchParams::apply("someone").force(),
            &Patch::Apply(json!({"apiVersion": "karpenter.sh/v1", "kind": "NodePool",
                "metadata": {"name": pool_name}, "spec": {"limits": {"nvidia.com/gpu": "99"}}})),
        )
        .await
        .unwrap();
    eventually("the NodePool's limit back at 4", WAIT, || async {
        let pool = pools.get(&pool_name).await.ok()?;
        (pool.data["spec"]["limits"]["nvidia.com/gpu"] == "4").then_some(())
    })
    .await;
    // And one that takes the tenant taint off, to open team B's nodes to everyone.
    pools
        .patch(
            &pool_name,
            &PatchParams::apply("someone").force(),
            &Patch::Apply(json!({"apiVersion": "karpenter.sh/v1", "kind": "NodePool",
                "metadata": {"name": pool_name}, "spec": {"template": {"spec": {"taints": [
                    {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]}}}})),
        )
        .await
        .unwrap();
    eventually("the NodePool's tenant taint back", WAIT, || async {
        let pool = pools.get(&pool_name).await.ok()?;
        let taints = pool.data["spec"]["template"]["spec"]["taints"]
            .as_array()?
            .clone();
        taints
            .iter()
            .any(|t| t["key"] == "sdfleet.io/tenant" && t["value"] == b.as_str())
            .then_some(())
    })
    .await;
    assert_eq!(
        ready_of(&watch_fleets, "within").await.unwrap().0,
        "True",
        "no ApplyFailed after the hand edits"
    );

    // The admin narrows the class: team B's hosts move to another domain. The fleet
    // keeps nothing the class granted; its NetworkPolicy (which only restricts) stays.
    let ingresses_b: Api<k8s_openapi::api::networking::v1::Ingress> =
        Api::namespaced(admin.clone(), b);
    assert!(ingresses_b.get_opt("within").await.unwrap().is_some());
    Api::<FleetClass>::all(admin.clone())
        .patch(
            &class,
            &PatchParams::apply("platform-admin"),
            &Patch::Merge(
                json!({"spec": {"ingress": {"allowedHosts": ["*.{namespace}.other.example.com"]}}}),
            ),
        )
        .await
        .unwrap();
    let message = refusal(&watch_fleets, "within", "ClassForbids").await;
    assert!(message.contains("spec.ingress.host"), "{message}");
    assert!(
        message.contains("Nothing the class grants is kept"),
        "{message}"
    );
    let deployments_b: Api<Deployment> = Api::namespaced(admin.clone(), b);
    let policies_b: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(admin.clone(), b);
    eventually("the narrowed fleet's children removed", WAIT, || async {
        let gone = pools.get_opt(&pool_name).await.ok()?.is_none()
            && ingresses_b.get_opt("within").await.ok()?.is_none()
            && deployments_b.get_opt("within").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    assert!(
        policies_b
            .get_opt("within-comfyui")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn hand_edits_of_what_a_fleet_owns_are_undone_and_what_it_does_not_own_is_never_touched() {
    let tb = Testbed::get();
    let Teams {
        release,
        admin,
        team_b,
        tenant,
        ..
    } = Teams::new(tb, "edits").await;
    let label = release.label.clone();
    let class = format!("edits-{}", unique_suffix());
    apply_class(
        &admin,
        &class,
        json!({"nodeClass": {"role": "NodeRole-tenants"},
                         "namespaceSelector": {"matchLabels": label_true(&label)},
                         "s3": {"allowedBuckets": ["comfyui-outputs/{namespace}/"]},
                         "ingress": {"sourceCIDRs": ["10.0.0.0/19"]}}),
    )
    .await;
    let b = team_b.name.clone();
    // The EC2NodeClass is AWS's node class: the controller renders for AWS (it reads
    // nothing from AWS to do so; the testbed has the CRD, nothing provisions from it).
    let _controller = support::fleet::start_controller_with(
        tb,
        &b,
        &release.name,
        &release.namespace,
        &["--cloud", "aws"],
    );
    // An admin's EC2NodeClass under the name fleet `handmade`'s would have.
    let node_classes = gvk_api(&admin, "karpenter.k8s.aws", "v1", "EC2NodeClass");
    let handmade = format!("{b}.handmade");
    node_classes
        .patch(
            &handmade,
            &PatchParams::apply("platform-admin"),
            &Patch::Apply(
                json!({"apiVersion": "karpenter.k8s.aws/v1", "kind": "EC2NodeClass",
                "metadata": {"name": handmade, "labels": {"team": "platform"}},
                "spec": {"role": "AdminRole", "amiSelectorTerms": [{"alias": "al2023@latest"}],
                         "subnetSelectorTerms": [{"tags": {"team": "platform"}}],
                         "securityGroupSelectorTerms": [{"tags": {"team": "platform"}}]}}),
            ),
        )
        .await
        .unwrap();
    let before = node_classes.get(&handmade).await.unwrap();

    let fleets: Api<ComfyUIDeployment> = Api::namespaced(tenant.clone(), &b);
    for (name, storage) in [
        (
            "edits",
            json!({"outputs": {"bucket": "comfyui-outputs", "prefix": format!("{b}/")}}),
        ),
        ("handmade", json!({})),
    ] {
        fleets
            .patch(
                name,
                &PatchParams::apply("team-b"),
                &Patch::Apply(
                    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
                    "metadata": {"name": name},
                    "spec": {"image": "comfyui:test", "replicas": 0, "className": class,
                             "storage": storage,
                             "ingress": {"enabled": true}}}),
                ),
            )
            .await
            .unwrap();
    }
    let watch_fleets: Api<ComfyUIDeployment> = Api::namespaced(admin.clone(), &b);
    let conflict = refusal(&watch_fleets, "handmade", "NameConflict").await;
    assert!(
        conflict.contains(&format!("EC2NodeClass {handmade}")),
        "{conflict}"
    );

    // What `edits` owns: its node class, its outputs volume, its NetworkPolicy.
    let node_class = format!("{b}.edits");
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(admin.clone());
    let pv_name = format!("{b}.edits-outputs");
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(admin.clone(), &b);
    let policy = eventually("the fleet's children", WAIT, || async {
        node_classes.get(&node_class).await.ok()?;
        pvs.get(&pv_name).await.ok()?;
        policies.get("edits-comfyui").await.ok()
    })
    .await;
    // ComfyUI takes traffic from the team's namespace and the class's ALB subnets only:
    // no rule names another namespace.
    let rules = serde_json::to_value(policy.spec.unwrap().ingress.unwrap()).unwrap();
    let from: Vec<&Value> = rules
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["from"].as_array().unwrap())
        .collect();
    assert_eq!(
        from,
        [
            &json!({"podSelector": {}}),
            &json!({"ipBlock": {"cidr": "10.0.0.0/19"}})
        ],
        "{rules}"
    );

    // Hand edits by someone else: IMDSv1 on the nodes, a volume that deletes on release,
    // ComfyUI opened to every namespace.
    let someone = PatchParams::apply("someone").force();
    node_classes
        .patch(
            &node_class,
            &someone,
            &Patch::Apply(
                json!({"apiVersion": "karpenter.k8s.aws/v1", "kind": "EC2NodeClass",
                "metadata": {"name": node_class},
                "spec": {"metadataOptions": {"httpTokens": "optional"}}}),
            ),
        )
        .await
        .unwrap();
    pvs.patch(
        &pv_name,
        &someone,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name},
            "spec": {"persistentVolumeReclaimPolicy": "Delete"}})),
    )
    .await
    .unwrap();
    policies
        .patch(
            "edits-comfyui",
            &someone,
            &Patch::Apply(
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "edits-comfyui"},
                "spec": {"ingress": [{"from": [{"namespaceSelector": {}}]}]}}),
            ),
        )
        .await
        .unwrap();
    eventually("every hand edit undone", WAIT, || async {
        let nc = node_classes.get(&node_class).await.ok()?;
        let pv = pvs.get(&pv_name).await.ok()?;
        let np = policies.get("edits-comfyui").await.ok()?;
        let np_rules = serde_json::to_value(np.spec?.ingress?).ok()?;
        (nc.data["spec"]["metadataOptions"]["httpTokens"] == "required"
            && pv.spec?.persistent_volume_reclaim_policy.as_deref() == Some("Retain")
            && np_rules == rules)
            .then_some(())
    })
    .await;

    // The admin's EC2NodeClass is as it was, and sdfleet never wrote it.
    let after = node_classes.get(&handmade).await.unwrap();
    assert_eq!(after.data["spec"], before.data["spec"]);
    assert_eq!(after.metadata.labels, before.metadata.labels);
    assert!(
        !after
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|m| m.manager.as_deref() == Some("sdfleet")),
        "{:?}",
        after.metadata.managed_fields
    );
    node_classes
        .delete(&handmade, &Default::default())
        .await
        .unwrap();
}
