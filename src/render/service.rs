//! The ClusterIP Service in front of the ComfyUI pods.

use serde_json::{Value, json};

use crate::crd::comfyui::ComfyUIDeploymentSpec;
use crate::names::FleetNames;

pub fn service_spec(fleet: &FleetNames, spec: &ComfyUIDeploymentSpec) -> Value {
    json!({
        "type": "ClusterIP",
        "selector": fleet.pod_selector(),
        "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
    })
}
