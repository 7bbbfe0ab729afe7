//! Queue-driven replicas, as pure functions over what the reconciler fetched: the
//! decision (up at once, down only after the idle delay and never below the busy pods),
//! the pods' disruption annotations, the capacity condition and the cold-start phases.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::DynamicObject;

use crate::controller::runtime::conditions::{CAPACITY_AVAILABLE, DesiredCondition, Reason};
use crate::crd::autoscaling::{
    AutoscalingSpec, AutoscalingStatus, ColdStart, DemandStatus, ScalingDecision,
};
use crate::names::GPU_RESOURCE;

/// Karpenter leaves a node with such a pod alone (no consolidation, no drift).
pub const DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";
/// The ReplicaSet removes pods with the lowest cost first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The cost of a busy pod; idle pods carry none (0).
const BUSY_COST: &str = "1000";

/// What one pass decides.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: AutoscalingStatus,
    /// The change of replicas, when there is one.
    pub decision: Option<ScalingDecision>,
    /// Look again then (the idle delay ends).
    pub recheck: Option<Duration>,
}

/// The replicas for this pass. `current` is what the Deployment was last given;
/// `demand` is None until the gateway has reported (the replicas then hold).
pub fn decide(
    spec: &AutoscalingSpec,
    current: i32,
    demand: Option<&DemandStatus>,
    previous: Option<&AutoscalingStatus>,
    ready_replicas: i32,
    now: Timestamp,
) -> Plan {
    let mut status = previous.cloned().unwrap_or_default();
    status.desired_replicas = current;
    let decision = |to: i32, reason: &str, message: String| ScalingDecision {
        from: current,
        to,
        reason: reason.into(),
        message,
        time: MicroTime(now),
    };
    let bounded = current.clamp(spec.min_replicas, spec.max_replicas);
    let mut plan = Plan {
        status,
        decision: None,
        recheck: None,
    };
    if bounded != current {
        let message = format!(
            "{current} replicas is outside minReplicas {} and maxReplicas {}",
            spec.min_replicas, spec.max_replicas
        );
        plan.decision = Some(decision(bounded, "Bounds", message));
    }
    let Some(demand) = demand else {
        return plan.finish(bounded, ready_replicas, now);
    };
    let jobs = demand.jobs().max(0);
    let target = spec.target_jobs_per_replica.max(1);
    let needed = (jobs + target - 1) / target;
    let want = needed.clamp(spec.min_replicas, spec.max_replicas);
    let why = || {
        let capped = if needed > spec.max_replicas {
            format!("; capped at maxReplicas {}", spec.max_replicas)
        } else {
            String::new()
        };
        format!(
            "{jobs} jobs ({} queued, {} running) at {target} per replica need {needed}{capped}",
            demand.queued, demand.running
        )
    };
    if want > bounded {
        plan.status.below_since = None;
        plan.decision = Some(decision(want, "Demand", why()));
        return plan.finish(want, ready_replicas, now);
    }
    if want == bounded {
        plan.status.below_since = None;
        return plan.finish(bounded, ready_replicas, now);
    }
    // Fewer are needed: after the idle delay, and never fewer than the busy pods.
    let busy = (demand.busy_pods.len() as i32).min(bounded);
    let floor = want.max(busy);
    let since = plan.status.below_since.as_ref().map(|t| t.0).unwrap_or(now);
    plan.status.below_since = Some(Time(since));
    let delay = Duration::from_secs(spec.scale_down_delay_seconds.max(0) as u64);
    let waited = now.duration_since(since).unsigned_abs();
    if floor >= bounded || demand.queued > 0 {
        // Every pod is busy, or a queued job is about to go to one of the idle pods:
        // look again when that changes (a demand change wakes us).
        return plan.finish(bounded, ready_replicas, now);
    }
    if waited < delay {
        plan.recheck = Some(delay - waited);
        return plan.finish(bounded, ready_replicas, now);
    }
    let mut message = format!("idle for {}s: {}", waited.as_secs(), why());
    if floor > want {
        message.push_str(&format!("; {busy} pods are busy and stay"));
    } else {
        plan.status.below_since = None;
    }
    plan.decision = Some(decision(floor, "Idle", message));
    plan.finish(floor, ready_replicas, now)
}

impl Plan {
    fn finish(mut self, to: i32, ready_replicas: i32, now: Timestamp) -> Plan {
        // A start from no ready pod is timed from this decision to the first ready pod.
        let open = self
            .status
            .cold_start
            .as_ref()
            .is_some_and(|c| c.ready_at.is_none());
        if to > 0 && ready_replicas == 0 && !open && self.decision.is_some() {
            self.status.cold_start = Some(ColdStart {
                started_at: Time(now),
                ready_at: None,
                node_seconds: None,
                node_ready_seconds: None,
                gpu_seconds: None,
                models_seconds: None,
                image_seconds: None,
                ready_seconds: None,
            });
        }
        if to == 0 && open {
            self.status.cold_start = None;
        }
        self.status.desired_replicas = to;
        match &mut self.decision {
            Some(d) if to == d.from => self.decision = None,
            Some(d) => d.to = to,
            None => {}
        }
        if self.decision.is_some() {
            self.status.last_decision = self.decision.clone();
        }
        self
    }
}

/// The annotations the autoscaler owns on a pod: a busy pod is the last the ReplicaSet
/// removes and a node Karpenter does not disrupt; an idle pod carries none.
pub fn pod_annotations(busy: bool) -> BTreeMap<String, String> {
    if busy {
        BTreeMap::from([
            (DELETION_COST.to_string(), BUSY_COST.to_string()),
            (DO_NOT_DISRUPT.to_string(), "true".to_string()),
        ])
    } else {
        BTreeMap::new()
    }
}

/// Pods whose annotations differ from what their busyness asks, with what they need.
pub fn annotation_changes(
    pods: &[Pod],
    busy: &BTreeSet<String>,
) -> Vec<(String, BTreeMap<String, String>)> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let name = p.name_any();
            let want = pod_annotations(busy.contains(&name));
            let have: BTreeMap<String, String> = p
                .annotations()
                .iter()
                .filter(|(k, _)| *k == DELETION_COST || *k == DO_NOT_DISRUPT)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (have != want).then_some((name, want))
        })
        .collect()
}

fn condition<'a>(
    pod: &'a Pod,
    type_: &str,
) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

fn unschedulable(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && condition(pod, "PodScheduled")
            .is_some_and(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
}

fn quantity(v: Option<&serde_json::Value>) -> Option<f64> {
    v.and_then(|q| {
        q.as_str()
            .map(str::to_string)
            .or_else(|| q.as_i64().map(|i| i.to_string()))
    })
    .and_then(|s| s.parse().ok())
}

/// CapacityAvailable: false (`NoCapacity`) when pods wait for nodes that cannot come,
/// because the NodePool holds its whole GPU limit or Karpenter fails to launch.
pub fn capacity(
    pods: &[Pod],
    nodepool: Option<&DynamicObject>,
    nodeclaims: &[DynamicObject],
) -> DesiredCondition {
    let waiting = pods.iter().filter(|p| unschedulable(p)).count();
    let ok = |message: String| {
        DesiredCondition::new(CAPACITY_AVAILABLE, true, Reason::CapacityAvailable, message)
    };
    let none = |message: String| {
        DesiredCondition::new(CAPACITY_AVAILABLE, false, Reason::NoCapacity, message)
    };
    if waiting == 0 {
        return ok("every pod has a node".into());
    }
    if let Some(pool) = nodepool {
        let limit = quantity(
            pool.data
                .pointer(&format!("/spec/limits/{}", GPU_RESOURCE.replace('/', "~1"))),
        );
        let used = quantity(pool.data.pointer(&format!(
            "/status/resources/{}",
            GPU_RESOURCE.replace('/', "~1")
        )))
        .unwrap_or(0.0);
        if let Some(limit) = limit.filter(|l| used >= *l) {
            return none(format!(
                "NodePool {} holds {used} of its {limit} {GPU_RESOURCE} (gpu.limit): {waiting} pods wait for capacity",
                pool.name_any()
            ));
        }
    }
    let failed = nodeclaims.iter().find_map(|claim| {
        let conditions = claim.data.pointer("/status/conditions")?.as_array()?;
        conditions.iter().find_map(|c| {
            (c["type"] == "Launched" && c["status"] == "False")
                .then(|| c["message"].as_str().unwrap_or("launch failed").to_string())
                .filter(|m| !m.is_empty())
        })
    });
    match failed {
        Some(message) => none(format!(
            "{waiting} pods wait: a node launch failed: {message}"
        )),
        None => ok(format!("{waiting} pods wait for nodes being launched")),
    }
}

/// The open cold start, with its phases once a pod is ready (the first one).
/// `gpu_allocatable_at` is when a node's agent first saw its GPUs allocatable.
pub fn cold_start_phases(
    cold: &ColdStart,
    pods: &[Pod],
    nodes: &[Node],
    gpu_allocatable_at: &dyn Fn(&str) -> Option<Timestamp>,
) -> ColdStart {
    if cold.ready_at.is_some() {
        return cold.clone();
    }
    let ready_at = |p: &Pod| {
        condition(p, "Ready")
            .filter(|c| c.status == "True")
            .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
    };
    let Some((pod, ready)) = pods
        .iter()
        .filter_map(|p| ready_at(p).map(|t| (p, t)))
        .min_by_key(|(_, t)| *t)
    else {
        return cold.clone();
    };
    let start = cold.started_at.0;
    let secs =
        |a: Timestamp, b: Timestamp| (b.duration_since(a).as_millis() as f64 / 1000.0).max(0.0);
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .and_then(|n| nodes.iter().find(|node| node.name_any() == n));
    let node_joined = node
        .and_then(|n| n.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .map(|t| t.max(start))
        .unwrap_or(start);
    let node_ready = node
        .and_then(|n| n.status.as_ref()?.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
        .map(|t| t.max(node_joined));
    let gpu = node
        .and_then(|n| gpu_allocatable_at(&n.name_any()))
        .map(|t| t.max(node_ready.unwrap_or(node_joined)));
    let models_from = gpu.or(node_ready).unwrap_or(node_joined);
    let scheduled = condition(pod, "PodScheduled")
        .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
        .unwrap_or(models_from)
        .max(models_from);
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| {
            c.state
                .as_ref()?
                .running
                .as_ref()?
                .started_at
                .as_ref()
                .map(|t| t.0)
        })
        .unwrap_or(scheduled)
        .max(scheduled);
    let ready = ready.max(running);
    ColdStart {
        started_at: cold.started_at.clone(),
        ready_at: Some(Time(ready)),
        node_seconds: Some(secs(start, node_joined)),
        node_ready_seconds: node_ready.map(|t| secs(node_joined, t)),
        gpu_seconds: gpu.map(|t| secs(node_ready.unwrap_or(node_joined), t)),
        models_seconds: Some(secs(models_from, scheduled)),
        image_seconds: Some(secs(scheduled, running)),
        ready_seconds: Some(secs(running, ready)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(min: i32, max: i32, target: i32, delay: i32) -> AutoscalingSpec {
        serde_json::from_value(json!({"minReplicas": min, "maxReplicas": max,
            "targetJobsPerReplica": target, "scaleDownDelaySeconds": delay}))
        .unwrap()
    }

    fn demand(queued: i32, running: i32, busy: &[&str]) -> DemandStatus {
        DemandStatus {
            queued,
            running,
            busy_pods: busy.iter().map(|s| s.to_string()).collect(),
            recent_models: Vec::new(),
            observed_at: None,
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn scales_up_at_once_to_the_jobs_over_the_target_capped_at_max() {
        let s = spec(0, 6, 4, 60);
        let plan = decide(&s, 0, Some(&demand(40, 0, &[])), None, 0, at(0));
        assert_eq!(plan.status.desired_replicas, 6);
        let d = plan.decision.unwrap();
        assert_eq!((d.from, d.to, d.reason.as_str()), (0, 6, "Demand"));
        assert_eq!(
            plan.status.last_decision,
            Some(d.clone()),
            "recorded in status"
        );
        assert!(
            d.message.contains("need 10; capped at maxReplicas 6"),
            "{}",
            d.message
        );
        // From no ready pod: a cold start opens at the decision.
        assert_eq!(plan.status.cold_start.unwrap().started_at, Time(at(0)));
        let plan = decide(&s, 2, Some(&demand(5, 4, &["a", "b"])), None, 2, at(0));
        assert_eq!(plan.status.desired_replicas, 3);
        assert!(plan.status.cold_start.is_none());
    }

    #[test]
    fn scales_down_only_after_the_delay_and_never_below_busy_pods() {
        let s = spec(1, 6, 2, 60);
        let idle = demand(0, 2, &["p1", "p2"]);
        let first = decide(&s, 5, Some(&idle), None, 5, at(0));
        assert_eq!(first.status.desired_replicas, 5);
        assert!(first.decision.is_none());
        assert_eq!(first.recheck, Some(Duration::from_secs(60)));
        let later = decide(&s, 5, Some(&idle), Some(&first.status), 5, at(30));
        assert_eq!(later.status.desired_replicas, 5);
        assert_eq!(later.recheck, Some(Duration::from_secs(30)));
        // After the delay: 2 jobs need 1 pod, but two pods are busy.
        let after = decide(&s, 5, Some(&idle), Some(&later.status), 5, at(61));
        let d = after.decision.unwrap();
        assert_eq!((d.to, d.reason.as_str()), (2, "Idle"));
        assert!(
            d.message.contains("2 pods are busy and stay"),
            "{}",
            d.message
        );
        // The busy pods finish: down to min at once (the delay has passed).
        let drained = decide(
            &s,
            2,
            Some(&demand(0, 0, &[])),
            Some(&after.status),
            2,
            at(70),
        );
        assert_eq!(drained.status.desired_replicas, 1);
        assert!(drained.status.below_since.is_none());
    }

    #[test]
    fn no_scale_down_while_jobs_wait_for_a_pod() {
        // A queued job is about to land on some idle pod: none goes until it has.
        let s = spec(0, 6, 4, 0);
        let plan = decide(&s, 6, Some(&demand(1, 0, &[])), None, 6, at(0));
        assert_eq!(plan.status.desired_replicas, 6);
        let plan = decide(
            &s,
            6,
            Some(&demand(0, 1, &["a"])),
            Some(&plan.status),
            6,
            at(1),
        );
        assert_eq!(plan.status.desired_replicas, 1);
    }

    #[test]
    fn demand_back_within_the_delay_resets_it() {
        let s = spec(0, 4, 2, 60);
        let first = decide(&s, 2, Some(&demand(0, 0, &[])), None, 2, at(0));
        assert!(first.status.below_since.is_some());
        let busy = decide(
            &s,
            2,
            Some(&demand(2, 2, &["a", "b"])),
            Some(&first.status),
            2,
            at(30),
        );
        assert!(busy.status.below_since.is_none());
        assert!(busy.decision.is_none());
    }

    #[test]
    fn without_demand_the_replicas_hold_within_bounds() {
        let s = spec(1, 3, 2, 0);
        assert_eq!(
            decide(&s, 2, None, None, 2, at(0)).status.desired_replicas,
            2
        );
        let plan = decide(&s, 7, None, None, 7, at(0));
        assert_eq!(plan.status.desired_replicas, 3);
        assert_eq!(plan.decision.unwrap().reason, "Bounds");
        // Zero jobs and min 0: to zero after the delay (0 here).
        let s = spec(0, 3, 2, 0);
        let plan = decide(&s, 1, Some(&demand(0, 0, &[])), None, 1, at(0));
        assert_eq!(plan.status.desired_replicas, 0);
    }

    #[test]
    fn busy_pods_get_the_cost_and_do_not_disrupt_idle_ones_lose_them() {
        let pod = |name: &str, ann: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "annotations": ann}})).unwrap()
        };
        let pods = vec![
            pod("a", json!({})),
            pod(
                "b",
                json!({DELETION_COST: "1000", DO_NOT_DISRUPT: "true", "other": "x"}),
            ),
            pod("c", json!({DELETION_COST: "1000", DO_NOT_DISRUPT: "true"})),
        ];
        let busy = BTreeSet::from(["a".to_string(), "b".to_string()]);
        let changes = annotation_changes(&pods, &busy);
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].0, "a");
        assert_eq!(changes[0].1[DO_NOT_DISRUPT], "true");
        assert_eq!((changes[1].0.as_str(), changes[1].1.len()), ("c", 0));
    }

    #[test]
    fn capacity_names_the_nodepool_limit_or_the_launch_failure() {
        let waiting: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
            "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}}))
        .unwrap();
        let pool: DynamicObject =
            serde_json::from_value(json!({"apiVersion": "karpenter.sh/v1", "kind": "NodePool",
            "metadata": {"name": "pool"}, "spec": {"limits": {"nvidia.com/gpu": "4"}},
            "status": {"resources": {"nvidia.com/gpu": "4"}}}))
            .unwrap();
        let c = capacity(std::slice::from_ref(&waiting), Some(&pool), &[]);
        assert!(!c.status);
        assert_eq!(c.reason, Reason::NoCapacity);
        assert!(
            c.message.contains("holds 4 of its 4 nvidia.com/gpu"),
            "{}",
            c.message
        );
        let claim: DynamicObject = serde_json::from_value(json!({"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
            "metadata": {"name": "c"}, "status": {"conditions": [{"type": "Launched", "status": "False", "message": "InsufficientInstanceCapacity"}]}}))
        .unwrap();
        let c = capacity(std::slice::from_ref(&waiting), None, &[claim]);
        assert!(!c.status && c.message.contains("InsufficientInstanceCapacity"));
        let c = capacity(&[waiting], None, &[]);
        assert!(c.status && c.message.contains("being launched"));
        assert!(capacity(&[], Some(&pool), &[]).status);
    }

    #[test]
    fn cold_start_phases_come_from_the_node_and_pod_times() {
        let t = |s: i64| at(s).to_string();
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n", "containers": []},
            "status": {"conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t(50)},
                {"type": "Ready", "status": "True", "lastTransitionTime": t(90)}],
              "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
                "state": {"running": {"startedAt": t(70)}}}]}}))
        .unwrap();
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "creationTimestamp": t(40)},
            "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": t(43)}]}}))
        .unwrap();
        let cold = ColdStart {
            started_at: Time(at(0)),
            ready_at: None,
            node_seconds: None,
            node_ready_seconds: None,
            gpu_seconds: None,
            models_seconds: None,
            image_seconds: None,
            ready_seconds: None,
        };
        // The agent saw the GPUs at 45: node 40 s, Ready 3 s, GPU 2 s, models 5 s.
        let gpu_at = |n: &str| (n == "n").then(|| at(45));
        let done = cold_start_phases(
            &cold,
            std::slice::from_ref(&pod),
            std::slice::from_ref(&node),
            &gpu_at,
        );
        assert_eq!(done.ready_at, Some(Time(at(90))));
        assert_eq!(
            (
                done.node_seconds,
                done.node_ready_seconds,
                done.gpu_seconds,
                done.models_seconds,
                done.image_seconds,
                done.ready_seconds
            ),
            (
                Some(40.0),
                Some(3.0),
                Some(2.0),
                Some(5.0),
                Some(20.0),
                Some(20.0)
            )
        );
        // No agent (a fleet without a ModelSet): no GPU phase, models from Ready.
        let without = cold_start_phases(&cold, &[pod], &[node], &|_| None);
        assert_eq!(
            (without.gpu_seconds, without.models_seconds),
            (None, Some(7.0))
        );
    }
}
