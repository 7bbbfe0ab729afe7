//! The kinds of child a fleet has: each knows its API and where it lives.

use k8s_openapi::api::{
    apps::v1 as apps, core::v1 as core, networking::v1 as net, rbac::v1 as rbac,
};
use kube::core::ApiResource;
use serde_json::Value;

use super::nodeclass::NodeClassProvider;
use super::nodepool;
use super::settings::AgentSettings;

/// Which kind of child. The order is the order of `ChildKind::ALL` and of `build`'s output;
/// deletion has its own stages (the controller's cleanup).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChildKind {
    NodeClass,
    NodePool,
    PersistentVolume,
    PersistentVolumeClaim,
    /// The gateway's identity.
    ServiceAccount,
    /// Binds the gateway's ServiceAccount to the chart's gateway ClusterRole.
    RoleBinding,
    Service,
    Deployment,
    Ingress,
    /// Who may reach the ComfyUI pods: the fleet's gateway and load balancer.
    NetworkPolicy,
    /// The node agent DaemonSet, in the operator's namespace (not the fleet's).
    AgentDaemonSet,
    /// A gateway of several replicas loses at most one to a drain.
    PodDisruptionBudget,
}

/// Where the children of one kind live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Cluster-scoped: found by the owner labels (no owner reference is possible).
    Cluster,
    /// In the fleet's namespace, with an owner reference to the fleet.
    FleetNamespace,
    /// In the operator's namespace (the agents'), found by the owner labels.
    OperatorNamespace,
}

impl ChildKind {
    pub const ALL: [ChildKind; 12] = [
        ChildKind::NodeClass,
        ChildKind::NodePool,
        ChildKind::PersistentVolume,
        ChildKind::PersistentVolumeClaim,
        ChildKind::ServiceAccount,
        ChildKind::RoleBinding,
        ChildKind::Service,
        ChildKind::Deployment,
        ChildKind::Ingress,
        ChildKind::NetworkPolicy,
        ChildKind::AgentDaemonSet,
        ChildKind::PodDisruptionBudget,
    ];

    /// The API of this kind; the node class's depends on the cloud.
    pub fn api_resource(self, node_class: &dyn NodeClassProvider) -> ApiResource {
        match self {
            ChildKind::NodeClass => node_class.api_resource(),
            ChildKind::NodePool => nodepool::api_resource(),
            ChildKind::PersistentVolume => ApiResource::erase::<core::PersistentVolume>(&()),
            ChildKind::PersistentVolumeClaim => {
                ApiResource::erase::<core::PersistentVolumeClaim>(&())
            }
            ChildKind::ServiceAccount => ApiResource::erase::<core::ServiceAccount>(&()),
            ChildKind::RoleBinding => ApiResource::erase::<rbac::RoleBinding>(&()),
            ChildKind::Service => ApiResource::erase::<core::Service>(&()),
            ChildKind::Deployment => ApiResource::erase::<apps::Deployment>(&()),
            ChildKind::Ingress => ApiResource::erase::<net::Ingress>(&()),
            ChildKind::NetworkPolicy => ApiResource::erase::<net::NetworkPolicy>(&()),
            ChildKind::AgentDaemonSet => ApiResource::erase::<apps::DaemonSet>(&()),
            ChildKind::PodDisruptionBudget => {
                ApiResource::erase::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(&())
            }
        }
    }

    pub fn scope(self) -> Scope {
        match self {
            ChildKind::NodeClass | ChildKind::NodePool | ChildKind::PersistentVolume => {
                Scope::Cluster
            }
            ChildKind::AgentDaemonSet => Scope::OperatorNamespace,
            ChildKind::PersistentVolumeClaim
            | ChildKind::ServiceAccount
            | ChildKind::RoleBinding
            | ChildKind::Service
            | ChildKind::Deployment
            | ChildKind::Ingress
            | ChildKind::NetworkPolicy
            | ChildKind::PodDisruptionBudget => Scope::FleetNamespace,
        }
    }

    /// The namespace of this kind of child of a fleet in `fleet_namespace` (None:
    /// cluster-scoped).
    pub fn namespace<'a>(
        self,
        fleet_namespace: &'a str,
        agent: &'a AgentSettings,
    ) -> Option<&'a str> {
        self.watch_namespace(Some(fleet_namespace), agent)
    }

    /// Where to watch this kind when the controller watches `namespace` (None: all).
    pub fn watch_namespace<'a>(
        self,
        namespace: Option<&'a str>,
        agent: &'a AgentSettings,
    ) -> Option<&'a str> {
        match self.scope() {
            Scope::Cluster => None,
            Scope::FleetNamespace => namespace,
            Scope::OperatorNamespace => Some(agent.namespace.as_str()),
        }
    }
}

/// One desired child: its kind, API and the full manifest to server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub struct Child {
    pub kind: ChildKind,
    pub api: ApiResource,
    pub name: String,
    pub manifest: Value,
}

impl Child {
    /// The namespace the child is applied in (None: cluster-scoped).
    pub fn namespace(&self) -> Option<&str> {
        self.manifest["metadata"]["namespace"].as_str()
    }
}
