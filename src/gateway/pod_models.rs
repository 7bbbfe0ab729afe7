//! Which models a pod's node holds. A node whose ModelSet names hot models takes pods
//! once those are synced (`hotReady` in its agent's report) and syncs the rest after;
//! until then its pods get only jobs whose models are all hot, and a job that needs more
//! waits (`waiting: {reason: ModelsSyncing}`) for a node that holds it.

use std::sync::Arc;

use serde_json::Value;

use crate::crd::ModelSync;
use crate::crd::modelset::NodeSyncState;
pub use crate::sync::hot::HotSet;

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

/// Every model the workflow names is among the hot ones.
fn covers(hot: &HotSet, prompt: &Value) -> bool {
    model_refs(prompt)
        .iter()
        .all(|r| r.candidate_keys().iter().any(|key| hot.holds(key)))
}

impl PodModels {
    /// The pod may run this workflow.
    pub fn runs(&self, prompt: &Value) -> bool {
        match self {
            PodModels::All => true,
            PodModels::Hot(hot) => covers(hot, prompt),
        }
    }

    /// What `node` holds of `model_set`, from its agent's report: only the hot models
    /// (`spec.hot`'s, `hot`, and the recent checkpoints the report names) while the
    /// report says hot-ready and not yet synced.
    pub fn of_node(
        node: Option<&str>,
        model_set: &str,
        reports: &[Arc<ModelSync>],
        hot: Option<&HotSet>,
    ) -> PodModels {
        let Some(node) = node else {
            return PodModels::All;
        };
        let hot_only = reports.iter().find(|r| {
            r.spec.model_set == model_set
                && r.spec.report.node == node
                && r.spec.report.hot_ready
                && r.spec.report.state != NodeSyncState::Synced
        });
        let Some(report) = hot_only else {
            return PodModels::All;
        };
        let recent = &report.spec.report.hot_recent;
        match hot {
            Some(hot) => PodModels::Hot(hot.with_keys(recent)),
            // Hot by recent checkpoints alone: no globs.
            None => PodModels::Hot(HotSet::keys_only(recent)),
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
        let hot = HotSet::new(&["checkpoints/sdxl*".into()], &[]).unwrap();
        let reports = [report("n1", "Syncing", true), report("n2", "Synced", false)];
        let on = |node| PodModels::of_node(Some(node), "sdxl", &reports, Some(&hot));
        assert_eq!(on("n1"), PodModels::Hot(hot.clone()));
        assert_eq!(on("n2"), PodModels::All);
        // No report yet, another ModelSet: nothing says the node lacks any.
        assert_eq!(on("n3"), PodModels::All);
        assert_eq!(
            PodModels::of_node(Some("n1"), "other", &reports, Some(&hot)),
            PodModels::All
        );
        // Hot-ready while the ModelSet names no hot models (removed since): the node
        // holds only what the gateway cannot tell, so nothing with a model goes there.
        let unknown = PodModels::of_node(Some("n1"), "sdxl", &reports, None);
        assert_ne!(unknown, PodModels::All);

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

    #[test]
    fn recent_checkpoints_a_node_reports_count_as_hot_there_only() {
        let with_recent = |node: &str, keys: &[&str]| {
            let mut r = (*report(node, "Syncing", true)).clone();
            r.spec.report.hot_recent = keys.iter().map(|k| k.to_string()).collect();
            Arc::new(r)
        };
        let reports = [
            with_recent("n1", &["checkpoints/juggernaut.safetensors"]),
            with_recent("n2", &[]),
        ];
        let jugg = json!({"1": {"class_type": "CheckpointLoaderSimple",
                                "inputs": {"ckpt_name": "juggernaut.safetensors"}}});
        let sdxl = json!({"1": {"class_type": "CheckpointLoaderSimple",
                                "inputs": {"ckpt_name": "sdxl_base.safetensors"}}});
        let hot = HotSet::new(&["checkpoints/sdxl*".into()], &[]).unwrap();
        let n1 = PodModels::of_node(Some("n1"), "sdxl", &reports, Some(&hot));
        let n2 = PodModels::of_node(Some("n2"), "sdxl", &reports, Some(&hot));
        assert!(n1.runs(&jugg) && n1.runs(&sdxl));
        assert!(!n2.runs(&jugg) && n2.runs(&sdxl));
        // A ModelSet without spec.hot: the node's recent checkpoints alone, nothing else.
        let n1 = PodModels::of_node(Some("n1"), "sdxl", &reports, None);
        assert!(n1.runs(&jugg) && !n1.runs(&sdxl));
        let n2 = PodModels::of_node(Some("n2"), "sdxl", &reports, None);
        assert!(!n2.runs(&jugg) && !n2.runs(&sdxl));
    }
}
