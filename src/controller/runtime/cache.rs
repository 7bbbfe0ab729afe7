//! The controllers' watch caches. Every kind a reconcile reads is watched once, and read
//! from its reflector store: a steady reconcile sends no request at all.
//!
//! A store can lag behind the apiserver. What is read from one only decides whether to
//! write (an apply that finds its child already as desired is skipped; a lagging copy
//! costs one idempotent apply, never a wrong skip for long, since the event that brings
//! the store up to date triggers the next reconcile), and every status write carries the
//! resourceVersion it was computed from, so a stale copy fails with a conflict instead of
//! overwriting newer state. Deletion (cleanup) lists from the apiserver, never from here:
//! a child the cache has not seen yet must not be left behind.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::storage::v1::CSIDriver;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject};
use kube::core::NamespaceResourceScope;
use kube::core::{ApiResource, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;

use crate::crd::FleetClass;
use crate::crd::ModelSync;
use crate::crd::modelset::{ModelSet, NodeSync};
use crate::names::{APP_NAME_KEY, CATALOG_OF_KEY, MANAGED_BY, MANAGED_BY_KEY, NODEPOOL_LABEL};
use crate::render::nodeclass::NodeClassProvider;
use crate::render::settings::AgentSettings;
use crate::render::storage::CSI_DRIVER;
use crate::render::{self, ChildKind};

/// A reflector's events, for a controller to map into reconciles.
pub type Triggers<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// A watch whose first listing did not come in time (a CRD not installed, the
/// apiserver unreachable): the reconcile fails, and retries.
#[derive(Debug, thiserror::Error)]
#[error("the watch cache of {0} has not listed yet")]
pub struct NotListed(pub String);

/// The stores every reconcile reads.
pub struct Caches {
    children: BTreeMap<ChildKind, (ApiResource, Store<DynamicObject>)>,
    pub model_sets: Store<ModelSet>,
    /// The nodes' reports (`ModelSync`), written by the agents.
    pub reports: Store<ModelSync>,
    pub classes: Store<FleetClass>,
    /// Karpenter's nodes (those with a NodePool label).
    pub nodes: Store<Node>,
    /// The fleets' ComfyUI pods.
    pub pods: Store<Pod>,
    pub node_claims: Store<DynamicObject>,
    /// The CRDs preflight needs, each watched by name (RBAC grants them by name).
    crds: BTreeMap<String, Store<PartialObjectMeta<CustomResourceDefinition>>>,
    pub csi_drivers: Store<PartialObjectMeta<CSIDriver>>,
    pub ingress_classes: Store<PartialObjectMeta<IngressClass>>,
    /// The ModelSets' catalog ConfigMaps (metadata: their names and revisions).
    catalog_maps: Store<PartialObjectMeta<ConfigMap>>,
    /// When the stores above (but the children's) have first listed.
    listed: Listing,
    /// When the children's stores have first listed.
    children_listed: Listing,
}

/// A reflector's raw events (applied, deleted, relisted), for a controller that tells
/// them apart (`changes_only`).
pub type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// The watches whose events start fleet reconciles (the rest only fill their stores).
pub struct FleetTriggers {
    pub children: Vec<(ChildKind, ApiResource, Events<DynamicObject>)>,
    pub model_sets: Triggers<ModelSet>,
    pub reports: Triggers<ModelSync>,
    pub classes: Triggers<FleetClass>,
}

/// The API of `K` in the watched namespace, or in all namespaces.
pub fn watched_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The API of `api` within `namespace`, or cluster-wide / in all namespaces.
pub fn dynamic_api(
    client: &Client,
    api: &ApiResource,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, api),
        None => Api::all_with(client.clone(), api),
    }
}

/// A store and the reflector stream that fills it (it fills only while polled).
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
) -> (Store<K>, Triggers<K>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let (store, events) = reflect_events(api, config, dyntype);
    (store, events.touched_objects().boxed())
}

/// A store and the reflector's raw events (see `changes_only`).
fn reflect_events<K>(
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
) -> (Store<K>, Events<K>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::new(dyntype);
    let store = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff()).boxed();
    (store, stream)
}

/// The objects of `events` whose `changes` hash moved since the watch last showed them,
/// and every deleted one. Unlike kube-runtime's `predicate_filter`, which sees objects
/// only, a deletion always passes: a deleted object carries the same hash as its last
/// update, and its owner must hear of it (to make it again). A relist passes only the
/// objects that changed while the watch was away.
pub fn changes_only<K, H>(
    events: Events<K>,
    changes: H,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
    H: Fn(&K) -> u64 + Send + 'static,
{
    // One kind per stream: namespace and name identify an object.
    let key = |obj: &K| (obj.meta().namespace.clone(), obj.meta().name.clone());
    let mut seen: std::collections::HashMap<_, u64> = Default::default();
    events.filter_map(move |event| {
        let passed = match event {
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                let hash = changes(&obj);
                (seen.insert(key(&obj), hash) != Some(hash)).then_some(Ok(obj))
            }
            Ok(watcher::Event::Delete(obj)) => {
                seen.remove(&key(&obj));
                Some(Ok(obj))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        std::future::ready(passed)
    })
}

/// A metadata-only store (`Api<PartialObjectMeta<K>>` watches metadata only): for kinds
/// read only to know what exists; only the object `name` when given.
fn reflect_metadata<K>(
    client: &Client,
    name: Option<&str>,
    tasks: &mut JoinSet<()>,
) -> Store<PartialObjectMeta<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let config = match name {
        Some(name) => crate::watch::named(name),
        None => crate::watch::config(),
    };
    let (store, events) = reflect(Api::<PartialObjectMeta<K>>::all(client.clone()), config, ());
    drain(events, tasks);
    store
}

/// Keeps a store filled that no controller maps into reconciles.
fn drain<S, K>(stream: S, tasks: &mut JoinSet<()>)
where
    S: Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::debug!(error = %e, "watch failed; retrying");
            }
        }
    });
}

impl Caches {
    /// Starts every watch: the store-only ones run on `tasks`; the fleet controller
    /// polls the returned triggers.
    pub fn start(
        client: &Client,
        (watch_ns, agent): (Option<&str>, &AgentSettings),
        provider: &dyn NodeClassProvider,
        tasks: &mut JoinSet<()>,
    ) -> (Caches, FleetTriggers) {
        let managed = format!("{MANAGED_BY_KEY}={MANAGED_BY}");
        let mut children = BTreeMap::new();
        let mut child_triggers = Vec::new();
        for kind in ChildKind::ALL {
            let ar = kind.api_resource(provider);
            let ns = kind.watch_namespace(watch_ns, agent);
            let (store, events) = reflect_events(
                dynamic_api(client, &ar, ns),
                crate::watch::config().labels(&managed),
                ar.clone(),
            );
            children.insert(kind, (ar.clone(), store));
            child_triggers.push((kind, ar, events));
        }
        let (model_sets, model_set_triggers) = reflect(
            watched_api::<ModelSet>(client, watch_ns),
            crate::watch::config(),
            (),
        );
        let (reports, report_triggers) = reflect(
            watched_api::<ModelSync>(client, watch_ns),
            crate::watch::config().labels(&managed),
            (),
        );
        let (classes, class_triggers) = reflect(
            Api::<FleetClass>::all(client.clone()),
            crate::watch::config(),
            (),
        );
        let (nodes, node_events) = reflect(
            Api::<Node>::all(client.clone()),
            crate::watch::config().labels(NODEPOOL_LABEL),
            (),
        );
        drain(node_events, tasks);
        let (pods, pod_events) = reflect(
            watched_api::<Pod>(client, watch_ns),
            crate::watch::config().labels(&format!("{APP_NAME_KEY}=comfyui,{managed}")),
            (),
        );
        drain(pod_events, tasks);
        let claim_api = render::nodepool::nodeclaim_api_resource();
        let (node_claims, claim_events) = reflect(
            dynamic_api(client, &claim_api, None),
            crate::watch::config(),
            claim_api,
        );
        drain(claim_events, tasks);
        let (catalog_maps, catalog_events) = reflect(
            watched_api::<PartialObjectMeta<ConfigMap>>(client, watch_ns),
            crate::watch::config().labels(&format!("{CATALOG_OF_KEY},{managed}")),
            (),
        );
        drain(catalog_events, tasks);
        let crds: BTreeMap<_, _> = [render::nodepool::api_resource(), provider.api_resource()]
            .iter()
            .map(|ar| {
                let name = format!("{}.{}", ar.plural, ar.group);
                let store = reflect_metadata(client, Some(&name), tasks);
                (name, store)
            })
            .collect();
        let csi_drivers = reflect_metadata(client, Some(CSI_DRIVER), tasks);
        let ingress_classes = reflect_metadata(client, None, tasks);
        let mut stores = vec![
            ("ModelSet".to_string(), Listing::of(&model_sets)),
            ("ModelSync".to_string(), Listing::of(&reports)),
            ("FleetClass".to_string(), Listing::of(&classes)),
            ("Node".to_string(), Listing::of(&nodes)),
            ("Pod".to_string(), Listing::of(&pods)),
            ("CSIDriver".to_string(), Listing::of(&csi_drivers)),
            ("IngressClass".to_string(), Listing::of(&ingress_classes)),
            ("ConfigMap".to_string(), Listing::of(&catalog_maps)),
        ];
        stores.extend(
            crds.iter()
                .map(|(name, store)| (name.clone(), Listing::of(store))),
        );
        let listed = Listing::start(stores, tasks);
        let child_stores = children
            .values()
            .map(|(ar, store)| (ar.kind.clone(), Listing::of(store)))
            .collect();
        let children_listed = Listing::start(child_stores, tasks);
        let caches = Caches {
            children,
            model_sets,
            reports,
            classes,
            nodes,
            pods,
            node_claims,
            crds,
            csi_drivers,
            ingress_classes,
            catalog_maps,
            listed,
            children_listed,
        };
        let triggers = FleetTriggers {
            children: child_triggers,
            model_sets: model_set_triggers,
            reports: report_triggers,
            classes: class_triggers,
        };
        (caches, triggers)
    }

    /// Whether the CRD `name` (one preflight needs) is installed.
    pub fn crd_installed(&self, name: &str) -> bool {
        self.crds
            .get(name)
            .is_some_and(|s| s.get(&ObjectRef::new(name)).is_some())
    }

    /// The live child of `kind` named `name`, as last seen.
    pub fn child(
        &self,
        kind: ChildKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Arc<DynamicObject>> {
        let (ar, store) = self.children.get(&kind)?;
        let mut key = ObjectRef::new_with(name, ar.clone());
        if let Some(ns) = namespace {
            key = key.within(ns);
        }
        store.get(&key)
    }

    /// A child read as its typed kind (a store's listed objects carry no apiVersion
    /// and kind: they are put back first).
    pub fn typed_child<K>(&self, kind: ChildKind, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let live = self.child(kind, namespace, name)?;
        let mut value = serde_json::to_value(&*live).ok()?;
        value["apiVersion"] = K::API_VERSION.into();
        value["kind"] = K::KIND.into();
        serde_json::from_value(value).ok()
    }

    /// The live children of `kind` whose labels `owned` accepts.
    pub fn children_of(
        &self,
        kind: ChildKind,
        owned: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Vec<Arc<DynamicObject>> {
        self.children
            .get(&kind)
            .map(|(_, store)| store.state_filter(|o| owned(o.labels())))
            .unwrap_or_default()
    }

    /// The nodes' reports of ModelSet `namespace/name`.
    pub fn reports_of(&self, namespace: &str, name: &str) -> Vec<NodeSync> {
        self.reports
            .state_filter(|r| {
                r.metadata.namespace.as_deref() == Some(namespace) && r.spec.model_set == name
            })
            .iter()
            .map(|r| r.spec.report.clone())
            .collect()
    }

    /// The catalog ConfigMaps of ModelSet `namespace/name`, as last seen.
    pub fn catalog_maps_of(
        &self,
        namespace: &str,
        name: &str,
    ) -> Vec<Arc<PartialObjectMeta<ConfigMap>>> {
        self.catalog_maps.state_filter(|cm| {
            cm.metadata.namespace.as_deref() == Some(namespace)
                && cm.labels().get(CATALOG_OF_KEY).map(String::as_str) == Some(name)
        })
    }

    /// The nodes of a NodePool.
    pub fn nodes_of_pool(&self, pool: &str) -> Vec<Node> {
        self.nodes
            .state_filter(|n| n.labels().get(NODEPOOL_LABEL).map(String::as_str) == Some(pool))
            .into_iter()
            .map(|n| (*n).clone())
            .collect()
    }

    /// Waits until the stores every reconcile reads hold their first full listing
    /// (before that, an empty store would read as "nothing there"). Bounded: a watch
    /// that cannot list (a CRD not installed) fails the reconcile, which retries.
    pub async fn ready(&self) -> Result<(), NotListed> {
        self.listed.wait(LIST_WAIT).await
    }

    /// Waits for the stores of the children (their CRDs exist: preflight checked).
    pub async fn children_ready(&self) -> Result<(), NotListed> {
        self.children_listed.wait(LIST_WAIT).await
    }
}

/// How long a reconcile waits for a watch cache's first listing.
const LIST_WAIT: Duration = Duration::from_secs(30);

/// Whether a set of stores has first listed, for any number of waiters at once: one task
/// awaits each store in turn and publishes which one it still waits for (None: all
/// listed). A store's own `wait_until_ready` wakes only one of several futures waiting
/// in one task (kube-runtime's `DelayedInit` keeps a single waker), so the 16
/// reconciles that waited on a store at start-up each sat out their whole time limit.
#[derive(Clone)]
pub struct Listing(tokio::sync::watch::Receiver<Option<String>>);

/// A store's first listing (false: its writer is gone, it will never list).
pub type FirstListing = futures::future::BoxFuture<'static, bool>;

impl Listing {
    /// Starts awaiting `stores` (kind, first listing) on `tasks`.
    pub fn start(stores: Vec<(String, FirstListing)>, tasks: &mut JoinSet<()>) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(stores.first().map(|(k, _)| k.clone()));
        tasks.spawn(async move {
            for (kind, listed) in stores {
                tx.send_replace(Some(kind));
                if !listed.await {
                    // Waiters time out naming this store.
                    return tx.closed().await;
                }
            }
            tx.send_replace(None);
        });
        Listing(rx)
    }

    /// The first listing of a store.
    pub fn of<K>(store: &Store<K>) -> FirstListing
    where
        K: Resource + Clone + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Send + Sync,
    {
        let store = store.clone();
        async move { store.wait_until_ready().await.is_ok() }.boxed()
    }

    /// Waits at most `limit` for every store to list; else names the one not listed.
    pub async fn wait(&self, limit: Duration) -> Result<(), NotListed> {
        let mut rx = self.0.clone();
        let started = std::time::Instant::now();
        let listed = tokio::time::timeout(limit, rx.wait_for(Option::is_none))
            .await
            .is_ok_and(|r| r.is_ok());
        let waited = started.elapsed();
        let waiting_for = rx.borrow().clone().unwrap_or_default();
        // Reconciles wait here only until a watch first lists: a long wait is worth
        // knowing (an apiserver slow to list, a missing RBAC grant being retried).
        if waited > Duration::from_secs(2) {
            tracing::warn!(
                store = %waiting_for,
                waited_ms = waited.as_millis() as u64,
                listed,
                "a reconcile waited for a watch cache to list"
            );
        }
        if listed {
            Ok(())
        } else {
            Err(NotListed(waiting_for))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use watcher::Event;

    fn map(name: &str, value: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "n"}, "data": {"v": value}
        }))
        .unwrap()
    }

    /// What passes `changes_only`, as names with the value they carried.
    async fn passed(events: Vec<Event<ConfigMap>>) -> Vec<String> {
        let events: Events<ConfigMap> = futures::stream::iter(events.into_iter().map(Ok)).boxed();
        let hash = |cm: &ConfigMap| {
            use std::hash::{DefaultHasher, Hasher};
            let mut h = DefaultHasher::new();
            cm.data.as_ref().map(|d| d["v"].clone()).hash(&mut h);
            h.finish()
        };
        changes_only(events, hash)
            .map(|o| {
                let o = o.unwrap();
                format!("{}={}", o.name_any(), o.data.unwrap()["v"])
            })
            .collect()
            .await
    }

    /// Many reconciles wait for the caches at start-up in one task (kube-runtime runs them
    /// as futures of one FuturesUnordered); all go on when the store lists, none sits out
    /// the limit. Virtual time: the elapsed time is exact.
    #[tokio::test(start_paused = true)]
    async fn every_waiter_goes_on_when_the_store_lists() {
        let mut writer: Writer<ConfigMap> = Writer::default();
        let store = writer.as_reader();
        let mut tasks = JoinSet::new();
        let listing = Listing::start(vec![("ConfigMap".into(), Listing::of(&store))], &mut tasks);
        let started = tokio::time::Instant::now();
        let waiters: futures::stream::FuturesUnordered<_> =
            (0..16).map(|_| listing.wait(LIST_WAIT)).collect();
        let lists = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            writer.apply_watcher_event(&Event::Init);
            writer.apply_watcher_event(&Event::InitDone);
        };
        let (results, ()) = futures::join!(waiters.collect::<Vec<_>>(), lists);
        assert_eq!(results.len(), 16);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(started.elapsed(), Duration::from_secs(1));

        // A store that never lists is named.
        let never: Writer<ConfigMap> = Writer::default();
        let listing = Listing::start(
            vec![
                ("ConfigMap".into(), Listing::of(&store)),
                ("Never".into(), Listing::of(&never.as_reader())),
            ],
            &mut tasks,
        );
        let err = listing.wait(LIST_WAIT).await.unwrap_err();
        assert_eq!(err.0, "Never");
    }

    #[tokio::test]
    async fn only_changes_and_deletions_pass() {
        let got = passed(vec![
            Event::Init,
            Event::InitApply(map("a", "1")),
            Event::InitApply(map("b", "1")),
            Event::InitDone,
            // The same content again (a status-only write, say): nothing.
            Event::Apply(map("a", "1")),
            Event::Apply(map("a", "2")),
            // A deletion carries the last content, and passes.
            Event::Delete(map("b", "1")),
            // A relist: a only if it changed while away; b again, since it was deleted.
            Event::Init,
            Event::InitApply(map("a", "2")),
            Event::InitApply(map("b", "1")),
            Event::InitDone,
        ])
        .await;
        assert_eq!(got, ["a=1", "b=1", "a=2", "b=1", "b=1"]);
    }
}
