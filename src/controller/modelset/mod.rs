//! The ModelSet reconciler: lists the bucket into a catalog, writes the status (and the
//! full catalog into ConfigMaps when it is large), relists every `pollInterval`, and
//! relists within seconds of an S3 event when an SQS queue is configured.

pub mod catalog_maps;
pub mod sqs;
pub mod ssm;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DeserializeGuard};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::conditions::{self, DesiredCondition, READY, Reason};
use super::context::{Context, error_policy};
use super::error::Error;
use super::finalizer;
use super::status as status_writer;
use crate::crd::modelset::{ModelEntry, ModelSet, ModelSetStatus, SyncMethod};
use crate::sync::catalog::{Catalog, model_type};
use crate::sync::store::S3Store;
use crate::telemetry::ControllerName;
use catalog_maps::MODELS_IN_STATUS;

pub const SYNCED: &str = "Synced";
/// How soon SSM invocations in flight are looked at again.
const SSM_POLL: Duration = Duration::from_secs(5);
/// Holds a ModelSet until its SQS listener is stopped.
pub const FINALIZER: &str = "sdfleet.io/stop-listener";
const KIND: &str = "ModelSet";
type Guarded = DeserializeGuard<ModelSet>;

/// Runs the ModelSet controller; `triggers` (from the SQS listeners) start reconciles.
pub async fn run(
    ctx: Arc<Context>,
    mut triggers: mpsc::UnboundedReceiver<ObjectRef<Guarded>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Guarded> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let triggers = futures::stream::poll_fn(move |cx| triggers.poll_recv(cx));
    Controller::new(api, watcher::Config::default().any_semantic())
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |obj, error, ctx| error_policy(ControllerName::ModelSet, &obj, error, &ctx),
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "ModelSet reconcile failed");
            }
        })
        .await;
}

/// Parses `60s`, `5m`, `1h30m`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut n = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            n.push(c);
            continue;
        }
        let v: u64 = n.parse().ok()?;
        n.clear();
        total += v * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
    }
    (n.is_empty() && total > 0).then(|| Duration::from_secs(total))
}

pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let result = match &obj.0 {
        Ok(ms) => reconcile_modelset(ms, &ctx).await,
        Err(invalid) => {
            let message = format!("cannot read the spec: {}", invalid.error);
            let invalid_spec = [DesiredCondition::new(
                READY,
                false,
                Reason::InvalidSpec,
                message,
            )];
            write_raw_status(&ctx, &invalid.metadata, &invalid_spec)
                .await
                .map(|()| Action::await_change())
        }
    };
    ctx.finished(
        ControllerName::ModelSet,
        &obj,
        start.elapsed(),
        result.is_ok(),
    );
    result
}

async fn reconcile_modelset(ms: &ModelSet, ctx: &Context) -> Result<Action, Error> {
    let key = format!("{}/{}", ms.namespace().unwrap_or_default(), ms.name_any());
    let me = ObjectRef::<Guarded>::new(&ms.name_any()).within(&ms.namespace().unwrap_or_default());
    let api = raw_api(ctx, &ms.namespace().unwrap_or_default());
    if ms.metadata.deletion_timestamp.is_some() {
        // Stop the SQS listener before the object goes; the finalizer guarantees this
        // runs even when the deletion happens while the controller is down.
        if let Some(w) = &ctx.sqs {
            w.ensure(&key, None, me, String::new(), None);
        }
        finalizer::set(&api, &ctx.metrics, KIND, ms, FINALIZER, false).await?;
        return Ok(Action::await_change());
    }
    // The patch triggers a new reconcile with the finalizer in place.
    if finalizer::set(&api, &ctx.metrics, KIND, ms, FINALIZER, true).await? {
        return Ok(Action::await_change());
    }
    let poll = parse_duration(&ms.spec.sync.poll_interval).unwrap_or(Duration::from_secs(60));
    let default_region = ctx.settings.cluster.region.as_deref();
    let location = ms.spec.source.s3.location(default_region);
    if let Some(w) = &ctx.sqs {
        let url = ms
            .spec
            .sync
            .sqs_queue_url
            .as_deref()
            .filter(|u| !u.is_empty());
        w.ensure(
            &key,
            url,
            me,
            location.prefix.clone(),
            location.region.clone(),
        );
    }

    let filter = match ms.spec.filter() {
        Ok(f) => f,
        Err(e) => {
            let invalid = [DesiredCondition::new(
                READY,
                false,
                Reason::InvalidSpec,
                e.to_string(),
            )];
            write_status(ctx, ms, None, &invalid, None).await?;
            return Ok(Action::await_change());
        }
    };
    let catalog = match S3Store::open_catalog(&location, &filter).await {
        Ok((_, catalog)) => catalog,
        Err(e) => {
            let message = e.to_string();
            let failed = [DesiredCondition::new(
                READY,
                false,
                Reason::ListFailed,
                &message,
            )];
            write_status(ctx, ms, None, &failed, None).await?;
            return Err(Error::List(message));
        }
    };
    let catalog_ref = catalog_maps::store_catalog(ctx, ms, &catalog).await?;
    let listed = DesiredCondition::new(
        READY,
        true,
        Reason::Listed,
        format!(
            "{} models, {}",
            catalog.objects.len(),
            crate::sync::human(catalog.total_bytes())
        ),
    );
    let live = match ms.spec.sync.method {
        // Agents report under node names: entries of nodes that are gone are dropped.
        SyncMethod::Agent => Some(prune_departed_nodes(ctx, ms).await?),
        // SSM entries are instance ids, re-applied whole by `ssm` on each sync.
        SyncMethod::Ssm => None,
    };
    let catalog_status = Some((&catalog, catalog_ref));
    write_status(ctx, ms, catalog_status, &[listed], live.as_ref()).await?;
    if ms.spec.sync.method == SyncMethod::Ssm {
        let in_flight = ssm::sync_instances(
            &ctx.client,
            ms,
            &catalog.revision(),
            ctx.settings.cluster.cluster_name.as_deref(),
            location.region.as_deref(),
        )
        .await?;
        if in_flight {
            return Ok(Action::requeue(SSM_POLL.min(poll)));
        }
    }
    Ok(Action::requeue(poll))
}

/// Removes the `status.nodes` entries of nodes that no longer exist (each agent writes
/// only its own, so nobody else would), and returns the names of the nodes that do.
/// Each removal first tests that the entry at that index is still the departed node's,
/// so a concurrent agent write is never removed by mistake.
async fn prune_departed_nodes(ctx: &Context, ms: &ModelSet) -> Result<BTreeSet<String>, Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let live: BTreeSet<String> = nodes
        .list_metadata(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let entries = ms
        .status
        .as_ref()
        .map(|s| s.nodes.as_slice())
        .unwrap_or_default();
    let mut ops = Vec::new();
    // From the end, so earlier indices stay valid within the one patch.
    for (i, entry) in entries.iter().enumerate().rev() {
        if !live.contains(&entry.node) {
            ops.push(json!({"op": "test", "path": format!("/status/nodes/{i}/node"), "value": entry.node}));
            ops.push(json!({"op": "remove", "path": format!("/status/nodes/{i}")}));
        }
    }
    if ops.is_empty() {
        return Ok(live);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(ops)).map_err(|e| Error::Catalog(e.to_string()))?;
    ctx.metrics.record_write("patch-status", KIND);
    let api = raw_api(ctx, &ms.namespace().unwrap_or_default());
    match api
        .patch_status(
            &ms.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(live),
        // The list changed meanwhile (a test failed): the next pass prunes.
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => Ok(live),
        Err(e) => Err(e.into()),
    }
}

/// The Synced condition from the per-node entries the agents (or SSM) wrote, counting
/// only the nodes in `live` when given.
pub fn synced_condition(
    status: &ModelSetStatus,
    live: Option<&BTreeSet<String>>,
) -> DesiredCondition {
    let entries: Vec<_> = status
        .nodes
        .iter()
        .filter(|n| live.is_none_or(|l| l.contains(&n.node)))
        .collect();
    let failed = entries
        .iter()
        .find(|n| n.state == crate::crd::modelset::NodeSyncState::Failed);
    let synced = entries
        .iter()
        .filter(|n| n.is_synced_at(&status.revision))
        .count();
    let total = entries.len();
    if total == 0 {
        DesiredCondition::new(
            SYNCED,
            false,
            Reason::NoNodes,
            "no node syncs this ModelSet yet",
        )
    } else if let Some(f) = failed {
        DesiredCondition::new(
            SYNCED,
            false,
            Reason::SyncFailed,
            format!("{}: {}", f.node, f.message),
        )
    } else if synced == total {
        DesiredCondition::new(
            SYNCED,
            true,
            Reason::AllNodesSynced,
            format!("{synced}/{synced} nodes at {}", status.revision),
        )
    } else {
        DesiredCondition::new(
            SYNCED,
            false,
            Reason::Syncing,
            format!("{synced}/{total} nodes at {}", status.revision),
        )
    }
}

/// The controller's part of the status (never `nodes`, which agents own): the catalog
/// when listed, and the conditions.
fn next_status(
    previous: &ModelSetStatus,
    generation: Option<i64>,
    catalog: Option<(&Catalog, Option<crate::crd::modelset::CatalogRef>)>,
    conditions: &[DesiredCondition],
    live: Option<&BTreeSet<String>>,
) -> ModelSetStatus {
    let mut status = previous.clone();
    status.observed_generation = generation;
    if let Some((catalog, catalog_ref)) = catalog {
        status.revision = catalog.revision();
        status.object_count = catalog.objects.len() as u64;
        status.total_bytes = catalog.total_bytes();
        status.by_type = catalog.by_type();
        status.models = catalog
            .objects
            .iter()
            .take(MODELS_IN_STATUS)
            .map(|o| ModelEntry {
                key: o.key.clone(),
                type_: model_type(&o.key).to_string(),
                size: o.size,
                etag: o.etag.clone(),
                last_modified: o.last_modified.clone(),
            })
            .collect();
        status.catalog_ref = catalog_ref;
    }
    let mut all = conditions.to_vec();
    all.push(synced_condition(&status, live));
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    status.conditions = conditions::merge(&previous.conditions, &all, generation, &now);
    status
}

fn raw_api(ctx: &Context, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        ctx.client.clone(),
        namespace,
        &ApiResource::erase::<ModelSet>(&()),
    )
}

/// Merge-patches the status when it changed: without `nodes` (the agents' field), and
/// with an explicit null for a catalogRef that went away.
async fn patch(
    ctx: &Context,
    namespace: &str,
    name: &str,
    previous: &ModelSetStatus,
    next: &ModelSetStatus,
) -> Result<(), Error> {
    let cleared = next.catalog_ref.is_none();
    status_writer::patch_if_changed(
        &raw_api(ctx, namespace),
        &ctx.metrics,
        KIND,
        name,
        previous,
        next,
        |body| {
            body.remove("nodes");
            if cleared {
                body.insert("catalogRef".into(), Value::Null);
            }
        },
    )
    .await?;
    Ok(())
}

async fn write_status(
    ctx: &Context,
    ms: &ModelSet,
    catalog: Option<(&Catalog, Option<crate::crd::modelset::CatalogRef>)>,
    conditions: &[DesiredCondition],
    live: Option<&BTreeSet<String>>,
) -> Result<(), Error> {
    let previous = ms.status.clone().unwrap_or_default();
    let next = next_status(&previous, ms.meta().generation, catalog, conditions, live);
    patch(
        ctx,
        &ms.namespace().unwrap_or_default(),
        &ms.name_any(),
        &previous,
        &next,
    )
    .await
}

/// Status of an object that cannot be read as a ModelSet: its stored status is read
/// raw, so that an unchanged result writes nothing.
async fn write_raw_status(
    ctx: &Context,
    meta: &ObjectMeta,
    conditions: &[DesiredCondition],
) -> Result<(), Error> {
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let Some(raw) = raw_api(ctx, &namespace).get_opt(&name).await? else {
        return Ok(());
    };
    let previous: ModelSetStatus = raw
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    let next = next_status(&previous, raw.metadata.generation, None, conditions, None);
    patch(ctx, &namespace, &name, &previous, &next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::crd::modelset::{NodeSync, NodeSyncState};

    #[test]
    fn synced_counts_only_live_nodes() {
        let entry = |node: &str, revision: &str| NodeSync {
            node: node.into(),
            revision: revision.into(),
            state: NodeSyncState::Synced,
            bytes_done: 0,
            message: String::new(),
            command_id: None,
        };
        let status = ModelSetStatus {
            revision: "r2".into(),
            // n-old was replaced: its entry is stale and must not hold Synced down.
            nodes: vec![entry("n1", "r2"), entry("n-old", "r1")],
            ..Default::default()
        };
        let live: BTreeSet<String> = ["n1".to_string()].into();
        let c = synced_condition(&status, Some(&live));
        assert_eq!((c.status, c.reason), (true, Reason::AllNodesSynced));
        assert_eq!(c.message, "1/1 nodes at r2");
        let all = synced_condition(&status, None);
        assert_eq!((all.status, all.reason), (false, Reason::Syncing));
    }

    #[test]
    fn node_messages_are_bounded() {
        let long = "x".repeat(10_000);
        let cut = NodeSync::bounded(&long);
        assert_eq!(cut.chars().count(), crate::crd::modelset::NODE_MESSAGE_MAX);
        assert!(cut.ends_with('…'));
        assert_eq!(NodeSync::bounded("short"), "short");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("1d"), None);
    }
}
