//! Resuming a large object from the parts a killed run already made durable.
//!
//! Beside each ranged download's temporary file sits a journal: a header naming the
//! object version and the part size, then one line per finished part. A part is added
//! only after the file's data is on disk (fdatasync), so every part the journal lists
//! holds the object's bytes. A rerun of the same object version, with the same part
//! size, skips those parts; anything else (another ETag, size or part size, a missing
//! or short temporary file, an unreadable header) starts the file over.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::catalog::Object;
use super::timeline::{Phase, Timeline, span};

/// The journal of one temporary file, open for appending.
pub struct PartJournal {
    file: File,
    path: PathBuf,
}

/// The journal's path for a temporary file.
pub fn journal_path(temp: &Path) -> PathBuf {
    temp.with_extension("parts")
}

fn header(object: &Object, part_size: u64) -> String {
    // The key is hashed into the file name already; size and ETag pin the version.
    format!(
        "sdfleet-parts v1 size={} etag={} part={}\n",
        object.size, object.etag, part_size
    )
}

/// The parts of `object` already in `temp`, from its journal, if it is of this very
/// object version and part size and `temp` is whole-sized.
fn done_parts(temp: &Path, object: &Object, part_size: u64) -> Option<BTreeSet<u64>> {
    let text = std::fs::read_to_string(journal_path(temp)).ok()?;
    let body = text.strip_prefix(&header(object, part_size))?;
    if std::fs::metadata(temp).ok()?.len() != object.size {
        return None;
    }
    let parts = object.size.div_ceil(part_size);
    // Only newline-terminated lines count: a torn last one (killed while appending) is
    // not a part.
    let complete = body
        .rsplit_once('\n')
        .map_or("", |(complete, _torn)| complete);
    Some(
        complete
            .lines()
            .filter_map(|l| l.parse::<u64>().ok())
            .filter(|&i| i < parts)
            .collect(),
    )
}

/// Opens `temp` for writing `object` in parts of `part_size`, with the parts that are
/// already there; or, when nothing can be resumed, a fresh zero-filled file.
pub fn open(
    temp: &Path,
    object: &Object,
    part_size: u64,
) -> std::io::Result<(File, PartJournal, BTreeSet<u64>)> {
    let path = journal_path(temp);
    if let Some(done) = done_parts(temp, object, part_size) {
        let file = OpenOptions::new().write(true).open(temp)?;
        let journal = OpenOptions::new().append(true).open(&path)?;
        return Ok((
            file,
            PartJournal {
                file: journal,
                path,
            },
            done,
        ));
    }
    let file = File::create(temp)?;
    file.set_len(object.size)?;
    let mut journal = File::create(&path)?;
    journal.write_all(header(object, part_size).as_bytes())?;
    journal.sync_data()?;
    Ok((
        file,
        PartJournal {
            file: journal,
            path,
        },
        BTreeSet::new(),
    ))
}

impl PartJournal {
    /// Records parts as done, in one write and one fdatasync. Call only once their
    /// bytes are durable.
    pub fn record_all(&mut self, indices: &[u64]) -> std::io::Result<()> {
        let lines: String = indices.iter().map(|i| format!("{i}\n")).collect();
        self.file.write_all(lines.as_bytes())?;
        self.file.sync_data()
    }

    /// The file is complete and in place: the journal has nothing left to say.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Makes the finished parts of one file durable and journals them, many per fdatasync
/// (a group commit): a part that finishes while an fdatasync of its file runs waits for
/// the next one, which covers every part finished by then. Each part's fdatasync used to
/// flush the whole file, other parts' pages included: 32 parts of a 2 GiB file meant 32
/// overlapping flushes of it, and as many journal fsyncs.
pub struct GroupCommit {
    file: Arc<File>,
    journal: Arc<Mutex<PartJournal>>,
    finished: Mutex<Vec<u64>>,
    /// One commit of the file at a time.
    turn: tokio::sync::Mutex<()>,
}

impl GroupCommit {
    pub fn new(file: Arc<File>, journal: PartJournal) -> GroupCommit {
        GroupCommit {
            file,
            journal: Arc::new(Mutex::new(journal)),
            finished: Mutex::new(Vec::new()),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Returns once part `index` (its bytes written) is durable and journalled, or an
    /// error of the commit that was to cover it.
    pub async fn commit(&self, index: u64, timeline: Option<Arc<Timeline>>) -> std::io::Result<()> {
        lock(&self.finished)?.push(index);
        let _turn = self.turn.lock().await;
        // Everything finished by now: bytes written before they were listed here.
        let batch = std::mem::take(&mut *lock(&self.finished)?);
        if !batch.contains(&index) {
            // An earlier commit, already done (it held the turn), covered this part; had
            // it failed, its error fails the whole object.
            return Ok(());
        }
        let (file, journal) = (self.file.clone(), self.journal.clone());
        tokio::task::spawn_blocking(move || {
            let _fsync = span(timeline.as_deref(), Phase::Fsync);
            file.sync_data()?;
            lock(&journal)?.record_all(&batch)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// The journal back, once every part is committed.
    pub fn into_journal(self) -> Option<PartJournal> {
        Arc::into_inner(self.journal).and_then(|m| m.into_inner().ok())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::io::Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| std::io::Error::other("part journal poisoned"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(size: u64, etag: &str) -> Object {
        crate::sync::catalog::obj("checkpoints/a", size, etag)
    }

    #[tokio::test]
    async fn parts_finished_together_share_one_fdatasync_and_all_are_journalled() {
        let dir = std::env::temp_dir().join(format!("sdfleet-commit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let temp = dir.join("x.part");
        let v1 = object(16 << 20, "ccc-16");
        let (file, journal, _) = open(&temp, &v1, 1 << 20).unwrap();
        let commits = GroupCommit::new(Arc::new(file), journal);
        let timeline = Arc::new(Timeline::new());
        // 16 parts finish while the first one's commit runs.
        futures::future::try_join_all((0..16).map(|i| commits.commit(i, Some(timeline.clone()))))
            .await
            .unwrap();
        let fsyncs = timeline.to_json()["spans"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["phase"] == "fsync")
            .count();
        assert_eq!(
            fsyncs, 2,
            "the first part's commit, then one for the other 15"
        );
        drop(commits.into_journal());
        let (_, _, done) = open(&temp, &v1, 1 << 20).unwrap();
        assert_eq!(done, (0..16).collect());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resumes_only_the_same_version_with_its_recorded_parts() {
        let dir = std::env::temp_dir().join(format!("sdfleet-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let temp = dir.join("x.part");
        let v1 = object(10 << 20, "aaa-3");

        let (_, mut journal, done) = open(&temp, &v1, 4 << 20).unwrap();
        assert!(done.is_empty(), "a first run resumes nothing");
        journal.record_all(&[0]).unwrap();
        journal.record_all(&[2]).unwrap();
        // A run killed while appending leaves a torn line: not a part.
        std::fs::OpenOptions::new()
            .append(true)
            .open(journal_path(&temp))
            .unwrap()
            .write_all(b"1")
            .unwrap();
        drop(journal);

        let (_, journal, done) = open(&temp, &v1, 4 << 20).unwrap();
        assert_eq!(done.into_iter().collect::<Vec<_>>(), [0, 2]);
        drop(journal);

        // Another part size, another version, or a short file: start over.
        assert!(open(&temp, &v1, 8 << 20).unwrap().2.is_empty());
        let (_, mut journal, _) = open(&temp, &v1, 4 << 20).unwrap();
        journal.record_all(&[1]).unwrap();
        drop(journal);
        assert!(
            open(&temp, &object(10 << 20, "bbb-3"), 4 << 20)
                .unwrap()
                .2
                .is_empty()
        );
        let (_, mut journal, _) = open(&temp, &v1, 4 << 20).unwrap();
        journal.record_all(&[1]).unwrap();
        drop(journal);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&temp)
            .unwrap()
            .set_len(5)
            .unwrap();
        assert!(open(&temp, &v1, 4 << 20).unwrap().2.is_empty());
        assert_eq!(std::fs::metadata(&temp).unwrap().len(), 10 << 20);

        let (_, journal, _) = open(&temp, &v1, 4 << 20).unwrap();
        journal.remove();
        assert!(!journal_path(&temp).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
