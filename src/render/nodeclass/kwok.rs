//! `--cloud kwok`: the testbed and the demo. Karpenter's kwok provider only provisions
//! for NodePools whose nodeClassRef is a KWOKNodeClass, which has no settings.

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::NodeClassProvider;
use crate::crd::comfyui::NodeClassSpec;
use crate::names::FleetNames;
use crate::render::error::RenderError;
use crate::render::settings::ClusterSettings;

pub struct Kwok;

impl NodeClassProvider for Kwok {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk(
            "karpenter.kwok.sh",
            "v1alpha1",
            "KWOKNodeClass",
        ))
    }

    fn node_class_spec(
        &self,
        _fleet: &FleetNames,
        _node_class: &NodeClassSpec,
        _cluster: &ClusterSettings,
    ) -> Result<Value, RenderError> {
        Ok(json!({}))
    }
}
