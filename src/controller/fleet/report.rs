//! What the fleet reconciler tells the user: the status, written only when it changed
//! (an unreadable object's too), and Events.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::status::FleetObservation;
use crate::controller::runtime::conditions::{
    self, DEGRADED, DesiredCondition, PROGRESSING, READY, Reason,
};
use crate::controller::runtime::context::Context;
use crate::controller::runtime::error::Error;
use crate::controller::runtime::status as status_writer;
use crate::crd::ComfyUIDeployment;
use crate::crd::comfyui::ComfyUIDeploymentStatus;
use crate::names::FleetNames;

pub const KIND: &str = "ComfyUIDeployment";

pub fn fleet_names(cud: &ComfyUIDeployment) -> FleetNames {
    FleetNames::new(&cud.namespace().unwrap_or_default(), &cud.name_any())
}

/// Ready, Progressing and Degraded all false/true with one reason: the fleet is stuck.
pub fn stuck(reason: Reason, message: &str) -> Vec<DesiredCondition> {
    vec![
        DesiredCondition::new(READY, false, reason, message),
        DesiredCondition::new(PROGRESSING, false, reason, message),
        DesiredCondition::new(DEGRADED, true, reason, message),
    ]
}

/// A status whose only change is in its conditions' messages (nodes or replicas being
/// counted up) is written at most this often per fleet: with 1,000 nodes reporting, every
/// report would otherwise be a status write. A condition that changes its status or
/// reason, and every other field, is written at once.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// What `write_status` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    /// Written, or already as stored.
    Done,
    /// Only progress changed, and the fleet's status was written less than
    /// `PROGRESS_INTERVAL` ago: look again after this long.
    Deferred(Duration),
}

/// Writes the fleet's status when it differs from what is stored (progress alone at
/// most every `PROGRESS_INTERVAL`).
pub async fn write_status(
    ctx: &Context,
    cud: &ComfyUIDeployment,
    conditions: &[DesiredCondition],
    observation: Option<&FleetObservation>,
) -> Result<StatusWrite, Error> {
    let fleet = fleet_names(cud);
    let key = format!("{}/{}", fleet.namespace, fleet.name);
    let cached_version = cud.metadata.resource_version.as_deref();
    // Under load the watch can lag our own last write: then that write is what is
    // stored, and the next one is computed over it. Not with autoscaling: its decision
    // was made from the cached status (belowSince, the last decision, the cold start),
    // and a decision from a stale copy must be refused (409) and made again.
    let behind = match cud.spec.autoscaling {
        None => ctx.status_writes.newer_than(&key, cached_version),
        Some(_) => None,
    };
    let (previous, computed_from) = match behind {
        Some((status, version)) => (status, Some(version)),
        None => (
            cud.status.clone().unwrap_or_default(),
            cached_version.map(String::from),
        ),
    };
    let mut next = merged(&previous, cud.metadata.generation, conditions);
    next.selector = Some(fleet.pod_selector_string());
    next.node_pool = Some(fleet.nodepool());
    next.node_class = Some(fleet.node_class());
    if let Some(o) = observation {
        next.replicas = o.replicas;
        next.ready_replicas = o.ready_replicas;
        next.endpoint = o.endpoint.clone();
        next.gateway = o.gateway.clone();
        next.autoscaling = o.autoscaling.clone();
        if o.autoscaling.is_none() {
            next.conditions
                .retain(|c| c.type_ != crate::controller::runtime::conditions::CAPACITY_AVAILABLE);
        }
        if o.gateway.is_none() {
            // A removed gateway leaves no condition behind.
            next.conditions
                .retain(|c| c.type_ != crate::controller::runtime::conditions::GATEWAY_READY);
        }
    }
    // Without autoscaling the gateway publishes no demand: a left-over copy goes.
    let clear_demand = cud.spec.autoscaling.is_none();
    if clear_demand {
        next.demand = None;
    }
    if only_progress(&previous, &next)
        && let Some(wait) = ctx.status_writes.too_soon(&key, PROGRESS_INTERVAL)
    {
        return Ok(StatusWrite::Deferred(wait));
    }
    let api = ctx.raw_api::<ComfyUIDeployment>(&fleet.namespace);
    let wrote = status_writer::patch_if_changed(
        &api,
        &ctx.metrics,
        KIND,
        &fleet.name,
        (&previous, computed_from.as_deref()),
        &next,
        // A merge patch keeps a field it does not name: a gone endpoint, gateway or
        // autoscaling status must be sent as null to leave the stored status. The
        // demand is the gateway's (its own field manager): never sent, so a stale copy
        // read with the object cannot overwrite a newer one.
        |fields| {
            if clear_demand {
                fields.insert("demand".into(), serde_json::Value::Null);
            } else {
                fields.remove("demand");
            }
            for key in ["endpoint", "gateway", "autoscaling"] {
                fields.entry(key).or_insert(serde_json::Value::Null);
            }
        },
    )
    .await?;
    if let Some(version) = wrote {
        ctx.status_writes
            .wrote(&key, computed_from.as_deref(), version, next);
    }
    Ok(StatusWrite::Done)
}

/// Whether `next` differs from `previous` in its conditions' messages and nowhere else.
fn only_progress(previous: &ComfyUIDeploymentStatus, next: &ComfyUIDeploymentStatus) -> bool {
    if previous == next || previous.conditions.len() != next.conditions.len() {
        return false;
    }
    let mut without_messages = next.clone();
    for (n, p) in without_messages
        .conditions
        .iter_mut()
        .zip(&previous.conditions)
    {
        n.message = p.message.clone();
    }
    &without_messages == previous
}

/// `previous` with this generation and `conditions` merged in.
fn merged(
    previous: &ComfyUIDeploymentStatus,
    generation: Option<i64>,
    conditions: &[DesiredCondition],
) -> ComfyUIDeploymentStatus {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut next = previous.clone();
    next.observed_generation = generation;
    next.conditions = conditions::merge(&previous.conditions, conditions, generation, &now);
    next
}

/// InvalidSpec on an object that cannot be read as a ComfyUIDeployment. Its stored
/// status is read raw, so that an unchanged result writes nothing.
pub async fn mark_invalid(ctx: &Context, meta: &ObjectMeta, message: &str) -> Result<(), Error> {
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let api = ctx.raw_api::<ComfyUIDeployment>(&namespace);
    let Some((previous, generation)) =
        status_writer::stored::<ComfyUIDeploymentStatus>(&api, &name).await?
    else {
        return Ok(());
    };
    let next = merged(&previous, generation, &stuck(Reason::InvalidSpec, message));
    status_writer::patch_if_changed(
        &api,
        &ctx.metrics,
        KIND,
        &name,
        (&previous, None),
        &next,
        |_| {},
    )
    .await?;
    Ok(())
}

pub fn publish(ctx: &Context, cud: &ComfyUIDeployment, type_: EventType, reason: &str, note: &str) {
    let reference: ObjectReference = cud.object_ref(&());
    ctx.publish(&reference, type_, reason, note);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::runtime::conditions::MODELS_READY;
    use crate::controller::runtime::context::StatusWrites;

    fn status(ready: bool, message: &str) -> ComfyUIDeploymentStatus {
        let at = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let reason = if ready {
            Reason::ModelsSynced
        } else {
            Reason::Syncing
        };
        ComfyUIDeploymentStatus {
            conditions: conditions::merge(
                &[],
                &[DesiredCondition::new(MODELS_READY, ready, reason, message)],
                Some(1),
                &at,
            ),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_counted_message_is_progress() {
        let before = status(false, "1/5 nodes at r2");
        assert!(only_progress(&before, &status(false, "2/5 nodes at r2")));
        // Nothing changed: nothing to write, so nothing to space out.
        assert!(!only_progress(&before, &before.clone()));
        // A condition that turns is written at once.
        assert!(!only_progress(&before, &status(true, "5/5 nodes at r2")));
        let mut replicas = status(false, "2/5 nodes at r2");
        replicas.ready_replicas = 3;
        assert!(!only_progress(&before, &replicas));
    }

    #[test]
    fn a_write_spaces_out_the_next_progress_only() {
        let writes = StatusWrites::default();
        assert_eq!(writes.too_soon("ns/f", PROGRESS_INTERVAL), None);
        writes.wrote("ns/f", Some("1"), "2".into(), status(false, "a"));
        let left = writes.too_soon("ns/f", PROGRESS_INTERVAL).unwrap();
        assert!(left <= PROGRESS_INTERVAL && left > Duration::from_secs(4));
        assert_eq!(writes.too_soon("ns/other", PROGRESS_INTERVAL), None);
        assert_eq!(writes.too_soon("ns/f", Duration::ZERO), None);
    }

    #[test]
    fn a_cache_behind_our_own_writes_reads_as_the_last_write() {
        let writes = StatusWrites::default();
        writes.wrote("ns/f", Some("1"), "2".into(), status(false, "a"));
        writes.wrote("ns/f", Some("2"), "3".into(), status(false, "b"));
        // The cache still holds a version our writes replaced: the last write stands.
        for behind in ["1", "2"] {
            let (status, version) = writes.newer_than("ns/f", Some(behind)).unwrap();
            assert_eq!(version, "3");
            assert_eq!(status.conditions[0].message, "b");
        }
        // Someone else's write (a version we never replaced) is the cache's to give.
        assert_eq!(writes.newer_than("ns/f", Some("9")), None);
        // Caught up: the replaced versions are forgotten.
        assert_eq!(writes.newer_than("ns/f", Some("3")), None);
        assert_eq!(writes.newer_than("ns/f", Some("1")), None);
        assert_eq!(writes.newer_than("ns/g", Some("1")), None);
    }
}
