//! Shared by the integration tests, by concern: the testbed and namespaces, the sdfleet
//! processes, HTTP, the Helm chart's identities, AWS on moto. Each test binary uses a
//! part of it, so unused items are expected per binary.
#![allow(dead_code, unused_imports)]

pub mod aws;
pub mod chart;
pub mod fake_comfyui;
pub mod fleet;
pub mod gateway;
pub mod http;
pub mod process;
pub mod testbed;

pub use aws::*;
pub use chart::*;
pub use http::*;
pub use process::*;
pub use testbed::*;
