//! The ComfyUIDeployment reconciler, as a short pipeline:
//! parse → preflight (dereference) → build (pure, `render`) → apply + prune → status.
//! Deletion runs through a finalizer that removes children in a safe order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PropagationPolicy,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use serde_json::json;

use super::apply::{self, Applied, ApplyError};
use super::conditions::{
    self, DEGRADED, MODELS_READY, NODEPOOL_READY, Observed, PROGRESSING, READY, Reason,
};
use super::{
    Context, child_apis, cud_api_resource, object_key, object_reference, preflight, steady_requeue,
};
use crate::crd::ComfyUIDeployment;
use crate::crd::comfyui::ComfyUIDeploymentStatus;
use crate::render::names::FleetNames;
use crate::render::{self, ChildKind, RenderContext};
use crate::telemetry::{FleetLabels, ReasonLabels};

pub const FINALIZER: &str = "sdfleet.io/cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("missing dependencies: {0}")]
    MissingDependency(String),
}

impl Error {
    fn reason(&self) -> &'static str {
        match self {
            Error::Apply(_) => "ApplyFailed",
            Error::Kube(_) => "KubeError",
            Error::MissingDependency(_) => "MissingDependency",
        }
    }
}

pub async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &obj.namespace().unwrap_or_default(),
        &cud_api_resource(),
    );
    let result = reconcile_with_finalizer(&api, &obj, &ctx).await;
    ctx.metrics
        .record_reconcile(start.elapsed(), result.is_ok());
    result
}

/// Adds our finalizer before anything is created, and removes it only once cleanup has
/// deleted every child. (kube's `finalizer()` helper removes it as soon as cleanup
/// returns, which would orphan children that take several passes to delete.)
async fn reconcile_with_finalizer(
    api: &Api<DynamicObject>,
    obj: &DynamicObject,
    ctx: &Context,
) -> Result<Action, Error> {
    let finalizers = obj.finalizers();
    let ours = finalizers.iter().any(|f| f == FINALIZER);
    if obj.metadata.deletion_timestamp.is_some() {
        if !ours {
            return Ok(Action::await_change());
        }
        if !cleanup(obj, ctx).await? {
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
        set_finalizers(api, obj, json!(rest), ctx).await?;
        return Ok(Action::await_change());
    }
    if !ours {
        let mut all = finalizers.to_vec();
        all.push(FINALIZER.to_string());
        // The patch triggers a new reconcile with the finalizer in place.
        set_finalizers(api, obj, json!(all), ctx).await?;
        return Ok(Action::await_change());
    }
    apply_fleet(obj, ctx).await
}

/// Replaces the finalizer list, failing with a conflict if the object changed since read.
async fn set_finalizers(
    api: &Api<DynamicObject>,
    obj: &DynamicObject,
    finalizers: serde_json::Value,
    ctx: &Context,
) -> Result<(), Error> {
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}});
    ctx.metrics.record_write("patch", "ComfyUIDeployment");
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

pub fn error_policy(obj: Arc<DynamicObject>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&ReasonLabels {
            reason: error.reason().into(),
        })
        .inc();
    let delay = ctx.backoff(&object_key(&obj));
    tracing::warn!(object = %object_key(&obj), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Creates or updates every child, prunes the unwanted ones, and writes status.
async fn apply_fleet(obj: &DynamicObject, ctx: &Context) -> Result<Action, Error> {
    let key = object_key(obj);
    // Parse here, not in the watcher: an object we cannot read must not stop the others.
    let cud: ComfyUIDeployment = match serde_json::to_value(obj).and_then(serde_json::from_value) {
        Ok(cud) => cud,
        Err(e) => {
            let message = format!("cannot read the spec: {e}");
            write_status(ctx, obj, None, &invalid(&message), None).await?;
            return Ok(Action::await_change());
        }
    };
    let cloud = ctx.settings.cloud;
    let node_class_api = cloud.provider().api_resource();
    let missing = preflight::missing(
        &ctx.client,
        &cud,
        &node_class_api,
        &render::nodepool::api_resource(),
    )
    .await?;
    if !missing.is_empty() {
        let message = missing.join("; ");
        let observed = vec![
            Observed::new(READY, false, Reason::MissingDependency, &message),
            Observed::new(
                PROGRESSING,
                false,
                Reason::MissingDependency,
                "waiting for dependencies",
            ),
            Observed::new(DEGRADED, true, Reason::MissingDependency, &message),
        ];
        write_status(ctx, obj, Some(&cud), &observed, None).await?;
        publish(ctx, obj, EventType::Warning, "MissingDependency", &message).await;
        return Err(Error::MissingDependency(message));
    }

    let rctx = RenderContext {
        cluster: &ctx.settings.cluster,
        node_class: cloud.provider(),
    };
    let children = match render::build(&cud, &rctx) {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            write_status(ctx, obj, Some(&cud), &invalid(&message), None).await?;
            publish(ctx, obj, EventType::Warning, "InvalidSpec", &message).await;
            return Ok(Action::await_change());
        }
    };

    let spec_unchanged =
        cud.status.as_ref().and_then(|s| s.observed_generation) == cud.metadata.generation;
    for child in &children {
        let applied = match apply::apply(&ctx.client, child, &ctx.metrics).await {
            Ok(a) => a,
            Err(e) => {
                let message = e.to_string();
                let observed = vec![
                    Observed::new(READY, false, Reason::ApplyFailed, &message),
                    Observed::new(PROGRESSING, false, Reason::ApplyFailed, &message),
                    Observed::new(DEGRADED, true, Reason::ApplyFailed, &message),
                ];
                write_status(ctx, obj, Some(&cud), &observed, None).await?;
                publish(ctx, obj, EventType::Warning, "ApplyFailed", &message).await;
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
            publish(
                ctx,
                obj,
                EventType::Normal,
                verb,
                &format!("{verb} {} {}", child.api.kind, child.name),
            )
            .await;
        }
    }

    let fleet = FleetNames::new(&cud.namespace().unwrap_or_default(), &cud.name_any());
    let selector = fleet.owner_selector();
    for (kind, api) in child_apis(cloud) {
        let keep: Vec<&str> = children
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.name.as_str())
            .collect();
        let pruned = apply::prune(
            &ctx.client,
            &api,
            ctx.child_namespace(kind, &fleet.namespace),
            &selector,
            &keep,
            &ctx.metrics,
        )
        .await?;
        for name in pruned {
            publish(
                ctx,
                obj,
                EventType::Normal,
                "Pruned",
                &format!("Deleted {} {name}: no longer wanted", api.kind),
            )
            .await;
        }
    }

    let observed = observe(ctx, &cud, &fleet).await?;
    write_status(ctx, obj, Some(&cud), &observed.conditions, Some(&observed)).await?;
    ctx.reset_backoff(&key);
    let labels = FleetLabels {
        namespace: fleet.namespace.clone(),
        name: fleet.name.clone(),
    };
    ctx.metrics
        .desired_replicas
        .get_or_create(&labels)
        .set(cud.spec.replicas.into());
    ctx.metrics
        .ready_replicas
        .get_or_create(&labels)
        .set(observed.ready_replicas.into());
    // The ModelSet's per-node status is not watched: look again soon while syncing.
    let syncing = observed
        .conditions
        .iter()
        .any(|c| c.type_ == MODELS_READY && !c.status);
    Ok(if syncing {
        Action::requeue(Duration::from_secs(5))
    } else {
        steady_requeue()
    })
}

fn invalid(message: &str) -> Vec<Observed> {
    vec![
        Observed::new(READY, false, Reason::InvalidSpec, message),
        Observed::new(PROGRESSING, false, Reason::InvalidSpec, message),
        Observed::new(DEGRADED, true, Reason::InvalidSpec, message),
    ]
}

/// What the children report, turned into status fields and conditions.
struct Observation {
    replicas: i32,
    ready_replicas: i32,
    endpoint: Option<String>,
    conditions: Vec<Observed>,
}

async fn observe(
    ctx: &Context,
    cud: &ComfyUIDeployment,
    fleet: &FleetNames,
) -> Result<Observation, Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &fleet.namespace);
    let status = deployments
        .get_opt(&fleet.deployment())
        .await?
        .and_then(|d| d.status)
        .unwrap_or_default();
    let replicas = status.replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let want = cud.spec.replicas;

    let pools: Api<DynamicObject> =
        Api::all_with(ctx.client.clone(), &render::nodepool::api_resource());
    let pool = pools.get_opt(&fleet.nodepool()).await?;
    let pool_ready = pool
        .as_ref()
        .and_then(|p| p.data["status"]["conditions"].as_array().cloned())
        .and_then(|cs| cs.into_iter().find(|c| c["type"] == "Ready"));
    let nodepool_condition = match pool_ready {
        Some(c) if c["status"] == "True" => Observed::new(
            NODEPOOL_READY,
            true,
            Reason::NodePoolReady,
            format!("NodePool {} is ready", fleet.nodepool()),
        ),
        Some(c) => Observed::new(
            NODEPOOL_READY,
            false,
            Reason::NodePoolNotReady,
            format!(
                "NodePool {}: {}",
                fleet.nodepool(),
                c["message"].as_str().unwrap_or("not ready")
            ),
        ),
        None => Observed::new(
            NODEPOOL_READY,
            false,
            Reason::NodePoolPending,
            format!(
                "NodePool {} has no status yet: is Karpenter running?",
                fleet.nodepool()
            ),
        ),
    };

    let endpoint = if cud.spec.ingress.enabled {
        let ingresses: Api<Ingress> = Api::namespaced(ctx.client.clone(), &fleet.namespace);
        ingresses
            .get_opt(&fleet.ingress())
            .await?
            .and_then(|i| endpoint_of(&i, cud))
    } else {
        None
    };

    let rolled_out = updated >= want && replicas == want && ready >= want;
    let ready_condition = if want == 0 {
        Observed::new(READY, true, Reason::ScaledToZero, "replicas is 0")
    } else if ready >= want {
        Observed::new(
            READY,
            true,
            Reason::AllReplicasReady,
            format!("{ready}/{want} replicas ready"),
        )
    } else {
        let hint = if nodepool_condition.status {
            ""
        } else {
            "; the NodePool is not ready"
        };
        Observed::new(
            READY,
            false,
            Reason::WaitingForPods,
            format!("{ready}/{want} replicas ready{hint}"),
        )
    };
    let progressing = if rolled_out {
        Observed::new(
            PROGRESSING,
            false,
            Reason::RolloutComplete,
            format!("{want} replicas up to date"),
        )
    } else {
        Observed::new(
            PROGRESSING,
            true,
            Reason::RollingOut,
            format!("{updated}/{want} updated, {ready}/{want} ready"),
        )
    };
    let degraded = Observed::new(DEGRADED, false, Reason::AsExpected, "all children applied");
    let models = models_ready(ctx, cud, fleet).await?;
    Ok(Observation {
        replicas,
        ready_replicas: ready,
        endpoint,
        conditions: vec![
            ready_condition,
            progressing,
            degraded,
            nodepool_condition,
            models,
        ],
    })
}

/// ModelsReady: every node of the fleet's NodePool reports the ModelSet's revision.
async fn models_ready(
    ctx: &Context,
    cud: &ComfyUIDeployment,
    fleet: &FleetNames,
) -> Result<Observed, Error> {
    let Some(name) = cud.spec.model_set.as_deref() else {
        return Ok(Observed::new(
            MODELS_READY,
            true,
            Reason::NoModelSet,
            "no ModelSet: the image's own models are used",
        ));
    };
    let sets: Api<crate::crd::ModelSet> = Api::namespaced(ctx.client.clone(), &fleet.namespace);
    let Some(ms) = sets.get_opt(name).await? else {
        return Ok(Observed::new(
            MODELS_READY,
            false,
            Reason::ModelSetNotFound,
            format!(
                "ModelSet {name} does not exist in namespace {}",
                fleet.namespace
            ),
        ));
    };
    let status = ms.status.unwrap_or_default();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ctx.client.clone());
    let pool_nodes = nodes
        .list(&ListParams::default().labels(&format!(
            "{}={}",
            crate::render::names::NODEPOOL_LABEL,
            fleet.nodepool()
        )))
        .await?
        .items;
    if pool_nodes.is_empty() {
        return Ok(Observed::new(
            MODELS_READY,
            false,
            Reason::NoNodes,
            "the fleet has no nodes yet",
        ));
    }
    let mut synced = 0;
    for node in &pool_nodes {
        match crate::agent::node_entry(&status, &node.name_any()) {
            Some(e) if e.state == crate::crd::modelset::NodeSyncState::Failed => {
                return Ok(Observed::new(
                    MODELS_READY,
                    false,
                    Reason::SyncFailed,
                    format!("node {}: {}", e.node, e.message),
                ));
            }
            Some(e)
                if e.state == crate::crd::modelset::NodeSyncState::Synced
                    && e.revision == status.revision =>
            {
                synced += 1
            }
            _ => {}
        }
    }
    let total = pool_nodes.len();
    Ok(if synced == total {
        Observed::new(
            MODELS_READY,
            true,
            Reason::ModelsSynced,
            format!("{synced}/{total} nodes at {}", status.revision),
        )
    } else {
        Observed::new(
            MODELS_READY,
            false,
            Reason::Syncing,
            format!("{synced}/{total} nodes at {}", status.revision),
        )
    })
}

fn endpoint_of(ingress: &Ingress, cud: &ComfyUIDeployment) -> Option<String> {
    let lb = ingress
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?;
    let host = lb.hostname.clone().or_else(|| lb.ip.clone())?;
    let tls = cud
        .spec
        .ingress
        .certificate_arn
        .as_deref()
        .is_some_and(|c| !c.is_empty());
    let host = cud
        .spec
        .ingress
        .host
        .clone()
        .filter(|h| !h.is_empty() && !h.starts_with('*'))
        .unwrap_or(host);
    Some(format!("{}://{host}", if tls { "https" } else { "http" }))
}

/// Patches status only when it differs from what is stored.
async fn write_status(
    ctx: &Context,
    obj: &DynamicObject,
    cud: Option<&ComfyUIDeployment>,
    observed: &[Observed],
    observation: Option<&Observation>,
) -> Result<(), Error> {
    let previous: ComfyUIDeploymentStatus =
        serde_json::from_value(obj.data.get("status").cloned().unwrap_or(json!({})))
            .unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let generation = obj.metadata.generation;
    let mut status = previous.clone();
    status.observed_generation = generation;
    status.conditions = conditions::merge(&previous.conditions, observed, generation, &now);
    if let Some(cud) = cud {
        let fleet = FleetNames::new(&cud.namespace().unwrap_or_default(), &cud.name_any());
        status.selector = Some(fleet.pod_selector_string());
        status.node_pool = Some(fleet.nodepool());
        status.node_class = Some(fleet.node_class());
    }
    if let Some(o) = observation {
        status.replicas = o.replicas;
        status.ready_replicas = o.ready_replicas;
        status.endpoint = o.endpoint.clone();
    }
    if status == previous {
        return Ok(());
    }
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &obj.namespace().unwrap_or_default(),
        &cud_api_resource(),
    );
    ctx.metrics
        .record_write("patch-status", "ComfyUIDeployment");
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    Ok(())
}

async fn publish(ctx: &Context, obj: &DynamicObject, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    ctx.metrics.record_write("event", "Event");
    if let Err(e) = ctx.recorder.publish(&event, &object_reference(obj)).await {
        tracing::warn!(error = %e, "cannot publish event");
    }
}

/// Deletes children in stages, one stage per pass: the workload first (its pods go
/// before their volumes), then the claims, then the volumes, then the NodePool (so
/// Karpenter drains its nodes), then the node class. The finalizer is removed only when
/// nothing is left: returns true then. S3 data is never touched: the volumes are Retain.
async fn cleanup(obj: &DynamicObject, ctx: &Context) -> Result<bool, Error> {
    let fleet = FleetNames::new(&obj.namespace().unwrap_or_default(), &obj.name_any());
    let selector = fleet.owner_selector();
    let stages: [&[ChildKind]; 5] = [
        &[
            ChildKind::Ingress,
            ChildKind::Deployment,
            ChildKind::Service,
        ],
        &[ChildKind::PersistentVolumeClaim, ChildKind::AgentDaemonSet],
        &[ChildKind::PersistentVolume],
        &[ChildKind::NodePool],
        &[ChildKind::NodeClass],
    ];
    let apis = child_apis(ctx.settings.cloud);
    for stage in stages {
        let mut remaining = Vec::new();
        for (kind, ar) in apis.iter().filter(|(k, _)| stage.contains(k)) {
            let api = apply::api_for(
                &ctx.client,
                ar,
                ctx.child_namespace(*kind, &fleet.namespace),
            );
            let list = match api.list(&ListParams::default().labels(&selector)).await {
                Ok(l) => l,
                // A CRD uninstalled before the fleet: nothing of that kind can be left.
                Err(kube::Error::Api(e)) if e.code == 404 => continue,
                Err(e) => return Err(e.into()),
            };
            for child in list.items {
                remaining.push(format!("{}/{}", ar.kind, child.name_any()));
                if child.metadata.deletion_timestamp.is_none() {
                    ctx.metrics.record_write("delete", &ar.kind);
                    let dp = DeleteParams {
                        propagation_policy: Some(PropagationPolicy::Foreground),
                        ..Default::default()
                    };
                    match api.delete(&child.name_any(), &dp).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        if !remaining.is_empty() {
            tracing::info!(object = %object_key(obj), ?remaining, "waiting for children to be deleted");
            return Ok(false);
        }
    }
    Ok(true)
}
