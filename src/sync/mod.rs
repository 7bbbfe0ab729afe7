//! The S3 → directory sync engine, shared by `sdfleet sync` (and the SSM method, which
//! runs it) and the node agent.
//!
//! Only new or changed objects are fetched; large ones with parallel ranged GETs that
//! stream into place (bounded memory). Every file is written to a temporary file under
//! `DEST/.sdfleet/tmp`, verified, fsynced and renamed, so a partial file never sits at
//! a final path. A manifest of what was written (`DEST/.sdfleet/manifest.json`) makes
//! reruns cheap and idempotent, and bounds `--delete` to files sdfleet wrote.

pub mod catalog;
pub mod events;
pub mod paths;
pub mod plan;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::sync::{Mutex, Semaphore};

use catalog::{Catalog, Object};
use paths::{STATE_DIR, UnsafeKey};
use plan::{Manifest, ManifestEntry, Plan};
use store::{ObjectStore, StoreError};

/// How a sync runs.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub dest: PathBuf,
    /// Remove files sdfleet wrote whose objects are gone.
    pub delete: bool,
    /// Concurrent GET requests (whole objects and ranges together).
    pub concurrency: usize,
    /// Objects larger than this are fetched in ranges of `part_size`.
    pub multipart_threshold: u64,
    pub part_size: u64,
}

impl SyncOptions {
    pub fn new(dest: impl Into<PathBuf>) -> SyncOptions {
        SyncOptions {
            dest: dest.into(),
            delete: false,
            concurrency: 32,
            multipart_threshold: 64 << 20,
            part_size: 64 << 20,
        }
    }
}

/// What a sync did.
#[derive(Debug, Default, PartialEq)]
pub struct SyncReport {
    pub downloaded: usize,
    pub bytes: u64,
    pub deleted: usize,
    pub unchanged: usize,
    /// Keys that could escape DEST: never written.
    pub refused: Vec<UnsafeKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("models need {need}, instance store has {have} free at {dest}")]
    NoSpace {
        need: String,
        have: String,
        dest: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key}: size is {got} bytes, S3 says {want}")]
    SizeMismatch { key: String, got: u64, want: u64 },
    #[error("{key}: MD5 {got} does not match ETag {want}")]
    ChecksumMismatch {
        key: String,
        got: String,
        want: String,
    },
    #[error("{key}: would be written through a symlink created during the sync")]
    Unsafe { key: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Human-readable bytes (GiB/MiB/KiB, binary).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Brings `opts.dest` to `catalog`, reading objects from `store`.
pub async fn sync<S: ObjectStore>(
    store: &S,
    catalog: &Catalog,
    opts: &SyncOptions,
) -> Result<SyncReport, SyncError> {
    let dest = &opts.dest;
    let state = dest.join(STATE_DIR);
    let tmp = state.join("tmp");
    tokio::fs::create_dir_all(&tmp).await.map_err(io(&tmp))?;
    // Partial files of an interrupted run are never resumed into place blindly: refetch.
    let mut entries = tokio::fs::read_dir(&tmp).await.map_err(io(&tmp))?;
    while let Some(e) = entries.next_entry().await.map_err(io(&tmp))? {
        let _ = tokio::fs::remove_file(e.path()).await;
    }
    let manifest = Manifest::load(&state).await.map_err(io(&state))?;
    let plan = plan::plan(catalog, &manifest, dest, opts.delete);
    check_space(dest, &plan)?;

    let manifest = Arc::new(Mutex::new(manifest));
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let bytes = Arc::new(AtomicU64::new(0));
    let Plan {
        download,
        delete,
        unchanged,
        refused,
    } = plan;
    let downloaded = download.len();
    futures::stream::iter(download.into_iter().map(Ok::<Object, SyncError>))
        .try_for_each_concurrent(opts.concurrency.max(1), |object| {
            let (permits, manifest, bytes, tmp) = (
                permits.clone(),
                manifest.clone(),
                bytes.clone(),
                tmp.clone(),
            );
            let state = state.clone();
            async move {
                fetch(store, &object, dest, &tmp, opts, &permits).await?;
                bytes.fetch_add(object.size, Ordering::Relaxed);
                let mut m = manifest.lock().await;
                m.entries.insert(
                    object.key.clone(),
                    ManifestEntry {
                        size: object.size,
                        etag: object.etag.clone(),
                    },
                );
                // Save now and then, so a crash loses little.
                if m.entries.len() % 64 == 0 {
                    m.save(&state).await.map_err(io(&state))?;
                }
                Ok(())
            }
        })
        .await?;

    let mut m = manifest.lock().await;
    let mut deleted = 0;
    for key in &delete {
        if let Ok(path) = paths::destination(dest, key) {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
            remove_empty_parents(dest, &path).await;
        }
        m.entries.remove(key);
    }
    m.save(&state).await.map_err(io(&state))?;
    Ok(SyncReport {
        downloaded,
        bytes: bytes.load(Ordering::Relaxed),
        deleted,
        unchanged,
        refused,
    })
}

fn check_space(dest: &Path, plan: &Plan) -> Result<(), SyncError> {
    let need: u64 = plan.download.iter().map(|o| o.size).sum();
    if need == 0 {
        return Ok(());
    }
    let stat = rustix::fs::statvfs(dest).map_err(|e| io(dest)(e.into()))?;
    let have = stat.f_bavail.saturating_mul(stat.f_frsize);
    if need > have {
        return Err(SyncError::NoSpace {
            need: human(need),
            have: human(have),
            dest: dest.display().to_string(),
        });
    }
    Ok(())
}

/// The temporary file of `key`, unique per key and never at a final path.
fn temp_path(tmp: &Path, key: &str) -> PathBuf {
    tmp.join(format!(
        "{}.part",
        &hex::encode(Sha256::digest(key.as_bytes()))[..32]
    ))
}

async fn fetch<S: ObjectStore>(
    store: &S,
    object: &Object,
    dest: &Path,
    tmp: &Path,
    opts: &SyncOptions,
    permits: &Semaphore,
) -> Result<(), SyncError> {
    let part = temp_path(tmp, &object.key);
    let file = std::fs::File::create(&part).map_err(io(&part))?;
    file.set_len(object.size).map_err(io(&part))?;
    let file = Arc::new(file);

    if object.size > opts.multipart_threshold {
        let part_size = opts.part_size.max(1 << 20);
        let ranges: Vec<(u64, u64)> = (0..object.size)
            .step_by(part_size as usize)
            .map(|start| (start, (start + part_size).min(object.size) - 1))
            .collect();
        futures::stream::iter(ranges.into_iter().map(Ok::<(u64, u64), SyncError>))
            .try_for_each_concurrent(None, |(start, end)| {
                let file = file.clone();
                let part = part.clone();
                async move {
                    let _permit = permits.acquire().await.map_err(|_| SyncError::Unsafe {
                        key: object.key.clone(),
                    })?;
                    let mut body = store.get(&object.key, Some((start, end))).await?;
                    let mut at = start;
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk?;
                        write_at(&file, &chunk, at).map_err(io(&part))?;
                        at += chunk.len() as u64;
                    }
                    if at != end + 1 {
                        return Err(SyncError::SizeMismatch {
                            key: object.key.clone(),
                            got: at - start,
                            want: end + 1 - start,
                        });
                    }
                    Ok(())
                }
            })
            .await?;
    } else {
        let _permit = permits.acquire().await.map_err(|_| SyncError::Unsafe {
            key: object.key.clone(),
        })?;
        let mut body = store.get(&object.key, None).await?;
        let mut md5 = Md5::new();
        let mut at = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            md5.update(&chunk);
            write_at(&file, &chunk, at).map_err(io(&part))?;
            at += chunk.len() as u64;
        }
        if at != object.size {
            return Err(SyncError::SizeMismatch {
                key: object.key.clone(),
                got: at,
                want: object.size,
            });
        }
        // A single-part upload's ETag is the MD5 of the bytes (multipart ones contain '-').
        if is_md5_etag(&object.etag) {
            let got = hex::encode(md5.finalize());
            if got != object.etag {
                return Err(SyncError::ChecksumMismatch {
                    key: object.key.clone(),
                    got,
                    want: object.etag.clone(),
                });
            }
        }
    }

    let len = file.metadata().map_err(io(&part))?.len();
    if len != object.size {
        return Err(SyncError::SizeMismatch {
            key: object.key.clone(),
            got: len,
            want: object.size,
        });
    }
    file.sync_all().map_err(io(&part))?;
    drop(file);

    // Re-check right before the rename: a symlink may have appeared since planning.
    let target = paths::destination(dest, &object.key).map_err(|_| SyncError::Unsafe {
        key: object.key.clone(),
    })?;
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io(parent))?;
    }
    tokio::fs::rename(&part, &target)
        .await
        .map_err(io(&target))?;
    if let Some(parent) = target.parent()
        && let Ok(dir) = std::fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn write_at(file: &std::fs::File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

fn is_md5_etag(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn remove_empty_parents(dest: &Path, file: &Path) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == dest || !d.starts_with(dest) || tokio::fs::remove_dir(d).await.is_err() {
            break;
        }
        dir = d.parent();
    }
}
