//! The ComfyUIDeployment reconciler: `watches` (what starts a reconcile), `reconcile`
//! (the pipeline, one call per step), `apply` (children applied and pruned), `scale`
//! (autoscaling), `observe` and `status` (the facts, and the status from them), `report`
//! (status writes and events). Deletion runs through a finalizer and `cleanup`, which
//! removes children in stages.

pub mod apply;
pub mod autoscale;
pub mod cleanup;
pub mod observe;
pub mod reconcile;
pub mod report;
pub mod scale;
pub mod status;
#[cfg(test)]
mod tests;
pub mod watches;

use std::time::Duration;

use kube::core::DeserializeGuard;

use crate::crd::ComfyUIDeployment;
use crate::telemetry::ControllerName;

pub const FINALIZER: &str = "sdfleet.io/cleanup";
/// First and longest wait between looks at a fleet whose children are being deleted.
pub(super) const CLEANUP_POLL: (Duration, Duration) =
    (Duration::from_secs(2), Duration::from_secs(30));
pub(super) type Guarded = DeserializeGuard<ComfyUIDeployment>;
pub(super) const FLEET: ControllerName = ControllerName::ComfyUIDeployment;
