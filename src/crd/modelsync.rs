//! `ModelSync`: one node's report of one ModelSet, written by that node's agent.
//!
//! Reports live in small objects of their own, not in the ModelSet's status, so that no
//! object grows with the number of nodes: a node's report is one small write that reaches
//! only the controller's watch, where a `status.nodes` list of 1,000 entries made every
//! report a write of the whole list, sent to every agent watching the ModelSet. Like a
//! Lease, the object holds its data in `spec` (one server-side apply creates or updates
//! it). It is owned by its Node, so the garbage collector removes the report of a node
//! that is gone (nodes come and go with the fleet's scale); the reports of a deleted
//! ModelSet are deleted by the controller, before it lets the ModelSet go. (The garbage
//! collector removes an object only once *all* of its owners are gone, so the ModelSet
//! cannot be a second owner.)

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::modelset::{ModelSet, NodeSync};
use crate::names::{MANAGED_BY, MANAGED_BY_KEY, MODELSET_LABEL, label_value, safe_name};

/// The label naming the node a report is from.
pub const NODE_LABEL: &str = "sdfleet.io/node";

#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sdfleet.io",
    version = "v1alpha1",
    kind = "ModelSync",
    namespaced,
    shortname = "msync",
    category = "sdfleet",
    doc = "One node's sync of one ModelSet, reported by the node's agent (read-only for users).",
    derive = "PartialEq",
    printcolumn = r#"{"name":"ModelSet","type":"string","jsonPath":".spec.modelSet"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".spec.state"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSyncSpec {
    /// The ModelSet (in this namespace) the report is about.
    pub model_set: String,
    /// The node's state: its name, the revision it holds or syncs, bytes, a message.
    #[serde(flatten)]
    pub report: NodeSync,
}

impl ModelSync {
    /// The name of `node`'s report of ModelSet `model_set`. A ModelSet name holds no `.`
    /// (its CRD refuses one), so the first dot parts the two and no pair shares a name.
    pub fn name_for(model_set: &str, node: &str) -> String {
        safe_name(&format!("{model_set}.{node}"), 253)
    }

    /// The server-side-apply body of a report: owned by the node (the garbage collector
    /// removes it when the node goes), labelled for the watches, with the
    /// fleet's owner labels copied from the node, so the fleet it concerns is found
    /// without a lookup.
    pub fn apply_body(
        model_set: &ModelSet,
        node: &k8s_openapi::api::core::v1::Node,
        fleet_labels: &std::collections::BTreeMap<String, String>,
        report: &NodeSync,
    ) -> serde_json::Value {
        use kube::ResourceExt;
        let ms_name = model_set.name_any();
        let mut labels = fleet_labels.clone();
        labels.insert(MANAGED_BY_KEY.into(), MANAGED_BY.into());
        labels.insert(MODELSET_LABEL.into(), label_value(&ms_name));
        labels.insert(NODE_LABEL.into(), label_value(&report.node));
        let owner = |api_version: &str, kind: &str, name: String, uid: Option<String>| {
            serde_json::json!({"apiVersion": api_version, "kind": kind, "name": name,
                "uid": uid.unwrap_or_default()})
        };
        serde_json::json!({
            "apiVersion": <ModelSync as kube::Resource>::api_version(&()),
            "kind": <ModelSync as kube::Resource>::kind(&()),
            "metadata": {
                "name": Self::name_for(&ms_name, &report.node),
                "labels": labels,
                "ownerReferences": [
                    owner("v1", "Node", node.name_any(), node.metadata.uid.clone()),
                ],
            },
            "spec": ModelSyncSpec { model_set: ms_name, report: report.clone() },
        })
    }
}
