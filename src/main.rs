use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sdfleet::cmd::{self, print_or_fail};

/// sdfleet: GPU ComfyUI fleets on Amazon EKS, from two custom resources.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: reconcile ComfyUIDeployments into GPU fleets.
    Controller(cmd::controller::ControllerArgs),
    /// Print the CRD YAML (what `crds/` and the Helm chart hold).
    Crds,
    /// Print the CRD reference (Markdown), generated from the CRD schemas.
    Docs,
    /// Sync an S3 prefix into a directory once (what the node agent and SSM run).
    Sync(cmd::sync::SyncArgs),
    /// Run the node agent: sync the node's ModelSets, report, lift the startup taint.
    Agent(cmd::agent::AgentArgs),
    /// Serve the csi.sdfleet.io CSI node plugin: a pod's ModelSet directory as a
    /// read-only inline volume (the chart's DaemonSet).
    CsiNode(cmd::csi::CsiNodeArgs),
    /// Run the job gateway in front of a namespace's fleets (what `spec.gateway` renders).
    Gateway(Box<cmd::gateway::GatewayCommand>),
    /// Create a node's models directory of one ModelSet and give it to the agent's user
    /// (the agent DaemonSet's init container; root with CAP_CHOWN only).
    PrepareModelsDir(cmd::prepare::PrepareArgs),
    /// Print every child of the ComfyUIDeployments in FILE exactly as the controller
    /// with the same flags would apply them. Needs no cluster.
    Render(Box<cmd::render::RenderArgs>),
    /// Build an EBS snapshot of a Bottlerocket data volume with images already pulled,
    /// for a FleetClass's `nodeClass.imagePull.snapshotID`. Launches and terminates one
    /// EC2 instance.
    Snapshot(cmd::snapshot::SnapshotArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Controller(args) => cmd::controller::run(args),
        Command::Sync(args) => cmd::sync::run(args),
        Command::Agent(args) => cmd::agent::run(args),
        Command::Gateway(args) => cmd::gateway::run(args),
        Command::CsiNode(args) => cmd::csi::run(args),
        Command::Crds => print_or_fail(sdfleet::crd::to_yaml().map_err(Into::into)),
        Command::Docs => print_or_fail(sdfleet::docs::crd_reference().map_err(Into::into)),
        Command::Render(args) => print_or_fail(cmd::render::run(*args)),
        Command::PrepareModelsDir(args) => print_or_fail(cmd::prepare::run(args)),
        Command::Snapshot(args) => print_or_fail(cmd::snapshot::run(args)),
    }
}
