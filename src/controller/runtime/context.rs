//! What every reconcile shares: the client, the settings, metrics, the event recorder,
//! per-object backoff; and the retry policy of both reconcilers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use super::cache::{Caches, NotListed};
use super::error::Error;
use crate::crd::FleetClass;
use crate::crd::comfyui::ComfyUIDeploymentStatus;
use crate::policy::{self, ClassError};
use crate::render::nodeclass::Cloud;
use crate::render::settings::ClusterSettings;
use crate::telemetry::{ControllerName, Metrics};
use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash};

/// Events queued for the publisher before new ones are dropped.
const EVENT_QUEUE: usize = 4096;
/// Event writes the publisher keeps in flight.
const EVENTS_IN_FLIGHT: usize = 16;

/// Starts the task that writes queued events, a few at once; it ends when the context
/// that holds the sender goes. None outside a Tokio runtime (no events then).
fn spawn_event_publisher(
    recorder: Recorder,
    metrics: &Arc<Metrics>,
) -> Option<tokio::sync::mpsc::Sender<(ObjectReference, Event)>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(ObjectReference, Event)>(EVENT_QUEUE);
    let metrics = metrics.clone();
    runtime.spawn(async move {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .for_each_concurrent(EVENTS_IN_FLIGHT, |(reference, event)| {
                let recorder = &recorder;
                let metrics = &metrics;
                async move {
                    metrics.record_write("event", "Event");
                    if let Err(e) = recorder.publish(&event, &reference).await {
                        tracing::warn!(error = %e, "cannot publish event");
                    }
                }
            })
            .await;
    });
    Some(tx)
}

/// Settings of one controller process, from its flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cloud: Cloud,
    pub cluster: ClusterSettings,
    /// Watch only this namespace; all namespaces when None.
    pub namespace: Option<String>,
    /// How often a steady fleet is reconciled anyway, to notice what watches cannot.
    pub resync: Duration,
    /// At most this many reconciles of one kind run at once (0: no limit). A burst of
    /// reconciles then waits in the controller's queue, not in the apiserver's
    /// priority-and-fairness queues, which refuse what overflows them with 429.
    pub max_concurrent_reconciles: u16,
}

impl Settings {
    /// The kube-runtime controller configuration these settings ask for.
    pub fn controller_config(&self) -> kube::runtime::controller::Config {
        kube::runtime::controller::Config::default().concurrency(self.max_concurrent_reconciles)
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Events waiting for the publisher task (see `publish`).
    events: Option<tokio::sync::mpsc::Sender<(ObjectReference, Event)>>,
    /// The watch caches the reconciles read (None until the controllers start).
    pub caches: Option<Caches>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Consecutive polls per object and purpose, so waiting polls back off too.
    polls: Mutex<HashMap<String, u32>>,
    /// When each fleet's status was last written (progress is written spaced out).
    pub status_writes: StatusWrites,
}

/// Each fleet's last status write, by `namespace/name`: when (progress is written
/// spaced out), and what it wrote over and left, so that a reconcile whose cached copy
/// is still the one that write replaced computes from the write instead (else it would
/// be refused with a conflict, and look again a second later).
#[derive(Default)]
pub struct StatusWrites(Mutex<HashMap<String, LastWrite>>);

struct LastWrite {
    at: std::time::Instant,
    /// The resourceVersions our writes replaced since the cache last caught up.
    replaced: Vec<String>,
    /// The resourceVersion and status the last write left.
    version: String,
    status: ComfyUIDeploymentStatus,
}

/// Entries kept before the old ones are dropped (one per fleet written recently).
const STATUS_WRITES: usize = 10_000;
/// Replaced versions remembered per fleet (writes the cache has not seen yet).
const REPLACED: usize = 8;

impl StatusWrites {
    /// How much of `interval` is left since `key`'s last write; None when it has passed
    /// or nothing was written.
    pub fn too_soon(&self, key: &str, interval: Duration) -> Option<Duration> {
        let writes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let left = interval.checked_sub(writes.get(key)?.at.elapsed())?;
        (!left.is_zero()).then_some(left)
    }

    /// The status and resourceVersion our last write left, when the cached copy (at
    /// `cached`) is one of those our writes replaced: the cache is behind our own write.
    /// A cache that shows our last write has caught up: the replaced versions are
    /// forgotten then.
    pub fn newer_than(
        &self,
        key: &str,
        cached: Option<&str>,
    ) -> Option<(ComfyUIDeploymentStatus, String)> {
        let mut writes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let last = writes.get_mut(key)?;
        let cached = cached?;
        if last.replaced.iter().any(|v| v == cached) {
            return Some((last.status.clone(), last.version.clone()));
        }
        if last.version == cached {
            last.replaced.clear();
        }
        None
    }

    /// `key`'s status became `status` at `version`, replacing `over`.
    pub fn wrote(
        &self,
        key: &str,
        over: Option<&str>,
        version: String,
        status: ComfyUIDeploymentStatus,
    ) {
        let mut writes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if writes.len() >= STATUS_WRITES {
            // Only entries younger than a minute still matter.
            writes.retain(|_, w| w.at.elapsed() < Duration::from_secs(60));
        }
        let mut replaced = writes.remove(key).map(|w| w.replaced).unwrap_or_default();
        replaced.extend(over.map(String::from));
        let keep_from = replaced.len().saturating_sub(REPLACED);
        replaced.drain(..keep_from);
        writes.insert(
            key.to_string(),
            LastWrite {
                at: std::time::Instant::now(),
                replaced,
                version,
                status,
            },
        );
    }
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Context {
        let reporter = Reporter {
            controller: "sdfleet".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let events = spawn_event_publisher(Recorder::new(client.clone(), reporter), &metrics);
        Context {
            events,
            client,
            settings,
            metrics,
            caches: None,
            failures: Mutex::new(HashMap::new()),
            polls: Mutex::new(HashMap::new()),
            status_writes: StatusWrites::default(),
        }
    }

    /// The next retry delay for `key`: 2 s doubling to 5 min.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = (*n + 1).min(16);
        Duration::from_secs((2u64 << (*n - 1).min(8)).min(300))
    }

    /// The wait before the next poll of `key`: `first`, doubling on each consecutive
    /// poll up to `longest`.
    pub fn poll_delay(&self, key: &str, (first, longest): (Duration, Duration)) -> Duration {
        let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        let n = polls.entry(key.to_string()).or_insert(0);
        let delay = first.saturating_mul(1 << (*n).min(16)).min(longest);
        *n += 1;
        delay
    }

    /// The condition polled for holds: the next wait starts from the first again.
    pub fn reset_poll(&self, key: &str) {
        self.polls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    pub fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Objects of `K` in `namespace` as stored, readable or not (status writes, finalizers,
    /// the status of an object that does not parse).
    pub fn raw_api<K: Resource<DynamicType = ()>>(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            namespace,
            &ApiResource::erase::<K>(&()),
        )
    }

    /// The watch caches; an error where no controller started them.
    pub fn caches(&self) -> Result<&Caches, Error> {
        self.caches
            .as_ref()
            .ok_or_else(|| Error::CacheNotReady(NotListed("any kind (no caches started)".into())))
    }

    /// The FleetClass named `name`, or the default one, as the cache holds them, if it
    /// admits `namespace` (`Context::namespace`: a class selects namespaces by label).
    /// `Err` inside: why none applies.
    pub fn cached_fleet_class(
        &self,
        name: Option<&str>,
        namespace: &policy::Namespace,
    ) -> Result<Result<FleetClass, ClassError>, Error> {
        let classes = self.cached_fleet_classes()?;
        Ok(policy::resolve(name, &classes, Some(namespace)).cloned())
    }

    /// Every FleetClass, as the cache holds them.
    pub fn cached_fleet_classes(&self) -> Result<Vec<FleetClass>, Error> {
        Ok(self
            .caches()?
            .classes
            .state()
            .iter()
            .map(|c| (**c).clone())
            .collect())
    }

    /// A namespace's labels, which decide the classes it may use (read once per
    /// reconcile, for the object and what it refers to).
    pub async fn namespace(&self, name: &str) -> Result<policy::Namespace, Error> {
        let labels = Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client.clone())
            .get_metadata(name)
            .await?
            .metadata
            .labels
            .unwrap_or_default();
        Ok(policy::Namespace {
            name: name.to_string(),
            labels,
        })
    }

    /// Queues an event about `reference` for the publisher task: a reconcile never waits
    /// for an Event's write. A full queue drops the event (logged and counted), as
    /// client-go's recorder does: events inform, they are not state.
    pub fn publish(&self, reference: &ObjectReference, type_: EventType, reason: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let sent = self
            .events
            .as_ref()
            .is_some_and(|tx| tx.try_send((reference.clone(), event)).is_ok());
        if !sent {
            self.metrics.events_dropped.inc();
            tracing::warn!(reason, "event queue full or closed; event dropped");
        }
    }
}

/// `namespace/name` of a watched object, readable or not.
pub fn object_key<K>(obj: &DeserializeGuard<K>) -> String
where
    K: Resource<DynamicType = ()>,
{
    let meta = match &obj.0 {
        Ok(k) => k.meta(),
        Err(invalid) => &invalid.metadata,
    };
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// The backoff key of an object: per reconciler, so a fleet and a ModelSet of the same
/// name back off apart.
fn backoff_key<K>(controller: ControllerName, obj: &DeserializeGuard<K>) -> String
where
    K: Resource<DynamicType = ()>,
{
    format!("{}/{}", controller.as_str(), object_key(obj))
}

impl Context {
    /// Runs one reconcile of `obj` and records it: its duration, that less its waits for
    /// the apiserver, its queue-to-done time (from the first watch event that asked for
    /// it) and its result. A success forgets the object's failures, so its next error
    /// starts the backoff again.
    pub async fn timed<K>(
        &self,
        controller: ControllerName,
        obj: &DeserializeGuard<K>,
        reconcile: impl std::future::Future<Output = Result<Action, Error>>,
    ) -> Result<Action, Error>
    where
        K: Resource<DynamicType = ()>,
    {
        let asked_at = self
            .metrics
            .latency
            .started(controller.as_str(), &object_key(obj));
        let start = std::time::Instant::now();
        let (result, waited) = crate::latency::measured(reconcile).await;
        let took = start.elapsed();
        let ok = result.is_ok();
        self.metrics.record_reconcile(controller, took, ok);
        self.metrics
            .latency
            .finished(controller.as_str(), (took, waited), asked_at);
        if ok {
            self.reset_backoff(&backoff_key(controller, obj));
        }
        result
    }
}

/// The retry policy of both reconcilers: count the error by reason, back off per object.
pub fn error_policy<K>(
    controller: ControllerName,
    obj: &DeserializeGuard<K>,
    error: &Error,
    ctx: &Context,
) -> Action
where
    K: Resource<DynamicType = ()>,
{
    ctx.metrics.record_error(controller, error.reason());
    let key = backoff_key(controller, obj);
    let delay = ctx.backoff(&key);
    tracing::warn!(object = %key, %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

impl Context {
    /// Requeue a healthy fleet now and then, to notice what watches cannot (e.g. a CRD
    /// installed after a MissingDependency).
    pub fn steady_requeue(&self) -> Action {
        Action::requeue(self.settings.resync)
    }
}

/// The readable objects of a controller's store that `wanted` picks: what a watch of
/// another kind (a ModelSet, a FleetClass) maps to.
pub fn matching<K>(
    store: &Store<DeserializeGuard<K>>,
    wanted: impl Fn(&K) -> bool,
) -> Vec<ObjectRef<DeserializeGuard<K>>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .state()
        .into_iter()
        .filter(|o| o.0.as_ref().is_ok_and(&wanted))
        .map(|o| ObjectRef::from_obj(&*o))
        .collect()
}

/// `namespace/name` of a reference: the key of its queue-to-done time.
pub fn ref_key<K: Resource>(r: &ObjectRef<K>) -> String {
    format!("{}/{}", r.namespace.as_deref().unwrap_or_default(), r.name)
}

/// Hashes what of an object's metadata starts its reconcile: its spec (generation), its
/// deletion and finalizers, its labels and annotations. Status writes change none of them.
pub fn hash_metadata(meta: &ObjectMeta, h: &mut DefaultHasher) {
    (
        meta.generation,
        meta.deletion_timestamp.is_some(),
        &meta.finalizers,
        &meta.labels,
        &meta.annotations,
    )
        .hash(h);
}

/// A controller's watch of its own kind: the store it reads, and the events whose
/// `changes` hash moved, each noted as asking for a reconcile (queue-to-done starts).
pub fn own_watch<K>(
    api: Api<DeserializeGuard<K>>,
    changes: fn(&DeserializeGuard<K>) -> Option<u64>,
    metrics: Arc<Metrics>,
    controller: ControllerName,
) -> (
    Store<DeserializeGuard<K>>,
    impl Stream<Item = Result<DeserializeGuard<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let writer = Writer::default();
    let store = writer.as_reader();
    let events = reflector::reflector(
        writer,
        watcher(api, crate::watch::config().any_semantic()).default_backoff(),
    )
    .applied_objects()
    .predicate_filter(changes, PredicateConfig::default())
    .inspect(move |obj| {
        if let Ok(obj) = obj {
            metrics.latency.asked(controller.as_str(), &object_key(obj));
        }
    });
    (store, events)
}
