//! sdfleet: a Kubernetes operator that runs GPU ComfyUI fleets on Amazon EKS.
//!
//! Layers import only downward: `controller` and `agent` → `render` → `crd` → `sync`
//! → `names`, `aws` (see `tests/layers.rs`, which checks it).

pub mod agent;
pub mod aws;
pub mod cmd;
pub mod controller;
pub mod crd;
pub mod csi;
pub mod docs;
pub mod effective;
pub mod gateway;
pub mod image_snapshot;
pub mod latency;
pub mod leader;
#[cfg(test)]
pub mod mock_apiserver;
pub mod names;
pub mod policy;
pub mod render;
pub mod storage;
pub mod sync;
pub mod telemetry;
pub mod watch;
