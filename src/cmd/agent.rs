//! `sdfleet agent`: the node agent of one node.

use std::path::PathBuf;
use std::process::ExitCode;

use super::with_kube_client;

#[derive(clap::Args)]
pub struct AgentArgs {
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The models directory on the node's instance store.
    #[arg(long)]
    models_root: PathBuf,
    /// Seconds between full passes. Changes to ModelSets (a new catalog revision) and
    /// fleets start a pass at once; this resync also repairs local changes.
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// Default region of the buckets.
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    #[arg(long)]
    log_json: bool,
}

/// Runs the node agent until a signal.
pub fn run(args: AgentArgs) -> ExitCode {
    crate::telemetry::init_logging(args.log_json);
    with_kube_client(|client| async move {
        let agent = crate::agent::Agent {
            client,
            node: args.node_name,
            root: args.models_root,
            region: args.region.filter(|r| !r.is_empty()),
        };
        tracing::info!(node = %agent.node, root = %agent.root.display(), "node agent starting");
        agent
            .run(
                std::time::Duration::from_secs(args.resync_seconds.max(1)),
                crate::leader::shutdown_signal(),
            )
            .await;
        ExitCode::SUCCESS
    })
}
