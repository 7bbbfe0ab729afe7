//! Server-side apply of children under one field manager, skipping children that are
//! already as desired (so a steady fleet costs no writes), and pruning children that
//! carry the fleet's labels but are no longer wanted.

use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PropagationPolicy,
};
use kube::core::ApiResource;
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::render::Child;
use crate::telemetry::Metrics;

pub const FIELD_MANAGER: &str = "sdfleet";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error("reading {kind} {name}: {source}")]
    Read {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error("pruning {kind} {name}: {source}")]
    Prune {
        kind: String,
        name: String,
        source: kube::Error,
    },
}

/// What `apply` did to one child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Created,
    Updated,
}

pub fn api_for(client: &Client, api: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, api),
        None => Api::all_with(client.clone(), api),
    }
}

fn namespace_of(child: &Child) -> Option<&str> {
    child.manifest["metadata"]["namespace"].as_str()
}

/// Applies `child` unless the live object already holds every field we set.
pub async fn apply(
    client: &Client,
    child: &Child,
    metrics: &Metrics,
) -> Result<Applied, ApplyError> {
    let api = api_for(client, &child.api, namespace_of(child));
    let live = api
        .get_opt(&child.name)
        .await
        .map_err(|source| ApplyError::Read {
            kind: child.api.kind.clone(),
            name: child.name.clone(),
            source,
        })?;
    if let Some(live) = &live {
        let live = serde_json::to_value(live).unwrap_or(Value::Null);
        match first_difference(&live, &child.manifest) {
            None => return Ok(Applied::Unchanged),
            Some(path) => {
                tracing::info!(kind = %child.api.kind, name = %child.name, field = %path, "child differs; applying")
            }
        }
    }
    metrics.record_write("apply", &child.api.kind);
    api.patch(
        &child.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&child.manifest),
    )
    .await
    .map_err(|source| ApplyError::Apply {
        kind: child.api.kind.clone(),
        name: child.name.clone(),
        source,
    })?;
    Ok(if live.is_some() {
        Applied::Updated
    } else {
        Applied::Created
    })
}

/// Deletes every object of `api` (in `namespace`, or cluster-wide) labelled with `selector` whose name is not in `keep`.
/// Returns the names deleted.
pub async fn prune(
    client: &Client,
    api: &ApiResource,
    namespace: Option<&str>,
    selector: &str,
    keep: &[&str],
    metrics: &Metrics,
) -> Result<Vec<String>, ApplyError> {
    let scoped = api_for(client, api, namespace);
    let list = scoped
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| ApplyError::Read {
            kind: api.kind.clone(),
            name: selector.to_string(),
            source,
        })?;
    let mut pruned = Vec::new();
    for object in list.items {
        let name = object.name_any();
        if keep.contains(&name.as_str()) || object.metadata.deletion_timestamp.is_some() {
            continue;
        }
        metrics.record_write("delete", &api.kind);
        scoped
            .delete(
                &name,
                &DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..Default::default()
                },
            )
            .await
            .map_err(|source| ApplyError::Prune {
                kind: api.kind.clone(),
                name: name.clone(),
                source,
            })?;
        pruned.push(name);
    }
    Ok(pruned)
}

/// True when `live` holds every field of `desired` with the same value. Lists must have
/// the same length, item by item. Quantities the apiserver normalises (`1000m` → `1`)
/// compare unequal and cost one idempotent apply, never a wrong skip.
pub fn contains(live: &Value, desired: &Value) -> bool {
    first_difference(live, desired).is_none()
}

/// The path of the first field of `desired` that `live` lacks or holds differently.
pub fn first_difference(live: &Value, desired: &Value) -> Option<String> {
    match (live, desired) {
        (Value::Object(l), Value::Object(d)) => d.iter().find_map(|(k, dv)| match l.get(k) {
            Some(lv) => first_difference(lv, dv).map(|p| format!(".{k}{p}")),
            None => (!is_empty(dv)).then(|| format!(".{k}")),
        }),
        (Value::Array(l), Value::Array(d)) if l.len() == d.len() => l
            .iter()
            .zip(d)
            .enumerate()
            .find_map(|(i, (lv, dv))| first_difference(lv, dv).map(|p| format!("[{i}]{p}"))),
        (Value::Number(l), Value::Number(d)) if l.as_f64() == d.as_f64() => None,
        (l, d) if l == d => None,
        _ => Some(String::new()),
    }
}

/// The apiserver drops empty maps, lists and strings we send (a PV's
/// `storageClassName: ""`), so their absence is a match.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Null => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{contains, first_difference};
    use serde_json::json;

    #[test]
    fn live_with_defaults_contains_desired() {
        let desired = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "args": ["a"]}]}}}});
        let live = json!({"spec": {"replicas": 2, "revisionHistoryLimit": 10,
            "template": {"spec": {"containers": [{"name": "c", "args": ["a"], "imagePullPolicy": "Always"}]}}}});
        assert!(contains(&live, &desired));
    }

    #[test]
    fn any_difference_is_seen() {
        let desired = json!({"spec": {"replicas": 2, "list": ["a", "b"]}});
        assert!(!contains(
            &json!({"spec": {"replicas": 3, "list": ["a", "b"]}}),
            &desired
        ));
        assert!(!contains(
            &json!({"spec": {"replicas": 2, "list": ["a"]}}),
            &desired
        ));
        assert!(!contains(&json!({"spec": {"list": ["a", "b"]}}), &desired));
        assert!(contains(
            &json!({"spec": {"replicas": 2, "list": ["a", "b"]}}),
            &json!({"spec": {"volumes": []}})
        ));
        assert!(contains(
            &json!({"spec": {}}),
            &json!({"spec": {"storageClassName": ""}})
        ));
        assert!(!contains(
            &json!({"spec": {"storageClassName": "gp3"}}),
            &json!({"spec": {"storageClassName": ""}})
        ));
        assert_eq!(
            first_difference(&json!({"a": [{"b": 1}]}), &json!({"a": [{"b": 2}]})).as_deref(),
            Some(".a[0].b")
        );
    }
}
