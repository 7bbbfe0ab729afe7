//! `spec.autoscaling` of a ComfyUIDeployment: replicas from the gateway's queue, down
//! to zero. The gateway writes the demand (`status.demand`, its own field manager); the
//! operator decides the Deployment's replicas from it and reports the decision in
//! `status.autoscaling`. `spec.replicas` is then not read, and never written.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The condition type that says whether the fleet's pods get nodes.
pub const CAPACITY_AVAILABLE: &str = "CapacityAvailable";

/// Queue-driven replicas. Needs `spec.gateway`: its queue is the demand.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
pub struct AutoscalingSpec {
    /// The fewest pods, 0 allowed: a fleet at 0 holds jobs (`queued`, cold start)
    /// while a node launches.
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// The most pods. The NodePool's GPU limit (`gpu.limit`) may cap it lower; the
    /// `CapacityAvailable` condition then says so.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Jobs per pod, counting queued and running ones (a queue-only signal would scale
    /// busy pods away). The gateway gives each pod one running and one prefetched job.
    #[serde(default = "default_target")]
    #[schemars(range(min = 1, max = 1000))]
    pub target_jobs_per_replica: i32,
    /// How long demand must stay below the replicas before they shrink. Pods running a
    /// job are never removed.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: i32,
    /// How long a sync request (`?wait=`) waits for a fleet that is starting from no
    /// ready pod, before it answers with the job's URL.
    #[serde(default = "default_cold_start_wait")]
    #[schemars(range(min = 0, max = 3600))]
    pub max_cold_start_wait_seconds: i32,
}

fn default_target() -> i32 {
    2
}
fn default_scale_down_delay() -> i32 {
    300
}
fn default_cold_start_wait() -> i32 {
    30
}

/// The demand, as the gateway sees it. Written by the gateway only (field manager
/// `sdfleet-gateway`); the operator reads it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DemandStatus {
    /// Jobs waiting for a pod.
    pub queued: i32,
    /// Jobs on a pod (running or prefetched).
    pub running: i32,
    /// Pods holding a job: never removed by a scale-down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub busy_pods: Vec<String>,
    /// ModelSet keys of the checkpoints the fleet's recent jobs used, most used first: a
    /// new node syncs them with the ModelSet's hot models.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub recent_models: Vec<String>,
    /// When the gateway computed this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
}

impl DemandStatus {
    pub fn jobs(&self) -> i32 {
        self.queued.saturating_add(self.running)
    }
}

/// What the operator decided, and why.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// The replicas the operator set on the Deployment.
    pub desired_replicas: i32,
    /// The last change of replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<ScalingDecision>,
    /// Since when demand has needed fewer pods than there are (the idle delay runs
    /// from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below_since: Option<Time>,
    /// The last start from no ready pod, phase by phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start: Option<ColdStart>,
}

/// One change of replicas.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecision {
    pub from: i32,
    pub to: i32,
    /// `Demand`, `Idle`, `Bounds`.
    pub reason: String,
    pub message: String,
    /// When it was decided (microseconds: the delay from a job's arrival is sub-second).
    pub time: MicroTime,
}

/// A start from no ready pod: when it began (the scale-up decision) and how long each
/// phase took once the first pod was ready.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ColdStart {
    pub started_at: Time,
    /// Set once the first pod is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Time>,
    /// Seconds from the decision to the pod's node joining (0: a node was there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_seconds: Option<f64>,
    /// Seconds from the node joining to its `Ready` condition (kubelet, network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ready_seconds: Option<f64>,
    /// Seconds from the node's `Ready` to `nvidia.com/gpu` allocatable (the device
    /// plugin), as the node agent first saw it; unset for a fleet without a ModelSet
    /// (no agent on its nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_seconds: Option<f64>,
    /// Seconds from there to the pod being scheduled on the node: the models' sync (the
    /// node's startup taint) and scheduling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_seconds: Option<f64>,
    /// Seconds from scheduling to the container running: image pull and start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_seconds: Option<f64>,
    /// Seconds from the container running to the pod ready (ComfyUI loading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_seconds: Option<f64>,
}
