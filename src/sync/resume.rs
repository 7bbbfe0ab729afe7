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

use super::catalog::Object;

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
    /// Records part `index` as done. Call only once its bytes are durable.
    pub fn record(&mut self, index: u64) -> std::io::Result<()> {
        self.file.write_all(format!("{index}\n").as_bytes())?;
        self.file.sync_data()
    }

    /// The file is complete and in place: the journal has nothing left to say.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(size: u64, etag: &str) -> Object {
        crate::sync::catalog::obj("checkpoints/a", size, etag)
    }

    #[test]
    fn resumes_only_the_same_version_with_its_recorded_parts() {
        let dir = std::env::temp_dir().join(format!("sdfleet-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let temp = dir.join("x.part");
        let v1 = object(10 << 20, "aaa-3");

        let (_, mut journal, done) = open(&temp, &v1, 4 << 20).unwrap();
        assert!(done.is_empty(), "a first run resumes nothing");
        journal.record(0).unwrap();
        journal.record(2).unwrap();
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
        journal.record(1).unwrap();
        drop(journal);
        assert!(
            open(&temp, &object(10 << 20, "bbb-3"), 4 << 20)
                .unwrap()
                .2
                .is_empty()
        );
        let (_, mut journal, _) = open(&temp, &v1, 4 << 20).unwrap();
        journal.record(1).unwrap();
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
