//! The gateway's fleets' status on the cluster: it publishes each fleet's demand into
//! `status.demand`, with server-side apply under its own field manager, so that the
//! operator's watch sees a change at once, and keeps the signals the operator writes
//! (capacity, cold starts) in step.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::demand::{Demand, FleetSignals, signal_of};
use crate::crd::ComfyUIDeployment;

/// The gateway's field manager on its fleets' status.
pub const FIELD_MANAGER: &str = "sdfleet-gateway";
/// How often demand is compared with what was published (a write only on change).
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// Keeps `signals` in step with the fleet's status.
pub async fn watch_fleet(
    client: Client,
    namespace: String,
    fleet: String,
    signals: Arc<FleetSignals>,
) {
    let api: Api<ComfyUIDeployment> = Api::namespaced(client, &namespace);
    let config = crate::watch::named(&fleet);
    let mut stream = watcher::watcher(api, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(cud) => signals.set(&fleet, signal_of(&cud)),
            Err(e) => tracing::warn!(%fleet, error = %e, "fleet watch"),
        }
    }
}

/// The status patch of one fleet's demand.
pub fn demand_patch(fleet: &str, demand: &Demand) -> Value {
    json!({
        "apiVersion": "sdfleet.io/v1alpha1",
        "kind": "ComfyUIDeployment",
        "metadata": {"name": fleet},
        "status": {"demand": {
            "queued": demand.queued,
            "running": demand.running,
            "busyPods": demand.busy_pods,
            "recentModels": demand.recent_models,
            "observedAt": k8s_openapi::jiff::Timestamp::now().to_string(),
        }},
    })
}

/// Publishes each fleet's demand (as `demand_of` reads it from the engine) whenever it
/// changes, until the process ends.
pub async fn publish(
    client: Client,
    namespace: String,
    fleets: Vec<String>,
    demand_of: impl Fn(&str) -> Demand,
) {
    let api: Api<ComfyUIDeployment> = Api::namespaced(client, &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut published: HashMap<String, Demand> = HashMap::new();
    loop {
        for fleet in &fleets {
            let demand = demand_of(fleet);
            if published.get(fleet) == Some(&demand) {
                continue;
            }
            let patch = demand_patch(fleet, &demand);
            match api
                .patch_status(fleet, &params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {
                    tracing::debug!(%fleet, queued = demand.queued, running = demand.running, "demand published");
                    published.insert(fleet.clone(), demand);
                }
                Err(e) => tracing::warn!(%fleet, error = %e, "cannot publish demand"),
            }
        }
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
}
