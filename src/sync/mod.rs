//! The S3 → directory sync engine, shared by `sdfleet sync` (and the SSM method, which
//! runs it) and the node agent.
//!
//! Only new or changed objects are fetched; large ones with parallel ranged GETs that
//! stream into place (bounded memory). Every file is written to a temporary file under
//! `DEST/.sdfleet/tmp`, verified, fsynced and renamed, so a partial file never sits at
//! a final path; a large file killed half-way resumes from its durable parts (see
//! `resume`). A manifest of what was written (`DEST/.sdfleet/manifest.json`) makes
//! reruns cheap and idempotent, and bounds `--delete` to files sdfleet wrote.

pub mod catalog;
pub mod events;
pub mod paths;
pub mod plan;
mod resume;
pub mod store;
mod writeback;

use std::collections::BTreeSet;
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

/// True when `dest` holds the manifest of a finished sync (files removed by hand since
/// are found by the next full sync, not here).
pub fn has_manifest(dest: &Path) -> bool {
    dest.join(STATE_DIR).join(plan::MANIFEST).exists()
}

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
    /// Bytes fetched by this run (parts resumed from an earlier one not counted).
    pub bytes: u64,
    /// Bytes of half-done files taken over from an interrupted run instead of fetched.
    pub resumed: u64,
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
    let manifest = Manifest::load(&state).await.map_err(io(&state))?;
    let plan = plan::plan(catalog, &manifest, dest, opts.delete);
    // An interrupted run's temporary files are kept only for objects still to fetch
    // (their journals say which parts are done); the rest is dropped.
    let wanted: BTreeSet<PathBuf> = plan
        .download
        .iter()
        .flat_map(|o| {
            let temp = temp_path(&tmp, &o.key);
            [resume::journal_path(&temp), temp]
        })
        .collect();
    let mut entries = tokio::fs::read_dir(&tmp).await.map_err(io(&tmp))?;
    while let Some(e) = entries.next_entry().await.map_err(io(&tmp))? {
        if !wanted.contains(&e.path()) {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
    check_space(dest, &plan)?;

    let progress = Arc::new(Mutex::new(Progress::new(manifest)));
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let bytes = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let Plan {
        download,
        delete,
        unchanged,
        refused,
    } = plan;
    let downloaded = download.len();
    let fetched = futures::stream::iter(download.into_iter().map(Ok::<Object, SyncError>))
        .try_for_each_concurrent(opts.concurrency.max(1), |object| {
            let (permits, progress, bytes, resumed, tmp) = (
                permits.clone(),
                progress.clone(),
                bytes.clone(),
                resumed.clone(),
                tmp.clone(),
            );
            let state = state.clone();
            async move {
                let (target, fetched) = fetch(store, &object, dest, &tmp, opts, &permits).await?;
                bytes.fetch_add(fetched, Ordering::Relaxed);
                resumed.fetch_add(object.size - fetched, Ordering::Relaxed);
                let mut p = progress.lock().await;
                p.record(&object, target);
                // Checkpoint now and then, so a crash loses little.
                if p.files_since_save >= CHECKPOINT_FILES || p.bytes_since_save >= CHECKPOINT_BYTES
                {
                    p.checkpoint(&state).await?;
                }
                Ok(())
            }
        })
        .await;
    // What did arrive is kept even when another object failed: the rerun skips it.
    let mut p = progress.lock().await;
    p.checkpoint(&state).await?;
    fetched?;

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
        p.manifest.entries.remove(key);
    }
    p.checkpoint(&state).await?;
    Ok(SyncReport {
        downloaded,
        bytes: bytes.load(Ordering::Relaxed),
        resumed: resumed.load(Ordering::Relaxed),
        deleted,
        unchanged,
        refused,
    })
}

/// Checkpoint the manifest after this many files or bytes.
const CHECKPOINT_FILES: usize = 64;
const CHECKPOINT_BYTES: u64 = 1 << 30;

/// What this run has put in place and not yet checkpointed.
struct Progress {
    manifest: Manifest,
    /// Directories that received a rename since the last checkpoint.
    renamed_into: BTreeSet<PathBuf>,
    files_since_save: usize,
    bytes_since_save: u64,
}

impl Progress {
    fn new(manifest: Manifest) -> Progress {
        Progress {
            manifest,
            renamed_into: BTreeSet::new(),
            files_since_save: 0,
            bytes_since_save: 0,
        }
    }

    fn record(&mut self, object: &Object, target: PathBuf) {
        self.manifest.entries.insert(
            object.key.clone(),
            ManifestEntry {
                size: object.size,
                etag: object.etag.clone(),
            },
        );
        if let Some(dir) = target.parent() {
            self.renamed_into.insert(dir.to_path_buf());
        }
        self.files_since_save += 1;
        self.bytes_since_save += object.size;
    }

    /// Makes the renames durable, then saves the manifest. In that order: a manifest
    /// entry whose rename was lost in a crash could vouch for an older file of the same
    /// size at that path.
    async fn checkpoint(&mut self, state: &Path) -> Result<(), SyncError> {
        let dirs = std::mem::take(&mut self.renamed_into);
        tokio::task::spawn_blocking(move || {
            for dir in dirs {
                std::fs::File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(&dir))?;
            }
            Ok::<(), SyncError>(())
        })
        .await
        .map_err(|e| io(state)(std::io::Error::other(e)))??;
        self.manifest.save(state).await.map_err(io(state))?;
        self.files_since_save = 0;
        self.bytes_since_save = 0;
        Ok(())
    }
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

/// Fetches one object into place; returns its path and the bytes actually fetched
/// (less than its size when parts were resumed).
async fn fetch<S: ObjectStore>(
    store: &S,
    object: &Object,
    dest: &Path,
    tmp: &Path,
    opts: &SyncOptions,
    permits: &Semaphore,
) -> Result<(PathBuf, u64), SyncError> {
    let part = temp_path(tmp, &object.key);
    let closed = |_| SyncError::Unsafe {
        key: object.key.clone(),
    };
    let mut fetched = object.size;
    let mut journal = None;

    let file = if object.size > opts.multipart_threshold {
        let part_size = opts.part_size.max(1 << 20);
        let (file, parts, done) = resume::open(&part, object, part_size).map_err(io(&part))?;
        let (file, parts) = (Arc::new(file), Arc::new(std::sync::Mutex::new(parts)));
        let ranges: Vec<(u64, u64, u64)> = (0..object.size)
            .step_by(part_size as usize)
            .enumerate()
            .map(|(index, start)| {
                (
                    index as u64,
                    start,
                    (start + part_size).min(object.size) - 1,
                )
            })
            .filter(|(index, _, _)| !done.contains(index))
            .collect();
        fetched = ranges.iter().map(|(_, start, end)| end + 1 - start).sum();
        futures::stream::iter(ranges.into_iter().map(Ok::<_, SyncError>))
            .try_for_each_concurrent(None, |(index, start, end)| {
                let (file, part, parts) = (file.clone(), part.clone(), parts.clone());
                async move {
                    let permit = permits.acquire().await.map_err(closed)?;
                    let body = store.get(&object.key, Some((start, end))).await?;
                    let written = write_body(&file, &part, body, start, None).await?;
                    // The network slot goes to the next range while this one is made durable.
                    drop(permit);
                    if written != end + 1 - start {
                        return Err(SyncError::SizeMismatch {
                            key: object.key.clone(),
                            got: written,
                            want: end + 1 - start,
                        });
                    }
                    // Durable first, then journalled: a resumed part is always real bytes.
                    blocking(&part, move || {
                        file.sync_data()?;
                        parts
                            .lock()
                            .map_err(|_| std::io::Error::other("part journal poisoned"))?
                            .record(index)
                    })
                    .await
                }
            })
            .await?;
        journal = Arc::into_inner(parts).and_then(|m| m.into_inner().ok());
        file
    } else {
        let file = std::fs::File::create(&part).map_err(io(&part))?;
        file.set_len(object.size).map_err(io(&part))?;
        let file = Arc::new(file);
        let _permit = permits.acquire().await.map_err(closed)?;
        let body = store.get(&object.key, None).await?;
        let mut md5 = Md5::new();
        let written = write_body(&file, &part, body, 0, Some(&mut md5)).await?;
        if written != object.size {
            return Err(SyncError::SizeMismatch {
                key: object.key.clone(),
                got: written,
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
        file
    };

    let len = file.metadata().map_err(io(&part))?.len();
    if len != object.size {
        return Err(SyncError::SizeMismatch {
            key: object.key.clone(),
            got: len,
            want: object.size,
        });
    }
    // Durable before it is renamed into place. A ranged object already is: each part
    // was fdatasynced before it was journalled. For the rest, most pages are on their
    // way to disk (see `write_body`), so this mostly waits for the tail.
    if journal.is_none() {
        let synced = file.clone();
        blocking(&part, move || synced.sync_data()).await?;
    }
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
    if let Some(journal) = journal {
        journal.remove();
    }
    Ok((target, fetched))
}

/// Runs blocking file work (fsync, mostly) off the async workers, so the downloads on
/// them keep streaming meanwhile.
async fn blocking(
    path: &Path,
    work: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<(), SyncError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(io(path))
}

/// Pages written since the last writeback request; past this, writeback is started.
const WRITEBACK_WINDOW: u64 = 8 << 20;

/// Streams `body` into `file` from `offset`, feeding `md5` if given; returns the bytes
/// written. Writeback of each full window is started at once (without waiting), so the
/// disk works while the network does and dirty pages never pile up into a long stall
/// at the final fsync or in the kernel's dirty-page throttling.
async fn write_body(
    file: &std::fs::File,
    path: &Path,
    mut body: store::ByteChunks,
    offset: u64,
    mut md5: Option<&mut Md5>,
) -> Result<u64, SyncError> {
    let mut at = offset;
    let mut unflushed = offset;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if let Some(md5) = md5.as_deref_mut() {
            md5.update(&chunk);
        }
        std::os::unix::fs::FileExt::write_all_at(file, &chunk, at).map_err(io(path))?;
        at += chunk.len() as u64;
        if at - unflushed >= WRITEBACK_WINDOW {
            writeback::start(file, unflushed, at - unflushed);
            unflushed = at;
        }
    }
    Ok(at - offset)
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
