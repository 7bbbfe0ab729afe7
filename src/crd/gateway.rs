//! `spec.gateway` of a ComfyUIDeployment: the job API (`sdfleet gateway`) in front of
//! the fleet's pods. The operator renders its ServiceAccount, RoleBinding, store claim,
//! Deployment, Service and Ingress. The doc comments become the CRD's descriptions.

use std::collections::BTreeMap;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{ContainerResources, IngressSpec};

/// The job gateway of a fleet: one replica with an embedded job store on its own
/// volume, or several replicas sharing a PostgreSQL store (`store.postgres`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.apiKeysSecret) != (has(self.allowUnauthenticated) && self.allowUnauthenticated)").message("set exactly one of gateway.apiKeysSecret and gateway.allowUnauthenticated: true"))]
#[x_kube(validation = Rule::new("!has(self.replicas) || self.replicas == 1 || (has(self.store) && has(self.store.postgres))").message("gateway.replicas above 1 needs a shared job store: set gateway.store.postgres (the embedded store is one file on one volume, for one replica)"))]
pub struct GatewaySpec {
    /// Gateway replicas. Above 1 needs `store.postgres`: one replica at a time holds
    /// the dispatch lease (sends the pods their jobs), the others forward API requests
    /// to it and take over within seconds when it is gone. With the embedded store the
    /// gateway is one replica, replaced with `Recreate`.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 10))]
    pub replicas: i32,
    /// A Secret in the fleet's namespace, created by the admin: each key is an API key
    /// id, each value the SHA-256 hex of that key (`printf %s "$KEY" | sha256sum`), so
    /// the cluster never holds a usable key. A key sees only the jobs it submitted; a
    /// value of `<sha256hex> admin` makes an admin key, which sees every job.
    /// Requests carry `Authorization: Bearer <key>` and are logged with the key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub api_keys_secret: Option<String>,

    /// Serve without API keys: only behind something else that authenticates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unauthenticated: bool,

    /// A Secret in the fleet's namespace whose key `secret` holds the Standard Webhooks
    /// secret (`whsec_...`) that signs `job.succeeded` and `job.failed` deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub webhook_secret: Option<String>,

    /// A ConfigMap of stored workflows (`<name>.json`, ComfyUI API format), submitted by
    /// name with per-node input overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub workflows_config_map: Option<String>,

    /// Jobs queued at most (not counting those on pods). A full queue answers 429 with
    /// `Retry-After`.
    #[serde(default = "default_queue_cap")]
    #[schemars(range(min = 1, max = 100000))]
    pub queue_cap: i32,

    /// A job that has not started this long after submit ends `expired`.
    #[serde(default = "default_job_ttl")]
    #[schemars(range(min = 10, max = 604800))]
    pub job_ttl_seconds: i32,

    /// The longest a sync request (`?wait=`) is held before it answers with the job URL.
    #[serde(default = "default_max_wait")]
    #[schemars(range(min = 1, max = 3600))]
    pub max_wait_seconds: i32,

    /// A job running longer is interrupted on its pod and fails `run_timeout`; the pod
    /// gets no new job until it has stopped it. Unset: no limit (a hung ComfyUI then
    /// holds its job until the pod is replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub max_run_seconds: Option<i32>,

    /// How a queued job picks its pod.
    #[serde(default)]
    pub placement: GatewayPlacement,

    /// Buckets `s3://` inputs may be read from (each must be allowed by the FleetClass).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub input_buckets: Vec<String>,

    /// The job store's volume (a ReadWriteOnce claim).
    #[serde(default)]
    pub store: GatewayStoreSpec,

    /// CPU and memory of the gateway container. Default: 100m / 256Mi requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ContainerResources>,

    /// The gateway's Ingress: the public entry of the fleet, so the fleet's own ComfyUI
    /// Ingress can stay off or internal. The FleetClass's ingress rules apply.
    #[serde(default)]
    pub ingress: IngressSpec,

    /// Refused when set: the FleetClass's `gateway.serviceAccountAnnotations` decide
    /// the gateway's ServiceAccount annotations (an IRSA role is the admin's choice).
    /// Kept so that a fleet that sets it gets a clear refusal, not a silent drop.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_account_annotations: BTreeMap<String, String>,

    /// Node labels the gateway's pod must match (for example a CPU node pool: the
    /// gateway needs no GPU). Default: any node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the gateway's pod, for nodes tainted for system workloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,

    /// The FleetClass's `gateway.webhookAllowedCIDRs`, copied here by the controller
    /// before it renders (`policy::apply_class`). No part of the resource: not in the
    /// CRD, never read from one (a fleet cannot widen where its webhooks go), and set
    /// only on the spec the controller renders from, which is never sent. (Not
    /// `serde(skip)`: KubeSchema's copy of this struct would warn of an unread field.)
    #[serde(skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    #[schemars(skip)]
    pub class_webhook_allowed_cidrs: Vec<String>,
}

fn default_replicas() -> i32 {
    1
}

fn default_queue_cap() -> i32 {
    100
}
fn default_job_ttl() -> i32 {
    3600
}
fn default_max_wait() -> i32 {
    300
}

/// How the gateway places jobs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GatewayPlacement {
    /// A pod that last ran the job's checkpoint first (a switch costs seconds to
    /// minutes), then the least loaded pod.
    #[default]
    Affinity,
    /// Any free pod.
    Random,
}

impl GatewayPlacement {
    /// The gateway's `--placement` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            GatewayPlacement::Affinity => "affinity",
            GatewayPlacement::Random => "random",
        }
    }
}

/// Where the gateway keeps its jobs: an embedded file on a volume of its own (the
/// default), or PostgreSQL shared by several replicas.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStoreSpec {
    /// Jobs in PostgreSQL instead of the embedded file: no volume, several replicas,
    /// rolling updates. The gateway creates and migrates its tables; one database may
    /// hold several gateways' jobs (each sees its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresStoreSpec>,
    /// The claim's size (embedded store); 10,000 jobs take a few MiB.
    #[serde(default = "default_store_size")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("store.size must be a positive quantity, such as 1Gi"))]
    pub size: String,
    /// The StorageClass; unset: the cluster's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Finished jobs (their records, output URLs and idempotency keys) are deleted this
    /// many hours after submit. Outputs in S3 are never deleted by the gateway.
    #[serde(default = "default_retention_hours")]
    #[schemars(range(min = 1, max = 8760))]
    pub retention_hours: i32,
    /// Jobs kept at most; beyond it the oldest finished ones are deleted first.
    #[serde(default = "default_max_jobs")]
    #[schemars(range(min = 100, max = 10000000))]
    pub max_jobs: i32,
}

impl Default for GatewayStoreSpec {
    fn default() -> Self {
        GatewayStoreSpec {
            postgres: None,
            size: default_store_size(),
            storage_class_name: None,
            retention_hours: default_retention_hours(),
            max_jobs: default_max_jobs(),
        }
    }
}

/// The PostgreSQL job store: a Secret in the fleet's namespace, created by the admin.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresStoreSpec {
    /// The Secret holding the connection URL
    /// (`postgres://user:password@host:5432/db?sslmode=require`).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The Secret's key holding the URL.
    #[serde(default = "default_url_key")]
    #[schemars(length(min = 1, max = 253))]
    pub url_key: String,
    /// A key of the same Secret holding PEM certificates to trust besides the system's
    /// (the RDS CA bundle, whose CA no system trusts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_key: Option<String>,
}

fn default_url_key() -> String {
    "url".into()
}

fn default_retention_hours() -> i32 {
    168
}

fn default_max_jobs() -> i32 {
    100_000
}

fn default_store_size() -> String {
    "1Gi".into()
}

/// What the controller observed of the gateway.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// The in-cluster URL of the job API (`http://<service>.<namespace>.svc`).
    pub url: String,
    /// The URL of its load balancer, once the gateway's Ingress has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Gateway pods that are ready (0 or 1).
    #[serde(default)]
    pub ready_replicas: i32,
}
