//! The ComfyUI double itself (tests/support/fake_comfyui.rs), over 127.0.0.1 with no
//! cluster: that it is as strict as ComfyUI where the gateway meets it. Each behaviour here
//! is one ComfyUI's source has (the double's comments cite where); every wait is bounded.

mod support;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::fake_comfyui::{FakeComfy, FakeConfig, Faults, InterruptGeneration, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const CKPT: &str = "a.safetensors";

async fn fake_with(options: Options) -> FakeComfy {
    let out = std::env::temp_dir().join(format!("fake-comfy-test-{}", support::unique_suffix()));
    FakeComfy::start_with(
        "t",
        FakeConfig {
            step_time: Duration::from_millis(20),
            switch_penalty: Duration::ZERO,
            models: vec![format!("checkpoints/{CKPT}")],
            output_dir: out,
        },
        options,
    )
    .await
}

async fn fake() -> FakeComfy {
    fake_with(Options::default()).await
}

async fn connect(f: &FakeComfy, client: &str) -> Ws {
    let url = format!("ws://{}/ws?clientId={client}", f.addr);
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("websocket connect in time")
    .expect("websocket connects")
    .0
}

/// The next frame, or `None` if none comes within `wait`.
async fn next(ws: &mut Ws, wait: Duration) -> Option<Message> {
    match tokio::time::timeout(wait, ws.next()).await {
        Ok(Some(Ok(m))) => Some(m),
        Ok(Some(Err(e))) => panic!("websocket error: {e}"),
        Ok(None) => panic!("websocket ended"),
        Err(_) => None,
    }
}

fn json_of(m: &Message) -> Option<Value> {
    match m {
        Message::Text(t) => serde_json::from_str(t).ok(),
        _ => None,
    }
}

/// Frames until the prompt's closing `executing` with a null node (10 s at most).
async fn frames_until_done(ws: &mut Ws, prompt_id: &str) -> Vec<Message> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = next(ws, left)
            .await
            .unwrap_or_else(|| panic!("prompt {prompt_id} did not end; got {out:?}"));
        let done = json_of(&m).is_some_and(|v| {
            v["type"] == "executing"
                && v["data"]["node"].is_null()
                && v["data"]["prompt_id"] == prompt_id
        });
        out.push(m);
        if done {
            return out;
        }
    }
}

async fn events_until_done(ws: &mut Ws, prompt_id: &str) -> Vec<Value> {
    frames_until_done(ws, prompt_id)
        .await
        .iter()
        .filter_map(json_of)
        .collect()
}

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post_raw(f: &FakeComfy, path: &str, body: &str) -> (u16, String) {
    let resp = http()
        .post(format!("{}{path}", f.url()))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn get(f: &FakeComfy, path: &str) -> (u16, Value) {
    let resp = http()
        .get(format!("{}{path}", f.url()))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn submit(f: &FakeComfy, client: &str, prompt: Value) -> String {
    let (status, body) = post_raw(
        f,
        "/prompt",
        &json!({"client_id": client, "prompt": prompt}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["prompt_id"].as_str().unwrap().to_string()
}

/// The history entry once the prompt ended (10 s at most).
async fn history(f: &FakeComfy, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = get(f, &format!("/history/{id}")).await;
        if let Some(h) = body.get(id) {
            return h.clone();
        }
        assert!(Instant::now() < deadline, "{id} never reached the history");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn save(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    })
}

fn sampler(steps: u64) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": steps, "cfg": 7.0,
              "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["2", 0],
              "latent_image": ["3", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "s"}},
    })
}

#[tokio::test]
async fn a_model_free_prompt_sends_comfyuis_events_in_comfyuis_order() {
    let f = fake().await;
    let mut ws = connect(&f, "c1").await;
    let hello = next(&mut ws, Duration::from_secs(5)).await.unwrap();
    // json.dumps formatting, as aiohttp's send_json writes it.
    assert_eq!(
        hello.to_text().unwrap(),
        r#"{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "c1"}}"#
    );
    let id = submit(&f, "c1", save("seq")).await;
    let events = events_until_done(&mut ws, &id).await;
    assert_eq!(
        types(&events),
        [
            "status", // queued
            "status", // taken from the queue
            "execution_start",
            "execution_cached",
            "progress_state",
            "executing",
            "progress_state",
            "progress_state",
            "executing",
            "executed",
            "progress_state",
            "execution_success",
            "status", // history written
            "executing",
        ],
        "{events:#?}"
    );
    assert_eq!(
        events[5]["data"],
        json!({"node": "1", "display_node": "1", "prompt_id": id})
    );
    assert_eq!(
        events[9]["data"]["output"],
        json!({"images": [{"filename": "seq_00001_.png", "subfolder": "", "type": "output"}]})
    );
    let h = history(&f, &id).await;
    assert_eq!(h["status"]["status_str"], "success");
    assert_eq!(h["status"]["completed"], true);
    assert_eq!(h["prompt"][4], json!(["2"]));
    assert_eq!(h["meta"]["2"]["node_id"], "2");
    // A real PNG with the prompt as its text, as SaveImage writes it.
    let resp = http()
        .get(format!(
            "{}/view?filename=seq_00001_.png&type=output",
            f.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let png = resp.bytes().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert_eq!(&png[16..24], &[0, 0, 0, 8, 0, 0, 0, 8]);
    assert!(png.windows(7).any(|w| w == b"prompt\0"));
}

#[tokio::test]
async fn a_socket_with_a_taken_client_id_replaces_the_older_which_stays_open_and_deaf() {
    let f = fake().await;
    let mut older = connect(&f, "same").await;
    assert!(next(&mut older, Duration::from_secs(5)).await.is_some()); // status
    let mut newer = connect(&f, "same").await;
    assert!(next(&mut newer, Duration::from_secs(5)).await.is_some()); // status
    let id = submit(&f, "same", save("r")).await;
    let events = events_until_done(&mut newer, &id).await;
    assert!(types(&events).contains(&"executed".to_string()));
    // The older one was not closed (no close frame) and gets nothing, not even `status`.
    assert!(next(&mut older, Duration::from_millis(300)).await.is_none());
    older
        .send(Message::Ping(b"still there".to_vec().into()))
        .await
        .unwrap();
    let pong = next(&mut older, Duration::from_secs(5)).await;
    assert!(matches!(pong, Some(Message::Pong(_))), "{pong:?}");

    // When the older one closes, server.py's `finally` pops the id: the newer goes deaf.
    older.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id2 = submit(&f, "same", save("r2")).await;
    history(&f, &id2).await;
    assert!(next(&mut newer, Duration::from_millis(300)).await.is_none());
    newer
        .send(Message::Ping(b"open".to_vec().into()))
        .await
        .unwrap();
    let pong = next(&mut newer, Duration::from_secs(5)).await;
    assert!(
        matches!(pong, Some(Message::Pong(_))),
        "still open: {pong:?}"
    );

    // A reconnect while that client's node runs is told the node.
    f.set_faults(Faults {
        hang: true,
        ..Default::default()
    });
    let id3 = submit(&f, "same", save("r3")).await;
    eventually("the hung prompt to run", async || {
        f.running().as_deref() == Some(id3.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = connect(&f, "same").await;
    let status = json_of(&next(&mut again, Duration::from_secs(5)).await.unwrap()).unwrap();
    assert_eq!(status["type"], "status");
    let executing = json_of(&next(&mut again, Duration::from_secs(5)).await.unwrap()).unwrap();
    // Node 2: EmptyImage (1) is cached from the prompt before, SaveImage is what runs.
    assert_eq!(
        executing,
        json!({"type": "executing", "data": {"node": "2"}})
    );
    post_raw(&f, "/interrupt", "").await;
    history(&f, &id3).await;
}

/// A multipart body with parts written as given (file names exactly, unencoded).
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "fakeboundary1234";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(f: &FakeComfy, parts: &[(&str, Option<&str>, &[u8])]) -> (u16, String) {
    let (ct, body) = multipart(parts);
    let resp = http()
        .post(format!("{}/upload/image", f.url()))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn uploads_are_refused_as_comfyui_refuses_them() {
    let f = fake().await;
    // A real 2×3 PNG, made by the double's own SaveImage.
    let mut p = save("src");
    p["1"]["inputs"]["width"] = json!(2);
    p["1"]["inputs"]["height"] = json!(3);
    let id = submit(&f, "u", p).await;
    assert_eq!(history(&f, &id).await["status"]["status_str"], "success");
    let png = http()
        .get(format!("{}/view?filename=src_00001_.png", f.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let png = png.as_slice();
    // No `image` part: 400, empty body.
    assert_eq!(
        upload(&f, &[("type", None, b"input")]).await,
        (400, String::new())
    );
    // A name that leaves input/ (only leading slashes are stripped from it).
    assert_eq!(
        upload(&f, &[("image", Some("../evil.png"), png)]).await,
        (400, String::new())
    );
    for sub in ["../up", "/etc"] {
        assert_eq!(
            upload(
                &f,
                &[
                    ("image", Some("x.png"), png),
                    ("subfolder", None, sub.as_bytes())
                ]
            )
            .await,
            (400, String::new()),
            "subfolder {sub}"
        );
    }
    // An `image` part that is not a file, or an unknown type: the handler raises.
    let trouble = (
        500,
        "500 Internal Server Error\n\nServer got itself in trouble".to_string(),
    );
    assert_eq!(upload(&f, &[("image", None, b"text")]).await, trouble);
    assert_eq!(
        upload(
            &f,
            &[("image", Some("x.png"), png), ("type", None, b"bogus")]
        )
        .await,
        trouble
    );
    // Not a form at all: no image.
    assert_eq!(
        post_raw(&f, "/upload/image", "{}").await,
        (400, String::new())
    );

    // Stored; a different file under the name is renamed, the same bytes are not.
    let ok = |name: &str, sub: &str| {
        (
            200,
            json!({"name": name, "subfolder": sub, "type": "input"}).to_string(),
        )
    };
    let as_value = |(s, b): (u16, String)| {
        (
            s,
            serde_json::from_str::<Value>(&b)
                .map(|v| v.to_string())
                .unwrap_or(b),
        )
    };
    f.add_input("photo.png", b"someone else's");
    assert_eq!(
        as_value(upload(&f, &[("image", Some("photo.png"), png)]).await),
        ok("photo (1).png", "")
    );
    assert_eq!(
        as_value(upload(&f, &[("image", Some("photo.png"), png)]).await),
        ok("photo (1).png", "")
    );
    assert_eq!(
        as_value(
            upload(
                &f,
                &[
                    ("image", Some("/photo.png"), b"other"),
                    ("subfolder", None, b"a/b")
                ]
            )
            .await
        ),
        ok("photo.png", "a/b")
    );
    assert_eq!(f.input_bytes("photo (1).png").unwrap(), png);
    assert_eq!(f.input_bytes("a/b/photo.png").unwrap(), b"other");
    // LoadImage → ImageInvert → SaveImage of the upload: the image's size is kept.
    let id = submit(
        &f,
        "u",
        json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "photo (1).png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
        }),
    )
    .await;
    let h = history(&f, &id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    let resp = http()
        .get(format!("{}/view?filename=inv_00001_.png", f.url()))
        .send()
        .await
        .unwrap();
    let out = resp.bytes().await.unwrap();
    assert_eq!(&out[16..24], &[0, 0, 0, 2, 0, 0, 0, 3]);
    // /view's own checks.
    for (query, status) in [
        ("filename=../x.png", 400),
        ("filename=inv_00001_.png&type=bogus", 400),
        ("filename=inv_00001_.png&subfolder=..", 403),
        ("filename=missing.png", 404),
        ("type=output", 404),
    ] {
        let resp = http()
            .get(format!("{}/view?{query}", f.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{query}");
    }
}

async fn refused(f: &FakeComfy, body: Value) -> Value {
    let (status, text) = post_raw(f, "/prompt", &body.to_string()).await;
    assert_eq!(status, 400, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn prompts_are_refused_with_comfyuis_error_bodies() {
    let f = fake().await;
    let none = json!({});
    assert_eq!(
        refused(&f, json!({"client_id": "x"})).await,
        json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": none})
    );
    assert_eq!(
        refused(
            &f,
            json!({"prompt": {"7": {"class_type": "Nope", "inputs": {}}}})
        )
        .await,
        json!({"error": {"type": "invalid_prompt", "message": "Cannot execute because node Nope does not exist.", "details": "Node ID '#7'", "extra_info": {}}, "node_errors": none})
    );
    assert_eq!(
        refused(&f, json!({"prompt": {"7": {"inputs": {}}}})).await["error"]["message"],
        "Cannot execute because a node is missing the class_type property."
    );
    assert_eq!(
        refused(&f, json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}})).await,
        json!({"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}, "node_errors": none})
    );
    // A model not in the list.
    let mut p = sampler(2);
    p["1"]["inputs"]["ckpt_name"] = json!("missing.safetensors");
    assert_eq!(
        refused(&f, json!({"prompt": p})).await,
        json!({
            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": {"1": {
                "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                    "details": "ckpt_name: 'missing.safetensors' not in ['a.safetensors']",
                    "extra_info": {"input_name": "ckpt_name",
                        "input_config": [["a.safetensors"], {"tooltip": "The name of the checkpoint (model) to load."}],
                        "received_value": "missing.safetensors"}}],
                "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}},
        })
    );
    // A required input left out, and a number out of range.
    let body = refused(
        &f,
        json!({"prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
        }}),
    )
    .await;
    assert_eq!(
        body["error"]["details"],
        "Required input is missing: filename_prefix"
    );
    assert_eq!(
        body["node_errors"]["2"]["errors"],
        json!([{"type": "required_input_missing", "message": "Required input is missing", "details": "filename_prefix", "extra_info": {"input_name": "filename_prefix"}}])
    );
    assert_eq!(
        body["node_errors"]["1"]["errors"][0]["message"],
        "Value 0 smaller than min of 1"
    );
    assert_eq!(body["node_errors"]["1"]["dependent_outputs"], json!(["2"]));
    // LoadImage of a file that is not there; a MASK where an IMAGE goes.
    let body = refused(
        &f,
        json!({"prompt": {
            "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
        }}),
    )
    .await;
    assert_eq!(
        body["node_errors"]["2"]["errors"][0]["details"],
        "images, received_type(MASK) mismatch input_type(IMAGE)"
    );
    let body = refused(
        &f,
        json!({"prompt": {
            "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }}),
    )
    .await;
    assert_eq!(
        body["node_errors"]["1"]["errors"],
        json!([{"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": "image - Invalid image file: nope.png", "extra_info": {"input_name": "image"}}])
    );
    // One good output of two: queued, with the other's errors.
    let mut p = save("half");
    p["3"] = json!({"class_type": "SaveImage", "inputs": {"images": ["1", 0]}});
    let (status, text) = post_raw(&f, "/prompt", &json!({"prompt": p}).to_string()).await;
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["node_errors"]["3"]["dependent_outputs"], json!(["3"]));
    let h = history(&f, body["prompt_id"].as_str().unwrap()).await;
    assert_eq!(h["prompt"][4], json!(["2"]));
    // Inputs are converted in place: the queue and history show 8, not "8".
    let mut p = save("conv");
    p["1"]["inputs"]["width"] = json!("8");
    let id = submit(&f, "x", p).await;
    assert_eq!(
        history(&f, &id).await["prompt"][2]["1"]["inputs"]["width"],
        8
    );
    // Not JSON: aiohttp's 500.
    assert_eq!(post_raw(&f, "/prompt", "nope").await.0, 500);
}

#[tokio::test]
async fn a_repeated_prompt_is_served_from_the_cache_and_its_outputs_sent_again() {
    let f = fake().await;
    let mut ws = connect(&f, "c").await;
    next(&mut ws, Duration::from_secs(5)).await;
    let first = submit(&f, "c", save("c")).await;
    let events = events_until_done(&mut ws, &first).await;
    let executed = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["type"] == "executed")
            .map(|e| e["data"]["output"]["images"][0]["filename"].clone())
            .collect::<Vec<_>>()
    };
    let cached = |events: &[Value]| {
        events
            .iter()
            .find(|e| e["type"] == "execution_cached")
            .unwrap()["data"]["nodes"]
            .clone()
    };
    let executing = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["type"] == "executing" && !e["data"]["node"].is_null())
            .count()
    };
    assert_eq!(executed(&events), [json!("c_00001_.png")]);
    assert_eq!(cached(&events), json!([]));

    // The same prompt: nothing runs, the output node still says what it made.
    let again = submit(&f, "c", save("c")).await;
    let events = events_until_done(&mut ws, &again).await;
    assert_eq!(cached(&events), json!(["1", "2"]));
    assert_eq!(executing(&events), 0);
    assert_eq!(executed(&events), [json!("c_00001_.png")]);
    let h = history(&f, &again).await;
    assert_eq!(h["outputs"]["2"]["images"][0]["filename"], "c_00001_.png");
    assert_eq!(h["status"]["status_str"], "success");

    // Another prefix: only EmptyImage is cached.
    let other = submit(&f, "c", save("d")).await;
    let events = events_until_done(&mut ws, &other).await;
    assert_eq!(cached(&events), json!(["1"]));
    assert_eq!(executed(&events), [json!("d_00001_.png")]);
    // The first prompt again: its SaveImage entry went when "d" did not use it.
    let third = submit(&f, "c", save("c")).await;
    let events = events_until_done(&mut ws, &third).await;
    assert_eq!(cached(&events), json!(["1"]));
    assert_eq!(executed(&events), [json!("c_00002_.png")]);

    // `--cache-none`: every prompt runs.
    let f = fake_with(Options {
        cache: false,
        ..Default::default()
    })
    .await;
    let mut ws = connect(&f, "c").await;
    next(&mut ws, Duration::from_secs(5)).await;
    for n in 1..=2 {
        let id = submit(&f, "c", save("n")).await;
        let events = events_until_done(&mut ws, &id).await;
        assert_eq!(cached(&events), json!([]));
        assert_eq!(executed(&events), [json!(format!("n_{n:05}_.png"))]);
    }
}

#[tokio::test]
async fn preview_image_writes_temp_files_that_view_serves_as_temp() {
    let f = fake().await;
    let id = submit(
        &f,
        "p",
        json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 2, "color": 255}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }),
    )
    .await;
    let h = history(&f, &id).await;
    let images = h["outputs"]["2"]["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 2);
    let name = images[0]["filename"].as_str().unwrap();
    let letters = name
        .strip_prefix("ComfyUI_temp_")
        .and_then(|r| r.strip_suffix("_00001_.png"))
        .unwrap_or_else(|| panic!("{name}"));
    assert!(
        letters.len() == 5 && letters.chars().all(|c| c.is_ascii_lowercase()),
        "{name}"
    );
    assert_eq!(images[0]["type"], "temp");
    assert_eq!(images[0]["subfolder"], "");
    assert!(
        images[1]["filename"]
            .as_str()
            .unwrap()
            .ends_with("_00002_.png")
    );
    assert!(f.temp_dir().join(name).is_file());
    let view = |t: &str| format!("{}/view?filename={name}&type={t}", f.url());
    let resp = http().get(view("temp")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap().starts_with(b"\x89PNG"));
    assert_eq!(
        http().get(view("output")).send().await.unwrap().status(),
        404
    );
}

#[tokio::test]
async fn sampler_steps_send_binary_previews_to_the_prompts_client_only() {
    let f = fake().await;
    let mut mine = connect(&f, "mine").await;
    let mut other = connect(&f, "other").await;
    next(&mut mine, Duration::from_secs(5)).await;
    next(&mut other, Duration::from_secs(5)).await;
    let id = submit(&f, "mine", sampler(3)).await;
    let frames = frames_until_done(&mut mine, &id).await;
    let previews: Vec<_> = frames
        .iter()
        .filter_map(|m| match m {
            Message::Binary(b) => Some(b.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(previews.len(), 3);
    for p in &previews {
        // PREVIEW_IMAGE, then JPEG, then the JPEG's bytes.
        assert_eq!(&p[..8], &[0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(&p[8..10], &[0xFF, 0xD8]);
    }
    let progress: Vec<Value> = frames
        .iter()
        .filter_map(json_of)
        .filter(|e| e["type"] == "progress")
        .map(|e| e["data"].clone())
        .collect();
    assert_eq!(
        progress.last().unwrap(),
        &json!({"value": 3, "max": 3, "prompt_id": id, "node": "5"})
    );
    // The other client got the status broadcasts and nothing binary.
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Some(m) = next(
        &mut other,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await
    {
        assert!(matches!(m, Message::Text(_)), "{m:?}");
        assert_eq!(json_of(&m).unwrap()["type"], "status");
    }

    // A client that says it supports metadata gets PREVIEW_IMAGE_WITH_METADATA.
    let mut meta = connect(&f, "meta").await;
    next(&mut meta, Duration::from_secs(5)).await;
    meta.send(Message::Text(
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let flags = json_of(&next(&mut meta, Duration::from_secs(5)).await.unwrap()).unwrap();
    assert_eq!(
        flags,
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 104857600}})
    );
    let mut p = sampler(2);
    p["5"]["inputs"]["seed"] = json!(2);
    let id = submit(&f, "meta", p).await;
    let frames = frames_until_done(&mut meta, &id).await;
    let previews: Vec<_> = frames
        .iter()
        .filter_map(|m| match m {
            Message::Binary(b) => Some(b.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(previews.len(), 2);
    let p = &previews[0];
    assert_eq!(&p[..4], &[0, 0, 0, 4]);
    let len = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    let metadata: Value = serde_json::from_slice(&p[8..8 + len]).unwrap();
    assert_eq!(metadata["prompt_id"], id.as_str());
    assert_eq!(metadata["node_id"], "5");
    assert_eq!(metadata["image_type"], "image/jpeg");
    assert_eq!(&p[8 + len..10 + len], &[0xFF, 0xD8]);
}

async fn system_version(f: &FakeComfy) -> Value {
    get(f, "/system_stats").await.1["system"]["comfyui_version"].clone()
}

#[tokio::test]
async fn interrupt_with_a_prompt_id_stops_only_that_prompt() {
    let f = fake().await;
    assert_eq!(system_version(&f).await, "0.3.64");
    f.set_faults(Faults {
        hang: true,
        ..Default::default()
    });
    let first = submit(&f, "i", save("h1")).await;
    let second = submit(&f, "i", save("h2")).await;
    eventually("the first to run", async || {
        f.running().as_deref() == Some(first.as_str())
    })
    .await;
    // The queued one is not running: nothing happens.
    let (status, body) =
        post_raw(&f, "/interrupt", &json!({"prompt_id": second}).to_string()).await;
    assert_eq!((status, body.as_str()), (200, ""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.running().as_deref(), Some(first.as_str()));
    post_raw(&f, "/interrupt", &json!({"prompt_id": first}).to_string()).await;
    let h = history(&f, &first).await;
    assert_eq!(h["status"]["status_str"], "error");
    let kinds: Vec<_> = h["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].clone())
        .collect();
    assert_eq!(
        kinds,
        [
            "execution_start",
            "execution_cached",
            "execution_interrupted"
        ]
    );
    assert_eq!(h["status"]["messages"][2][1]["node_id"], "1");
    // No prompt id: whatever runs.
    eventually("the second to run", async || {
        f.running().as_deref() == Some(second.as_str())
    })
    .await;
    post_raw(&f, "/interrupt", "").await;
    assert_eq!(history(&f, &second).await["status"]["status_str"], "error");
}

#[tokio::test]
async fn an_older_comfyui_ignores_the_prompt_id_and_interrupts_what_runs() {
    let f = fake_with(Options {
        interrupt_generation: InterruptGeneration::Old,
        ..Default::default()
    })
    .await;
    assert_eq!(system_version(&f).await, "0.3.56");
    f.set_faults(Faults {
        hang: true,
        ..Default::default()
    });
    let id = submit(&f, "o", save("o")).await;
    eventually("it to run", async || {
        f.running().as_deref() == Some(id.as_str())
    })
    .await;
    post_raw(
        &f,
        "/interrupt",
        &json!({"prompt_id": "someone-else"}).to_string(),
    )
    .await;
    assert_eq!(history(&f, &id).await["status"]["status_str"], "error");
    // The version is what the options say.
    let f = fake_with(Options {
        comfyui_version: Some("0.3.60".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(system_version(&f).await, "0.3.60");
}

#[tokio::test]
async fn a_blackholed_server_goes_silent_instead_of_closing() {
    let f = fake().await;
    let client = http();
    let stats = format!("{}/system_stats", f.url());
    assert_eq!(client.get(&stats).send().await.unwrap().status(), 200);
    let mut ws = connect(&f, "b").await;
    next(&mut ws, Duration::from_secs(5)).await;
    let mut raw = tokio::net::TcpStream::connect(f.addr).await.unwrap();

    f.blackhole();
    // The kept-alive connection: the request goes out, no answer, no close.
    let err = client
        .get(&stats)
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // The websocket: no frame, no close, no error.
    assert!(next(&mut ws, Duration::from_millis(500)).await.is_none());
    // An open connection and a new one: requests get neither bytes nor EOF.
    let mut fresh = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(f.addr),
    )
    .await
    .expect("connect in time")
    .expect("accepted");
    for conn in [&mut raw, &mut fresh] {
        conn.write_all(b"GET /system_stats HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await;
        assert!(read.is_err(), "expected silence, got {read:?}");
    }

    // A killed one closes them.
    let mut f = f;
    f.kill();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), fresh.read(&mut buf))
        .await
        .expect("kill closes it");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn kill_closes_websockets_and_slow_start_delays_the_first_event() {
    let mut f = fake().await;
    f.set_faults(Faults {
        slow_start: Duration::from_millis(300),
        ..Default::default()
    });
    let mut ws = connect(&f, "k").await;
    next(&mut ws, Duration::from_secs(5)).await;
    let sent = Instant::now();
    let id = submit(&f, "k", save("k")).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = next(&mut ws, deadline.saturating_duration_since(Instant::now()))
            .await
            .expect("execution_start");
        if json_of(&m).unwrap()["type"] == "execution_start" {
            break;
        }
    }
    assert!(sent.elapsed() >= Duration::from_millis(300));
    history(&f, &id).await;
    f.kill();
    // What was sent before, then the end (no close frame: the connection drops).
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next())
            .await
            .expect("the socket ends when killed")
        {
            Some(Ok(Message::Text(_))) => continue,
            end => {
                assert!(
                    matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
                    "{end:?}"
                );
                break;
            }
        }
    }
}

#[tokio::test]
async fn object_info_describes_the_model_free_nodes_as_comfyui_does() {
    let f = fake().await;
    let (status, body) = get(&f, "/object_info/PreviewImage").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"PreviewImage": {
            "input": {"required": {"images": ["IMAGE"]}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
            "input_order": {"required": ["images"], "hidden": ["prompt", "extra_pnginfo"]},
            "output": [], "output_is_list": [], "output_name": [],
            "name": "PreviewImage", "display_name": "Preview Image",
            "description": "Saves the input images to your ComfyUI output directory.",
            "python_module": "nodes", "category": "image", "output_node": true,
        }})
    );
    assert_eq!(get(&f, "/object_info/NoSuchNode").await.1, json!({}));
    let (_, all) = get(&f, "/object_info").await;
    assert_eq!(
        all["EmptyImage"]["input"]["required"]["color"],
        json!(["INT", {"default": 0, "min": 0, "max": 16777215, "step": 1, "display": "color"}])
    );
}
