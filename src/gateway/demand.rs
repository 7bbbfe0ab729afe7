//! The gateway's side of autoscaling, as values: each fleet's demand (queued and
//! running jobs, busy pods), and what the operator decided, read back from the fleet's
//! status: whether capacity is missing (queued jobs show it) and the last cold start's
//! phases (jobs that waited on it carry them). `fleet_status` moves them to and from the
//! cluster.

use std::collections::HashMap;
use std::sync::RwLock;

use serde_json::{Value, json};

use crate::crd::ComfyUIDeployment;
use crate::crd::autoscaling::{CAPACITY_AVAILABLE, ColdStart};

/// One fleet's demand as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    pub queued: usize,
    pub running: usize,
    pub busy_pods: Vec<String>,
    /// Checkpoint keys of recent jobs, most used first (`RECENT_MODELS` at most).
    pub recent_models: Vec<String>,
}

/// Recent jobs counted for `recent_models`, and how many keys it holds.
pub const RECENT_JOBS: usize = 200;
pub const RECENT_MODELS: usize = 8;

/// The checkpoints of `recent` (names, oldest first) as ModelSet keys, most used first,
/// the more recent first on a tie.
pub fn recent_models<'a>(recent: impl DoubleEndedIterator<Item = &'a str>) -> Vec<String> {
    let mut counts: Vec<(&str, usize, usize)> = Vec::new();
    for (age, name) in recent.rev().enumerate() {
        match counts.iter_mut().find(|(n, ..)| *n == name) {
            Some(entry) => entry.1 += 1,
            None => counts.push((name, 1, age)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    counts
        .into_iter()
        .flat_map(|(name, ..)| checkpoint_keys(name))
        .take(RECENT_MODELS)
        .collect()
}

/// The catalog keys a checkpoint name (`ckpt_name`) stands for.
fn checkpoint_keys(name: &str) -> Vec<String> {
    super::workflow::ModelRef {
        node: String::new(),
        input: "ckpt_name".into(),
        name: name.into(),
    }
    .candidate_keys()
}

/// What the operator reports about a fleet, as the gateway last read it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetSignal {
    /// `NoCapacity`'s message while pods wait for nodes that cannot come.
    pub no_capacity: Option<String>,
    pub cold_start: Option<ColdStart>,
}

#[derive(Default)]
pub struct FleetSignals(RwLock<HashMap<String, FleetSignal>>);

impl FleetSignals {
    pub fn get(&self, fleet: &str) -> FleetSignal {
        self.0
            .read()
            .map(|m| m.get(fleet).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn set(&self, fleet: &str, signal: FleetSignal) {
        if let Ok(mut m) = self.0.write() {
            m.insert(fleet.to_string(), signal);
        }
    }
}

/// The signal in a fleet's status.
pub fn signal_of(cud: &ComfyUIDeployment) -> FleetSignal {
    let status = cud.status.as_ref();
    FleetSignal {
        no_capacity: status
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == CAPACITY_AVAILABLE))
            .filter(|c| c.status == "False")
            .map(|c| c.message.clone()),
        cold_start: status
            .and_then(|s| s.autoscaling.as_ref())
            .and_then(|a| a.cold_start.clone()),
    }
}

/// The cold-start phases a job that waited on the fleet's start carries in its timings:
/// the start's first pod became ready after the job came in and before it started.
pub fn phases_for(cold: &ColdStart, created_at_ms: u64, started_at_ms: u64) -> Option<Value> {
    let ready = cold.ready_at.as_ref()?.0.as_millisecond();
    // The first pod came up while the job waited (ready_at has second precision).
    if ready + 1000 < created_at_ms as i64 || ready > started_at_ms as i64 + 1000 {
        return None;
    }
    Some(json!({
        "node_seconds": cold.node_seconds,
        "models_seconds": cold.models_seconds,
        "image_seconds": cold.image_seconds,
        "ready_seconds": cold.ready_seconds,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn cold(started: i64, ready: Option<i64>) -> ColdStart {
        ColdStart {
            started_at: Time(Timestamp::from_millisecond(started).unwrap()),
            ready_at: ready.map(|r| Time(Timestamp::from_millisecond(r).unwrap())),
            node_seconds: Some(30.0),
            node_ready_seconds: None,
            gpu_seconds: None,
            models_seconds: Some(20.0),
            image_seconds: Some(5.0),
            ready_seconds: Some(10.0),
        }
    }

    #[test]
    fn a_job_carries_the_phases_of_the_start_it_waited_on_only() {
        let c = cold(10_300, Some(75_000));
        let phases = phases_for(&c, 10_000, 75_400).unwrap();
        assert_eq!(phases["node_seconds"], 30.0);
        // Came in after the pod was ready: it waited on nothing.
        assert!(phases_for(&c, 80_000, 80_100).is_none());
        // A job that came in while the fleet was starting waited on that start too.
        assert!(phases_for(&cold(1_000, Some(75_000)), 10_000, 75_400).is_some());
        // A start that ended long before the job is not its own.
        assert!(phases_for(&c, 90_000, 90_100).is_none());
        assert!(phases_for(&cold(10_300, None), 10_000, 75_400).is_none());
    }

    #[test]
    fn the_signal_reads_no_capacity_and_the_cold_start() {
        let cud: ComfyUIDeployment = serde_json::from_value(json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "metadata": {"name": "f"}, "spec": {"image": "i"},
            "status": {"conditions": [{"type": "CapacityAvailable", "status": "False", "reason": "NoCapacity",
                "message": "NodePool f holds 4 of its 4", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "autoscaling": {"desiredReplicas": 1, "coldStart": {"startedAt": "2026-01-01T00:00:00Z"}}},
        }))
        .unwrap();
        let s = signal_of(&cud);
        assert_eq!(
            s.no_capacity.as_deref(),
            Some("NodePool f holds 4 of its 4")
        );
        assert!(s.cold_start.is_some());
    }

    #[test]
    fn recent_models_are_the_most_used_checkpoints_the_latest_first_on_a_tie() {
        let names = [
            "a.safetensors",
            "b.safetensors",
            "b.safetensors",
            "c.safetensors",
        ];
        assert_eq!(
            recent_models(names.iter().copied()),
            vec![
                "checkpoints/b.safetensors",
                "checkpoints/c.safetensors",
                "checkpoints/a.safetensors"
            ]
        );
        let many: Vec<String> = (0..20).map(|i| format!("m{i}.safetensors")).collect();
        let top = recent_models(many.iter().map(String::as_str));
        assert_eq!(top.len(), RECENT_MODELS);
        assert_eq!(top[0], "checkpoints/m19.safetensors");
    }
}
