//! The ComfyUIDeployment reconciler, as a short pipeline:
//! read (an unreadable object gets `InvalidSpec`) → preflight (dereference) → build
//! (pure, `render`) → apply + prune (`FleetResources`) → observe (`status`) → write status.
//! Deletion runs through a finalizer and `cleanup`, which removes children in stages.

pub mod autoscale;
pub mod cleanup;
pub mod report;
pub mod status;
#[cfg(test)]
mod tests;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::Ingress;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{PredicateConfig, WatchStreamExt};

use super::preflight;
use super::runtime::cache::{Caches, FleetTriggers, changes_only, watched_api};
use super::runtime::conditions::Reason;
use super::runtime::context::{
    Context, error_policy, hash_metadata, matching, object_key, own_watch, ref_key,
};
use super::runtime::error::Error;
use super::runtime::finalizer;
use super::runtime::resources::{Applied, ApplyError, FleetResources};
use crate::crd::modelset::{ModelSet, SyncMethod};
use crate::crd::{ComfyUIDeployment, ModelSync};
use crate::effective::{self, EffectiveFleet, Refusal};
use crate::names::{
    FleetNames, MANAGED_BY, MANAGED_BY_KEY, NODEPOOL_LABEL, OWNER_NAME_KEY, OWNER_NAMESPACE_KEY,
};
use crate::policy;
use crate::render::{self, ChildKind, RenderContext};
use crate::telemetry::{ControllerName, FleetLabels};
use report::{KIND, StatusWrite, fleet_names, mark_invalid, publish, stuck, write_status};
use status::{Facts, GatewayFacts, ModelFacts};

pub const FINALIZER: &str = "sdfleet.io/cleanup";
/// First and longest wait between looks at a fleet whose children are being deleted.
const CLEANUP_POLL: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(30));
type Guarded = DeserializeGuard<ComfyUIDeployment>;

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

const FLEET: ControllerName = ControllerName::ComfyUIDeployment;

/// Notes when watch events asked for fleets (their queue-to-done time starts).
fn asked<I: IntoIterator<Item = ObjectRef<Guarded>>>(
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
fn fleet_changes(fleet: &Guarded) -> Option<u64> {
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
fn child_changes(kind: ChildKind, child: &DynamicObject) -> u64 {
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
fn model_set_changes(ms: &ModelSet) -> Option<u64> {
    let mut h = DefaultHasher::new();
    ms.metadata.generation.hash(&mut h);
    serde_json::to_string(&ms.status)
        .unwrap_or_default()
        .hash(&mut h);
    Some(h.finish())
}

/// The owning fleet of a labelled child.
fn owner_of(child: &DynamicObject) -> Option<ObjectRef<Guarded>> {
    owner_from(child.labels())
}

/// The fleet that owner labels name.
fn owner_from(labels: &std::collections::BTreeMap<String, String>) -> Option<ObjectRef<Guarded>> {
    if labels.get(MANAGED_BY_KEY).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    let namespace = labels.get(OWNER_NAMESPACE_KEY)?;
    let name = labels.get(OWNER_NAME_KEY)?;
    Some(ObjectRef::new(name).within(namespace))
}

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
const STALE_RETRY: Duration = Duration::from_secs(1);

/// Adds our finalizer before anything is created, and removes it only once cleanup has
/// deleted every child.
async fn reconcile_with_finalizer(cud: &ComfyUIDeployment, ctx: &Context) -> Result<Action, Error> {
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

fn resources<'a>(ctx: &'a Context, fleet: &'a FleetNames) -> FleetResources<'a> {
    FleetResources {
        client: &ctx.client,
        metrics: &ctx.metrics,
        fleet,
        node_class: ctx.settings.cloud.provider(),
        agent: &ctx.settings.cluster.agent,
        cache: None,
    }
}

/// The fleet within its class ([`effective::fleet`], as `sdfleet render` decides it), or,
/// after a refusal is written to its status, what to do instead.
async fn within_class(
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

/// A fleet its class no longer allows (the admin narrowed it) keeps nothing the class
/// granted: its nodes, workloads, volumes and Ingresses are removed until it fits again.
/// What holds the user's state (the gateway's job store) and what only restricts (the
/// NetworkPolicy) stay; S3 data is never touched (the volumes are `Retain`). Returns
/// `refusal` with what that means.
async fn withdraw(cud: &ComfyUIDeployment, ctx: &Context, refusal: &str) -> Result<String, Error> {
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

/// Creates or updates every child, prunes the unwanted ones, and writes status.
async fn apply_fleet(cud: &ComfyUIDeployment, ctx: &Context) -> Result<Action, Error> {
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

    let mut resources = resources(ctx, &fleet);
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
    for pruned in resources.prune(&children).await? {
        let note = format!("Deleted {pruned}: no longer wanted");
        publish(ctx, cud, EventType::Normal, "Pruned", &note);
    }

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

/// Counts a cold start that this pass saw complete (the status read had it open).
fn record_cold_start(
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
struct Scaling {
    plan: autoscale::Plan,
    pods: Vec<Pod>,
}

/// The autoscaler's field manager on pods (their disruption annotations only).
const AUTOSCALER_MANAGER: &str = "sdfleet-autoscaler";
/// A scale-down held for the pods' annotations is looked at again this soon.
const ANNOTATION_SETTLE: Duration = Duration::from_secs(1);

async fn scale(
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
        plan.status.cold_start = Some(autoscale::cold_start_phases(&cold, &pods, &nodes));
    }
    Ok(Scaling { plan, pods })
}

/// What the status is computed from, as the caches hold it: the Deployment, the
/// NodePool, the Ingress, and, with the ModelSet read before, the NodePool's nodes
/// (`pool_nodes`, read once for the status and the metrics).
fn fetch_facts(
    caches: &Caches,
    cud: &ComfyUIDeployment,
    fleet: &FleetNames,
    model_set: Option<ModelSet>,
    pool_nodes: &[k8s_openapi::api::core::v1::Node],
) -> Facts {
    let ns = Some(fleet.namespace.as_str());
    let deployment = |name: &str| {
        caches
            .typed_child::<Deployment>(ChildKind::Deployment, ns, name)
            .and_then(|d| d.status)
    };
    let ingress = |name: &str| caches.typed_child::<Ingress>(ChildKind::Ingress, ns, name);
    let nodepool = caches
        .child(ChildKind::NodePool, None, &fleet.nodepool())
        .map(|p| (*p).clone());
    let models = match (cud.spec.model_set.as_deref(), model_set) {
        (None, _) => ModelFacts::NotUsed,
        (Some(name), None) => ModelFacts::NotFound(name.to_string()),
        (Some(name), Some(ms)) => {
            let ssm = ms.spec.sync.method == SyncMethod::Ssm;
            let nodes = pool_nodes
                .iter()
                // SSM reports by EC2 instance id: the last part of the providerID.
                .map(
                    |n| match n.spec.as_ref().and_then(|s| s.provider_id.as_deref()) {
                        Some(id) if ssm => id.rsplit('/').next().unwrap_or(id).to_string(),
                        _ => n.name_any(),
                    },
                )
                .collect();
            let mut status = ms.status.unwrap_or_default();
            // The agents report in ModelSync objects; SSM's entries stay in the status
            // (the controller writes them, one patch per pass).
            if !ssm {
                status.nodes = caches.reports_of(&fleet.namespace, name);
            }
            ModelFacts::Found {
                status: Box::new(status),
                nodes,
            }
        }
    };
    let gateway = cud.spec.gateway.as_ref().map(|gw| GatewayFacts {
        deployment: deployment(&fleet.gateway()),
        ingress: if gw.ingress.enabled {
            ingress(&fleet.gateway())
        } else {
            None
        },
    });
    Facts {
        deployment: deployment(&fleet.deployment()),
        nodepool,
        ingress: if cud.spec.ingress.enabled {
            ingress(&fleet.ingress())
        } else {
            None
        },
        models: Some(models),
        gateway,
    }
}
