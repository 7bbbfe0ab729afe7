//! What render needs from the controller's flags besides the resource itself: the
//! cluster's defaults and where the node agents run.

/// Settings of the cluster the fleet runs in, from the controller's flags.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// `--cluster-name`: the default Karpenter discovery tag of subnets and security groups.
    pub cluster_name: Option<String>,
    /// `--region`: the default region of S3 buckets.
    pub region: Option<String>,
    /// Where the node agents of fleets with a ModelSet run, and their image.
    pub agent: AgentSettings,
    /// The fleets' job gateways.
    pub gateway: GatewaySettings,
}

/// The job gateways (`spec.gateway`): this same binary, bound to the chart's gateway
/// ClusterRole in the fleet's namespace.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub image: String,
    /// The ClusterRole each gateway's RoleBinding refers to (the chart creates it).
    pub cluster_role: String,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            image: AgentSettings::default().image,
            cluster_role: "sdfleet-gateway".into(),
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

/// The operator's namespace when the controller is not told (the chart's default).
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "sdfleet-system";

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            namespace: DEFAULT_OPERATOR_NAMESPACE.into(),
            image: concat!("sdfleet:", env!("CARGO_PKG_VERSION")).into(),
            service_account: "sdfleet-agent".into(),
        }
    }
}
