//! The facts a fleet's status is computed from, read from the caches.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::networking::v1::Ingress;
use kube::ResourceExt;

use super::super::runtime::cache::Caches;
use super::status::{Facts, GatewayFacts, ModelFacts};
use crate::crd::ComfyUIDeployment;
use crate::crd::modelset::{ModelSet, SyncMethod};
use crate::names::FleetNames;
use crate::render::ChildKind;

/// What the status is computed from, as the caches hold it: the Deployment, the
/// NodePool, the Ingress, and, with the ModelSet read before, the NodePool's nodes
/// (`pool_nodes`, read once for the status and the metrics).
pub(super) fn fetch_facts(
    caches: &Caches,
    cud: &ComfyUIDeployment,
    fleet: &FleetNames,
    model_set: Option<ModelSet>,
    pool_nodes: &[k8s_openapi::api::core::v1::Node],
) -> Facts {
    let ns = Some(fleet.namespace.as_str());
    let deployment = |name: &str| {
        caches
            .typed_child::<Deployment>(ChildKind::Deployment, ns, name)
            .and_then(|d| d.status)
    };
    let ingress = |name: &str| caches.typed_child::<Ingress>(ChildKind::Ingress, ns, name);
    let nodepool = caches
        .child(ChildKind::NodePool, None, &fleet.nodepool())
        .map(|p| (*p).clone());
    let models = match (cud.spec.model_set.as_deref(), model_set) {
        (None, _) => ModelFacts::NotUsed,
        (Some(name), None) => ModelFacts::NotFound(name.to_string()),
        (Some(name), Some(ms)) => {
            let ssm = ms.spec.sync.method == SyncMethod::Ssm;
            let nodes = pool_nodes
                .iter()
                // SSM reports by EC2 instance id: the last part of the providerID.
                .map(
                    |n| match n.spec.as_ref().and_then(|s| s.provider_id.as_deref()) {
                        Some(id) if ssm => id.rsplit('/').next().unwrap_or(id).to_string(),
                        _ => n.name_any(),
                    },
                )
                .collect();
            let mut status = ms.status.unwrap_or_default();
            // The agents report in ModelSync objects; SSM's entries stay in the status
            // (the controller writes them, one patch per pass).
            if !ssm {
                status.nodes = caches.reports_of(&fleet.namespace, name);
            }
            ModelFacts::Found {
                status: Box::new(status),
                nodes,
            }
        }
    };
    let gateway = cud.spec.gateway.as_ref().map(|gw| GatewayFacts {
        deployment: deployment(&fleet.gateway()),
        ingress: if gw.ingress.enabled {
            ingress(&fleet.gateway())
        } else {
            None
        },
    });
    Facts {
        deployment: deployment(&fleet.deployment()),
        nodepool,
        ingress: if cud.spec.ingress.enabled {
            ingress(&fleet.ingress())
        } else {
            None
        },
        models: Some(models),
        gateway,
    }
}
