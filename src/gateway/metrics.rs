//! The gateway's Prometheus metrics: what autoscaling (and a KEDA ScaledObject) reads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FleetLabels {
    pub fleet: String,
}

/// A fair share (an API key, or the group its entry names) of one fleet.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShareLabels {
    pub fleet: String,
    pub share: String,
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
    /// Jobs handed back to the queue after their pod lost them: they run again
    /// (delivery is at least once), each with its reason in the job's history.
    pub requeued: Family<FleetLabels, Counter>,
    pub finished: Family<FinishedLabels, Counter>,
    /// Bytes used and in all on the job store's volume (its claim).
    pub store_used_bytes: Gauge,
    pub store_capacity_bytes: Gauge,
    /// Store writes that failed (the jobs in them were not acknowledged).
    pub store_errors: Counter,
    /// Finished jobs deleted by retention.
    pub pruned: Counter,
    /// With a shared store: 1 while this replica holds the dispatch lease.
    pub lease_held: Gauge,
    /// Times this replica took the lease (and with it the pods and the queue).
    pub lease_takeovers: Counter,
    /// Per fair share: jobs waiting, jobs on pods, and the seconds its started jobs
    /// waited (a counter: its rate over the rate of started jobs is the mean wait).
    pub share_queued: Family<ShareLabels, Gauge>,
    pub share_in_flight: Family<ShareLabels, Gauge>,
    pub share_waited_seconds: Family<ShareLabels, Counter<f64, AtomicU64>>,
    pub share_started: Family<ShareLabels, Counter>,
    /// Shares that had a gauge set, so that an emptied one reads 0, not its last value.
    pub shares_seen: Mutex<HashSet<ShareLabels>>,
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
            requeued: Family::default(),
            finished: Family::default(),
            store_used_bytes: Gauge::default(),
            store_capacity_bytes: Gauge::default(),
            store_errors: Counter::default(),
            pruned: Counter::default(),
            lease_held: Gauge::default(),
            lease_takeovers: Counter::default(),
            share_queued: Family::default(),
            share_in_flight: Family::default(),
            share_waited_seconds: Family::default(),
            share_started: Family::default(),
            shares_seen: Mutex::default(),
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
            "jobs_requeued",
            "Jobs handed back to the queue after their pod lost them (run again)",
            m.requeued.clone(),
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
            "lease_held",
            "1 while this replica holds the dispatch lease (shared store)",
            m.lease_held.clone(),
        );
        registry.register(
            "lease_takeovers",
            "Times this replica took the dispatch lease",
            m.lease_takeovers.clone(),
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
        registry.register(
            "share_queued_jobs",
            "Jobs waiting for a pod, per fair share (API key or group)",
            m.share_queued.clone(),
        );
        registry.register(
            "share_in_flight_jobs",
            "Jobs on a pod, per fair share",
            m.share_in_flight.clone(),
        );
        registry.register(
            "share_waited_seconds",
            "Seconds from submit to start of the share's started jobs",
            m.share_waited_seconds.clone(),
        );
        registry.register(
            "share_started_jobs",
            "Jobs of the share that started on a pod",
            m.share_started.clone(),
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
