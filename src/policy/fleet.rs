//! A fleet within its class: what it may ask (`check_fleet`) and what the class
//! decides for it (`apply_class`).

use super::Violation;
use super::check::Check;
use super::patterns::*;
use crate::crd::comfyui::{ComfyUIDeploymentSpec, IngressScheme, IngressSpec, S3Location};
use crate::crd::fleetclass::{FleetClassSpec, IngressPolicy};
use crate::render::ingress::{self, Backend};

/// The fleet as it renders under its class: the class's node settings, the ranges its
/// gateway's webhooks may reach, and its gateway's and its pods' ServiceAccount
/// annotations, none of which the fleet decides.
pub fn apply_class(
    spec: &mut ComfyUIDeploymentSpec,
    class: &FleetClassSpec,
    namespace: &str,
    fleet: &str,
) {
    spec.node_class = Some(class.node_class.clone());
    spec.ingress.class_source_cidrs = class.ingress.source_cidrs.clone();
    let annotations = |of: &std::collections::BTreeMap<String, String>| {
        of.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.replace("{namespace}", namespace)
                        .replace("{fleet}", fleet),
                )
            })
            .collect()
    };
    spec.storage.class_volume_identity = annotations(&class.s3.volume_service_account_annotations);
    if let Some(gateway) = spec.gateway.as_mut() {
        gateway.class_webhook_allowed_cidrs = class.gateway.webhook_allowed_cidrs.clone();
        gateway.service_account_annotations =
            annotations(&class.gateway.service_account_annotations);
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
    pub(super) fn toleration(
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
    pub(super) fn ingress(
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
