//! Bad ComfyUIDeployment specs are rejected by the apiserver at apply time (schema and
//! CEL rules), each with a message that names the field.

mod support;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use support::{TestNamespace, Testbed, install_crds};

fn valid() -> Value {
    json!({
        "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
        "metadata": {"name": "sdxl"},
        "spec": {
            "image": "comfyui:latest",
            "gpu": {"count": 1, "instanceTypes": ["g5.2xlarge"], "capacityTypes": ["spot"], "limit": 4},
            "nodeClass": {"role": "KarpenterNodeRole-demo"},
            "storage": {"outputs": {"bucket": "comfyui-outputs", "prefix": "sdxl/"}},
        }
    })
}

fn with(path: &[&str], value: Value) -> Value {
    let mut obj = valid();
    let mut at = &mut obj;
    for key in &path[..path.len() - 1] {
        at = &mut at[*key];
    }
    at[path[path.len() - 1]] = value;
    obj
}

#[tokio::test]
async fn bad_specs_are_rejected_at_apply_naming_the_field() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "cud-validation").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        client,
        &ns.name,
        &kube::core::ApiResource::erase::<sdfleet::crd::ComfyUIDeployment>(&()),
    );
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::apply("sdfleet-test").force()
    };

    api.patch("sdxl", &dry, &Patch::Apply(&valid()))
        .await
        .expect("the valid spec is accepted");
    // The example fleets with a gateway, and autoscaled, as a user applies them (in
    // this namespace).
    for file in [
        "examples/gateway.yaml",
        "examples/gateway-replicated.yaml",
        "examples/autoscaling.yaml",
    ] {
        let text = std::fs::read_to_string(support::repo_root().join(file)).unwrap();
        let mut example: Value = serde_saphyr::from_str(&text).unwrap();
        example["metadata"]["namespace"] = json!(ns.name);
        api.patch("sdxl", &dry, &Patch::Apply(&example))
            .await
            .unwrap_or_else(|e| panic!("{file} is accepted: {e}"));
    }
    let autoscaled = |autoscaling: Value| {
        let mut o = with(&["spec", "gateway"], json!({"allowUnauthenticated": true}));
        o["spec"]["autoscaling"] = autoscaling;
        o
    };

    let mut long_name = valid();
    long_name["metadata"]["name"] = json!("a".repeat(60));

    // (what, object, text the error must contain)
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "empty instanceTypes",
            with(&["spec", "gpu", "instanceTypes"], json!([])),
            "spec.gpu.instanceTypes",
        ),
        (
            "malformed instance type",
            with(&["spec", "gpu", "instanceTypes"], json!(["g5 2xlarge"])),
            "spec.gpu.instanceTypes",
        ),
        (
            "unknown capacity type",
            with(&["spec", "gpu", "capacityTypes"], json!(["cheap"])),
            "spec.gpu.capacityTypes",
        ),
        (
            "gpu.count < 1",
            with(&["spec", "gpu", "count"], json!(0)),
            "spec.gpu.count",
        ),
        (
            "gpu.limit < gpu.count",
            with(&["spec", "gpu"], json!({"count": 4, "limit": 2})),
            "gpu.limit must be at least gpu.count",
        ),
        (
            "role and instanceProfile",
            with(
                &["spec", "nodeClass"],
                json!({"role": "r", "instanceProfile": "p"}),
            ),
            "exactly one of nodeClass.role and nodeClass.instanceProfile",
        ),
        (
            "neither role nor instanceProfile",
            with(&["spec", "nodeClass"], json!({})),
            "exactly one of nodeClass.role and nodeClass.instanceProfile",
        ),
        (
            "invalid bucket",
            with(
                &["spec", "storage", "outputs", "bucket"],
                json!("My_Bucket"),
            ),
            "spec.storage.outputs.bucket",
        ),
        (
            "prefix with ..",
            with(&["spec", "storage", "outputs", "prefix"], json!("a/../b/")),
            "spec.storage.outputs.prefix",
        ),
        (
            "prefix starting with /",
            with(&["spec", "storage", "outputs", "prefix"], json!("/abs/")),
            "spec.storage.outputs.prefix",
        ),
        (
            "port out of range",
            with(&["spec", "port"], json!(70000)),
            "spec.port",
        ),
        (
            "negative replicas",
            with(&["spec", "replicas"], json!(-1)),
            "spec.replicas",
        ),
        (
            "malformed quantity",
            with(&["spec", "nodeClass", "rootVolumeSize"], json!("lots")),
            "spec.nodeClass.rootVolumeSize",
        ),
        (
            "malformed resource quantity",
            with(&["spec", "resources"], json!({"requests": {"cpu": "four"}})),
            "spec.resources.requests",
        ),
        (
            "GPU in resources",
            with(
                &["spec", "resources"],
                json!({"limits": {"nvidia.com/gpu": "1"}}),
            ),
            "gpu.count",
        ),
        (
            "malformed duration",
            with(
                &["spec", "disruption", "consolidateAfter"],
                json!("10 minutes"),
            ),
            "spec.disruption.consolidateAfter",
        ),
        (
            "unknown ingress scheme",
            with(&["spec", "ingress", "scheme"], json!("public")),
            "spec.ingress.scheme",
        ),
        (
            "idle timeout too long",
            with(&["spec", "ingress", "idleTimeoutSeconds"], json!(5000)),
            "spec.ingress.idleTimeoutSeconds",
        ),
        (
            "not an ACM ARN",
            with(
                &["spec", "ingress", "certificateArn"],
                json!("arn:aws:iam::123:role/x"),
            ),
            "spec.ingress.certificateArn",
        ),
        (
            "empty image",
            with(&["spec", "image"], json!("")),
            "spec.image",
        ),
        ("name too long for children", long_name, "metadata.name"),
        (
            "a gateway with neither API keys nor allowUnauthenticated",
            with(&["spec", "gateway"], json!({"queueCap": 10})),
            "set exactly one of gateway.apiKeysSecret and gateway.allowUnauthenticated",
        ),
        (
            "a gateway with API keys and allowUnauthenticated",
            with(
                &["spec", "gateway"],
                json!({"apiKeysSecret": "k", "allowUnauthenticated": true}),
            ),
            "set exactly one of gateway.apiKeysSecret and gateway.allowUnauthenticated",
        ),
        (
            "three gateway replicas on the embedded store",
            with(
                &["spec", "gateway"],
                json!({"apiKeysSecret": "k", "replicas": 3}),
            ),
            "gateway.replicas above 1 needs a shared job store: set gateway.store.postgres",
        ),
        (
            "a PostgreSQL store without its Secret",
            with(
                &["spec", "gateway"],
                json!({"apiKeysSecret": "k", "replicas": 2, "store": {"postgres": {}}}),
            ),
            "spec.gateway.store.postgres.secretName",
        ),
        (
            "a gateway queue cap of 0",
            with(
                &["spec", "gateway"],
                json!({"apiKeysSecret": "k", "queueCap": 0}),
            ),
            "spec.gateway.queueCap",
        ),
        (
            "a gateway store of no size",
            with(
                &["spec", "gateway"],
                json!({"apiKeysSecret": "k", "store": {"size": "0"}}),
            ),
            "store.size must be a positive quantity",
        ),
        (
            "an unknown placement",
            with(
                &["spec", "gateway"],
                json!({"apiKeysSecret": "k", "placement": "Nearest"}),
            ),
            "spec.gateway.placement",
        ),
        (
            "autoscaling without a gateway",
            with(
                &["spec", "autoscaling"],
                json!({"minReplicas": 0, "maxReplicas": 2}),
            ),
            "autoscaling needs spec.gateway",
        ),
        (
            "minReplicas above maxReplicas",
            autoscaled(json!({"minReplicas": 3, "maxReplicas": 2})),
            "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
        ),
        (
            "maxReplicas 0",
            autoscaled(json!({"minReplicas": 0, "maxReplicas": 0})),
            "spec.autoscaling.maxReplicas",
        ),
        (
            "no target jobs per replica",
            autoscaled(json!({"minReplicas": 0, "maxReplicas": 2, "targetJobsPerReplica": 0})),
            "spec.autoscaling.targetJobsPerReplica",
        ),
    ];
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for (what, object, expect) in &cases {
        let name = object["metadata"]["name"].as_str().unwrap();
        match api.patch(name, &dry, &Patch::Apply(object)).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(e) if !e.to_string().contains(expect) => {
                failures.push(format!("{what}: message lacks {expect:?}: {e}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A ModelSet's source is one bucket or one list of files by URL, and each file names
/// its SHA-256 and a path inside the models directory: anything else is refused at
/// apply, naming what is wrong.
#[tokio::test]
async fn bad_modelset_sources_are_rejected_at_apply() {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "ms-validation").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        client,
        &ns.name,
        &kube::core::ApiResource::erase::<sdfleet::crd::ModelSet>(&()),
    );
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::apply("sdfleet-test").force()
    };
    let file = json!({"path": "checkpoints/a.safetensors", "url": "https://models.example.com/a",
                      "sha256": "a".repeat(64), "size": 10});
    let with_spec = |spec: Value| {
        json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
               "metadata": {"name": "models"}, "spec": spec})
    };
    api.patch(
        "models",
        &dry,
        &Patch::Apply(&with_spec(json!({"source": {"urls": [file]}}))),
    )
    .await
    .expect("a list of files by URL is accepted");
    let with_file = |key: &str, value: Value| {
        let mut f = file.clone();
        f[key] = value;
        with_spec(json!({"source": {"urls": [f]}}))
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "a bucket and files",
            with_spec(json!({"source": {"s3": {"bucket": "models"}, "urls": [file]}})),
            "exactly one of source.s3 and source.urls",
        ),
        (
            "no source",
            with_spec(json!({"source": {}})),
            "exactly one of source.s3 and source.urls",
        ),
        (
            "SSM without a bucket",
            with_spec(json!({"source": {"urls": [file]}, "sync": {"method": "SSM"}})),
            "sync.method SSM needs source.s3",
        ),
        (
            "a queue without a bucket",
            with_spec(
                json!({"source": {"urls": [file]}, "sync": {"sqsQueueUrl": "https://sqs.us-west-2.amazonaws.com/1/q"}}),
            ),
            "sync.sqsQueueUrl needs source.s3",
        ),
        (
            "a SHA-256 that is not one",
            with_file("sha256", json!("abc")),
            "spec.source.urls[0].sha256",
        ),
        (
            "a path that climbs out",
            with_file("path", json!("../../etc/cron.d/x")),
            "path must not start with '/' or contain '..'",
        ),
        (
            "not a URL",
            with_file("url", json!("file:///etc/passwd")),
            "spec.source.urls[0].url",
        ),
    ];
    let mut failures = Vec::new();
    for (what, object, expect) in &cases {
        match api.patch("models", &dry, &Patch::Apply(object)).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(e) if !e.to_string().contains(expect) => {
                failures.push(format!("{what}: message lacks {expect:?}: {e}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
