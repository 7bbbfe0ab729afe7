//! `sdfleet controller`: reconciles fleets and ModelSets, optionally leader-elected.

use std::process::ExitCode;

use super::{ClusterArgs, with_kube_client};

#[derive(clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "SDFLEET_NAMESPACE")]
    namespace: Option<String>,
    /// Seconds between reconciles of a steady fleet (watches start one at once on any
    /// change; this catches what no watch sees).
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// Reconciles of one kind (fleets, ModelSets) running at once; 0: no limit.
    #[arg(long, default_value_t = 16, env = "SDFLEET_MAX_CONCURRENT_RECONCILES")]
    max_concurrent_reconciles: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Reconcile only while holding the Lease `sdfleet-controller` (run several replicas).
    #[arg(long)]
    leader_elect: bool,
    /// Namespace of the leader-election Lease (default: the operator's namespace).
    #[arg(long)]
    leader_election_namespace: Option<String>,
}

/// Runs the controller until a signal (or, leader-elected, until it loses the lease).
pub fn run(args: ControllerArgs) -> ExitCode {
    crate::telemetry::init_logging(args.log_json);
    with_kube_client(|client| async move {
        let settings = crate::controller::Settings {
            cloud: args.cluster.cloud,
            cluster: args.cluster.settings(),
            namespace: args.namespace,
            resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
            max_concurrent_reconciles: args.max_concurrent_reconciles,
        };
        let metrics = std::sync::Arc::new(crate::telemetry::Metrics::default());
        let health = std::sync::Arc::new(crate::telemetry::Health {
            metrics: metrics.clone(),
            ready: std::sync::atomic::AtomicBool::new(false),
        });
        let server = tokio::spawn(crate::telemetry::serve(args.metrics_addr, health.clone()));
        tracing::info!(cloud = ?settings.cloud, namespace = ?settings.namespace, "starting controller");
        let ctx = crate::controller::Context::new(client.clone(), settings, metrics);
        health
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if args.leader_elect {
            let lease_namespace = args
                .leader_election_namespace
                .unwrap_or(args.cluster.operator_namespace);
            let lease = match crate::leader::Leader::acquire(client, &lease_namespace).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    tracing::info!("stopped before becoming leader");
                    server.abort();
                    return ExitCode::SUCCESS;
                }
                Err(e) => {
                    tracing::error!(error = %e, "leader election failed");
                    server.abort();
                    return ExitCode::FAILURE;
                }
            };
            let (lost, release) = lease.split();
            let lost_leadership = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = lost_leadership.clone();
            crate::controller::run(ctx, async move {
                tokio::select! {
                    _ = crate::leader::shutdown_signal() => {}
                    _ = lost => flag.store(true, std::sync::atomic::Ordering::Relaxed),
                }
            })
            .await;
            release.await;
            server.abort();
            // A leader that lost its lease exits so that it restarts as a standby.
            return if lost_leadership.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("lost the leader lease; exiting");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
        crate::controller::run(ctx, crate::leader::shutdown_signal()).await;
        server.abort();
        ExitCode::SUCCESS
    })
}
