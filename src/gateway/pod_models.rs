//! Which models a pod's node holds. A node whose ModelSet names hot models takes pods
//! once those are synced (`hotReady` in its agent's report) and syncs the rest after;
//! until then its pods get only jobs whose models are all hot, and a job that needs more
//! waits (`waiting: {reason: ModelsSyncing}`) for a node that holds it.

use std::sync::Arc;

use serde_json::Value;

use crate::crd::ModelSync;
use crate::crd::modelset::NodeSyncState;
use crate::sync::catalog::Filter;

use super::workflow::model_refs;

/// What a pod's node holds of its fleet's ModelSet.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum PodModels {
    /// All of it (or the fleet has no ModelSet, or nothing says otherwise: without hot
    /// models a node takes pods only after its whole sync).
    #[default]
    All,
    /// Only the hot models, while the rest syncs.
    Hot(HotSet),
}

/// The hot models' globs (the ModelSet's `spec.hot`).
#[derive(Clone, Debug)]
pub struct HotSet {
    pub globs: Vec<String>,
    filter: Arc<Filter>,
}

impl PartialEq for HotSet {
    fn eq(&self, other: &HotSet) -> bool {
        self.globs == other.globs
    }
}

impl HotSet {
    /// None for globs that do not compile (the ModelSet's status says so; its agents
    /// then never report hot-ready either).
    pub fn new(globs: &[String]) -> Option<HotSet> {
        let filter = Filter::new(globs, &[]).ok()?;
        Some(HotSet {
            globs: globs.to_vec(),
            filter: Arc::new(filter),
        })
    }

    /// Every model the workflow names is among the hot ones.
    pub fn covers(&self, prompt: &Value) -> bool {
        model_refs(prompt).iter().all(|r| {
            r.candidate_keys()
                .iter()
                .any(|key| self.filter.accepts(key))
        })
    }
}

impl PodModels {
    /// The pod may run this workflow.
    pub fn runs(&self, prompt: &Value) -> bool {
        match self {
            PodModels::All => true,
            PodModels::Hot(hot) => hot.covers(prompt),
        }
    }

    /// What `node` holds of `model_set`, from its agent's report: only the hot models
    /// while the report says hot-ready and not yet synced.
    pub fn of_node(
        node: Option<&str>,
        model_set: &str,
        reports: &[Arc<ModelSync>],
        hot: Option<&HotSet>,
    ) -> PodModels {
        let (Some(node), Some(hot)) = (node, hot) else {
            return PodModels::All;
        };
        let hot_only = reports.iter().any(|r| {
            r.spec.model_set == model_set
                && r.spec.report.node == node
                && r.spec.report.hot_ready
                && r.spec.report.state != NodeSyncState::Synced
        });
        if hot_only {
            PodModels::Hot(hot.clone())
        } else {
            PodModels::All
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(node: &str, state: &str, hot_ready: bool) -> Arc<ModelSync> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSync",
                "metadata": {"name": format!("sdxl.{node}"), "namespace": "team"},
                "spec": {"modelSet": "sdxl", "node": node, "revision": "r1", "state": state,
                         "bytesDone": 1, "hotReady": hot_ready}}))
            .unwrap(),
        )
    }

    #[test]
    fn a_hot_ready_node_runs_only_workflows_of_hot_models() {
        let hot = HotSet::new(&["checkpoints/sdxl*".into()]).unwrap();
        let reports = [report("n1", "Syncing", true), report("n2", "Synced", false)];
        let on = |node| PodModels::of_node(Some(node), "sdxl", &reports, Some(&hot));
        assert_eq!(on("n1"), PodModels::Hot(hot.clone()));
        assert_eq!(on("n2"), PodModels::All);
        // No report yet, another ModelSet, no hot set: nothing says the node lacks any.
        assert_eq!(on("n3"), PodModels::All);
        assert_eq!(
            PodModels::of_node(Some("n1"), "other", &reports, Some(&hot)),
            PodModels::All
        );
        assert_eq!(
            PodModels::of_node(Some("n1"), "sdxl", &reports, None),
            PodModels::All
        );

        let hot_only = on("n1");
        let sdxl = json!({"1": {"class_type": "CheckpointLoaderSimple",
                                "inputs": {"ckpt_name": "sdxl_base.safetensors"}}});
        let with_lora = json!({"1": {"class_type": "CheckpointLoaderSimple",
                                     "inputs": {"ckpt_name": "sdxl_base.safetensors"}},
                               "2": {"class_type": "LoraLoader",
                                     "inputs": {"lora_name": "style.safetensors"}}});
        assert!(hot_only.runs(&sdxl));
        assert!(!hot_only.runs(&with_lora));
        assert!(PodModels::All.runs(&with_lora));
    }
}
