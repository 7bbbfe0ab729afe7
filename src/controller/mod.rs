//! The controller process: watches ComfyUIDeployments and every child sdfleet labels,
//! and runs the reconciler in `comfyui.rs`.

pub mod apply;
pub mod comfyui;
pub mod conditions;
pub mod modelset;
pub mod preflight;
pub mod ssm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use crate::cloud::{Cloud, ClusterSettings};
use crate::crd::ComfyUIDeployment;
use crate::render::names::{MANAGED_BY, MANAGED_BY_KEY, OWNER_NAME_KEY, OWNER_NAMESPACE_KEY};
use crate::render::{ChildKind, nodepool};
use crate::telemetry::Metrics;

/// Settings of one controller process, from its flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cloud: Cloud,
    pub cluster: ClusterSettings,
    /// Watch only this namespace; all namespaces when None.
    pub namespace: Option<String>,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// SQS listeners of ModelSets (None in contexts that run no ModelSet controller).
    pub sqs: Option<modelset::SqsWatchers>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Context {
        let reporter = Reporter {
            controller: "sdfleet".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            sqs: None,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The next retry delay for `key`: 2 s doubling to 5 min.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = (*n + 1).min(16);
        Duration::from_secs((2u64 << (*n - 1).min(8)).min(300))
    }

    pub fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

pub fn cud_api_resource() -> ApiResource {
    ApiResource::erase::<ComfyUIDeployment>(&())
}

/// Every kind of child, with its API, for watching and pruning.
pub fn child_apis(cloud: Cloud) -> Vec<(ChildKind, ApiResource)> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, networking::v1 as net};
    vec![
        (ChildKind::NodeClass, cloud.provider().api_resource()),
        (ChildKind::NodePool, nodepool::api_resource()),
        (
            ChildKind::PersistentVolume,
            ApiResource::erase::<core::PersistentVolume>(&()),
        ),
        (
            ChildKind::PersistentVolumeClaim,
            ApiResource::erase::<core::PersistentVolumeClaim>(&()),
        ),
        (ChildKind::Service, ApiResource::erase::<core::Service>(&())),
        (
            ChildKind::Deployment,
            ApiResource::erase::<apps::Deployment>(&()),
        ),
        (ChildKind::Ingress, ApiResource::erase::<net::Ingress>(&())),
        (
            ChildKind::AgentDaemonSet,
            ApiResource::erase::<apps::DaemonSet>(&()),
        ),
    ]
}

/// The owning ComfyUIDeployment of a labelled child.
fn owner_of(child: &DynamicObject, cud_api: &ApiResource) -> Option<ObjectRef<DynamicObject>> {
    let labels = child.labels();
    if labels.get(MANAGED_BY_KEY).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    let namespace = labels.get(OWNER_NAMESPACE_KEY)?;
    let name = labels.get(OWNER_NAME_KEY)?;
    Some(ObjectRef::new_with(name, cud_api.clone()).within(namespace))
}

/// Runs the controller until `shutdown` completes (SIGTERM, or leadership lost).
pub async fn run(
    mut ctx: Context,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (watchers, triggers) = modelset::SqsWatchers::new();
    ctx.sqs = Some(watchers);
    let ctx = Arc::new(ctx);
    // One shutdown signal for both controllers.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::join!(
        run_fleets(ctx.clone(), stopped(stop_rx.clone())),
        run_modelsets(ctx.clone(), stream_of(triggers), stopped(stop_rx)),
    );
}

fn stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn run_modelsets(
    ctx: Arc<Context>,
    triggers: impl futures::Stream<Item = ObjectRef<DynamicObject>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ar = modelset::api_resource();
    let api: Api<DynamicObject> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &ar),
        None => Api::all_with(ctx.client.clone(), &ar),
    };
    Controller::new_with(api, watcher::Config::default().any_semantic(), ar)
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown)
        .run(modelset::reconcile, modelset::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "ModelSet reconcile failed");
            }
        })
        .await;
}

async fn run_fleets(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let cud_ar = cud_api_resource();
    let cuds: Api<DynamicObject> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &cud_ar),
        None => Api::all_with(client.clone(), &cud_ar),
    };
    let selector = format!("{MANAGED_BY_KEY}={MANAGED_BY}");
    let mut controller = Controller::new_with(
        cuds,
        watcher::Config::default().any_semantic(),
        cud_ar.clone(),
    );
    for (kind, ar) in child_apis(ctx.settings.cloud) {
        let api: Api<DynamicObject> = match (&ctx.settings.namespace, kind) {
            (_, ChildKind::AgentDaemonSet) => {
                Api::namespaced_with(client.clone(), &ctx.settings.cluster.agent.namespace, &ar)
            }
            (Some(ns), k) if k.namespaced() => Api::namespaced_with(client.clone(), ns, &ar),
            _ => Api::all_with(client.clone(), &ar),
        };
        let owner_ar = cud_ar.clone();
        let scope = ctx.settings.namespace.clone();
        controller = controller.watches_with(
            api,
            ar,
            watcher::Config::default().labels(&selector),
            move |child| {
                owner_of(&child, &owner_ar).filter(|o| scope.is_none() || o.namespace == scope)
            },
        );
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(comfyui::reconcile, comfyui::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
    tracing::info!("controller stopped");
}

impl Context {
    /// The namespace a child of `kind` of a fleet in `fleet_namespace` lives in.
    pub fn child_namespace<'a>(
        &'a self,
        kind: ChildKind,
        fleet_namespace: &'a str,
    ) -> Option<&'a str> {
        match kind {
            ChildKind::AgentDaemonSet => Some(self.settings.cluster.agent.namespace.as_str()),
            k if k.namespaced() => Some(fleet_namespace),
            _ => None,
        }
    }
}

pub fn object_key(obj: &DynamicObject) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Requeue a healthy fleet now and then, to notice what watches cannot (e.g. a CRD
/// installed after a MissingDependency).
pub fn steady_requeue() -> Action {
    Action::requeue(Duration::from_secs(300))
}

pub fn object_reference(obj: &DynamicObject) -> k8s_openapi::api::core::v1::ObjectReference {
    let mut r = obj.object_ref(&cud_api_resource());
    r.api_version = Some(cud_api_resource().api_version);
    r.kind = Some(cud_api_resource().kind);
    r
}
