//! The messages of the CSI spec (package `csi.v1`, spec v1.x) that a node-only plugin
//! answers, with the spec's field numbers. Fields this plugin never reads or sets are
//! left out: protobuf skips unknown fields when decoding, and an absent field encodes as
//! nothing, so the wire format is the spec's. A `oneof` is two optional fields here (on
//! the wire they are the same).

use std::collections::HashMap;

/// The gRPC service names of the spec.
pub const IDENTITY_SERVICE: &str = "csi.v1.Identity";
pub const NODE_SERVICE: &str = "csi.v1.Node";

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetPluginInfoRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetPluginInfoResponse {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub vendor_version: String,
    #[prost(map = "string, string", tag = "3")]
    pub manifest: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetPluginCapabilitiesRequest {}

/// No capability: no Controller service (inline volumes need none), no topology.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetPluginCapabilitiesResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProbeRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProbeResponse {
    /// A `google.protobuf.BoolValue`.
    #[prost(message, optional, tag = "1")]
    pub ready: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeGetCapabilitiesRequest {}

/// No capability: no staging (the kubelet calls NodePublishVolume directly), no stats.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeGetCapabilitiesResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeGetInfoRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeGetInfoResponse {
    #[prost(string, tag = "1")]
    pub node_id: String,
    /// 0: no limit.
    #[prost(int64, tag = "2")]
    pub max_volumes_per_node: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodePublishVolumeRequest {
    #[prost(string, tag = "1")]
    pub volume_id: String,
    #[prost(map = "string, string", tag = "2")]
    pub publish_context: HashMap<String, String>,
    #[prost(string, tag = "3")]
    pub staging_target_path: String,
    #[prost(string, tag = "4")]
    pub target_path: String,
    #[prost(message, optional, tag = "5")]
    pub volume_capability: Option<VolumeCapability>,
    #[prost(bool, tag = "6")]
    pub readonly: bool,
    #[prost(map = "string, string", tag = "7")]
    pub secrets: HashMap<String, String>,
    /// The pod's volumeAttributes and, with podInfoOnMount, the kubelet's
    /// `csi.storage.k8s.io/*` keys.
    #[prost(map = "string, string", tag = "8")]
    pub volume_context: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodePublishVolumeResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeUnpublishVolumeRequest {
    #[prost(string, tag = "1")]
    pub volume_id: String,
    #[prost(string, tag = "2")]
    pub target_path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeUnpublishVolumeResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeCapability {
    /// `oneof access_type`: block ...
    #[prost(message, optional, tag = "1")]
    pub block: Option<BlockVolume>,
    /// ... or mount.
    #[prost(message, optional, tag = "2")]
    pub mount: Option<MountVolume>,
    #[prost(message, optional, tag = "3")]
    pub access_mode: Option<AccessMode>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BlockVolume {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MountVolume {
    #[prost(string, tag = "1")]
    pub fs_type: String,
    #[prost(string, repeated, tag = "2")]
    pub mount_flags: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AccessMode {
    /// `VolumeCapability.AccessMode.Mode`.
    #[prost(int32, tag = "1")]
    pub mode: i32,
}
