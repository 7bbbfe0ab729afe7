//! The ModelSet reconciler: lists the bucket into a catalog, writes the status (and the
//! full catalog into ConfigMaps when it is large), relists every `pollInterval`, and
//! relists within seconds of an S3 event when an SQS queue is configured.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::ApiResource;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::conditions::{self, Observed, READY, Reason};
use super::{Context, object_key};
use crate::crd::modelset::{
    CatalogRef, ModelEntry, ModelSet, ModelSetStatus, NodeSyncState, SyncMethod,
};
use crate::sync::catalog::{Catalog, Filter, model_type};
use crate::sync::events;
use crate::sync::store::{ObjectStore, S3Store};
use crate::telemetry::ReasonLabels;

pub const SYNCED: &str = "Synced";
/// Models listed in the status itself; the rest go to ConfigMaps.
pub const MODELS_IN_STATUS: usize = 100;
/// Bytes of compressed catalog per ConfigMap (the object limit is 1 MiB).
const CATALOG_CHUNK: usize = 900 * 1024;
const CATALOG_KEY: &str = "catalog.tsv.gz";

pub fn api_resource() -> ApiResource {
    ApiResource::erase::<ModelSet>(&())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("listing the bucket: {0}")]
    List(String),
    #[error("writing the catalog: {0}")]
    Catalog(String),
    #[error("SSM sync: {0}")]
    Ssm(#[from] super::ssm::SsmError),
}

/// SQS listeners, one per ModelSet with a queue, and the channel they wake reconciles on.
pub struct SqsWatchers {
    tasks: Mutex<HashMap<String, (String, tokio::task::JoinHandle<()>)>>,
    trigger: mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
}

impl SqsWatchers {
    pub fn new() -> (
        SqsWatchers,
        mpsc::UnboundedReceiver<ObjectRef<DynamicObject>>,
    ) {
        let (trigger, rx) = mpsc::unbounded_channel();
        (
            SqsWatchers {
                tasks: Mutex::new(HashMap::new()),
                trigger,
            },
            rx,
        )
    }

    /// Runs a listener for `key` on `url` (replacing one on another URL), or none.
    fn ensure(
        &self,
        key: &str,
        url: Option<&str>,
        obj: ObjectRef<DynamicObject>,
        prefix: String,
        region: Option<String>,
    ) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((current, handle)) = tasks.get(key) {
            if Some(current.as_str()) == url && !handle.is_finished() {
                return;
            }
            handle.abort();
            tasks.remove(key);
        }
        if let Some(url) = url {
            let handle = tokio::spawn(listen(
                url.to_string(),
                obj,
                prefix,
                region,
                self.trigger.clone(),
            ));
            tasks.insert(key.to_string(), (url.to_string(), handle));
        }
    }
}

/// Long-polls the queue; every batch with a change under the prefix triggers one relist.
/// Messages are deleted once handled. Errors back off (polling still runs meanwhile).
async fn listen(
    url: String,
    obj: ObjectRef<DynamicObject>,
    prefix: String,
    region: Option<String>,
    trigger: mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
) {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r));
    }
    let sqs = aws_sdk_sqs::Client::new(&loader.load().await);
    let mut backoff = Duration::from_secs(1);
    loop {
        let received = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(5)
            .send()
            .await;
        let out = match received {
            Ok(out) => {
                backoff = Duration::from_secs(1);
                out
            }
            Err(e) => {
                tracing::warn!(queue = %url, error = %aws_sdk_sqs::error::DisplayErrorContext(&e), retry_in = ?backoff, "SQS receive failed; polling continues");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        let mut changed = BTreeSet::new();
        for message in out.messages() {
            for event in events::parse(message.body().unwrap_or_default()) {
                if event.key.starts_with(&prefix) {
                    changed.insert(event.key);
                }
            }
            if let Some(receipt) = message.receipt_handle()
                && let Err(e) = sqs
                    .delete_message()
                    .queue_url(&url)
                    .receipt_handle(receipt)
                    .send()
                    .await
            {
                tracing::warn!(queue = %url, error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "cannot delete SQS message");
            }
        }
        if !changed.is_empty() {
            tracing::info!(modelset = %obj, keys = changed.len(), "S3 change notified; relisting");
            if trigger.send(obj.clone()).is_err() {
                return;
            }
        }
    }
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

pub async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = std::time::Instant::now();
    let result = reconcile_inner(&obj, &ctx).await;
    ctx.metrics
        .record_reconcile(start.elapsed(), result.is_ok());
    result
}

pub fn error_policy(obj: Arc<DynamicObject>, error: &Error, ctx: Arc<Context>) -> Action {
    let reason = match error {
        Error::Kube(_) => "KubeError",
        Error::List(_) => "ListFailed",
        Error::Catalog(_) => "CatalogFailed",
        Error::Ssm(_) => "SsmSyncFailed",
    };
    ctx.metrics
        .errors
        .get_or_create(&ReasonLabels {
            reason: reason.into(),
        })
        .inc();
    let delay = ctx.backoff(&format!("ms/{}", object_key(&obj)));
    tracing::warn!(object = %object_key(&obj), %error, retry_in = ?delay, "ModelSet reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_inner(obj: &DynamicObject, ctx: &Context) -> Result<Action, Error> {
    let key = object_key(obj);
    let ms: ModelSet = match serde_json::to_value(obj).and_then(serde_json::from_value) {
        Ok(ms) => ms,
        Err(e) => {
            let observed = [Observed::new(
                READY,
                false,
                Reason::InvalidSpec,
                format!("cannot read the spec: {e}"),
            )];
            write_status(ctx, obj, None, &observed).await?;
            return Ok(Action::await_change());
        }
    };
    if obj.metadata.deletion_timestamp.is_some() {
        if let Some(w) = &ctx.sqs {
            w.ensure(
                &key,
                None,
                ObjectRef::from_obj_with(obj, api_resource()),
                String::new(),
                None,
            );
        }
        return Ok(Action::await_change());
    }
    let poll = parse_duration(&ms.spec.sync.poll_interval).unwrap_or(Duration::from_secs(60));
    let source = &ms.spec.source.s3;
    let region = source
        .region
        .clone()
        .or_else(|| ctx.settings.cluster.region.clone());
    if let Some(w) = &ctx.sqs {
        w.ensure(
            &key,
            ms.spec
                .sync
                .sqs_queue_url
                .as_deref()
                .filter(|u| !u.is_empty()),
            ObjectRef::from_obj_with(obj, api_resource()),
            source.prefix.clone(),
            region.clone(),
        );
    }

    let filter = match Filter::new(&ms.spec.include, &ms.spec.exclude) {
        Ok(f) => f,
        Err(e) => {
            write_status(
                ctx,
                obj,
                None,
                &[Observed::new(
                    READY,
                    false,
                    Reason::InvalidSpec,
                    e.to_string(),
                )],
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    let store = S3Store::for_source(source, ctx.settings.cluster.region.as_deref()).await;
    let objects = match store.list().await {
        Ok(o) => o,
        Err(e) => {
            let message = e.to_string();
            write_status(
                ctx,
                obj,
                None,
                &[Observed::new(READY, false, Reason::ListFailed, &message)],
            )
            .await?;
            return Err(Error::List(message));
        }
    };
    let catalog = Catalog::new(
        objects
            .into_iter()
            .filter(|o| filter.accepts(&o.key))
            .collect(),
    );
    let catalog_ref = store_catalog(ctx, &ms, &catalog).await?;
    let listed = Observed::new(
        READY,
        true,
        Reason::Listed,
        format!(
            "{} models, {}",
            catalog.objects.len(),
            crate::sync::human(catalog.total_bytes())
        ),
    );
    write_status(ctx, obj, Some((&catalog, catalog_ref)), &[listed]).await?;
    if ms.spec.sync.method == SyncMethod::Ssm {
        super::ssm::sync_instances(&ctx.client, &ms, &catalog.revision(), region.as_deref())
            .await?;
    }
    ctx.reset_backoff(&format!("ms/{key}"));
    Ok(Action::requeue(poll))
}

/// Writes the full catalog into ConfigMaps when it is larger than the status holds;
/// rewrites them only when the revision changed, and removes stale ones.
async fn store_catalog(
    ctx: &Context,
    ms: &ModelSet,
    catalog: &Catalog,
) -> Result<Option<CatalogRef>, Error> {
    let ns = ms.namespace().unwrap_or_default();
    let name = ms.name_any();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("sdfleet.io/catalog-of={name}");
    let existing = api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    if catalog.objects.len() <= MODELS_IN_STATUS {
        for cm in existing {
            ctx.metrics.record_write("delete", "ConfigMap");
            api.delete(&cm.name_any(), &DeleteParams::default()).await?;
        }
        return Ok(None);
    }
    let revision = catalog.revision();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(catalog.to_tsv().as_bytes())
        .map_err(|e| Error::Catalog(e.to_string()))?;
    let compressed = gz.finish().map_err(|e| Error::Catalog(e.to_string()))?;
    let names: Vec<String> = (0..compressed.len().div_ceil(CATALOG_CHUNK))
        .map(|i| format!("{name}-catalog-{i}"))
        .collect();
    let current = |n: &str| {
        existing.iter().any(|cm| {
            cm.name_any() == n
                && cm
                    .annotations()
                    .get("sdfleet.io/revision")
                    .map(String::as_str)
                    == Some(revision.as_str())
        })
    };
    let owner = ms
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    for (i, chunk) in compressed.chunks(CATALOG_CHUNK).enumerate() {
        if current(&names[i]) {
            continue;
        }
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(names[i].clone()),
                namespace: Some(ns.clone()),
                owner_references: Some(owner.clone()),
                labels: Some(
                    [
                        ("app.kubernetes.io/managed-by", "sdfleet"),
                        ("sdfleet.io/catalog-of", name.as_str()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ),
                annotations: Some(
                    [
                        ("sdfleet.io/revision".to_string(), revision.clone()),
                        (
                            "sdfleet.io/part".to_string(),
                            format!("{i}/{}", names.len()),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            binary_data: Some(
                [(
                    CATALOG_KEY.to_string(),
                    k8s_openapi::ByteString(chunk.to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        ctx.metrics.record_write("apply", "ConfigMap");
        api.patch(
            &names[i],
            &PatchParams::apply(super::apply::FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await?;
    }
    for cm in existing.iter().filter(|cm| !names.contains(&cm.name_any())) {
        ctx.metrics.record_write("delete", "ConfigMap");
        api.delete(&cm.name_any(), &DeleteParams::default()).await?;
    }
    Ok(Some(CatalogRef {
        config_maps: names,
        format: "tsv+gzip".into(),
        objects: catalog.objects.len() as u64,
    }))
}

/// The Synced condition from the per-node entries the agents (or SSM) wrote.
fn synced_condition(status: &ModelSetStatus) -> Observed {
    let at_revision = |n: &&crate::crd::modelset::NodeSync| n.revision == status.revision;
    let failed: Vec<_> = status
        .nodes
        .iter()
        .filter(|n| n.state == NodeSyncState::Failed)
        .collect();
    let synced = status
        .nodes
        .iter()
        .filter(at_revision)
        .filter(|n| n.state == NodeSyncState::Synced)
        .count();
    if status.nodes.is_empty() {
        Observed::new(
            SYNCED,
            false,
            Reason::NoNodes,
            "no node syncs this ModelSet yet",
        )
    } else if let Some(f) = failed.first() {
        Observed::new(
            SYNCED,
            false,
            Reason::SyncFailed,
            format!("{}: {}", f.node, f.message),
        )
    } else if synced == status.nodes.len() {
        Observed::new(
            SYNCED,
            true,
            Reason::AllNodesSynced,
            format!("{synced}/{synced} nodes at {}", status.revision),
        )
    } else {
        Observed::new(
            SYNCED,
            false,
            Reason::Syncing,
            format!(
                "{synced}/{} nodes at {}",
                status.nodes.len(),
                status.revision
            ),
        )
    }
}

/// Merge-patches the controller's part of the status (never `nodes`, which agents own),
/// only when it changed.
async fn write_status(
    ctx: &Context,
    obj: &DynamicObject,
    catalog: Option<(&Catalog, Option<CatalogRef>)>,
    observed: &[Observed],
) -> Result<(), Error> {
    let previous: ModelSetStatus =
        serde_json::from_value(obj.data.get("status").cloned().unwrap_or(json!({})))
            .unwrap_or_default();
    let mut status = previous.clone();
    status.observed_generation = obj.metadata.generation;
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
    let mut all = observed.to_vec();
    all.push(synced_condition(&status));
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    status.conditions =
        conditions::merge(&previous.conditions, &all, obj.metadata.generation, &now);
    if status == previous {
        return Ok(());
    }
    let mut body = serde_json::to_value(&status).map_err(|e| Error::Catalog(e.to_string()))?;
    if let Some(m) = body.as_object_mut() {
        m.remove("nodes");
        // A merge patch needs explicit nulls to clear fields that went away.
        if status.catalog_ref.is_none() {
            m.insert("catalogRef".into(), serde_json::Value::Null);
        }
    }
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &obj.namespace().unwrap_or_default(),
        &api_resource(),
    );
    ctx.metrics.record_write("patch-status", "ModelSet");
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": body})),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("1d"), None);
    }
}
