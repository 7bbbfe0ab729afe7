//! Status conditions: the reasons are an enum, and `lastTransitionTime` moves only when
//! a condition's status flips, so a steady fleet's status never changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const NODEPOOL_READY: &str = "NodePoolReady";
pub const MODELS_READY: &str = "ModelsReady";
pub const GATEWAY_READY: &str = "GatewayReady";
pub use crate::crd::autoscaling::CAPACITY_AVAILABLE;

/// Every reason sdfleet writes into a condition. The README's reasons table has one
/// row per variant (a unit test checks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// All pods are ready.
    AllReplicasReady,
    /// `replicas: 0`: nothing runs, by request.
    ScaledToZero,
    /// Pods exist but not all are ready yet (nodes launching, images pulling, models loading).
    WaitingForPods,
    /// The Deployment is rolling out or scaling.
    RollingOut,
    /// The rollout is complete.
    RolloutComplete,
    /// A CRD, CSIDriver or IngressClass the fleet needs is not installed.
    MissingDependency,
    /// The spec cannot be built (only for specs the schema could not catch).
    InvalidSpec,
    /// Applying a child failed (RBAC, webhook, conflict); retried with backoff.
    ApplyFailed,
    /// No FleetClass applies: the named one does not exist, or there is no single default.
    FleetClassNotFound,
    /// The spec asks for more than its FleetClass allows; the message names the field.
    ClassForbids,
    /// A child's name is taken by an object of another fleet, or one sdfleet did not make.
    NameConflict,
    /// Nothing is wrong.
    AsExpected,
    /// The NodePool reports Ready.
    NodePoolReady,
    /// The NodePool reports not Ready (e.g. its node class is not ready).
    NodePoolNotReady,
    /// The NodePool has no status yet (Karpenter not running, or not yet reconciled).
    NodePoolPending,
    /// ModelSet: the bucket was listed into the catalog.
    Listed,
    /// ModelSet: listing the bucket failed (permissions, bucket, endpoint); retried with backoff.
    ListFailed,
    /// ModelSet: no node has reported yet (no fleet uses it, or its nodes are launching).
    NoNodes,
    /// ModelSet: some nodes are still syncing the revision.
    Syncing,
    /// ModelSet: a node failed to sync; the message names it and why.
    SyncFailed,
    /// ModelSet: every node holds the revision.
    AllNodesSynced,
    /// ComfyUIDeployment: the fleet's ModelSet does not exist.
    ModelSetNotFound,
    /// ComfyUIDeployment: every node of the fleet holds the ModelSet's revision.
    ModelsSynced,
    /// ComfyUIDeployment: no ModelSet is referenced.
    NoModelSet,
    /// ComfyUIDeployment: the job gateway's pod is ready.
    GatewayReady,
    /// ComfyUIDeployment: the job gateway's pod is not ready yet (or has no node).
    GatewayNotReady,
    /// ComfyUIDeployment (autoscaling): every pod has a node, or one is launching.
    CapacityAvailable,
    /// ComfyUIDeployment (autoscaling): pods wait for nodes that cannot come: the
    /// NodePool is at its GPU limit, or launches fail; the message says which.
    NoCapacity,
}

impl Reason {
    /// Every reason, for documentation checks.
    pub const ALL: [Reason; 28] = [
        Reason::AllReplicasReady,
        Reason::ScaledToZero,
        Reason::WaitingForPods,
        Reason::RollingOut,
        Reason::RolloutComplete,
        Reason::MissingDependency,
        Reason::InvalidSpec,
        Reason::ApplyFailed,
        Reason::FleetClassNotFound,
        Reason::ClassForbids,
        Reason::NameConflict,
        Reason::AsExpected,
        Reason::NodePoolReady,
        Reason::NodePoolNotReady,
        Reason::NodePoolPending,
        Reason::Listed,
        Reason::ListFailed,
        Reason::NoNodes,
        Reason::Syncing,
        Reason::SyncFailed,
        Reason::AllNodesSynced,
        Reason::ModelSetNotFound,
        Reason::ModelsSynced,
        Reason::NoModelSet,
        Reason::GatewayReady,
        Reason::GatewayNotReady,
        Reason::CapacityAvailable,
        Reason::NoCapacity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AllReplicasReady => "AllReplicasReady",
            Reason::ScaledToZero => "ScaledToZero",
            Reason::WaitingForPods => "WaitingForPods",
            Reason::RollingOut => "RollingOut",
            Reason::RolloutComplete => "RolloutComplete",
            Reason::MissingDependency => "MissingDependency",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ApplyFailed => "ApplyFailed",
            Reason::FleetClassNotFound => "FleetClassNotFound",
            Reason::ClassForbids => "ClassForbids",
            Reason::NameConflict => "NameConflict",
            Reason::AsExpected => "AsExpected",
            Reason::NodePoolReady => "NodePoolReady",
            Reason::NodePoolNotReady => "NodePoolNotReady",
            Reason::NodePoolPending => "NodePoolPending",
            Reason::Listed => "Listed",
            Reason::ListFailed => "ListFailed",
            Reason::NoNodes => "NoNodes",
            Reason::Syncing => "Syncing",
            Reason::SyncFailed => "SyncFailed",
            Reason::AllNodesSynced => "AllNodesSynced",
            Reason::ModelSetNotFound => "ModelSetNotFound",
            Reason::ModelsSynced => "ModelsSynced",
            Reason::NoModelSet => "NoModelSet",
            Reason::GatewayReady => "GatewayReady",
            Reason::GatewayNotReady => "GatewayNotReady",
            Reason::CapacityAvailable => "CapacityAvailable",
            Reason::NoCapacity => "NoCapacity",
        }
    }
}

/// A condition as computed this reconcile, before its transition time is settled.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: Reason,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: Reason,
        message: impl Into<String>,
    ) -> DesiredCondition {
        DesiredCondition {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions to write: `observed`, keeping each previous `lastTransitionTime`
/// whose status did not flip. `now` is used only for flips and new conditions.
pub fn merge(
    previous: &[Condition],
    observed: &[DesiredCondition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    observed
        .iter()
        .map(|o| {
            let status = if o.status { "True" } else { "False" }.to_string();
            let last = previous
                .iter()
                .find(|p| p.type_ == o.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: o.type_.to_string(),
                status,
                reason: o.reason.as_str().to_string(),
                message: o.message.clone(),
                last_transition_time: last,
                observed_generation: generation,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_reason() {
        let readme = include_str!("../../../README.md");
        let missing: Vec<_> = Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .filter(|r| !readme.contains(&format!("`{r}` |")))
            .collect();
        assert!(missing.is_empty(), "README reasons table lacks {missing:?}");
    }

    fn time(s: &str) -> Time {
        serde_json::from_value(serde_json::json!(s)).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let t0 = time("2026-01-01T00:00:00Z");
        let t1 = time("2026-01-01T00:05:00Z");
        let first = merge(
            &[],
            &[DesiredCondition::new(
                READY,
                false,
                Reason::WaitingForPods,
                "0/1",
            )],
            Some(1),
            &t0,
        );
        assert_eq!(first[0].last_transition_time, t0);

        // Same status, new message: time kept.
        let same = merge(
            &first,
            &[DesiredCondition::new(
                READY,
                false,
                Reason::WaitingForPods,
                "0/2",
            )],
            Some(2),
            &t1,
        );
        assert_eq!(same[0].last_transition_time, t0);
        assert_eq!(same[0].message, "0/2");

        let flipped = merge(
            &same,
            &[DesiredCondition::new(
                READY,
                true,
                Reason::AllReplicasReady,
                "2/2",
            )],
            Some(2),
            &t1,
        );
        assert_eq!(flipped[0].last_transition_time, t1);
        assert_eq!(flipped[0].status, "True");
        assert_eq!(flipped[0].reason, "AllReplicasReady");
    }
}
