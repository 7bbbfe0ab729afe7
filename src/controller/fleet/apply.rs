//! The fleet's children applied and pruned (`FleetResources`), with an event for each
//! change; and everything the class granted withdrawn when it no longer allows the fleet.

use kube::runtime::events::EventType;

use super::super::runtime::cache::Caches;
use super::super::runtime::conditions::Reason;
use super::super::runtime::context::Context;
use super::super::runtime::error::Error;
use super::super::runtime::resources::{Applied, ApplyError, FleetResources};
use super::report::{fleet_names, publish, stuck, write_status};
use crate::crd::ComfyUIDeployment;
use crate::names::FleetNames;
use crate::render::{Child, ChildKind};

pub(super) fn resources<'a>(ctx: &'a Context, fleet: &'a FleetNames) -> FleetResources<'a> {
    FleetResources {
        client: &ctx.client,
        metrics: &ctx.metrics,
        fleet,
        node_class: ctx.settings.cloud.provider(),
        agent: &ctx.settings.cluster.agent,
        cache: None,
    }
}

/// Applies every child (at once: a first reconcile waits for one round trip, not one per
/// child), then prunes the ones no longer wanted; each change is an event, a refused
/// apply is the fleet's status.
pub(super) async fn apply_children(
    ctx: &Context,
    cud: &ComfyUIDeployment,
    fleet: &FleetNames,
    caches: &Caches,
    children: &[Child],
) -> Result<(), Error> {
    let mut resources = resources(ctx, fleet);
    resources.cache = Some(caches);
    let spec_unchanged =
        cud.status.as_ref().and_then(|s| s.observed_generation) == cud.metadata.generation;
    // The children are applied at once: a first reconcile waits for one round trip, not
    // one per child (none depends on another existing first).
    let results = futures::future::join_all(children.iter().map(|c| resources.apply(c))).await;
    for (child, applied) in children.iter().zip(results) {
        let applied = match applied {
            Ok(a) => a,
            Err(e) => {
                let reason = match e {
                    ApplyError::NameConflict { .. } => Reason::NameConflict,
                    _ => Reason::ApplyFailed,
                };
                let message = e.to_string();
                write_status(ctx, cud, &stuck(reason, &message), None).await?;
                publish(ctx, cud, EventType::Warning, reason.as_str(), &message);
                return Err(e.into());
            }
        };
        if applied != Applied::Unchanged {
            if spec_unchanged && cud.status.is_some() {
                ctx.metrics.drift_repairs.inc();
            }
            let verb = if applied == Applied::Created {
                "Created"
            } else {
                "Updated"
            };
            let note = format!("{verb} {} {}", child.api.kind, child.name);
            publish(ctx, cud, EventType::Normal, verb, &note);
        }
    }
    for pruned in resources.prune(children).await? {
        let note = format!("Deleted {pruned}: no longer wanted");
        publish(ctx, cud, EventType::Normal, "Pruned", &note);
    }
    Ok(())
}

/// A fleet its class no longer allows (the admin narrowed it) keeps nothing the class
/// granted: its nodes, workloads, volumes and Ingresses are removed until it fits again.
/// What holds the user's state (the gateway's job store) and what only restricts (the
/// NetworkPolicy) stay; S3 data is never touched (the volumes are `Retain`). Returns
/// `refusal` with what that means.
pub(super) async fn withdraw(
    cud: &ComfyUIDeployment,
    ctx: &Context,
    refusal: &str,
) -> Result<String, Error> {
    let fleet = fleet_names(cud);
    let caches = ctx.caches()?;
    caches.children_ready().await?;
    let mut resources = resources(ctx, &fleet);
    resources.cache = Some(caches);
    let (store, policy) = (fleet.gateway_store(), fleet.network_policy());
    let removed = resources
        .prune_except(|kind, name| {
            (kind == ChildKind::PersistentVolumeClaim && name == store)
                || (kind == ChildKind::NetworkPolicy && name == policy)
        })
        .await?;
    for pruned in &removed {
        let note = format!("Deleted {pruned}: its FleetClass no longer allows the fleet");
        publish(ctx, cud, EventType::Normal, "Pruned", &note);
    }
    // The same words whether this pass removed anything or an earlier one did: the
    // events name each child.
    Ok(format!(
        "{refusal}. Nothing the class grants is kept until the fleet fits it: no nodes, pods, volumes or Ingress (S3 data and the job store are kept)"
    ))
}
