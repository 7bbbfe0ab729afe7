//! The FleetClass decides; a fleet or ModelSet asks. Pure: which class applies, and
//! whether a spec stays within it. A refusal names the field, the value and the rule, and
//! nothing is applied (or, for a ModelSet, listed) for it.

use globset::{GlobBuilder, GlobMatcher};

use crate::crd::FleetClass;
use crate::crd::comfyui::{ComfyUIDeploymentSpec, IngressScheme, IngressSpec};
use crate::crd::fleetclass::{FleetClassSpec, IngressPolicy};
use crate::crd::modelset::ModelSetSpec;

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

/// The class named `name`, or the default one.
pub fn resolve<'a>(
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

/// Whether `value` matches one of the patterns. `*` alone allows anything; otherwise `*`
/// stays within one `/`-separated segment (`https://sqs.../123/team-*`).
fn matches_any(patterns: &[String], value: &str) -> bool {
    patterns
        .iter()
        .any(|p| p == "*" || p == value || glob(p).is_some_and(|g| g.is_match(value)))
}

struct Check<'a> {
    class: &'a str,
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

    fn bucket(
        &self,
        s3: &crate::crd::fleetclass::S3Policy,
        field: &str,
        bucket: &str,
    ) -> Result<(), Violation> {
        if matches_any(&s3.allowed_buckets, bucket) {
            Ok(())
        } else {
            Err(self.deny(
                field,
                bucket,
                format!("allowed buckets are {:?}", s3.allowed_buckets),
            ))
        }
    }
}

/// The fleet as it renders under its class: the class's node settings and the ranges
/// its gateway's webhooks may reach, neither of which the fleet decides.
pub fn apply_class(spec: &mut ComfyUIDeploymentSpec, class: &FleetClassSpec) {
    spec.node_class = Some(class.node_class.clone());
    if let Some(gateway) = spec.gateway.as_mut() {
        gateway.class_webhook_allowed_cidrs = class.gateway.webhook_allowed_cidrs.clone();
    }
}

/// Whether a fleet stays within its class (`class_name` names the class in messages).
pub fn check_fleet(
    spec: &ComfyUIDeploymentSpec,
    class_name: &str,
    class: &FleetClassSpec,
) -> Result<(), Violation> {
    let check = Check { class: class_name };
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
    for (field, location) in [
        ("spec.storage.outputs.bucket", &spec.storage.outputs),
        ("spec.storage.inputs.bucket", &spec.storage.inputs),
    ] {
        if let Some(l) = location {
            check.bucket(&class.s3, field, &l.bucket)?;
        }
    }
    if let Some(gateway) = &spec.gateway {
        for bucket in &gateway.input_buckets {
            check.bucket(&class.s3, "spec.gateway.inputBuckets", bucket)?;
        }
        check.ingress("spec.gateway.ingress", &gateway.ingress, &class.ingress)?;
    }
    check.ingress("spec.ingress", &spec.ingress, &class.ingress)
}

impl Check<'_> {
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
        for key in ingress.annotations.keys() {
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
            for key in &policy.internet_facing_required_annotations {
                if !ingress.annotations.contains_key(key) {
                    return Err(self.deny(
                        &format!("{field}.annotations"),
                        key,
                        "an internet-facing fleet must set it (authentication)",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether a ModelSet stays within its class: its bucket, endpoint and queue.
pub fn check_modelset(
    spec: &ModelSetSpec,
    class_name: &str,
    class: &FleetClassSpec,
) -> Result<(), Violation> {
    let check = Check { class: class_name };
    let s3 = &spec.source.s3;
    check.bucket(&class.s3, "spec.source.s3.bucket", &s3.bucket)?;
    if let Some(endpoint) = s3.endpoint.as_deref().filter(|e| !e.is_empty())
        && !matches_any(&class.s3.allowed_endpoints, endpoint)
    {
        return Err(check.deny(
            "spec.source.s3.endpoint",
            endpoint,
            format!("allowed endpoints are {:?}", class.s3.allowed_endpoints),
        ));
    }
    if let Some(queue) = spec.sync.sqs_queue_url.as_deref().filter(|q| !q.is_empty())
        && !matches_any(&class.s3.allowed_queues, queue)
    {
        return Err(check.deny(
            "spec.sync.sqsQueueUrl",
            queue,
            format!("allowed queues are {:?}", class.s3.allowed_queues),
        ));
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
                            "internetFacingRequiredAnnotations": ["alb.ingress.kubernetes.io/auth-type"],
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
        check_fleet(&fleet(spec), "gpu", &c.spec).unwrap_err()
    }

    #[test]
    fn a_fleet_within_its_class_passes() {
        let c = class(json!({}), "gpu");
        check_fleet(&fleet(json!({})), "gpu", &c.spec).unwrap();
        // Asking for exactly the class's node settings is no violation.
        let same = fleet(json!({"nodeClass": {"role": "NodeRole-platform"}}));
        check_fleet(&same, "gpu", &c.spec).unwrap();
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
            ("spec.storage.outputs.bucket", "payroll-exports")
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
            ("spec.gateway.inputBuckets", "payroll")
        );
        let no_cert = refused(json!({"ingress": {"scheme": "internet-facing",
            "annotations": {"alb.ingress.kubernetes.io/auth-type": "cognito"}}}));
        assert_eq!(no_cert.field, "spec.ingress.certificateArn");
        let no_auth = refused(json!({"ingress": {"scheme": "internet-facing",
            "certificateArn": "arn:aws:acm:us-west-2:123456789012:certificate/x"}}));
        assert_eq!(no_auth.value, "alb.ingress.kubernetes.io/auth-type");
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
        )
        .unwrap_err();
        assert_eq!(
            (v.field.as_str(), v.value.as_str()),
            ("spec.ingress.scheme", "internet-facing")
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
        )
        .unwrap();
        let bucket = check_modelset(
            &ms(json!({"bucket": "other-team"}), json!({})),
            "gpu",
            &c.spec,
        )
        .unwrap_err();
        assert_eq!(bucket.field, "spec.source.s3.bucket");
        let endpoint = check_modelset(
            &ms(
                json!({"bucket": "comfyui-models", "endpoint": "https://attacker.example"}),
                json!({}),
            ),
            "gpu",
            &c.spec,
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
        )
        .unwrap_err();
        assert_eq!(queue.field, "spec.sync.sqsQueueUrl");
    }

    #[test]
    fn a_lone_star_allows_any_url_and_a_segment_star_only_its_segment() {
        let any = vec!["*".to_string()];
        assert!(matches_any(&any, "http://127.0.0.1:4566/123/queue"));
        let team = vec!["https://sqs.us-west-2.amazonaws.com/1/team-*".to_string()];
        assert!(matches_any(
            &team,
            "https://sqs.us-west-2.amazonaws.com/1/team-models"
        ));
        assert!(!matches_any(
            &team,
            "https://sqs.us-west-2.amazonaws.com/1/team-a/../billing"
        ));
        assert!(!matches_any(
            &team,
            "https://sqs.us-west-2.amazonaws.com/2/team-models"
        ));
    }

    #[test]
    fn the_named_class_or_the_one_default() {
        let classes = vec![
            class(json!({"sdfleet.io/is-default-class": "true"}), "standard"),
            class(json!({}), "premium"),
        ];
        assert_eq!(
            resolve(None, &classes).unwrap().metadata.name.as_deref(),
            Some("standard")
        );
        assert_eq!(
            resolve(Some("premium"), &classes)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("premium")
        );
        assert_eq!(
            resolve(Some("gold"), &classes).unwrap_err(),
            ClassError::NotFound("gold".into())
        );
        assert_eq!(
            resolve(None, &classes[1..]).unwrap_err(),
            ClassError::NoDefault
        );
        let two = vec![
            classes[0].clone(),
            class(json!({"sdfleet.io/is-default-class": "true"}), "b"),
        ];
        assert!(matches!(
            resolve(None, &two),
            Err(ClassError::SeveralDefaults(_))
        ));
    }
}
