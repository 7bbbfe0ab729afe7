//! A ModelSet within its class: its bucket and prefix, endpoint, queue, or URLs.

use super::check::Check;
use super::{ClassError, Namespace, Violation, resolve};
use crate::crd::FleetClass;
use crate::crd::fleetclass::FleetClassSpec;
use crate::crd::modelset::ModelSetSpec;

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
/// Returns the role its class reads models as (`s3.tenantRoleArn`), if any.
pub fn admit_modelset(
    spec: &ModelSetSpec,
    classes: &[FleetClass],
    namespace: &Namespace,
) -> Result<Option<String>, ModelSetRefusal> {
    let class = resolve(spec.class_name.as_deref(), classes, Some(namespace))?;
    let class_name = class.metadata.name.as_deref().unwrap_or_default();
    check_modelset(spec, class_name, &class.spec, &namespace.name)?;
    Ok(class.spec.s3.tenant_role_arn.clone())
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
