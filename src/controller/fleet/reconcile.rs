//! One fleet's reconcile, one call per step: read (an unreadable object gets
//! `InvalidSpec`) → finalizer → within its class (`effective`) → preflight → scale →
//! build (`render`) → apply + prune → observe → write status. Deletion runs `cleanup`.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;

use super::super::preflight;
use super::super::runtime::conditions::Reason;
use super::super::runtime::context::{Context, object_key};
use super::super::runtime::error::Error;
use super::super::runtime::finalizer;
use super::apply::{apply_children, resources, withdraw};
use super::observe::fetch_facts;
use super::report::{KIND, StatusWrite, fleet_names, mark_invalid, publish, stuck, write_status};
use super::scale::{record_cold_start, scale};
use super::status::ModelFacts;
use super::{CLEANUP_POLL, FINALIZER, FLEET, Guarded, autoscale, cleanup, status};
use crate::crd::ComfyUIDeployment;
use crate::crd::modelset::ModelSet;
use crate::effective::{self, EffectiveFleet, Refusal};
use crate::names::NODEPOOL_LABEL;
use crate::render::{self, RenderContext};
use crate::telemetry::FleetLabels;

pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.timed(FLEET, &obj, async {
        let result = match &obj.0 {
            Ok(cud) => reconcile_with_finalizer(cud, &ctx).await,
            // One unreadable object fails alone, with a condition, and waits for an edit.
            Err(invalid) => {
                let message = format!("cannot read the spec: {}", invalid.error);
                mark_invalid(&ctx, &invalid.metadata, &message)
                    .await
                    .map(|()| Action::await_change())
            }
        };
        // A status computed from a copy older than the stored object was refused: the
        // event that brings the store up to date reconciles again.
        match result {
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
                tracing::debug!(object = %object_key(&obj), "stale cache: status refused; waiting for the watch");
                Ok(Action::requeue(STALE_RETRY))
            }
            other => other,
        }
    })
    .await
}

/// When a status write found the cache behind the apiserver, the next look.
pub(super) const STALE_RETRY: Duration = Duration::from_secs(1);

/// Adds our finalizer before anything is created, and removes it only once cleanup has
/// deleted every child.
pub(super) async fn reconcile_with_finalizer(
    cud: &ComfyUIDeployment,
    ctx: &Context,
) -> Result<Action, Error> {
    let api = ctx.raw_api::<ComfyUIDeployment>(&cud.namespace().unwrap_or_default());
    if cud.metadata.deletion_timestamp.is_some() {
        if !cud.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let fleet = fleet_names(cud);
        let remaining = cleanup::cleanup(&resources(ctx, &fleet)).await?;
        let poll_key = format!("cleanup/{}/{}", fleet.namespace, fleet.name);
        if !remaining.is_empty() {
            tracing::info!(fleet = %format!("{}/{}", fleet.namespace, fleet.name), ?remaining, "waiting for children to be deleted");
            return Ok(Action::requeue(ctx.poll_delay(&poll_key, CLEANUP_POLL)));
        }
        ctx.reset_poll(&poll_key);
        finalizer::set(&api, &ctx.metrics, KIND, cud, FINALIZER, false).await?;
        ctx.metrics.forget_fleet(&FleetLabels {
            namespace: fleet.namespace.clone(),
            name: fleet.name.clone(),
        });
        return Ok(Action::await_change());
    }
    // The patch triggers a new reconcile with the finalizer in place.
    if finalizer::set(&api, &ctx.metrics, KIND, cud, FINALIZER, true).await? {
        return Ok(Action::await_change());
    }
    apply_fleet(cud, ctx).await
}

/// The fleet within its class ([`effective::fleet`], as `sdfleet render` decides it), or,
/// after a refusal is written to its status, what to do instead.
pub(super) async fn within_class(
    cud: &ComfyUIDeployment,
    ctx: &Context,
    model_set: Option<&ModelSet>,
) -> Result<Result<EffectiveFleet, Action>, Error> {
    let namespace = cud.metadata.namespace.clone().unwrap_or_default();
    let labelled = ctx.namespace(&namespace).await?;
    let classes = ctx.cached_fleet_classes()?;
    let inputs = effective::Inputs {
        classes: &classes,
        namespace: Some(&labelled),
        model_set,
    };
    match effective::fleet(cud, &inputs) {
        Ok(effective) => Ok(Ok(effective)),
        Err(Refusal::NoClass(e)) => {
            let message = e.to_string();
            write_status(ctx, cud, &stuck(Reason::FleetClassNotFound, &message), None).await?;
            publish(ctx, cud, EventType::Warning, "FleetClassNotFound", &message);
            Err(Error::Class(message))
        }
        Err(Refusal::Forbids(refusal)) => {
            let message = withdraw(cud, ctx, &refusal).await?;
            write_status(ctx, cud, &stuck(Reason::ClassForbids, &message), None).await?;
            publish(ctx, cud, EventType::Warning, "ClassForbids", &message);
            // An edit of the fleet, or the admin widening the class, is needed.
            Ok(Err(ctx.steady_requeue()))
        }
    }
}

/// Creates or updates every child, prunes the unwanted ones, and writes status.
pub(super) async fn apply_fleet(cud: &ComfyUIDeployment, ctx: &Context) -> Result<Action, Error> {
    let fleet = fleet_names(cud);
    let provider = ctx.settings.cloud.provider();
    let caches = ctx.caches()?;
    caches.ready().await?;
    // Dereference: the ModelSet says how its models reach the nodes.
    let model_set = cud.spec.model_set.as_deref().and_then(|name| {
        caches
            .model_sets
            .get(&ObjectRef::new(name).within(&fleet.namespace))
            .map(|ms| (*ms).clone())
    });
    let EffectiveFleet {
        fleet: mut effective,
        model_sync,
        ..
    } = match within_class(cud, ctx, model_set.as_ref()).await? {
        Ok(effective) => effective,
        Err(action) => return Ok(action),
    };
    let missing = preflight::missing(
        caches,
        cud,
        &provider.api_resource(),
        &render::nodepool::api_resource(),
    );
    if !missing.is_empty() {
        let message = missing.join("; ");
        let mut conditions = stuck(Reason::MissingDependency, &message);
        conditions[1].message = "waiting for dependencies".into();
        write_status(ctx, cud, &conditions, None).await?;
        publish(ctx, cud, EventType::Warning, "MissingDependency", &message);
        return Err(Error::MissingDependency(message));
    }

    caches.children_ready().await?;
    // Autoscaling decides the Deployment's replicas; the CR's spec stays as written.
    let scaling = match &cud.spec.autoscaling {
        Some(spec) => Some(scale(ctx, caches, cud, &fleet, spec).await?),
        None => None,
    };
    if let Some(s) = &scaling {
        effective.spec.replicas = s.plan.status.desired_replicas;
    }
    let rctx = RenderContext {
        cluster: &ctx.settings.cluster,
        node_class: provider,
        model_sync,
    };
    let children = match render::build(&effective, &rctx) {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            write_status(ctx, cud, &stuck(Reason::InvalidSpec, &message), None).await?;
            publish(ctx, cud, EventType::Warning, "InvalidSpec", &message);
            return Ok(Action::await_change());
        }
    };

    apply_children(ctx, cud, &fleet, caches, &children).await?;

    let pool_nodes = caches.nodes_of_pool(&fleet.nodepool());
    let facts = fetch_facts(caches, cud, &fleet, model_set, &pool_nodes);
    let mut observed = status::observe(&effective, &fleet, &facts);
    let mut recheck = None;
    let mut capacity = None;
    if let Some(s) = scaling {
        let pool = fleet.nodepool();
        let claims: Vec<DynamicObject> = caches
            .node_claims
            .state_filter(|c| c.labels().get(NODEPOOL_LABEL) == Some(&pool))
            .into_iter()
            .map(|c| (*c).clone())
            .collect();
        let condition = autoscale::capacity(&s.pods, facts.nodepool.as_ref(), &claims);
        capacity = Some(condition.status);
        observed.conditions.push(condition);
        if let Some(d) = &s.plan.decision {
            let direction = if d.to > d.from { "up" } else { "down" };
            ctx.metrics
                .scaling_decisions
                .get_or_create(&crate::telemetry::ScalingLabels {
                    namespace: fleet.namespace.clone(),
                    name: fleet.name.clone(),
                    direction: direction.into(),
                    reason: d.reason.clone(),
                })
                .inc();
            let note = format!(
                "{} → {} replicas ({}): {}",
                d.from, d.to, d.reason, d.message
            );
            tracing::info!(fleet = %format!("{}/{}", fleet.namespace, fleet.name), from = d.from, to = d.to, reason = %d.reason, "{}", d.message);
            publish(ctx, cud, EventType::Normal, "Scaled", &note);
        }
        recheck = s.plan.recheck;
        observed.autoscaling = Some(s.plan.status);
    }
    let written = write_status(ctx, cud, &observed.conditions, Some(&observed)).await?;
    let labels = FleetLabels {
        namespace: fleet.namespace.clone(),
        name: fleet.name.clone(),
    };
    ctx.metrics
        .desired_replicas
        .get_or_create(&labels)
        .set(effective.spec.replicas.into());
    ctx.metrics
        .ready_replicas
        .get_or_create(&labels)
        .set(observed.ready_replicas.into());
    let models = facts.models.as_ref().unwrap_or(&ModelFacts::NotUsed);
    ctx.metrics
        .nodes
        .set(&labels, status::node_counts(&pool_nodes, models));
    match capacity {
        Some(ok) => {
            ctx.metrics
                .capacity_available
                .get_or_create(&labels)
                .set(ok.into());
        }
        // Autoscaling turned off: no stale 0 for an alert to fire on.
        None => {
            ctx.metrics.capacity_available.remove(&labels);
        }
    }
    record_cold_start(ctx, cud, &labels, observed.autoscaling.as_ref());
    // The nodes' reports (ModelSync) are watched: no poll while models sync.
    let deferred = match written {
        StatusWrite::Deferred(wait) => Some(wait),
        StatusWrite::Done => None,
    };
    let soonest = [recheck, deferred]
        .into_iter()
        .flatten()
        .fold(ctx.settings.resync, Duration::min);
    Ok(Action::requeue(soonest))
}
