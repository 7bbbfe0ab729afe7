use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sdfleet::crd::ComfyUIDeployment;
use sdfleet::policy;
use sdfleet::render::nodeclass::Cloud;
use sdfleet::render::settings::{
    AgentSettings, ClusterSettings, DEFAULT_OPERATOR_NAMESPACE, GatewaySettings,
};
use sdfleet::render::{RenderContext, build};

/// sdfleet: GPU ComfyUI fleets on Amazon EKS, from two custom resources.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: reconcile ComfyUIDeployments into GPU fleets.
    Controller(ControllerArgs),
    /// Print the CRD YAML (what `crds/` and the Helm chart hold).
    Crds,
    /// Print the CRD reference (Markdown), generated from the CRD schemas.
    Docs,
    /// Sync an S3 prefix into a directory once (what the node agent and SSM run).
    Sync(SyncArgs),
    /// Run the node agent: sync the node's ModelSets, report, lift the startup taint.
    Agent(AgentArgs),
    /// Run the job gateway in front of a namespace's fleets (what `spec.gateway` renders).
    Gateway(Box<GatewayCommand>),
    /// Create a node's models directory of one ModelSet and give it to the agent's user
    /// (the agent DaemonSet's init container; root with CAP_CHOWN only).
    PrepareModelsDir(PrepareArgs),
    /// Print every child of the ComfyUIDeployments in FILE exactly as the controller
    /// would apply them. Needs no cluster.
    Render(RenderArgs),
}

#[derive(clap::Args)]
struct GatewayCommand {
    #[command(flatten)]
    gateway: sdfleet::gateway::GatewayArgs,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// The models root (the hostPath mount).
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    model_set: String,
    /// `UID:GID` that will own the directory.
    #[arg(long, value_parser = parse_owner)]
    owner: (u32, u32),
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = s.split_once(':').ok_or("expected UID:GID")?;
    Ok((
        uid.parse().map_err(|e| format!("uid {uid:?}: {e}"))?,
        gid.parse().map_err(|e| format!("gid {gid:?}: {e}"))?,
    ))
}

#[derive(clap::Args)]
struct RenderArgs {
    /// Files with ComfyUIDeployments, and the FleetClasses and ModelSets they use
    /// (repeat `-f`); e.g. `-f examples/fleetclass.yaml -f examples/sdxl.yaml`.
    #[arg(short = 'f', long = "file", required = true)]
    file: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "aws")]
    cloud: Cloud,
    #[arg(long, default_value = "my-cluster")]
    cluster_name: String,
    #[arg(long, default_value = "us-west-2")]
    region: String,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// The EKS cluster name: the default subnet and security-group discovery tag.
    #[arg(long, env = "SDFLEET_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Where nodes come from: `aws` writes EC2NodeClasses, `kwok` KWOKNodeClasses (testbed, demo).
    #[arg(long, value_enum, default_value = "aws", env = "SDFLEET_CLOUD")]
    cloud: Cloud,
    /// The default region of S3 buckets.
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "SDFLEET_NAMESPACE")]
    namespace: Option<String>,
    /// Seconds between reconciles of a steady fleet (watches start one at once on any
    /// change; this catches what no watch sees).
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// Reconciles of one kind (fleets, ModelSets) running at once; 0: no limit.
    #[arg(long, default_value_t = 16, env = "SDFLEET_MAX_CONCURRENT_RECONCILES")]
    max_concurrent_reconciles: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Reconcile only while holding the Lease `sdfleet-controller` (run several replicas).
    #[arg(long)]
    leader_elect: bool,
    /// The operator's own namespace (the chart's release namespace): where the node
    /// agents' DaemonSets and the leader-election Lease live unless set apart below.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_OPERATOR_NAMESPACE)]
    operator_namespace: String,
    /// Namespace of the node agents' DaemonSets (default: the operator's namespace).
    #[arg(long)]
    agent_namespace: Option<String>,
    /// Image of the node agent (this same binary).
    #[arg(long, env = "SDFLEET_AGENT_IMAGE", default_value = concat!("sdfleet:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,
    /// ServiceAccount of the node agents (the chart creates it).
    #[arg(long, default_value = "sdfleet-agent")]
    agent_service_account: String,
    /// Namespace of the leader-election Lease (default: the operator's namespace).
    #[arg(long)]
    leader_election_namespace: Option<String>,
    /// Image of the fleets' job gateways (default: the agent's image, the same binary).
    #[arg(long, env = "SDFLEET_GATEWAY_IMAGE")]
    gateway_image: Option<String>,
    /// The ClusterRole each gateway's RoleBinding names (the chart creates it).
    #[arg(long, default_value = "sdfleet-gateway")]
    gateway_cluster_role: String,
}

#[derive(clap::Args)]
struct AgentArgs {
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The models directory on the node's instance store.
    #[arg(long)]
    models_root: PathBuf,
    /// Seconds between full passes. Changes to ModelSets (a new catalog revision) and
    /// fleets start a pass at once; this resync also repairs local changes.
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// Default region of the buckets.
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    #[arg(long)]
    log_json: bool,
}

#[derive(clap::Args)]
struct SyncArgs {
    #[arg(long)]
    bucket: String,
    #[arg(long, default_value = "")]
    prefix: String,
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    /// An S3-compatible endpoint (path-style addressing).
    #[arg(long, env = "AWS_ENDPOINT_URL_S3")]
    endpoint: Option<String>,
    /// The directory to sync into; nothing is ever written outside it.
    #[arg(long)]
    dest: PathBuf,
    /// Remove files this tool wrote whose objects are gone.
    #[arg(long)]
    delete: bool,
    /// Globs over keys relative to the prefix; none = all.
    #[arg(long)]
    include: Vec<String>,
    #[arg(long)]
    exclude: Vec<String>,
    /// Concurrent GET requests.
    #[arg(long, default_value_t = sdfleet::sync::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Objects larger than this are fetched in ranged GETs of this size (MiB).
    #[arg(long, default_value_t = 64)]
    part_size_mib: u64,
    /// Write through the page cache instead of with direct I/O (O_DIRECT). Direct
    /// writes are several times faster where the kernel's writeback is the limit; the
    /// page cache keeps what was written in memory for a first load on a node with RAM
    /// to spare.
    #[arg(long)]
    buffered_writes: bool,
    /// Write where the time went (phases, and bytes, GETs, fsyncs and the kernel's
    /// dirty pages every 100 ms) to this JSON file.
    #[arg(long)]
    timeline: Option<PathBuf>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Controller(args) => run_controller(args),
        Command::Sync(args) => run_sync(args),
        Command::Agent(args) => run_agent(args),
        Command::Gateway(args) => run_gateway(args),
        Command::Crds => print_or_fail(sdfleet::crd::to_yaml().map_err(Into::into)),
        Command::Docs => print_or_fail(sdfleet::docs::crd_reference().map_err(Into::into)),
        Command::Render(args) => print_or_fail(render(args)),
        Command::PrepareModelsDir(args) => print_or_fail(
            sdfleet::sync::models_dir::prepare(
                &args.root,
                &args.namespace,
                &args.model_set,
                args.owner.0,
                args.owner.1,
            )
            .map(|dir| format!("prepared {}\n", dir.display()))
            .map_err(Into::into),
        ),
    }
}

fn print_or_fail(text: Result<String, Box<dyn std::error::Error>>) -> ExitCode {
    match text {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Every child of the ComfyUIDeployments in the file, as the controller would apply them.
fn render(args: RenderArgs) -> Result<String, Box<dyn std::error::Error>> {
    let mut docs = Vec::new();
    for file in &args.file {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        docs.extend(serde_saphyr::from_multiple::<serde_json::Value>(&text)?);
    }
    let cluster = ClusterSettings {
        agent: AgentSettings::default(),
        gateway: Default::default(),
        cluster_name: Some(args.cluster_name),
        region: Some(args.region),
    };
    let ctx = RenderContext {
        cluster: &cluster,
        node_class: args.cloud.provider(),
        model_sync: Default::default(),
    };
    let classes: Vec<sdfleet::crd::FleetClass> = docs
        .iter()
        .filter(|d| d["kind"] == "FleetClass")
        .map(|d| serde_json::from_value(d.clone()))
        .collect::<Result<_, _>>()?;
    // ModelSets in the same files say how their fleets' models are delivered.
    let mut methods = std::collections::BTreeMap::new();
    for doc in docs.iter().filter(|d| d["kind"] == "ModelSet") {
        let ms: sdfleet::crd::ModelSet = serde_json::from_value(doc.clone())?;
        methods.insert(
            ms.metadata.name.clone().unwrap_or_default(),
            ms.spec.sync.method,
        );
    }
    let mut out = String::new();
    for doc in docs {
        if doc.get("kind").and_then(|k| k.as_str()) != Some("ComfyUIDeployment") {
            continue;
        }
        let mut cud: ComfyUIDeployment = serde_json::from_value(doc)?;
        if cud.metadata.namespace.is_none() {
            cud.metadata.namespace = Some("default".into());
        }
        // As the controller does: the class decides, and supplies the node settings.
        let name = cud.metadata.name.clone().unwrap_or_default();
        let class = policy::resolve(cud.spec.class_name.as_deref(), &classes, None)
            .map_err(|e| format!("fleet {name}: {e} (pass the FleetClass with -f)"))?;
        let class_name = class.metadata.name.clone().unwrap_or_default();
        let namespace = cud.metadata.namespace.clone().unwrap_or_default();
        policy::check_fleet(&cud.spec, &class_name, &class.spec, &namespace)
            .map_err(|v| format!("fleet {name}: {v}"))?;
        policy::apply_class(&mut cud.spec, &class.spec, &namespace, &name);
        let model_sync = cud
            .spec
            .model_set
            .as_ref()
            .and_then(|m| methods.get(m).copied())
            .unwrap_or_default();
        let ctx = RenderContext { model_sync, ..ctx };
        for child in build(&cud, &ctx)? {
            out.push_str(&format!(
                "---\n{}\n",
                serde_saphyr::to_string(&child.manifest)?.trim_end()
            ));
        }
    }
    Ok(out)
}

fn run_controller(args: ControllerArgs) -> ExitCode {
    sdfleet::telemetry::init_logging(args.log_json);
    with_kube_client(|client| async move {
        let settings = sdfleet::controller::Settings {
            cloud: args.cloud,
            cluster: ClusterSettings {
                agent: AgentSettings {
                    namespace: args
                        .agent_namespace
                        .unwrap_or_else(|| args.operator_namespace.clone()),
                    image: args.agent_image.clone(),
                    service_account: args.agent_service_account,
                },
                gateway: GatewaySettings {
                    image: args.gateway_image.unwrap_or(args.agent_image),
                    cluster_role: args.gateway_cluster_role,
                },
                cluster_name: args.cluster_name.filter(|c| !c.is_empty()),
                region: args.region.filter(|r| !r.is_empty()),
            },
            namespace: args.namespace,
            resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
            max_concurrent_reconciles: args.max_concurrent_reconciles,
        };
        let metrics = std::sync::Arc::new(sdfleet::telemetry::Metrics::default());
        let health = std::sync::Arc::new(sdfleet::telemetry::Health {
            metrics: metrics.clone(),
            ready: std::sync::atomic::AtomicBool::new(false),
        });
        let server = tokio::spawn(sdfleet::telemetry::serve(args.metrics_addr, health.clone()));
        tracing::info!(cloud = ?settings.cloud, namespace = ?settings.namespace, "starting controller");
        let ctx = sdfleet::controller::Context::new(client.clone(), settings, metrics);
        health
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if args.leader_elect {
            let lease_namespace = args
                .leader_election_namespace
                .unwrap_or(args.operator_namespace);
            let lease = match sdfleet::leader::Leader::acquire(client, &lease_namespace).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    tracing::info!("stopped before becoming leader");
                    server.abort();
                    return ExitCode::SUCCESS;
                }
                Err(e) => {
                    tracing::error!(error = %e, "leader election failed");
                    server.abort();
                    return ExitCode::FAILURE;
                }
            };
            let (lost, release) = lease.split();
            let lost_leadership = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = lost_leadership.clone();
            sdfleet::controller::run(ctx, async move {
                tokio::select! {
                    _ = sdfleet::leader::shutdown_signal() => {}
                    _ = lost => flag.store(true, std::sync::atomic::Ordering::Relaxed),
                }
            })
            .await;
            release.await;
            server.abort();
            // A leader that lost its lease exits so that it restarts as a standby.
            return if lost_leadership.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("lost the leader lease; exiting");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
        sdfleet::controller::run(ctx, sdfleet::leader::shutdown_signal()).await;
        server.abort();
        ExitCode::SUCCESS
    })
}

fn run_sync(args: SyncArgs) -> ExitCode {
    use sdfleet::sync::{
        self, SyncOptions, catalog::Filter, store::BucketLocation, store::S3Store,
    };
    sdfleet::telemetry::init_logging(false);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let started = std::time::Instant::now();
        let filter = match Filter::new(&args.include, &args.exclude) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = std::fs::create_dir_all(&args.dest) {
            eprintln!("error: {}: {e}", args.dest.display());
            return ExitCode::FAILURE;
        }
        let location = BucketLocation {
            bucket: args.bucket,
            prefix: args.prefix,
            region: args.region.filter(|r| !r.is_empty()),
            endpoint: args.endpoint.filter(|e| !e.is_empty()),
        };
        let timeline = args
            .timeline
            .as_ref()
            .map(|_| std::sync::Arc::new(sync::timeline::Timeline::new()));
        let sampler = timeline.as_ref().map(|t| t.sampler());
        let listing = sync::timeline::span(timeline.as_deref(), sync::timeline::Phase::List);
        let (store, catalog) = match S3Store::open_catalog(&location, &filter).await {
            Ok(opened) => opened,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        drop(listing);
        let mut opts = SyncOptions::new(&args.dest);
        opts.delete = args.delete;
        opts.concurrency = args.concurrency;
        opts.part_size = args.part_size_mib.max(1) << 20;
        opts.multipart_threshold = opts.part_size;
        opts.direct_io = !args.buffered_writes;
        opts.timeline = timeline.clone();
        let result = sync::sync(&store, &catalog, &opts).await;
        if let (Some(path), Some(t)) = (&args.timeline, &timeline) {
            if let Some(s) = sampler {
                s.abort();
            }
            if let Err(e) = std::fs::write(path, t.to_json().to_string()) {
                eprintln!("error: {}: {e}", path.display());
            }
        }
        match result {
            Ok(report) => {
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "revision {}: {} fetched ({}, {:.1} MB/s; {} resumed), {} unchanged, {} deleted, {} refused, in {:.1} s",
                    catalog.revision(),
                    report.downloaded,
                    sync::human(report.bytes),
                    report.bytes as f64 / 1e6 / secs.max(1e-3),
                    sync::human(report.resumed),
                    report.unchanged,
                    report.deleted,
                    report.refused.len(),
                    secs
                );
                for r in &report.refused {
                    eprintln!("refused: {r}");
                }
                // Refused keys are a failure the caller must see (SSM records the status).
                if report.refused.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(3) }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn run_agent(args: AgentArgs) -> ExitCode {
    sdfleet::telemetry::init_logging(args.log_json);
    with_kube_client(|client| async move {
        let agent = sdfleet::agent::Agent {
            client,
            node: args.node_name,
            root: args.models_root,
            region: args.region.filter(|r| !r.is_empty()),
        };
        tracing::info!(node = %agent.node, root = %agent.root.display(), "node agent starting");
        agent
            .run(
                std::time::Duration::from_secs(args.resync_seconds.max(1)),
                sdfleet::leader::shutdown_signal(),
            )
            .await;
        ExitCode::SUCCESS
    })
}

fn run_gateway(args: Box<GatewayCommand>) -> ExitCode {
    sdfleet::telemetry::init_logging(args.log_json);
    with_kube_client(|client| async move {
        match sdfleet::gateway::run(client, args.gateway).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "gateway failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Runs `body` with a Kubernetes client on a Tokio runtime; start-up failures are logged
/// and become a failing exit code.
fn with_kube_client<F, Fut>(body: F) -> ExitCode
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match kube::Client::try_default().await {
            Ok(client) => body(client).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot build a Kubernetes client");
                ExitCode::FAILURE
            }
        }
    })
}
