//! The gateway on the testbed: the real `sdfleet gateway` process, finding its pods
//! through EndpointSlices on the real apiserver, fake ComfyUI pods on loopback, outputs
//! in S3 on moto. Each test has its own namespace, fleet, pods and gateway.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::fake_comfyui::{FakeComfy, FakeConfig, Faults};
use support::gateway::*;
use support::*;

const FLEET: &str = "sdxl";
const CKPT: &str = "sd_xl_base_1.0.safetensors";

fn workflow(ckpt: &str, steps: u64) -> Value {
    sdxl_workflow(ckpt, steps)
}

struct Setup {
    pods: usize,
    step_ms: u64,
    switch_ms: u64,
    model_set: bool,
    extra: Vec<String>,
    /// The store's directory is a tmpfs of this size (e.g. `4m`), to fill it.
    store_tmpfs: Option<&'static str>,
    /// The ModelSet's hot models; every pod's node then reports only those synced.
    hot: Vec<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            pods: 1,
            step_ms: 20,
            switch_ms: 0,
            model_set: false,
            extra: vec![],
            store_tmpfs: None,
            hot: vec![],
        }
    }
}

struct Env {
    ns: TestNamespace,
    fakes: Vec<FakeComfy>,
    gateway: GatewayProcess,
    api: ApiClient,
    s3: aws_sdk_s3::Client,
    bucket: String,
    output_dir: PathBuf,
    work: PathBuf,
}

impl Env {
    fn api(&mut self) -> ApiClient {
        self.api = ApiClient::new(&self.gateway.url(""), &self.api.key);
        self.api.clone()
    }
}

/// The fleet's ModelSet with a catalog in its status, as the controller writes it.
async fn model_set_with(client: &Client, ns: &str, name: &str, keys: &[&str]) {
    let api: Api<sdfleet::crd::ModelSet> = Api::namespaced(client.clone(), ns);
    let ms: sdfleet::crd::ModelSet = serde_json::from_value(json!({
        "apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
        "metadata": {"name": name},
        "spec": {"source": {"s3": {"bucket": "models-bucket"}}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &ms).await.unwrap();
    let models: Vec<Value> = keys
        .iter()
        .map(|k| json!({"key": k, "type": k.split('/').next().unwrap(), "size": 1, "etag": "e"}))
        .collect();
    let status = json!({"status": {"revision": "r1", "objectCount": keys.len(), "models": models,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "message": "", "lastTransitionTime": "2026-11-24T00:00:00Z"}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

/// The ModelSet `models` names `hot` models, and the nodes of pods `0..pods` report
/// them synced and the rest still syncing, as their agents would.
async fn hot_models_only(client: &Client, ns: &str, hot: &[String], pods: usize) {
    let sets: Api<sdfleet::crd::ModelSet> = Api::namespaced(client.clone(), ns);
    sets.patch(
        "models",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"hot": hot}})),
    )
    .await
    .unwrap();
    for i in 0..pods {
        report_node(client, ns, i, "Syncing", true).await;
    }
}

/// Node `node-INDEX`'s report of ModelSet `models`.
async fn report_node(client: &Client, ns: &str, index: usize, state: &str, hot_ready: bool) {
    let reports: Api<sdfleet::crd::ModelSync> = Api::namespaced(client.clone(), ns);
    let node = format!("node-{index}");
    let name = sdfleet::crd::ModelSync::name_for("models", &node);
    reports
        .patch(
            &name,
            &PatchParams::apply("sdfleet-tests").force(),
            &Patch::Apply(
                json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSync",
                "metadata": {"name": name},
                "spec": {"modelSet": "models", "node": node, "revision": "r1", "state": state,
                         "bytesDone": 1, "hotReady": hot_ready}}),
            ),
        )
        .await
        .unwrap();
}

async fn setup(opts: Setup) -> Env {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "gw").await;
    let s3 = s3_client(tb).await;
    let bucket = create_bucket(&s3, "gw-out").await;
    let work = std::env::temp_dir().join(format!("gw-{}", ns.name));
    let output_dir = work.join("output");
    let models = vec![
        format!("checkpoints/{CKPT}"),
        "checkpoints/other.safetensors".into(),
        "checkpoints/third.safetensors".into(),
    ];
    let mut fakes = Vec::new();
    for i in 0..opts.pods {
        let fake = FakeComfy::start(
            &format!("{FLEET}-pod-{i}"),
            FakeConfig {
                step_time: Duration::from_millis(opts.step_ms),
                switch_penalty: Duration::from_millis(opts.switch_ms),
                models: models.clone(),
                output_dir: output_dir.clone(),
            },
        )
        .await;
        publish_pod(&client, &ns.name, FLEET, i, &fake).await;
        fakes.push(fake);
    }
    let fleet_arg = if opts.model_set {
        model_set_with(
            &client,
            &ns.name,
            "models",
            &models.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        if !opts.hot.is_empty() {
            hot_models_only(&client, &ns.name, &opts.hot, opts.pods).await;
        }
        format!("{FLEET}:models")
    } else {
        FLEET.to_string()
    };
    let key = format!("key-{}", unique_suffix());
    api_keys_dir(&work.join("keys"), "ci", &key);
    let mut args: Vec<String> = vec![
        "--namespace".into(),
        ns.name.clone(),
        "--fleet".into(),
        fleet_arg,
        "--store".into(),
        work.join("store/jobs.redb").display().to_string(),
        "--api-keys-dir".into(),
        work.join("keys").display().to_string(),
        "--outputs-bucket".into(),
        bucket.clone(),
        "--outputs-prefix".into(),
        "results/".into(),
        "--outputs-region".into(),
        "us-west-2".into(),
        "--s3-endpoint".into(),
        tb.var("AWS_ENDPOINT_URL").into(),
        "--pod-lost-seconds".into(),
        "2".into(),
    ];
    args.extend(endpoint_map_args(&fakes));
    args.extend(opts.extra);
    if let Some(size) = opts.store_tmpfs {
        let dir = work.join("store");
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "mount a tmpfs on {} (the suite runs as root)",
            dir.display()
        );
    }
    let gateway = GatewayProcess::start(tb, args);
    gateway.wait_ready(FLEET, opts.pods).await;
    let api = ApiClient::new(&gateway.url(""), &key);
    Env {
        ns,
        fakes,
        gateway,
        api,
        s3,
        bucket,
        output_dir,
        work,
    }
}

/// The fake pod that runs job `id` (waits until one does).
async fn running_pod(env: &Env, id: &str) -> usize {
    eventually("the job to start", Duration::from_secs(10), || async {
        env.fakes
            .iter()
            .position(|f| f.running().as_deref() == Some(id))
    })
    .await
}

/// Submits `body` (201) and waits until the job ends.
async fn run_job(api: &ApiClient, body: Value, timeout: Duration) -> Value {
    let (status, job) = api.submit(body).await;
    assert_eq!(status, 201, "{job}");
    api.wait_final(job["id"].as_str().unwrap(), timeout).await
}

async fn s3_text(env: &Env, key: &str) -> String {
    let obj = env
        .s3
        .get_object()
        .bucket(&env.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    // The double's PNGs carry its `fake-image prompt=… node=… pod=…` line in a text chunk.
    String::from_utf8_lossy(&obj.body.collect().await.unwrap().into_bytes()).into_owned()
}

#[tokio::test]
async fn a_job_runs_to_succeeded_with_outputs_in_s3_and_sync_mode_returns_the_result() {
    let mut env = setup(Setup {
        step_ms: 40,
        ..Default::default()
    })
    .await;
    let api = env.api();
    let (status, job) = api.submit(json!({"prompt": workflow(CKPT, 10)})).await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["state"], "queued");
    let id = job["id"].as_str().unwrap().to_string();
    let events = api.events(&id, Duration::from_secs(30)).await;
    let states: Vec<&str> = events
        .iter()
        .filter_map(|(e, d)| match e.as_str() {
            "snapshot" | "state" | "done" => d["state"].as_str(),
            _ => None,
        })
        .collect();
    let mut deduped = states.clone();
    deduped.dedup();
    assert!(
        deduped == ["queued", "running", "succeeded"] || deduped == ["running", "succeeded"],
        "states seen: {states:?}"
    );
    assert!(
        events.iter().any(|(e, _)| e == "progress"),
        "no progress event"
    );
    let job = api.wait_final(&id, Duration::from_secs(10)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        job["timings"]["started_at"].is_string() && job["timings"]["finished_at"].is_string(),
        "{job}"
    );
    assert_eq!(job["timings"]["cold_start"], true);
    let output = &job["outputs"][0];
    let key = output["key"].as_str().unwrap();
    assert!(key.starts_with(&format!("results/{id}/")), "{key}");
    // The presigned URL serves the bytes from S3, with no credentials of the client's.
    let url = output["url"].as_str().unwrap();
    assert!(url.starts_with("http://127.0.0.1"), "{url}");
    let bytes = reqwest::get(url).await.unwrap();
    assert_eq!(bytes.status(), 200);
    let body = bytes.text().await.unwrap();
    assert!(body.contains(&format!("prompt={id}")), "{body}");
    assert_eq!(body, s3_text(&env, key).await);

    // Sync mode: the answer is the finished job.
    let (status, job) = api
        .submit_and_wait(json!({"prompt": workflow(CKPT, 3)}), 30)
        .await;
    assert_eq!(status, 200);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["timings"]["cold_start"], false);
    assert!(job["outputs"][0]["url"].is_string(), "{job}");
    // A bound shorter than the job: 202 with the job's URL.
    let resp = api
        .post("/api/v2/jobs")
        .header("Prefer", "wait=1")
        .json(&json!({"prompt": workflow(CKPT, 100)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let job: Value = resp.json().await.unwrap();
    assert_eq!(
        location,
        format!("/api/v2/jobs/{}", job["id"].as_str().unwrap())
    );
    assert!(
        ["queued", "running"].contains(&job["state"].as_str().unwrap()),
        "{job}"
    );
    drop(env.ns);
}

#[tokio::test]
async fn four_jobs_on_two_pods_each_stream_carries_only_its_own_monotonic_progress() {
    let mut env = setup(Setup {
        pods: 2,
        step_ms: 30,
        ..Default::default()
    })
    .await;
    let api = env.api();
    let mut ids = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let (status, job) = api.submit(json!({"prompt": workflow(CKPT, 12)})).await;
        assert_eq!(status, 201);
        let id = job["id"].as_str().unwrap().to_string();
        let (api, sid) = (api.clone(), id.clone());
        streams.push(tokio::spawn(async move {
            api.events(&sid, Duration::from_secs(60)).await
        }));
        ids.push(id);
    }
    let mut pods_used = BTreeSet::new();
    for (id, stream) in ids.iter().zip(streams) {
        let events = stream.await.unwrap();
        assert_eq!(
            events.last().map(|(e, _)| e.as_str()),
            Some("done"),
            "{id}: {events:?}"
        );
        let mut last: Option<(String, u64)> = None;
        let mut progress = 0;
        for (kind, data) in &events {
            let owner = if kind == "snapshot" {
                &data["id"]
            } else {
                &data["job"]
            };
            assert_eq!(
                owner,
                id.as_str(),
                "{kind} event of another job in {id}'s stream"
            );
            if kind == "progress" && data["max"].as_u64().unwrap_or(0) > 0 {
                let node = data["node"].as_str().unwrap().to_string();
                let value = data["value"].as_u64().unwrap();
                if let Some((n, v)) = &last
                    && *n == node
                {
                    assert!(value >= *v, "progress went back in {id}: {v} then {value}");
                }
                last = Some((node, value));
                progress += 1;
            }
        }
        assert_eq!(progress, 12, "{id}: every step once");
        let job = api.job(id).await;
        assert_eq!(job["state"], "succeeded");
        pods_used.insert(
            env.fakes
                .iter()
                .find(|f| f.started().contains(id))
                .unwrap()
                .name
                .clone(),
        );
    }
    assert_eq!(pods_used.len(), 2, "both pods worked");
    drop(env.ns);
}

#[tokio::test]
async fn cancel_removes_a_queued_job_before_any_pod_and_interrupts_only_the_running_one() {
    let mut env = setup(Setup {
        step_ms: 50,
        ..Default::default()
    })
    .await;
    let api = env.api();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, job) = api.submit(json!({"prompt": workflow(CKPT, 40)})).await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let fake = &env.fakes[0];
    eventually("the first job to run", Duration::from_secs(10), || async {
        (fake.running().as_deref() == Some(ids[0].as_str())).then_some(())
    })
    .await;
    // The third waits in the gateway (the pod holds one running plus one prefetched).
    let third = api.job(&ids[2]).await;
    assert_eq!(third["state"], "queued");
    assert!(third["pod"].is_null(), "{third}");
    let resp = api
        .post(&format!("/api/v2/jobs/{}/cancel", ids[2]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(api.job(&ids[2]).await["state"], "canceled");
    // The running one: interrupted there, and the prefetched job on the same pod goes on.
    let resp = api
        .post(&format!("/api/v2/jobs/{}/cancel", ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let first = api.wait_final(&ids[0], Duration::from_secs(10)).await;
    assert_eq!(first["state"], "canceled", "{first}");
    let second = api.wait_final(&ids[1], Duration::from_secs(20)).await;
    assert_eq!(second["state"], "succeeded", "{second}");
    assert_eq!(
        fake.started(),
        ids[..2],
        "the canceled queued job never reached the pod"
    );
    // Canceling a finished job is a conflict, not a silent success.
    let resp = api
        .post(&format!("/api/v2/jobs/{}/cancel", ids[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    drop(env.ns);
}

#[tokio::test]
async fn refusals_missing_model_full_queue_expiry_bad_key_and_idempotency() {
    let mut env = setup(Setup {
        pods: 0,
        model_set: true,
        extra: vec![
            "--queue-cap".into(),
            "2".into(),
            "--job-ttl-seconds".into(),
            "3".into(),
        ],
        ..Default::default()
    })
    .await;
    let api = env.api();
    // A model the fleet's ModelSet does not have: 422 before queueing.
    let catalog_loaded = || async {
        let (status, _) = api
            .submit(json!({"prompt": workflow("nope.safetensors", 1)}))
            .await;
        (status != 503).then_some(status)
    };
    let status = eventually(
        "the catalog to load",
        Duration::from_secs(20),
        catalog_loaded,
    )
    .await;
    assert_eq!(status, 422);
    let (_, body) = api
        .submit(json!({"prompt": workflow("nope.safetensors", 1)}))
        .await;
    assert_eq!(body["error"]["type"], "missing_model");
    assert_eq!(body["error"]["missing"][0]["name"], "nope.safetensors");
    assert_eq!(body["error"]["missing"][0]["node"], "1");

    // No key, a wrong key: 401.
    let resp = api
        .http
        .post(api.base.clone() + "/api/v2/jobs")
        .json(&json!({"prompt": workflow(CKPT, 1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let wrong = ApiClient::new(&api.base, "not-a-key");
    assert_eq!(
        wrong.submit(json!({"prompt": workflow(CKPT, 1)})).await.0,
        401
    );

    // A priority out of its range, or not a number: 400, nothing queued.
    for (priority, kind) in [
        (json!(1001), "invalid_priority"),
        (json!(-5000), "invalid_priority"),
        (json!(1u64 << 40), "invalid_request"),
        (json!("high"), "invalid_request"),
    ] {
        let (status, body) = api
            .submit(json!({"prompt": workflow(CKPT, 1), "priority": priority}))
            .await;
        assert_eq!(
            (status, body["error"]["type"].as_str()),
            (400, Some(kind)),
            "{body}"
        );
    }

    // The same Idempotency-Key twice, with the same body: one job.
    let keyed = json!({"prompt": workflow(CKPT, 1)});
    let submit_keyed = || async {
        let resp = api
            .post("/api/v2/jobs")
            .header("Idempotency-Key", "order-17")
            .json(&keyed)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    let (s1, a) = submit_keyed().await;
    let (s2, b) = submit_keyed().await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(a["id"], b["id"]);

    // With no pod, jobs wait: a second fills the cap of 2, a third gets 429.
    let (s, _) = api.submit(json!({"prompt": workflow(CKPT, 1)})).await;
    assert_eq!(s, 201);
    let resp = api
        .post("/api/v2/jobs")
        .json(&json!({"prompt": workflow(CKPT, 1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);

    // Unstarted past the TTL: expired, with a typed error.
    let job = api
        .wait_final(a["id"].as_str().unwrap(), Duration::from_secs(15))
        .await;
    assert_eq!(job["state"], "expired", "{job}");
    assert_eq!(job["error"]["type"], "expired");
    // The expired jobs left the queue: room again.
    assert_eq!(
        api.submit(json!({"prompt": workflow(CKPT, 1)})).await.0,
        201
    );
    // Health and the OpenAPI document need no key.
    let doc: Value = reqwest::get(env.gateway.url("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/api/v2/jobs"]["post"].is_object());
    let models: Value = api
        .get("/api/v2/models")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["fleets"][0]["ready"], true, "{models}");
    assert!(
        models["fleets"][0]["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == &json!(format!("checkpoints/{CKPT}")))
    );
    drop(env.ns);
}

#[tokio::test]
async fn an_input_is_uploaded_to_the_pod_under_the_name_comfyui_gives_it() {
    let mut env = setup(Setup::default()).await;
    let api = env.api();
    env.fakes[0].add_input("photo.png", b"someone else's photo");
    let mut prompt = workflow(CKPT, 2);
    prompt["10"] = json!({"class_type": "LoadImage", "inputs": {"image": "photo.png"}});
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(b"my photo");
    let (status, job) = api
        .submit(json!({"prompt": prompt, "inputs": {"photo.png": {"base64": data}}}))
        .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap();
    let job = api.wait_final(id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(env.fakes[0].uploads(), ["photo (1).png"]);
    assert_eq!(
        env.fakes[0].input_bytes("photo (1).png").unwrap(),
        b"my photo"
    );
    let ran = env.fakes[0].prompt_of(id).unwrap();
    assert_eq!(ran["10"]["inputs"]["image"], "photo (1).png");
    assert_eq!(
        ran["9"]["inputs"]["filename_prefix"],
        format!("{id}/ComfyUI")
    );
    // An input from a bucket that is not allowed is refused at submit.
    let (status, body) = api.submit(json!({"prompt": workflow(CKPT, 1), "inputs": {"x.png": {"url": "s3://elsewhere/x.png"}}})).await;
    assert_eq!(status, 403, "{body}");
    drop(env.ns);
}

#[tokio::test]
async fn a_pod_killed_mid_job_and_a_failing_node() {
    let mut env = setup(Setup {
        pods: 2,
        step_ms: 50,
        ..Default::default()
    })
    .await;
    let api = env.api();
    let (_, job) = api.submit(json!({"prompt": workflow(CKPT, 60)})).await;
    let id = job["id"].as_str().unwrap().to_string();
    let victim = running_pod(&env, &id).await;
    // Killed: its connections drop and its endpoint lingers, as when a node dies.
    env.fakes[victim].kill();
    let job = api.wait_final(&id, Duration::from_secs(40)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2);
    let survivor = 1 - victim;
    assert!(env.fakes[survivor].started().contains(&id));
    assert_eq!(job["pod"], Value::Null);

    // A node that fails: `failed` with the node and ComfyUI's message.
    env.fakes[survivor].set_faults(Faults {
        fail_class: Some("VAEDecode".into()),
        ..Default::default()
    });
    let job = run_job(
        &api,
        json!({"prompt": workflow(CKPT, 2)}),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "execution_error");
    assert_eq!(job["error"]["node"], "8");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected failure")
    );
    drop(env.ns);
}

#[tokio::test]
async fn gateway_killed_and_restarted_loses_no_job_and_runs_none_twice() {
    let mut env = setup(Setup {
        pods: 4,
        step_ms: 5,
        extra: vec!["--queue-cap".into(), "1000".into()],
        ..Default::default()
    })
    .await;
    let api = env.api();
    let mut ids = Vec::new();
    for _ in 0..200 {
        let (status, job) = api.submit(json!({"prompt": workflow(CKPT, 4)})).await;
        assert_eq!(status, 201);
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    // Kill it while jobs are queued, prefetched and running.
    let started = |fakes: &[FakeComfy]| fakes.iter().map(|f| f.started().len()).sum::<usize>();
    eventually("some jobs to start", Duration::from_secs(30), || async {
        (started(&env.fakes) >= 20).then_some(())
    })
    .await;
    env.gateway.restart_after_kill();
    env.gateway.wait_ready(FLEET, 4).await;
    let api = env.api();
    for id in &ids {
        let job = api.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert!(job["outputs"][0]["key"].is_string(), "{job}");
    }
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for fake in &env.fakes {
        for id in fake.started() {
            *runs.entry(id).or_default() += 1;
        }
    }
    assert_eq!(runs.len(), 200, "every job ran");
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    drop(env.ns);
}

#[tokio::test]
async fn a_thousand_jobs_on_four_pods_sharing_one_output_prefix_overwrite_nothing_and_run_once() {
    let mut env = setup(Setup {
        pods: 4,
        step_ms: 1,
        // Busy pods are asked about their jobs every second, while hand-offs stream in:
        // a resync that ran between a job's assignment and its `/prompt` took it for
        // lost, ran it again, and the stop sent to the first run interrupted the second.
        extra: vec![
            "--queue-cap".into(),
            "2000".into(),
            "--resync-seconds".into(),
            "1".into(),
        ],
        ..Default::default()
    })
    .await;
    let api = env.api();
    let mut ids = Vec::new();
    for chunk in 0..10 {
        let mut batch = Vec::new();
        for _ in 0..100 {
            let api = api.clone();
            batch.push(tokio::spawn(async move {
                api.submit(json!({"prompt": workflow(CKPT, 1)})).await
            }));
        }
        for b in batch {
            let (status, job) = b.await.unwrap();
            assert_eq!(status, 201, "chunk {chunk}: {job}");
            ids.push(job["id"].as_str().unwrap().to_string());
        }
    }
    let mut keys = BTreeSet::new();
    for id in &ids {
        let job = api.wait_final(id, Duration::from_secs(300)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let key = job["outputs"][0]["key"].as_str().unwrap().to_string();
        assert!(keys.insert(key.clone()), "two jobs wrote {key}");
        let text = s3_text(&env, &key).await;
        assert!(
            text.contains(&format!("prompt={id} ")),
            "{key} holds another job's image: {text}"
        );
    }
    assert_eq!(keys.len(), 1000);
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for id in env.fakes.iter().flat_map(|f| f.started()) {
        *runs.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "run more than once: {twice:?}");
    assert_eq!(runs.len(), 1000);
    // On the shared directory too: one folder per job, nothing written twice.
    let folders = std::fs::read_dir(&env.output_dir).unwrap().count();
    assert_eq!(folders, 1000);
    let _ = &env.work;
    drop(env.ns);
}

#[tokio::test]
async fn webhooks_are_signed_and_retried_after_a_500() {
    use axum::routing::post;
    use std::sync::{Arc, Mutex};
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let received: Arc<Mutex<Vec<(u16, Value)>>> = Arc::default();
    let seen = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let seen = seen.clone();
                async move {
                    let verifier = standardwebhooks::Webhook::new(secret).unwrap();
                    let mut h = ::http::HeaderMap::new();
                    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
                        h.insert(name, headers[name].clone());
                    }
                    assert!(verifier.verify(&body, &h).is_ok(), "bad signature");
                    let event: Value = serde_json::from_slice(&body).unwrap();
                    let mut list = seen.lock().unwrap();
                    // The first delivery is refused; the retry must come.
                    let status = if list.is_empty() { 500 } else { 200 };
                    list.push((status, event));
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let secret_file = std::env::temp_dir().join(format!("whsec-{}", unique_suffix()));
    std::fs::write(&secret_file, secret).unwrap();
    let mut env = setup(Setup {
        extra: [
            vec![
                "--webhook-secret-file".into(),
                secret_file.display().to_string(),
                "--webhook-first-delay-ms".into(),
                "200".into(),
            ],
            allow_loopback_webhooks(),
        ]
        .concat(),
        ..Default::default()
    })
    .await;
    let api = env.api();
    let (_, job) = api
        .submit(json!({"prompt": workflow(CKPT, 2), "webhook": hook}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    eventually("a delivered webhook", Duration::from_secs(20), || async {
        let list = received.lock().unwrap();
        list.iter().any(|(s, _)| *s == 200).then_some(())
    })
    .await;
    let list = received.lock().unwrap().clone();
    assert_eq!(list.len(), 2, "one refused, one delivered: {list:?}");
    for (_, event) in &list {
        assert_eq!(event["type"], "job.succeeded");
        assert_eq!(event["data"]["id"], id.as_str());
        assert_eq!(event["data"]["state"], "succeeded");
    }
    drop(env.ns);
}

#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_at_submit_or_never_sent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A receiver on 127.0.0.1 that counts every request it gets.
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    let app = axum::Router::new().fallback(move || {
        count.fetch_add(1, Ordering::SeqCst);
        async { "ok" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let secret_file = std::env::temp_dir().join(format!("whsec-{}", unique_suffix()));
    std::fs::write(&secret_file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    // No --webhook-allow-cidr: the defaults stand.
    let mut env = setup(Setup {
        extra: vec![
            "--webhook-secret-file".into(),
            secret_file.display().to_string(),
            "--webhook-first-delay-ms".into(),
            "100".into(),
        ],
        ..Default::default()
    })
    .await;
    let api = env.api();
    // An IP literal in a refused range, a non-HTTP scheme and userinfo: 422 at submit.
    for hook in [
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://127.0.0.1:{port}/"),
        "file:///etc/passwd".to_string(),
        "https://user:pw@hooks.example.com/".to_string(),
    ] {
        let (status, body) = api
            .submit(json!({"prompt": workflow(CKPT, 2), "webhook": hook}))
            .await;
        assert_eq!(status, 422, "{hook}: {body}");
        assert_eq!(body["error"]["type"], "invalid_webhook", "{body}");
    }
    // A name passes submit (DNS can change); it resolves to loopback at delivery.
    let hook = format!("http://localhost:{port}/hook?token=s3cr3t-token");
    let (status, job) = api
        .submit(json!({"prompt": workflow(CKPT, 2), "webhook": hook}))
        .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let job = api.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    eventually(
        "the refused delivery in the gateway's log",
        Duration::from_secs(20),
        || async {
            env.gateway
                .log_text()
                .lines()
                .any(|l| l.contains("webhook refused") && l.contains(&id))
                .then_some(())
        },
    )
    .await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "a webhook reached loopback");
    let log = env.gateway.log_text();
    assert!(
        !log.contains("s3cr3t-token"),
        "the webhook's query reached the log"
    );
    drop(env.ns);
}

/// Adds key `id` to the gateway's mounted keys directory (`admin`: with the admin role)
/// and waits until the gateway, which re-reads it every 5 s, takes it.
async fn add_api_key(env: &Env, id: &str, admin: bool) -> ApiClient {
    add_api_key_with(env, id, if admin { "admin" } else { "" }).await
}

/// As `add_api_key`, with `words` after the hash (role, share settings).
async fn add_api_key_with(env: &Env, id: &str, words: &str) -> ApiClient {
    add_key(&env.work.join("keys"), &env.gateway.url(""), id, words).await
}

/// Every job id `api` lists, following `next` page by page (bounded).
async fn list_all(api: &ApiClient, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut path = format!("/api/v2/jobs?limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let resp = api.get(&path).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let page: Value = resp.json().await.unwrap();
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= limit, "{page}");
        ids.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return ids,
        }
    }
    panic!("more than 100 pages");
}

#[tokio::test]
async fn a_key_sees_and_controls_only_its_own_jobs_and_an_admin_key_sees_all() {
    // No pod: the jobs stay queued, so cancel would end them.
    let mut env = setup(Setup {
        pods: 0,
        ..Default::default()
    })
    .await;
    let a = env.api();
    let b = add_api_key(&env, "team-b", false).await;
    let ops = add_api_key(&env, "ops", true).await;
    let mut a_ids = Vec::new();
    for _ in 0..3 {
        let (status, job) = a.submit(json!({"prompt": workflow(CKPT, 1)})).await;
        assert_eq!(status, 201, "{job}");
        a_ids.push(job["id"].as_str().unwrap().to_string());
        // Distinct creation times (ms), so newest first is one order.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut b_ids = Vec::new();
    for _ in 0..2 {
        let (status, job) = b.submit(json!({"prompt": workflow(CKPT, 1)})).await;
        assert_eq!(status, 201, "{job}");
        b_ids.push(job["id"].as_str().unwrap().to_string());
    }
    let theirs = &a_ids[0];
    let unknown = "00000000-0000-4000-8000-000000000000";
    // Key B: A's job is answered exactly as an id that does not exist.
    let answer = |resp: reqwest::Response| async move {
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    for (path, post) in [
        ("{id}", false),
        ("{id}/events", false),
        ("{id}/cancel", true),
    ] {
        let call = |id: &str| {
            let path = format!("/api/v2/jobs/{}", path.replace("{id}", id));
            if post { b.post(&path) } else { b.get(&path) }
        };
        let (status, body) = answer(call(theirs).send().await.unwrap()).await;
        let (unknown_status, unknown_body) = answer(call(unknown).send().await.unwrap()).await;
        assert_eq!((status, unknown_status), (404, 404), "{path}: {body}");
        assert_eq!(
            body.to_string().replace(theirs.as_str(), "ID"),
            unknown_body.to_string().replace(unknown, "ID"),
            "{path}"
        );
    }
    // B's cancel did nothing to it.
    assert_eq!(a.job(theirs).await["state"], "queued");
    // Lists: each key its own, newest first; the admin every job, page by page.
    let mut newest_first = a_ids.clone();
    newest_first.reverse();
    assert_eq!(list_all(&a, 100).await, newest_first);
    let listed_b = list_all(&b, 1).await;
    assert_eq!(listed_b.len(), 2, "{listed_b:?}");
    assert!(listed_b.iter().all(|id| b_ids.contains(id)), "{listed_b:?}");
    let everything = list_all(&ops, 2).await;
    assert_eq!(everything.len(), 5, "{everything:?}");
    assert_eq!(
        everything.iter().collect::<BTreeSet<_>>(),
        a_ids.iter().chain(&b_ids).collect::<BTreeSet<_>>(),
        "every job once"
    );
    let resp = ops
        .get("/api/v2/jobs?state=queued&limit=2&cursor=not-a-cursor")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // The admin reads and cancels any key's job.
    assert_eq!(ops.job(&b_ids[0]).await["state"], "queued");
    let resp = ops
        .post(&format!("/api/v2/jobs/{theirs}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(a.job(theirs).await["state"], "canceled");
    drop(env.ns);
}

#[tokio::test]
async fn a_workflow_cannot_load_other_jobs_files_or_climb_out_and_bad_input_names_never_reach_a_pod()
 {
    let mut env = setup(Setup::default()).await;
    let api = env.api();
    let with_image = |image: &str| {
        let mut prompt = workflow(CKPT, 1);
        prompt["10"] = json!({"class_type": "LoadImage", "inputs": {"image": image}});
        prompt
    };
    // Another job's output, through ComfyUI's annotation: refused, naming the node.
    let (status, body) = api
        .submit(json!({"prompt": with_image("abc/x.png [output]")}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["type"], "forbidden_reference");
    assert_eq!(body["error"]["node"], "10");
    assert_eq!(body["error"]["input"], "image");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"10\""),
        "{body}"
    );
    for image in ["../../etc/passwd", "/etc/passwd", "x.png [temp]"] {
        let (status, body) = api.submit(json!({"prompt": with_image(image)})).await;
        assert_eq!(status, 422, "{image}: {body}");
        assert_eq!(body["error"]["type"], "forbidden_reference", "{image}");
    }
    // Free text with `..` inside words is no path.
    let mut prompt = workflow(CKPT, 1);
    prompt["2"]["inputs"]["text"] = json!("wait.. what");
    let (status, job) = api.submit(json!({"prompt": prompt})).await;
    assert_eq!(status, 201, "{job}");
    let job = api
        .wait_final(job["id"].as_str().unwrap(), Duration::from_secs(20))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");

    // Input names that are not one plain file name: 422 at submit, no upload.
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(b"bytes");
    for name in ["../x.png", "a/b.png", ".hidden.png", "x\u{1}.png", ""] {
        let (status, body) = api
            .submit(json!({"prompt": with_image("photo.png"), "inputs": {name: {"base64": data}}}))
            .await;
        assert_eq!(status, 422, "{name:?}: {body}");
        assert_eq!(body["error"]["type"], "invalid_input_name", "{name:?}");
    }
    assert!(
        env.fakes[0].uploads().is_empty(),
        "{:?}",
        env.fakes[0].uploads()
    );
    assert_eq!(env.fakes[0].started().len(), 1, "only the accepted job ran");
    drop(env.ns);
}

#[tokio::test]
async fn an_idempotency_key_is_per_api_key_and_refuses_another_body() {
    let mut env = setup(Setup {
        pods: 0,
        ..Default::default()
    })
    .await;
    let a = env.api();
    let b = add_api_key(&env, "team-b", false).await;
    let submit = |api: &ApiClient, body: String| {
        let request = api
            .post("/api/v2/jobs")
            .header("Idempotency-Key", "order-17")
            .header("content-type", "application/json")
            .body(body);
        async move {
            let resp = request.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let body = json!({"prompt": workflow(CKPT, 1), "fleet": FLEET});
    let (s1, first) = submit(&a, body.to_string()).await;
    assert_eq!(s1, 201, "{first}");
    // The same request again, its keys in another order and spaced out: the same job.
    let mut reordered = String::from("{\n  \"fleet\": \"sdxl\",\n  \"prompt\": ");
    reordered.push_str(&serde_json::to_string_pretty(&body["prompt"]).unwrap());
    reordered.push_str("\n}");
    let (s2, again) = submit(&a, reordered).await;
    assert_eq!((s2, &again["id"]), (200, &first["id"]), "{again}");
    // Another body under the same key: refused, the first job untouched.
    let other = json!({"prompt": workflow(CKPT, 2), "fleet": FLEET});
    let (s3, refused) = submit(&a, other.to_string()).await;
    assert_eq!(s3, 422, "{refused}");
    assert_eq!(refused["error"]["type"], "idempotency_key_reused");
    // Another API key's "order-17" is another job.
    let (s4, theirs) = submit(&b, body.to_string()).await;
    assert_eq!(s4, 201, "{theirs}");
    assert_ne!(theirs["id"], first["id"]);
    let (s5, theirs_again) = submit(&b, body.to_string()).await;
    assert_eq!((s5, &theirs_again["id"]), (200, &theirs["id"]));
    assert_eq!(list_all(&a, 10).await, [first["id"].as_str().unwrap()]);
    drop(env.ns);
}

// ---- Pod health, run limit, client ids, typed refusals (issue 24) ----

#[tokio::test]
async fn a_job_over_the_run_limit_is_interrupted_and_its_pod_serves_the_next() {
    let mut env = setup(Setup {
        extra: vec!["--max-run-seconds".into(), "2".into()],
        ..Default::default()
    })
    .await;
    let api = env.api();
    env.fakes[0].set_faults(Faults {
        hang: true,
        ..Default::default()
    });
    let (_, job) = api.submit(json!({"prompt": workflow(CKPT, 2)})).await;
    let id = job["id"].as_str().unwrap().to_string();
    let job = api.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "run_timeout", "{job}");
    // Interrupted on the pod, not left to hold it.
    let fake = &env.fakes[0];
    eventually(
        "the pod to stop the job",
        Duration::from_secs(10),
        || async { fake.running().is_none().then_some(()) },
    )
    .await;
    env.fakes[0].set_faults(Faults::default());
    let next = run_job(
        &api,
        json!({"prompt": workflow(CKPT, 2)}),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(next["state"], "succeeded", "{next}");
    drop(env.ns);
}

#[tokio::test]
async fn a_black_holed_pod_loses_its_job_to_another_within_the_silence_limit() {
    let mut env = setup(Setup {
        pods: 2,
        step_ms: 50,
        extra: vec!["--pod-silence-seconds".into(), "3".into()],
        ..Default::default()
    })
    .await;
    let api = env.api();
    let (_, job) = api.submit(json!({"prompt": workflow(CKPT, 60)})).await;
    let id = job["id"].as_str().unwrap().to_string();
    let victim = running_pod(&env, &id).await;
    // A node that stops answering without a reset: silence, not a close.
    env.fakes[victim].blackhole();
    let job = api.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    assert!(env.fakes[1 - victim].started().contains(&id));
    drop(env.ns);
}

#[tokio::test]
async fn two_gateway_processes_on_one_pod_each_see_their_own_jobs_end() {
    let mut env = setup(Setup::default()).await;
    let api = env.api();
    // A rollout's new gateway beside the old one: with one client id for both, ComfyUI
    // sends every event to the newest socket and the older gateway's jobs never end.
    let second = env
        .gateway
        .start_another(&env.work.join("store-2/jobs.redb"));
    second.wait_ready(FLEET, 1).await;
    let api2 = ApiClient::new(&second.url(""), &api.key);
    let mut ids = Vec::new();
    for i in 0..6 {
        let client = if i % 2 == 0 { &api } else { &api2 };
        let (status, job) = client.submit(json!({"prompt": workflow(CKPT, 2)})).await;
        assert_eq!(status, 201, "{job}");
        ids.push((i % 2, job["id"].as_str().unwrap().to_string()));
    }
    for (which, id) in &ids {
        let client = if *which == 0 { &api } else { &api2 };
        let job = client.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert!(job["outputs"][0]["key"].is_string(), "{job}");
    }
    drop(second);
    drop(env.ns);
}

#[tokio::test]
async fn a_model_the_pod_lacks_is_a_typed_missing_model_error() {
    let mut env = setup(Setup::default()).await;
    let api = env.api();
    let (status, job) = api
        .submit(json!({"prompt": workflow("nope.safetensors", 2)}))
        .await;
    assert_eq!(status, 201, "no ModelSet: only the pod can tell: {job}");
    let job = api
        .wait_final(job["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "missing_model", "{job}");
    assert_eq!(job["error"]["node"], "1", "{job}");
    assert_eq!(job["error"]["input"], "ckpt_name", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(!message.contains('{'), "no raw node_errors JSON: {message}");
    // The pod stays in service.
    let next = run_job(
        &api,
        json!({"prompt": workflow(CKPT, 2)}),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(next["state"], "succeeded", "{next}");
    drop(env.ns);
}

/// Writes `dir/filler` until the volume is full (bounded).
fn fill_volume(dir: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0u8; 64 << 10];
    for _ in 0..10_000 {
        if f.write_all(&chunk).and_then(|_| f.sync_all()).is_err() {
            return;
        }
    }
    panic!("{} never filled", dir.display());
}

#[tokio::test]
async fn a_full_store_answers_503_acknowledges_nothing_and_recovers_when_freed() {
    let mut env = setup(Setup {
        store_tmpfs: Some("4m"),
        ..Default::default()
    })
    .await;
    let api = env.api();
    let store_dir = env.work.join("store");
    let (status, first) = api.submit(json!({"prompt": workflow(CKPT, 1)})).await;
    assert_eq!(status, 201, "{first}");
    api.wait_final(first["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;

    fill_volume(&store_dir);
    // The store file has free pages left: jobs fit until it must grow. Large prompts
    // get there sooner.
    let big = || {
        let mut w = workflow(CKPT, 1);
        w["2"]["inputs"]["text"] = json!("x".repeat(48 << 10));
        json!({"prompt": w})
    };
    let mut accepted = vec![first["id"].as_str().unwrap().to_string()];
    let mut refused = 0;
    for _ in 0..200 {
        let (status, body) = api.submit(big()).await;
        match status {
            201 => accepted.push(body["id"].as_str().unwrap().to_string()),
            503 => {
                assert_eq!(body["error"]["type"], "store_unavailable", "{body}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(refused, 3, "the store never filled");
    // Every 201 is a stored job (none of the refused ones is).
    let list: Value = api
        .get("/api/v2/jobs?limit=1000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: BTreeSet<String> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, accepted.iter().cloned().collect(), "{list}");
    let errors = env
        .gateway
        .metric("sdfleet_gateway_store_errors_total")
        .await;
    assert!(errors.is_some_and(|n| n >= refused as f64), "{errors:?}");

    // Space again: the store reopens and the next submit runs.
    std::fs::remove_file(store_dir.join("filler")).unwrap();
    let (status, job) = api.submit(json!({"prompt": workflow(CKPT, 1)})).await;
    assert_eq!(status, 201, "{job}");
    let job = api
        .wait_final(job["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    for id in &accepted {
        let job = api.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let used = env
        .gateway
        .metric("sdfleet_gateway_store_capacity_bytes")
        .await;
    assert!(
        used.is_some_and(|b| b > 0.0),
        "fill level exported: {used:?}"
    );
    drop(env.gateway);
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&store_dir)
        .status();
    drop(env.ns);
}

#[tokio::test]
async fn an_input_the_pod_refuses_fails_its_job_and_the_pod_keeps_serving() {
    let mut env = setup(Setup {
        pods: 1,
        ..Default::default()
    })
    .await;
    let api = env.api();
    // ComfyUI refuses a body over `--max-upload-size` with aiohttp's 413.
    env.fakes[0].set_max_upload_size(64 << 10);
    use base64::Engine as _;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 256 << 10]);
    let mut prompt = workflow(CKPT, 1);
    prompt["20"] = json!({"class_type": "LoadImage", "inputs": {"image": "big.png"}});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, job) = api
            .submit(
                json!({"prompt": prompt.clone(), "inputs": {"big.png": {"base64": big.clone()}}}),
            )
            .await;
        assert_eq!(status, 201, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let job = api.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "failed", "{job}");
        assert_eq!(job["error"]["type"], "invalid_input", "{job}");
        assert_eq!(job["error"]["input"], "big.png", "{job}");
        assert_eq!(
            job["attempts"], 1,
            "a refusal is not retried elsewhere: {job}"
        );
    }
    // Three refusals later, the pod still serves (it used to be marked disconnected).
    let next = run_job(
        &api,
        json!({"prompt": workflow(CKPT, 2)}),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(next["state"], "succeeded", "{next}");
    drop(env.ns);
}

/// A small deterministic generator for the chaos test (its seed is printed, so a failing
/// run can be replayed with `SDFLEET_CHAOS_SEED`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test]
async fn chaos_every_accepted_job_ends_with_its_own_outputs_while_faults_hit() {
    const JOBS: usize = 300;
    const PODS: usize = 4;
    let seed = std::env::var("SDFLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| (std::process::id() as u64) << 20 | 0x9e37);
    println!("chaos seed {seed}");
    let mut rng = Rng(seed.max(1));
    let mut env = setup(Setup {
        pods: PODS,
        step_ms: 10,
        store_tmpfs: Some("16m"),
        extra: [
            "--queue-cap",
            "1000",
            "--pod-silence-seconds",
            "2",
            "--resync-seconds",
            "1",
            "--max-run-seconds",
            "4",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await;
    let key = env.api.key.clone();
    let base = std::sync::Arc::new(std::sync::Mutex::new(env.gateway.url("")));

    // The clients: each job once, with an Idempotency-Key, retried while the gateway is
    // away or its store full, as a client that relies on the API would.
    let submitter = {
        let base = base.clone();
        let key = key.clone();
        let mut rng = Rng(seed.wrapping_mul(31).max(1));
        tokio::spawn(async move {
            let mut accepted: Vec<(String, bool)> = Vec::new();
            for i in 0..JOBS {
                // One job in ten names a model the pods lack: a 400 from ComfyUI.
                let bad = rng.below(10) == 0;
                let ckpt = if bad { "nope.safetensors" } else { CKPT };
                let body = json!({"prompt": workflow(ckpt, 1 + rng.below(6))});
                let idem = format!("chaos-{seed}-{i}");
                let mut tries = 0;
                loop {
                    tries += 1;
                    assert!(tries < 400, "job {i} never accepted");
                    let api = ApiClient::new(&base.lock().unwrap().clone(), &key);
                    let sent = api
                        .post("/api/v2/jobs")
                        .header("Idempotency-Key", &idem)
                        .json(&body)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    match sent {
                        Ok(resp) if resp.status() == 201 || resp.status() == 200 => {
                            let job: Value = resp.json().await.unwrap();
                            accepted.push((job["id"].as_str().unwrap().to_string(), bad));
                            break;
                        }
                        Ok(resp) if resp.status() == 503 || resp.status() == 429 => {}
                        Ok(resp) => panic!("job {i}: {} {:?}", resp.status(), resp.text().await),
                        Err(_) => {} // the gateway is restarting
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
            }
            accepted
        })
    };

    // The faults: a bounded number, at random, while jobs flow.
    let mut started_before: Vec<String> = Vec::new();
    let mut refused_before: Vec<String> = Vec::new();
    let mut gateway_restarts = 0usize;
    let mut log = Vec::new();
    let config = FakeConfig {
        step_time: Duration::from_millis(10),
        switch_penalty: Duration::ZERO,
        models: vec![
            format!("checkpoints/{CKPT}"),
            "checkpoints/other.safetensors".into(),
            "checkpoints/third.safetensors".into(),
        ],
        output_dir: env.output_dir.clone(),
    };
    for round in 0..14 {
        tokio::time::sleep(Duration::from_millis(400 + rng.below(900))).await;
        let pod = rng.below(PODS as u64) as usize;
        let fault = rng.below(8);
        log.push(format!("{round}: fault {fault} on pod {pod}"));
        match fault {
            // kill -9, and the pod's container comes back on the same address.
            0 | 1 => {
                let addr = env.fakes[pod].addr;
                let name = env.fakes[pod].name.clone();
                started_before.extend(env.fakes[pod].started());
                refused_before.extend(env.fakes[pod].refused());
                env.fakes[pod].kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                env.fakes[pod] = FakeComfy::start_on(&name, config.clone(), addr).await;
            }
            // A node that stops answering, and a new one in its place later.
            2 => {
                env.fakes[pod].blackhole();
                tokio::time::sleep(Duration::from_millis(3_000)).await;
                let addr = env.fakes[pod].addr;
                let name = env.fakes[pod].name.clone();
                started_before.extend(env.fakes[pod].started());
                refused_before.extend(env.fakes[pod].refused());
                env.fakes[pod].kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                env.fakes[pod] = FakeComfy::start_on(&name, config.clone(), addr).await;
            }
            3 => env.fakes[pod].drop_websockets(),
            // A hung ComfyUI: the run limit interrupts it.
            4 => {
                env.fakes[pod].set_faults(Faults {
                    hang: true,
                    ..Default::default()
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
                env.fakes[pod].set_faults(Faults::default());
            }
            // The store's volume fills, then frees.
            5 => {
                fill_volume(&env.work.join("store"));
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                std::fs::remove_file(env.work.join("store/filler")).unwrap();
            }
            6 => {
                env.gateway.restart_after_term(Duration::from_secs(10));
                gateway_restarts += 1;
                *base.lock().unwrap() = env.gateway.url("");
            }
            _ => {
                env.gateway.restart_after_kill();
                gateway_restarts += 1;
                *base.lock().unwrap() = env.gateway.url("");
            }
        }
    }
    println!("faults: {log:#?}");
    let accepted = tokio::time::timeout(Duration::from_secs(180), submitter)
        .await
        .expect("the clients finished")
        .unwrap();
    assert_eq!(accepted.len(), JOBS, "every job was accepted once");

    // Every accepted job ends, within bounds, none lost. (The last fault may have been a
    // restart: the new process answers once it has opened its store.)
    let api = ApiClient::new(&base.lock().unwrap().clone(), &key);
    eventually(
        "the gateway answering after the last fault",
        Duration::from_secs(60),
        || async {
            let resp = api.get("/api/v2/jobs?limit=1").send().await.ok()?;
            (resp.status() == 200).then_some(())
        },
    )
    .await;
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut finals = BTreeMap::new();
    for (id, bad) in &accepted {
        let job = api.wait_final(id, Duration::from_secs(120)).await;
        let state = job["state"].as_str().unwrap().to_string();
        let kind = job["error"]["type"].as_str().unwrap_or("").to_string();
        *states.entry(format!("{state} {kind}")).or_default() += 1;
        if *bad {
            assert_eq!(job["state"], "failed", "{job}");
            assert_eq!(job["error"]["type"], "missing_model", "{job}");
        }
        finals.insert(id.clone(), job);
    }
    println!("final states: {states:#?}");

    // A succeeded job's outputs are all there, under its own key, and are its own.
    for (id, job) in finals.iter().filter(|(_, j)| j["state"] == "succeeded") {
        let outputs = job["outputs"].as_array().unwrap();
        assert!(!outputs.is_empty(), "{job}");
        for output in outputs {
            let key = output["key"].as_str().unwrap_or_else(|| panic!("{job}"));
            assert!(key.starts_with(&format!("results/{id}/")), "{key}");
            let text = s3_text(&env, key).await;
            assert!(
                text.contains(&format!("prompt={id} ")),
                "{key} holds another job's file"
            );
        }
    }
    // A pod's 400 ends the job: it is not handed to another pod. (`attempts` may be 2
    // when the first pod died before it answered.) Only a gateway killed between the
    // 400 and its write may send it once more.
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    for id in refused_before
        .into_iter()
        .chain(env.fakes.iter().flat_map(|f| f.refused()))
    {
        *refusals.entry(id).or_default() += 1;
    }
    let mut refused_twice = 0;
    for (id, bad) in &accepted {
        let n = refusals.get(id).copied().unwrap_or(0);
        if *bad {
            assert!((1..=2).contains(&n), "{id} refused {n} times");
            refused_twice += usize::from(n == 2);
        } else {
            assert_eq!(n, 0, "{id}: a good job was refused");
        }
    }
    assert!(
        refused_twice <= gateway_restarts,
        "{refused_twice} refused jobs were sent again, {gateway_restarts} gateway restarts"
    );

    // Runs twice, reported: never a job that failed on a 4xx.
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for id in started_before
        .into_iter()
        .chain(env.fakes.iter().flat_map(|f| f.started()))
    {
        *runs.entry(id).or_default() += 1;
    }
    let twice: Vec<&String> = runs
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    println!("jobs run more than once: {} of {JOBS}", twice.len());
    for id in &twice {
        let kind = finals.get(*id).map(|j| j["error"]["type"].clone());
        assert_ne!(kind, Some(json!("missing_model")), "{id}");
    }
    let succeeded = states
        .iter()
        .filter(|(k, _)| k.starts_with("succeeded"))
        .map(|(_, n)| n)
        .sum::<usize>();
    let good = accepted.iter().filter(|(_, bad)| !bad).count();
    // Faults cost attempts (pod_lost after 3), and a hung job its run; most still succeed.
    assert!(
        succeeded * 10 >= good * 8,
        "{succeeded} of {good} good jobs succeeded: {states:?}"
    );
    drop(env.ns);
}

#[tokio::test]
async fn a_node_type_the_fleet_lacks_is_refused_at_submit_naming_the_node() {
    let mut env = setup(Setup::default()).await;
    let api = env.api();
    let mut prompt = workflow(CKPT, 1);
    prompt["12"] = json!({"class_type": "UpscaleWithMagic", "inputs": {"image": ["8", 0]}});
    let (status, body) = api.submit(json!({"prompt": prompt})).await;
    // Known from the pods' /object_info: refused before it is queued, not at hand-off.
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["type"], "unknown_node_type", "{body}");
    assert_eq!(body["error"]["node"], "12", "{body}");
    assert!(env.fakes[0].started().is_empty());
    let job = run_job(
        &api,
        json!({"prompt": workflow(CKPT, 1)}),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    drop(env.ns);
}

/// A node that holds only the ModelSet's hot models (its agent lifted the taint after
/// them and syncs the rest) runs jobs of those; a job that needs another model waits
/// with a reason, is never sent to that pod (whose ComfyUI, like the real one on such a
/// node, would refuse it), and runs once the node reports the rest.
#[tokio::test]
async fn a_job_needing_a_model_its_node_has_not_synced_yet_waits_with_a_reason() {
    let mut env = setup(Setup {
        model_set: true,
        hot: vec![format!("checkpoints/{CKPT}")],
        ..Setup::default()
    })
    .await;
    env.fakes[0].set_models(vec![format!("checkpoints/{CKPT}")]);
    let api = env.api();
    let hot = run_job(
        &api,
        json!({"prompt": workflow(CKPT, 2)}),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(hot["state"], "succeeded", "{hot}");
    let (status, job) = api
        .submit(json!({"prompt": workflow("other.safetensors", 2)}))
        .await;
    assert_eq!(status, 201, "in the ModelSet, so admitted: {job}");
    let id = job["id"].as_str().unwrap().to_string();
    let waiting = eventually(
        "the job to say why it waits",
        Duration::from_secs(10),
        || async {
            let job = api.job(&id).await;
            (job["waiting"]["reason"] == "ModelsSyncing").then_some(job)
        },
    )
    .await;
    assert_eq!(waiting["state"], "queued", "{waiting}");
    // Held, not sent: two seconds on, the pod has still not been asked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.job(&id).await["state"], "queued");
    assert!(
        !env.fakes[0].started().contains(&id),
        "sent to a pod without its model"
    );
    assert!(
        env.fakes[0].refused().is_empty(),
        "{:?}",
        env.fakes[0].refused()
    );

    // The rest lands on the node, and its agent says so.
    env.fakes[0].set_models(vec![
        format!("checkpoints/{CKPT}"),
        "checkpoints/other.safetensors".into(),
    ]);
    let client = Testbed::get().client().await;
    report_node(&client, &env.ns.name, 0, "Synced", false).await;
    let done = api.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    drop(env.ns);
}

/// Submits `n` one-step jobs as `api` (each 201); their ids.
async fn submit_many(api: &ApiClient, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (status, job) = api.submit(json!({"prompt": workflow(CKPT, 1)})).await;
        assert_eq!(status, 201, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test]
async fn a_late_small_batch_goes_in_turn_with_a_large_one_and_a_capped_key_waits() {
    // One pod (two slots: one running, one prefetched), jobs of one 40 ms step.
    let mut env = setup(Setup {
        step_ms: 40,
        ..Default::default()
    })
    .await;
    let bulk = env.api();
    let small = add_api_key(&env, "small", false).await;
    let capped = add_api_key_with(&env, "capped", "max-running=1").await;

    // 40 jobs of one key, then 3 of another while those wait: the 3 are next in line,
    // in turn with the 40, not behind them.
    let bulk_ids = submit_many(&bulk, 40).await;
    let small_ids = submit_many(&small, 3).await;
    let mut positions = Vec::new();
    for id in &small_ids {
        positions.push(small.job(id).await["queue_position"].as_u64());
    }
    let mut starts = Vec::new();
    for id in bulk_ids.iter().chain(&small_ids) {
        let done = bulk_or_small(&bulk, &small, &small_ids, id)
            .wait_final(id, Duration::from_secs(60))
            .await;
        assert_eq!(done["state"], "succeeded", "{done}");
        let started = done["timings"]["started_at"].as_str().unwrap().to_string();
        starts.push((started, small_ids.contains(id)));
    }
    starts.sort();
    let small_ranks: Vec<usize> = starts
        .iter()
        .enumerate()
        .filter(|(_, (_, is_small))| *is_small)
        .map(|(rank, _)| rank)
        .collect();
    // The bulk key's jobs already on the pod (two slots) go first, then turn by turn (a
    // job storing its outputs still counts for its key): under FIFO, ranks 40 to 42.
    // Turn by turn is ranks 2 to 8 on a quiet machine; CI under load once saw 15 (a slow
    // output upload keeps a small job on the pod, counted as its key's use), so the bound
    // is the first half: FIFO still fails it by far.
    assert!(
        small_ranks.iter().all(|r| *r < 22),
        "the small batch started at ranks {small_ranks:?} of 43"
    );
    // Those still queued when asked (the first may already be on the pod) are near the
    // front, though 30-odd of the bulk key's jobs were queued before them.
    assert!(
        positions.iter().flatten().count() >= 2 && positions.iter().flatten().all(|p| *p < 10),
        "queue positions {positions:?}"
    );

    // A key with max-running=1 never has two jobs on the pod, though the pod has two
    // slots and nothing else waits: the pod (ComfyUI's queue) never held two of them.
    env.fakes[0].take_most_held();
    let capped_ids = submit_many(&capped, 8).await;
    // The last one waits (seven ahead of it, one at a time), and says why.
    let waiting = eventually(
        "the capped key's last job waiting on its cap",
        Duration::from_secs(10),
        || async {
            let job = capped.job(&capped_ids[7]).await;
            (job["waiting"]["reason"] == "MaxRunning").then_some(job)
        },
    )
    .await;
    assert!(
        waiting["waiting"]["message"]
            .as_str()
            .unwrap()
            .contains("max-running=1"),
        "{waiting}"
    );
    for id in &capped_ids {
        let done = capped.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    assert_eq!(env.fakes[0].take_most_held(), 1, "held at once on the pod");
    // Per share, in the metrics.
    let started = env
        .gateway
        .metric(&format!(
            "sdfleet_gateway_share_started_jobs_total{{fleet=\"{FLEET}\",share=\"small\"}}"
        ))
        .await;
    assert_eq!(started, Some(3.0));
}

fn bulk_or_small<'a>(
    bulk: &'a ApiClient,
    small: &'a ApiClient,
    small_ids: &[String],
    id: &str,
) -> &'a ApiClient {
    if small_ids.iter().any(|s| s == id) {
        small
    } else {
        bulk
    }
}
