//! Fetching one object into place: whole, or in ranged parts that resume; verified,
//! fsynced, then renamed, so a partial file never sits at a final path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::sync::Semaphore;

use super::catalog::Object;
use super::direct::{StreamWriter, TempFile};
use super::timeline::{Phase, span};
use super::{SyncError, SyncOptions, io, paths, resume};
use crate::storage::{self as store, BodyCheck, ObjectStore};

/// The temporary file of `key`, unique per key and never at a final path.
pub(super) fn temp_path(tmp: &Path, key: &str) -> PathBuf {
    tmp.join(format!(
        "{}.part",
        &hex::encode(Sha256::digest(key.as_bytes()))[..32]
    ))
}

/// Fetches one object into place; returns its path and the bytes actually fetched
/// (less than its size when parts were resumed).
pub(super) async fn fetch<S: ObjectStore>(
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
    let timeline = opts.timeline.as_deref();

    let file = if object.size > opts.multipart_threshold {
        let part_size = opts.part_size.max(1 << 20);
        let (file, parts, done) = resume::open(&part, object, part_size).map_err(io(&part))?;
        let file = Arc::new(TempFile::new(file, &part, opts.direct_io));
        let commits = Arc::new(resume::GroupCommit::new(file.buffered.clone(), parts));
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
        // When one part fails, the parts already streaming finish and are journalled
        // (the next pass resumes them) and no new one starts; then the first error
        // fails the object. Stopping at the first error threw away every part in flight.
        let failed = std::sync::Mutex::new(None::<SyncError>);
        futures::stream::iter(ranges)
            .for_each_concurrent(None, |(index, start, end)| {
                let (file, part, commits) = (file.clone(), part.clone(), commits.clone());
                let recorder = opts.timeline.clone();
                let failed = &failed;
                async move {
                    let result = async {
                        let permit = permits.acquire().await.map_err(closed)?;
                        if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                            return Ok(());
                        }
                        let get = span(timeline, Phase::Get);
                        let body = store
                            .get(&object.key, Some((start, end)), &object.etag)
                            .await?;
                        let writer = StreamWriter::new(file, start, end + 1 - start, timeline);
                        let written = write_body(writer, &part, body.chunks, None, None).await?;
                        drop(get);
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
                        commits.commit(index, recorder).await.map_err(io(&part))
                    }
                    .await;
                    if let Err(error) = result {
                        failed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(error);
                    }
                }
            })
            .await;
        if let Some(error) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(error);
        }
        journal = Arc::into_inner(commits).and_then(resume::GroupCommit::into_journal);
        file
    } else {
        let file = std::fs::File::create(&part).map_err(io(&part))?;
        file.set_len(object.size).map_err(io(&part))?;
        let file = Arc::new(TempFile::new(file, &part, opts.direct_io));
        let _permit = permits.acquire().await.map_err(closed)?;
        let get = span(timeline, Phase::Get);
        let body = store.get(&object.key, None, &object.etag).await?;
        // A single-part upload's ETag is the MD5 of the bytes (multipart ones contain
        // '-'), unless the object is encrypted with KMS or a customer key: then its size
        // is what is verified. A full-object checksum, checked by the client, needs no MD5.
        let mut md5 =
            (body.check == BodyCheck::EtagMd5 && is_md5_etag(&object.etag)).then(Md5::new);
        // A file listed by URL carries its SHA-256 as its ETag.
        let mut sha256 = store.etag_is_sha256().then(Sha256::new);
        let writer = StreamWriter::new(file.clone(), 0, object.size, timeline);
        let written = write_body(writer, &part, body.chunks, md5.as_mut(), sha256.as_mut()).await?;
        drop(get);
        if written != object.size {
            return Err(SyncError::SizeMismatch {
                key: object.key.clone(),
                got: written,
                want: object.size,
            });
        }
        if let Some(md5) = md5 {
            matches(object, "MD5", hex::encode(md5.finalize()))?;
        }
        if let Some(sha256) = sha256 {
            matches(object, "SHA-256", hex::encode(sha256.finalize()))?;
        }
        file
    };

    let file = file.buffered.clone();
    // Read in ranges (some perhaps before a restart): the whole file is hashed now.
    if journal.is_some() && store.etag_is_sha256() {
        let path = part.clone();
        let got = tokio::task::spawn_blocking(move || sha256_of(&path))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(io(&part))?;
        if let Err(mismatch) = matches(object, "SHA-256", got) {
            // Every part is journalled as done: without this, the next pass would
            // resume nothing and hash the same wrong bytes again.
            drop(file);
            let _ = std::fs::remove_file(&part);
            if let Some(journal) = journal {
                journal.remove();
            }
            return Err(mismatch);
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
    // Durable before it is renamed into place. A ranged object already is: each part
    // was fdatasynced before it was journalled. For the rest, the blocks went direct
    // (or their writeback was started as they were written), so this mostly flushes
    // the device's cache and the file's block map.
    if journal.is_none() {
        let synced = file.clone();
        let recorder = opts.timeline.clone();
        blocking(&part, move || {
            let _fsync = span(recorder.as_deref(), Phase::Fsync);
            synced.sync_data()
        })
        .await?;
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
    let renaming = span(timeline, Phase::Rename);
    tokio::fs::rename(&part, &target)
        .await
        .map_err(io(&target))?;
    drop(renaming);
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

/// The object's bytes hashed (with `hash`) to `got`, or the mismatch.
fn matches(object: &Object, hash: &'static str, got: String) -> Result<(), SyncError> {
    if got == object.etag {
        return Ok(());
    }
    let listed = match hash {
        "MD5" => "ETag",
        _ => "the listed SHA-256",
    };
    Err(SyncError::ChecksumMismatch {
        key: object.key.clone(),
        hash,
        listed,
        got,
        want: object.etag.clone(),
    })
}

/// The SHA-256 of a file's bytes, hex.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut reader = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hash.finalize()));
        }
        hash.update(&buf[..n]);
    }
}

/// Streams `body` through `writer`, feeding `md5` and `sha256` if given; returns the
/// bytes written.
async fn write_body(
    mut writer: StreamWriter<'_>,
    path: &Path,
    mut body: store::ByteChunks,
    mut md5: Option<&mut Md5>,
    mut sha256: Option<&mut Sha256>,
) -> Result<u64, SyncError> {
    let mut received = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        writer.received(chunk.len() as u64);
        if let Some(md5) = md5.as_deref_mut() {
            md5.update(&chunk);
        }
        if let Some(sha256) = sha256.as_deref_mut() {
            sha256.update(&chunk);
        }
        writer.write(&chunk).await.map_err(io(path))?;
        received += chunk.len() as u64;
    }
    writer.finish().await.map_err(io(path))?;
    Ok(received)
}

fn is_md5_etag(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Body, StoreError};
    use crate::sync::catalog::obj;
    use bytes::Bytes;
    use std::sync::Mutex;

    /// A store that serves `data` for any key, says how its bodies are checked, and
    /// records the ETag each GET was pinned to.
    struct Fake {
        data: Vec<u8>,
        check: BodyCheck,
        pinned: Mutex<Vec<String>>,
    }

    impl ObjectStore for Fake {
        async fn list(&self) -> Result<Vec<Object>, StoreError> {
            Ok(Vec::new())
        }
        async fn get(
            &self,
            _key: &str,
            range: Option<(u64, u64)>,
            etag: &str,
        ) -> Result<Body, StoreError> {
            self.pinned.lock().unwrap().push(etag.to_string());
            let bytes = match range {
                Some((start, end)) => self.data[start as usize..=end as usize].to_vec(),
                None => self.data.clone(),
            };
            Ok(Body {
                chunks: futures::stream::iter([Ok(Bytes::from(bytes))]).boxed(),
                check: self.check,
            })
        }
    }

    async fn fetch_one(
        store: &Fake,
        object: &Object,
        part_size: u64,
    ) -> Result<(PathBuf, u64), SyncError> {
        let dest = std::env::temp_dir().join(format!(
            "sdfleet-fetch-{}-{part_size}-{}",
            std::process::id(),
            object.etag
        ));
        let tmp = dest.join(".sdfleet/tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let mut opts = SyncOptions::new(&dest);
        opts.part_size = part_size;
        opts.multipart_threshold = part_size;
        let result = fetch(store, object, &dest, &tmp, &opts, &Semaphore::new(4)).await;
        let _ = std::fs::remove_dir_all(&dest);
        result
    }

    #[tokio::test]
    async fn every_get_is_pinned_to_the_planned_etag() {
        let store = Fake {
            data: vec![7; 3 << 20],
            check: BodyCheck::EtagMd5,
            pinned: Mutex::new(Vec::new()),
        };
        // Ranged: three parts of 1 MiB, each pinned.
        fetch_one(&store, &obj("big", 3 << 20, "abc-3"), 1 << 20)
            .await
            .unwrap();
        assert_eq!(*store.pinned.lock().unwrap(), ["abc-3", "abc-3", "abc-3"]);
    }

    #[tokio::test]
    async fn an_encrypted_objects_etag_is_not_taken_for_its_md5() {
        // SSE-KMS: 32 hex characters that are not the MD5 of the bytes.
        let not_md5 = "0123456789abcdef0123456789abcdef";
        let kms = Fake {
            data: b"weights".to_vec(),
            check: BodyCheck::SizeOnly,
            pinned: Mutex::new(Vec::new()),
        };
        fetch_one(&kms, &obj("kms", 7, not_md5), 64 << 20)
            .await
            .expect("verified by size");
        // The same ETag on a plain object is a real mismatch.
        let plain = Fake {
            data: b"weights".to_vec(),
            check: BodyCheck::EtagMd5,
            pinned: Mutex::new(Vec::new()),
        };
        let err = fetch_one(&plain, &obj("plain", 7, not_md5), 64 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, SyncError::ChecksumMismatch { .. }), "{err}");
    }
}
