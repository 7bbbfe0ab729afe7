//! Gateway benchmarks on the testbed (ignored by the suite; `bench/gateway-bench.sh` runs
//! them and writes `bench/gateway.md`). Each measures the gateway beside a peer in the
//! same run, with fake ComfyUI pods on loopback found through EndpointSlices:
//! 1. added latency per job: the gateway (sync mode, with and without S3 outputs)
//!    against the same workflow sent to a fake ComfyUI directly (`/prompt` + `/ws`),
//!    interleaved job by job;
//! 2. placement: 1,000 jobs of 3 checkpoints on 10 pods, checkpoint affinity against
//!    random placement: jobs that ran without a checkpoint switch, and the total time;
//! 3. the gateway's memory (RSS) with 10,000 finished jobs in its store;
//! 4. fair shares: a small batch behind a large one, weights 3:1, a capped key;
//! 5. job stores: the embedded store (one replica) against PostgreSQL with one and with
//!    three replicas: latency per job and jobs per second through the dispatcher.
//!
//! With `SDFLEET_BENCH_PEER_BIN=<another build's sdfleet>` (e.g. main's, built by
//! `bench/gateway-bench.sh --peer REV`), every figure is measured for both builds in the
//! same run: latency interleaved job by job, placement and memory one after the other.

mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Client;
use serde_json::{Value, json};
use support::fake_comfyui::{FakeComfy, FakeConfig};
use support::gateway::*;
use support::*;

const CHECKPOINTS: [&str; 3] = [
    "sd_xl_base_1.0.safetensors",
    "dreamshaper_8.safetensors",
    "juggernaut_xl.safetensors",
];

fn models() -> Vec<String> {
    CHECKPOINTS
        .iter()
        .map(|c| format!("checkpoints/{c}"))
        .collect()
}

/// Fake pods with the benchmark's three checkpoints.
fn fake_config(step_ms: u64, switch_ms: u64, output_dir: PathBuf) -> FakeConfig {
    FakeConfig {
        step_time: Duration::from_millis(step_ms),
        switch_penalty: Duration::from_millis(switch_ms),
        models: models(),
        output_dir,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Fake pods `first..first+n` of `fleet`, each listed in the fleet Service's slice.
async fn pods(
    client: &Client,
    ns: &str,
    fleet: &str,
    first: usize,
    n: usize,
    config: &FakeConfig,
) -> Vec<FakeComfy> {
    let mut out = Vec::new();
    for i in first..first + n {
        let fake = FakeComfy::start(&format!("{fleet}-{i}"), config.clone()).await;
        publish_pod(client, ns, fleet, i, &fake).await;
        out.push(fake);
    }
    out
}

fn map_args(fakes: &[FakeComfy], first: usize) -> Vec<String> {
    fakes
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            [
                "--endpoint-map".to_string(),
                format!("{}:8188={}", pod_ip(first + i), f.addr),
            ]
        })
        .collect()
}

struct Gateway {
    process: GatewayProcess,
    api: ApiClient,
}

impl Gateway {
    /// Submits `jobs` jobs of `steps` sampler steps (checkpoints by `checkpoint_of`) to
    /// `fleet`, then waits (up to `timeout`) until all have succeeded.
    async fn run_jobs(&self, fleet: &str, jobs: usize, steps: u64, timeout: Duration) {
        for i in 0..jobs {
            let (code, body) = self
                .api
                .submit(json!({"prompt": sdxl_workflow(checkpoint_of(i), steps)}))
                .await;
            assert_eq!(code, 201, "{body}");
        }
        let done =
            format!("sdfleet_gateway_jobs_finished_total{{fleet=\"{fleet}\",state=\"succeeded\"}}");
        eventually(
            &format!("{jobs} jobs of {fleet} to succeed"),
            timeout,
            || async { (self.process.metric(&done).await? >= jobs as f64).then_some(()) },
        )
        .await;
    }
}

/// A build under test: this one's binary, or the peer's.
struct Build {
    name: String,
    bin: PathBuf,
}

fn builds() -> Vec<Build> {
    let mut out = vec![Build {
        name: "this build".into(),
        bin: sdfleet_bin(),
    }];
    if let Some(peer) = std::env::var_os("SDFLEET_BENCH_PEER_BIN") {
        let name = std::env::var("SDFLEET_BENCH_PEER_NAME").unwrap_or_else(|_| "peer".into());
        out.push(Build {
            name,
            bin: PathBuf::from(peer),
        });
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn gateway(
    tb: &Testbed,
    ns: &str,
    fleet: &str,
    work: &Path,
    fakes: &[FakeComfy],
    first: usize,
    extra: &[String],
    bin: &Path,
) -> Gateway {
    let key = format!("key-{}", unique_suffix());
    let dir = work.join(format!("{fleet}-keys"));
    api_keys_dir(&dir, "bench", &key);
    let mut args: Vec<String> = vec![
        "--namespace".into(),
        ns.into(),
        "--fleet".into(),
        fleet.into(),
        "--store".into(),
        work.join(format!("{fleet}.redb")).display().to_string(),
        "--api-keys-dir".into(),
        dir.display().to_string(),
        "--client-id".into(),
        format!("gw-{fleet}"),
        "--queue-cap".into(),
        "20000".into(),
    ];
    args.extend(map_args(fakes, first));
    args.extend(extra.iter().cloned());
    let process = GatewayProcess::start_bin(tb, args, bin);
    process.wait_ready(fleet, fakes.len()).await;
    let api = ApiClient::new(&process.url(""), &key);
    Gateway { process, api }
}

/// One job straight to a fake ComfyUI: POST /prompt, then its ws until success.
async fn direct_job(
    http: &reqwest::Client,
    pod: &FakeComfy,
    ws: &mut (
             impl futures::Stream<
        Item = Result<
            tokio_tungstenite::tungstenite::Message,
            tokio_tungstenite::tungstenite::Error,
        >,
    > + Unpin
         ),
    client_id: &str,
    workflow: &Value,
) -> Duration {
    let id = uuid::Uuid::new_v4().to_string();
    let start = Instant::now();
    let resp = http
        .post(format!("{}/prompt", pod.url()))
        .json(&json!({"prompt": workflow, "client_id": client_id, "prompt_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            if v["type"] == "execution_success" && v["data"]["prompt_id"] == id.as_str() {
                return start.elapsed();
            }
        }
    }
    panic!("direct job {id} did not finish");
}

async fn gateway_job(api: &ApiClient, workflow: &Value) -> Duration {
    let start = Instant::now();
    let (status, job) = api.submit_and_wait(json!({"prompt": workflow}), 30).await;
    assert_eq!(
        (status, job["state"].as_str()),
        (200, Some("succeeded")),
        "{job}"
    );
    start.elapsed()
}

fn summary(name: &str, samples: &mut [f64], added: Option<f64>) -> String {
    samples.sort_by(f64::total_cmp);
    format!(
        "| {name} | {:.1} | {:.1} | {:.1} | {} |\n",
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        samples[samples.len() - 1],
        added.map_or("".to_string(), |a| format!("{a:.1}"))
    )
}

async fn latency(tb: &Testbed, client: &Client, ns: &str, work: &Path, report: &mut String) {
    const JOBS: usize = 200;
    let config = fake_config(1, 0, work.join("lat-output"));
    let direct = pods(client, ns, "lat-direct", 0, 1, &config)
        .await
        .remove(0);
    let s3 = s3_client(tb).await;
    let bucket = create_bucket(&s3, "gw-bench").await;
    let s3_args: Vec<String> = vec![
        "--outputs-bucket".into(),
        bucket,
        "--outputs-region".into(),
        "us-west-2".into(),
        "--s3-endpoint".into(),
        tb.var("AWS_ENDPOINT_URL").into(),
    ];
    // Per build: a gateway leaving outputs on the pod, one putting them in S3.
    let mut paths = Vec::new();
    let mut fakes = Vec::new();
    for (i, build) in builds().iter().enumerate() {
        let (plain_fleet, s3_fleet) = (format!("lat-gw-{i}"), format!("lat-s3-{i}"));
        let plain_pod = pods(client, ns, &plain_fleet, 1 + 2 * i, 1, &config).await;
        let s3_pod = pods(client, ns, &s3_fleet, 2 + 2 * i, 1, &config).await;
        let plain = gateway(
            tb,
            ns,
            &plain_fleet,
            work,
            &plain_pod,
            1 + 2 * i,
            &[],
            &build.bin,
        )
        .await;
        let with_s3 = gateway(
            tb,
            ns,
            &s3_fleet,
            work,
            &s3_pod,
            2 + 2 * i,
            &s3_args,
            &build.bin,
        )
        .await;
        paths.push((
            format!(
                "{}, sync mode (`POST /api/v2/jobs?wait=30`), outputs left on the pod",
                build.name
            ),
            plain,
            Vec::new(),
        ));
        paths.push((format!("{}, sync mode, outputs fetched from `/view` and put in S3 (moto) with a presigned URL", build.name), with_s3, Vec::new()));
        fakes.extend(plain_pod);
        fakes.extend(s3_pod);
    }
    let client_id = "bench-direct";
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?clientId={client_id}", direct.addr))
            .await
            .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // A new seed per job, as clients send (ComfyUI would answer a repeated prompt from
    // its cache); every path gets the same workflow in a round.
    let workflow = || sdxl_workflow(CHECKPOINTS[0], 1);
    // Warm every path once (checkpoint load, connections).
    direct_job(&http, &direct, &mut ws, client_id, &workflow()).await;
    for (_, gw, _) in &paths {
        gateway_job(&gw.api, &workflow()).await;
    }
    let mut d = Vec::new();
    for _ in 0..JOBS {
        let w = workflow();
        d.push(
            direct_job(&http, &direct, &mut ws, client_id, &w)
                .await
                .as_secs_f64()
                * 1000.0,
        );
        for (_, gw, samples) in paths.iter_mut() {
            let mut w = w.clone();
            // Same work, a seed of its own (the direct run just cached this one).
            w["5"]["inputs"]["seed"] =
                json!(w["5"]["inputs"]["seed"].as_u64().unwrap_or(0) + 1_000_000_000);
            samples.push(gateway_job(&gw.api, &w).await.as_secs_f64() * 1000.0);
        }
    }
    let _ = ws.close(None).await;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let md = median(&d);
    writeln!(
        report,
        "### Added latency per job ({JOBS} jobs each, interleaved; 1 sampler step of 1 ms)\n"
    )
    .unwrap();
    report
        .push_str("| path | p50 ms | p99 ms | max ms | added at p50 ms |\n|---|---|---|---|---|\n");
    let mut direct_sorted = d.clone();
    report.push_str(&summary(
        "ComfyUI directly (`POST /prompt`, wait for `execution_success` on `/ws`)",
        &mut direct_sorted,
        None,
    ));
    for (name, _, samples) in paths.iter_mut() {
        let added = median(samples) - md;
        report.push_str(&summary(name, samples, Some(added)));
    }
    report.push('\n');
    drop(fakes);
}

/// A deterministic checkpoint sequence (the same for both placements).
fn checkpoint_of(i: usize) -> &'static str {
    let x = (i as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    CHECKPOINTS[((x >> 33) % 3) as usize]
}

async fn placement_run(
    tb: &Testbed,
    client: &Client,
    ns: &str,
    work: &Path,
    placement: &str,
    first: usize,
    bin: &Path,
) -> (f64, f64, usize) {
    const JOBS: usize = 1000;
    const PODS: usize = 10;
    let fleet = format!("pl-{placement}-{first}");
    let config = fake_config(5, 100, work.join(format!("{fleet}-output")));
    let fakes = pods(client, ns, &fleet, first, PODS, &config).await;
    let gw = gateway(
        tb,
        ns,
        &fleet,
        work,
        &fakes,
        first,
        &["--placement".into(), placement.into()],
        bin,
    )
    .await;
    let start = Instant::now();
    gw.run_jobs(&fleet, JOBS, 10, Duration::from_secs(600))
        .await;
    let total = start.elapsed().as_secs_f64();
    let started: usize = fakes.iter().map(|f| f.started().len()).sum();
    assert_eq!(started, JOBS, "every job ran exactly once");
    let switches: usize = fakes.iter().map(|f| f.switches()).sum();
    let without = 1.0 - switches as f64 / JOBS as f64;
    (without, total, switches)
}

async fn placement(tb: &Testbed, client: &Client, ns: &str, work: &Path, report: &mut String) {
    let mut rows = Vec::new();
    for (i, build) in builds().iter().enumerate() {
        let run = placement_run(tb, client, ns, work, "affinity", 10 + 20 * i, &build.bin).await;
        rows.push((format!("checkpoint affinity ({})", build.name), run));
    }
    let bin = sdfleet_bin();
    let run = placement_run(tb, client, ns, work, "random", 100, &bin).await;
    rows.push(("random (this build)".to_string(), run));
    report.push_str("### Placement (1,000 jobs, 3 checkpoints, 10 pods; 10 steps × 5 ms, 100 ms per checkpoint switch)\n\n");
    report.push_str(
        "| placement | jobs without a switch | switches | total time s |\n|---|---|---|---|\n",
    );
    for (name, (share, time, switches)) in rows {
        writeln!(
            report,
            "| {name} | {:.1}% | {switches} | {time:.1} |",
            share * 100.0
        )
        .unwrap();
    }
    writeln!(report, "\nA fresh pod's first load counts as a switch.\n").unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn memory(tb: &Testbed, client: &Client, ns: &str, work: &Path, report: &mut String) {
    const JOBS: usize = 10_000;
    report.push_str("### Memory with 10,000 jobs stored\n\n| build | RSS MiB, started (10 pods, no jobs) | RSS MiB after 10,000 jobs succeeded | store file MiB |\n|---|---|---|---|\n");
    for (i, build) in builds().iter().enumerate() {
        let fleet = format!("mem-{i}");
        let config = fake_config(1, 0, work.join(format!("{fleet}-output")));
        let fakes = pods(client, ns, &fleet, 200 + 10 * i, 10, &config).await;
        let gw = gateway(tb, ns, &fleet, work, &fakes, 200 + 10 * i, &[], &build.bin).await;
        let before = rss_kib(gw.process.child.id());
        gw.run_jobs(&fleet, JOBS, 1, Duration::from_secs(900)).await;
        let after = rss_kib(gw.process.child.id());
        let store = std::fs::metadata(work.join(format!("{fleet}.redb")))
            .map(|m| m.len())
            .unwrap_or(0);
        writeln!(
            report,
            "| {} | {:.1} | {:.1} | {:.1} |",
            build.name,
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            store as f64 / (1024.0 * 1024.0)
        )
        .unwrap();
    }
    report.push('\n');
}

/// Adds API key `id` with `words` after its hash to `fleet`'s gateway.
async fn add_fleet_key(gw: &Gateway, work: &Path, fleet: &str, id: &str, words: &str) -> ApiClient {
    add_key(
        &work.join(format!("{fleet}-keys")),
        &gw.process.url(""),
        id,
        words,
    )
    .await
}

/// Submits `n` one-step jobs as `api`; their ids.
async fn submit_n(api: &ApiClient, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let (code, body) = api
            .submit(json!({"prompt": sdxl_workflow(CHECKPOINTS[0], 1)}))
            .await;
        assert_eq!(code, 201, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    ids
}

/// The jobs' final views, once each has ended (bounded by `timeout` each).
async fn finals(api: &ApiClient, ids: &[String], timeout: Duration) -> Vec<Value> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(api.wait_final(id, timeout).await);
    }
    out
}

fn timing(job: &Value, field: &str) -> jiff::Timestamp {
    job["timings"][field]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{field} in {job}"))
}

/// p95 of the jobs' queue waits (submit to start), seconds.
fn p95_wait(jobs: &[Value]) -> f64 {
    let mut waits: Vec<f64> = jobs
        .iter()
        .map(|j| j["timings"]["queue_seconds"].as_f64().unwrap())
        .collect();
    waits.sort_by(f64::total_cmp);
    percentile(&waits, 0.95)
}

/// The most of `jobs` on pods at once (from hand-off to end).
fn most_at_once(jobs: &[Value]) -> i32 {
    let mut edges: Vec<(jiff::Timestamp, i32)> = jobs
        .iter()
        .flat_map(|j| {
            [
                (timing(j, "dispatched_at"), 1),
                (timing(j, "finished_at"), -1),
            ]
        })
        .collect();
    // An end and a hand-off in the same millisecond: the end first.
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most
}

struct FairnessRun {
    idle_p95: f64,
    behind_batch_p95: f64,
    weighted_split: f64,
    capped_most: i32,
}

/// Fair shares on 4 pods of jobs of one 100 ms step: a small batch on an idle fleet and
/// behind a large one, two saturating keys of weights 3 and 1, and a key capped at 2.
async fn fairness_run(
    tb: &Testbed,
    client: &Client,
    ns: &str,
    work: &Path,
    first: usize,
    bin: &Path,
) -> FairnessRun {
    const PODS: usize = 4;
    let long = Duration::from_secs(600);
    let fleet = format!("fair-{first}");
    let config = fake_config(100, 0, work.join(format!("{fleet}-output")));
    let fakes = pods(client, ns, &fleet, first, PODS, &config).await;
    let gw = gateway(tb, ns, &fleet, work, &fakes, first, &[], bin).await;
    let a = add_fleet_key(&gw, work, &fleet, "a", "").await;
    let b = add_fleet_key(&gw, work, &fleet, "b", "").await;
    let heavy = add_fleet_key(&gw, work, &fleet, "w3", "weight=3").await;
    let light = add_fleet_key(&gw, work, &fleet, "w1", "weight=1").await;
    let capped = add_fleet_key(&gw, work, &fleet, "capped", "max-running=2").await;

    // B's 20 on an idle fleet, then behind A's 2,000.
    let idle = finals(&b, &submit_n(&b, 20).await, long).await;
    let batch = submit_n(&a, 2000).await;
    let behind = finals(&b, &submit_n(&b, 20).await, long).await;
    for id in &batch {
        let _ = a.post(&format!("/api/v2/jobs/{id}/cancel")).send().await;
    }
    finals(&a, &batch, long).await;

    // Weights 3:1, both keys submitting 300 at once: who got starts 100 to 300 (both
    // still backlogged: at 3:1 the heavy key's last starts near the 400th).
    let (heavy_ids, light_ids) = tokio::join!(submit_n(&heavy, 300), submit_n(&light, 300));
    let mut starts: Vec<(jiff::Timestamp, bool)> = finals(&heavy, &heavy_ids, long)
        .await
        .iter()
        .map(|j| (timing(j, "started_at"), true))
        .chain(
            finals(&light, &light_ids, long)
                .await
                .iter()
                .map(|j| (timing(j, "started_at"), false)),
        )
        .collect();
    starts.sort();
    let heavy_first = starts[100..300].iter().filter(|(_, h)| *h).count();
    let weighted_split = heavy_first as f64 / (200 - heavy_first).max(1) as f64;

    // A key capped at 2 beside another with work: never more than 2 on pods.
    let capped_ids = submit_n(&capped, 40).await;
    let other = submit_n(&a, 40).await;
    let capped_jobs = finals(&capped, &capped_ids, long).await;
    finals(&a, &other, long).await;
    FairnessRun {
        idle_p95: p95_wait(&idle),
        behind_batch_p95: p95_wait(&behind),
        weighted_split,
        capped_most: most_at_once(&capped_jobs),
    }
}

async fn fairness(tb: &Testbed, client: &Client, ns: &str, work: &Path, report: &mut String) {
    let mut runs = Vec::new();
    for (i, build) in builds().iter().enumerate() {
        let run = fairness_run(tb, client, ns, work, 200 + 10 * i, &build.bin).await;
        runs.push((build.name.clone(), run));
    }
    report.push_str("### Fair shares (4 pods, jobs of one 100 ms step, one checkpoint)\n\n");
    let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
    writeln!(report, "| | {} |", names.join(" | ")).unwrap();
    writeln!(report, "|---|{}", "---|".repeat(runs.len())).unwrap();
    let row = |label: &str, f: &dyn Fn(&FairnessRun) -> String| {
        let cells: Vec<String> = runs.iter().map(|(_, r)| f(r)).collect();
        format!("| {label} | {} |\n", cells.join(" | "))
    };
    report.push_str(&row(
        "key B's 20 jobs on an idle fleet: p95 wait, s",
        &|r| format!("{:.2}", r.idle_p95),
    ));
    report.push_str(&row(
        "key B's 20 jobs submitted behind key A's 2,000: p95 wait, s",
        &|r| format!("{:.2}", r.behind_batch_p95),
    ));
    report.push_str(&row("behind A's batch against idle", &|r| {
        format!("{:.1}×", r.behind_batch_p95 / r.idle_p95)
    }));
    report.push_str(&row(
        "weights 3:1, both backlogged: starts 100 to 300",
        &|r| format!("{:.2} : 1", r.weighted_split),
    ));
    report.push_str(&row(
        "key with max-running=2 beside another: most on pods at once",
        &|r| r.capped_most.to_string(),
    ));
    report.push_str("\nA build without fair shares reads the share words as unknown (ignored) and serves one FIFO.\n\n");
}

/// One store set-up under test: its replicas (the first holds the lease) and a client
/// per replica.
struct StoreSetup {
    name: &'static str,
    replicas: Vec<GatewayProcess>,
    apis: Vec<ApiClient>,
}

async fn store_setup(
    tb: &Testbed,
    ns: &str,
    fleet: &str,
    work: &Path,
    fakes: &[FakeComfy],
    first: usize,
    store: &str,
) -> StoreSetup {
    let key = format!("key-{}", unique_suffix());
    let dir = work.join(format!("{fleet}-keys"));
    api_keys_dir(&dir, "bench", &key);
    let url_file = work.join(format!("{fleet}-postgres-url"));
    std::fs::write(&url_file, tb.var("SDFLEET_TESTBED_POSTGRES_URL")).unwrap();
    let mut args: Vec<String> = vec![
        "--namespace".into(),
        ns.into(),
        "--fleet".into(),
        fleet.into(),
        "--api-keys-dir".into(),
        dir.display().to_string(),
        "--queue-cap".into(),
        "20000".into(),
    ];
    let (name, count) = match store {
        "redb" => {
            args.extend([
                "--store".into(),
                work.join(format!("{fleet}.redb")).display().to_string(),
            ]);
            ("embedded redb, 1 replica", 1)
        }
        "pg1" => {
            args.extend(["--postgres-url-file".into(), url_file.display().to_string()]);
            ("PostgreSQL, 1 replica", 1)
        }
        _ => {
            args.extend(["--postgres-url-file".into(), url_file.display().to_string()]);
            ("PostgreSQL, 3 replicas (requests spread over all three)", 3)
        }
    };
    args.extend(map_args(fakes, first));
    let mut replicas = vec![GatewayProcess::start(tb, args.clone())];
    replicas[0].wait_ready(fleet, fakes.len()).await;
    for _ in 1..count {
        replicas.push(GatewayProcess::start(tb, args.clone()));
    }
    for r in &replicas[1..] {
        r.wait_serving().await;
    }
    let apis = replicas
        .iter()
        .map(|r| ApiClient::new(&r.url(""), &key))
        .collect();
    StoreSetup {
        name,
        replicas,
        apis,
    }
}

async fn stores(tb: &Testbed, client: &Client, ns: &str, work: &Path, report: &mut String) {
    const LATENCY_JOBS: usize = 200;
    const THROUGHPUT_JOBS: usize = 2000;
    const PODS: usize = 8;
    let mut rows = Vec::new();
    for (i, store) in ["redb", "pg1", "pg3"].into_iter().enumerate() {
        let fleet = format!("st-{store}");
        let first = 200 + i * (PODS + 1);
        let config = fake_config(0, 0, work.join(format!("{fleet}-output")));
        let fakes = pods(client, ns, &fleet, first, PODS, &config).await;
        let setup = store_setup(tb, ns, &fleet, work, &fakes, first, store).await;
        // Latency: one job at a time, sync mode, through each replica in turn.
        gateway_job(&setup.apis[0], &sdxl_workflow(CHECKPOINTS[0], 1)).await;
        let mut latency = Vec::new();
        for n in 0..LATENCY_JOBS {
            let api = &setup.apis[n % setup.apis.len()];
            let took = gateway_job(api, &sdxl_workflow(CHECKPOINTS[0], 1)).await;
            latency.push(took.as_secs_f64() * 1000.0);
        }
        latency.sort_by(f64::total_cmp);
        // Saturation: 2,000 jobs submitted by 16 clients at once over the replicas,
        // until the last one has succeeded.
        let start = Instant::now();
        let mut submitters = Vec::new();
        for c in 0..16 {
            let api = setup.apis[c % setup.apis.len()].clone();
            submitters.push(tokio::spawn(async move {
                for _ in 0..THROUGHPUT_JOBS / 16 {
                    let (code, body) = api
                        .submit(json!({"prompt": sdxl_workflow(CHECKPOINTS[0], 1)}))
                        .await;
                    assert_eq!(code, 201, "{body}");
                }
            }));
        }
        for s in submitters {
            s.await.unwrap();
        }
        let submitted = start.elapsed().as_secs_f64();
        let done =
            format!("sdfleet_gateway_jobs_finished_total{{fleet=\"{fleet}\",state=\"succeeded\"}}");
        let total = (THROUGHPUT_JOBS + LATENCY_JOBS + 1) as f64;
        eventually(
            &format!("{fleet}: every job to succeed"),
            Duration::from_secs(600),
            || async { (setup.replicas[0].metric(&done).await? >= total).then_some(()) },
        )
        .await;
        let elapsed = start.elapsed().as_secs_f64();
        rows.push((
            setup.name,
            percentile(&latency, 0.5),
            percentile(&latency, 0.99),
            THROUGHPUT_JOBS as f64 / submitted,
            THROUGHPUT_JOBS as f64 / elapsed,
        ));
        drop(setup);
        drop(fakes);
    }
    writeln!(
        report,
        "### Job stores ({LATENCY_JOBS} sync jobs one at a time; then {THROUGHPUT_JOBS} jobs from 16 clients at once on {PODS} pods whose jobs take no time)\n"
    )
    .unwrap();
    report.push_str("| store | p50 ms | p99 ms | submits/s | jobs/s through the dispatcher |\n|---|---|---|---|---|\n");
    for (name, p50, p99, submits, jobs) in rows {
        writeln!(
            report,
            "| {name} | {p50:.1} | {p99:.1} | {submits:.0} | {jobs:.0} |"
        )
        .unwrap();
    }
    report.push_str("\nWith three replicas, two of every three requests reach a follower, which forwards it to the lease holder. PostgreSQL is the testbed's (the distribution's server, fsync on, on the same machine).\n\n");
}

#[tokio::test]
#[ignore = "benchmark: bench/gateway-bench.sh"]
async fn gateway_benchmarks() {
    let tb = Testbed::get();
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "gw-bench").await;
    let work = std::env::temp_dir().join(format!("gw-bench-{}", ns.name));
    std::fs::create_dir_all(&work).unwrap();
    let mut report = String::new();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    writeln!(
        report,
        "## Gateway benchmarks\n\n`bench/gateway-bench.sh` ({}; {cpus} cores; release build; testbed apiserver, moto, fake ComfyUI pods on loopback).\n",
        jiff::Timestamp::now().strftime("%Y-%m-%d")
    )
    .unwrap();
    for build in builds() {
        writeln!(report, "- {}: `{}`", build.name, build.bin.display()).unwrap();
    }
    report.push('\n');
    // SDFLEET_BENCH_ONLY=latency (or placement, memory): one section, while working on it.
    let only = std::env::var("SDFLEET_BENCH_ONLY").ok();
    let run = |section: &str| only.as_deref().is_none_or(|o| o == section);
    if run("latency") {
        latency(tb, &client, &ns.name, &work, &mut report).await;
    }
    if run("placement") {
        placement(tb, &client, &ns.name, &work, &mut report).await;
    }
    if run("memory") {
        memory(tb, &client, &ns.name, &work, &mut report).await;
    }
    if run("fairness") {
        fairness(tb, &client, &ns.name, &work, &mut report).await;
    }
    if run("stores") {
        stores(tb, &client, &ns.name, &work, &mut report).await;
    }
    println!("{report}");
    if let Ok(out) = std::env::var("SDFLEET_BENCH_OUT") {
        std::fs::write(out, &report).unwrap();
    }
}
