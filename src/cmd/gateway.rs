//! `sdfleet gateway`: the job gateway in front of a namespace's fleets.

use std::process::ExitCode;

use super::with_kube_client;

#[derive(clap::Args)]
pub struct GatewayCommand {
    #[command(flatten)]
    gateway: crate::gateway::GatewayArgs,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// Runs the job gateway until a signal.
pub fn run(args: Box<GatewayCommand>) -> ExitCode {
    crate::telemetry::init_logging(args.log_json);
    with_kube_client(|client| async move {
        match crate::gateway::run(client, args.gateway).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "gateway failed");
                ExitCode::FAILURE
            }
        }
    })
}
