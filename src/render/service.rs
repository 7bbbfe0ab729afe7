//! The ClusterIP Service in front of the ComfyUI pods.

use serde_json::{Value, json};

use super::names::FleetNames;
use crate::crd::comfyui::ComfyUIDeploymentSpec;

pub fn spec(fleet: &FleetNames, spec: &ComfyUIDeploymentSpec) -> Value {
    json!({
        "type": "ClusterIP",
        "selector": fleet.pod_selector(),
        "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
    })
}
