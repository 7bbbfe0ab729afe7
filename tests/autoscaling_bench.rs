//! The cost of a day of bursty traffic, time-compressed on the testbed (one hour of the
//! day is `SDFLEET_BENCH_HOUR_SECONDS`, default 10 s): the same arrivals go, side by
//! side in one run, to three fleets in three namespaces, each with its own controller
//! (as the chart's ServiceAccount), gateway (as rendered) and Karpenter NodePool:
//! fixed replicas sized for the peak, autoscaling with minReplicas 1, and with 0.
//! It reports GPU-node-hours (nodes of each NodePool, sampled every 0.5 s), queue wait
//! p50/p95 and cold starts. `bench/autoscaling-bench.sh` runs it and writes
//! bench/autoscaling.md. Ignored in the suite: it is a benchmark, not a test.

mod support;

use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use sdfleet::crd::ComfyUIDeployment;
use serde_json::{Value, json};
use support::fleet::*;
use support::gateway::*;
use support::*;

/// Jobs per second of testbed time in each hour of the day: quiet nights, a morning
/// ramp, office-hours peaks with a lunch dip, an evening tail and one late burst.
const RATES: [f64; 24] = [
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.8, 2.5, 3.0, 2.0, 1.0, 2.5, 3.0, 2.0, 1.0, 0.5, 0.2,
    0.0, 0.0, 0.0, 0.6, 0.0,
];
/// Steps of each job (200 ms each on the fakes): a one-second job.
const STEPS: u64 = 5;
/// g5.2xlarge on-demand, us-west-2 (the testbed's instance-type price list).
const NODE_HOUR_USD: f64 = 1.212;

struct Variant {
    name: &'static str,
    replicas: i32,
    autoscaling: Option<Value>,
}

fn variants() -> Vec<Variant> {
    let scaled = |min: i32| {
        Some(
            json!({"minReplicas": min, "maxReplicas": 4, "targetJobsPerReplica": 2,
                    "scaleDownDelaySeconds": 3, "maxColdStartWaitSeconds": 1}),
        )
    };
    vec![
        Variant {
            name: "fixed replicas (4, the peak)",
            replicas: 4,
            autoscaling: None,
        },
        Variant {
            name: "autoscaling, minReplicas 1",
            replicas: 1,
            autoscaling: scaled(1),
        },
        Variant {
            name: "autoscaling, minReplicas 0",
            replicas: 1,
            autoscaling: scaled(0),
        },
    ]
}

/// Arrival times (seconds from the start of the day), the same for every variant: a
/// Poisson process per hour from a fixed seed.
fn arrivals(hour: f64) -> Vec<f64> {
    let mut state: u64 = 0x5d_f1ee7;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::new();
    for (h, rate) in RATES.iter().enumerate() {
        if *rate == 0.0 {
            continue;
        }
        let (start, end) = (h as f64 * hour, (h + 1) as f64 * hour);
        // The rates are per 10 s hour; a longer hour keeps the jobs per hour.
        let rate = rate * 10.0 / hour;
        let mut t = start;
        loop {
            t += -(1.0 - uniform()).ln() / rate;
            if t >= end {
                break;
            }
            out.push(t);
        }
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::test]
#[ignore = "benchmark: bench/autoscaling-bench.sh"]
async fn a_day_of_bursty_traffic_fixed_against_autoscaled_min_1_and_min_0() {
    let hour: f64 = std::env::var("SDFLEET_BENCH_HOUR_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let (release, release_ns) = install_release(tb, "asb");
    let s3 = s3_client(tb).await;
    let bucket = create_bucket(&s3, "asbench").await;

    let mut fleets = Vec::new();
    for variant in variants() {
        let ns = TestNamespace::new(&client, "asbench").await;
        let controller = start_controller(tb, &ns.name, &release, &release_ns);
        create_gateway_store(&client, &ns.name).await;
        let mut spec = json!({
            "image": "comfyui:test",
            "replicas": variant.replicas,
            "gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 4},
            "disruption": {"consolidateAfter": "5s"},
            "storage": {"outputs": {"bucket": bucket, "prefix": format!("{}/", ns.name)}},
            "ingress": {"enabled": false},
            "gateway": {"allowUnauthenticated": true, "queueCap": 1000},
        });
        if let Some(a) = &variant.autoscaling {
            spec["autoscaling"] = a.clone();
        }
        let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
        let manifest = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
                              "metadata": {"name": "sdxl"}, "spec": spec});
        cuds.patch(
            "sdxl",
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&manifest),
        )
        .await
        .unwrap();
        let (gateway, bridge) = start_rendered_gateway(tb, &client, &ns.name).await;
        let pool = eventually("the NodePool", Duration::from_secs(120), || async {
            cuds.get("sdxl").await.ok()?.status?.node_pool
        })
        .await;
        fleets.push((variant, ns, controller, cuds, gateway, bridge, pool));
    }
    // Settled before the day begins: fixed at 4 ready pods, min 1 at 1, min 0 at none.
    for (variant, _, _, _, gateway, _, _) in &fleets {
        let want = match &variant.autoscaling {
            None => variant.replicas,
            Some(a) => a["minReplicas"].as_i64().unwrap_or(0) as i32,
        };
        gateway.wait_ready("sdxl", want as usize).await;
    }

    let trace = arrivals(hour);
    let day = Duration::from_secs_f64(24.0 * hour);
    println!(
        "{} jobs over a day of {} s (1 h = {hour} s)",
        trace.len(),
        day.as_secs()
    );
    let apis: Vec<ApiClient> = fleets
        .iter()
        .map(|f| ApiClient::new(&f.4.url(""), "unused"))
        .collect();
    let pools: Vec<String> = fleets.iter().map(|f| f.6.clone()).collect();
    let start = Instant::now();
    // Nodes of each pool, every 0.5 s through the day.
    let sampler = {
        let client = client.clone();
        let pools = pools.clone();
        tokio::spawn(async move {
            let mut node_seconds = vec![0.0; pools.len()];
            let mut nodes = vec![0usize; pools.len()];
            let mut last = Instant::now();
            while start.elapsed() < day {
                // Each count holds from its sample to the next (the lists take time too).
                let now = Instant::now();
                for (i, n) in nodes.iter().enumerate() {
                    node_seconds[i] += *n as f64 * (now - last).as_secs_f64();
                }
                last = now;
                for (i, pool) in pools.iter().enumerate() {
                    nodes[i] = nodes_of_pool(&client, pool).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let end = Instant::now().min(start + day);
            for (i, n) in nodes.iter().enumerate() {
                node_seconds[i] += *n as f64 * end.saturating_duration_since(last).as_secs_f64();
            }
            node_seconds
        })
    };
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); fleets.len()];
    for at in &trace {
        let due = Duration::from_secs_f64(*at);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let body = json!({"prompt": sdxl_workflow(CKPT, STEPS)});
        let submitted =
            futures::future::join_all(apis.iter().map(|api| api.submit(body.clone()))).await;
        for (i, (code, job)) in submitted.into_iter().enumerate() {
            assert_eq!(code, 201, "{job}");
            ids[i].push(job["id"].as_str().unwrap().to_string());
        }
    }
    let node_seconds = sampler.await.unwrap();

    let mut rows = Vec::new();
    for (i, (variant, _, _, cuds, _, _, _)) in fleets.iter().enumerate() {
        let mut waits = Vec::new();
        let mut cold = 0;
        for id in &ids[i] {
            let done = apis[i].wait_final(id, Duration::from_secs(300)).await;
            assert_eq!(done["state"], "succeeded", "{done}");
            waits.push(
                done["timings"]["queue_seconds"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
            cold += usize::from(!done["timings"]["cold_start_phases"].is_null());
        }
        waits.sort_by(f64::total_cmp);
        let decisions = cuds
            .get("sdxl")
            .await
            .ok()
            .and_then(|c| c.status?.autoscaling?.last_decision)
            .map(|d| d.message)
            .unwrap_or_else(|| "-".into());
        let node_hours = node_seconds[i] / hour;
        rows.push(format!(
            "| {} | {:.1} | ${:.2} | {:.2} s | {:.2} s | {cold} |",
            variant.name,
            node_hours,
            node_hours * NODE_HOUR_USD,
            percentile(&waits, 0.5),
            percentile(&waits, 0.95),
        ));
        println!("{}: last decision: {decisions}", variant.name);
    }
    println!(
        "\n| fleet | GPU-node-hours | cost (g5.2xlarge on-demand) | queue wait p50 | queue wait p95 | jobs that waited on a cold start |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    for (_, _, _, cuds, _, _, _) in &fleets {
        cuds.delete("sdxl", &Default::default()).await.unwrap();
    }
    for (_, _, _, cuds, _, _, _) in &fleets {
        eventually("the fleet gone", Duration::from_secs(180), || async {
            cuds.get_opt("sdxl").await.ok()?.is_none().then_some(())
        })
        .await;
    }
    drop(fleets);
    uninstall_release(tb, &release, &release_ns);
}
