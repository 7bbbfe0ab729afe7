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
mod direct;
pub mod events;
mod fetch;
pub mod hot;
pub mod models_dir;
pub mod paths;
pub mod plan;
mod resume;
pub mod timeline;
pub mod warm;
mod writeback;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::TryStreamExt;
use tokio::sync::{Mutex, Semaphore};

use crate::storage::{ObjectStore, StoreError};
use catalog::{Catalog, Object};
use fetch::{fetch, temp_path};
use paths::{STATE_DIR, UnsafeKey};
use plan::{Manifest, ManifestEntry, Plan};
use timeline::{Phase, Timeline, span};

/// True when `dest` holds the manifest of a finished sync (files removed by hand since
/// are found by the next full sync, not here).
pub fn has_manifest(dest: &Path) -> bool {
    dest.join(STATE_DIR).join(plan::MANIFEST).exists()
}

/// GETs in flight. Small objects are bound by each request's round trip, not by bytes:
/// on the benchmark machine 5,000 LoRA-sized files took 22 s with 32 and 15.5 s with 64
/// (128 gave nothing more); see bench/results.md for the large files with 64.
pub const DEFAULT_CONCURRENCY: usize = 64;

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
    /// Writes whole aligned blocks with O_DIRECT, past the page cache (`direct`).
    pub direct_io: bool,
    /// Records where the time goes (`sdfleet sync --timeline`); None costs nothing.
    pub timeline: Option<Arc<Timeline>>,
}

impl SyncOptions {
    pub fn new(dest: impl Into<PathBuf>) -> SyncOptions {
        SyncOptions {
            dest: dest.into(),
            delete: false,
            concurrency: DEFAULT_CONCURRENCY,
            multipart_threshold: 64 << 20,
            part_size: 64 << 20,
            direct_io: true,
            timeline: None,
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
    #[error(
        "another sync of {dest} is running (it holds {dest}/.sdfleet/lock); try again when it ends"
    )]
    Busy { dest: String },
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
    #[error("{key}: size is {got} bytes, the source says {want}")]
    SizeMismatch { key: String, got: u64, want: u64 },
    /// `hash` names the digest, `listed` what it was checked against.
    #[error("{key}: {hash} {got} does not match {listed} {want}")]
    ChecksumMismatch {
        key: String,
        hash: &'static str,
        listed: &'static str,
        got: String,
        want: String,
    },
    #[error("{key}: would be written through a symlink created during the sync")]
    Unsafe { key: String },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// An exclusive lock on DEST's state directory, or `Busy` when another sync holds it.
/// The kernel drops it when the holder exits, however it exits.
fn lock(state: &Path) -> Result<std::fs::File, SyncError> {
    let path = state.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(SyncError::Busy {
            dest: state.parent().unwrap_or(state).display().to_string(),
        }),
        Err(e) => Err(io(&path)(e.into())),
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
    // Held until the sync returns: two syncs of one DEST (the agent and an SSM command,
    // or two SSM commands) never share temporary files or the manifest.
    let _lock = lock(&state)?;
    let manifest = Manifest::load(&state).await.map_err(io(&state))?;
    let timeline = opts.timeline.as_deref();
    let planning = span(timeline, Phase::Plan);
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
    check_space(dest, &plan, &manifest, &tmp)?;
    drop(planning);

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
    // Deletions first: a file the bucket replaced by a folder of the same name (or the
    // other way round) must be gone before the new one can be written.
    let mut deleted = 0;
    {
        let mut p = progress.lock().await;
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
    }
    let downloaded = download.len();
    // More files in flight than GETs: a file waiting on its fdatasync or rename holds no
    // network slot, so the GETs never wait for the disk (files in flight hold no buffers,
    // only their open temporary files).
    let files_in_flight = opts.concurrency.max(1) * FILES_PER_GET;
    let fetched = futures::stream::iter(download.into_iter().map(Ok::<Object, SyncError>))
        .try_for_each_concurrent(files_in_flight, |object| {
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
                    let _span = span(timeline, Phase::Checkpoint);
                    p.checkpoint(&state).await?;
                }
                Ok(())
            }
        })
        .await;
    // What did arrive is kept even when another object failed: the rerun skips it.
    let mut p = progress.lock().await;
    let last = span(timeline, Phase::Checkpoint);
    p.checkpoint(&state).await?;
    drop(last);
    fetched?;

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

/// Files in flight per concurrent GET (each holds two descriptors of its temporary file).
const FILES_PER_GET: usize = 2;

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

/// The bytes this sync will add: what it fetches, less what its deletions free and what
/// resumable temporary files of an interrupted run already hold.
fn check_space(dest: &Path, plan: &Plan, manifest: &Manifest, tmp: &Path) -> Result<(), SyncError> {
    let need = bytes_needed(plan, manifest, tmp);
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

/// What `check_space` asks of the disk.
fn bytes_needed(plan: &Plan, manifest: &Manifest, tmp: &Path) -> u64 {
    let fetch: u64 = plan.download.iter().map(|o| o.size).sum();
    let freed: u64 = plan
        .delete
        .iter()
        .filter_map(|k| manifest.entries.get(k))
        .map(|e| e.size)
        .sum();
    let held: u64 = plan
        .download
        .iter()
        .filter_map(|o| std::fs::metadata(temp_path(tmp, &o.key)).ok())
        // Blocks on disk, not the length: a ranged download's file is created sparse at
        // its full size, and only the parts written take space.
        .map(|m| (std::os::unix::fs::MetadataExt::blocks(&m) * 512).min(m.len()))
        .sum();
    fetch.saturating_sub(freed).saturating_sub(held)
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

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn space_needed_counts_deletions_and_resumable_parts() {
        let tmp = std::env::temp_dir().join(format!("sdfleet-space-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let mut manifest = Manifest::default();
        manifest.entries.insert(
            "old".into(),
            ManifestEntry {
                size: 300,
                etag: "o".into(),
            },
        );
        let plan = Plan {
            download: vec![catalog::obj("new", 1000, "n")],
            delete: vec!["old".into()],
            ..Default::default()
        };
        assert_eq!(bytes_needed(&plan, &manifest, &tmp), 700);
        // An interrupted run left 200 bytes of "new" in its temporary file (its full
        // length reserved sparse, as a ranged download does).
        let part = std::fs::File::create(temp_path(&tmp, "new")).unwrap();
        part.set_len(1000).unwrap();
        assert_eq!(
            bytes_needed(&plan, &manifest, &tmp),
            700,
            "a sparse file holds nothing"
        );
        std::os::unix::fs::FileExt::write_all_at(&part, &[1; 200], 0).unwrap();
        part.sync_all().unwrap();
        let held = 1000 - 300 - bytes_needed(&plan, &manifest, &tmp);
        // Whole filesystem blocks: at least the 200 bytes written, at most one block more.
        assert!((200..=4096).contains(&held), "{held}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_second_sync_of_one_dest_is_refused_while_the_first_holds_it() {
        let state =
            std::env::temp_dir().join(format!("sdfleet-lock-{}/.sdfleet", std::process::id()));
        std::fs::create_dir_all(&state).unwrap();
        let first = lock(&state).unwrap();
        let second = lock(&state).unwrap_err();
        assert!(second.to_string().contains("another sync"), "{second}");
        drop(first);
        lock(&state).expect("free again once the first is done");
        std::fs::remove_dir_all(state.parent().unwrap()).unwrap();
    }
}
