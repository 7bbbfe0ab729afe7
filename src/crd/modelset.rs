//! `ModelSet`: a catalog of models in S3, and how GPU nodes get them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Models in S3, listed into a catalog and synced onto the nodes of the fleets that use them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sdfleet.io",
    version = "v1alpha1",
    kind = "ModelSet",
    namespaced,
    shortname = "ms",
    category = "sdfleet",
    doc = "A catalog of ComfyUI models in S3, synced onto the NVMe instance store of every node of the fleets that use it.",
    status = "ModelSetStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Synced","type":"string","jsonPath":".status.conditions[?(@.type==\"Synced\")].status"}"#,
    validation = Rule::new("!self.metadata.name.contains('.')").message("metadata.name must hold no '.': a node's report of this ModelSet is named <modelset>.<node>, and a dot would let it be taken for another ModelSet's"),
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.revision"}"#,
    printcolumn = r#"{"name":"Models","type":"integer","jsonPath":".status.objectCount"}"#,
    printcolumn = r#"{"name":"Bytes","type":"integer","jsonPath":".status.totalBytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.sync.method != 'SSM' || has(self.source.s3)").message("sync.method SSM needs source.s3 (the SSM command runs `sdfleet sync` against a bucket)"))]
#[x_kube(validation = Rule::new("!has(self.sync.sqsQueueUrl) || self.sync.sqsQueueUrl == '' || has(self.source.s3)").message("sync.sqsQueueUrl needs source.s3 (S3 sends the events)"))]
pub struct ModelSetSpec {
    /// Where the models are.
    pub source: ModelSource,
    /// Globs over keys relative to the prefix (`checkpoints/*`, `loras/**`); empty = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub include: Vec<String>,
    /// Globs of keys to leave out, applied after `include`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub exclude: Vec<String>,
    /// Globs of the models a first job needs (`checkpoints/sdxl*`): a new node syncs
    /// these first and takes pods once they are complete and verified; the rest follows
    /// in the background at lower concurrency. Empty: the whole catalog before any pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub hot: Vec<String>,
    /// How changes are detected and how nodes are told.
    #[serde(default)]
    pub sync: SyncSpec,
    /// The FleetClass that decides which buckets, endpoints and queues this ModelSet may
    /// use; unset: the default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub class_name: Option<String>,
}

/// The source of the models: a bucket, or files by URL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.s3) != has(self.urls)").message("exactly one of source.s3 and source.urls"))]
pub struct ModelSource {
    /// A bucket (and prefix) in S3 or an S3-compatible store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Source>,
    /// Files by HTTP(S) URL (a model hub, a web server), each with its SHA-256 and
    /// size: what a node writes is checked against them. The FleetClass must allow the
    /// URLs (`models.allowedURLs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1000))]
    pub urls: Option<Vec<UrlFile>>,
}

/// One model file fetched by URL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlFile {
    /// Where it goes in the models directory, ComfyUI's layout:
    /// `checkpoints/sd_xl_base_1.0.safetensors`.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("path must not start with '/' or contain '..'"))]
    pub path: String,
    /// Where it is read from.
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub url: String,
    /// Its SHA-256, in lowercase hex.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A bucket (and prefix) in S3 or an S3-compatible store.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Source {
    /// The bucket name.
    #[schemars(
        regex(pattern = r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$"),
        length(min = 3, max = 63)
    )]
    pub bucket: String,
    /// A key prefix, e.g. `models/`; its layout below is ComfyUI's (`checkpoints/`, `loras/`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("prefix must not start with '/' or contain '..'"))]
    pub prefix: String,
    /// The bucket's region; default: the controller's `--region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]$"))]
    pub region: Option<String>,
    /// An S3-compatible endpoint URL (path-style); empty for AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(https?://[^\s]+)?$"), length(max = 512))]
    pub endpoint: Option<String>,
}

/// How changes are detected and how nodes are told.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyncSpec {
    /// `Agent` (default): sdfleet's node agent syncs each node and reports here.
    /// `SSM`: the controller runs `sdfleet sync` on the instances through SSM, as the seed's Lambda did.
    #[serde(default)]
    pub method: SyncMethod,
    /// How often the bucket is listed (also the fallback when SQS fails).
    #[serde(default = "default_poll_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(s|m|h))+$"))]
    pub poll_interval: String,
    /// An SQS queue that receives the bucket's ObjectCreated/ObjectRemoved notifications:
    /// the catalog then updates within seconds of a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(https?://[^\s]+)?$"), length(max = 512))]
    pub sqs_queue_url: Option<String>,
    /// Remove files from the nodes when their objects are removed from S3.
    #[serde(default = "default_true")]
    pub delete_removed: bool,
}

impl Default for SyncSpec {
    fn default() -> Self {
        SyncSpec {
            method: SyncMethod::default(),
            poll_interval: default_poll_interval(),
            sqs_queue_url: None,
            delete_removed: true,
        }
    }
}

fn default_poll_interval() -> String {
    "60s".into()
}
fn default_true() -> bool {
    true
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncMethod {
    #[default]
    Agent,
    #[serde(rename = "SSM")]
    Ssm,
}

/// One model of the catalog.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelEntry {
    pub key: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub size: u64,
    pub etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

/// Where the full catalog is when it is too large for the status.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CatalogRef {
    /// ConfigMaps (in order) whose `binaryData["catalog.tsv.gz"]` chunks, concatenated,
    /// are a gzip of `key<TAB>size<TAB>etag` lines.
    pub config_maps: Vec<String>,
    pub format: String,
    pub objects: u64,
}

/// One node's (or instance's) sync state.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSync {
    /// The node name (Agent) or EC2 instance id (SSM).
    pub node: String,
    #[serde(default)]
    pub revision: String,
    pub state: NodeSyncState,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// SSM: the command whose invocation is syncing this instance (polled, not resent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// Agent, with `spec.hot`: the hot models are on the node (at `revision`) and its
    /// startup taint is off, while the rest may still be syncing (`state: Syncing`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hot_ready: bool,
    /// Agent: when it first saw `nvidia.com/gpu` allocatable on the node (the device
    /// plugin registered), for the cold-start phases. The kubelet records no such time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_allocatable_at: Option<Time>,
    /// Agent: the fleets' recent checkpoints it synced with the hot models (beyond
    /// `spec.hot`), so that the gateway sends the node only jobs of models it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub hot_recent: Vec<String>,
}

/// The longest `status.nodes[].message`: every node writes one, so the object's size
/// must not grow with what an error happens to print.
pub const NODE_MESSAGE_MAX: usize = 512;

impl NodeSync {
    /// `message` cut to `NODE_MESSAGE_MAX` characters.
    pub fn bounded(message: &str) -> String {
        if message.chars().count() <= NODE_MESSAGE_MAX {
            return message.to_string();
        }
        let mut cut: String = message.chars().take(NODE_MESSAGE_MAX - 1).collect();
        cut.push('…');
        cut
    }

    /// The node holds `revision` completely (what ModelsReady, Synced, the agent and SSM
    /// all ask).
    pub fn is_synced_at(&self, revision: &str) -> bool {
        self.state == NodeSyncState::Synced && !revision.is_empty() && self.revision == revision
    }
}

impl ModelSetStatus {
    /// The entry of `node`, if it reported.
    pub fn node(&self, node: &str) -> Option<&NodeSync> {
        self.nodes.iter().find(|n| n.node == node)
    }
}

impl ModelSet {
    /// The server-side-apply body of `entries` in the status of ModelSet `name`. Each
    /// writer (an agent, the SSM method) applies under its own field manager, so none
    /// clobbers another's entries.
    pub fn node_entries_patch(name: &str, entries: &[NodeSync]) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": <ModelSet as kube::Resource>::api_version(&()),
            "kind": <ModelSet as kube::Resource>::kind(&()),
            "metadata": {"name": name},
            "status": {"nodes": entries},
        })
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeSyncState {
    Pending,
    Syncing,
    Synced,
    Failed,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Digest of the catalog (keys, sizes, ETags).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    #[serde(default)]
    pub object_count: u64,
    #[serde(default)]
    pub total_bytes: u64,
    /// Count and bytes by model type (the first key segment: checkpoints, loras, vae, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_type: BTreeMap<String, TypeSummary>,
    /// The first models of the catalog (all of them when few).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelEntry>,
    /// The full catalog, when it is larger than `models`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_ref: Option<CatalogRef>,
    /// SSM only: per instance, written by the controller. (Node agents report in
    /// `ModelSync` objects of their own, so that this object does not grow with nodes.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeSync>,
    /// Ready: the catalog is listed. Synced: every node holds the revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Count and bytes of one model type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TypeSummary {
    pub count: u64,
    pub bytes: u64,
}
