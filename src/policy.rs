//! The FleetClass decides; a fleet or ModelSet asks. Pure: which class applies to a
//! namespace, and whether a spec stays within it. A refusal names the field, the value
//! and the rule, and nothing is applied (or, for a ModelSet, listed) for it.

use std::collections::BTreeMap;

use globset::{GlobBuilder, GlobMatcher};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::crd::FleetClass;
use crate::crd::comfyui::{ComfyUIDeploymentSpec, IngressScheme, IngressSpec, S3Location};
use crate::crd::fleetclass::{FleetClassSpec, IngressPolicy, S3Policy};
use crate::crd::modelset::ModelSetSpec;
use crate::render::ingress::{self, Backend};

/// Why no class applies.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClassError {
    #[error("FleetClass {0} does not exist")]
    NotFound(String),
    #[error(
        "no FleetClass is annotated sdfleet.io/is-default-class: \"true\", and spec.className is not set: ask a platform admin for a class"
    )]
    NoDefault,
    #[error("several FleetClasses are marked default ({0}); an admin must keep one")]
    SeveralDefaults(String),
    #[error(
        "FleetClass {class} is not for namespace {namespace} (its spec.namespaceSelector does not select it): name a class of this namespace in spec.className, or ask a platform admin"
    )]
    NotForNamespace { class: String, namespace: String },
}

/// A spec that asks for more than its class allows.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field} {value:?} is not allowed by FleetClass {class}: {rule}")]
pub struct Violation {
    pub class: String,
    pub field: String,
    pub value: String,
    pub rule: String,
}

/// The namespace a fleet or ModelSet lives in, as a class's selector sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The class named `name`, or the default one, if it admits `namespace` (`None`: not
/// checked, for `sdfleet render`, which has no cluster to read a namespace from).
pub fn resolve<'a>(
    name: Option<&str>,
    classes: &'a [FleetClass],
    namespace: Option<&Namespace>,
) -> Result<&'a FleetClass, ClassError> {
    let class = named_or_default(name, classes)?;
    match namespace {
        Some(ns) if !admits(&class.spec, ns) => Err(ClassError::NotForNamespace {
            class: class.metadata.name.clone().unwrap_or_default(),
            namespace: ns.name.clone(),
        }),
        _ => Ok(class),
    }
}

fn named_or_default<'a>(
    name: Option<&str>,
    classes: &'a [FleetClass],
) -> Result<&'a FleetClass, ClassError> {
    if let Some(name) = name {
        return classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| ClassError::NotFound(name.to_string()));
    }
    let defaults: Vec<&FleetClass> = classes.iter().filter(|c| c.is_default()).collect();
    match defaults.as_slice() {
        [one] => Ok(one),
        [] => Err(ClassError::NoDefault),
        many => Err(ClassError::SeveralDefaults(
            many.iter()
                .filter_map(|c| c.metadata.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// Whether the class is for `namespace` (no selector: every namespace).
pub fn admits(class: &FleetClassSpec, namespace: &Namespace) -> bool {
    class
        .namespace_selector
        .as_ref()
        .is_none_or(|s| selects(s, &namespace.labels))
}

/// A label selector's meaning, as the apiserver's: every `matchLabels` pair and every
/// expression must hold; an unknown operator selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs && expressions
}

/// Whether an object that names `class_name` (or none) follows `class`: what a change of
/// the class must reconcile again.
pub fn follows(class_name: Option<&str>, class: &FleetClass) -> bool {
    match class_name {
        Some(name) => class.metadata.name.as_deref() == Some(name),
        None => class.is_default(),
    }
}

/// `*` within one `/`-separated segment, as in a shell.
fn glob(pattern: &str) -> Option<GlobMatcher> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .ok()
        .map(|g| g.compile_matcher())
}

/// Whether `value` matches one of the patterns (annotation keys). `*` alone allows
/// anything; otherwise `*` stays within one `/`-separated segment.
fn matches_any(patterns: &[String], value: &str) -> bool {
    patterns
        .iter()
        .any(|p| p == "*" || p == value || glob(p).is_some_and(|g| g.is_match(value)))
}

/// One segment (a bucket name, a folder, a host label, a path segment) against its
/// pattern. `{namespace}` was replaced before.
fn segment_matches(pattern: &str, value: &str) -> bool {
    pattern == value
        || (!value.is_empty()
            && !pattern.contains('/')
            && glob(pattern).is_some_and(|g| g.is_match(value)))
}

fn for_namespace(pattern: &str, namespace: &str) -> String {
    pattern.replace("{namespace}", namespace)
}

/// Whether `bucket` with key prefix `prefix` lies within one of the class's locations:
/// `bucket-glob` (the whole bucket) or `bucket-glob/folder/.../` (that folder and
/// below). The prefix is compared as S3 compares it, as a string: `team-a` is not
/// within `team-a/` (it also lists `team-a-other/`).
pub fn location_allowed(patterns: &[String], namespace: &str, bucket: &str, prefix: &str) -> bool {
    let parts: Vec<&str> = prefix.split('/').collect();
    if parts.iter().any(|p| *p == ".." || *p == ".") {
        return false;
    }
    patterns.iter().any(|pattern| {
        if pattern == "*" {
            return true;
        }
        let pattern = for_namespace(pattern, namespace);
        let mut segments = pattern.trim_end_matches('/').split('/');
        let Some(bucket_pattern) = segments.next() else {
            return false;
        };
        let folders: Vec<&str> = segments.collect();
        segment_matches(bucket_pattern, bucket)
            // each folder of the pattern is a whole segment of the prefix, '/' after it
            && parts.len() > folders.len()
            && folders
                .iter()
                .zip(&parts)
                .all(|(f, p)| segment_matches(f, p))
    })
}

/// Why a URL is refused before any pattern is looked at: only plain `scheme://host[:port]/path`.
fn plain_url(value: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(value).map_err(|e| format!("not a URL ({e})"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("a URL with a user or password is refused".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a URL with a query or fragment is refused".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("a URL needs a host".into());
    }
    Ok(url)
}

/// Whether the URL `value` matches one of the patterns, compared part by part: scheme,
/// host (label by label, `*` within one label), port, path (segment by segment). The
/// URL is parsed first, so `..` segments, a user, a query or a fragment cannot make a
/// foreign host match. `Err`: why the URL itself is refused.
pub fn url_allowed(patterns: &[String], value: &str) -> Result<bool, String> {
    let url = plain_url(value)?;
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let port = url.port_or_known_default();
    let path: Vec<&str> = url.path().trim_start_matches('/').split('/').collect();
    Ok(patterns.iter().any(|pattern| {
        if pattern == "*" {
            return true;
        }
        let Some((scheme, rest)) = pattern.split_once("://") else {
            return false;
        };
        let (authority, pattern_path) = rest.split_once('/').unwrap_or((rest, ""));
        let (pattern_host, pattern_port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, Some(p)),
            _ => (authority, None),
        };
        let port_matches = match pattern_port {
            Some("*") => true,
            Some(p) => p.parse::<u16>().ok() == port,
            None => {
                url::Url::parse(&format!("{scheme}://x"))
                    .ok()
                    .and_then(|u| u.port_or_known_default())
                    == port
            }
        };
        let pattern_path: Vec<&str> = pattern_path.split('/').collect();
        scheme.eq_ignore_ascii_case(url.scheme())
            && port_matches
            && labels_match(&pattern_host.to_ascii_lowercase(), &host)
            && pattern_path.len() == path.len()
            && pattern_path
                .iter()
                .zip(&path)
                .all(|(p, v)| segment_matches(p, v))
    }))
}

/// A host name against a pattern, label by label (`*.example.com` is one label deep).
fn labels_match(pattern: &str, host: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let host: Vec<&str> = host.split('.').collect();
    pattern.len() == host.len()
        && pattern
            .iter()
            .zip(&host)
            .all(|(p, h)| segment_matches(p, h))
}

/// Whether an Ingress host is one of the class's (empty list: any).
pub fn host_allowed(patterns: &[String], namespace: &str, host: &str) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|p| {
            labels_match(
                &for_namespace(p, namespace).to_ascii_lowercase(),
                &host.to_ascii_lowercase(),
            )
        })
}

struct Check<'a> {
    class: &'a str,
    namespace: &'a str,
}

impl Check<'_> {
    fn deny(&self, field: &str, value: &str, rule: impl Into<String>) -> Violation {
        Violation {
            class: self.class.to_string(),
            field: field.to_string(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }

    /// A bucket and key prefix against the class's locations.
    fn location(
        &self,
        s3: &S3Policy,
        field: &str,
        bucket: &str,
        prefix: &str,
    ) -> Result<(), Violation> {
        if location_allowed(&s3.allowed_buckets, self.namespace, bucket, prefix) {
            return Ok(());
        }
        let allowed: Vec<String> = s3
            .allowed_buckets
            .iter()
            .map(|p| for_namespace(p, self.namespace))
            .collect();
        Err(self.deny(
            field,
            &format!("{bucket}/{prefix}"),
            format!(
                "allowed buckets and folders for namespace {} are {allowed:?}",
                self.namespace
            ),
        ))
    }

    fn url(
        &self,
        patterns: &[String],
        field: &str,
        value: &str,
        what: &str,
    ) -> Result<(), Violation> {
        match url_allowed(patterns, value) {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.deny(field, value, format!("allowed {what} are {patterns:?}"))),
            Err(why) => Err(self.deny(field, value, why)),
        }
    }
}

/// The fleet as it renders under its class: the class's node settings, the ranges its
/// gateway's webhooks may reach, and its gateway's ServiceAccount annotations, none of
/// which the fleet decides.
pub fn apply_class(
    spec: &mut ComfyUIDeploymentSpec,
    class: &FleetClassSpec,
    namespace: &str,
    fleet: &str,
) {
    spec.node_class = Some(class.node_class.clone());
    spec.ingress.class_source_cidrs = class.ingress.source_cidrs.clone();
    if let Some(gateway) = spec.gateway.as_mut() {
        gateway.class_webhook_allowed_cidrs = class.gateway.webhook_allowed_cidrs.clone();
        gateway.service_account_annotations = class
            .gateway
            .service_account_annotations
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.replace("{namespace}", namespace)
                        .replace("{fleet}", fleet),
                )
            })
            .collect();
    }
}

/// Whether a fleet in `namespace` stays within its class (`class_name` names the class
/// in messages).
pub fn check_fleet(
    spec: &ComfyUIDeploymentSpec,
    class_name: &str,
    class: &FleetClassSpec,
    namespace: &str,
) -> Result<(), Violation> {
    let check = Check {
        class: class_name,
        namespace,
    };
    if let Some(asked) = &spec.node_class
        && asked != &class.node_class
    {
        let value = asked
            .role()
            .or(asked.instance_profile())
            .unwrap_or_default()
            .to_string();
        return Err(check.deny(
            "spec.nodeClass",
            &value,
            "node role, instance profile, subnets and security groups come from the class; remove spec.nodeClass",
        ));
    }
    let gpu = &class.gpu;
    for t in &spec.gpu.instance_types {
        if !gpu.allowed_instance_types.is_empty() && !gpu.allowed_instance_types.contains(t) {
            return Err(check.deny(
                "spec.gpu.instanceTypes",
                t,
                format!("allowed types are {:?}", gpu.allowed_instance_types),
            ));
        }
    }
    for c in &spec.gpu.capacity_types {
        if !gpu.allowed_capacity_types.is_empty() && !gpu.allowed_capacity_types.contains(c) {
            return Err(check.deny(
                "spec.gpu.capacityTypes",
                c.as_str(),
                "not an allowed capacity type",
            ));
        }
    }
    if let Some(max) = gpu.max_gpus_per_fleet
        && spec.gpu.limit > max
    {
        return Err(check.deny(
            "spec.gpu.limit",
            &spec.gpu.limit.to_string(),
            format!("at most {max} GPUs per fleet"),
        ));
    }
    let locations: [(&str, &Option<S3Location>); 2] = [
        ("spec.storage.outputs", &spec.storage.outputs),
        ("spec.storage.inputs", &spec.storage.inputs),
    ];
    for (field, location) in locations {
        if let Some(l) = location {
            check.location(&class.s3, field, &l.bucket, &l.prefix)?;
        }
    }
    if let Some(gateway) = &spec.gateway {
        for bucket in &gateway.input_buckets {
            check.location(&class.s3, "spec.gateway.inputBuckets", bucket, "")?;
        }
        if let Some(key) = gateway.service_account_annotations.keys().next() {
            return Err(check.deny(
                "spec.gateway.serviceAccountAnnotations",
                key,
                "the class decides the gateway's ServiceAccount annotations (gateway.serviceAccountAnnotations of the FleetClass); remove them",
            ));
        }
        for t in &gateway.tolerations {
            check.toleration("spec.gateway.tolerations", t)?;
        }
        check.ingress("spec.gateway.ingress", &gateway.ingress, &class.ingress)?;
    }
    check.ingress("spec.ingress", &spec.ingress, &class.ingress)
}

impl Check<'_> {
    /// A toleration the fleet asks for its gateway: never every taint, never another
    /// namespace's GPU nodes.
    fn toleration(
        &self,
        field: &str,
        t: &k8s_openapi::api::core::v1::Toleration,
    ) -> Result<(), Violation> {
        let key = t.key.as_deref().unwrap_or_default();
        if key.is_empty() {
            return Err(self.deny(
                field,
                "",
                "a toleration of every taint is refused; name the taint's key",
            ));
        }
        if key == crate::names::TENANT_TAINT
            && (t.operator.as_deref() == Some("Exists")
                || t.value.as_deref() != Some(self.namespace))
        {
            return Err(self.deny(
                field,
                &format!("{key}={}", t.value.as_deref().unwrap_or("*")),
                format!("GPU nodes of other namespaces are not for this fleet; only {key}={} may be tolerated", self.namespace),
            ));
        }
        Ok(())
    }

    /// An Ingress of the fleet (`field` is where it is in the spec) against the class.
    fn ingress(
        &self,
        field: &str,
        ingress: &IngressSpec,
        policy: &IngressPolicy,
    ) -> Result<(), Violation> {
        if !ingress.enabled {
            return Ok(());
        }
        if !policy.allowed_schemes.contains(&ingress.scheme) {
            return Err(self.deny(
                &format!("{field}.scheme"),
                ingress.scheme.as_str(),
                "not an allowed scheme",
            ));
        }
        if let Some(class_name) = &policy.class_name
            && class_name != &ingress.class_name
        {
            return Err(self.deny(
                &format!("{field}.className"),
                &ingress.class_name,
                format!("fleets use IngressClass {class_name}"),
            ));
        }
        let host = ingress.host.as_deref().unwrap_or_default();
        if !policy.allowed_hosts.is_empty()
            && !host_allowed(&policy.allowed_hosts, self.namespace, host)
        {
            let allowed: Vec<String> = policy
                .allowed_hosts
                .iter()
                .map(|p| for_namespace(p, self.namespace))
                .collect();
            return Err(self.deny(
                &format!("{field}.host"),
                host,
                format!(
                    "allowed hosts for namespace {} are {allowed:?}",
                    self.namespace
                ),
            ));
        }
        for key in ingress.annotations.keys() {
            if ingress::is_operator_annotation(key) {
                return Err(self.deny(
                    &format!("{field}.annotations"),
                    key,
                    "the operator sets it; use the fleet's own field (scheme, certificateArn, idleTimeoutSeconds)",
                ));
            }
            if !matches_any(&policy.allowed_annotation_keys, key) {
                return Err(self.deny(
                    &format!("{field}.annotations"),
                    key,
                    format!("allowed keys are {:?}", policy.allowed_annotation_keys),
                ));
            }
        }
        if ingress.scheme == IngressScheme::InternetFacing {
            if policy.internet_facing_requires_certificate
                && ingress.certificate_arn.as_deref().is_none_or(str::is_empty)
            {
                return Err(self.deny(
                    &format!("{field}.certificateArn"),
                    "",
                    "an internet-facing fleet needs a certificate",
                ));
            }
            // On the annotations as the Ingress will carry them, not as the fleet wrote them.
            let rendered = ingress::annotations(&Backend::placeholder(), ingress);
            for (key, required) in &policy.internet_facing_required_annotations {
                if rendered.get(key) != Some(required) {
                    let found = rendered.get(key).map_or("(unset)", String::as_str);
                    return Err(self.deny(
                        &format!("{field}.annotations"),
                        &format!("{key}={found}"),
                        format!(
                            "an internet-facing fleet must set {key}: {required} (authentication)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Why a ModelSet may not be read: no class of its namespace applies, or its class
/// forbids what it asks.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelSetRefusal {
    #[error(transparent)]
    NoClass(#[from] ClassError),
    #[error(transparent)]
    Forbids(#[from] Violation),
}

/// Whether the ModelSet `spec` in `namespace` may be read under its class, among
/// `classes`: the controller lists it, and each node agent syncs it, only if so.
pub fn admit_modelset(
    spec: &ModelSetSpec,
    classes: &[FleetClass],
    namespace: &Namespace,
) -> Result<(), ModelSetRefusal> {
    let class = resolve(spec.class_name.as_deref(), classes, Some(namespace))?;
    let class_name = class.metadata.name.as_deref().unwrap_or_default();
    check_modelset(spec, class_name, &class.spec, &namespace.name)?;
    Ok(())
}

/// Whether a ModelSet in `namespace` stays within its class: its bucket and prefix,
/// endpoint and queue.
pub fn check_modelset(
    spec: &ModelSetSpec,
    class_name: &str,
    class: &FleetClassSpec,
    namespace: &str,
) -> Result<(), Violation> {
    let check = Check {
        class: class_name,
        namespace,
    };
    if let Some(s3) = &spec.source.s3 {
        check.location(&class.s3, "spec.source.s3", &s3.bucket, &s3.prefix)?;
        if let Some(endpoint) = s3.endpoint.as_deref().filter(|e| !e.is_empty()) {
            check.url(
                &class.s3.allowed_endpoints,
                "spec.source.s3.endpoint",
                endpoint,
                "endpoints",
            )?;
        }
    }
    for (i, file) in spec.source.urls.iter().flatten().enumerate() {
        check.url(
            &class.models.allowed_urls,
            &format!("spec.source.urls[{i}].url"),
            &file.url,
            "model URLs",
        )?;
    }
    if let Some(queue) = spec.sync.sqs_queue_url.as_deref().filter(|q| !q.is_empty()) {
        check.url(
            &class.s3.allowed_queues,
            "spec.sync.sqsQueueUrl",
            queue,
            "queues",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn class(annotations: serde_json::Value, name: &str) -> FleetClass {
        serde_json::from_value(json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "FleetClass",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "nodeClass": {"role": "NodeRole-platform"},
                "gpu": {"allowedInstanceTypes": ["g5.2xlarge"], "maxGpusPerFleet": 8},
                "s3": {"allowedBuckets": ["comfyui-*"], "allowedEndpoints": ["https://minio.internal"],
                       "allowedQueues": ["https://sqs.us-west-2.amazonaws.com/1/models-*"]},
                "ingress": {"allowedSchemes": ["internal", "internet-facing"],
                            "internetFacingRequiredAnnotations": {"alb.ingress.kubernetes.io/auth-type": "cognito"},
                            "allowedAnnotationKeys": ["alb.ingress.kubernetes.io/auth-*"]}
            }
        }))
        .unwrap()
    }

    fn fleet(spec: serde_json::Value) -> ComfyUIDeploymentSpec {
        let mut base = json!({"image": "comfyui:1", "gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 8},
            "storage": {"outputs": {"bucket": "comfyui-out"}}});
        for (k, v) in spec.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    fn refused(spec: serde_json::Value) -> Violation {
        let c = class(json!({}), "gpu");
        check_fleet(&fleet(spec), "gpu", &c.spec, "team-a").unwrap_err()
    }

    #[test]
    fn a_fleet_within_its_class_passes() {
        let c = class(json!({}), "gpu");
        check_fleet(&fleet(json!({})), "gpu", &c.spec, "team-a").unwrap();
        // Asking for exactly the class's node settings is no violation.
        let same = fleet(json!({"nodeClass": {"role": "NodeRole-platform"}}));
        check_fleet(&same, "gpu", &c.spec, "team-a").unwrap();
    }

    #[test]
    fn each_thing_outside_the_class_is_named() {
        let role = refused(json!({"nodeClass": {"role": "Admin"}}));
        assert_eq!(
            (role.field.as_str(), role.value.as_str()),
            ("spec.nodeClass", "Admin")
        );
        let sg = refused(json!({"nodeClass": {"role": "NodeRole-platform",
            "securityGroupSelectorTags": {"Name": "wide-open"}}}));
        assert_eq!(sg.field, "spec.nodeClass");
        let bucket = refused(json!({"storage": {"outputs": {"bucket": "payroll-exports"}}}));
        assert_eq!(
            (bucket.field.as_str(), bucket.value.as_str()),
            ("spec.storage.outputs", "payroll-exports/")
        );
        let types = refused(json!({"gpu": {"instanceTypes": ["p5.48xlarge"]}}));
        assert_eq!(types.value, "p5.48xlarge");
        let limit = refused(json!({"gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 64}}));
        assert_eq!(limit.field, "spec.gpu.limit");
        let annotation = refused(
            json!({"ingress": {"annotations": {"alb.ingress.kubernetes.io/group.name": "payments"}}}),
        );
        assert_eq!(annotation.value, "alb.ingress.kubernetes.io/group.name");
        let gateway = refused(json!({"gateway": {"allowUnauthenticated": true,
            "ingress": {"annotations": {"alb.ingress.kubernetes.io/group.name": "payments"}}}}));
        assert_eq!(gateway.field, "spec.gateway.ingress.annotations");
        let inputs = refused(
            json!({"gateway": {"allowUnauthenticated": true, "inputBuckets": ["payroll"]}}),
        );
        assert_eq!(
            (inputs.field.as_str(), inputs.value.as_str()),
            ("spec.gateway.inputBuckets", "payroll/")
        );
        let no_cert = refused(json!({"ingress": {"scheme": "internet-facing",
            "annotations": {"alb.ingress.kubernetes.io/auth-type": "cognito"}}}));
        assert_eq!(no_cert.field, "spec.ingress.certificateArn");
        let no_auth = refused(json!({"ingress": {"scheme": "internet-facing",
            "certificateArn": "arn:aws:acm:us-west-2:123456789012:certificate/x"}}));
        assert_eq!(no_auth.value, "alb.ingress.kubernetes.io/auth-type=(unset)");
        assert!(no_auth.to_string().contains("FleetClass gpu"), "{no_auth}");
    }

    #[test]
    fn an_internal_only_class_refuses_internet_facing() {
        let mut c = class(json!({}), "internal");
        c.spec.ingress.allowed_schemes = vec![IngressScheme::Internal];
        let v = check_fleet(
            &fleet(json!({"ingress": {"scheme": "internet-facing"}})),
            "internal",
            &c.spec,
            "team-a",
        )
        .unwrap_err();
        assert_eq!(
            (v.field.as_str(), v.value.as_str()),
            ("spec.ingress.scheme", "internet-facing")
        );
    }

    #[test]
    fn files_by_url_need_the_class_to_allow_each_url() {
        let mut c = class(json!({}), "gpu");
        let ms = |urls: &[&str]| -> ModelSetSpec {
            let files: Vec<serde_json::Value> = urls
                .iter()
                .enumerate()
                .map(|(i, u)| json!({"path": format!("checkpoints/{i}"), "url": u, "sha256": "0".repeat(64), "size": 1}))
                .collect();
            serde_json::from_value(json!({"source": {"urls": files}})).unwrap()
        };
        let hub = "https://huggingface.co/stabilityai/sdxl/resolve/main/sd_xl_base_1.0.safetensors";
        // A class that names no URL allows none.
        let none = check_modelset(&ms(&[hub]), "gpu", &c.spec, "team-a").unwrap_err();
        assert_eq!(none.field, "spec.source.urls[0].url");
        c.spec.models.allowed_urls =
            vec!["https://huggingface.co/stabilityai/*/resolve/main/*".into()];
        check_modelset(&ms(&[hub]), "gpu", &c.spec, "team-a").unwrap();
        let other = check_modelset(
            &ms(&[hub, "https://attacker.example/sd_xl_base_1.0.safetensors"]),
            "gpu",
            &c.spec,
            "team-a",
        )
        .unwrap_err();
        assert_eq!(
            (other.field.as_str(), other.value.as_str()),
            (
                "spec.source.urls[1].url",
                "https://attacker.example/sd_xl_base_1.0.safetensors"
            )
        );
    }

    #[test]
    fn a_modelset_may_use_only_allowed_buckets_endpoints_and_queues() {
        let c = class(json!({}), "gpu");
        let ms = |s3: serde_json::Value, sync: serde_json::Value| -> ModelSetSpec {
            serde_json::from_value(json!({"source": {"s3": s3}, "sync": sync})).unwrap()
        };
        check_modelset(
            &ms(json!({"bucket": "comfyui-models"}), json!({})),
            "gpu",
            &c.spec,
            "team-a",
        )
        .unwrap();
        let bucket = check_modelset(
            &ms(json!({"bucket": "other-team"}), json!({})),
            "gpu",
            &c.spec,
            "team-a",
        )
        .unwrap_err();
        assert_eq!(bucket.field, "spec.source.s3");
        let endpoint = check_modelset(
            &ms(
                json!({"bucket": "comfyui-models", "endpoint": "https://attacker.example"}),
                json!({}),
            ),
            "gpu",
            &c.spec,
            "team-a",
        )
        .unwrap_err();
        assert_eq!(endpoint.value, "https://attacker.example");
        let queue = check_modelset(
            &ms(
                json!({"bucket": "comfyui-models"}),
                json!({"sqsQueueUrl": "https://sqs.us-west-2.amazonaws.com/1/billing"}),
            ),
            "gpu",
            &c.spec,
            "team-a",
        )
        .unwrap_err();
        assert_eq!(queue.field, "spec.sync.sqsQueueUrl");
    }

    #[test]
    fn urls_are_compared_part_by_part() {
        let any = vec!["*".to_string()];
        assert_eq!(
            url_allowed(&any, "http://127.0.0.1:4566/123/queue"),
            Ok(true)
        );
        let team = vec!["https://sqs.us-west-2.amazonaws.com/1/team-*".to_string()];
        let allowed = |u: &str| url_allowed(&team, u);
        assert_eq!(
            allowed("https://sqs.us-west-2.amazonaws.com/1/team-models"),
            Ok(true)
        );
        assert_eq!(
            allowed("https://sqs.us-west-2.amazonaws.com:443/1/team-models"),
            Ok(true)
        );
        // `..` is resolved before the comparison; another account, port or scheme is not the queue.
        assert_eq!(
            allowed("https://sqs.us-west-2.amazonaws.com/1/team-a/../billing"),
            Ok(false)
        );
        assert_eq!(
            allowed("https://sqs.us-west-2.amazonaws.com/2/team-models"),
            Ok(false)
        );
        assert_eq!(
            allowed("https://sqs.us-west-2.amazonaws.com:8443/1/team-models"),
            Ok(false)
        );
        assert_eq!(
            allowed("http://sqs.us-west-2.amazonaws.com/1/team-models"),
            Ok(false)
        );
        assert_eq!(
            allowed("https://sqs.us-west-2.amazonaws.com/1/team-x/more"),
            Ok(false)
        );
        let corp = vec!["https://*.corp.example".to_string()];
        assert_eq!(url_allowed(&corp, "https://minio.corp.example"), Ok(true));
        assert_eq!(url_allowed(&corp, "https://minio.corp.example/"), Ok(true));
        // A glob over the raw string took these; parsed, each is refused or another host.
        assert!(url_allowed(&corp, "https://x@169.254.169.254?.corp.example").is_err());
        assert!(url_allowed(&corp, "https://169.254.169.254#.corp.example").is_err());
        assert!(url_allowed(&corp, "https://u:p@minio.corp.example").is_err());
        assert_eq!(url_allowed(&corp, "https://a.b.corp.example"), Ok(false));
        assert_eq!(
            url_allowed(&corp, "https://minio.corp.example.attacker.io"),
            Ok(false)
        );
        let port = vec!["http://127.0.0.1:*".to_string()];
        assert_eq!(url_allowed(&port, "http://127.0.0.1:5000"), Ok(true));
        assert_eq!(url_allowed(&port, "http://127.0.0.2:5000"), Ok(false));
    }

    #[test]
    fn buckets_and_folders_with_the_namespace() {
        let patterns = vec![
            "comfyui-*".to_string(),
            "shared-models/{namespace}/".to_string(),
        ];
        let ok = |ns: &str, b: &str, p: &str| location_allowed(&patterns, ns, b, p);
        assert!(ok("team-a", "comfyui-out", ""));
        assert!(ok("team-a", "comfyui-out", "any/where/"));
        assert!(ok("team-a", "shared-models", "team-a/"));
        assert!(ok("team-a", "shared-models", "team-a/sdxl/"));
        // Another team's folder, the whole bucket, a string prefix that lists beyond the
        // folder, and a climb out of it are all refused.
        assert!(!ok("team-a", "shared-models", "team-b/"));
        assert!(!ok("team-a", "shared-models", ""));
        assert!(!ok("team-a", "shared-models", "team-a"));
        assert!(!ok("team-a", "shared-models", "team-a-evil/"));
        assert!(!ok("team-a", "shared-models", "team-a/../team-b/"));
        assert!(!ok("team-a", "payroll", ""));
        let c = class(json!({}), "gpu");
        let mut spec = c.spec.clone();
        spec.s3.allowed_buckets = patterns.clone();
        let ms: ModelSetSpec = serde_json::from_value(
            json!({"source": {"s3": {"bucket": "shared-models", "prefix": "team-b/"}}}),
        )
        .unwrap();
        let v = check_modelset(&ms, "gpu", &spec, "team-a").unwrap_err();
        assert_eq!(
            (v.field.as_str(), v.value.as_str()),
            ("spec.source.s3", "shared-models/team-b/")
        );
        assert!(v.rule.contains("shared-models/team-a/"), "{v}");
        check_modelset(&ms, "gpu", &spec, "team-b").unwrap();
    }

    #[test]
    fn a_class_is_for_the_namespaces_it_selects() {
        let mut c = class(json!({}), "team-a-gpu");
        c.spec.namespace_selector = Some(
            serde_json::from_value(json!({
                "matchLabels": {"kubernetes.io/metadata.name": "team-a"},
                "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["sandbox"]}]
            }))
            .unwrap(),
        );
        let ns = |name: &str, labels: serde_json::Value| Namespace {
            name: name.into(),
            labels: serde_json::from_value(labels).unwrap(),
        };
        let classes = vec![c];
        let a = ns("team-a", json!({"kubernetes.io/metadata.name": "team-a"}));
        let b = ns("team-b", json!({"kubernetes.io/metadata.name": "team-b"}));
        let sandbox = ns(
            "team-a",
            json!({"kubernetes.io/metadata.name": "team-a", "tier": "sandbox"}),
        );
        assert!(resolve(Some("team-a-gpu"), &classes, Some(&a)).is_ok());
        assert_eq!(
            resolve(Some("team-a-gpu"), &classes, Some(&b)).unwrap_err(),
            ClassError::NotForNamespace {
                class: "team-a-gpu".into(),
                namespace: "team-b".into()
            }
        );
        assert!(resolve(Some("team-a-gpu"), &classes, Some(&sandbox)).is_err());
        // Without a namespace (sdfleet render) the selector is not checked.
        assert!(resolve(Some("team-a-gpu"), &classes, None).is_ok());
        let exists: LabelSelector = serde_json::from_value(
            json!({"matchExpressions": [{"key": "tenant", "operator": "Exists"}]}),
        )
        .unwrap();
        assert!(selects(
            &exists,
            &a.labels
                .clone()
                .into_iter()
                .chain([("tenant".into(), "x".into())])
                .collect()
        ));
        assert!(!selects(&exists, &a.labels));
        let unknown: LabelSelector = serde_json::from_value(
            json!({"matchExpressions": [{"key": "tenant", "operator": "Gt", "values": ["1"]}]}),
        )
        .unwrap();
        assert!(!selects(&unknown, &a.labels));
    }

    #[test]
    fn ingress_hosts_required_values_and_operator_keys() {
        let mut c = class(json!({}), "gpu");
        c.spec.ingress.allowed_hosts = vec!["*.{namespace}.comfy.example.com".into()];
        let check = |spec: serde_json::Value| check_fleet(&fleet(spec), "gpu", &c.spec, "team-a");
        check(json!({"ingress": {"host": "sdxl.team-a.comfy.example.com"}})).unwrap();
        let other =
            check(json!({"ingress": {"host": "sdxl.team-b.comfy.example.com"}})).unwrap_err();
        assert_eq!(other.field, "spec.ingress.host");
        let none = check(json!({"ingress": {}})).unwrap_err();
        assert_eq!(
            (none.field.as_str(), none.value.as_str()),
            ("spec.ingress.host", "")
        );
        let internet = |auth: &str| {
            json!({"ingress": {"scheme": "internet-facing",
            "host": "sdxl.team-a.comfy.example.com",
            "certificateArn": "arn:aws:acm:us-west-2:123456789012:certificate/x",
            "annotations": {"alb.ingress.kubernetes.io/auth-type": auth}}})
        };
        check(internet("cognito")).unwrap();
        let open = check(internet("none")).unwrap_err();
        assert_eq!(open.value, "alb.ingress.kubernetes.io/auth-type=none");
        c.spec.ingress.allowed_annotation_keys = vec!["alb.ingress.kubernetes.io/*".into()];
        let check = |spec: serde_json::Value| check_fleet(&fleet(spec), "gpu", &c.spec, "team-a");
        let scheme = check(json!({"ingress": {"host": "x.team-a.comfy.example.com",
            "annotations": {"alb.ingress.kubernetes.io/scheme": "internet-facing"}}}))
        .unwrap_err();
        assert_eq!(scheme.value, "alb.ingress.kubernetes.io/scheme");
        assert!(scheme.rule.contains("operator sets it"), "{scheme}");
    }

    #[test]
    fn the_class_decides_the_gateways_service_account() {
        let mut c = class(json!({}), "gpu");
        c.spec.gateway.service_account_annotations = BTreeMap::from([(
            "eks.amazonaws.com/role-arn".to_string(),
            "arn:aws:iam::123456789012:role/comfy-{namespace}-{fleet}".to_string(),
        )]);
        let asked = fleet(json!({"gateway": {"allowUnauthenticated": true,
            "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/Admin"}}}));
        let v = check_fleet(&asked, "gpu", &c.spec, "team-a").unwrap_err();
        assert_eq!(v.field, "spec.gateway.serviceAccountAnnotations");
        let mut plain = fleet(json!({"gateway": {"allowUnauthenticated": true}}));
        check_fleet(&plain, "gpu", &c.spec, "team-a").unwrap();
        apply_class(&mut plain, &c.spec, "team-a", "sdxl");
        assert_eq!(
            plain.gateway.unwrap().service_account_annotations["eks.amazonaws.com/role-arn"],
            "arn:aws:iam::123456789012:role/comfy-team-a-sdxl"
        );
        for (t, ok) in [
            (json!({"key": "dedicated", "operator": "Exists"}), true),
            (json!({"operator": "Exists"}), false),
            (
                json!({"key": "sdfleet.io/tenant", "operator": "Equal", "value": "team-a"}),
                true,
            ),
            (
                json!({"key": "sdfleet.io/tenant", "operator": "Equal", "value": "team-b"}),
                false,
            ),
            (
                json!({"key": "sdfleet.io/tenant", "operator": "Exists"}),
                false,
            ),
        ] {
            let spec = fleet(
                json!({"gateway": {"allowUnauthenticated": true, "tolerations": [t.clone()]}}),
            );
            assert_eq!(
                check_fleet(&spec, "gpu", &c.spec, "team-a").is_ok(),
                ok,
                "{t}"
            );
        }
    }

    #[test]
    fn the_named_class_or_the_one_default() {
        let classes = vec![
            class(json!({"sdfleet.io/is-default-class": "true"}), "standard"),
            class(json!({}), "premium"),
        ];
        assert_eq!(
            resolve(None, &classes, None)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("standard")
        );
        assert_eq!(
            resolve(Some("premium"), &classes, None)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("premium")
        );
        assert_eq!(
            resolve(Some("gold"), &classes, None).unwrap_err(),
            ClassError::NotFound("gold".into())
        );
        assert_eq!(
            resolve(None, &classes[1..], None).unwrap_err(),
            ClassError::NoDefault
        );
        let two = vec![
            classes[0].clone(),
            class(json!({"sdfleet.io/is-default-class": "true"}), "b"),
        ];
        assert!(matches!(
            resolve(None, &two, None),
            Err(ClassError::SeveralDefaults(_))
        ));
    }
}
