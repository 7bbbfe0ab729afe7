//! The chart's dashboard and alerts query metrics by name, and nothing reports a name
//! that no binary exports: the panel stays empty and the alert never fires. So this test
//! takes every PromQL expression the chart ships (the dashboard's panels and variables,
//! the rendered PrometheusRules), pulls the metric names out of them, runs the real
//! binaries on the testbed (the controller with `--cloud kwok`, a gateway in front of a
//! fake ComfyUI), drives each until every family it registers has a sample, scrapes
//! their `/metrics`, and fails naming each queried metric that neither exports.
//!
//! The node agent serves no metrics (`sdfleet agent` has no metrics address), so it is
//! not run; what the panels show of model syncs comes from the controller, which reads
//! the agents' reports. prometheus-client 0.25 leaves a family with no sample out of the
//! exposition altogether (no `# TYPE` line either: checked below), hence the driving.
//! Every family the chart queries is sdfleet's own (the store alert reads the gateway's
//! `store_used_bytes`/`store_capacity_bytes`, not the kubelet's volume stats).

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use sdfleet::crd::{ComfyUIDeployment, ModelSet};
use serde_json::{Value, json};
use support::fake_comfyui::{FakeComfy, FakeConfig, Faults};
use support::gateway::*;
use support::*;

// ---- PromQL: the metric names an expression selects ----

/// Words that are PromQL's, not metric names (functions are told by the `(` after them).
const KEYWORDS: [&str; 25] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "inf",
    "nan",
];
/// Keywords followed by a list of label names in parentheses.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Open,
    Close,
    Other,
}

/// Tokens of `expr` without what cannot hold a metric name: strings, label matchers
/// (`{...}`), ranges (`[...]`), numbers and durations, Grafana's `$variables`.
fn tokens(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    // Skips a quoted string starting at `chars[i]`; returns the index after it.
    let skip_string = |mut i: usize| {
        let quote = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != quote {
            if chars[i] == '\\' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(i),
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                i += 1;
                while i < chars.len() && chars[i] != close {
                    i = if matches!(chars[i], '"' | '\'' | '`') {
                        skip_string(i)
                    } else {
                        i + 1
                    };
                }
                i += 1;
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && word(chars[i]) {
                        i += 1;
                    }
                }
            }
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                // A number or duration: 0.9, 1e9, 5m, 0x1f.
                while i < chars.len() && (word(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
                out.push(Token::Other);
            }
            c if word(c) => {
                let start = i;
                while i < chars.len() && word(chars[i]) {
                    i += 1;
                }
                out.push(Token::Word(chars[start..i].iter().collect()));
            }
            c if c.is_whitespace() => i += 1,
            _ => {
                out.push(Token::Other);
                i += 1;
            }
        }
    }
    out
}

/// The metric names `expr` selects: words that are no keyword, no function (a word
/// followed by `(`) and no label of a `by (...)`-like list.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let tokens = tokens(expr);
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        if let Token::Word(w) = &tokens[i] {
            let lower = w.to_ascii_lowercase();
            let next_opens = tokens.get(i + 1) == Some(&Token::Open);
            if LABEL_LISTS.contains(&lower.as_str()) && next_opens {
                // Skip the label list up to its `)`.
                i += 2;
                while i < tokens.len() && tokens[i] != Token::Close {
                    i += 1;
                }
            } else if !KEYWORDS.contains(&lower.as_str()) && !next_opens {
                names.insert(w.clone());
            }
        }
        i += 1;
    }
    names
}

/// The PromQL of a Grafana variable's query: `label_values(SELECTOR, label)` selects
/// SELECTOR; `label_values(label)` selects no metric; anything else is PromQL.
fn variable_expr(query: &str) -> Option<String> {
    let Some(inner) = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    else {
        return Some(query.to_string());
    };
    // The last comma outside braces and parentheses ends the selector.
    let mut depth = 0i32;
    let mut split = None;
    for (at, c) in inner.char_indices() {
        match c {
            '{' | '(' => depth += 1,
            '}' | ')' => depth -= 1,
            ',' if depth == 0 => split = Some(at),
            _ => {}
        }
    }
    split.map(|at| inner[..at].to_string())
}

// ---- The exposition: which names a scrape stores ----

/// Whether Prometheus stores series named `name` from this OpenMetrics text: a sample
/// line of that name, or a `# TYPE` family whose samples take that name (a counter's
/// `_total`, a histogram's `_bucket`, `_sum` and `_count`, a gauge's own name).
fn exports(text: &str, name: &str) -> bool {
    text.lines().any(|line| {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
                return false;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "gauge" | "unknown" => &[""],
                _ => &[],
            };
            suffixes
                .iter()
                .any(|s| name.strip_suffix(s) == Some(family))
        } else if !line.starts_with('#') {
            line.split(['{', ' ']).next() == Some(name)
        } else {
            false
        }
    })
}

/// The queried names no exposition exports.
fn missing(names: &BTreeSet<String>, expositions: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter(|n| !expositions.iter().any(|text| exports(text, n)))
        .cloned()
        .collect()
}

// ---- What the chart queries ----

/// Every PromQL expression the chart ships, with where it is (for the failure message):
/// from the rendered objects, so that the thresholds are filled in as installed.
fn chart_queries() -> Vec<(String, String)> {
    let docs = render_chart(&MONITORING_ON);
    let mut queries = Vec::new();
    let cm = one_of_kind(&docs, "ConfigMap");
    let dashboard: Value =
        serde_json::from_str(cm["data"]["sdfleet.json"].as_str().unwrap()).unwrap();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    // Collapsed rows hold their panels.
    let nested: Vec<&Value> = panels
        .iter()
        .filter_map(|p| p["panels"].as_array())
        .flatten()
        .collect();
    panels.extend(nested);
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let at = format!("panel {:?}", panel["title"].as_str().unwrap_or(""));
                queries.push((at, expr.to_string()));
            }
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or("");
        if let Some(expr) = variable_expr(query) {
            queries.push((format!("variable {}", var["name"]), expr));
        }
    }
    let rules = one_of_kind(&docs, "PrometheusRule");
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let at = format!("alert {}", rule["alert"].as_str().unwrap_or("?"));
            queries.push((at, rule["expr"].as_str().unwrap().to_string()));
        }
    }
    queries
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.9, sum by (namespace, fleet, le) (rate(a_seconds_bucket{x="}y", z=~"$ns"}[10m]))) > 300"#
        ),
        ["a_seconds_bucket"]
    );
    assert_eq!(
        names(
            "(sum by (namespace, fleet) (q) > 0)\nand on (namespace, fleet)\n(sum(r) by (fleet) == 0)"
        ),
        ["q", "r"]
    );
    assert_eq!(
        names("max by (namespace, name) (x) - max without (pod) (y offset 5m) / 1e9"),
        ["x", "y"]
    );
    assert_eq!(
        names("sum(increase(c_total[$__range])) * on (a) group_left (b) info"),
        ["c_total", "info"]
    );
    assert_eq!(names("vector(1) or absent(up)"), ["up"]);
    assert_eq!(
        variable_expr(r#"label_values(m{namespace=~"$namespace"}, name)"#).as_deref(),
        Some(r#"m{namespace=~"$namespace"}"#)
    );
    assert_eq!(variable_expr("label_values(namespace)"), None);
}

#[test]
fn the_exposition_check_follows_openmetrics_names() {
    let text = "# HELP sdfleet_reconciles Reconciles.\n# TYPE sdfleet_reconciles counter\n\
                # TYPE sdfleet_reconcile_duration_seconds histogram\n\
                # TYPE sdfleet_fleet_nodes gauge\n\
                sdfleet_other_total{a=\"b\"} 1\n# EOF\n";
    for name in [
        "sdfleet_reconciles_total",
        "sdfleet_reconcile_duration_seconds_bucket",
        "sdfleet_reconcile_duration_seconds_count",
        "sdfleet_fleet_nodes",
        "sdfleet_other_total",
    ] {
        assert!(exports(text, name), "{name}");
    }
    // A counter's family name and a histogram's are no series of their own.
    for name in [
        "sdfleet_reconciles",
        "sdfleet_reconcile_duration_seconds",
        "sdfleet_fleet_nodes_total",
        "sdfleet_other",
    ] {
        assert!(!exports(text, name), "{name}");
    }
}

/// prometheus-client 0.25 writes nothing, not even `# TYPE`, for a family without a
/// sample: why the test drives the binaries rather than scraping them idle.
#[test]
fn an_empty_family_is_not_in_the_exposition() {
    use prometheus_client::metrics::{counter::Counter, family::Family};
    let mut registry = prometheus_client::registry::Registry::default();
    let family = Family::<Vec<(String, String)>, Counter>::default();
    registry.register("idle", "No sample yet", family.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(!text.contains("idle"), "{text}");
    family.get_or_create(&vec![("a".into(), "b".into())]).inc();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(exports(&text, "idle_total"), "{text}");
}

const FLEET: &str = "obs-fleet";
const GATEWAY_FLEET: &str = "obs-gw";
const CKPT: &str = "sd_xl_base_1.0.safetensors";
const WAIT: Duration = Duration::from_secs(120);

/// A fleet the controller takes to the end of a reconcile with every per-fleet gauge:
/// autoscaled (capacity, decisions), with a ModelSet (node and sync counts).
fn fleet_manifest() -> Value {
    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
    "metadata": {"name": FLEET},
    "spec": {
        "image": "comfyui:test",
        "gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 1},
        "modelSet": "models",
        "ingress": {"enabled": false},
        "gateway": {"allowUnauthenticated": true},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelaySeconds": 0},
    }})
}

fn modelset_manifest(name: &str, bucket: &str) -> Value {
    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": name},
        "spec": {"source": {"s3": {"bucket": bucket, "prefix": "models/", "region": "us-west-2"}}}})
}

/// Scrapes until no queried name is missing, or `WAIT` has passed; the names missing
/// at the last scrape (empty: all there) and the expositions.
async fn scrape_until_complete(
    names: &BTreeSet<String>,
    controller: &ControllerProcess,
    gateway: &GatewayProcess,
) -> (Vec<String>, Vec<String>) {
    let start = Instant::now();
    let mut last = (names.iter().cloned().collect(), vec![]);
    for _ in 0..(WAIT.as_secs() * 2) {
        let texts = vec![
            controller.metrics().await.unwrap_or_default(),
            http_get(gateway.metrics_port, "/metrics")
                .await
                .unwrap_or_default(),
        ];
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        last = (missing(names, &refs), texts);
        if last.0.is_empty() || start.elapsed() > WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    last
}

/// The controller, and on a failed run what its finalizers would have cleaned up had the
/// test reached its end: it is stopped first (it would put the finalizers back), then
/// the fleet's and the ModelSets' finalizers go, its cluster-scoped children and the
/// namespace, so that the shared testbed keeps no NodePool of a test that is over.
struct Controlled<'a> {
    controller: ControllerProcess,
    tb: &'a Testbed,
    namespace: String,
}

impl Drop for Controlled<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let _ = self.controller.child.kill();
        let _ = self.controller.child.wait();
        let ns = self.namespace.as_str();
        let kubectl = |args: &[&str]| {
            let _ = self.tb.kubectl().args(args).output();
        };
        for object in [
            format!("comfyuideployment/{FLEET}"),
            "modelset/models".into(),
            "modelset/nowhere".into(),
        ] {
            kubectl(&[
                "-n",
                ns,
                "patch",
                &object,
                "--type",
                "merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
        }
        kubectl(&[
            "delete",
            "nodepools.karpenter.sh,kwoknodeclasses.karpenter.kwok.sh",
            "--wait=false",
            "-l",
            &format!("sdfleet.io/owner-namespace={ns}"),
        ]);
        kubectl(&["delete", "namespace", ns, "--wait=false"]);
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let queries = chart_queries();
    let mut names = BTreeSet::new();
    for (at, expr) in &queries {
        let found = metric_names(expr);
        assert!(!found.is_empty(), "{at}: no metric in {expr}");
        names.extend(found);
    }
    // The reader sees what the chart queries (a reader that finds nothing passes all).
    for known in [
        "sdfleet_fleet_ready_replicas",
        "sdfleet_reconcile_duration_seconds_bucket",
        "sdfleet_gateway_queued_jobs",
        "sdfleet_fleet_capacity_available",
        "sdfleet_gateway_store_used_bytes",
    ] {
        assert!(names.contains(known), "{known} not read from {names:?}");
    }

    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "obs").await;

    // The controller: a fleet through a whole reconcile, a decision to scale, a listed
    // ModelSet and one that cannot be listed (a reconcile error by reason).
    let s3 = s3_client(tb).await;
    let bucket = create_bucket(&s3, "obs").await;
    s3.put_object()
        .bucket(&bucket)
        .key(format!("models/checkpoints/{CKPT}"))
        .body(ByteStream::from_static(b"weights"))
        .send()
        .await
        .unwrap();
    // The agents' DaemonSet goes to the test's namespace: the operator's is not there.
    let controlled = Controlled {
        controller: ControllerProcess::start_with_env(
            tb,
            &ns.name,
            &["--agent-namespace", &ns.name],
            &tb.aws_env(),
        ),
        tb,
        namespace: ns.name.clone(),
    };
    let ssa = PatchParams::apply("test-user").force();
    let sets: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    for (name, bucket) in [
        ("models", bucket.as_str()),
        ("nowhere", "sdfleet-no-such-bucket"),
    ] {
        sets.patch(name, &ssa, &Patch::Apply(modelset_manifest(name, bucket)))
            .await
            .unwrap();
    }
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    cuds.patch(FLEET, &ssa, &Patch::Apply(fleet_manifest()))
        .await
        .unwrap();
    eventually("the fleet's first status", WAIT, || async {
        cuds.get(FLEET).await.ok()?.status?.autoscaling
    })
    .await;
    // Demand, as its gateway would publish it: a decision up.
    let demand = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
        "metadata": {"name": FLEET}, "status": {"demand": {"queued": 1, "running": 0}}});
    cuds.patch_status(
        FLEET,
        &PatchParams::apply("sdfleet-gateway").force(),
        &Patch::Apply(demand),
    )
    .await
    .unwrap();

    // The gateway: one job through (queue wait, run time, outcome), then a hand-off the
    // pod refuses (a dispatch error).
    let work = std::env::temp_dir().join(format!("obs-{}", ns.name));
    let fake = FakeComfy::start(
        &format!("{GATEWAY_FLEET}-pod-0"),
        FakeConfig {
            step_time: Duration::from_millis(20),
            switch_penalty: Duration::ZERO,
            models: vec![format!("checkpoints/{CKPT}")],
            output_dir: work.join("output"),
        },
    )
    .await;
    publish_pod(&client, &ns.name, GATEWAY_FLEET, 0, &fake).await;
    let mut args: Vec<String> = [
        "--namespace",
        &ns.name,
        "--fleet",
        GATEWAY_FLEET,
        "--store",
        &work.join("store/jobs.redb").display().to_string(),
        "--no-auth",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(endpoint_map_args(std::slice::from_ref(&fake)));
    let gateway = GatewayProcess::start(tb, args);
    gateway.wait_ready(GATEWAY_FLEET, 1).await;
    let api = ApiClient::new(&gateway.url(""), "unused");
    let (status, job) = api.submit(json!({"prompt": sdxl_workflow(CKPT, 2)})).await;
    assert_eq!(status, 201, "{job}");
    let done = api
        .wait_final(job["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    fake.set_faults(Faults {
        refuse_prompts: 1,
        ..Default::default()
    });
    let (status, job) = api.submit(json!({"prompt": sdxl_workflow(CKPT, 2)})).await;
    assert_eq!(status, 201, "{job}");

    let (absent, texts) = scrape_until_complete(&names, &controlled.controller, &gateway).await;
    assert!(
        absent.is_empty(),
        "queried by the chart but exported by no binary: {absent:?}\nwhere: {:?}\n\
         controller:\n{}\ngateway:\n{}",
        queries
            .iter()
            .filter(|(_, e)| absent.iter().any(|a| metric_names(e).contains(a)))
            .map(|(at, _)| at)
            .collect::<Vec<_>>(),
        texts[0],
        texts[1]
    );
    // And the check can fail: names the binaries do not store are reported.
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let wrong: BTreeSet<String> = [
        "sdfleet_reconciles",
        "sdfleet_fleet_ready_replica",
        "sdfleet_gateway_queue_seconds",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(missing(&wrong, &refs).len(), 3);

    // The fleet goes while its controller runs (its finalizer), then the ModelSets.
    cuds.delete(FLEET, &DeleteParams::default()).await.unwrap();
    for name in ["models", "nowhere"] {
        sets.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually("the fleet and ModelSets deleted", WAIT, || async {
        let fleet_gone = cuds.get_opt(FLEET).await.ok()?.is_none();
        let sets_gone = sets.list(&Default::default()).await.ok()?.items.is_empty();
        (fleet_gone && sets_gone).then_some(())
    })
    .await;
}
