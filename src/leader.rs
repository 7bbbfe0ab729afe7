//! Leader election on a `coordination.k8s.io` Lease, so that several controller
//! replicas run and exactly one reconciles. A standby takes over within the lease
//! duration (15 s) when the leader dies; a leader that stops cleanly releases at once.

use std::future::Future;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const LEASE_NAME: &str = "sdfleet-controller";
const LEASE_SECONDS: u64 = 15;
const RENEW_BEFORE_SECONDS: u64 = 5;

/// The held lease: `lost` completes when it is lost; dropping the channel releases it.
pub struct Leader {
    channel: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl Leader {
    /// Waits until this process holds the lease. None when a shutdown signal came first.
    pub async fn acquire(
        client: Client,
        namespace: &str,
    ) -> Result<Option<Leader>, LeaseManagerError> {
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("sdfleet-{}", std::process::id()));
        let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
            .with_namespace(namespace)
            .with_identity(identity.clone())
            .with_duration(LEASE_SECONDS)
            .with_grace(RENEW_BEFORE_SECONDS)
            .build()
            .await?;
        let (mut channel, task) = manager.watch().await;
        tracing::info!(%identity, lease = LEASE_NAME, %namespace, "waiting to become leader");
        let became_leader = async {
            loop {
                if *channel.borrow_and_update() {
                    return true;
                }
                if channel.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::select! {
            leader = became_leader => {
                if !leader {
                    return Ok(None);
                }
            }
            _ = shutdown_signal() => return Ok(None),
        }
        tracing::info!(%identity, "became leader");
        Ok(Some(Leader { channel, task }))
    }

    /// A future that completes when the lease is lost, and one that releases it. The
    /// first must be finished or dropped before the second is awaited: the manager lets
    /// the lease go once nobody watches it any more.
    pub fn split(
        self,
    ) -> (
        impl Future<Output = ()> + Send + Sync + 'static,
        impl Future<Output = ()>,
    ) {
        let mut held = self.channel.clone();
        let lost = async move {
            // An error means the manager stopped: the lease is not held either way.
            let _ = held.wait_for(|held| !*held).await;
        };
        let Leader { channel, task } = self;
        let release = async move {
            drop(channel);
            if let Ok(Ok(manager)) = task.await {
                let _ = manager.release().await;
            }
        };
        (lost, release)
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
