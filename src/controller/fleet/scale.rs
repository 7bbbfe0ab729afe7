//! One autoscaling pass of a fleet, and the cold starts it saw complete.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use super::super::runtime::cache::Caches;
use super::super::runtime::context::Context;
use super::super::runtime::error::Error;
use super::autoscale;
use crate::crd::ComfyUIDeployment;
use crate::names::FleetNames;
use crate::render::ChildKind;
use crate::telemetry::FleetLabels;

/// Counts a cold start that this pass saw complete (the status read had it open).
pub(super) fn record_cold_start(
    ctx: &Context,
    cud: &ComfyUIDeployment,
    labels: &FleetLabels,
    observed: Option<&crate::crd::autoscaling::AutoscalingStatus>,
) {
    let was_open = cud
        .status
        .as_ref()
        .and_then(|s| s.autoscaling.as_ref())
        .and_then(|a| a.cold_start.as_ref())
        .is_some_and(|c| c.ready_at.is_none());
    let Some(cold) = observed.and_then(|a| a.cold_start.as_ref()) else {
        return;
    };
    if !was_open || cold.ready_at.is_none() {
        return;
    }
    let seconds = [
        cold.node_seconds,
        cold.node_ready_seconds,
        cold.gpu_seconds,
        cold.models_seconds,
        cold.image_seconds,
        cold.ready_seconds,
    ];
    let phases: Vec<(&str, f64)> = crate::telemetry::COLD_START_PHASES
        .into_iter()
        .zip(seconds)
        .filter_map(|(phase, s)| Some((phase, s?)))
        .collect();
    ctx.metrics
        .record_cold_start(labels, &cold.started_at.0.to_string(), &phases);
}

/// One autoscaling pass: the decision, and the busy pods' annotations put right
/// before any pod goes (a scale-down waits a pass for them).
pub(super) struct Scaling {
    pub(super) plan: autoscale::Plan,
    pub(super) pods: Vec<Pod>,
}

/// The autoscaler's field manager on pods (their disruption annotations only).
pub(super) const AUTOSCALER_MANAGER: &str = "sdfleet-autoscaler";
/// A scale-down held for the pods' annotations is looked at again this soon.
pub(super) const ANNOTATION_SETTLE: Duration = Duration::from_secs(1);

pub(super) async fn scale(
    ctx: &Context,
    caches: &Caches,
    cud: &ComfyUIDeployment,
    fleet: &FleetNames,
    spec: &crate::crd::autoscaling::AutoscalingSpec,
) -> Result<Scaling, Error> {
    let status = cud.status.clone().unwrap_or_default();
    let previous = status.autoscaling.as_ref();
    let current = match previous {
        Some(p) => p.desired_replicas,
        // Autoscaling just turned on: start from what the Deployment runs.
        None => caches
            .typed_child::<Deployment>(
                ChildKind::Deployment,
                Some(&fleet.namespace),
                &fleet.deployment(),
            )
            .and_then(|d| d.spec?.replicas)
            .unwrap_or(spec.min_replicas),
    };
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &fleet.namespace);
    let selector = fleet.pod_selector();
    let pods: Vec<Pod> = caches
        .pods
        .state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(fleet.namespace.as_str())
                && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
        })
        .into_iter()
        .map(|p| (*p).clone())
        .collect();
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut plan = autoscale::decide(
        spec,
        current,
        status.demand.as_ref(),
        previous,
        status.ready_replicas,
        now,
    );
    let busy: std::collections::BTreeSet<String> = status
        .demand
        .as_ref()
        .map(|d| d.busy_pods.iter().cloned().collect())
        .unwrap_or_default();
    let changes = autoscale::annotation_changes(&pods, &busy);
    for (name, annotations) in &changes {
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations},
        });
        ctx.metrics.record_write("apply", "Pod");
        crate::latency::waiting(pods_api.patch(
            name,
            &PatchParams::apply(AUTOSCALER_MANAGER).force(),
            &Patch::Apply(body),
        ))
        .await?;
    }
    if !changes.is_empty() && plan.status.desired_replicas < current {
        // The ReplicaSet picks by deletion cost: let it see the new costs first.
        plan.status.desired_replicas = current;
        plan.status.last_decision = previous.and_then(|p| p.last_decision.clone());
        plan.decision = None;
        plan.recheck = Some(ANNOTATION_SETTLE);
    }
    if let Some(cold) = plan
        .status
        .cold_start
        .clone()
        .filter(|c| c.ready_at.is_none())
    {
        let nodes = caches.nodes_of_pool(&fleet.nodepool());
        // The agents' reports say when each node's GPUs became allocatable.
        let reports = cud
            .spec
            .model_set
            .as_deref()
            .map(|ms| caches.reports_of(&fleet.namespace, ms))
            .unwrap_or_default();
        let gpu_at = |node: &str| {
            reports
                .iter()
                .find(|r| r.node == node)
                .and_then(|r| r.gpu_allocatable_at.as_ref().map(|t| t.0))
        };
        plan.status.cold_start = Some(autoscale::cold_start_phases(&cold, &pods, &nodes, &gpu_at));
    }
    Ok(Scaling { plan, pods })
}
