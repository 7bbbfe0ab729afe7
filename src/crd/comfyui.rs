//! `ComfyUIDeployment`: one GPU fleet of ComfyUI servers. The doc comments here become
//! the CRD's descriptions (`kubectl explain cud.spec.gpu`); the schema and CEL rules
//! reject bad specs at `kubectl apply`, before the controller ever sees them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::autoscaling::{AutoscalingSpec, AutoscalingStatus, DemandStatus};
pub use super::common::{ContainerResources, IngressScheme, IngressSpec};
pub use super::gateway::{GatewaySpec, GatewayStatus};

/// A GPU fleet of ComfyUI servers on Karpenter-provisioned nodes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sdfleet.io",
    version = "v1alpha1",
    kind = "ComfyUIDeployment",
    namespaced,
    shortname = "cud",
    category = "sdfleet",
    doc = "A GPU fleet of ComfyUI servers: Karpenter NodePool and node class, Deployment, Service, Ingress and S3 volumes, reconciled by sdfleet.",
    status = "ComfyUIDeploymentStatus",
    derive = "PartialEq",
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 50").message("metadata.name must be a DNS label (lowercase letters, digits and '-', starting with a letter) of at most 50 characters"),
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"GPU Types","type":"string","jsonPath":".spec.gpu.instanceTypes"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || has(self.gateway)").message("autoscaling needs spec.gateway: the gateway's queue is the demand it scales on"))]
pub struct ComfyUIDeploymentSpec {
    /// The ComfyUI container image, from your registry, e.g. `comfyui:latest`.
    #[schemars(length(min = 1))]
    pub image: String,

    /// The container entrypoint; default: the image's. Set it when the image's
    /// entrypoint is not ComfyUI's `main.py` (e.g. `[python3, main.py]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,

    /// Number of ComfyUI pods. Exposed through the scale subresource: point an HPA or
    /// KEDA at this resource, never at the Deployment it owns. Not read while
    /// `autoscaling` is set: the operator then decides the replicas and never writes
    /// this field, so a GitOps tool sees no drift.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// The port ComfyUI listens on (`--port`).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Extra ComfyUI arguments, after `--listen 0.0.0.0 --port <port>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,

    /// Extra environment variables of the ComfyUI container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Run ComfyUI as this non-root user id (and group; files on the S3 volumes too).
    /// Unset: the image's own user, as many ComfyUI images run as root. The image must
    /// let this user write ComfyUI's `user/`, `temp/` and `input/` folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2147483647))]
    pub run_as_user: Option<i64>,

    /// CPU and memory of the ComfyUI container. GPUs come from `gpu.count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ContainerResources>,

    /// A ModelSet in the same namespace whose models are synced onto the fleet's nodes
    /// and mounted read-only at `/app/ComfyUI/models`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub model_set: Option<String>,

    /// GPUs per pod, the instance types and capacity types Karpenter may launch, and
    /// the fleet's cap.
    #[serde(default)]
    pub gpu: GpuSpec,

    /// The FleetClass whose decisions this fleet follows (node identity and network,
    /// allowed GPUs, buckets and ingress); unset: the default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub class_name: Option<String>,

    /// Deprecated: node settings come from the FleetClass. When set, it must equal the
    /// class's `nodeClass`, or the fleet is refused (`ClassForbids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_class: Option<NodeClassSpec>,

    /// When Karpenter removes the fleet's nodes.
    #[serde(default)]
    pub disruption: DisruptionSpec,

    /// S3 buckets mounted into the pods with the mountpoint-s3 CSI driver.
    #[serde(default)]
    pub storage: StorageSpec,

    /// How the fleet is exposed (an ALB Ingress by default).
    #[serde(default)]
    pub ingress: IngressSpec,

    /// A job API in front of the fleet's pods (`/api/v2/jobs`: ids, per-job progress,
    /// cancel, results in the outputs bucket, webhooks, API keys). Removing it removes
    /// the gateway and its job store claim; outputs in S3 stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,

    /// Replicas from the gateway's queue (queued plus running jobs), down to zero.
    /// Unset: `replicas` pods, always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

fn default_replicas() -> i32 {
    1
}
fn default_port() -> i32 {
    8188
}

/// GPUs per pod, where they come from, and how many the fleet may hold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.limit >= self.count").message("gpu.limit must be at least gpu.count"))]
pub struct GpuSpec {
    /// GPUs per pod (`nvidia.com/gpu`).
    #[serde(default = "default_gpu_count")]
    #[schemars(range(min = 1, max = 8))]
    pub count: i32,
    /// EC2 instance types Karpenter may launch, e.g. `[g5.2xlarge, g4dn.2xlarge]`.
    #[serde(default = "default_instance_types")]
    #[schemars(schema_with = "instance_type_list")]
    pub instance_types: Vec<String>,
    /// Capacity types Karpenter may use; it prefers spot when both are listed.
    #[serde(default = "default_capacity_types")]
    #[schemars(length(min = 1, max = 3))]
    pub capacity_types: Vec<CapacityType>,
    /// The most GPUs the fleet's NodePool may hold at once (its `nvidia.com/gpu` limit).
    #[serde(default = "default_gpu_limit")]
    #[schemars(range(min = 1, max = 100000))]
    pub limit: i32,
}

impl Default for GpuSpec {
    fn default() -> Self {
        GpuSpec {
            count: default_gpu_count(),
            instance_types: default_instance_types(),
            capacity_types: default_capacity_types(),
            limit: default_gpu_limit(),
        }
    }
}

/// EC2 instance types, at least one, no duplicates.
fn instance_type_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 50,
        "x-kubernetes-list-type": "set",
        "items": {"type": "string", "maxLength": 64, "pattern": r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$"},
    })
}

fn default_gpu_count() -> i32 {
    1
}
fn default_instance_types() -> Vec<String> {
    vec!["g5.2xlarge".into(), "g4dn.2xlarge".into()]
}
fn default_capacity_types() -> Vec<CapacityType> {
    vec![CapacityType::Spot, CapacityType::OnDemand]
}
fn default_gpu_limit() -> i32 {
    8
}

/// A Karpenter capacity type.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    Spot,
    OnDemand,
    Reserved,
}

impl CapacityType {
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityType::Spot => "spot",
            CapacityType::OnDemand => "on-demand",
            CapacityType::Reserved => "reserved",
        }
    }
}

/// The EC2NodeClass of the fleet's nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.role) && self.role != '') != (has(self.instanceProfile) && self.instanceProfile != '')").message("exactly one of nodeClass.role and nodeClass.instanceProfile must be set"))]
#[x_kube(validation = Rule::new("!has(self.imagePull) || self.amiAlias.startsWith('bottlerocket@')").message("nodeClass.imagePull needs a Bottlerocket AMI (amiAlias bottlerocket@...): its data volume and its SOCI settings are Bottlerocket's"))]
pub struct NodeClassSpec {
    /// The AMI alias, `family@version`: `al2023@latest` (default), `bottlerocket@latest`, ...
    /// The models directory is on the NVMe instance store only with AL2023.
    #[serde(default = "default_ami_alias")]
    #[schemars(regex(
        pattern = r"^(al2023|al2|bottlerocket|windows2019|windows2022|windows2025)@(latest|v?[0-9][0-9a-z.\-]*)$"
    ))]
    pub ami_alias: String,
    /// The IAM role of the nodes (Karpenter makes the instance profile). Exactly one of
    /// role and instanceProfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub role: Option<String>,
    /// An existing IAM instance profile for the nodes. Exactly one of role and instanceProfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub instance_profile: Option<String>,
    /// Tags that select the nodes' subnets. Default: `karpenter.sh/discovery: <cluster name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subnet_selector_tags: BTreeMap<String, String>,
    /// Tags that select the nodes' security groups. Default: `karpenter.sh/discovery: <cluster name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub security_group_selector_tags: BTreeMap<String, String>,
    /// Size of the gp3 root volume, e.g. `100Gi`. Models live on the instance store, not here.
    #[serde(default = "default_root_volume_size")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('20Gi'))").message("rootVolumeSize must be a quantity larger than 20Gi, such as 100Gi"))]
    pub root_volume_size: String,
    /// How the ComfyUI image reaches a new node faster than a plain pull (Bottlerocket
    /// only): its data volume restored from a snapshot with the image already pulled, or
    /// SOCI's parallel pull and unpack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull: Option<ImagePull>,
}

/// One way to get the image onto a node without a plain pull.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.snapshotID) != has(self.soci)").message("exactly one of imagePull.snapshotID and imagePull.soci"))]
pub struct ImagePull {
    /// An EBS snapshot of a Bottlerocket data volume with the images already pulled (as
    /// aws-samples/bottlerocket-images-cache builds one): each node's data volume
    /// (`/dev/xvdb`) is restored from it, so the image is there at boot. The volume is
    /// at least `rootVolumeSize`.
    #[serde(
        default,
        rename = "snapshotID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = r"^snap-[0-9a-f]{8,17}$"))]
    pub snapshot_id: Option<String>,
    /// Bottlerocket's SOCI snapshotter in parallel pull-and-unpack mode: layers download
    /// in chunks and unpack at once (it needs a fast data volume: raise its throughput).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soci: Option<SociPull>,
}

/// Bottlerocket's `settings.container-runtime-plugins.soci-snapshotter.parallel-pull-unpack`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SociPull {
    /// Layers of one image downloaded at once; unset: Bottlerocket's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_downloads_per_image: Option<u32>,
    /// Layers of one image unpacked at once; unset: Bottlerocket's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_unpacks_per_image: Option<u32>,
}

impl NodeClassSpec {
    /// The role, treating an empty string as unset.
    pub fn role(&self) -> Option<&str> {
        self.role.as_deref().filter(|r| !r.is_empty())
    }
    /// The instance profile, treating an empty string as unset.
    pub fn instance_profile(&self) -> Option<&str> {
        self.instance_profile.as_deref().filter(|r| !r.is_empty())
    }
}

fn default_ami_alias() -> String {
    "al2023@latest".into()
}
fn default_root_volume_size() -> String {
    "100Gi".into()
}

/// When Karpenter removes the fleet's nodes. GPU pools consolidate only when empty:
/// utilisation-based consolidation does not see GPU use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionSpec {
    /// How long a node stays after its last ComfyUI pod left, e.g. `10m`.
    #[serde(default = "default_consolidate_after")]
    #[schemars(regex(pattern = r"^(([0-9]+(s|m|h))+|Never)$"))]
    pub consolidate_after: String,
    /// The most a node may live before it is replaced, e.g. `720h`, or `Never`.
    #[serde(default = "default_expire_after")]
    #[schemars(regex(pattern = r"^(([0-9]+(s|m|h))+|Never)$"))]
    pub expire_after: String,
}

impl Default for DisruptionSpec {
    fn default() -> Self {
        DisruptionSpec {
            consolidate_after: default_consolidate_after(),
            expire_after: default_expire_after(),
        }
    }
}

fn default_consolidate_after() -> String {
    "10m".into()
}
fn default_expire_after() -> String {
    "720h".into()
}

/// S3 buckets mounted into the ComfyUI pods (mountpoint-s3, static provisioning).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Where generated images go, mounted at `/app/ComfyUI/output`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<S3Location>,
    /// Optional input images, mounted at `/app/ComfyUI/input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<S3Location>,
    /// The annotations of the pods' own ServiceAccount, whose role mounts the volumes:
    /// the class's `s3.volumeServiceAccountAnnotations`, put here by the controller
    /// before it renders (`policy::apply_class`). Not in the CRD, never read from a
    /// resource (a fleet cannot pick the role its volumes are mounted with).
    #[serde(skip_deserializing, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub class_volume_identity: BTreeMap<String, String>,
}

/// A bucket and a prefix in it. The operator never deletes S3 data.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Location {
    /// The bucket name (3-63 lowercase letters, digits, dots and hyphens).
    #[schemars(
        regex(pattern = r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$"),
        length(min = 3, max = 63)
    )]
    #[x_kube(validation = Rule::new("!self.contains('..')").message("bucket must not contain '..'"))]
    pub bucket: String,
    /// A key prefix ending in `/`, e.g. `sdxl/`; empty for the whole bucket.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("prefix must not start with '/' or contain '..'"))]
    #[x_kube(validation = Rule::new("self == '' || self.endsWith('/')").message("prefix must end with '/' (mountpoint-s3 mounts a directory)"))]
    pub prefix: String,
    /// The bucket's region; default: the controller's `--region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]$"))]
    pub region: Option<String>,
}

/// What the controller observed. Written only when it changes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComfyUIDeploymentStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the fleet's Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods, for the scale subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The fleet's Karpenter NodePool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_pool: Option<String>,
    /// The fleet's node class (EC2NodeClass or KWOKNodeClass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_class: Option<String>,
    /// The URL of the load balancer, once the Ingress has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The fleet's job gateway, when `spec.gateway` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
    /// The gateway's demand (written by the gateway, only with `spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<DemandStatus>,
    /// The operator's scaling decisions (only with `spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// Ready, Progressing, Degraded, NodePoolReady, ModelsReady, GatewayReady and
    /// CapacityAvailable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
