//! Adding and removing a finalizer of ours, for both reconcilers. kube's `finalizer()`
//! helper removes it as soon as cleanup returns once, which would orphan children that
//! take several passes to delete; here the caller decides when.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::telemetry::Metrics;

/// Sets whether `obj` carries `finalizer`; returns whether it patched. The patch carries
/// the object's resourceVersion, so it fails with a conflict if the object changed since
/// it was read (and the next reconcile sees the change).
pub async fn set<K: Resource>(
    api: &Api<DynamicObject>,
    metrics: &Metrics,
    kind: &str,
    obj: &K,
    finalizer: &str,
    present: bool,
) -> Result<bool, kube::Error> {
    let current = obj.finalizers();
    if current.iter().any(|f| f == finalizer) == present {
        return Ok(false);
    }
    let mut next: Vec<&str> = current
        .iter()
        .map(String::as_str)
        .filter(|f| *f != finalizer)
        .collect();
    if present {
        next.push(finalizer);
    }
    let patch =
        json!({"metadata": {"finalizers": next, "resourceVersion": obj.resource_version()}});
    metrics.record_write("patch", kind);
    crate::latency::waiting(api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    ))
    .await?;
    Ok(true)
}
