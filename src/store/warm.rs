//! Asking the kernel to read the database file into the page cache, in
//! file order, on a thread of its own while the database opens and the
//! ledger loads.
//!
//! Why: after a crash, redb's repair walks every page of the file in tree
//! order, one page at a time, and loading reads the account tables in key
//! order. With the file out of the page cache (after a reboot, or once
//! memory went elsewhere) each of those is a random read of the disk: a
//! 12 GB file took 380 s to repair on a cold cache, against 13 s with the
//! file cached, while reading it in file order took 13 s
//! (docs/performance.md). Reading ahead in file order turns the random
//! reads into cache hits once the read-ahead has passed them.
//!
//! Why it is safe: it only reads, into one buffer of its own that it
//! throws away; a slice already in the cache (`mincore`) is skipped, so a
//! warm start costs a lookup per slice. It reads at most three quarters
//! of the memory the kernel reports available, leaving the rest to the
//! server's own memory (3.3 GB at 10M accounts), and it stops at the next slice once the server no longer needs
//! it (the [`Warming`] is dropped once the ledger is loaded), so it does
//! not compete with the journal's writes. Off Linux it does nothing.
//!
//! Why not `posix_fadvise(WILLNEED)`: Linux caps each such advice at the
//! device's read-ahead window (a few hundred KiB), so most of the file
//! would not be read.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes checked for residency at once: between two slices the thread
/// checks whether it should stop.
const SLICE_BYTES: u64 = 64 << 20;

/// Bytes per read.
const READ_BYTES: usize = 1 << 20;

/// The read-ahead of one file; dropping it stops the read-ahead.
pub struct Warming {
    stop: Arc<AtomicBool>,
    /// Joined by tests only: the server never waits for the read-ahead.
    #[cfg_attr(not(test), allow(dead_code))]
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Warming {
    /// Starts reading `path` ahead, up to three quarters of the memory
    /// available now. A file that does not exist yet (a new data folder) or whose
    /// size or the memory cannot be read is not read ahead.
    #[must_use]
    pub fn start(path: &Path) -> Warming {
        let stop = Arc::new(AtomicBool::new(false));
        let budget = available_memory().map_or(0, |m| m / 4 * 3);
        let thread = std::fs::File::open(path).ok().and_then(|file| {
            let flag = stop.clone();
            std::thread::Builder::new()
                .name("tally-warm".into())
                .spawn(move || {
                    let started = std::time::Instant::now();
                    let asked = read_ahead(&file, budget, &flag);
                    tracing::debug!(bytes = asked, ms = started.elapsed().as_millis() as u64, "read ahead asked");
                    asked
                })
                .ok()
        });
        Warming { stop, thread }
    }

    /// Waits until every slice has been asked for, and returns how many
    /// bytes were (tests: the reads themselves may still be under way).
    #[cfg(test)]
    fn finish(mut self) -> u64 {
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for Warming {
    fn drop(&mut self) {
        // Not joined: the thread ends after the slice it is asking for.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads `file` slice by slice from its start, up to `budget` bytes or
/// until `stop`, skipping the slices already cached; returns the bytes
/// read. A read error ends it: the database's own reads will report it.
#[cfg(target_os = "linux")]
fn read_ahead(file: &std::fs::File, budget: u64, stop: &AtomicBool) -> u64 {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().map_or(0, |m| m.len()).min(budget);
    let mut buf = vec![0u8; READ_BYTES];
    let (mut at, mut read) = (0, 0);
    while at < len && !stop.load(Ordering::Relaxed) {
        let end = at + SLICE_BYTES.min(len - at);
        if !cached(file, at, end - at) {
            let mut pos = at;
            while pos < end {
                let want = usize::try_from(end - pos).map_or(READ_BYTES, |n| n.min(READ_BYTES));
                match file.read_at(&mut buf[..want], pos) {
                    Ok(0) | Err(_) => return read,
                    Ok(n) => {
                        pos += n as u64;
                        read += n as u64;
                    }
                }
            }
        }
        at = end;
    }
    read
}

/// Whether every page of `len` bytes of `file` from `offset` (a multiple
/// of the page size) is in the page cache. The mapping is only looked at
/// by `mincore`, never read, so a file cut short meanwhile cannot fault.
#[cfg(target_os = "linux")]
fn cached(file: &std::fs::File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    const PAGE: usize = 4096;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), usize::try_from(len)) else { return false };
    // SAFETY: a read-only shared mapping of an open descriptor, unmapped
    // before returning; its memory is never dereferenced.
    unsafe {
        let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), off);
        if map == libc::MAP_FAILED {
            return false;
        }
        let mut pages = vec![0u8; len.div_ceil(PAGE)];
        let looked = libc::mincore(map, len, pages.as_mut_ptr()) == 0;
        libc::munmap(map, len);
        looked && pages.iter().all(|p| p & 1 == 1)
    }
}

#[cfg(not(target_os = "linux"))]
fn read_ahead(_file: &std::fs::File, _budget: u64, _stop: &AtomicBool) -> u64 {
    0
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// Whether the whole file is in the page cache, and whether none of it is.
    fn residency(file: &std::fs::File, len: u64) -> (bool, bool) {
        let none = (0..len / 4096).all(|page| !cached(file, page * 4096, 4096));
        (cached(file, 0, len), none)
    }

    #[test]
    fn the_file_is_brought_into_the_page_cache_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.redb");
        let len = 3 * SLICE_BYTES / 2;
        std::fs::File::create(&path).unwrap().write_all(&vec![7u8; len as usize]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: an advice on an open descriptor. Written back above, the
        // pages can be dropped from the cache.
        assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        assert_eq!(
            residency(&file, len),
            (false, true),
            "the test needs a file system whose cache can be dropped (not tmpfs)"
        );

        assert_eq!(Warming::start(&path).finish(), len, "every byte read");
        assert_eq!(residency(&file, len), (true, false));
        assert_eq!(Warming::start(&path).finish(), 0, "a cached file is not read again");
    }

    #[test]
    fn a_missing_file_is_not_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Warming::start(&dir.path().join("tally.redb")).finish(), 0);
    }

    #[test]
    fn a_stopped_warming_reads_nothing_more_and_the_budget_bounds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.redb");
        std::fs::write(&path, vec![1u8; 3 * READ_BYTES]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        let stop = AtomicBool::new(true);
        assert_eq!(read_ahead(&file, u64::MAX, &stop), 0);
        stop.store(false, Ordering::Relaxed);
        assert_eq!(read_ahead(&file, READ_BYTES as u64 + 1, &stop), READ_BYTES as u64 + 1);
    }
}
