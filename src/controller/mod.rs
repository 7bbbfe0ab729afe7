//! The controller process: two reconcilers, each a short pipeline in its own folder:
//! `fleet/` (ComfyUIDeployment → its children) and `modelset/` (a bucket → its catalog).
//! `context` is what every reconcile shares, `resources` applies and prunes a fleet's
//! children, `status` writes status, `error` is the error both return.

pub mod fleet;
pub mod modelset;
pub mod preflight;
pub mod runtime;

use std::sync::Arc;

pub use runtime::context::{Context, Settings};
pub use runtime::error::Error;

/// Runs both controllers until `shutdown` completes (SIGTERM, or leadership lost).
pub async fn run(
    mut ctx: Context,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let mut watches = tokio::task::JoinSet::new();
    let settings = &ctx.settings;
    let (caches, fleet_triggers) = runtime::cache::Caches::start(
        &ctx.client,
        (settings.namespace.as_deref(), &settings.cluster.agent),
        settings.cloud.provider(),
        &mut watches,
    );
    ctx.caches = Some(caches);
    let ctx = Arc::new(ctx);
    // One shutdown signal for both controllers.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::join!(
        fleet::watches::run(ctx.clone(), fleet_triggers, stopped(stop_rx.clone())),
        modelset::run(ctx.clone(), stopped(stop_rx)),
    );
    watches.abort_all();
    tracing::info!("controller stopped");
}
