//! What starts a fleet's reconcile: its own changes, its children's (mapped back by
//! their owner labels), its ModelSet's and its FleetClass's; each filtered to the
//! changes that matter.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{PredicateConfig, WatchStreamExt};

use super::super::runtime::cache::{FleetTriggers, changes_only, watched_api};
use super::super::runtime::context::{
    Context, error_policy, hash_metadata, matching, own_watch, ref_key,
};
use super::reconcile::reconcile;
use super::{FLEET, Guarded};
use crate::crd::modelset::ModelSet;
use crate::crd::{ComfyUIDeployment, ModelSync};
use crate::names::{MANAGED_BY, MANAGED_BY_KEY, OWNER_NAME_KEY, OWNER_NAMESPACE_KEY};
use crate::policy;
use crate::render::ChildKind;

/// Runs the fleet controller: fleets, and every child sdfleet labels (mapped back to
/// its fleet by the owner labels). Every watch fills a store the reconciles read.
pub async fn run(
    ctx: Arc<Context>,
    triggers: FleetTriggers,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let watch_ns = ctx.settings.namespace.as_deref();
    let fleets: Api<Guarded> = watched_api(&client, watch_ns);
    // Only what can change the children or the decisions starts a reconcile: not our own
    // status writes.
    let (reader, own) = own_watch(fleets, fleet_changes, ctx.metrics.clone(), FLEET);
    let mut controller = Controller::for_stream(own, reader);
    let scope = ctx.settings.namespace.clone();
    for (kind, ar, events) in triggers.children {
        let scope = scope.clone();
        let metrics = ctx.metrics.clone();
        let changes = move |child: &DynamicObject| child_changes(kind, child);
        controller = controller.watches_stream_with(
            changes_only(events, changes),
            move |child| {
                let owner = owner_of(&child).filter(|o| scope.is_none() || o.namespace == scope);
                asked(&metrics, owner)
            },
            ar,
        );
    }
    // A node's report reaches its fleet at once (ModelsReady): the agent copies the
    // fleet's owner labels from its node onto the report.
    let metrics = ctx.metrics.clone();
    let scope = ctx.settings.namespace.clone();
    controller = controller.watches_stream(triggers.reports, move |report: ModelSync| {
        let owner = owner_from(report.labels()).filter(|o| scope.is_none() || o.namespace == scope);
        asked(&metrics, owner)
    });
    // A ModelSet's new catalog reaches the fleets using it at once, not at the next
    // resync.
    let users = controller.store();
    let metrics = ctx.metrics.clone();
    controller = controller.watches_stream(
        triggers
            .model_sets
            .predicate_filter(model_set_changes, PredicateConfig::default())
            .boxed(),
        move |ms| {
            let users = matching(&users, |cud: &ComfyUIDeployment| {
                cud.metadata.namespace == ms.metadata.namespace
                    && cud.spec.model_set.as_deref() == ms.metadata.name.as_deref()
            });
            asked(&metrics, users)
        },
    );
    // A changed FleetClass applies to its fleets at once, not at the next resync.
    let fleets = controller.store();
    let metrics = ctx.metrics.clone();
    controller = controller.watches_stream(triggers.classes, move |class| {
        let users = matching(&fleets, |cud: &ComfyUIDeployment| {
            policy::follows(cud.spec.class_name.as_deref(), &class)
        });
        asked(&metrics, users)
    });
    controller
        .with_config(ctx.settings.controller_config())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |obj, error, ctx| error_policy(FLEET, &obj, error, &ctx),
            ctx,
        )
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// Notes when watch events asked for fleets (their queue-to-done time starts).
pub(super) fn asked<I: IntoIterator<Item = ObjectRef<Guarded>>>(
    metrics: &crate::telemetry::Metrics,
    refs: I,
) -> Vec<ObjectRef<Guarded>> {
    let refs: Vec<_> = refs.into_iter().collect();
    for r in &refs {
        metrics.latency.asked(FLEET.as_str(), &ref_key(r));
    }
    refs
}

/// What of a fleet starts a reconcile: its metadata's part (`hash_metadata`) and the
/// gateway's demand (autoscaling). The controller's own status writes change neither.
pub(super) fn fleet_changes(fleet: &Guarded) -> Option<u64> {
    let mut h = DefaultHasher::new();
    let meta = match &fleet.0 {
        Ok(cud) => {
            serde_json::to_string(&cud.status.as_ref().map(|s| &s.demand))
                .unwrap_or_default()
                .hash(&mut h);
            &cud.metadata
        }
        Err(invalid) => &invalid.metadata,
    };
    hash_metadata(meta, &mut h);
    Some(h.finish())
}

/// What of a child starts its fleet's reconcile: its metadata's part (`hash_metadata`),
/// its content besides `status` (drift from what the fleet applied), and its `status`
/// only where the fleet's status reads it (`status::Facts`: the Deployments, the
/// Ingresses, the NodePool). A DaemonSet's pod counts, which change with every agent pod
/// on 1,000 nodes, start nothing.
pub(super) fn child_changes(kind: ChildKind, child: &DynamicObject) -> u64 {
    let mut h = DefaultHasher::new();
    hash_metadata(&child.metadata, &mut h);
    let status_read = matches!(
        kind,
        ChildKind::Deployment | ChildKind::Ingress | ChildKind::NodePool
    );
    match child.data.as_object() {
        Some(fields) => {
            for (field, value) in fields {
                if field != "status" || status_read {
                    (field, value.to_string()).hash(&mut h);
                }
            }
        }
        None => child.data.to_string().hash(&mut h),
    }
    h.finish()
}

/// What of a ModelSet its fleets' status reads: the spec, the catalog revision and
/// conditions (and, with SSM, the instances' entries). Not the controller's
/// bookkeeping around them.
pub(super) fn model_set_changes(ms: &ModelSet) -> Option<u64> {
    let mut h = DefaultHasher::new();
    ms.metadata.generation.hash(&mut h);
    serde_json::to_string(&ms.status)
        .unwrap_or_default()
        .hash(&mut h);
    Some(h.finish())
}

/// The owning fleet of a labelled child.
pub(super) fn owner_of(child: &DynamicObject) -> Option<ObjectRef<Guarded>> {
    owner_from(child.labels())
}

/// The fleet that owner labels name.
pub(super) fn owner_from(
    labels: &std::collections::BTreeMap<String, String>,
) -> Option<ObjectRef<Guarded>> {
    if labels.get(MANAGED_BY_KEY).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    let namespace = labels.get(OWNER_NAMESPACE_KEY)?;
    let name = labels.get(OWNER_NAME_KEY)?;
    Some(ObjectRef::new(name).within(namespace))
}
