//! The node agent: on one node, syncs the ModelSet its fleet uses (the node's labels name
//! both: the NodePool's template puts them there), reports in its own `ModelSync` object,
//! and lifts the node's `sdfleet.io/models-not-ready` startup taint after the first
//! complete sync.
//!
//! It watches only what concerns its node: the Node itself and that one ModelSet, each by
//! a field selector. A steady agent sends no request: its node and ModelSet come from
//! those watches' stores, and what it last reported is kept in memory.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::crd::modelset::{ModelSet, NodeSync, NodeSyncState};
use crate::crd::{ComfyUIDeployment, FleetClass, ModelSync};
use crate::names::{
    GPU_RESOURCE, MODELS_NOT_READY_TAINT, MODELSET_LABEL, NODEPOOL_LABEL, OWNER_NAME_KEY,
    OWNER_NAMESPACE_KEY, label_value, models_dir,
};
use crate::policy;
use crate::storage;
use crate::sync::catalog::{self, Catalog, Filter};
use crate::sync::hot::HotSet;
use crate::sync::{self, SyncOptions};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the watch of {0} has not listed yet")]
    NotListed(String),
}

/// The field manager of the agents' reports (each report has this one writer).
const MANAGER: &str = "sdfleet-agent";
/// How long a pass waits for a watch's first listing.
const LIST_WAIT: Duration = Duration::from_secs(30);
/// How long a sync runs before the node reports it as Syncing.
const SYNCING_REPORT_AFTER: Duration = Duration::from_secs(2);
/// Concurrent GETs of the rest of a catalog once the hot models are on the node and
/// pods run: an eighth of a full sync's, so the first job's model loads and uploads keep
/// the disk and network.
const BACKGROUND_CONCURRENCY: usize = sync::DEFAULT_CONCURRENCY / 8;

/// What a sync pass left on the node.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The whole catalog.
    Holds,
    /// The hot models (this catalog, to be read into the page cache); the rest is still
    /// to come.
    HotReady(Catalog),
    /// Not what pods need: the sync failed or was refused.
    Missing,
}

/// A sync that ran to its end.
struct Synced {
    /// The revision of the whole catalog listed.
    revision: String,
    /// What was synced: the hot models, or the whole catalog.
    catalog: Catalog,
    report: sync::SyncReport,
    /// Only the hot models were synced: with those of them there because the fleets'
    /// recent jobs used them.
    hot: Option<Vec<String>>,
}

/// The catalog's hot models: `spec.hot`'s globs, and the keys of the fleets' recent
/// checkpoints (`recent`), with the recent keys found among them. None when nothing
/// matches, so that a misnamed hot set never lets pods start on a node without models.
fn hot_models(
    catalog: &Catalog,
    hot: &[String],
    recent: &[String],
) -> Result<Option<(Catalog, Vec<String>)>, String> {
    let set = HotSet::new(hot, recent).map_err(|e| format!("spec.hot: {e}"))?;
    let objects: Vec<_> = catalog
        .objects
        .iter()
        .filter(|o| set.holds(&o.key))
        .cloned()
        .collect();
    if objects.is_empty() {
        tracing::warn!(
            ?hot,
            ?recent,
            "the hot models match no model of the catalog; syncing the whole catalog first"
        );
        return Ok(None);
    }
    let found: Vec<String> = recent
        .iter()
        .filter(|k| objects.iter().any(|o| &o.key == *k))
        .cloned()
        .collect();
    Ok(Some((Catalog::new(objects), found)))
}

/// The recent checkpoints (`status.demand.recentModels`) of the fleets in the ModelSet's
/// namespace that use it, most used first, at most `MAX_RECENT`.
fn recent_of(fleets: &Store<ComfyUIDeployment>, model_set: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for fleet in fleets.state() {
        if fleet.spec.model_set.as_deref() != Some(model_set) {
            continue;
        }
        let recent = fleet
            .status
            .as_ref()
            .and_then(|s| s.demand.as_ref())
            .map(|d| d.recent_models.clone())
            .unwrap_or_default();
        for key in recent {
            if !out.contains(&key) && out.len() < MAX_RECENT {
                out.push(key);
            }
        }
    }
    out
}

/// Recent checkpoints a node syncs first, over all its fleets (each gateway names 8).
const MAX_RECENT: usize = 16;

pub struct Agent {
    pub client: Client,
    pub node: String,
    pub root: PathBuf,
    pub region: Option<String>,
}

/// The ModelSet a node was made for: `(namespace, name)`. The name is the node's
/// annotation (whole), and must be what its label (hashed when long) says, which the
/// fleet's pods select; nodes made before the annotation carry the name in the label.
fn wanted(node: &Node) -> Option<(String, String)> {
    let labels = node.labels();
    labels.get(NODEPOOL_LABEL)?;
    let label = labels.get(MODELSET_LABEL)?;
    let name = match node.annotations().get(MODELSET_LABEL) {
        Some(name) if &label_value(name) == label => name.clone(),
        Some(_) => return None,
        None => label.clone(),
    };
    Some((labels.get(OWNER_NAMESPACE_KEY)?.clone(), name))
}

/// A watch filling `store`, waking `changed` when `what` of an object changes.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    what: fn(&K) -> Option<u64>,
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let writer = Writer::default();
    let store = writer.as_reader();
    let task = tokio::spawn(async move {
        let events = reflector::reflector(writer, watcher(api, config).default_backoff())
            .applied_objects()
            .predicate_filter(what, PredicateConfig::default());
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(error = %e, "watch failed; retrying"),
            }
        }
    });
    (store, task)
}

async fn listed<K>(store: &Store<K>, what: &str) -> Result<(), AgentError>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    match tokio::time::timeout(LIST_WAIT, store.wait_until_ready()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(AgentError::NotListed(what.to_string())),
    }
}

/// The one ModelSet being watched, and its namespace (whose labels decide its class).
struct Watched {
    key: (String, String),
    store: Store<ModelSet>,
    task: JoinHandle<()>,
    namespace: Store<Namespace>,
    namespace_task: JoinHandle<()>,
    /// The namespace's fleets: their gateways' recent checkpoints.
    fleets: Store<ComfyUIDeployment>,
    fleets_task: JoinHandle<()>,
}

impl Watched {
    fn stop(self) {
        self.task.abort();
        self.namespace_task.abort();
        self.fleets_task.abort();
    }
}

/// The agent's state between passes: what it watches and what it last reported.
struct State {
    model_set: Option<Watched>,
    classes: Store<FleetClass>,
    /// The last report per ModelSync name; absent until read once.
    reported: HashMap<String, Option<NodeSync>>,
    /// When this agent first saw `nvidia.com/gpu` allocatable on its node.
    gpu_seen: Option<Time>,
}

impl Agent {
    /// Syncs, reports and lifts the taint until `shutdown`: at once when the node's
    /// labels or taints or its ModelSet's spec or revision change (watched), and every
    /// `resync` regardless (which repairs local changes).
    pub async fn run(&self, resync: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let changed = Arc::new(Notify::new());
        let (node, node_task) = watch(
            Api::<Node>::all(self.client.clone()),
            crate::watch::named(&self.node),
            changed.clone(),
            node_changes,
        );
        // Every FleetClass (a cluster holds a handful): the agent checks the ModelSet
        // against its class itself before it reads the bucket, whatever its status says.
        let (classes, classes_task) = watch(
            Api::<FleetClass>::all(self.client.clone()),
            watcher::Config::default(),
            changed.clone(),
            |c: &FleetClass| c.metadata.generation.map(|g| g as u64),
        );
        let mut state = State {
            model_set: None,
            classes,
            reported: HashMap::new(),
            gpu_seen: None,
        };
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.pass(&node, &mut state, &changed).await {
                tracing::warn!(node = %self.node, error = %e, "agent pass failed; retrying");
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(resync) => {}
                // Changes during the pass left one stored wake-up: one more pass covers them all.
                _ = changed.notified() => tracing::debug!(node = %self.node, "change seen; syncing"),
            }
        }
        node_task.abort();
        classes_task.abort();
        if let Some(w) = state.model_set {
            w.stop();
        }
    }

    /// One pass over the node's ModelSet, read from the watches' stores.
    async fn pass(
        &self,
        nodes: &Store<Node>,
        state: &mut State,
        changed: &Arc<Notify>,
    ) -> Result<(), AgentError> {
        listed(nodes, "its Node").await?;
        let Some(node) = nodes.get(&ObjectRef::new(&self.node)) else {
            tracing::debug!(node = %self.node, "node not found; waiting");
            return Ok(());
        };
        if state.gpu_seen.is_none() && gpu_allocatable(&node) {
            state.gpu_seen = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        }
        let Some((ns, name)) = wanted(&node) else {
            tracing::debug!(node = %self.node, "no fleet with a ModelSet on this node; nothing to sync");
            return Ok(());
        };
        // Watch that one ModelSet (a new one when the node's labels name another).
        if state.model_set.as_ref().map(|w| &w.key) != Some(&(ns.clone(), name.clone())) {
            if let Some(old) = state.model_set.take() {
                old.stop();
            }
            let (store, task) = watch(
                Api::<ModelSet>::namespaced(self.client.clone(), &ns),
                crate::watch::named(&name),
                changed.clone(),
                model_set_changes,
            );
            let (namespace, namespace_task) = watch(
                Api::<Namespace>::all(self.client.clone()),
                crate::watch::named(&ns),
                changed.clone(),
                |n: &Namespace| {
                    let mut h = DefaultHasher::new();
                    n.metadata.labels.hash(&mut h);
                    Some(h.finish())
                },
            );
            // Their specs only: a node reads the recent checkpoints when it syncs, and
            // demand changes every few seconds.
            let (fleets, fleets_task) = watch(
                Api::<ComfyUIDeployment>::namespaced(self.client.clone(), &ns),
                watcher::Config::default(),
                changed.clone(),
                |f: &ComfyUIDeployment| f.metadata.generation.map(|g| g as u64),
            );
            state.model_set = Some(Watched {
                key: (ns.clone(), name.clone()),
                store,
                task,
                namespace,
                namespace_task,
                fleets,
                fleets_task,
            });
        }
        let Some(watched) = &state.model_set else {
            return Ok(());
        };
        listed(&watched.store, "its ModelSet").await?;
        let Some(ms) = watched.store.get(&ObjectRef::new(&name).within(&ns)) else {
            tracing::info!(modelset = %format!("{ns}/{name}"), "ModelSet not found; waiting");
            return Ok(());
        };
        if !admitted(&ms) {
            // The controller has not (or no longer) listed it under its FleetClass:
            // the bucket is not for this agent to read.
            tracing::info!(modelset = %format!("{ns}/{name}"), "ModelSet not admitted by the controller; waiting");
            return Ok(());
        }
        listed(&state.classes, "the FleetClasses").await?;
        listed(&watched.namespace, "its namespace").await?;
        listed(&watched.fleets, "its namespace's fleets").await?;
        let labels = watched
            .namespace
            .get(&ObjectRef::new(&ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        let classes: Vec<FleetClass> = state
            .classes
            .state()
            .iter()
            .map(|c| (**c).clone())
            .collect();
        let namespace = policy::Namespace {
            name: ns.clone(),
            labels,
        };
        // Admitted: read as its class's tenant role, if it names one.
        let (tenant, refusal) = match policy::admit_modelset(&ms.spec, &classes, &namespace) {
            Ok(role) => (
                role.map(|role_arn| storage::s3::Tenant {
                    role_arn,
                    namespace: ns.clone(),
                    name: name.clone(),
                }),
                None,
            ),
            Err(refused) => (None, Some(refused.to_string())),
        };
        let reports = Reports {
            api: Api::namespaced(self.client.clone(), &ns),
            node: &node,
            model_set: &ms,
            recent: recent_of(&watched.fleets, &name),
        };
        let key = ModelSync::name_for(&name, &self.node);
        if !state.reported.contains_key(&key) {
            let last = reports.api.get_opt(&key).await?.map(|r| r.spec.report);
            state.reported.insert(key.clone(), last);
        }
        let gpu_seen = state.gpu_seen.clone();
        let mine = state.reported.get_mut(&key);
        let Some(mine) = mine else {
            return Ok(());
        };
        if let Some(message) = refusal {
            // Admitted by its status, refused by its class (narrowed since, or the
            // status is not the controller's): nothing is read, and the node says why.
            tracing::warn!(node = %self.node, modelset = %format!("{ns}/{name}"), %message, "not syncing: outside its FleetClass");
            let revision = ms
                .status
                .as_ref()
                .map(|s| s.revision.clone())
                .unwrap_or_default();
            let already = mine.as_ref().is_some_and(|m| {
                m.state == NodeSyncState::Failed && m.message == NodeSync::bounded(&message)
            });
            if !already {
                let entry = self.entry(NodeSyncState::Failed, &revision, 0, &message);
                self.report(&reports, mine, entry).await?;
            }
            return Ok(());
        }
        // The GPU's time lands in the report before a sync that may take minutes, and
        // after the first one when there was no report yet.
        self.stamp_gpu(&reports, mine, gpu_seen.as_ref()).await?;
        let startup_taint = has_startup_taint(&node);
        let outcome = self
            .sync_one(&reports, mine, &ns, startup_taint, tenant.as_ref())
            .await?;
        if outcome != Outcome::Missing && startup_taint {
            self.lift_taint(&Api::all(self.client.clone())).await?;
        }
        if let Outcome::HotReady(hot) = outcome {
            // Pods may start now. The hot models are read into the page cache while the
            // pod starts (image, imports, CUDA init: seconds before its first load), then
            // the rest of the catalog follows in the background.
            self.warm(&ns, &ms.name_any(), &hot).await;
            self.sync_one(&reports, mine, &ns, false, tenant.as_ref())
                .await?;
        }
        self.stamp_gpu(&reports, mine, gpu_seen.as_ref()).await
    }

    /// Writes when the GPU became allocatable into the report, once.
    async fn stamp_gpu(
        &self,
        reports: &Reports<'_>,
        mine: &mut Option<NodeSync>,
        seen: Option<&Time>,
    ) -> Result<(), AgentError> {
        let (Some(seen), Some(last)) = (seen, mine.as_ref()) else {
            return Ok(());
        };
        if last.gpu_allocatable_at.is_some() {
            return Ok(());
        }
        let mut entry = last.clone();
        entry.gpu_allocatable_at = Some(seen.clone());
        self.report(reports, mine, entry).await
    }

    /// Brings the node to the ModelSet's catalog. On a node that still has its startup
    /// taint, or holds nothing of the set yet, and a ModelSet with hot models, only those
    /// are synced: the caller lifts the taint, reads them into the page cache and calls
    /// again for the rest, which then runs at `BACKGROUND_CONCURRENCY` so that it does not
    /// slow the first job.
    async fn sync_one(
        &self,
        reports: &Reports<'_>,
        mine: &mut Option<NodeSync>,
        ns: &str,
        startup_taint: bool,
        tenant: Option<&storage::s3::Tenant>,
    ) -> Result<Outcome, AgentError> {
        let ms = reports.model_set;
        let name = ms.name_any();
        let status = ms.status.clone().unwrap_or_default();
        let dest = models_dir(&self.root, ns, &name);
        let last = mine.clone();
        // Already at the catalog's revision, and nothing removed locally since.
        if last
            .as_ref()
            .is_some_and(|m| m.is_synced_at(&status.revision))
            && sync::has_manifest(&dest)
        {
            return Ok(Outcome::Holds);
        }
        let last_state = last.as_ref().map(|m| m.state);
        let hot_done = last
            .as_ref()
            .is_some_and(|m| m.hot_ready && m.revision == status.revision);
        let spec = &ms.spec;
        // Pods wait for the taint, or the node has nothing of the set yet (its taint may
        // still be on its way): the hot models first.
        let fresh = !sync::has_manifest(&dest);
        let has_hot = !spec.hot.is_empty() || !reports.recent.is_empty();
        let hot_first = (startup_taint || fresh) && has_hot && !hot_done;
        let sync = async {
            let filter = Filter::new(&spec.include, &spec.exclude).map_err(|e| e.to_string())?;
            let store = storage::open_as(&spec.source, self.region.as_deref(), tenant)
                .await
                .map_err(|e| e.to_string())?;
            let catalog = catalog::list(&store, &filter)
                .await
                .map_err(|e| e.to_string())?;
            tokio::fs::create_dir_all(&dest)
                .await
                .map_err(|e| format!("{}: {e}", dest.display()))?;
            let hot = if hot_first {
                hot_models(&catalog, &spec.hot, &reports.recent)?
            } else {
                None
            };
            if let Some((hot, hot_recent)) = hot {
                let report = sync::sync(&store, &hot, &SyncOptions::new(&dest))
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok::<_, String>(Synced {
                    revision: catalog.revision(),
                    catalog: hot,
                    report,
                    hot: Some(hot_recent),
                });
            }
            let mut opts = SyncOptions::new(&dest);
            opts.delete = spec.sync.delete_removed;
            if hot_done {
                opts.concurrency = BACKGROUND_CONCURRENCY;
            }
            let report = sync::sync(&store, &catalog, &opts)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Synced {
                revision: catalog.revision(),
                catalog,
                report,
                hot: None,
            })
        };
        let mut sync = std::pin::pin!(sync);
        let syncing = async |mine: &mut Option<NodeSync>| {
            let entry = self.entry(NodeSyncState::Syncing, &status.revision, 0, "");
            self.report(reports, mine, entry).await
        };
        // "Syncing" is written only for a sync that takes a while: a small change (one
        // LoRA more) then costs one write per node, not two, and 1,000 nodes' reports of
        // a new model do not queue the apiserver twice over. A failure's report is
        // replaced at once, so the error does not outlive it.
        let result = match last_state {
            Some(NodeSyncState::Syncing) => sync.await,
            Some(NodeSyncState::Failed) => {
                syncing(mine).await?;
                sync.await
            }
            _ => tokio::select! {
                result = &mut sync => result,
                () = tokio::time::sleep(SYNCING_REPORT_AFTER) => {
                    syncing(mine).await?;
                    sync.await
                }
            },
        };
        let modelset = format!("{ns}/{name}");
        match result {
            // Refused keys mean the node does not hold the catalog: it reports Failed,
            // naming them, and its startup taint stays on.
            Ok(done) if !done.report.refused.is_empty() => {
                let refused = &done.report.refused;
                let message = format!(
                    "refused {} key(s) of the catalog, e.g. {}",
                    refused.len(),
                    refused[0]
                );
                tracing::warn!(node = %self.node, %modelset, %message, "sync incomplete");
                let entry = self.entry(
                    NodeSyncState::Failed,
                    &done.revision,
                    done.catalog.total_bytes(),
                    &message,
                );
                self.report(reports, mine, entry).await?;
                Ok(Outcome::Missing)
            }
            Ok(Synced {
                revision,
                catalog,
                report,
                hot: Some(hot_recent),
            }) => {
                let files = catalog.objects.len();
                let bytes = catalog.total_bytes();
                tracing::info!(
                    node = %self.node, %modelset, files, bytes, fetched = report.downloaded,
                    "hot models synced; lifting the startup taint"
                );
                let message = format!(
                    "hot models on the node ({files} files, {bytes} bytes); syncing the rest"
                );
                let mut entry = self.entry(NodeSyncState::Syncing, &revision, bytes, &message);
                entry.hot_ready = true;
                entry.hot_recent = hot_recent;
                self.report(reports, mine, entry).await?;
                Ok(Outcome::HotReady(catalog))
            }
            Ok(done) => {
                let report = &done.report;
                tracing::info!(
                    node = %self.node, %modelset, revision = %done.revision,
                    fetched = report.downloaded, bytes = report.bytes, resumed_bytes = report.resumed, deleted = report.deleted, "synced"
                );
                let entry = self.entry(
                    NodeSyncState::Synced,
                    &done.revision,
                    done.catalog.total_bytes(),
                    "",
                );
                self.report(reports, mine, entry).await?;
                Ok(Outcome::Holds)
            }
            Err(message) => {
                tracing::warn!(node = %self.node, %modelset, %message, "sync failed");
                let entry = self.entry(NodeSyncState::Failed, &status.revision, 0, &message);
                self.report(reports, mine, entry).await?;
                Ok(Outcome::Missing)
            }
        }
    }

    /// This node's report.
    fn entry(
        &self,
        state: NodeSyncState,
        revision: &str,
        bytes_done: u64,
        message: &str,
    ) -> NodeSync {
        NodeSync {
            node: self.node.clone(),
            revision: revision.into(),
            state,
            bytes_done,
            message: NodeSync::bounded(message),
            command_id: None,
            hot_ready: false,
            gpu_allocatable_at: None,
            hot_recent: Vec::new(),
        }
    }

    /// Applies this node's report (its own `ModelSync`, one writer each).
    async fn report(
        &self,
        reports: &Reports<'_>,
        mine: &mut Option<NodeSync>,
        mut entry: NodeSync,
    ) -> Result<(), AgentError> {
        if entry.gpu_allocatable_at.is_none() {
            entry.gpu_allocatable_at = mine.as_ref().and_then(|m| m.gpu_allocatable_at.clone());
        }
        // The hot models stay on the node until the whole set is: a failed or restarted
        // sync of the rest must not read as a node that holds everything.
        if let Some(last) = mine.as_ref().filter(|m| {
            m.hot_ready && m.revision == entry.revision && entry.state != NodeSyncState::Synced
        }) && !entry.hot_ready
        {
            entry.hot_ready = true;
            entry.hot_recent = last.hot_recent.clone();
        }
        let owners: std::collections::BTreeMap<String, String> = reports
            .node
            .labels()
            .iter()
            .filter(|(k, _)| *k == OWNER_NAMESPACE_KEY || *k == OWNER_NAME_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let body = ModelSync::apply_body(reports.model_set, reports.node, &owners, &entry);
        let name = ModelSync::name_for(&reports.model_set.name_any(), &self.node);
        reports
            .api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(body),
            )
            .await?;
        *mine = Some(entry);
        Ok(())
    }

    /// Reads the hot models into the page cache, up to half the node's memory. A failure
    /// leaves them on disk only: slower first loads, nothing wrong.
    async fn warm(&self, ns: &str, name: &str, hot: &Catalog) {
        let dest = models_dir(&self.root, ns, name);
        match sync::warm::warm(&dest, hot, sync::warm::memory_budget()).await {
            Ok(warmed) => tracing::info!(
                node = %self.node, modelset = %format!("{ns}/{name}"), files = warmed.files,
                bytes = warmed.bytes, skipped = warmed.skipped, "hot models read into the page cache"
            ),
            Err(e) => tracing::warn!(
                node = %self.node, modelset = %format!("{ns}/{name}"), error = %e,
                "page-cache warming failed; the hot models stay on disk only"
            ),
        }
    }

    /// Removes the startup taint from this node. The node is read afresh (a sync can take
    /// long enough for the node read before it to be stale), and a conflicting write in
    /// between is retried on a new read rather than left for the next pass.
    async fn lift_taint(&self, nodes: &Api<Node>) -> Result<(), AgentError> {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let node = nodes.get(&self.node).await?;
            let taints = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            if !taints.iter().any(|t| t.key == MODELS_NOT_READY_TAINT) {
                return Ok(());
            }
            let rest: Vec<_> = taints
                .into_iter()
                .filter(|t| t.key != MODELS_NOT_READY_TAINT)
                .collect();
            // resourceVersion: fail rather than overwrite a concurrent taint change.
            let patch = json!({"metadata": {"resourceVersion": node.resource_version()}, "spec": {"taints": rest}});
            match nodes
                .patch(&self.node, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(node = %self.node, "models are on the node; lifted {MODELS_NOT_READY_TAINT}");
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 409 && attempt < ATTEMPTS => {
                    tracing::debug!(node = %self.node, attempt, "node changed while lifting the taint; reading it again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// The controller listed this generation of the ModelSet: its class allows the bucket.
fn admitted(ms: &ModelSet) -> bool {
    let Some(status) = &ms.status else {
        return false;
    };
    status.observed_generation == ms.metadata.generation
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Where a pass reports: the node's ModelSync objects in the ModelSet's namespace.
struct Reports<'a> {
    api: Api<ModelSync>,
    node: &'a Node,
    model_set: &'a ModelSet,
    /// The fleets' recent checkpoints, synced with the hot models on a new node.
    recent: Vec<String>,
}

/// The node advertises GPUs: its device plugin registered with the kubelet.
fn gpu_allocatable(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(GPU_RESOURCE))
        .is_some_and(|q| q.0 != "0")
}

fn has_startup_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == MODELS_NOT_READY_TAINT))
}

/// What of its node can change what the agent does: the labels naming the fleet and
/// ModelSet, and the taints. Not the kubelet's status heartbeats.
fn node_changes(node: &Node) -> Option<u64> {
    let mut h = DefaultHasher::new();
    node.metadata.labels.hash(&mut h);
    gpu_allocatable(node).hash(&mut h);
    serde_json::to_string(&node.spec.as_ref().map(|s| &s.taints))
        .unwrap_or_default()
        .hash(&mut h);
    Some(h.finish())
}

/// What of its ModelSet can change what the agent does: the spec (generation), the
/// catalog revision and whether the controller admitted it.
fn model_set_changes(ms: &ModelSet) -> Option<u64> {
    let mut h = DefaultHasher::new();
    (
        ms.metadata.generation,
        ms.status.as_ref().map(|s| s.revision.as_str()),
        admitted(ms),
    )
        .hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_apiserver::{self, Seen};
    use http::StatusCode;
    use std::sync::Mutex;

    fn labelled(labels: serde_json::Value, annotations: serde_json::Value) -> Node {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "gpu-1", "labels": labels, "annotations": annotations}}))
        .unwrap()
    }

    #[test]
    fn a_long_modelset_name_comes_from_the_annotation_its_hashed_label_matches() {
        let long = format!("models-{}", "x".repeat(200));
        let hashed = label_value(&long);
        assert!(hashed.len() <= 63 && hashed != long);
        let labels = json!({NODEPOOL_LABEL: "team.sdxl", OWNER_NAMESPACE_KEY: "team",
            MODELSET_LABEL: hashed});
        assert_eq!(
            wanted(&labelled(labels.clone(), json!({MODELSET_LABEL: long}))),
            Some(("team".to_string(), long.clone()))
        );
        // An annotation the label does not match names no ModelSet.
        assert_eq!(
            wanted(&labelled(labels, json!({MODELSET_LABEL: "other"}))),
            None
        );
        // A node made before the annotation: the label is the name.
        let old = json!({NODEPOOL_LABEL: "team.sdxl", OWNER_NAMESPACE_KEY: "team",
            MODELSET_LABEL: "sdxl-models"});
        assert_eq!(
            wanted(&labelled(old, json!({}))),
            Some(("team".to_string(), "sdxl-models".to_string()))
        );
    }

    fn node(resource_version: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "gpu-1", "resourceVersion": resource_version},
            "spec": {"taints": [
                {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"},
                {"key": MODELS_NOT_READY_TAINT, "effect": "NoSchedule"}]}})
    }

    #[tokio::test]
    async fn the_taint_is_lifted_from_a_fresh_read_after_a_conflict() {
        // The node changes (resourceVersion 1 → 2) between the agent's read and its patch.
        let version = Arc::new(Mutex::new(1));
        let v = version.clone();
        let (client, seen) = mock_apiserver::apiserver(move |req: &Seen| {
            let mut current = v.lock().unwrap();
            match req.method.as_str() {
                "GET" => {
                    let answer = (StatusCode::OK, node(&current.to_string()));
                    // Someone else writes the node right after this read, once.
                    if *current == 1 {
                        *current = 2;
                    }
                    answer
                }
                "PATCH" if req.body["metadata"]["resourceVersion"] == current.to_string() => {
                    (StatusCode::OK, node(&current.to_string()))
                }
                "PATCH" => (
                    StatusCode::CONFLICT,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
                ),
                _ => panic!("unexpected {req:?}"),
            }
        });
        let agent = Agent {
            client: client.clone(),
            node: "gpu-1".into(),
            root: PathBuf::from("/nonexistent"),
            region: None,
        };
        agent.lift_taint(&Api::all(client)).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let patches: Vec<&Seen> = seen.iter().filter(|s| s.method == "PATCH").collect();
        assert_eq!(patches.len(), 2, "{seen:?}");
        assert_eq!(patches[1].body["metadata"]["resourceVersion"], "2");
        // Only the startup taint goes; the GPU taint stays.
        assert_eq!(
            patches[1].body["spec"]["taints"],
            json!([{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}])
        );
    }
}
