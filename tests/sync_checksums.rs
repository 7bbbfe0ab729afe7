//! `sdfleet sync` refuses bytes that are not S3's: checked against the full-object
//! checksum S3 sends when there is one, else against the ETag's MD5.
//!
//! Against an S3 double on 127.0.0.1 that answers as S3 does (a ListObjectsV2 page; a
//! GetObject with its ETag, honouring If-Match, and, when the client asks with
//! `x-amz-checksum-mode: ENABLED`, the object's `x-amz-checksum-crc32` with
//! `x-amz-checksum-type: FULL_OBJECT`). Where it differs from S3: it checks no
//! signature, serves one object from memory, and can send a body that does not match
//! its own headers, as a corrupting proxy or NIC would; no real server can be made to.
//! Needs no cluster.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use md5::{Digest, Md5};

const BUCKET: &str = "models";
const KEY: &str = "checkpoints/sdxl.safetensors";

/// What the double serves for its one object.
#[derive(Clone)]
struct Served {
    /// The bytes S3 holds: the listing's size, and what the checksum is of.
    stored: Vec<u8>,
    /// The bytes sent as the body (differs from `stored` when corrupted on the way).
    sent: Vec<u8>,
    etag: String,
    /// Whether S3 holds a full-object CRC32 of the object.
    has_checksum: bool,
    /// Whether a GET asked for checksums.
    asked: Arc<AtomicBool>,
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

async fn answer(served: Served, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    if path.trim_end_matches('/') == format!("/{BUCKET}") && query.contains("list-type=2") {
        let xml = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>{BUCKET}</Name><Prefix></Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated><Contents><Key>{KEY}</Key><LastModified>2026-11-30T12:00:00.000Z</LastModified><ETag>&quot;{}&quot;</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents></ListBucketResult>"#,
            served.etag,
            served.stored.len()
        );
        return ([("content-type", "application/xml")], xml).into_response();
    }
    if path != format!("/{BUCKET}/{KEY}") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let quoted = format!("\"{}\"", served.etag);
    let headers = req.headers();
    if headers
        .get("if-match")
        .is_some_and(|m| m.as_bytes() != quoted.as_bytes())
    {
        return StatusCode::PRECONDITION_FAILED.into_response();
    }
    let asked = headers
        .get("x-amz-checksum-mode")
        .is_some_and(|m| m.as_bytes().eq_ignore_ascii_case(b"enabled"));
    served.asked.fetch_or(asked, Ordering::Relaxed);
    let mut out = HeaderMap::new();
    out.insert("etag", quoted.parse().unwrap());
    out.insert("content-type", "application/octet-stream".parse().unwrap());
    out.insert(
        "last-modified",
        "Mon, 30 Nov 2026 12:00:00 GMT".parse().unwrap(),
    );
    if served.has_checksum && asked {
        let crc =
            base64::engine::general_purpose::STANDARD.encode(crc32(&served.stored).to_be_bytes());
        out.insert("x-amz-checksum-crc32", crc.parse().unwrap());
        out.insert("x-amz-checksum-type", "FULL_OBJECT".parse().unwrap());
    }
    (out, served.sent.clone()).into_response()
}

/// Serves `served` on 127.0.0.1; its port.
async fn serve(served: Served) -> u16 {
    let app = axum::Router::new().fallback(move |req: Request| answer(served.clone(), req));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// Runs `sdfleet sync` of the double's bucket into `dest`: success, and stderr.
async fn sync(port: u16, dest: &Path) -> (bool, String) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_sdfleet"))
        .args(["sync", "--bucket", BUCKET, "--region", "us-east-1"])
        .arg("--endpoint")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--dest")
        .arg(dest)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("sync ended within 60 s")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn weights(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Syncs the double's object into a fresh directory; success, stderr, the file at its
/// final path (if any), and whether the client asked for checksums.
async fn run_case(name: &str, served: Served) -> (bool, String, Option<Vec<u8>>, bool) {
    let dest =
        std::env::temp_dir().join(format!("sdfleet-checksums-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest).unwrap();
    let asked = served.asked.clone();
    let port = serve(served).await;
    let (ok, stderr) = sync(port, &dest).await;
    let file = std::fs::read(dest.join(KEY)).ok();
    std::fs::remove_dir_all(&dest).unwrap();
    (ok, stderr, file, asked.load(Ordering::Relaxed))
}

/// An object S3 holds (5 MiB, under the ranged-download size: one whole GET, the kind
/// an ETag or a full-object checksum covers), sent with `sent` as its body.
fn object(sent: Vec<u8>, etag_of: &[u8], has_checksum: bool) -> Served {
    Served {
        stored: weights(5 << 20, 1),
        etag: md5_hex(etag_of),
        sent,
        has_checksum,
        asked: Arc::new(AtomicBool::new(false)),
    }
}

#[tokio::test]
async fn a_body_that_matches_its_checksum_and_etag_arrives() {
    let stored = weights(5 << 20, 1);
    let (ok, stderr, file, asked) = run_case("good", object(stored.clone(), &stored, true)).await;
    assert!(ok, "{stderr}");
    assert!(file == Some(stored), "the file is the object's bytes");
    assert!(asked, "the client asks S3 for the object's checksum");
}

#[tokio::test]
async fn a_body_that_fails_s3s_checksum_is_refused_even_when_its_md5_matches_the_etag() {
    // One byte flipped on the way; the ETag given is the MD5 of the corrupted bytes, so
    // only the checksum can tell (an MD5 check would pass).
    let mut sent = weights(5 << 20, 1);
    sent[3 << 20] ^= 0x40;
    let (ok, stderr, file, _) = run_case("crc", object(sent.clone(), &sent, true)).await;
    assert!(!ok, "a corrupted body was accepted");
    assert!(file.is_none(), "nothing is put at the final path");
    assert!(stderr.to_lowercase().contains("checksum"), "{stderr}");
}

#[tokio::test]
async fn without_a_checksum_a_body_that_fails_the_etags_md5_is_refused() {
    let stored = weights(5 << 20, 1);
    let mut sent = stored.clone();
    sent[17] ^= 0x01;
    let (ok, stderr, file, _) = run_case("md5", object(sent, &stored, false)).await;
    assert!(!ok, "a corrupted body was accepted");
    assert!(file.is_none(), "nothing is put at the final path");
    assert!(stderr.contains("does not match ETag"), "{stderr}");
}
