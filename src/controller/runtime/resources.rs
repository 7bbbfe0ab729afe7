//! What one fleet has in the cluster: its children of every kind, found by the fleet's
//! owner labels. `FleetResources` applies them (server-side apply under one field
//! manager, skipping children already as desired, so a steady fleet costs no writes),
//! prunes what is no longer wanted, and lists and deletes them for cleanup.

use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PropagationPolicy,
};
use kube::core::ApiResource;
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::names::{FleetNames, MANAGED_BY, MANAGED_BY_KEY, OWNER_NAME_KEY, OWNER_NAMESPACE_KEY};
use crate::render::nodeclass::NodeClassProvider;
use crate::render::settings::AgentSettings;
use crate::render::{Child, ChildKind};
use crate::telemetry::Metrics;

use super::cache::{Caches, dynamic_api};

pub const FIELD_MANAGER: &str = "sdfleet";

/// Deletes `name`; one already gone (deleted meanwhile, or a lagging cache) is no error.
pub async fn delete_if_present<K>(
    api: &Api<K>,
    name: &str,
    params: &DeleteParams,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match crate::latency::waiting(api.delete(name, params)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("applying {kind} {name} failed: {}", said(source))]
    Apply {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error("reading {kind} {name} failed: {}", said(source))]
    Read {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error(
        "{kind} {name} exists and belongs to {owner}: sdfleet will not change it; delete or rename it, or rename this fleet"
    )]
    NameConflict {
        kind: String,
        name: String,
        owner: String,
    },
    #[error("deleting {kind} {name} failed: {}", said(source))]
    Delete {
        kind: String,
        name: String,
        source: kube::Error,
    },
}

/// What the apiserver said, as a sentence for a condition message: its own message and
/// reason, never the debug form of its Status.
pub fn said(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            let message = status.message.trim_end_matches('.');
            match status.reason.as_str() {
                "" => format!("the API server refused it ({}): {message}", status.code),
                reason => format!(
                    "the API server refused it ({} {reason}): {message}",
                    status.code
                ),
            }
        }
        other => format!("the API server could not be reached: {other}"),
    }
}

/// What `apply` did to one child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Created,
    Updated,
}

/// Who the owner labels of a live object name, for a NameConflict message.
fn owner_of(labels: &std::collections::BTreeMap<String, String>) -> String {
    match (labels.get(OWNER_NAMESPACE_KEY), labels.get(OWNER_NAME_KEY)) {
        (Some(ns), Some(name))
            if labels.get(MANAGED_BY_KEY).map(String::as_str) == Some(MANAGED_BY) =>
        {
            format!("fleet {ns}/{name}")
        }
        _ => "no sdfleet fleet (it was not made by sdfleet)".to_string(),
    }
}

/// One fleet's children in the cluster.
pub struct FleetResources<'a> {
    pub client: &'a Client,
    pub metrics: &'a Metrics,
    pub fleet: &'a FleetNames,
    pub node_class: &'a dyn NodeClassProvider,
    pub agent: &'a AgentSettings,
    /// Where `apply` and `prune` read the live children; the apiserver when None
    /// (cleanup must never miss a child the cache has not seen yet).
    pub cache: Option<&'a Caches>,
}

impl FleetResources<'_> {
    fn api(&self, kind: ChildKind) -> (ApiResource, Api<DynamicObject>) {
        let ar = kind.api_resource(self.node_class);
        let api = dynamic_api(
            self.client,
            &ar,
            kind.namespace(&self.fleet.namespace, self.agent),
        );
        (ar, api)
    }

    /// Applies `child` unless the live object already holds every field we set.
    pub async fn apply(&self, child: &Child) -> Result<Applied, ApplyError> {
        let api = dynamic_api(self.client, &child.api, child.namespace());
        let err = |source| ApplyError::Read {
            kind: child.api.kind.clone(),
            name: child.name.clone(),
            source,
        };
        // The cache holds what sdfleet labels. A child it lacks is read from the
        // apiserver: an object of that name that sdfleet did not make (so not watched)
        // must be found, and never taken over. Only a missing child costs this read.
        let cached = self
            .cache
            .and_then(|cache| cache.child(child.kind, child.namespace(), &child.name));
        let live = match cached {
            Some(live) => Some((*live).clone()),
            None => crate::latency::waiting(api.get_opt(&child.name))
                .await
                .map_err(err)?,
        };
        if let Some(live) = &live {
            // Never take over what another fleet, or a person, made under this name.
            if !self.fleet.owns(live.labels()) {
                return Err(ApplyError::NameConflict {
                    kind: child.api.kind.clone(),
                    name: child.name.clone(),
                    owner: owner_of(live.labels()),
                });
            }
            let live = serde_json::to_value(live).unwrap_or(Value::Null);
            match first_difference(&live, &identity_free(&child.manifest)) {
                None => return Ok(Applied::Unchanged),
                Some(path) => {
                    tracing::info!(kind = %child.api.kind, name = %child.name, field = %path, "child differs; applying")
                }
            }
        }
        self.metrics.record_write("apply", &child.api.kind);
        // The child is the fleet's own (its owner labels say so; anything else was
        // refused above), cluster-scoped or not: take back every field someone changed
        // by hand, as Argo CD's self-heal does. The admin's lever is the FleetClass.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        crate::latency::waiting(api.patch(&child.name, &params, &Patch::Apply(&child.manifest)))
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

    /// The fleet's children of `kind` (none when the kind's CRD is not installed).
    pub async fn list(&self, kind: ChildKind) -> Result<Vec<DynamicObject>, ApplyError> {
        let (ar, api) = self.api(kind);
        match crate::latency::waiting(
            api.list(&ListParams::default().labels(&self.fleet.owner_selector())),
        )
        .await
        {
            Ok(list) => Ok(list.items),
            // A CRD uninstalled before the fleet: nothing of that kind can be left.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
            Err(source) => Err(ApplyError::Read {
                kind: ar.kind,
                name: self.fleet.owner_selector(),
                source,
            }),
        }
    }

    /// Deletes one child (already gone is fine).
    pub async fn delete(
        &self,
        kind: ChildKind,
        name: &str,
        propagation: PropagationPolicy,
    ) -> Result<(), ApplyError> {
        let (ar, api) = self.api(kind);
        self.metrics.record_write("delete", &ar.kind);
        let params = DeleteParams {
            propagation_policy: Some(propagation),
            ..Default::default()
        };
        delete_if_present(&api, name, &params)
            .await
            .map_err(|source| ApplyError::Delete {
                kind: ar.kind,
                name: name.to_string(),
                source,
            })
    }

    /// The fleet's children of `kind`, from the cache when there is one.
    async fn live(&self, kind: ChildKind) -> Result<Vec<DynamicObject>, ApplyError> {
        match self.cache {
            Some(cache) => Ok(cache
                .children_of(kind, |labels| self.fleet.owns(labels))
                .iter()
                .map(|o| (**o).clone())
                .collect()),
            None => self.list(kind).await,
        }
    }

    /// Deletes every child of the fleet that `desired` does not hold. Returns what it
    /// deleted, as `Kind name`.
    pub async fn prune(&self, desired: &[Child]) -> Result<Vec<String>, ApplyError> {
        self.prune_except(|kind, name| desired.iter().any(|c| c.kind == kind && c.name == name))
            .await
    }

    /// Deletes every child of the fleet but those `keep` holds. Returns what it deleted,
    /// as `Kind name`.
    pub async fn prune_except(
        &self,
        keep: impl Fn(ChildKind, &str) -> bool,
    ) -> Result<Vec<String>, ApplyError> {
        let mut pruned = Vec::new();
        for kind in ChildKind::ALL {
            for object in self.live(kind).await? {
                let name = object.name_any();
                if keep(kind, &name) || object.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                self.delete(kind, &name, PropagationPolicy::Background)
                    .await?;
                pruned.push(format!(
                    "{} {name}",
                    kind.api_resource(self.node_class).kind
                ));
            }
        }
        Ok(pruned)
    }
}

/// `desired` without apiVersion and kind: the objects a watch lists carry neither, and
/// a child read from its kind's cache is of that kind.
fn identity_free(desired: &Value) -> Value {
    let mut desired = desired.clone();
    if let Some(fields) = desired.as_object_mut() {
        fields.remove("apiVersion");
        fields.remove("kind");
    }
    desired
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
