//! Deleting a fleet: its children go in stages, one stage per pass, and the finalizer
//! is removed only once nothing is left. S3 data is never touched: the volumes are Retain.

use kube::ResourceExt;
use kube::api::PropagationPolicy;

use crate::controller::runtime::resources::{ApplyError, FleetResources};
use crate::render::ChildKind;

/// The order of deletion: the workload first (its pods go before their volumes), then
/// the claims, the agents and the NetworkPolicy (ComfyUI stays closed while its pods
/// run), then the volumes, then the NodePool (so Karpenter drains
/// its nodes), then the node class.
pub const STAGES: [&[ChildKind]; 5] = [
    &[
        ChildKind::Ingress,
        ChildKind::Deployment,
        ChildKind::Service,
        ChildKind::PodDisruptionBudget,
    ],
    &[
        ChildKind::PersistentVolumeClaim,
        ChildKind::AgentDaemonSet,
        ChildKind::ServiceAccount,
        ChildKind::RoleBinding,
        ChildKind::NetworkPolicy,
    ],
    &[ChildKind::PersistentVolume],
    &[ChildKind::NodePool],
    &[ChildKind::NodeClass],
];

/// One pass: deletes the children of the first stage that still has any, and returns
/// what remains of it (as `Kind/name`). Empty: every child is gone.
pub async fn cleanup(resources: &FleetResources<'_>) -> Result<Vec<String>, ApplyError> {
    for stage in STAGES {
        let mut remaining = Vec::new();
        for &kind in stage {
            let kind_name = kind.api_resource(resources.node_class).kind;
            for child in resources.list(kind).await? {
                let name = child.name_any();
                if child.metadata.deletion_timestamp.is_none() {
                    resources
                        .delete(kind, &name, PropagationPolicy::Foreground)
                        .await?;
                }
                remaining.push(format!("{kind_name}/{name}"));
            }
        }
        if !remaining.is_empty() {
            return Ok(remaining);
        }
    }
    Ok(Vec::new())
}
