//! What differs between clouds: the Karpenter node class the fleet's NodePool points at.
//! `aws` writes an EC2NodeClass; `kwok` (the testbed and the demo) a KWOKNodeClass.
//! Everything else the controller writes is identical for both.

mod aws;
mod kwok;

pub use aws::Aws;
pub use kwok::Kwok;

use kube::core::ApiResource;
use serde_json::Value;

use super::error::RenderError;
use super::settings::ClusterSettings;
use crate::crd::comfyui::NodeClassSpec;
use crate::names::FleetNames;

/// The `--cloud` switch of the controller and of `sdfleet render`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cloud {
    Aws,
    Kwok,
}

/// A Karpenter cloud provider's node class, as the fleet's NodePool sees it.
pub trait NodeClassProvider: Send + Sync {
    /// The node class kind (group, version, kind, plural).
    fn api_resource(&self) -> ApiResource;
    /// The node class object's `spec`.
    fn node_class_spec(
        &self,
        fleet: &FleetNames,
        node_class: &NodeClassSpec,
        cluster: &ClusterSettings,
    ) -> Result<Value, RenderError>;
}

impl Cloud {
    pub fn provider(self) -> &'static dyn NodeClassProvider {
        match self {
            Cloud::Aws => &Aws,
            Cloud::Kwok => &Kwok,
        }
    }
}
