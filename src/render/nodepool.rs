//! The fleet's Karpenter NodePool (karpenter.sh/v1): which GPU instances, spot or
//! on-demand, tainted so that only GPU pods land there, capped at `gpu.limit` GPUs, and
//! consolidated only when empty (utilisation-based consolidation does not see GPU use).

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::crd::comfyui::ComfyUIDeploymentSpec;
use std::collections::BTreeMap;

use crate::names::{
    FleetNames, GPU_RESOURCE, MODELS_NOT_READY_TAINT, MODELSET_LABEL, TENANT_TAINT, label_value,
};

pub const GPU_TAINT_VALUE: &str = "true";

/// The labels of the fleet's nodes; the pods select them (see `MODELSET_LABEL`).
pub fn node_labels(fleet: &FleetNames, spec: &ComfyUIDeploymentSpec) -> BTreeMap<String, String> {
    let mut labels = fleet.node_labels();
    if let Some(model_set) = &spec.model_set {
        labels.insert(MODELSET_LABEL.to_string(), label_value(model_set));
    }
    labels
}

/// The annotations of the fleet's nodes: the ModelSet's whole name, for the node agent
/// (a name of up to 253 characters is hashed in the label).
pub fn node_annotations(spec: &ComfyUIDeploymentSpec) -> BTreeMap<String, String> {
    spec.model_set
        .iter()
        .map(|m| (MODELSET_LABEL.to_string(), m.clone()))
        .collect()
}

/// What a pod of the fleet tolerates to run on the fleet's nodes (`TENANT_TAINT`).
pub fn tenant_toleration(namespace: &str) -> Value {
    json!({"key": TENANT_TAINT, "operator": "Equal", "value": namespace, "effect": "NoSchedule"})
}

pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodePool"))
}

/// Karpenter's NodeClaims (read only: a failed launch is why a fleet's pods wait).
pub fn nodeclaim_api_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"))
}

pub fn nodepool_spec(
    fleet: &FleetNames,
    spec: &ComfyUIDeploymentSpec,
    node_class: &ApiResource,
    startup_taint: bool,
) -> Value {
    let capacity_types: Vec<&str> = spec.gpu.capacity_types.iter().map(|c| c.as_str()).collect();
    let startup_taints = if startup_taint {
        json!([{"key": MODELS_NOT_READY_TAINT, "effect": "NoSchedule"}])
    } else {
        json!([])
    };
    json!({
        "template": {
            "metadata": {"labels": node_labels(fleet, spec), "annotations": node_annotations(spec)},
            "spec": {
                "nodeClassRef": {"group": node_class.group, "kind": node_class.kind, "name": fleet.node_class()},
                "requirements": [
                    {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": spec.gpu.instance_types},
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": capacity_types},
                    {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                    {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                ],
                "taints": [
                    {"key": GPU_RESOURCE, "value": GPU_TAINT_VALUE, "effect": "NoSchedule"},
                    {"key": TENANT_TAINT, "value": fleet.namespace, "effect": "NoSchedule"},
                ],
                "startupTaints": startup_taints,
                "expireAfter": spec.disruption.expire_after,
            },
        },
        "disruption": {
            "consolidationPolicy": "WhenEmpty",
            "consolidateAfter": spec.disruption.consolidate_after,
        },
        "limits": {GPU_RESOURCE: spec.gpu.limit.to_string()},
    })
}

#[cfg(test)]
mod tests {
    use crate::crd::comfyui::CapacityType;
    use crate::render::nodeclass::Cloud;
    use crate::render::tests::{SDXL, example, render};
    use serde_json::json;

    #[test]
    fn a_long_modelset_name_is_hashed_in_the_label_the_pods_select_and_whole_in_the_annotation() {
        let long = format!("models-{}", "x".repeat(200));
        let mut cud = example(SDXL);
        cud.spec.model_set = Some(long.clone());
        let children = render(&cud, Cloud::Kwok);
        let pool = &children[1].manifest["spec"]["template"]["metadata"];
        let label = pool["labels"]["sdfleet.io/modelset"].as_str().unwrap();
        assert!(label.len() <= 63, "{label}");
        assert_eq!(pool["annotations"]["sdfleet.io/modelset"], json!(long));
        let deployment = children
            .iter()
            .find(|c| c.kind == crate::render::ChildKind::Deployment)
            .unwrap();
        assert_eq!(
            deployment.manifest["spec"]["template"]["spec"]["nodeSelector"]["sdfleet.io/modelset"],
            json!(label)
        );
    }

    #[test]
    fn nodepool_has_types_capacity_taint_limit_and_disruption() {
        let mut cud = example(SDXL);
        cud.spec.gpu.instance_types = vec!["g6.2xlarge".into()];
        cud.spec.gpu.capacity_types = vec![CapacityType::OnDemand];
        cud.spec.gpu.limit = 16;
        cud.spec.disruption.consolidate_after = "5m".into();
        let pool = &render(&cud, Cloud::Kwok)[1].manifest;
        assert_eq!(pool["apiVersion"], "karpenter.sh/v1");
        let spec = &pool["spec"]["template"]["spec"];
        assert_eq!(spec["requirements"][0]["values"], json!(["g6.2xlarge"]));
        assert_eq!(spec["requirements"][1]["values"], json!(["on-demand"]));
        assert_eq!(
            spec["requirements"][2],
            json!({"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]})
        );
        assert_eq!(
            spec["taints"],
            json!([{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"},
                {"key": "sdfleet.io/tenant", "value": "studio", "effect": "NoSchedule"}])
        );
        assert_eq!(spec["expireAfter"], "720h");
        assert_eq!(
            spec["nodeClassRef"],
            json!({"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "studio.sdxl"})
        );
        assert_eq!(pool["spec"]["limits"], json!({"nvidia.com/gpu": "16"}));
        assert_eq!(
            pool["spec"]["disruption"],
            json!({"consolidationPolicy": "WhenEmpty", "consolidateAfter": "5m"})
        );
        assert_eq!(
            pool["spec"]["template"]["metadata"]["labels"]["sdfleet.io/fleet"],
            "studio.sdxl"
        );
    }
}
