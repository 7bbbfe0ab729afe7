//! `sdfleet csi-node`: the node plugin of the `csi.sdfleet.io` driver (the chart's
//! DaemonSet, beside the node-driver-registrar).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct CsiNodeArgs {
    /// Where to serve the CSI services (`unix:///csi/csi.sock`).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// The node's name (NodeGetInfo's node ID).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The models root on the node's instance store, as mounted in this container.
    #[arg(long, default_value = "/models")]
    models_root: PathBuf,
    #[arg(long)]
    log_json: bool,
}

/// Serves the node plugin until a signal.
pub fn run(args: CsiNodeArgs) -> ExitCode {
    crate::telemetry::init_logging(args.log_json);
    let socket = match crate::csi::socket_path(&args.endpoint) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::error!(error = %e, "csi-node cannot start");
            return ExitCode::FAILURE;
        }
    };
    let plugin = crate::csi::grpc::NodePlugin {
        node_id: args.node_name,
        models_root: Arc::new(args.models_root),
    };
    super::on_runtime(async move {
        match crate::csi::serve(&socket, plugin, crate::leader::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "csi-node stopped");
                ExitCode::FAILURE
            }
        }
    })
}
