//! The gateway's Prometheus metrics: what autoscaling (and a KEDA ScaledObject) reads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FleetLabels {
    pub fleet: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub fleet: String,
    pub state: String,
}

pub struct GatewayMetrics {
    registry: Registry,
    /// Jobs waiting for a pod (not yet handed to one).
    pub queued: Family<FleetLabels, Gauge>,
    /// Jobs handed to a pod and not finished (running or prefetched).
    pub in_flight: Family<FleetLabels, Gauge>,
    /// Ready pods the gateway dispatches to.
    pub pods: Family<FleetLabels, Gauge>,
    pub queue_seconds: Family<FleetLabels, Histogram>,
    pub run_seconds: Family<FleetLabels, Histogram>,
    pub dispatch_errors: Family<FleetLabels, Counter>,
    pub finished: Family<FinishedLabels, Counter>,
    /// Bytes used and in all on the job store's volume (its claim).
    pub store_used_bytes: Gauge,
    pub store_capacity_bytes: Gauge,
    /// Store writes that failed (the jobs in them were not acknowledged).
    pub store_errors: Counter,
    /// Finished jobs deleted by retention.
    pub pruned: Counter,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sdfleet_gateway");
        let seconds = || Histogram::new(exponential_buckets(0.01, 2.0, 18));
        let m = GatewayMetrics {
            queued: Family::default(),
            in_flight: Family::default(),
            pods: Family::default(),
            queue_seconds: Family::new_with_constructor(seconds),
            run_seconds: Family::new_with_constructor(seconds),
            dispatch_errors: Family::default(),
            finished: Family::default(),
            store_used_bytes: Gauge::default(),
            store_capacity_bytes: Gauge::default(),
            store_errors: Counter::default(),
            pruned: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("queued_jobs", "Jobs waiting for a pod", m.queued.clone());
        registry.register(
            "in_flight_jobs",
            "Jobs on a pod (running or prefetched)",
            m.in_flight.clone(),
        );
        registry.register(
            "ready_pods",
            "Pods the gateway dispatches to",
            m.pods.clone(),
        );
        registry.register(
            "queue_seconds",
            "Time from submit to start on a pod",
            m.queue_seconds.clone(),
        );
        registry.register(
            "run_seconds",
            "Time from start to a final state",
            m.run_seconds.clone(),
        );
        registry.register(
            "dispatch_errors",
            "Hand-offs to a pod that failed",
            m.dispatch_errors.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs ended, by final state",
            m.finished.clone(),
        );
        registry.register(
            "store_used_bytes",
            "Bytes used on the job store's volume",
            m.store_used_bytes.clone(),
        );
        registry.register(
            "store_capacity_bytes",
            "Size of the job store's volume",
            m.store_capacity_bytes.clone(),
        );
        registry.register(
            "store_errors",
            "Job store writes that failed (their jobs were not acknowledged)",
            m.store_errors.clone(),
        );
        registry.register(
            "store_pruned_jobs",
            "Finished jobs deleted by retention",
            m.pruned.clone(),
        );
        GatewayMetrics { registry, ..m }
    }
}

impl GatewayMetrics {
    pub fn fleet(fleet: &str) -> FleetLabels {
        FleetLabels {
            fleet: fleet.to_string(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
