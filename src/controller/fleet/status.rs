//! A fleet's status from what its children report: pure functions over objects fetched
//! beforehand (`Facts`), unit-tested like render.

use k8s_openapi::api::apps::v1::DeploymentStatus;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::DynamicObject;

use crate::controller::runtime::conditions::{
    DEGRADED, DesiredCondition, GATEWAY_READY, MODELS_READY, NODEPOOL_READY, PROGRESSING, READY,
    Reason,
};
use crate::crd::ComfyUIDeployment;
use crate::crd::comfyui::IngressSpec;
use crate::crd::gateway::GatewayStatus;
use crate::crd::modelset::{ModelSetStatus, NodeSyncState};
use crate::names::{FleetNames, MODELS_NOT_READY_TAINT};
use crate::telemetry::NodeCounts;
use k8s_openapi::api::core::v1::Node;

/// What the fleet's ModelSet and nodes say, as fetched.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelFacts {
    /// The fleet has no `modelSet`.
    NotUsed,
    /// The fleet's `modelSet` (named) does not exist.
    NotFound(String),
    /// The ModelSet's status and the names of the nodes of the fleet's NodePool.
    Found {
        status: Box<ModelSetStatus>,
        nodes: Vec<String>,
    },
}

/// Everything the status is computed from, fetched by the reconciler.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub deployment: Option<DeploymentStatus>,
    pub nodepool: Option<DynamicObject>,
    pub ingress: Option<Ingress>,
    pub models: Option<ModelFacts>,
    /// The gateway's Deployment status and Ingress, when the fleet has `spec.gateway`.
    pub gateway: Option<GatewayFacts>,
}

#[derive(Clone, Debug, Default)]
pub struct GatewayFacts {
    pub deployment: Option<DeploymentStatus>,
    pub ingress: Option<Ingress>,
}

/// The status fields and conditions of a fleet whose children were all applied.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetObservation {
    pub replicas: i32,
    pub ready_replicas: i32,
    pub endpoint: Option<String>,
    pub gateway: Option<GatewayStatus>,
    /// Set by the reconciler's autoscaling pass (not from the children).
    pub autoscaling: Option<crate::crd::autoscaling::AutoscalingStatus>,
    pub conditions: Vec<DesiredCondition>,
}

pub fn observe(cud: &ComfyUIDeployment, fleet: &FleetNames, facts: &Facts) -> FleetObservation {
    let status = facts.deployment.clone().unwrap_or_default();
    let replicas = status.replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let want = cud.spec.replicas;

    let pool = nodepool_ready(fleet, facts.nodepool.as_ref());
    let ready_condition = if want == 0 {
        DesiredCondition::new(READY, true, Reason::ScaledToZero, "replicas is 0")
    } else if ready >= want {
        DesiredCondition::new(
            READY,
            true,
            Reason::AllReplicasReady,
            format!("{ready}/{want} replicas ready"),
        )
    } else {
        let mut hint = if pool.status {
            String::new()
        } else {
            "; the NodePool is not ready".to_string()
        };
        // Pods the namespace refuses (a ResourceQuota on GPUs, an admission policy): the
        // Deployment says why, and no node will change that.
        if let Some(refused) = replica_failure(&status) {
            hint.push_str(&format!("; pods cannot be created: {refused}"));
        }
        DesiredCondition::new(
            READY,
            false,
            Reason::WaitingForPods,
            format!("{ready}/{want} replicas ready{hint}"),
        )
    };
    let rolled_out = updated >= want && replicas == want && ready >= want;
    let progressing = if rolled_out {
        DesiredCondition::new(
            PROGRESSING,
            false,
            Reason::RolloutComplete,
            format!("{want} replicas up to date"),
        )
    } else {
        DesiredCondition::new(
            PROGRESSING,
            true,
            Reason::RollingOut,
            format!("{updated}/{want} updated, {ready}/{want} ready"),
        )
    };
    let degraded =
        DesiredCondition::new(DEGRADED, false, Reason::AsExpected, "all children applied");
    let models = models_ready(fleet, facts.models.as_ref().unwrap_or(&ModelFacts::NotUsed));
    let mut conditions = vec![ready_condition, progressing, degraded, pool, models];
    let gateway = cud.spec.gateway.as_ref().map(|gw| {
        let facts = facts.gateway.clone().unwrap_or_default();
        let ready = facts.deployment.and_then(|d| d.ready_replicas).unwrap_or(0);
        let wanted = if gw.store.postgres.is_some() {
            gw.replicas.max(1)
        } else {
            1
        };
        // One ready replica serves the API; fewer than asked is said, for redundancy.
        let condition = if ready >= 1 {
            let message = if ready < wanted {
                format!("the job gateway is ready, with {ready} of {wanted} replicas")
            } else {
                "the job gateway is ready".to_string()
            };
            DesiredCondition::new(GATEWAY_READY, true, Reason::GatewayReady, message)
        } else {
            DesiredCondition::new(
                GATEWAY_READY,
                false,
                Reason::GatewayNotReady,
                format!("the job gateway {} has no ready pod", fleet.gateway()),
            )
        };
        // The fleet is Ready only when its front door is: clients use the gateway.
        if conditions[0].status && !condition.status {
            conditions[0] = DesiredCondition {
                type_: READY,
                ..condition.clone()
            };
        }
        conditions.push(condition);
        GatewayStatus {
            url: crate::render::gateway::url(fleet),
            endpoint: facts
                .ingress
                .as_ref()
                .and_then(|i| load_balancer_url(i, &gw.ingress)),
            ready_replicas: ready,
        }
    });
    FleetObservation {
        replicas,
        ready_replicas: ready,
        endpoint: facts.ingress.as_ref().and_then(|i| endpoint_of(i, cud)),
        gateway,
        autoscaling: None,
        conditions,
    }
}

/// NodePoolReady from Karpenter's `Ready` condition on the NodePool.
pub fn nodepool_ready(fleet: &FleetNames, pool: Option<&DynamicObject>) -> DesiredCondition {
    let ready = pool
        .and_then(|p| p.data["status"]["conditions"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"));
    let name = fleet.nodepool();
    match ready {
        Some(c) if c["status"] == "True" => DesiredCondition::new(
            NODEPOOL_READY,
            true,
            Reason::NodePoolReady,
            format!("NodePool {name} is ready"),
        ),
        Some(c) => DesiredCondition::new(
            NODEPOOL_READY,
            false,
            Reason::NodePoolNotReady,
            format!(
                "NodePool {name}: {}",
                c["message"].as_str().unwrap_or("not ready")
            ),
        ),
        None => DesiredCondition::new(
            NODEPOOL_READY,
            false,
            Reason::NodePoolPending,
            format!("NodePool {name} has no status yet: is Karpenter running?"),
        ),
    }
}

/// ModelsReady: every node of the fleet's NodePool reports the ModelSet's revision.
pub fn models_ready(fleet: &FleetNames, facts: &ModelFacts) -> DesiredCondition {
    let (status, nodes) = match facts {
        ModelFacts::NotUsed => {
            return DesiredCondition::new(
                MODELS_READY,
                true,
                Reason::NoModelSet,
                "no ModelSet: the image's own models are used",
            );
        }
        ModelFacts::NotFound(name) => {
            return DesiredCondition::new(
                MODELS_READY,
                false,
                Reason::ModelSetNotFound,
                format!(
                    "ModelSet {name} does not exist in namespace {}",
                    fleet.namespace
                ),
            );
        }
        ModelFacts::Found { status, nodes } => (status, nodes),
    };
    if nodes.is_empty() {
        return DesiredCondition::new(
            MODELS_READY,
            false,
            Reason::NoNodes,
            "the fleet has no nodes yet",
        );
    }
    let entries: Vec<_> = nodes.iter().filter_map(|n| status.node(n)).collect();
    if let Some(failed) = entries.iter().find(|e| e.state == NodeSyncState::Failed) {
        return DesiredCondition::new(
            MODELS_READY,
            false,
            Reason::SyncFailed,
            format!("node {}: {}", failed.node, failed.message),
        );
    }
    let synced = entries
        .iter()
        .filter(|e| e.is_synced_at(&status.revision))
        .count();
    let total = nodes.len();
    let message = format!("{synced}/{total} nodes at {}", status.revision);
    if synced == total {
        DesiredCondition::new(MODELS_READY, true, Reason::ModelsSynced, message)
    } else {
        DesiredCondition::new(MODELS_READY, false, Reason::Syncing, message)
    }
}

/// Why the Deployment cannot create its pods (its `ReplicaFailure` condition), if so.
fn replica_failure(status: &k8s_openapi::api::apps::v1::DeploymentStatus) -> Option<String> {
    status
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
        .map(|c| {
            c.message
                .clone()
                .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
        })
}

/// The node counts the metrics publish: of the fleet's NodePool's `nodes`, those Ready
/// and those still carrying the startup taint; from the ModelSet's reports (`models`),
/// those holding its revision and those whose sync failed.
pub fn node_counts(nodes: &[Node], models: &ModelFacts) -> NodeCounts {
    let count = |n: usize| n as i64;
    let ready = nodes
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    let tainted = nodes
        .iter()
        .filter(|n| {
            n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key == MODELS_NOT_READY_TAINT))
        })
        .count();
    let (synced, failed) = match models {
        ModelFacts::Found { status, nodes } => {
            let entries: Vec<_> = nodes.iter().filter_map(|n| status.node(n)).collect();
            (
                entries
                    .iter()
                    .filter(|e| e.is_synced_at(&status.revision))
                    .count(),
                entries
                    .iter()
                    .filter(|e| e.state == NodeSyncState::Failed)
                    .count(),
            )
        }
        ModelFacts::NotUsed | ModelFacts::NotFound(_) => (0, 0),
    };
    NodeCounts {
        total: count(nodes.len()),
        ready: count(ready),
        tainted: count(tainted),
        synced: count(synced),
        failed: count(failed),
    }
}

/// The URL clients use: the Ingress's load balancer, or the fleet's host when it names one.
pub fn endpoint_of(ingress: &Ingress, cud: &ComfyUIDeployment) -> Option<String> {
    load_balancer_url(ingress, &cud.spec.ingress)
}

/// An Ingress's load balancer URL, or its host when `spec` names one.
fn load_balancer_url(ingress: &Ingress, spec: &IngressSpec) -> Option<String> {
    if !spec.enabled {
        return None;
    }
    let lb = ingress
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?;
    let host = lb.hostname.clone().or_else(|| lb.ip.clone())?;
    let tls = spec
        .certificate_arn
        .as_deref()
        .is_some_and(|c| !c.is_empty());
    let host = spec
        .host
        .clone()
        .filter(|h| !h.is_empty() && !h.starts_with('*'))
        .unwrap_or(host);
    Some(format!("{}://{host}", if tls { "https" } else { "http" }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::modelset::NodeSync;
    use serde_json::json;

    fn fleet() -> FleetNames {
        FleetNames::new("studio", "sdxl")
    }

    fn cud(replicas: i32) -> ComfyUIDeployment {
        let mut cud: ComfyUIDeployment = serde_json::from_value(json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "metadata": {"name": "sdxl", "namespace": "studio"},
            "spec": {"image": "comfyui:1", "nodeClass": {"role": "R"}}
        }))
        .unwrap();
        cud.spec.replicas = replicas;
        cud
    }

    fn pool(ready: Option<(&str, &str)>) -> DynamicObject {
        let conditions = match ready {
            Some((status, message)) => {
                json!([{"type": "Ready", "status": status, "message": message}])
            }
            None => json!([]),
        };
        serde_json::from_value(json!({
            "apiVersion": "karpenter.sh/v1", "kind": "NodePool",
            "metadata": {"name": "studio.sdxl"}, "status": {"conditions": conditions}
        }))
        .unwrap()
    }

    fn find<'a>(o: &'a FleetObservation, type_: &str) -> &'a DesiredCondition {
        o.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn nodepool_missing_not_ready_or_ready() {
        let missing = nodepool_ready(&fleet(), None);
        assert_eq!(
            (missing.status, missing.reason),
            (false, Reason::NodePoolPending)
        );
        assert!(missing.message.contains("is Karpenter running"));
        let no_status = nodepool_ready(&fleet(), Some(&pool(None)));
        assert_eq!(no_status.reason, Reason::NodePoolPending);
        let not_ready = nodepool_ready(
            &fleet(),
            Some(&pool(Some(("False", "EC2NodeClass not ready")))),
        );
        assert_eq!(
            (not_ready.status, not_ready.reason),
            (false, Reason::NodePoolNotReady)
        );
        assert_eq!(
            not_ready.message,
            "NodePool studio.sdxl: EC2NodeClass not ready"
        );
        let ready = nodepool_ready(&fleet(), Some(&pool(Some(("True", "")))));
        assert_eq!((ready.status, ready.reason), (true, Reason::NodePoolReady));
    }

    #[test]
    fn fleet_waiting_on_a_pool_that_is_not_ready_says_so() {
        let facts = Facts {
            deployment: Some(DeploymentStatus {
                replicas: Some(2),
                ready_replicas: Some(1),
                updated_replicas: Some(2),
                ..Default::default()
            }),
            nodepool: Some(pool(Some(("False", "no capacity")))),
            ..Default::default()
        };
        let o = observe(&cud(2), &fleet(), &facts);
        let ready = find(&o, READY);
        assert_eq!(
            (ready.status, ready.reason),
            (false, Reason::WaitingForPods)
        );
        assert_eq!(
            ready.message,
            "1/2 replicas ready; the NodePool is not ready"
        );
        assert!(find(&o, PROGRESSING).status);
        assert_eq!((o.replicas, o.ready_replicas), (2, 1));
        // No modelSet: ModelsReady is true, and nothing waits on models.
        let models = find(&o, MODELS_READY);
        assert_eq!((models.status, models.reason), (true, Reason::NoModelSet));
    }

    #[test]
    fn pods_the_namespace_refuses_are_named_in_ready() {
        let refused = "pods \"sdxl-1\" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1";
        let facts = Facts {
            deployment: Some(DeploymentStatus {
                replicas: Some(1),
                ready_replicas: Some(1),
                conditions: Some(vec![k8s_openapi::api::apps::v1::DeploymentCondition {
                    type_: "ReplicaFailure".into(),
                    status: "True".into(),
                    reason: Some("FailedCreate".into()),
                    message: Some(refused.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            nodepool: Some(pool(Some(("True", "")))),
            ..Default::default()
        };
        let ready = find(&observe(&cud(2), &fleet(), &facts), READY).clone();
        assert_eq!(
            ready.message,
            format!("1/2 replicas ready; pods cannot be created: {refused}")
        );
    }

    #[test]
    fn fleet_all_ready_and_scaled_to_zero() {
        let facts = Facts {
            deployment: Some(DeploymentStatus {
                replicas: Some(2),
                ready_replicas: Some(2),
                updated_replicas: Some(2),
                ..Default::default()
            }),
            nodepool: Some(pool(Some(("True", "")))),
            ..Default::default()
        };
        let o = observe(&cud(2), &fleet(), &facts);
        assert_eq!(find(&o, READY).reason, Reason::AllReplicasReady);
        assert_eq!(find(&o, PROGRESSING).reason, Reason::RolloutComplete);
        let zero = observe(&cud(0), &fleet(), &Facts::default());
        assert_eq!(find(&zero, READY).reason, Reason::ScaledToZero);
        assert!(find(&zero, READY).status);
    }

    #[test]
    fn a_fleet_with_a_gateway_is_ready_only_once_the_gateway_is() {
        let mut with_gateway = cud(2);
        with_gateway.spec.gateway =
            Some(serde_json::from_value(json!({"apiKeysSecret": "keys"})).unwrap());
        let all_ready = Some(DeploymentStatus {
            replicas: Some(2),
            ready_replicas: Some(2),
            updated_replicas: Some(2),
            ..Default::default()
        });
        let mut facts = Facts {
            deployment: all_ready,
            nodepool: Some(pool(Some(("True", "")))),
            gateway: Some(GatewayFacts::default()),
            ..Default::default()
        };
        let o = observe(&with_gateway, &fleet(), &facts);
        let ready = find(&o, READY);
        assert_eq!(
            (ready.status, ready.reason),
            (false, Reason::GatewayNotReady)
        );
        assert!(!find(&o, GATEWAY_READY).status);
        let status = o.gateway.unwrap();
        assert_eq!(status.url, "http://sdxl-gateway.studio.svc");
        assert_eq!(status.ready_replicas, 0);

        facts.gateway = Some(GatewayFacts {
            deployment: Some(DeploymentStatus {
                ready_replicas: Some(1),
                ..Default::default()
            }),
            ingress: None,
        });
        let o = observe(&with_gateway, &fleet(), &facts);
        assert_eq!(find(&o, READY).reason, Reason::AllReplicasReady);
        assert_eq!(find(&o, GATEWAY_READY).reason, Reason::GatewayReady);
        assert_eq!(find(&o, GATEWAY_READY).message, "the job gateway is ready");
        // Three replicas on PostgreSQL, one ready: it serves, and says what is missing.
        let mut replicated = with_gateway.clone();
        replicated.spec.gateway = Some(
            serde_json::from_value(json!({"apiKeysSecret": "keys", "replicas": 3,
                "store": {"postgres": {"secretName": "db"}}}))
            .unwrap(),
        );
        let o = observe(&replicated, &fleet(), &facts);
        let gateway = find(&o, GATEWAY_READY);
        assert!(gateway.status);
        assert_eq!(
            gateway.message,
            "the job gateway is ready, with 1 of 3 replicas"
        );
        // Without spec.gateway there is no such condition, and no gateway status.
        let o = observe(&cud(2), &fleet(), &facts);
        assert!(o.conditions.iter().all(|c| c.type_ != GATEWAY_READY));
        assert!(o.gateway.is_none());
    }

    fn entry(node: &str, revision: &str, state: NodeSyncState) -> NodeSync {
        NodeSync {
            node: node.into(),
            revision: revision.into(),
            state,
            bytes_done: 0,
            message: if state == NodeSyncState::Failed {
                "no space".into()
            } else {
                String::new()
            },
            command_id: None,
            hot_ready: false,
            gpu_allocatable_at: None,
            hot_recent: Vec::new(),
        }
    }

    fn models(entries: Vec<NodeSync>, nodes: &[&str]) -> ModelFacts {
        ModelFacts::Found {
            status: Box::new(ModelSetStatus {
                revision: "sha256:new".into(),
                nodes: entries,
                ..Default::default()
            }),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn models_ready_with_no_some_or_all_nodes_synced() {
        let f = fleet();
        let none = models_ready(&f, &models(vec![], &[]));
        assert_eq!((none.status, none.reason), (false, Reason::NoNodes));

        let some = models_ready(
            &f,
            &models(
                vec![
                    entry("n1", "sha256:new", NodeSyncState::Synced),
                    entry("n2", "sha256:old", NodeSyncState::Synced),
                    // A node of another fleet does not count.
                    entry("other", "sha256:new", NodeSyncState::Synced),
                ],
                &["n1", "n2", "n3"],
            ),
        );
        assert_eq!((some.status, some.reason), (false, Reason::Syncing));
        assert_eq!(some.message, "1/3 nodes at sha256:new");

        let all = models_ready(
            &f,
            &models(
                vec![
                    entry("n1", "sha256:new", NodeSyncState::Synced),
                    entry("n2", "sha256:new", NodeSyncState::Synced),
                ],
                &["n1", "n2"],
            ),
        );
        assert_eq!((all.status, all.reason), (true, Reason::ModelsSynced));
        assert_eq!(all.message, "2/2 nodes at sha256:new");
    }

    #[test]
    fn node_counts_for_the_metrics() {
        let node = |name: &str, ready: &str, tainted: bool| -> Node {
            let taints = if tainted {
                json!([{"key": MODELS_NOT_READY_TAINT, "effect": "NoSchedule"}])
            } else {
                json!([])
            };
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"taints": taints},
                "status": {"conditions": [{"type": "Ready", "status": ready}]},
            }))
            .unwrap()
        };
        let nodes = [
            node("n1", "True", false),
            node("n2", "True", true),
            node("n3", "False", true),
        ];
        let facts = models(
            vec![
                entry("n1", "sha256:new", NodeSyncState::Synced),
                entry("n2", "sha256:new", NodeSyncState::Failed),
                entry("n3", "sha256:old", NodeSyncState::Synced),
                // A node of another fleet does not count.
                entry("other", "sha256:new", NodeSyncState::Synced),
            ],
            &["n1", "n2", "n3"],
        );
        let counts = node_counts(&nodes, &facts);
        assert_eq!(
            counts,
            NodeCounts {
                total: 3,
                ready: 2,
                tainted: 2,
                synced: 1,
                failed: 1
            }
        );
        let no_models = node_counts(&nodes, &ModelFacts::NotUsed);
        assert_eq!((no_models.synced, no_models.failed), (0, 0));
        assert_eq!(
            node_counts(&[], &ModelFacts::NotUsed),
            NodeCounts::default()
        );
    }

    #[test]
    fn models_ready_names_a_failed_node_and_a_missing_modelset() {
        let f = fleet();
        let failed = models_ready(
            &f,
            &models(
                vec![
                    entry("n1", "sha256:new", NodeSyncState::Synced),
                    entry("n2", "sha256:new", NodeSyncState::Failed),
                ],
                &["n1", "n2"],
            ),
        );
        assert_eq!((failed.status, failed.reason), (false, Reason::SyncFailed));
        assert_eq!(failed.message, "node n2: no space");
        let missing = models_ready(&f, &ModelFacts::NotFound("sdxl-models".into()));
        assert_eq!(missing.reason, Reason::ModelSetNotFound);
        assert!(missing.message.contains("sdxl-models"));
        assert!(missing.message.contains("studio"));
    }
}
