//! `FleetClass`: what an admin decides for the fleets and ModelSets of every team, the
//! way StorageClass and IngressClass do: the nodes' IAM identity and network, the GPUs a
//! fleet may ask for, the buckets, endpoints and queues it may use, and how it may be
//! exposed. Cluster-scoped; fleets and ModelSets name one (`spec.className`) or get the
//! default one.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::comfyui::{CapacityType, IngressScheme, NodeClassSpec};

/// Marks a FleetClass as the one fleets and ModelSets get when they name none.
pub const DEFAULT_CLASS_ANNOTATION: &str = "sdfleet.io/is-default-class";

/// The admin's decisions for the fleets and ModelSets of this class.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sdfleet.io",
    version = "v1alpha1",
    kind = "FleetClass",
    shortname = "fc",
    category = "sdfleet",
    doc = "What an admin decides for the fleets and ModelSets of every team: node identity and network, GPUs, buckets, endpoints, queues, ingress. Fleets and ModelSets name one in spec.className, or get the one annotated sdfleet.io/is-default-class: \"true\".",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Default","type":"string","jsonPath":".metadata.annotations.sdfleet\\.io/is-default-class"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FleetClassSpec {
    /// The namespaces whose fleets and ModelSets may use this class (labels of the
    /// Namespace, as a NetworkPolicy's `namespaceSelector`); unset: every namespace.
    /// Select on labels tenants cannot set, such as `kubernetes.io/metadata.name`, or
    /// labels only the admin may write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// The EC2NodeClass settings of every fleet of this class: IAM role or instance
    /// profile, subnets, security groups, AMI, root volume. A fleet cannot choose these.
    pub node_class: NodeClassSpec,
    /// The GPUs a fleet may ask for.
    #[serde(default)]
    pub gpu: GpuPolicy,
    /// The S3 buckets, endpoints and SQS queues fleets and ModelSets may use.
    #[serde(default)]
    pub s3: S3Policy,
    /// Where ModelSets may read models by URL.
    #[serde(default)]
    pub models: ModelsPolicy,
    /// How a fleet may be exposed.
    #[serde(default)]
    pub ingress: IngressPolicy,
    /// What the job gateways (`spec.gateway` of a fleet) of this class may reach.
    #[serde(default)]
    pub gateway: GatewayPolicy,
}

/// The GPUs a fleet may ask for.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuPolicy {
    /// Instance types a fleet may list in `gpu.instanceTypes`; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub allowed_instance_types: Vec<String>,
    /// Capacity types a fleet may list in `gpu.capacityTypes`; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_capacity_types: Vec<CapacityType>,
    /// The most GPUs one fleet's NodePool may hold (`gpu.limit`); unset: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_gpus_per_fleet: Option<i32>,
}

/// Which buckets, S3-compatible endpoints and SQS queues may be used. Entries are globs
/// (`*` within one segment); `{namespace}` stands for the namespace of the fleet or
/// ModelSet. URLs are parsed and compared part by part: scheme, host, port and path;
/// one with a user, a query or a fragment is refused.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Policy {
    /// Buckets, or folders of a bucket, fleets may mount and ModelSets may list:
    /// `comfyui-*` (the whole bucket) or `comfyui-models/{namespace}/` (that folder and
    /// below, so each team reads and writes only its own); empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub allowed_buckets: Vec<String>,
    /// S3-compatible endpoint URLs a ModelSet may name; empty: AWS S3 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub allowed_endpoints: Vec<String>,
    /// SQS queue URLs a ModelSet may listen to (the controller deletes their messages);
    /// empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub allowed_queues: Vec<String>,
    /// An IAM role that reads each ModelSet's models for its team: the controller (to
    /// list) and the node agents (to sync) assume it per ModelSet with the session tags
    /// `sdfleet-namespace=<namespace>` and `sdfleet-modelset=<name>`, so the role's
    /// policy can allow each team only its own folders
    /// (`arn:aws:s3:::models/${aws:PrincipalTag/sdfleet-namespace}/*`). Their own
    /// identities need `sts:AssumeRole` and `sts:TagSession` on it, and nothing on the
    /// buckets. Unset: they read with their own identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$"
    ))]
    pub tenant_role_arn: Option<String>,
    /// Annotations of each fleet's ComfyUI ServiceAccount (`<fleet>-comfyui`), e.g. the
    /// IRSA role `eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/comfy-volumes-{namespace}`
    /// (`{namespace}` and `{fleet}` are replaced). When set, the fleets' S3 volumes
    /// (outputs, inputs) are mounted with that ServiceAccount's role (the S3 CSI
    /// driver's `authenticationSource: pod`), not the driver's own identity shared by
    /// every team, so the role's policy can allow each team only its own folder.
    /// Unset: the driver's identity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_service_account_annotations: BTreeMap<String, String>,
}

/// Where ModelSets may read models by URL (`source.urls`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelsPolicy {
    /// URL globs a file of `source.urls` must match, as in `s3`'s lists
    /// (`https://huggingface.co/stabilityai/*/resolve/main/*`); empty: none. Link-local
    /// addresses (the instance metadata service) are refused whatever this says.
    #[serde(default, rename = "allowedURLs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub allowed_urls: Vec<String>,
}

/// How fleets of this class may be exposed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressPolicy {
    /// ALB schemes a fleet may use. Default: `internal` only.
    #[serde(default = "default_schemes")]
    pub allowed_schemes: Vec<IngressScheme>,
    /// The IngressClass every fleet must use; unset: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// An internet-facing fleet must have a certificate (TLS). Default: true.
    #[serde(default = "default_true")]
    pub internet_facing_requires_certificate: bool,
    /// Annotations an internet-facing fleet's Ingress must carry, key and value, e.g.
    /// `alb.ingress.kubernetes.io/auth-type: cognito`: ComfyUI has no authentication of
    /// its own. Checked on the Ingress as rendered, after the fleet's annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub internet_facing_required_annotations: BTreeMap<String, String>,
    /// Host names (globs, `*` within one label; `{namespace}` for the fleet's namespace)
    /// a fleet's Ingress may serve, e.g. `*.{namespace}.comfy.example.com`; empty: any.
    /// On a shared ALB group this keeps a team from taking another team's host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub allowed_hosts: Vec<String>,
    /// Annotation keys (globs) a fleet may set in `ingress.annotations`; empty: none.
    /// Keys like `alb.ingress.kubernetes.io/group.name` join another team's load
    /// balancer: leave them out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_annotation_keys: Vec<String>,
    /// Where this class's load balancers send from: the CIDRs of their subnets. A
    /// fleet's NetworkPolicy lets ComfyUI's Ingress traffic in from these only, so a pod
    /// elsewhere in the VPC cannot reach ComfyUI around the ALB's authentication. Empty:
    /// from any address (any pod may then bypass the ALB).
    #[serde(default, rename = "sourceCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("each ingress.sourceCIDRs entry must be a CIDR, such as 10.0.0.0/19"))]
    pub source_cidrs: Vec<String>,
}

/// What the job gateways of this class's fleets may reach.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPolicy {
    /// Address ranges (CIDRs, e.g. `10.20.0.0/16`) that job webhooks may be delivered
    /// to although they are refused by default: loopback, private, link-local (the
    /// instance metadata), CGNAT, unique local, multicast and reserved addresses.
    /// Anything in them is reachable by any client that may submit a job, fleet pods
    /// included: allow as little as possible. Empty: public addresses only.
    #[serde(
        default,
        rename = "webhookAllowedCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 32), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("each gateway.webhookAllowedCIDRs entry must be a CIDR, such as 10.20.0.0/16"))]
    pub webhook_allowed_cidrs: Vec<String>,
    /// Annotations of every gateway's ServiceAccount, e.g. the IRSA role
    /// `eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/comfy-{namespace}`
    /// (`{namespace}` and `{fleet}` are replaced). A fleet cannot set its own: the
    /// role is the admin's decision.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_account_annotations: BTreeMap<String, String>,
}

impl Default for IngressPolicy {
    fn default() -> Self {
        IngressPolicy {
            allowed_schemes: default_schemes(),
            class_name: None,
            internet_facing_requires_certificate: true,
            internet_facing_required_annotations: BTreeMap::new(),
            allowed_hosts: Vec::new(),
            allowed_annotation_keys: Vec::new(),
            source_cidrs: Vec::new(),
        }
    }
}

fn default_schemes() -> Vec<IngressScheme> {
    vec![IngressScheme::Internal]
}
fn default_true() -> bool {
    true
}

impl FleetClass {
    /// Whether the admin marked this class the default.
    pub fn is_default(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
            .is_some_and(|v| v == "true")
    }
}
