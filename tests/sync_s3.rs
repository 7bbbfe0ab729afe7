//! `sdfleet sync` against S3 (moto on loopback): fetches only what changed, deletes on
//! request, refuses keys that would escape DEST, and survives being killed mid-download.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use support::{Testbed, unique_suffix};

async fn s3(tb: &Testbed) -> aws_sdk_s3::Client {
    support::s3_client(tb).await
}

async fn bucket(s3: &aws_sdk_s3::Client, prefix: &str) -> String {
    support::create_bucket(s3, prefix).await
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, body: Vec<u8>) {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .unwrap();
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdfleet-{name}-{}", unique_suffix()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sync_cmd(tb: &Testbed, bucket: &str, prefix: &str, dest: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(support::sdfleet_bin());
    cmd.args(["sync", "--bucket", bucket, "--prefix", prefix, "--dest"])
        .arg(dest)
        .args(extra);
    cmd.envs(tb.env.iter().filter(|(k, _)| k.starts_with("AWS_")));
    cmd
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// The count `sdfleet sync` printed before `word` ("3 fetched", "0 deleted,"): a number,
/// so "1 fetched" is never found inside "11 fetched".
fn count(text: &str, word: &str) -> Option<u64> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    tokens
        .windows(2)
        .find(|w| w[1].trim_end_matches([',', ')']) == word)
        .and_then(|w| w[0].parse().ok())
}

/// Deterministic pseudo-random bytes, so content checks are real.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

#[tokio::test]
async fn sync_fetches_only_changes_and_deletes_on_request() {
    let tb = Testbed::get();
    let s3 = s3(tb).await;
    let b = bucket(&s3, "sync").await;
    // Above the part size given below: fetched with five parallel ranged GETs.
    let big = pattern(40 << 20, 7);
    put(&s3, &b, "models/checkpoints/big.safetensors", big.clone()).await;
    put(&s3, &b, "models/loras/a lora.safetensors", pattern(1000, 1)).await;
    put(&s3, &b, "models/vae/v.safetensors", pattern(3000, 2)).await;
    put(&s3, &b, "other/ignored.bin", pattern(10, 3)).await;
    let dest = temp_dir("sync");

    let (out, text) = run(&mut sync_cmd(
        tb,
        &b,
        "models/",
        &dest,
        &["--part-size-mib", "8"],
    ));
    assert!(out.status.success(), "{text}");
    assert!(count(&text, "fetched") == Some(3), "{text}");
    assert_eq!(
        std::fs::read(dest.join("checkpoints/big.safetensors")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read(dest.join("loras/a lora.safetensors")).unwrap(),
        pattern(1000, 1)
    );
    assert!(!dest.join("other").exists() && !dest.join("models").exists());

    let (out, text) = run(&mut sync_cmd(tb, &b, "models/", &dest, &[]));
    assert!(
        out.status.success()
            && count(&text, "fetched") == Some(0)
            && count(&text, "unchanged") == Some(3),
        "{text}"
    );

    put(&s3, &b, "models/vae/v.safetensors", pattern(3000, 9)).await;
    s3.delete_object()
        .bucket(&b)
        .key("models/loras/a lora.safetensors")
        .send()
        .await
        .unwrap();
    let (_, text) = run(&mut sync_cmd(tb, &b, "models/", &dest, &[]));
    assert!(
        count(&text, "fetched") == Some(1) && count(&text, "deleted") == Some(0),
        "{text}"
    );
    assert_eq!(
        std::fs::read(dest.join("vae/v.safetensors")).unwrap(),
        pattern(3000, 9)
    );
    assert!(
        dest.join("loras/a lora.safetensors").exists(),
        "no --delete: kept"
    );

    // A file the user put there is never ours to delete.
    std::fs::write(dest.join("vae/mine.safetensors"), b"user's").unwrap();
    let (out, text) = run(&mut sync_cmd(tb, &b, "models/", &dest, &["--delete"]));
    assert!(
        out.status.success() && count(&text, "deleted") == Some(1),
        "{text}"
    );
    assert!(!dest.join("loras/a lora.safetensors").exists());
    assert!(!dest.join("loras").exists(), "empty directories go too");
    assert!(dest.join("vae/mine.safetensors").exists());

    let (_, text) = run(&mut sync_cmd(
        tb,
        &b,
        "models/",
        &dest,
        &["--include", "vae/*"],
    ));
    assert!(count(&text, "fetched") == Some(0), "{text}");
    std::fs::remove_dir_all(&dest).unwrap();
}

#[tokio::test]
async fn keys_that_escape_dest_are_refused_and_nothing_is_written_outside() {
    let tb = Testbed::get();
    let s3 = s3(tb).await;
    let b = bucket(&s3, "escape").await;
    let root = temp_dir("escape-root");
    let dest = root.join("dest");
    let outside = root.join("outside");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("loras")).unwrap();
    let evil = [
        "../evil.bin",
        "checkpoints/../../evil2.bin",
        "checkpoints\\..\\evil3.bin",
        "loras/through-symlink.bin",
        "/abs.bin",
        &format!("vae/{}", "x".repeat(300)),
    ];
    for key in evil {
        put(&s3, &b, key, b"evil".to_vec()).await;
    }
    put(&s3, &b, "checkpoints/good.safetensors", b"good".to_vec()).await;

    let (out, text) = run(&mut sync_cmd(tb, &b, "", &dest, &[]));
    assert_eq!(
        out.status.code(),
        Some(3),
        "refused keys fail the run: {text}"
    );
    for key in evil {
        // moto may normalise a leading '/'; every other key must be named.
        if key != "/abs.bin" {
            assert!(
                text.contains(&format!("{key:?}")),
                "{key} not named in: {text}"
            );
        }
    }
    assert_eq!(
        std::fs::read(dest.join("checkpoints/good.safetensors")).unwrap(),
        b"good"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written through the symlink"
    );
    let mut at_root: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    at_root.sort();
    assert_eq!(at_root, ["dest", "outside"], "written outside DEST");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn killed_mid_download_leaves_no_partial_file_and_a_rerun_resumes() {
    let tb = Testbed::get();
    let s3 = s3(tb).await;
    let b = bucket(&s3, "crash").await;
    let body = pattern(96 << 20, 5);
    put(&s3, &b, "checkpoints/huge.safetensors", body.clone()).await;
    let dest = temp_dir("crash");
    let final_path = dest.join("checkpoints/huge.safetensors");
    let parts = ["--part-size-mib", "8"];

    let mut child = sync_cmd(
        tb,
        &b,
        "",
        &dest,
        &[&parts[..], &["--concurrency", "1"]].concat(),
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    // Kill once two 8 MiB parts are journalled as durable (of 12), mid-way through the file.
    let tmp = dest.join(".sdfleet/tmp");
    let journalled = || -> usize {
        std::fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "parts"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|t| t.lines().skip(1).count())
            .sum()
    };
    let mut killed_after = None;
    for _ in 0..1500 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let done = journalled();
        if done >= 2 {
            child.kill().unwrap();
            killed_after = Some(done);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.wait().unwrap();
    let killed_after = killed_after
        .expect("the sync finished before two parts were journalled; make the object larger");
    assert!(killed_after < 12, "killed after the whole file was fetched");
    assert!(
        !final_path.exists(),
        "a partial file sits at the final path"
    );
    // Whatever the killed run wrote after it journalled those parts is not trusted.
    let done_at_kill = journalled();

    let (out, text) = run(&mut sync_cmd(tb, &b, "", &dest, &parts));
    assert!(
        out.status.success() && count(&text, "fetched") == Some(1),
        "{text}"
    );
    let resumed_mib: f64 = text
        .split_once("; ")
        .and_then(|(_, rest)| rest.split_once(" MiB resumed"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no resumed size in {text:?}"));
    assert_eq!(
        resumed_mib,
        (done_at_kill * 8) as f64,
        "the rerun resumes exactly the journalled parts: {text}"
    );
    assert_eq!(
        std::fs::read(&final_path).unwrap(),
        body,
        "resumed file differs"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "no temporary files or journals left"
    );
    std::fs::remove_dir_all(&dest).unwrap();
}

#[test]
fn counts_are_read_as_numbers() {
    let line = "revision sha256:x: 11 fetched (1.0 MiB, 5.0 MB/s; 0 B resumed), 3 unchanged, 0 deleted, 0 refused, in 0.2 s";
    assert_eq!(count(line, "fetched"), Some(11));
    assert_eq!(count(line, "unchanged"), Some(3));
    assert_eq!(count(line, "deleted"), Some(0));
    assert_ne!(count(line, "fetched"), Some(1));
}

#[tokio::test]
async fn a_prefix_is_a_folder_and_file_folder_conflicts_are_named_not_fatal() {
    let tb = Testbed::get();
    let s3 = s3(tb).await;
    let b = bucket(&s3, "edges").await;
    put(&s3, &b, "models/loras/a", pattern(10, 1)).await;
    put(&s3, &b, "models/loras/a/b", pattern(20, 2)).await;
    put(&s3, &b, "models/vae/v", pattern(30, 3)).await;
    put(&s3, &b, "models-old/stale", pattern(40, 4)).await;
    let dest = temp_dir("edges");

    // `models` (no slash) is the folder models/: models-old is not in it.
    let (out, text) = run(&mut sync_cmd(tb, &b, "models", &dest, &[]));
    assert_eq!(
        out.status.code(),
        Some(3),
        "refused keys fail the run: {text}"
    );
    assert!(text.contains("\"loras/a\" and \"loras/a/b\""), "{text}");
    assert_eq!(count(&text, "fetched"), Some(2), "{text}");
    assert_eq!(
        std::fs::read(dest.join("loras/a/b")).unwrap(),
        pattern(20, 2)
    );
    assert_eq!(std::fs::read(dest.join("vae/v")).unwrap(), pattern(30, 3));
    assert!(!dest.join("-old").exists() && !dest.join("stale").exists());

    // A file replaced by a folder of the same name: with --delete the next sync converges.
    s3.delete_object()
        .bucket(&b)
        .key("models/vae/v")
        .send()
        .await
        .unwrap();
    put(&s3, &b, "models/vae/v/inner", pattern(50, 5)).await;
    s3.delete_object()
        .bucket(&b)
        .key("models/loras/a")
        .send()
        .await
        .unwrap();
    let (out, text) = run(&mut sync_cmd(tb, &b, "models", &dest, &["--delete"]));
    assert!(out.status.success(), "{text}");
    assert_eq!(
        std::fs::read(dest.join("vae/v/inner")).unwrap(),
        pattern(50, 5)
    );
    let _ = std::fs::remove_dir_all(&dest);
}

/// What the sync engine relies on when it pins each GET to the ETag it planned (the unit
/// tests check that it does): S3 (here moto) refuses a GET whose If-Match no longer
/// holds, so an object overwritten mid-download fails that key instead of mixing two
/// versions. moto also reports SSE-KMS on GET, though its KMS ETags are plain MD5s
/// (AWS's are not), so the KMS verification path is covered by unit tests only.
#[tokio::test]
async fn a_get_pinned_to_a_replaced_version_is_refused() {
    let tb = Testbed::get();
    let s3 = s3(tb).await;
    let b = bucket(&s3, "ifmatch").await;
    put(&s3, &b, "m", pattern(100, 1)).await;
    let planned = s3.head_object().bucket(&b).key("m").send().await.unwrap();
    let planned = planned.e_tag().unwrap().to_string();
    put(&s3, &b, "m", pattern(100, 2)).await;
    let stale = s3
        .get_object()
        .bucket(&b)
        .key("m")
        .if_match(&planned)
        .send()
        .await;
    let err = stale.expect_err("a stale If-Match must be refused");
    let status = err.raw_response().map(|r| r.status().as_u16());
    assert_eq!(status, Some(412));
}
