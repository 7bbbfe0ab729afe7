//! The node agent: on one node, syncs the ModelSets of the fleets whose NodePool the
//! node belongs to, reports its own entry in each ModelSet's `status.nodes`, and lifts
//! the node's `sdfleet.io/models-not-ready` startup taint after the first complete sync.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use crate::crd::ComfyUIDeployment;
use crate::crd::modelset::{ModelSet, NodeSync, NodeSyncState};
use crate::names::{FleetNames, MODELS_NOT_READY_TAINT, NODEPOOL_LABEL, models_dir, safe_name};
use crate::sync::store::S3Store;
use crate::sync::{self, SyncOptions};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

pub struct Agent {
    pub client: Client,
    pub node: String,
    pub root: PathBuf,
    pub region: Option<String>,
}

impl Agent {
    /// Syncs, reports and lifts the taint until `shutdown`: at once when a ModelSet's
    /// catalog or spec or a fleet changes (watched), and every `resync` regardless.
    pub async fn run(&self, resync: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let changed = Arc::new(Notify::new());
        let watching = tokio::spawn(watch_changes(self.client.clone(), changed.clone()));
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(node = %self.node, error = %e, "agent pass failed; retrying");
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(resync) => {}
                // Changes during the pass left one stored wake-up: one more pass covers them all.
                _ = changed.notified() => tracing::debug!(node = %self.node, "change seen; syncing"),
            }
        }
        watching.abort();
    }

    /// One pass: returns once every ModelSet of the node's fleets was visited.
    pub async fn pass(&self) -> Result<(), AgentError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes.get(&self.node).await?;
        let Some(pool) = node.labels().get(NODEPOOL_LABEL).cloned() else {
            tracing::debug!(node = %self.node, "not a Karpenter node; nothing to sync");
            return Ok(());
        };
        let cuds: Api<ComfyUIDeployment> = Api::all(self.client.clone());
        let mut wanted: Vec<(String, String)> = cuds
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|cud| {
                let ns = cud.namespace()?;
                let fleet = FleetNames::new(&ns, &cud.name_any());
                (fleet.nodepool() == pool)
                    .then(|| Some((ns, cud.spec.model_set.clone()?)))
                    .flatten()
            })
            .collect();
        wanted.sort();
        wanted.dedup();

        let mut all_synced = !wanted.is_empty();
        for (ns, name) in wanted {
            let api: Api<ModelSet> = Api::namespaced(self.client.clone(), &ns);
            let Some(ms) = api.get_opt(&name).await? else {
                tracing::info!(modelset = %format!("{ns}/{name}"), "ModelSet not found; waiting");
                all_synced = false;
                continue;
            };
            if !admitted(&ms) {
                // The controller has not (or no longer) listed it under its FleetClass:
                // the bucket is not for this agent to read.
                tracing::info!(modelset = %format!("{ns}/{name}"), "ModelSet not admitted by the controller; waiting");
                all_synced = false;
                continue;
            }
            all_synced &= self.sync_one(&api, &ms, &ns).await?;
        }
        if all_synced {
            self.lift_taint(&nodes).await?;
        }
        Ok(())
    }

    /// Brings the node to the ModelSet's catalog; true when the node holds it.
    async fn sync_one(
        &self,
        api: &Api<ModelSet>,
        ms: &ModelSet,
        ns: &str,
    ) -> Result<bool, AgentError> {
        let name = ms.name_any();
        let status = ms.status.clone().unwrap_or_default();
        let dest = models_dir(&self.root, ns, &name);
        let mine = status.node(&self.node);
        // Already at the catalog's revision, and nothing removed locally since.
        if mine.is_some_and(|m| m.is_synced_at(&status.revision)) && sync::has_manifest(&dest) {
            return Ok(true);
        }
        if mine.map(|m| m.state) != Some(NodeSyncState::Syncing) {
            self.report(api, &name, NodeSyncState::Syncing, &status.revision, 0, "")
                .await?;
        }
        let spec = &ms.spec;
        let result = async {
            let filter = spec.filter().map_err(|e| e.to_string())?;
            let location = spec.source.s3.location(self.region.as_deref());
            let (store, catalog) = S3Store::open_catalog(&location, &filter)
                .await
                .map_err(|e| e.to_string())?;
            tokio::fs::create_dir_all(&dest)
                .await
                .map_err(|e| format!("{}: {e}", dest.display()))?;
            let mut opts = SyncOptions::new(&dest);
            opts.delete = spec.sync.delete_removed;
            let report = sync::sync(&store, &catalog, &opts)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((catalog, report))
        }
        .await;
        match result {
            // Refused keys mean the node does not hold the catalog: it reports Failed,
            // naming them, and its startup taint stays on.
            Ok((catalog, report)) if !report.refused.is_empty() => {
                let message = format!(
                    "refused {} key(s) of the catalog, e.g. {}",
                    report.refused.len(),
                    report.refused[0]
                );
                tracing::warn!(node = %self.node, modelset = %format!("{ns}/{name}"), %message, "sync incomplete");
                self.report(
                    api,
                    &name,
                    NodeSyncState::Failed,
                    &catalog.revision(),
                    catalog.total_bytes(),
                    &message,
                )
                .await?;
                Ok(false)
            }
            Ok((catalog, report)) => {
                tracing::info!(
                    node = %self.node, modelset = %format!("{ns}/{name}"), revision = %catalog.revision(),
                    fetched = report.downloaded, bytes = report.bytes, resumed_bytes = report.resumed, deleted = report.deleted, "synced"
                );
                self.report(
                    api,
                    &name,
                    NodeSyncState::Synced,
                    &catalog.revision(),
                    catalog.total_bytes(),
                    "",
                )
                .await?;
                Ok(true)
            }
            Err(message) => {
                tracing::warn!(node = %self.node, modelset = %format!("{ns}/{name}"), %message, "sync failed");
                self.report(
                    api,
                    &name,
                    NodeSyncState::Failed,
                    &status.revision,
                    0,
                    &message,
                )
                .await?;
                Ok(false)
            }
        }
    }

    /// Applies this node's entry of `status.nodes` (a list map keyed by node): each
    /// agent owns its entry under its own field manager, so none clobbers another.
    async fn report(
        &self,
        api: &Api<ModelSet>,
        name: &str,
        state: NodeSyncState,
        revision: &str,
        bytes_done: u64,
        message: &str,
    ) -> Result<(), AgentError> {
        let entry = NodeSync {
            node: self.node.clone(),
            revision: revision.into(),
            state,
            bytes_done,
            message: NodeSync::bounded(message),
            command_id: None,
        };
        let body = ModelSet::node_entries_patch(name, &[entry]);
        let manager = format!("sdfleet-agent-{}", self.node);
        api.patch_status(
            name,
            &PatchParams::apply(&safe_name(&manager, 128)).force(),
            &Patch::Apply(body),
        )
        .await?;
        Ok(())
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

/// A hash of what of an object can change what the agent does: its spec (generation)
/// and, for a ModelSet, its catalog revision. Status writes (the agents' own entries
/// among them) change neither, so they wake nobody.
fn spec_and_revision<K: Resource>(object: &K, revision: Option<&str>) -> Option<u64> {
    let mut h = DefaultHasher::new();
    (object.meta().generation, revision).hash(&mut h);
    Some(h.finish())
}

/// Watches ModelSets and ComfyUIDeployments and notifies `changed` when one of them
/// changes in a way that matters (kube-runtime's predicate filter keeps the last hash of
/// each object). Watch errors are retried with backoff; meanwhile the periodic resync
/// still runs.
async fn watch_changes(client: Client, changed: Arc<Notify>) {
    let sets = watcher(
        Api::<ModelSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(
        |ms: &ModelSet| spec_and_revision(ms, ms.status.as_ref().map(|s| s.revision.as_str())),
        PredicateConfig::default(),
    )
    .map(|r| r.map(|_| ()))
    .boxed();
    let fleets = watcher(
        Api::<ComfyUIDeployment>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(predicates::generation, PredicateConfig::default())
    .map(|r| r.map(|_| ()))
    .boxed();
    let mut events = futures::stream::select(sets, fleets);
    while let Some(event) = events.next().await {
        match event {
            Ok(()) => changed.notify_one(),
            Err(e) => tracing::warn!(error = %e, "watching ModelSets and fleets; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_apiserver::{self, Seen};
    use http::StatusCode;
    use std::sync::Mutex;

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
