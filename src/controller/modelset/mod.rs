//! The ModelSet reconciler: lists the bucket into a catalog, writes the status (and the
//! full catalog into ConfigMaps when it is large), relists every `pollInterval`, and
//! relists within seconds of an S3 event when an SQS queue is configured.

pub mod catalog_maps;
pub mod sqs;
pub mod ssm;
pub mod status;

use std::hash::{DefaultHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use sqs::SqsWatchers;

use super::runtime::cache::watched_api;
use super::runtime::conditions::{DesiredCondition, READY, Reason};
use super::runtime::context::{Context, error_policy, hash_metadata, matching, own_watch, ref_key};
use super::runtime::error::Error;
use super::runtime::finalizer;
use crate::crd::modelset::{ModelSet, SyncMethod};
use crate::crd::{FleetClass, ModelSync};
use crate::names::{MODELSET_LABEL, label_value};
use crate::policy::{self, ModelSetRefusal};
use crate::storage::{self, s3::BucketLocation};
use crate::sync::catalog::{self, Filter};
use crate::telemetry::ControllerName;
use status::{KIND, write_raw_status, write_status};

/// How soon SSM invocations in flight are looked at again.
const SSM_POLL: Duration = Duration::from_secs(5);
/// Holds a ModelSet until its SQS listener is stopped.
pub const FINALIZER: &str = "sdfleet.io/stop-listener";
type Guarded = DeserializeGuard<ModelSet>;

/// What a ModelSet reconcile shares: the controller's context, and the SQS listeners
/// (only this reconciler has them).
pub struct ModelSetContext {
    pub base: Arc<Context>,
    pub sqs: SqsWatchers,
}

impl std::ops::Deref for ModelSetContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

/// Runs the ModelSet controller; its SQS listeners' messages start reconciles.
pub async fn run(
    base: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (sqs, mut triggers) = SqsWatchers::new();
    let ctx = Arc::new(ModelSetContext { base, sqs });
    let api: Api<Guarded> = watched_api(&ctx.client, ctx.settings.namespace.as_deref());
    let metrics = ctx.metrics.clone();
    let triggers = futures::stream::poll_fn(move |cx| triggers.poll_recv(cx)).inspect(
        move |ms: &ObjectRef<Guarded>| metrics.latency.asked(MODELSET.as_str(), &ref_key(ms)),
    );
    // A ModelSet is relisted on its spec, its deletion, its timer and S3 events: never on
    // status writes (its own).
    let (reader, own) = own_watch(api, spec_changes, ctx.metrics.clone(), MODELSET);
    let controller = Controller::for_stream(own, reader);
    // A changed FleetClass applies to its ModelSets at once.
    let sets = controller.store();
    controller
        .watches(
            Api::<FleetClass>::all(ctx.client.clone()),
            crate::watch::config(),
            move |class| {
                matching(&sets, |ms: &ModelSet| {
                    policy::follows(ms.spec.class_name.as_deref(), &class)
                })
            },
        )
        .reconcile_on(triggers)
        .with_config(ctx.settings.controller_config())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |obj, error, ctx| error_policy(MODELSET, &obj, error, &ctx),
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "ModelSet reconcile failed");
            }
        })
        .await;
}

/// Whether the ModelSet's FleetClass allows its bucket, endpoint and queue (and the role
/// it reads them as); otherwise the reason and message for its status.
async fn within_class(
    ms: &ModelSet,
    ctx: &Context,
) -> Result<Result<Option<String>, (Reason, String)>, Error> {
    let namespace = ms.metadata.namespace.clone().unwrap_or_default();
    let classes = ctx.cached_fleet_classes()?;
    let namespace = ctx.namespace(&namespace).await?;
    Ok(
        policy::admit_modelset(&ms.spec, &classes, &namespace).map_err(|refusal| {
            let reason = match refusal {
                ModelSetRefusal::NoClass(_) => Reason::FleetClassNotFound,
                ModelSetRefusal::Forbids(_) => Reason::ClassForbids,
            };
            (reason, refusal.to_string())
        }),
    )
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

const MODELSET: ControllerName = ControllerName::ModelSet;

/// What of a ModelSet starts a relisting: its metadata's part (`hash_metadata`).
fn spec_changes(ms: &Guarded) -> Option<u64> {
    let meta = match &ms.0 {
        Ok(ms) => &ms.metadata,
        Err(invalid) => &invalid.metadata,
    };
    let mut h = DefaultHasher::new();
    hash_metadata(meta, &mut h);
    Some(h.finish())
}

pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<ModelSetContext>) -> Result<Action, Error> {
    ctx.timed(MODELSET, &obj, async {
        match &obj.0 {
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
        }
    })
    .await
}

async fn reconcile_modelset(ms: &ModelSet, ctx: &ModelSetContext) -> Result<Action, Error> {
    ctx.caches()?.ready().await?;
    let key = format!("{}/{}", ms.namespace().unwrap_or_default(), ms.name_any());
    let me = ObjectRef::<Guarded>::new(&ms.name_any()).within(&ms.namespace().unwrap_or_default());
    let api = ctx.raw_api::<ModelSet>(&ms.namespace().unwrap_or_default());
    if ms.metadata.deletion_timestamp.is_some() {
        // Stop the SQS listener before the object goes; the finalizer guarantees this
        // runs even when the deletion happens while the controller is down.
        ctx.sqs.ensure(&key, None, me, String::new(), None);
        // Its nodes' reports go with it (their owner, the Node, may well stay).
        let reports: Api<ModelSync> =
            Api::namespaced(ctx.client.clone(), &ms.namespace().unwrap_or_default());
        let selector = format!("{MODELSET_LABEL}={}", label_value(&ms.name_any()));
        ctx.metrics.record_write("delete", "ModelSync");
        reports
            .delete_collection(
                &kube::api::DeleteParams::default(),
                &kube::api::ListParams::default().labels(&selector),
            )
            .await?;
        finalizer::set(&api, &ctx.metrics, KIND, ms, FINALIZER, false).await?;
        ctx.metrics.forget_modelset(&catalog_labels(ms));
        return Ok(Action::await_change());
    }
    // The patch triggers a new reconcile with the finalizer in place.
    if finalizer::set(&api, &ctx.metrics, KIND, ms, FINALIZER, true).await? {
        return Ok(Action::await_change());
    }
    let poll = parse_duration(&ms.spec.sync.poll_interval).unwrap_or(Duration::from_secs(60));
    // The class decides which bucket, endpoint and queue may be used: nothing is listed,
    // signed or listened to before it allows them.
    let tenant_role = match within_class(ms, ctx).await? {
        Ok(role) => role,
        Err((reason, message)) => {
            ctx.sqs.ensure(&key, None, me, String::new(), None);
            let refused = [DesiredCondition::new(READY, false, reason, &message)];
            write_status(ctx, ms, None, &refused, None).await?;
            return match reason {
                Reason::FleetClassNotFound => Err(Error::Class(message)),
                _ => Ok(Action::requeue(poll)),
            };
        }
    };
    let tenant = tenant_role.map(|role_arn| storage::s3::Tenant {
        role_arn,
        namespace: ms.metadata.namespace.clone().unwrap_or_default(),
        name: ms.name_any(),
    });
    // The agents' reports, as the cache holds them (a departed node's report is gone
    // with its Node: the garbage collector removes it). SSM's are in the status.
    let reports = match ms.spec.sync.method {
        SyncMethod::Agent => Some(
            ctx.caches()?
                .reports_of(&ms.namespace().unwrap_or_default(), &ms.name_any()),
        ),
        SyncMethod::Ssm => None,
    };
    let live = reports.as_deref();
    let default_region = ctx.settings.cluster.region.as_deref();
    let location = (ms.spec.source.s3.as_ref()).map(|s3| BucketLocation::of(s3, default_region));
    {
        // S3 sends the events: files by URL have no queue (the CRD refuses one).
        let url = location
            .as_ref()
            .and(ms.spec.sync.sqs_queue_url.as_deref())
            .filter(|u| !u.is_empty());
        let (prefix, region) = location
            .as_ref()
            .map(|l| (l.prefix.clone(), l.region.clone()))
            .unwrap_or_default();
        ctx.sqs.ensure(&key, url, me, prefix, region);
    }

    // The hot globs are the agent's, but a bad one is the spec's error: said here, once.
    let filter = Filter::new(&ms.spec.hot, &[])
        .map_err(|e| format!("spec.hot: {e}"))
        .and_then(|_| {
            Filter::new(&ms.spec.include, &ms.spec.exclude).map_err(|e| format!("spec: {e}"))
        });
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            let invalid = [DesiredCondition::new(READY, false, Reason::InvalidSpec, e)];
            write_status(ctx, ms, None, &invalid, live).await?;
            return Ok(Action::await_change());
        }
    };
    let listed = match storage::open_as(&ms.spec.source, default_region, tenant.as_ref()).await {
        Ok(store) => catalog::list(&store, &filter).await,
        Err(e) => Err(e),
    };
    let catalog = match listed {
        Ok(catalog) => catalog,
        Err(e) => {
            let message = e.to_string();
            let failed = [DesiredCondition::new(
                READY,
                false,
                Reason::ListFailed,
                &message,
            )];
            write_status(ctx, ms, None, &failed, live).await?;
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
    let labels = catalog_labels(ms);
    ctx.metrics
        .modelset_bytes
        .get_or_create(&labels)
        .set(i64::try_from(catalog.total_bytes()).unwrap_or(i64::MAX));
    ctx.metrics
        .modelset_models
        .get_or_create(&labels)
        .set(i64::try_from(catalog.objects.len()).unwrap_or(i64::MAX));
    let catalog_status = Some((&catalog, catalog_ref));
    write_status(ctx, ms, catalog_status, &[listed], live).await?;
    if ms.spec.sync.method == SyncMethod::Ssm {
        let in_flight = ssm::sync_instances(
            &ctx.client,
            ms,
            &catalog.revision(),
            ctx.settings.cluster.cluster_name.as_deref(),
            location.as_ref().and_then(|l| l.region.as_deref()),
        )
        .await
        .map_err(|e| Error::Ssm(e.to_string()))?;
        if in_flight {
            return Ok(Action::requeue(SSM_POLL.min(poll)));
        }
    }
    Ok(Action::requeue(poll))
}

/// The labels of a ModelSet's catalog metrics: its namespace and name.
fn catalog_labels(ms: &ModelSet) -> crate::telemetry::FleetLabels {
    crate::telemetry::FleetLabels {
        namespace: ms.namespace().unwrap_or_default(),
        name: ms.name_any(),
    }
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
