//! The FleetClass on the testbed: a fleet or ModelSet asking for a role, security group,
//! bucket, endpoint, queue, ingress scheme or annotation outside its class is refused
//! with a condition naming it, and nothing is written (or listed) for it; one within its
//! class gets the class's node settings.

mod support;

use std::time::Duration;

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use sdfleet::crd::{ComfyUIDeployment, FleetClass, ModelSet};
use serde_json::{Value, json};
use support::{ControllerProcess, TestNamespace, Testbed, eventually, install_crds, unique_suffix};

const WAIT: Duration = Duration::from_secs(90);

fn ready_of(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<(String, String, String)> {
    let c = conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn fleet_ready(client: &Client, ns: &str, name: &str) -> Option<(String, String, String)> {
    let cud = Api::<ComfyUIDeployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    ready_of(&cud.status?.conditions)
}

async fn modelset_ready(client: &Client, ns: &str, name: &str) -> Option<(String, String, String)> {
    let ms = Api::<ModelSet>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    ready_of(&ms.status?.conditions)
}

#[tokio::test]
async fn what_the_class_does_not_allow_is_refused_and_named() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let class_name = format!("strict-{}", unique_suffix());
    let class = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "FleetClass", "metadata": {"name": class_name},
        "spec": {"nodeClass": {"role": "NodeRole-platform"},
                 "gpu": {"allowedInstanceTypes": ["g5.2xlarge"]},
                 "s3": {"allowedBuckets": ["team-*"], "allowedEndpoints": ["https://minio.internal"],
                        "allowedQueues": ["https://sqs.us-west-2.amazonaws.com/1/team-*"]},
                 "ingress": {"allowedSchemes": ["internal"], "allowedAnnotationKeys": ["alb.ingress.kubernetes.io/healthcheck-*"]}}});
    let classes: Api<FleetClass> = Api::all(client.clone());
    classes
        .patch(
            &class_name,
            &PatchParams::apply("platform-admin"),
            &Patch::Apply(&class),
        )
        .await
        .unwrap();
    let ns = TestNamespace::new(&client, "class").await;
    let _controller = ControllerProcess::start_with_env(tb, &ns.name, &[], &tb.aws_env());

    let fleet = |name: &str, extra: Value| {
        let mut spec = json!({"image": "comfyui:test", "replicas": 0, "className": class_name,
            "gpu": {"instanceTypes": ["g5.2xlarge"]}, "ingress": {"enabled": true, "className": "alb"}});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment", "metadata": {"name": name}, "spec": spec})
    };
    let refused = [
        (
            "role",
            json!({"nodeClass": {"role": "Admin"}}),
            "spec.nodeClass \"Admin\"",
        ),
        (
            "sg",
            json!({"nodeClass": {"role": "NodeRole-platform", "securityGroupSelectorTags": {"Name": "open"}}}),
            "spec.nodeClass",
        ),
        (
            "bucket",
            json!({"storage": {"outputs": {"bucket": "payroll-exports"}}}),
            "spec.storage.outputs \"payroll-exports/\"",
        ),
        (
            "scheme",
            json!({"ingress": {"enabled": true, "className": "alb", "scheme": "internet-facing"}}),
            "spec.ingress.scheme \"internet-facing\"",
        ),
        (
            "annotation",
            json!({"ingress": {"enabled": true, "className": "alb",
            "annotations": {"alb.ingress.kubernetes.io/group.name": "payments"}}}),
            "spec.ingress.annotations \"alb.ingress.kubernetes.io/group.name\"",
        ),
    ];
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    let ssa = PatchParams::apply("team");
    for (name, extra, _) in &refused {
        cuds.patch(name, &ssa, &Patch::Apply(fleet(name, extra.clone())))
            .await
            .unwrap();
    }
    cuds.patch(
        "within",
        &ssa,
        &Patch::Apply(fleet(
            "within",
            json!({"storage": {"outputs": {"bucket": "team-outputs"}}}),
        )),
    )
    .await
    .unwrap();
    let nodepools = Api::<DynamicObject>::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodePool")),
    );
    for (name, _, names) in &refused {
        let (status, _, message) = eventually(&format!("{name} refused"), WAIT, || async {
            fleet_ready(&client, &ns.name, name)
                .await
                .filter(|r| r.1 == "ClassForbids")
        })
        .await;
        assert_eq!(status, "False");
        assert!(message.contains(names), "{name}: {message}");
        assert!(message.contains(&class_name), "{name}: {message}");
        // Nothing was written for it.
        let pool = format!("{}.{name}", ns.name);
        assert!(
            nodepools.get_opt(&pool).await.unwrap().is_none(),
            "{name}: NodePool {pool} exists"
        );
    }
    // Within the class: Ready, with the class's node role.
    eventually("the fleet within its class Ready", WAIT, || async {
        fleet_ready(&client, &ns.name, "within")
            .await
            .filter(|r| r.0 == "True")
    })
    .await;
    let node_class = Api::<DynamicObject>::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "karpenter.kwok.sh",
            "v1alpha1",
            "KWOKNodeClass",
        )),
    );
    assert!(
        node_class
            .get_opt(&format!("{}.within", ns.name))
            .await
            .unwrap()
            .is_some()
    );

    // A class that does not exist.
    cuds.patch("lost", &ssa, &Patch::Apply(json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
        "metadata": {"name": "lost"}, "spec": {"image": "comfyui:test", "className": "no-such-class"}})))
        .await
        .unwrap();
    let (_, _, message) = eventually("FleetClassNotFound", WAIT, || async {
        fleet_ready(&client, &ns.name, "lost")
            .await
            .filter(|r| r.1 == "FleetClassNotFound")
    })
    .await;
    assert!(message.contains("no-such-class"), "{message}");

    // ModelSets: bucket, endpoint and queue; refused ones are never listed.
    let sets: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let modelset = |name: &str, s3: Value, sync: Value| {
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": name},
            "spec": {"className": class_name, "source": {"s3": s3}, "sync": sync}})
    };
    let cases = [
        (
            "ms-bucket",
            json!({"bucket": "other-team"}),
            json!({}),
            "spec.source.s3 \"other-team/\"",
        ),
        (
            "ms-endpoint",
            json!({"bucket": "team-models", "endpoint": "https://attacker.example"}),
            json!({}),
            "spec.source.s3.endpoint \"https://attacker.example\"",
        ),
        (
            "ms-queue",
            json!({"bucket": "team-models"}),
            json!({"sqsQueueUrl": "https://sqs.us-west-2.amazonaws.com/1/billing"}),
            "spec.sync.sqsQueueUrl",
        ),
    ];
    for (name, s3, sync, _) in &cases {
        sets.patch(
            name,
            &ssa,
            &Patch::Apply(modelset(name, s3.clone(), sync.clone())),
        )
        .await
        .unwrap();
    }
    for (name, _, _, names) in &cases {
        let (_, _, message) = eventually(&format!("{name} refused"), WAIT, || async {
            modelset_ready(&client, &ns.name, name)
                .await
                .filter(|r| r.1 == "ClassForbids")
        })
        .await;
        assert!(message.contains(names), "{name}: {message}");
        let status = sets.get(name).await.unwrap().status.unwrap();
        assert!(status.revision.is_empty(), "{name} was listed");
    }
    // The admin widens the class: the refused fleet follows at once (the controller
    // watches classes; its periodic resync is 5 minutes away), with no edit of the fleet.
    let mut wider = class.clone();
    wider["spec"]["s3"]["allowedBuckets"] = json!(["team-*", "payroll-*"]);
    classes
        .patch(
            &class_name,
            &PatchParams::apply("platform-admin"),
            &Patch::Apply(&wider),
        )
        .await
        .unwrap();
    eventually(
        "the bucket fleet admitted after the class changed",
        WAIT,
        || async {
            fleet_ready(&client, &ns.name, "bucket")
                .await
                .filter(|r| r.0 == "True")
        },
    )
    .await;
    let _ = classes.delete(&class_name, &Default::default()).await;
}

#[tokio::test]
async fn a_class_webhook_range_must_be_a_cidr() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let classes: Api<FleetClass> = Api::all(client);
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::apply("platform-admin").force()
    };
    let class = |cidrs: Value| {
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "FleetClass", "metadata": {"name": "webhook-ranges"},
            "spec": {"nodeClass": {"role": "NodeRole-platform"}, "gateway": {"webhookAllowedCIDRs": cidrs}}})
    };
    classes
        .patch(
            "webhook-ranges",
            &dry,
            &Patch::Apply(&class(json!(["10.20.0.0/16", "fd00:1::/64"]))),
        )
        .await
        .expect("CIDRs are accepted");
    for bad in ["10.20.0.0", "10.20.0.0/33", "internal"] {
        let err = classes
            .patch("webhook-ranges", &dry, &Patch::Apply(&class(json!([bad]))))
            .await
            .expect_err(bad)
            .to_string();
        assert!(err.contains("webhookAllowedCIDRs"), "{bad}: {err}");
    }
}
