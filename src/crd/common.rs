//! What a fleet and its gateway share: container resources and an Ingress.

use std::collections::BTreeMap;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// CPU and memory requests and limits, as Kubernetes quantities.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerResources {
    /// e.g. `{cpu: "4", memory: 16Gi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    #[x_kube(validation = Rule::new("!('nvidia.com/gpu' in self)").message("set GPUs with gpu.count, not resources"))]
    pub requests: BTreeMap<String, String>,
    /// e.g. `{memory: 30Gi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    #[x_kube(validation = Rule::new("!('nvidia.com/gpu' in self)").message("set GPUs with gpu.count, not resources"))]
    pub limits: BTreeMap<String, String>,
}

/// Kubernetes quantities by resource name (`cpu: "4"`, `memory: 16Gi`).
fn quantity_map(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 16,
        "additionalProperties": {
            "type": "string",
            "maxLength": 64,
            "pattern": r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$",
        },
    })
}

/// How the fleet is exposed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// Create an Ingress. With `false` any Ingress created before is removed.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The IngressClass; `alb` is the AWS Load Balancer Controller's.
    #[serde(default = "default_ingress_class")]
    #[schemars(length(min = 1, max = 253))]
    pub class_name: String,
    /// `internal` (default) or `internet-facing`. ComfyUI has no authentication of its own.
    #[serde(default)]
    pub scheme: IngressScheme,
    /// Host name to match; empty matches every host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(\*\.)?[a-z0-9]([a-z0-9.\-]*[a-z0-9])?$"))]
    pub host: Option<String>,
    /// An ACM certificate ARN. When set the ALB listens on 443 with TLS and redirects 80.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^arn:aws[a-z\-]*:acm:[a-z0-9\-]+:[0-9]{12}:certificate/.+$"))]
    pub certificate_arn: Option<String>,
    /// The ALB idle timeout. ComfyUI's `/ws` websocket drops at the ALB default of 60 s.
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 1, max = 4000))]
    pub idle_timeout_seconds: i32,
    /// Extra Ingress annotations, merged over the defaults; the keys the operator sets
    /// (backend protocol, health check, target type, listeners, certificate, scheme,
    /// idle timeout) are its own and cannot be set here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Where the load balancer sends from: the class's `ingress.sourceCIDRs`, put here by
    /// the controller before it renders (`policy::apply_class`). Not in the CRD, never
    /// read from a resource (a fleet cannot widen who reaches ComfyUI).
    #[serde(skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    #[schemars(skip)]
    pub class_source_cidrs: Vec<String>,
}

impl Default for IngressSpec {
    fn default() -> Self {
        IngressSpec {
            enabled: true,
            class_name: default_ingress_class(),
            scheme: IngressScheme::default(),
            host: None,
            certificate_arn: None,
            idle_timeout_seconds: default_idle_timeout(),
            annotations: BTreeMap::new(),
            class_source_cidrs: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_ingress_class() -> String {
    "alb".into()
}
fn default_idle_timeout() -> i32 {
    4000
}

/// The ALB scheme.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum IngressScheme {
    #[default]
    Internal,
    InternetFacing,
}

impl IngressScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            IngressScheme::Internal => "internal",
            IngressScheme::InternetFacing => "internet-facing",
        }
    }
}
