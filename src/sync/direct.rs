//! Writing downloads with direct I/O (O_DIRECT): whole aligned blocks straight to the
//! disk, past the page cache.
//!
//! Why: through the page cache, every byte is copied into it and then written back by
//! the kernel's flusher, and a sync's steady rate is the writeback rate. On the
//! benchmark machine (bench/results.md) buffered writes followed by fdatasync reach
//! 280-300 MB/s, direct writes of 1 MiB blocks 1.0-1.4 GB/s, and sdfleet's downloads
//! held at the writeback rate once the first GBs were in. Direct writes also leave no
//! dirty pages, so nothing else on the node is throttled by the kernel's dirty limits.
//!
//! Each stream of bytes fills one aligned buffer while the previous one is written off
//! the async workers (a direct write blocks until the device has the data). The ends of
//! a range that do not fill an aligned block go through the page cache, and so does
//! everything on a filesystem that refuses O_DIRECT; the fdatasync before a rename or a
//! journal entry covers both kinds of write.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::task::JoinHandle;

use super::timeline::Timeline;
use super::writeback;

/// Offset, length and memory alignment of direct writes: the page size, which covers
/// the logical block size of NVMe and EBS devices (512 B or 4 KiB).
const ALIGN: usize = 4096;
/// Bytes per write. On the benchmark machine, 1 MiB direct writes reached the disk's
/// rate (256 KiB ones 60 % of it); two buffers per stream in flight.
const BUFFER: usize = 1 << 20;

/// A temporary file open twice: for direct writes, and through the page cache for what
/// direct I/O cannot take.
pub struct TempFile {
    /// Also what is fdatasynced (the inode's data, whichever way it was written).
    pub buffered: Arc<File>,
    direct: Option<File>,
    /// Set once the filesystem refused a direct write: the rest goes buffered.
    refused: AtomicBool,
    /// Bytes that went direct.
    direct_bytes: AtomicU64,
}

impl TempFile {
    /// `buffered` open for writing at `path`; direct I/O when the filesystem allows it.
    pub fn new(buffered: File, path: &Path, direct_io: bool) -> TempFile {
        let direct = if direct_io {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok()
        } else {
            None
        };
        TempFile {
            buffered: Arc::new(buffered),
            direct,
            refused: AtomicBool::new(false),
            direct_bytes: AtomicU64::new(0),
        }
    }

    fn direct(&self) -> Option<&File> {
        self.direct
            .as_ref()
            .filter(|_| !self.refused.load(Ordering::Relaxed))
    }

    /// Writes `bytes` at `offset`: direct when both are aligned, else (or when the
    /// filesystem says no) through the page cache, with writeback started at once.
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let aligned = offset.is_multiple_of(ALIGN as u64)
            && bytes.len().is_multiple_of(ALIGN)
            && bytes.as_ptr().addr().is_multiple_of(ALIGN);
        if let Some(direct) = self.direct().filter(|_| aligned) {
            match direct.write_all_at(bytes, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.refused.store(true, Ordering::Relaxed);
                }
                done => {
                    if done.is_ok() {
                        self.direct_bytes
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                    return done;
                }
            }
        }
        self.buffered.write_all_at(bytes, offset)?;
        // Writeback of what went buffered starts now, so it never piles up into a long
        // stall at the fsync.
        writeback::start(&self.buffered, offset, bytes.len() as u64);
        Ok(())
    }
}

/// A buffer whose start is aligned to `ALIGN` (a Vec never moves its heap block).
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    cap: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(cap: usize) -> AlignedBuf {
        let storage = vec![0; cap + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf {
            storage,
            start,
            cap,
            len: 0,
        }
    }

    /// Copies in what fits; returns how much.
    fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.cap - self.len);
        let at = self.start + self.len;
        self.storage[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    fn filled(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

/// Written by a blocking task: the buffer back (for reuse), and the outcome.
type Write = JoinHandle<(AlignedBuf, io::Result<()>)>;

/// One stream of bytes written into a `TempFile` from an offset: aligned buffers
/// written off the async workers, one while the next fills.
pub struct StreamWriter<'a> {
    file: Arc<TempFile>,
    timeline: Option<&'a Timeline>,
    /// File offset of the next byte accepted.
    at: u64,
    /// File offset of `buf`'s first byte.
    buf_at: u64,
    buf: AlignedBuf,
    spare: Option<AlignedBuf>,
    pending: Option<Write>,
}

impl<'a> StreamWriter<'a> {
    /// A writer of about `len` bytes (it sizes the buffers) from `offset`.
    pub fn new(
        file: Arc<TempFile>,
        offset: u64,
        len: u64,
        timeline: Option<&'a Timeline>,
    ) -> StreamWriter<'a> {
        let want = usize::try_from(len)
            .unwrap_or(BUFFER)
            .saturating_add(2 * ALIGN);
        let cap = want.div_ceil(ALIGN) * ALIGN;
        StreamWriter {
            file,
            timeline,
            at: offset,
            buf_at: offset,
            buf: AlignedBuf::new(cap.min(BUFFER)),
            spare: None,
            pending: None,
        }
    }

    pub async fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        // Up to the first aligned offset, bytes go buffered (only a range that starts
        // mid-block has any).
        let misaligned = (self.at % ALIGN as u64) as usize;
        if self.buf.len == 0 && misaligned != 0 {
            let n = bytes.len().min(ALIGN - misaligned);
            self.file.write_at(&bytes[..n], self.at)?;
            self.count(n);
            self.at += n as u64;
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            if self.buf.len == 0 {
                self.buf_at = self.at;
            }
            let n = self.buf.push(bytes);
            self.at += n as u64;
            bytes = &bytes[n..];
            if self.buf.len == self.buf.cap {
                self.submit().await?;
            }
        }
        Ok(())
    }

    /// Writes what is left and waits until every write is done.
    pub async fn finish(mut self) -> io::Result<()> {
        let whole = self.buf.len / ALIGN * ALIGN;
        if whole < self.buf.len {
            let tail = &self.buf.filled()[whole..];
            self.file.write_at(tail, self.buf_at + whole as u64)?;
            self.count(tail.len());
            self.buf.len = whole;
        }
        if whole > 0 {
            self.submit().await?;
        }
        self.wait().await.map(drop)
    }

    /// Hands the full buffer to a blocking task, once the previous one's write is done.
    async fn submit(&mut self) -> io::Result<()> {
        if let Some(done) = self.wait().await? {
            self.spare = Some(done);
        }
        let next = match self.spare.take() {
            Some(buf) => buf,
            None => AlignedBuf::new(self.buf.cap),
        };
        let buf = std::mem::replace(&mut self.buf, next);
        let (file, at) = (self.file.clone(), self.buf_at);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            let written = file.write_at(buf.filled(), at);
            (buf, written)
        }));
        Ok(())
    }

    /// The pending write's buffer (emptied), once it is done.
    async fn wait(&mut self) -> io::Result<Option<AlignedBuf>> {
        let Some(pending) = self.pending.take() else {
            return Ok(None);
        };
        let (mut buf, written) = pending.await.map_err(io::Error::other)?;
        written?;
        self.count(buf.len);
        buf.len = 0;
        Ok(Some(buf))
    }

    /// Bytes of the stream that arrived (for the timeline).
    pub fn received(&self, n: u64) {
        if let Some(t) = self.timeline {
            t.received(n);
        }
    }

    fn count(&self, n: usize) {
        if let Some(t) = self.timeline {
            t.written(n as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `data` into a fresh file of its size, from `offset`, in chunks of `chunk`;
    /// the bytes read back, and how many went direct.
    async fn write_in_chunks(
        direct_io: bool,
        data: &[u8],
        offset: u64,
        chunk: usize,
    ) -> (Vec<u8>, u64) {
        let dir = std::env::temp_dir().join(format!(
            "sdfleet-direct-{}-{direct_io}-{offset}-{chunk}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.part");
        let file = File::create(&path).unwrap();
        file.set_len(offset + data.len() as u64).unwrap();
        let temp = Arc::new(TempFile::new(file, &path, direct_io));
        // The temporary directory is on a filesystem with direct I/O (ext4 here); were
        // it not, this test would only cover the page-cache path.
        assert_eq!(temp.direct.is_some(), direct_io, "O_DIRECT open");
        let mut writer = StreamWriter::new(temp.clone(), offset, data.len() as u64, None);
        for piece in data.chunks(chunk) {
            writer.write(piece).await.unwrap();
        }
        writer.finish().await.unwrap();
        temp.buffered.sync_data().unwrap();
        assert!(
            !temp.refused.load(Ordering::Relaxed),
            "a direct write refused"
        );
        let got = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (
            got[offset as usize..].to_vec(),
            temp.direct_bytes.load(Ordering::Relaxed),
        )
    }

    #[tokio::test]
    async fn every_byte_lands_at_its_offset_whatever_the_alignment() {
        let data: Vec<u8> = (0..(3 * BUFFER + 12_345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        // Aligned and misaligned starts, chunks that straddle buffers and blocks, a
        // tail that fills no block, and the page-cache path for comparison.
        for (direct_io, offset, chunk) in [
            (true, 0, 65_536),
            (true, 0, 1_000),
            (true, 4_096 * 3, 333_333),
            (true, 100, 4_096),
            (false, 100, 70_000),
        ] {
            let (got, direct) = write_in_chunks(direct_io, &data, offset, chunk).await;
            let case = format!("direct {direct_io}, offset {offset}, chunks of {chunk}");
            assert!(got == data, "{case}");
            // All but the partial blocks at either end went direct.
            let whole_blocks = (data.len() - 2 * ALIGN) as u64;
            assert_eq!(direct_io, direct >= whole_blocks, "{case}: {direct} direct");
        }
        // Files smaller than one block (only the buffered tail) and empty ones.
        assert_eq!(write_in_chunks(true, b"weights", 0, 3).await.0, b"weights");
        assert!(write_in_chunks(true, b"", 0, 1).await.0.is_empty());
    }

    #[test]
    fn buffers_are_aligned_for_direct_io() {
        for cap in [ALIGN, 3 * ALIGN, BUFFER] {
            let buf = AlignedBuf::new(cap);
            assert_eq!(buf.filled().as_ptr() as usize % ALIGN, 0);
            assert!(buf.start + cap <= buf.storage.len());
        }
    }
}
