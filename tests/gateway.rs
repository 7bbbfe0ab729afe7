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
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            pods: 1,
            step_ms: 20,
            switch_ms: 0,
            model_set: false,
            extra: vec![],
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

async fn s3_text(env: &Env, key: &str) -> String {
    let obj = env
        .s3
        .get_object()
        .bucket(&env.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    String::from_utf8(obj.body.collect().await.unwrap().into_bytes().to_vec()).unwrap()
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

    // The same Idempotency-Key twice: one job.
    let submit_keyed = || async {
        let resp = api
            .post("/api/v2/jobs")
            .header("Idempotency-Key", "order-17")
            .json(&json!({"prompt": workflow(CKPT, 1)}))
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
    let victim = eventually("the job to start", Duration::from_secs(10), || async {
        env.fakes
            .iter()
            .position(|f| f.running().as_deref() == Some(id.as_str()))
    })
    .await;
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
    let (_, job) = api.submit(json!({"prompt": workflow(CKPT, 2)})).await;
    let job = api
        .wait_final(job["id"].as_str().unwrap(), Duration::from_secs(20))
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
async fn a_thousand_jobs_on_four_pods_sharing_one_output_prefix_overwrite_nothing() {
    let mut env = setup(Setup {
        pods: 4,
        step_ms: 1,
        extra: vec!["--queue-cap".into(), "2000".into()],
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
        extra: vec![
            "--webhook-secret-file".into(),
            secret_file.display().to_string(),
            "--webhook-first-delay-ms".into(),
            "200".into(),
        ],
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
