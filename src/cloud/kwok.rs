//! `--cloud kwok`: the testbed and the demo. Karpenter's kwok provider only provisions
//! for NodePools whose nodeClassRef is a KWOKNodeClass, which has no settings.

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::{ClusterSettings, NodeClassProvider};
use crate::crd::comfyui::NodeClassSpec;
use crate::render::RenderError;
use crate::render::names::FleetNames;

pub struct Kwok;

impl NodeClassProvider for Kwok {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk(
            "karpenter.kwok.sh",
            "v1alpha1",
            "KWOKNodeClass",
        ))
    }

    fn spec(
        &self,
        _fleet: &FleetNames,
        _node_class: &NodeClassSpec,
        _cluster: &ClusterSettings,
    ) -> Result<Value, RenderError> {
        Ok(json!({}))
    }
}
