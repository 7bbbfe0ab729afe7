//! Names, labels, taints and paths that every layer shares: the controller, render, the
//! node agent and the sync engine all take them from here, and nothing here imports
//! from the rest of the crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "sdfleet";
pub const OWNER_NAMESPACE_KEY: &str = "sdfleet.io/owner-namespace";
pub const OWNER_NAME_KEY: &str = "sdfleet.io/owner-name";
pub const FLEET_KEY: &str = "sdfleet.io/fleet";
pub const NODEPOOL_LABEL: &str = "karpenter.sh/nodepool";
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Taint of every GPU node, valued with the namespace of its fleet: a pod must tolerate
/// it with its own namespace, which the chart's admission policy enforces in tenant
/// namespaces, so no team's pod lands on (or makes Karpenter launch) another team's node.
pub const TENANT_TAINT: &str = "sdfleet.io/tenant";
pub const APP_NAME_KEY: &str = "app.kubernetes.io/name";
pub const APP_INSTANCE_KEY: &str = "app.kubernetes.io/instance";
/// The app name of the node agent's pods.
pub const AGENT_APP: &str = "sdfleet-agent";
/// On the nodes of a fleet with a ModelSet: which ModelSet they were made (and synced)
/// for. The pods select it, so a fleet that switches ModelSets never starts a pod on a
/// node that holds the old one; Karpenter replaces those nodes (the NodePool drifted).
pub const MODELSET_LABEL: &str = "sdfleet.io/modelset";
/// Labels the catalog ConfigMaps of a ModelSet with the ModelSet's name.
pub const CATALOG_OF_KEY: &str = "sdfleet.io/catalog-of";

/// Startup taint of the nodes of a fleet with a ModelSet: the node agent lifts it once
/// the node holds the models, so ComfyUI pods never start without them.
pub const MODELS_NOT_READY_TAINT: &str = "sdfleet.io/models-not-ready";

/// Where models live on a node: the RAID0 of its NVMe instance-store disks that
/// Karpenter builds on AL2023 (`instanceStorePolicy: RAID0`).
pub const MODELS_HOST_ROOT: &str = "/mnt/k8s-disks/0/sdfleet/models";

/// The models directory of one ModelSet under a models root (the host root on a node,
/// or where the agent mounts it): `<root>/<namespace>/<modelset>`.
pub fn models_dir(root: &Path, namespace: &str, model_set: &str) -> PathBuf {
    root.join(namespace).join(model_set)
}

/// The longest name a cluster-scoped child gets. NodePool names are also label values
/// (`karpenter.sh/nodepool` on nodes), which are limited to 63 characters.
const MAX_CLUSTER_NAME: usize = 63;

/// The identity of one ComfyUIDeployment, from which every child name derives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetNames {
    pub namespace: String,
    pub name: String,
}

impl FleetNames {
    pub fn new(namespace: &str, name: &str) -> FleetNames {
        FleetNames {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// `<namespace>.<name>[-suffix]`, cut to a safe length with a hash suffix when too
    /// long. A namespace is a DNS label and holds no `.`, so the first `.` separates it
    /// from the name: `team/a-b` and `team-a/b` give `team.a-b` and `team-a.b`, never
    /// the same name (a `-` between them would give `team-a-b` twice).
    pub fn cluster_scoped(&self, suffix: &str) -> String {
        let full = if suffix.is_empty() {
            format!("{}.{}", self.namespace, self.name)
        } else {
            format!("{}.{}-{}", self.namespace, self.name, suffix)
        };
        safe_name(&full, MAX_CLUSTER_NAME)
    }

    pub fn nodepool(&self) -> String {
        self.cluster_scoped("")
    }
    pub fn node_class(&self) -> String {
        self.cluster_scoped("")
    }
    pub fn deployment(&self) -> String {
        self.name.clone()
    }
    pub fn service(&self) -> String {
        self.name.clone()
    }
    pub fn ingress(&self) -> String {
        self.name.clone()
    }
    /// The node agent DaemonSet (in the operator's namespace, shared by every team, so
    /// named like a cluster-scoped child).
    pub fn agent_daemonset(&self) -> String {
        safe_name(
            &format!("sdfleet-agent-{}", self.cluster_scoped("")),
            MAX_CLUSTER_NAME,
        )
    }

    /// Whether `labels` (a live object's) name this fleet as its owner.
    pub fn owns(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.get(MANAGED_BY_KEY).map(String::as_str) == Some(MANAGED_BY)
            && labels.get(OWNER_NAMESPACE_KEY) == Some(&self.namespace)
            && labels.get(OWNER_NAME_KEY) == Some(&self.name)
    }
    /// Labels of the fleet's nodes (and tags of their instances): the fleet and its owner.
    pub fn node_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.owner_identity();
        labels.insert(FLEET_KEY.to_string(), self.nodepool());
        labels
    }

    /// Labels of the fleet's node agent pods (the DaemonSet's selector).
    pub fn agent_pod_selector(&self) -> BTreeMap<String, String> {
        let mut labels = self.owner_identity();
        labels.insert(APP_NAME_KEY.to_string(), AGENT_APP.to_string());
        labels
    }
    /// The claim of an S3 volume (`outputs` or `inputs`).
    pub fn volume_claim(&self, purpose: &str) -> String {
        format!("{}-{purpose}", self.name)
    }
    /// The cluster-scoped PersistentVolume behind `volume_claim(purpose)`.
    pub fn volume(&self, purpose: &str) -> String {
        self.cluster_scoped(purpose)
    }

    /// Labels on every child: who manages it and which resource owns it. Cluster-scoped
    /// children are found by these (they cannot carry an owner reference).
    pub fn owner_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.owner_identity();
        labels.insert(MANAGED_BY_KEY.to_string(), MANAGED_BY.to_string());
        labels
    }

    /// The owner's namespace and name as labels (also the tags of its cloud resources).
    pub fn owner_identity(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (OWNER_NAMESPACE_KEY.to_string(), self.namespace.clone()),
            (OWNER_NAME_KEY.to_string(), self.name.clone()),
        ])
    }

    /// The label selector string matching every child of this fleet.
    pub fn owner_selector(&self) -> String {
        format!(
            "{MANAGED_BY_KEY}={MANAGED_BY},{OWNER_NAMESPACE_KEY}={},{OWNER_NAME_KEY}={}",
            self.namespace, self.name
        )
    }

    /// Labels of the ComfyUI pods (the Deployment's selector).
    pub fn pod_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (APP_NAME_KEY.to_string(), "comfyui".to_string()),
            (APP_INSTANCE_KEY.to_string(), self.name.clone()),
        ])
    }

    /// The gateway's Deployment, Service, Ingress, ServiceAccount and RoleBinding (a
    /// fleet name has at most 50 characters, so this fits 63).
    pub fn gateway(&self) -> String {
        format!("{}-gateway", self.name)
    }
    /// The ComfyUI pods' own ServiceAccount, when the class mounts their S3 volumes
    /// with its role (never a gateway's: the suffixes differ).
    pub fn comfyui_service_account(&self) -> String {
        format!("{}-comfyui", self.name)
    }

    /// The gateway's job store claim.
    pub fn gateway_store(&self) -> String {
        format!("{}-gateway-store", self.name)
    }

    /// Labels of the gateway's pod: never matched by `pod_selector` (other app name).
    pub fn gateway_pod_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (APP_NAME_KEY.to_string(), "sdfleet-gateway".to_string()),
            (APP_INSTANCE_KEY.to_string(), self.name.clone()),
        ])
    }

    /// The NetworkPolicy of the ComfyUI pods.
    pub fn network_policy(&self) -> String {
        format!("{}-comfyui", self.name)
    }

    /// `pod_selector` as the string the scale subresource reports.
    pub fn pod_selector_string(&self) -> String {
        self.pod_selector()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Cuts `name` to `max` characters, replacing the tail with an 8-hex hash of the whole
/// name so that distinct long names stay distinct.
pub fn safe_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let digest = hex::encode(Sha256::digest(name.as_bytes()));
    let keep = max - 9;
    let head = name[..keep].trim_end_matches(['-', '.']);
    format!("{head}-{}", &digest[..8])
}

/// `value` as a label value (at most 63 characters; longer ones keep a hash).
pub fn label_value(value: &str) -> String {
    safe_name(value, 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept() {
        let f = FleetNames::new("studio", "sdxl");
        assert_eq!(f.nodepool(), "studio.sdxl");
        assert_eq!(f.volume("outputs"), "studio.sdxl-outputs");
        assert_eq!(f.volume_claim("outputs"), "sdxl-outputs");
        assert_eq!(f.agent_daemonset(), "sdfleet-agent-studio.sdxl");
    }

    #[test]
    fn names_that_join_to_the_same_string_stay_apart() {
        let a = FleetNames::new("team", "a-b");
        let b = FleetNames::new("team-a", "b");
        assert_ne!(a.nodepool(), b.nodepool());
        assert_ne!(a.node_class(), b.node_class());
        assert_ne!(a.volume("outputs"), b.volume("outputs"));
        assert_ne!(a.agent_daemonset(), b.agent_daemonset());
        assert!(!a.owns(&b.owner_labels()));
        assert!(a.owns(&a.owner_labels()));
    }

    #[test]
    fn long_names_are_cut_with_a_stable_distinct_hash() {
        let a = FleetNames::new(&"n".repeat(60), "fleet-a").nodepool();
        let b = FleetNames::new(&"n".repeat(60), "fleet-b").nodepool();
        assert_eq!(a.len(), 63);
        assert_ne!(a, b);
        assert_eq!(a, FleetNames::new(&"n".repeat(60), "fleet-a").nodepool());
        assert!(a.chars().last().unwrap().is_ascii_alphanumeric());
    }

    #[test]
    fn cut_never_leaves_a_trailing_separator_before_the_hash() {
        let name = format!("{}-{}", "a".repeat(53), "b".repeat(20));
        let cut = safe_name(&name, 63);
        assert!(!cut.contains("--"), "{cut}");
        assert!(cut.len() <= 63);
    }
}
