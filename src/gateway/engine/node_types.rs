//! The node types of each fleet's ComfyUI (`/object_info`), to refuse a workflow with a
//! type the fleet lacks at submit.

use std::sync::Arc;

use serde_json::Value;

use super::Engine;
use crate::gateway::comfy::PodClient;

impl Engine {
    /// Reads a pod's node types unless its fleet's are known for this ComfyUI version.
    pub(super) async fn learn_node_types(&self, client: &PodClient, version: &str) {
        let fleet = match self.lock().pods.get(&client.name) {
            Some(p) => p.fleet.clone(),
            None => return,
        };
        let known = self
            .node_types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fleet)
            .is_some_and(|(v, _)| v == version);
        if known {
            return;
        }
        match client.node_types().await {
            Ok(types) if !types.is_empty() => {
                tracing::info!(%fleet, %version, types = types.len(), "node types read from a pod");
                self.node_types
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(fleet, (version.to_string(), Arc::new(types)));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(pod = %client.name, error = %e, "cannot read /object_info"),
        }
    }

    /// The prompt's nodes (id, type) whose type the fleet's ComfyUI does not have. Empty
    /// while no pod has told the fleet's types yet (the pod's own validation stays).
    pub fn unknown_node_types(&self, fleet: &str, prompt: &Value) -> Vec<(String, String)> {
        let types = match self
            .node_types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(fleet)
        {
            Some((_, types)) => types.clone(),
            None => return vec![],
        };
        let mut out: Vec<(String, String)> = prompt
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(id, node)| {
                let class = node.get("class_type")?.as_str()?;
                (!types.contains(class)).then(|| (id.clone(), class.to_string()))
            })
            .collect();
        out.sort();
        out
    }
}
