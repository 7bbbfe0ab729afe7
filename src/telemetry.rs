//! Logs (tracing, JSON on request), Prometheus metrics, and the health endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Sets up logging. `RUST_LOG` filters (default `info`); `json` switches to JSON lines.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Which reconciler a reconcile metric is about, so that each has its own p99.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ControllerName {
    ComfyUIDeployment,
    ModelSet,
}

impl ControllerName {
    pub fn as_str(self) -> &'static str {
        match self {
            ControllerName::ComfyUIDeployment => "comfyuideployment",
            ControllerName::ModelSet => "modelset",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub controller: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub controller: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub verb: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FleetLabels {
    pub namespace: String,
    pub name: String,
}

/// The phases of a cold start, in order (`status.autoscaling.coldStart`).
pub const COLD_START_PHASES: [&str; 6] = ["node", "node_ready", "gpu", "models", "image", "ready"];

/// One phase of a cold start (`COLD_START_PHASES`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScalingLabels {
    pub namespace: String,
    pub name: String,
    /// `up` or `down`.
    pub direction: String,
    /// `Demand`, `Idle` or `Bounds`.
    pub reason: String,
}

/// The controller's metrics, served on `/metrics`.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub writes: Family<WriteLabels, Counter>,
    pub drift_repairs: Counter,
    /// Events dropped because the publisher's queue was full.
    pub events_dropped: Counter,
    pub desired_replicas: Family<FleetLabels, Gauge>,
    pub ready_replicas: Family<FleetLabels, Gauge>,
    pub scaling_decisions: Family<ScalingLabels, Counter>,
    /// The nodes of each fleet's NodePool, as the dashboards and alerts read them.
    pub nodes: FleetNodeGauges,
    /// 1 while an autoscaled fleet's pods get nodes (`CapacityAvailable`), 0 when not.
    pub capacity_available: Family<FleetLabels, Gauge>,
    /// Seconds of each phase of completed cold starts, all fleets together (a
    /// per-fleet histogram would cost a few dozen series a fleet).
    pub cold_start_phases: Family<PhaseLabels, Histogram>,
    /// Seconds from the scale-up decision to the first ready pod.
    pub cold_start_seconds: Histogram,
    /// The cold start each fleet last counted (its `startedAt`): a status read again
    /// before the watch brings our write back must not count it twice.
    cold_starts_counted: std::sync::Mutex<std::collections::HashMap<FleetLabels, String>>,
    /// The catalog of each ModelSet (labels: its namespace and name): what every node
    /// of a fleet using it must hold.
    pub modelset_bytes: Family<FleetLabels, Gauge>,
    pub modelset_models: Family<FleetLabels, Gauge>,
    /// Raw reconcile and queue-to-done samples (`/debug/latency`).
    pub latency: crate::latency::Latency,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sdfleet");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result (success, error)",
            reconciles.clone(),
        );
        let errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile errors by controller and reason",
            errors.clone(),
        );
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            });
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile, by controller",
            reconcile_duration.clone(),
        );
        let writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "kube_writes",
            "Write requests sent to the apiserver, by verb and kind",
            writes.clone(),
        );
        let drift_repairs = Counter::default();
        registry.register(
            "drift_repairs",
            "Children changed or deleted by hand that were put back",
            drift_repairs.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Events not published: the publisher's queue was full",
            events_dropped.clone(),
        );
        let desired_replicas = Family::<FleetLabels, Gauge>::default();
        registry.register(
            "fleet_desired_replicas",
            "Replicas each fleet's Deployment is given (spec.replicas, or the autoscaler's)",
            desired_replicas.clone(),
        );
        let ready_replicas = Family::<FleetLabels, Gauge>::default();
        registry.register(
            "fleet_ready_replicas",
            "Ready ComfyUI pods of each fleet",
            ready_replicas.clone(),
        );
        let scaling_decisions = Family::<ScalingLabels, Counter>::default();
        registry.register(
            "fleet_scaling_decisions",
            "Autoscaling changes of replicas, by fleet, direction and reason",
            scaling_decisions.clone(),
        );
        let nodes = FleetNodeGauges::default();
        for (name, help, family) in [
            (
                "fleet_nodes",
                "Nodes of each fleet's NodePool",
                &nodes.total,
            ),
            (
                "fleet_ready_nodes",
                "Nodes of each fleet that are Ready",
                &nodes.ready,
            ),
            (
                "fleet_startup_tainted_nodes",
                "Nodes of each fleet still carrying the startup taint sdfleet.io/models-not-ready",
                &nodes.tainted,
            ),
            (
                "fleet_synced_nodes",
                "Nodes of each fleet that hold its ModelSet's revision",
                &nodes.synced,
            ),
            (
                "fleet_sync_failed_nodes",
                "Nodes of each fleet whose last model sync failed",
                &nodes.failed,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        let capacity_available = Family::<FleetLabels, Gauge>::default();
        registry.register(
            "fleet_capacity_available",
            "1 while an autoscaled fleet's pods get nodes (CapacityAvailable), else 0",
            capacity_available.clone(),
        );
        let cold_start_phases =
            Family::<PhaseLabels, Histogram>::new_with_constructor(cold_start_histogram);
        // The phases are known: their series exist from the start, so that the first cold
        // start is an increase (not a new series a rate misses) and panels show 0.
        for phase in COLD_START_PHASES {
            drop(cold_start_phases.get_or_create(&PhaseLabels {
                phase: phase.into(),
            }));
        }
        registry.register(
            "fleet_cold_start_phase_seconds",
            "Phases of completed cold starts: node (launch), models (sync, until scheduled), image (pull and start), ready (ComfyUI loading)",
            cold_start_phases.clone(),
        );
        let cold_start_seconds = cold_start_histogram();
        registry.register(
            "fleet_cold_start_seconds",
            "Completed cold starts, from the scale-up decision to the first ready pod",
            cold_start_seconds.clone(),
        );
        let modelset_bytes = Family::<FleetLabels, Gauge>::default();
        registry.register(
            "modelset_catalog_bytes",
            "Bytes of each ModelSet's catalog at its last listing",
            modelset_bytes.clone(),
        );
        let modelset_models = Family::<FleetLabels, Gauge>::default();
        registry.register(
            "modelset_catalog_models",
            "Models in each ModelSet's catalog at its last listing",
            modelset_models.clone(),
        );
        Metrics {
            latency: Default::default(),
            nodes,
            capacity_available,
            cold_start_phases,
            cold_start_seconds,
            cold_starts_counted: Default::default(),
            modelset_bytes,
            modelset_models,
            scaling_decisions,
            registry,
            reconciles,
            errors,
            reconcile_duration,
            writes,
            drift_repairs,
            events_dropped,
            desired_replicas,
            ready_replicas,
        }
    }
}

impl Metrics {
    /// One reconcile: its duration and whether it succeeded.
    pub fn record_reconcile(
        &self,
        controller: ControllerName,
        took: std::time::Duration,
        ok: bool,
    ) {
        let controller = controller.as_str().to_string();
        self.reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: controller.clone(),
            })
            .observe(took.as_secs_f64());
        let result = if ok { "success" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels {
                controller,
                result: result.into(),
            })
            .inc();
    }

    /// One failed reconcile, by its error's reason.
    pub fn record_error(&self, controller: ControllerName, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabels {
                controller: controller.as_str().into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn record_write(&self, verb: &str, kind: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                verb: verb.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// A completed cold start of `fleet`, counted once per `started` (its start time):
    /// each phase's seconds and their sum.
    pub fn record_cold_start(&self, fleet: &FleetLabels, started: &str, phases: &[(&str, f64)]) {
        {
            let mut counted = self
                .cold_starts_counted
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if counted.get(fleet).map(String::as_str) == Some(started) {
                return;
            }
            counted.insert(fleet.clone(), started.to_string());
        }
        for (phase, seconds) in phases {
            self.cold_start_phases
                .get_or_create(&PhaseLabels {
                    phase: phase.to_string(),
                })
                .observe(*seconds);
        }
        self.cold_start_seconds
            .observe(phases.iter().map(|(_, s)| s).sum());
    }

    /// Drops a deleted fleet's series, so that no gauge (nor an alert on it) outlives it.
    pub fn forget_fleet(&self, fleet: &FleetLabels) {
        for family in [
            &self.desired_replicas,
            &self.ready_replicas,
            &self.capacity_available,
            &self.nodes.total,
            &self.nodes.ready,
            &self.nodes.tainted,
            &self.nodes.synced,
            &self.nodes.failed,
        ] {
            family.remove(fleet);
        }
        self.cold_starts_counted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(fleet);
    }

    /// Drops a deleted ModelSet's series.
    pub fn forget_modelset(&self, model_set: &FleetLabels) {
        self.modelset_bytes.remove(model_set);
        self.modelset_models.remove(model_set);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// 0.5 s to about 68 min: from a node that was there already to a slow launch and sync.
fn cold_start_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.5, 2.0, 14))
}

/// Counts of a fleet's nodes, one gauge each (a node can be in several at once: ready
/// and still tainted, so one family with a state label would not sum to the total).
#[derive(Default)]
pub struct FleetNodeGauges {
    pub total: Family<FleetLabels, Gauge>,
    pub ready: Family<FleetLabels, Gauge>,
    pub tainted: Family<FleetLabels, Gauge>,
    pub synced: Family<FleetLabels, Gauge>,
    pub failed: Family<FleetLabels, Gauge>,
}

/// The counts `FleetNodeGauges` publishes for one fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    pub total: i64,
    pub ready: i64,
    pub tainted: i64,
    pub synced: i64,
    pub failed: i64,
}

impl FleetNodeGauges {
    pub fn set(&self, fleet: &FleetLabels, counts: NodeCounts) {
        self.total.get_or_create(fleet).set(counts.total);
        self.ready.get_or_create(fleet).set(counts.ready);
        self.tainted.get_or_create(fleet).set(counts.tainted);
        self.synced.get_or_create(fleet).set(counts.synced);
        self.failed.get_or_create(fleet).set(counts.failed);
    }
}

/// Shared with the HTTP server: readiness flips once the controller runs.
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/debug/latency", get(latency_handler))
        .route("/readyz", get(readyz_handler))
        .with_state(health)
}

async fn metrics_handler(State(h): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

async fn latency_handler(State(h): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        h.metrics.latency.report(),
    )
}

async fn readyz_handler(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves metrics and health on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(health)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> FleetLabels {
        FleetLabels {
            namespace: "studio".into(),
            name: "sdxl".into(),
        }
    }

    #[test]
    fn a_cold_start_counts_once_and_a_deleted_fleet_leaves_no_gauge() {
        let m = Metrics::default();
        // The phases' series are there before any cold start.
        assert!(
            m.encode()
                .contains("sdfleet_fleet_cold_start_phase_seconds_count{phase=\"models\"} 0")
        );
        let phases = [
            ("node", 40.0),
            ("models", 20.0),
            ("image", 5.0),
            ("ready", 3.0),
        ];
        m.record_cold_start(&fleet(), "2026-12-04T10:00:00Z", &phases);
        // The same start, read again before the watch brought the write back.
        m.record_cold_start(&fleet(), "2026-12-04T10:00:00Z", &phases);
        let text = m.encode();
        assert!(
            text.contains("sdfleet_fleet_cold_start_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sdfleet_fleet_cold_start_seconds_sum 68.0\n"),
            "{text}"
        );
        m.record_cold_start(&fleet(), "2026-12-04T11:00:00Z", &phases);
        assert!(
            m.encode()
                .contains("sdfleet_fleet_cold_start_seconds_count 2\n")
        );

        m.nodes.set(
            &fleet(),
            NodeCounts {
                total: 2,
                ready: 1,
                ..Default::default()
            },
        );
        m.capacity_available.get_or_create(&fleet()).set(0);
        assert!(
            m.encode()
                .contains("sdfleet_fleet_ready_nodes{namespace=\"studio\",name=\"sdxl\"} 1")
        );
        m.forget_fleet(&fleet());
        let text = m.encode();
        assert!(!text.contains("name=\"sdxl\""), "{text}");
    }
}
