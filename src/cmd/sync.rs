//! `sdfleet sync`: one sync of an S3 prefix, or of a list of files by URL, into a
//! directory.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct SyncArgs {
    #[arg(long, required_unless_present = "urls", conflicts_with = "urls")]
    bucket: Option<String>,
    /// A YAML (or JSON) list of files by URL instead of a bucket: `path`, `url`,
    /// `sha256` and `size` each, as a ModelSet's `source.urls`.
    #[arg(long)]
    urls: Option<PathBuf>,
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
    #[arg(long, default_value_t = crate::sync::DEFAULT_CONCURRENCY)]
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
    /// Read as a FleetClass's `s3.tenantRoleArn`, exactly as the controller and the node
    /// agents do for a ModelSet (the role assumed with its session tags): an admin checks
    /// the role's policy with it before a team relies on it.
    #[arg(long, requires_all = ["as_namespace", "as_modelset"])]
    as_role: Option<String>,
    /// With `--as-role`: the namespace (the `sdfleet-namespace` session tag).
    #[arg(long)]
    as_namespace: Option<String>,
    /// With `--as-role`: the ModelSet's name (the `sdfleet-modelset` session tag).
    #[arg(long)]
    as_modelset: Option<String>,
    /// After the sync, read what was synced into the page cache (whole files, up to half
    /// the machine's memory), as the node agent does with a ModelSet's hot models.
    #[arg(long)]
    warm: bool,
}

/// Syncs once and prints what it did.
pub fn run(args: SyncArgs) -> ExitCode {
    use crate::crd::modelset::{ModelSource, S3Source, UrlFile};
    use crate::storage;
    use crate::sync::{self, SyncOptions, catalog::Filter};
    crate::telemetry::init_logging(false);
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
        let source = match (&args.urls, args.bucket) {
            (Some(path), _) => {
                let files = std::fs::read_to_string(path)
                    .map_err(|e| e.to_string())
                    .and_then(|text| {
                        serde_saphyr::from_str::<Vec<UrlFile>>(&text).map_err(|e| e.to_string())
                    });
                match files {
                    Ok(files) => ModelSource {
                        s3: None,
                        urls: Some(files),
                    },
                    Err(e) => {
                        eprintln!("error: {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
            }
            (None, bucket) => ModelSource {
                s3: Some(S3Source {
                    bucket: bucket.unwrap_or_default(),
                    prefix: args.prefix,
                    region: args.region.filter(|r| !r.is_empty()),
                    endpoint: args.endpoint.filter(|e| !e.is_empty()),
                }),
                urls: None,
            },
        };
        let timeline = args
            .timeline
            .as_ref()
            .map(|_| std::sync::Arc::new(sync::timeline::Timeline::new()));
        let sampler = timeline.as_ref().map(|t| t.sampler());
        let listing = sync::timeline::span(timeline.as_deref(), sync::timeline::Phase::List);
        let tenant = args.as_role.clone().map(|role_arn| storage::s3::Tenant {
            role_arn,
            namespace: args.as_namespace.clone().unwrap_or_default(),
            name: args.as_modelset.clone().unwrap_or_default(),
        });
        let listed = match storage::open_as(&source, None, tenant.as_ref()).await {
            Ok(store) => sync::catalog::list(&store, &filter)
                .await
                .map(|catalog| (store, catalog)),
            Err(e) => Err(e),
        };
        let (store, catalog) = match listed {
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
                if args.warm {
                    let warming = std::time::Instant::now();
                    let budget = sync::warm::memory_budget();
                    match sync::warm::warm(&args.dest, &catalog, budget).await {
                        Ok(w) => println!(
                            "warmed {} files ({}) into the page cache in {:.1} s; {} left cold",
                            w.files,
                            sync::human(w.bytes),
                            warming.elapsed().as_secs_f64(),
                            w.skipped
                        ),
                        Err(e) => {
                            eprintln!("error: warming: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
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
