//! `sdfleet gateway`: a job API in front of the ComfyUI pods of a namespace's fleets. It
//! owns the queue (pods get one running plus one prefetched job), splits each pod's
//! websocket by `prompt_id`, stores every job in an embedded store, and puts results
//! in S3. One replica: the store is a local file (see the README).

pub mod api;
pub mod auth;
pub mod comfy;
pub mod demand;
pub mod discovery;
pub mod engine;
pub mod fair_share;
pub mod fleet_status;
pub mod job;
pub mod lifecycle;
pub mod metrics;
pub mod outputs;
pub mod placement;
pub mod pod_models;
pub mod replicas;
pub mod store;
pub mod webhook;
pub mod workflow;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::storage::s3::BucketLocation;

#[derive(clap::Args, Clone, Debug)]
pub struct GatewayArgs {
    /// The namespace of the fleets.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// A fleet to front: `NAME` or `NAME:MODELSET` (repeatable). Its pods are the
    /// endpoints of the Service named like the fleet.
    #[arg(long = "fleet", required = true, value_parser = parse_fleet)]
    pub fleets: Vec<api::FleetConfig>,
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,
    /// The job store (a redb file on the gateway's volume), for one replica.
    #[arg(long, default_value = "/var/lib/sdfleet-gateway/jobs.redb")]
    pub store: PathBuf,
    /// A file holding a PostgreSQL URL: the jobs live there instead, shared by several
    /// replicas, one of which holds the dispatch lease at a time.
    #[arg(long)]
    pub postgres_url_file: Option<PathBuf>,
    /// PEM certificates to trust for PostgreSQL besides the system's (RDS's CA bundle).
    #[arg(long)]
    pub postgres_ca_file: Option<PathBuf>,
    /// Where the other replicas reach this one's API (`http://<pod IP>:8080`): the lease
    /// names it, and followers send their requests there.
    #[arg(long, env = "SDFLEET_GATEWAY_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds to keep serving after SIGTERM before closing the listener: a pod's
    /// endpoints leave the Service's load balancing a moment after it is told to stop,
    /// and a request sent to it meanwhile would be refused.
    #[arg(long, default_value_t = 0)]
    pub shutdown_delay_seconds: u64,
    /// Seconds the dispatch lease lasts without renewal: a dead replica's pods are taken
    /// over after at most this (plus one renewal period).
    #[arg(long, default_value_t = 5)]
    pub lease_seconds: u64,
    /// Directory of API keys (the mounted Secret: key id → SHA-256 hex of the key, with
    /// ` admin` after it for a key that sees every job).
    #[arg(
        long,
        default_value = "/etc/sdfleet-gateway/api-keys",
        conflicts_with = "no_auth"
    )]
    pub api_keys_dir: PathBuf,
    /// Serve without API keys (only behind something that authenticates).
    #[arg(long)]
    pub no_auth: bool,
    /// A file holding the Standard Webhooks secret (`whsec_...`).
    #[arg(long)]
    pub webhook_secret_file: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub webhook_attempts: u32,
    #[arg(long, default_value = "1000")]
    pub webhook_first_delay_ms: u64,
    /// A range webhooks may reach although it is refused by default (loopback,
    /// private, link-local, ...), e.g. `10.20.0.0/16` (repeatable).
    #[arg(long = "webhook-allow-cidr", value_parser = parse_cidr)]
    pub webhook_allow_cidrs: Vec<ipnet::IpNet>,
    /// Stored workflows (`<name>.json`, API format).
    #[arg(long)]
    pub workflows_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub queue_cap: usize,
    /// A job that has not started this long after submit ends `expired`.
    #[arg(long, default_value_t = 3600)]
    pub job_ttl_seconds: u64,
    #[arg(long, default_value_t = 300)]
    pub max_wait_seconds: u64,
    #[arg(long, default_value_t = 2)]
    pub pod_slots: usize,
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    #[arg(long, value_enum, default_value = "affinity")]
    pub placement: placement::Placement,
    /// Seconds a pod may be unreachable before its jobs go to other pods.
    #[arg(long, default_value_t = 10)]
    pub pod_lost_seconds: u64,
    /// The outputs bucket (results go under `<prefix><job id>/`); unset: outputs stay
    /// on the pods and jobs list them without URLs.
    #[arg(long)]
    pub outputs_bucket: Option<String>,
    #[arg(long, default_value = "")]
    pub outputs_prefix: String,
    #[arg(long)]
    pub outputs_region: Option<String>,
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// Buckets `s3://` inputs may come from (repeatable).
    #[arg(long = "input-bucket")]
    pub input_buckets: Vec<String>,
    #[arg(long, default_value_t = 3600)]
    pub url_ttl_seconds: u64,
    /// Reach an endpoint at another address: `IP:PORT=HOST:PORT` (repeatable). For tests,
    /// whose fake pods listen on loopback while EndpointSlices refuse loopback addresses.
    #[arg(long = "endpoint-map", hide = true, value_parser = parse_mapping)]
    pub endpoint_map: Vec<(String, String)>,
    /// The same as a file of `IP:PORT=HOST:PORT` or `POD=HOST:PORT` lines, read again
    /// every half second. For tests whose pods appear while the gateway runs.
    #[arg(long, hide = true)]
    pub endpoint_map_file: Option<PathBuf>,
    /// Publish each fleet's demand into its status (the fleet has `spec.autoscaling`),
    /// and read back its capacity and cold starts.
    #[arg(long)]
    pub publish_demand: bool,
    /// With `--publish-demand`: the longest a sync request waits on a fleet with no
    /// ready pod.
    #[arg(long, default_value_t = 30)]
    pub max_cold_start_wait_seconds: u64,
    /// The websocket client id on every pod. Unset: `sdfleet-gateway-<random>`, one per
    /// process, because ComfyUI keeps one socket per client id and a second process with
    /// the same id (a rollout's new pod) would take the first one's events. A restarted
    /// gateway learns how the prompts it sent before ended from `/queue` and `/history`.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Seconds a pod's websocket may stay silent, pings unanswered, before the pod counts
    /// as unreachable (a node that died without a TCP reset).
    #[arg(long, default_value_t = 30)]
    pub pod_silence_seconds: u64,
    /// Seconds between asking a busy pod about its jobs (`/queue`, `/history`).
    #[arg(long, default_value_t = 5)]
    pub resync_seconds: u64,
    /// A job running longer is interrupted and fails `run_timeout` (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_run_seconds: u64,
    /// Finished jobs (and their idempotency keys) are deleted this many hours after
    /// submit.
    #[arg(long, default_value_t = 168)]
    pub retention_hours: u64,
    /// At most this many jobs are kept: beyond it, the oldest finished ones go.
    #[arg(long, default_value_t = 100_000)]
    pub retention_max_jobs: usize,
    /// Seconds between retention rounds (and readings of the store's fill level).
    #[arg(long, default_value_t = 60, hide = true)]
    pub retention_interval_seconds: u64,
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    let (from, to) = s.split_once('=').ok_or("expected IP:PORT=HOST:PORT")?;
    Ok((from.to_string(), to.to_string()))
}

fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not a CIDR such as 10.0.0.0/8"))
}

fn parse_fleet(s: &str) -> Result<api::FleetConfig, String> {
    let (name, model_set) = match s.split_once(':') {
        Some((n, m)) => (n, Some(m.to_string()).filter(|m| !m.is_empty())),
        None => (s, None),
    };
    if name.is_empty() {
        return Err("empty fleet name".into());
    }
    Ok(api::FleetConfig {
        name: name.to_string(),
        service: crate::names::FleetNames::new("", name).service(),
        model_set,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Webhook(#[from] webhook::SetupError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the dispatch lease was lost: {0}")]
    LeaseLost(String),
}

pub async fn run(client: kube::Client, args: GatewayArgs) -> Result<(), GatewayError> {
    let metrics = Arc::new(metrics::GatewayMetrics::default());
    serve_metrics(args.metrics_listen, metrics.clone()).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| GatewayError::Io(args.listen.to_string(), e))?;
    tracing::info!(addr = %args.listen, "gateway serving /api/v2");
    // One reader of the keys Secret for the process, whichever router serves.
    let keys = Arc::new(auth::ApiKeys::new(
        (!args.no_auth).then(|| args.api_keys_dir.clone()),
    ));
    let reload = keys.clone();
    tokio::spawn(async move { reload.watch(Duration::from_secs(5)).await });
    if let Some(url_file) = &args.postgres_url_file {
        let url = std::fs::read_to_string(url_file)
            .map_err(|e| GatewayError::Io(url_file.display().to_string(), e))?;
        return replicas::run(
            client,
            args.clone(),
            url.trim().to_string(),
            listener,
            metrics,
            keys,
        )
        .await;
    }
    if let Some(dir) = args.store.parent() {
        std::fs::create_dir_all(dir).map_err(|e| GatewayError::Io(dir.display().to_string(), e))?;
    }
    let store = store::Store(Arc::new(store::RedbStore::open(&args.store)?));
    let leader = start(&client, &args, store, metrics, keys).await?;
    let delay = Duration::from_secs(args.shutdown_delay_seconds);
    let served = serve_until_signal(listener, leader.router, delay).await;
    leader.engine.drain(FLUSH).await;
    served
}

/// What a replica that dispatches runs: the engine with its jobs resumed from the store,
/// pod discovery, demand publishing, retention, and the API's router.
pub struct Leader {
    pub engine: Arc<engine::Engine>,
    pub router: axum::Router,
}

/// The engine, not yet running.
async fn build(
    args: &GatewayArgs,
    store: store::Store,
    metrics: Arc<metrics::GatewayMetrics>,
    keys: Arc<auth::ApiKeys>,
) -> Result<Arc<engine::Engine>, GatewayError> {
    // A pod that stops answering mid-body (a node gone without a reset) fails a read
    // after the silence limit, not at the end of a 300 s transfer deadline.
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(args.pod_silence_seconds.max(5)))
        .build()?;
    let secret = match &args.webhook_secret_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| GatewayError::Io(path.display().to_string(), e))?,
        ),
        None => None,
    };
    let webhooks = Arc::new(webhook::Webhooks::new(
        webhook::AddressPolicy::new(args.webhook_allow_cidrs.clone()),
        secret.as_deref(),
        args.webhook_attempts,
        Duration::from_millis(args.webhook_first_delay_ms),
    )?);
    let url_ttl = Duration::from_secs(args.url_ttl_seconds);
    let outputs = match &args.outputs_bucket {
        Some(bucket) => Some(
            outputs::OutputStore::connect(
                &BucketLocation {
                    bucket: bucket.clone(),
                    prefix: args.outputs_prefix.clone(),
                    region: args.outputs_region.clone(),
                    endpoint: args.s3_endpoint.clone(),
                },
                url_ttl,
            )
            .await,
        ),
        None => None,
    };
    let settings = engine::Settings {
        client_id: args
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sdfleet-gateway-{}", uuid::Uuid::new_v4().simple())),
        queue_cap: args.queue_cap,
        ttl: Duration::from_secs(args.job_ttl_seconds),
        pod_slots: args.pod_slots.max(1),
        max_attempts: args.max_attempts.max(1),
        placement: args.placement,
        lost_after: Duration::from_secs(args.pod_lost_seconds),
        orphan_grace: Duration::from_secs(args.pod_lost_seconds.max(10)),
        input_buckets: args.input_buckets.clone(),
        silence_limit: Duration::from_secs(args.pod_silence_seconds.max(1)),
        resync_every: Duration::from_secs(args.resync_seconds.max(1)),
        max_run: (args.max_run_seconds > 0).then(|| Duration::from_secs(args.max_run_seconds)),
        retention: Duration::from_secs(args.retention_hours.saturating_mul(3600)),
        retention_max_jobs: args.retention_max_jobs.max(1),
        retention_every: Duration::from_secs(args.retention_interval_seconds.max(1)),
        shares: keys.clone(),
    };
    Ok(engine::Engine::new(
        settings, store, metrics, outputs, webhooks, http,
    ))
}

/// The API over the store alone, for a follower while no replica holds the lease: jobs
/// as last stored (no queue position, no live progress), outputs with presigned URLs.
/// Its engine never runs: it dispatches nothing and writes nothing.
pub async fn store_reader(
    args: &GatewayArgs,
    store: store::Store,
    keys: Arc<auth::ApiKeys>,
) -> Result<axum::Router, GatewayError> {
    let engine = build(args, store, Arc::default(), keys.clone()).await?;
    Ok(api::router(Arc::new(api::ApiState {
        engine,
        keys,
        fleets: args.fleets.clone(),
        catalogs: Arc::default(),
        workflows_dir: args.workflows_dir.clone(),
        max_wait: Duration::from_secs(args.max_wait_seconds),
        max_cold_start_wait: None,
    })))
}

pub async fn start(
    client: &kube::Client,
    args: &GatewayArgs,
    store: store::Store,
    metrics: Arc<metrics::GatewayMetrics>,
    keys: Arc<auth::ApiKeys>,
) -> Result<Leader, GatewayError> {
    let engine = build(args, store, metrics, keys.clone()).await?;
    let recovered = engine.recover().await?;
    tracing::info!(recovered, "jobs resumed from the store");
    let catalogs = Arc::new(discovery::Catalogs::default());
    let endpoint_map = Arc::new(discovery::EndpointMap {
        fixed: args.endpoint_map.iter().cloned().collect(),
        file: args.endpoint_map_file.clone(),
    });
    for fleet in &args.fleets {
        tokio::spawn(discovery::watch_pods(
            client.clone(),
            args.namespace.clone(),
            discovery::WatchedFleet {
                name: fleet.name.clone(),
                service: fleet.service.clone(),
                model_set: fleet.model_set.clone(),
            },
            engine.clone(),
            endpoint_map.clone(),
            catalogs.clone(),
        ));
        if let Some(ms) = &fleet.model_set {
            tokio::spawn(discovery::watch_catalog(
                client.clone(),
                args.namespace.clone(),
                fleet.name.clone(),
                ms.clone(),
                catalogs.clone(),
            ));
        }
    }
    if args.publish_demand {
        for fleet in &args.fleets {
            tokio::spawn(fleet_status::watch_fleet(
                client.clone(),
                args.namespace.clone(),
                fleet.name.clone(),
                engine.signals.clone(),
            ));
        }
        let engine = engine.clone();
        tokio::spawn(fleet_status::publish(
            client.clone(),
            args.namespace.clone(),
            args.fleets.iter().map(|f| f.name.clone()).collect(),
            move |fleet| engine.demand(fleet),
        ));
    }
    tokio::spawn(engine.clone().run());
    tokio::spawn(engine.clone().retain());
    let state = Arc::new(api::ApiState {
        engine: engine.clone(),
        keys,
        fleets: args.fleets.clone(),
        catalogs,
        workflows_dir: args.workflows_dir.clone(),
        max_wait: Duration::from_secs(args.max_wait_seconds),
        max_cold_start_wait: args
            .publish_demand
            .then(|| Duration::from_secs(args.max_cold_start_wait_seconds)),
    });
    Ok(Leader {
        engine,
        router: api::router(state),
    })
}

async fn serve_metrics(
    listen: SocketAddr,
    metrics: Arc<metrics::GatewayMetrics>,
) -> Result<(), GatewayError> {
    let metrics_app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    let metrics_listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| GatewayError::Io(listen.to_string(), e))?;
    tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
    Ok(())
}

/// Serves `router` until SIGTERM and `delay` after it, then lets requests in flight
/// finish for DRAIN.
async fn serve_until_signal(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    delay: Duration,
) -> Result<(), GatewayError> {
    // In its pod the gateway is PID 1, which the kernel sends no signal it has no handler
    // for: without one for SIGTERM, every rollout and node drain waited for SIGKILL.
    // Requests in flight get DRAIN to finish; an open event stream does not hold the exit.
    let signalled = Arc::new(tokio::sync::Notify::new());
    let notify = signalled.clone();
    let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
        crate::leader::shutdown_signal().await;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "stopping: serving on while the Service lets this pod go"
            );
            tokio::time::sleep(delay).await;
        }
        notify.notify_one();
    });
    tokio::select! {
        served = serve.into_future() => served.map_err(|e| GatewayError::Io("serve".into(), e)),
        _ = async {
            signalled.notified().await;
            tokio::time::sleep(DRAIN).await;
        } => {
            tracing::info!(drain = ?DRAIN, "connections still open after the drain");
            Ok(())
        }
    }
}

/// How long, after the requests, the store may take to write what changed before exit:
/// DRAIN + FLUSH stay well within a pod's default 30 s grace period.
const FLUSH: Duration = Duration::from_secs(3);

/// How long requests in flight may finish after SIGTERM: well within a pod's default
/// 30 s grace period.
const DRAIN: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::GatewayArgs;
    use crate::crd::ComfyUIDeployment;
    use crate::names::FleetNames;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        gateway: GatewayArgs,
    }

    /// The flags the fleet controller renders are the ones `sdfleet gateway` reads, with
    /// the values the spec gave: a flag renamed on either side fails here, not in a pod.
    #[test]
    fn the_rendered_flags_parse_back_into_the_spec_they_came_from() {
        let mut fleet: ComfyUIDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "metadata": {"name": "sdxl", "namespace": "studio"},
            "spec": {
                "image": "comfyui:1", "gpu": {"instanceTypes": ["g5.xlarge"]},
                "modelSet": "sdxl-models",
                "storage": {"outputs": {"bucket": "out", "prefix": "sdxl/", "region": "eu-west-1"}},
                "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "targetJobsPerReplica": 2, "maxColdStartWaitSeconds": 45},
                "gateway": {
                    "apiKeysSecret": "keys", "webhookSecret": "hooks", "workflowsConfigMap": "flows",
                    "queueCap": 7, "jobTtlSeconds": 600, "maxWaitSeconds": 90, "maxRunSeconds": 300,
                    "placement": "Random", "inputBuckets": ["in-a", "in-b"],
                    "store": {"size": "2Gi", "retentionHours": 24, "maxJobs": 5000}
                }
            }
        }))
        .unwrap();
        let gateway = fleet.spec.gateway.as_mut().unwrap();
        gateway.class_webhook_allowed_cidrs = vec!["10.20.0.0/16".into()];
        let gateway = gateway.clone();
        let names = FleetNames::new("studio", "sdxl");
        let mut args = crate::render::gateway::args(&names, &fleet.spec, &gateway);
        // From the pod's environment (POD_NAMESPACE), not its arguments.
        args.extend(["--namespace".into(), "studio".into()]);
        let parsed = Command::try_parse_from(&args)
            .unwrap_or_else(|e| panic!("{args:?} do not parse: {e}"))
            .gateway;
        let fleets: Vec<(String, Option<String>)> = parsed
            .fleets
            .iter()
            .map(|f| (f.name.clone(), f.model_set.clone()))
            .collect();
        assert_eq!(fleets, [("sdxl".to_string(), Some("sdxl-models".into()))]);
        assert_eq!(parsed.fleets[0].service, names.service());
        assert_eq!(parsed.queue_cap, 7);
        assert_eq!(parsed.job_ttl_seconds, 600);
        assert_eq!(parsed.max_wait_seconds, 90);
        assert_eq!(parsed.max_run_seconds, 300);
        assert_eq!(parsed.placement, super::placement::Placement::Random);
        assert!(!parsed.no_auth);
        assert_eq!(
            parsed.api_keys_dir,
            std::path::Path::new(crate::render::gateway::API_KEYS_DIR)
        );
        assert!(parsed.webhook_secret_file.is_some());
        assert_eq!(
            parsed.webhook_allow_cidrs,
            ["10.20.0.0/16".parse::<ipnet::IpNet>().unwrap()]
        );
        assert!(parsed.workflows_dir.is_some());
        assert_eq!(parsed.outputs_bucket.as_deref(), Some("out"));
        assert_eq!(parsed.outputs_prefix, "sdxl/");
        assert_eq!(parsed.outputs_region.as_deref(), Some("eu-west-1"));
        assert_eq!(parsed.input_buckets, ["in-a", "in-b"]);
        assert_eq!(parsed.retention_hours, 24);
        assert_eq!(parsed.retention_max_jobs, 5000);
        assert!(parsed.publish_demand);
        assert_eq!(parsed.max_cold_start_wait_seconds, 45);
        assert!(parsed.store.starts_with(crate::render::gateway::STORE_DIR));

        // On PostgreSQL: the URL file instead of the store file.
        let mut shared = fleet.spec.gateway.clone().unwrap();
        shared.store.postgres = Some(crate::crd::gateway::PostgresStoreSpec {
            secret_name: "db".into(),
            url_key: "url".into(),
            ca_key: None,
        });
        let mut args = crate::render::gateway::args(&names, &fleet.spec, &shared);
        args.extend(["--namespace".into(), "studio".into()]);
        let parsed = Command::try_parse_from(&args).unwrap().gateway;
        assert_eq!(
            parsed.postgres_url_file.as_deref(),
            Some(std::path::Path::new("/etc/sdfleet-gateway/postgres/url"))
        );
        assert!(parsed.postgres_ca_file.is_none());

        // No keys Secret: the gateway serves without keys, and says so in its flags.
        let mut open = gateway;
        open.api_keys_secret = None;
        open.allow_unauthenticated = true;
        let mut args = crate::render::gateway::args(&names, &fleet.spec, &open);
        args.extend(["--namespace".into(), "studio".into()]);
        assert!(Command::try_parse_from(&args).unwrap().gateway.no_auth);
    }
}
