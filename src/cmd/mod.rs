//! The subcommands of the `sdfleet` binary: one file each, with its arguments. `main.rs`
//! only parses the command line and calls one of them.

pub mod agent;
pub mod controller;
pub mod csi;
pub mod gateway;
pub mod prepare;
pub mod render;
pub mod snapshot;
pub mod sync;

use std::process::ExitCode;

use crate::render::nodeclass::Cloud;
use crate::render::settings::{
    AgentSettings, ClusterSettings, DEFAULT_OPERATOR_NAMESPACE, GatewaySettings,
};

/// What the fleets' children are rendered with: the controller runs with these, and
/// `sdfleet render` takes the same flags to print what it would apply.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// The EKS cluster name: the default subnet and security-group discovery tag.
    #[arg(long, env = "SDFLEET_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Where nodes come from: `aws` writes EC2NodeClasses, `kwok` KWOKNodeClasses (testbed, demo).
    #[arg(long, value_enum, default_value = "aws", env = "SDFLEET_CLOUD")]
    pub cloud: Cloud,
    /// The default region of S3 buckets.
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// The operator's own namespace (the chart's release namespace): where the node
    /// agents' DaemonSets and the leader-election Lease live unless set apart below.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_OPERATOR_NAMESPACE)]
    pub operator_namespace: String,
    /// Namespace of the node agents' DaemonSets (default: the operator's namespace).
    #[arg(long)]
    pub agent_namespace: Option<String>,
    /// Image of the node agent (this same binary).
    #[arg(long, env = "SDFLEET_AGENT_IMAGE", default_value = concat!("sdfleet:", env!("CARGO_PKG_VERSION")))]
    pub agent_image: String,
    /// ServiceAccount of the node agents (the chart creates it).
    #[arg(long, default_value = "sdfleet-agent")]
    pub agent_service_account: String,
    /// Image of the fleets' job gateways (default: the agent's image, the same binary).
    #[arg(long, env = "SDFLEET_GATEWAY_IMAGE")]
    pub gateway_image: Option<String>,
    /// The ClusterRole each gateway's RoleBinding names (the chart creates it).
    #[arg(long, default_value = "sdfleet-gateway")]
    pub gateway_cluster_role: String,
}

impl ClusterArgs {
    /// The settings every fleet is rendered with.
    pub fn settings(&self) -> ClusterSettings {
        ClusterSettings {
            agent: AgentSettings {
                namespace: self
                    .agent_namespace
                    .clone()
                    .unwrap_or_else(|| self.operator_namespace.clone()),
                image: self.agent_image.clone(),
                service_account: self.agent_service_account.clone(),
            },
            gateway: GatewaySettings {
                image: self
                    .gateway_image
                    .clone()
                    .unwrap_or_else(|| self.agent_image.clone()),
                cluster_role: self.gateway_cluster_role.clone(),
            },
            cluster_name: self.cluster_name.clone().filter(|c| !c.is_empty()),
            region: self.region.clone().filter(|r| !r.is_empty()),
        }
    }
}

pub fn print_or_fail(text: Result<String, Box<dyn std::error::Error>>) -> ExitCode {
    match text {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `body` on a Tokio runtime; a runtime that cannot start is logged and becomes a
/// failing exit code.
pub fn on_runtime(body: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(body),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            ExitCode::FAILURE
        }
    }
}

/// Runs `body` with a Kubernetes client on a Tokio runtime; start-up failures are logged
/// and become a failing exit code.
pub fn with_kube_client<F, Fut>(body: F) -> ExitCode
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    on_runtime(async move {
        match kube::Client::try_default().await {
            Ok(client) => body(client).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot build a Kubernetes client");
                ExitCode::FAILURE
            }
        }
    })
}
