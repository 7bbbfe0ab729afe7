//! The custom resources of sdfleet (API group `sdfleet.io`, version `v1alpha1`).

pub mod autoscaling;
pub mod comfyui;
pub mod common;
pub mod fleetclass;
pub mod gateway;
pub mod modelset;
pub mod modelsync;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use comfyui::ComfyUIDeployment;
pub use fleetclass::FleetClass;
pub use modelset::ModelSet;
pub use modelsync::ModelSync;

/// Every CRD of sdfleet, in the order `sdfleet crds` prints them.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        ComfyUIDeployment::crd(),
        ModelSet::crd(),
        ModelSync::crd(),
        FleetClass::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream (what `crds/` and the chart hold).
pub fn to_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
