//! Starting writeback of a file range early, without waiting for it.
//!
//! A sync writes many GB; left alone, the kernel holds them as dirty pages until its
//! dirty limits force writers to stall, and each file's fsync then waits for all of
//! its pages at once. Asking for writeback as each window is written keeps the disk
//! busy alongside the network, so durability costs little extra time.

use std::os::fd::AsRawFd;

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to disk. Only a
/// hint: the fsync before the rename is what makes the data durable, so a failure
/// here changes nothing and is ignored.
pub fn start(file: &std::fs::File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open
    // for as long as `file` is borrowed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}
