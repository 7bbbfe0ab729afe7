//! `sdfleet sync --urls`: models from a list of files by URL, with the guarantees a
//! bucket has. Each file is checked against its SHA-256 before it goes into place
//! (also when read in ranges, and after a resume); an interrupted large download
//! resumes where it stopped; a path that climbs out of the directory is refused.
//!
//! Against a file server on 127.0.0.1 that answers as a static web server or a model
//! hub's CDN does: 200 with the file, 206 for a `Range: bytes=a-b`, 404 for the rest.
//! Where it differs: it can drop a connection halfway through a body, as a network
//! does, and send other bytes than the listed file's, as a changed upstream file does.
//! Needs no cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// What the server holds, and the faults it injects.
#[derive(Default)]
struct Files {
    by_name: BTreeMap<String, Vec<u8>>,
    /// The first GET of a range starting here sends half of it, then drops.
    cut_at: Option<u64>,
    /// Bytes served, all GETs together.
    served: u64,
}

type Shared = Arc<Mutex<Files>>;

async fn answer(files: Shared, req: Request) -> Response {
    let name = req.uri().path().trim_start_matches('/').to_string();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    let mut f = files.lock().unwrap();
    let Some(data) = f.by_name.get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some((start, end)) = range else {
        f.served += data.len() as u64;
        return (StatusCode::OK, data).into_response();
    };
    let end = end.min(data.len() as u64 - 1);
    let slice = data[start as usize..=end as usize].to_vec();
    if f.cut_at == Some(start) {
        f.cut_at = None;
        let half = slice[..slice.len() / 2].to_vec();
        f.served += half.len() as u64;
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from(half)),
            Err(std::io::Error::other("connection dropped")),
        ];
        return Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_LENGTH, slice.len())
            .body(Body::from_stream(futures::stream::iter(chunks)))
            .unwrap();
    }
    f.served += slice.len() as u64;
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{}", data.len()),
        )
        .body(Body::from(slice))
        .unwrap()
}

async fn serve(files: Shared) -> u16 {
    let app = axum::Router::new().fallback(move |req: Request| answer(files.clone(), req));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn weights(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One entry of the list: `path` served from `/name`, listed with `sha256_of`'s hash.
fn entry(port: u16, path: &str, name: &str, sha256_of: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "path": path, "url": format!("http://127.0.0.1:{port}/{name}"),
        "sha256": sha256_hex(sha256_of), "size": sha256_of.len(),
    })
}

/// A fresh directory for one case.
fn workdir(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdfleet-urls-{case}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("dest")).unwrap();
    dir
}

/// Runs `sdfleet sync --urls` of `list` into `dir/dest` (1 MiB parts): success, and
/// stdout with stderr.
async fn sync(dir: &Path, list: &[serde_json::Value]) -> (bool, String) {
    let list_file = dir.join("urls.json");
    std::fs::write(&list_file, serde_json::to_vec(list).unwrap()).unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_sdfleet"))
        .arg("sync")
        .arg("--urls")
        .arg(&list_file)
        .arg("--dest")
        .arg(dir.join("dest"))
        .args(["--part-size-mib", "1"])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("sync ended within 60 s")
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn files_by_url_arrive_and_one_whose_bytes_are_not_its_sha256_never_lands() {
    let dir = workdir("checked");
    let (small, large) = (weights(300_000, 1), weights(3 << 20, 2));
    let files = Shared::default();
    {
        let mut f = files.lock().unwrap();
        f.by_name.insert("small".into(), small.clone());
        f.by_name.insert("large".into(), large.clone());
    }
    let port = serve(files.clone()).await;
    let good = [
        entry(port, "checkpoints/small.safetensors", "small", &small),
        entry(port, "loras/large.safetensors", "large", &large),
    ];
    let (ok, out) = sync(&dir, &good).await;
    assert!(ok, "{out}");
    let dest = dir.join("dest");
    assert!(std::fs::read(dest.join("checkpoints/small.safetensors")).unwrap() == small);
    assert!(std::fs::read(dest.join("loras/large.safetensors")).unwrap() == large);

    // The upstream files change under the list: one read whole, one read in ranges.
    // Neither replaces what is in place, and the next pass does not take the large
    // one's journalled parts for done.
    let (small2, large2) = (weights(300_000, 7), weights(3 << 20, 8));
    {
        let mut f = files.lock().unwrap();
        f.by_name.insert("small2".into(), small2.clone());
        f.by_name.insert("large2".into(), large2.clone());
    }
    for (path, name, listed) in [
        ("checkpoints/new.safetensors", "small2", &small),
        ("loras/new.safetensors", "large2", &large),
    ] {
        let list = [
            good[0].clone(),
            good[1].clone(),
            entry(port, path, name, listed),
        ];
        for pass in 0..2 {
            let (ok, out) = sync(&dir, &list).await;
            assert!(
                !ok,
                "pass {pass}: {name} was accepted under another file's SHA-256"
            );
            assert!(out.contains("does not match the listed SHA-256"), "{out}");
            assert!(!dest.join(path).exists(), "{path} was put in place");
        }
    }
    assert!(std::fs::read(dest.join("checkpoints/small.safetensors")).unwrap() == small);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_large_download_cut_halfway_resumes_where_it_stopped_and_is_hashed_whole() {
    let dir = workdir("resume");
    let large = weights(4 << 20, 3);
    let files = Shared::default();
    {
        let mut f = files.lock().unwrap();
        f.by_name.insert("large".into(), large.clone());
        // The third 1 MiB range drops halfway.
        f.cut_at = Some(2 << 20);
    }
    let port = serve(files.clone()).await;
    let list = [entry(
        port,
        "checkpoints/large.safetensors",
        "large",
        &large,
    )];
    let (ok, out) = sync(&dir, &list).await;
    assert!(!ok, "a dropped connection went unnoticed: {out}");
    assert!(!dir.join("dest/checkpoints/large.safetensors").exists());
    let before = files.lock().unwrap().served;
    let (ok, out) = sync(&dir, &list).await;
    assert!(ok, "{out}");
    let again = files.lock().unwrap().served - before;
    // The four parts streamed together: the three that were not cut finished and were
    // journalled although one failed, so only the cut one is read again.
    assert_eq!(
        again,
        1 << 20,
        "the second pass read {again} bytes of {}, not just the dropped part ({out})",
        large.len()
    );
    assert!(out.contains("resumed"), "{out}");
    assert!(std::fs::read(dir.join("dest/checkpoints/large.safetensors")).unwrap() == large);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_path_that_climbs_out_of_the_directory_is_refused() {
    let dir = workdir("escape");
    let data = weights(1000, 4);
    let files = Shared::default();
    files
        .lock()
        .unwrap()
        .by_name
        .insert("f".into(), data.clone());
    let port = serve(files).await;
    let list = [
        entry(port, "../escaped.safetensors", "f", &data),
        entry(port, "checkpoints/ok.safetensors", "f", &data),
    ];
    let (ok, out) = sync(&dir, &list).await;
    assert!(!ok, "a refused path is a failure the caller sees: {out}");
    assert!(out.contains("refused"), "{out}");
    assert!(
        !dir.join("escaped.safetensors").exists(),
        "written outside the directory"
    );
    assert!(dir.join("dest/checkpoints/ok.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
