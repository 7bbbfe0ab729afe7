//! What differs between clouds: the Karpenter node class the fleet's NodePool points at.
//! `aws` writes an EC2NodeClass; `kwok` (the testbed and the demo) a KWOKNodeClass.
//! Everything else the controller writes is identical for both.

mod aws;
mod kwok;

pub use aws::Aws;
pub use kwok::Kwok;

use kube::core::ApiResource;
use serde_json::Value;

use crate::crd::comfyui::NodeClassSpec;
use crate::render::RenderError;
use crate::render::names::FleetNames;

/// The `--cloud` switch of the controller and of `sdfleet render`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cloud {
    Aws,
    Kwok,
}

/// Settings of the cluster the fleet runs in, from the controller's flags.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// `--cluster-name`: the default Karpenter discovery tag of subnets and security groups.
    pub cluster_name: Option<String>,
    /// `--region`: the default region of S3 buckets.
    pub region: Option<String>,
    /// Where the node agents of fleets with a ModelSet run, and their image.
    pub agent: AgentSettings,
}

/// A Karpenter cloud provider's node class, as the fleet's NodePool sees it.
pub trait NodeClassProvider: Send + Sync {
    /// The node class kind (group, version, kind, plural).
    fn api_resource(&self) -> ApiResource;
    /// The node class object's `spec`.
    fn spec(
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

/// The node agent DaemonSets: one per fleet that uses a ModelSet, in the operator's
/// namespace (they run under the chart's `sdfleet-agent` ServiceAccount).
#[derive(Clone, Debug)]
pub struct AgentSettings {
    pub namespace: String,
    pub image: String,
    pub service_account: String,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            namespace: "sdfleet-system".into(),
            image: concat!("sdfleet:", env!("CARGO_PKG_VERSION")).into(),
            service_account: "sdfleet-agent".into(),
        }
    }
}
