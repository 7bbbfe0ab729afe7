//! What every handler shares: the engine, the keys, the fleets and the limits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::gateway::auth::ApiKeys;
use crate::gateway::discovery::Catalogs;
use crate::gateway::engine::Engine;

/// A fleet this gateway fronts.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub name: String,
    /// The Service whose EndpointSlices list the fleet's pods.
    pub service: String,
    pub model_set: Option<String>,
}

pub struct ApiState {
    pub engine: Arc<Engine>,
    pub keys: Arc<ApiKeys>,
    pub fleets: Vec<FleetConfig>,
    pub catalogs: Arc<Catalogs>,
    /// Stored workflows: `<name>.json` (API format).
    pub workflows_dir: Option<PathBuf>,
    /// The longest a sync request waits before it answers with the job's URL.
    pub max_wait: Duration,
    /// With autoscaling: the longest a sync request waits on a fleet with no ready pod.
    pub max_cold_start_wait: Option<Duration>,
}
