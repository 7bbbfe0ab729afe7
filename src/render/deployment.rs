//! The ComfyUI Deployment: GPU pods pinned to the fleet's NodePool, with the models
//! directory from the node's instance store (read-only, through the csi.sdfleet.io
//! driver), S3 volumes, probes on
//! `/system_stats` and a restrictive security context.

use serde_json::{Value, json};

use super::error::RenderError;
use super::storage::S3Volume;
use crate::crd::comfyui::ComfyUIDeploymentSpec;
use crate::names::{FleetNames, GPU_RESOURCE, MODELSET_LABEL, NODEPOOL_LABEL, label_value};

pub const MODELS_MOUNT_PATH: &str = "/app/ComfyUI/models";
pub const CONTAINER_NAME: &str = "comfyui";

pub fn deployment_spec(
    fleet: &FleetNames,
    spec: &ComfyUIDeploymentSpec,
    volumes: &[S3Volume],
) -> Result<Value, RenderError> {
    let mut args = vec![
        "--listen".to_string(),
        "0.0.0.0".to_string(),
        "--port".to_string(),
        spec.port.to_string(),
    ];
    args.extend(spec.args.iter().cloned());

    let mut requests = serde_json::Map::new();
    let mut limits = serde_json::Map::new();
    if let Some(r) = &spec.resources {
        for (k, v) in &r.requests {
            requests.insert(k.clone(), json!(v));
        }
        for (k, v) in &r.limits {
            limits.insert(k.clone(), json!(v));
        }
    }
    if requests.contains_key(GPU_RESOURCE) || limits.contains_key(GPU_RESOURCE) {
        return Err(RenderError::InvalidSpec {
            field: "spec.resources".into(),
            message: "set GPUs with gpu.count, not resources".into(),
        });
    }
    // Extended resources must have requests equal to limits.
    requests.insert(GPU_RESOURCE.into(), json!(spec.gpu.count.to_string()));
    limits.insert(GPU_RESOURCE.into(), json!(spec.gpu.count.to_string()));

    let mut mounts = Vec::new();
    let mut pod_volumes = Vec::new();
    if let Some(model_set) = &spec.model_set {
        mounts.push(json!({"name": "models", "mountPath": MODELS_MOUNT_PATH, "readOnly": true}));
        // The node's `<root>/<namespace>/<model_set>` through the chart's CSI node
        // plugin, read-only: no hostPath, so the namespace can enforce Pod Security
        // `restricted`, and the plugin takes the namespace from the kubelet, not from here.
        pod_volumes.push(json!({"name": "models", "csi": {
            "driver": crate::csi::publish::DRIVER_NAME,
            "readOnly": true,
            "volumeAttributes": {crate::csi::publish::MODEL_SET_ATTRIBUTE: model_set},
        }}));
    }
    for v in volumes {
        mounts.push(json!({"name": v.purpose, "mountPath": v.mount_path}));
        pod_volumes.push(json!({"name": v.purpose, "persistentVolumeClaim": {"claimName": fleet.volume_claim(v.purpose)}}));
    }

    let probe = |period: i32, failures: i32| {
        json!({
            "httpGet": {"path": "/system_stats", "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        })
    };
    let mut container = json!({
        "name": CONTAINER_NAME,
        "image": spec.image,
        "args": args,
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        // Loading a checkpoint onto the GPU can take minutes: allow up to 15.
        "startupProbe": probe(10, 90),
        "readinessProbe": probe(10, 3),
        "livenessProbe": probe(20, 6),
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    let mut pod_security = json!({"seccompProfile": {"type": "RuntimeDefault"}});
    if let Some(uid) = spec.run_as_user {
        pod_security = json!({
            "runAsNonRoot": true,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        });
    }
    if !spec.command.is_empty() {
        container["command"] = json!(spec.command);
    }
    if !spec.env.is_empty() {
        container["env"] = json!(spec.env);
    }

    let mut node_selector =
        std::collections::BTreeMap::from([(NODEPOOL_LABEL.to_string(), fleet.nodepool())]);
    if let Some(model_set) = &spec.model_set {
        node_selector.insert(MODELSET_LABEL.to_string(), label_value(model_set));
    }
    let mut pod_labels = fleet.pod_selector();
    // The pods' own account only names the role their S3 volumes are mounted with: the
    // S3 CSI driver gets its token from the kubelet, none is mounted into ComfyUI.
    let service_account = volumes
        .iter()
        .any(|v| v.as_pod)
        .then(|| fleet.comfyui_service_account());
    pod_labels.extend(fleet.owner_labels());
    let mut deployment = json!({
        "replicas": spec.replicas,
        "selector": {"matchLabels": fleet.pod_selector()},
        // Keep serving capacity during a rollout; the NodePool limit bounds the surge.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": {
                "nodeSelector": node_selector,
                "tolerations": [
                    {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                    super::nodepool::tenant_toleration(&fleet.namespace),
                ],
                "enableServiceLinks": false,
                // ComfyUI never calls the Kubernetes API: no token in its pods.
                "automountServiceAccountToken": false,
                "securityContext": pod_security,
                "containers": [container],
                "volumes": pod_volumes,
            },
        },
    });
    if let Some(account) = service_account {
        deployment["template"]["spec"]["serviceAccountName"] = json!(account);
    }
    Ok(deployment)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pods_have_no_token_and_run_as_the_given_user() {
        let mut cud = example(SDXL);
        let pod = |cud: &crate::crd::ComfyUIDeployment| {
            render(cud, Cloud::Kwok)
                .into_iter()
                .find(|c| c.kind == ChildKind::Deployment)
                .unwrap()
                .manifest["spec"]["template"]["spec"]
                .clone()
        };
        let default = pod(&cud);
        assert_eq!(default["automountServiceAccountToken"], false);
        assert!(default["securityContext"].get("runAsUser").is_none());
        cud.spec.run_as_user = Some(1000);
        let restricted = pod(&cud);
        assert_eq!(restricted["securityContext"]["runAsNonRoot"], true);
        assert_eq!(restricted["securityContext"]["runAsUser"], 1000);
        assert_eq!(restricted["securityContext"]["fsGroup"], 1000);
    }

    use crate::render::ChildKind;
    use crate::render::nodeclass::Cloud;
    use crate::render::tests::{SDXL, example, render};
    use serde_json::json;

    fn deployment(cud: &crate::crd::comfyui::ComfyUIDeployment) -> serde_json::Value {
        render(cud, Cloud::Aws)
            .into_iter()
            .find(|c| c.kind == ChildKind::Deployment)
            .unwrap()
            .manifest
    }

    #[test]
    fn pods_request_gpus_tolerate_the_taint_and_pin_to_the_nodepool() {
        let mut cud = example(SDXL);
        cud.spec.gpu.count = 2;
        cud.spec.replicas = 3;
        cud.spec.args = vec!["--highvram".into()];
        let d = deployment(&cud);
        assert_eq!(d["spec"]["replicas"], 3);
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["nodeSelector"],
            json!({"karpenter.sh/nodepool": "studio.sdxl"})
        );
        assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
        let c = &pod["containers"][0];
        assert_eq!(
            c["args"],
            json!(["--listen", "0.0.0.0", "--port", "8188", "--highvram"])
        );
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "2");
        assert_eq!(c["resources"]["requests"]["nvidia.com/gpu"], "2");
        assert!(c.get("command").is_none());
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["path"], "/system_stats", "{probe}");
        }
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(
            c["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
    }

    #[test]
    fn models_mount_read_only_from_the_instance_store_and_outputs_from_s3() {
        let mut cud = example(SDXL);
        cud.spec.model_set = Some("sdxl-models".into());
        let d = deployment(&cud);
        let pod = &d["spec"]["template"]["spec"];
        let mounts = &pod["containers"][0]["volumeMounts"];
        assert_eq!(
            mounts[0],
            json!({"name": "models", "mountPath": "/app/ComfyUI/models", "readOnly": true})
        );
        assert_eq!(
            mounts[1],
            json!({"name": "outputs", "mountPath": "/app/ComfyUI/output"})
        );
        // No hostPath: the chart's CSI node plugin publishes the ModelSet of the pod's
        // own namespace (the kubelet says which), read-only.
        assert_eq!(
            pod["volumes"][0],
            json!({"name": "models", "csi": {"driver": "csi.sdfleet.io", "readOnly": true,
                   "volumeAttributes": {"modelSet": "sdxl-models"}}})
        );
        assert!(!pod.to_string().contains("hostPath"));
        assert_eq!(
            pod["volumes"][1]["persistentVolumeClaim"]["claimName"],
            "sdxl-outputs"
        );
    }

    #[test]
    fn user_resources_are_kept_and_gpu_in_resources_is_refused() {
        let mut cud = example(SDXL);
        cud.spec.resources = Some(crate::crd::comfyui::ContainerResources {
            requests: [("cpu".to_string(), "4".to_string())].into(),
            limits: [("memory".to_string(), "30Gi".to_string())].into(),
        });
        let d = deployment(&cud);
        let r = &d["spec"]["template"]["spec"]["containers"][0]["resources"];
        assert_eq!(r["requests"], json!({"cpu": "4", "nvidia.com/gpu": "1"}));
        assert_eq!(
            r["limits"],
            json!({"memory": "30Gi", "nvidia.com/gpu": "1"})
        );

        cud.spec
            .resources
            .as_mut()
            .unwrap()
            .limits
            .insert("nvidia.com/gpu".into(), "2".into());
        let cluster = crate::render::tests::cluster();
        let ctx = crate::render::RenderContext {
            cluster: &cluster,
            node_class: Cloud::Aws.provider(),
            model_sync: Default::default(),
        };
        assert!(crate::render::build(&cud, &ctx).is_err());
    }
}
