//! sdfleet: a Kubernetes operator that runs GPU ComfyUI fleets on Amazon EKS.

pub mod agent;
pub mod cloud;
pub mod controller;
pub mod crd;
pub mod docs;
pub mod leader;
pub mod render;
pub mod sync;
pub mod telemetry;
