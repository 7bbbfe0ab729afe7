//! Writing status: both reconcilers compute a whole status, and it is merge-patched only
//! when it differs from what is stored, so a steady object costs no writes.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::telemetry::Metrics;

/// Merge-patches `next` as the status of `name` unless it equals `previous`. `shape`
/// adjusts the body first (drop fields another writer owns, null out cleared ones).
/// With `computed_from` (the resourceVersion `previous` was read at), the apiserver
/// refuses the write with 409 when the object changed since: a status computed from a
/// cached copy never overwrites a newer one. Returns the object's new resourceVersion
/// when it wrote.
pub async fn patch_if_changed<S: Serialize + PartialEq>(
    api: &Api<DynamicObject>,
    metrics: &Metrics,
    kind: &str,
    name: &str,
    (previous, computed_from): (&S, Option<&str>),
    next: &S,
    shape: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<Option<String>, kube::Error> {
    if next == previous {
        return Ok(None);
    }
    let mut body = serde_json::to_value(next).map_err(kube::Error::SerdeError)?;
    if let Some(fields) = body.as_object_mut() {
        shape(fields);
    }
    metrics.record_write("patch-status", kind);
    let written = crate::latency::waiting(api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(match computed_from {
            Some(version) => {
                json!({ "metadata": {"resourceVersion": version}, "status": body })
            }
            None => json!({ "status": body }),
        }),
    ))
    .await?;
    Ok(Some(written.metadata.resource_version.unwrap_or_default()))
}

/// The stored status and generation of `name`, read raw: for an object that cannot be
/// read as its kind (its status may still parse). None when the object is gone.
pub async fn stored<S: DeserializeOwned + Default>(
    api: &Api<DynamicObject>,
    name: &str,
) -> Result<Option<(S, Option<i64>)>, kube::Error> {
    let Some(raw) = crate::latency::waiting(api.get_opt(name)).await? else {
        return Ok(None);
    };
    let status = raw
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    Ok(Some((status, raw.metadata.generation)))
}
