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
        Metrics {
            latency: Default::default(),
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

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
