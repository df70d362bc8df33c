//! Reading the database file into the page cache, in file order, on a
//! thread of its own while the database opens and the ledger loads.
//!
//! Why: after a crash, redb's repair walks every page of the file in tree
//! order, one page at a time, and loading reads the account tables in key
//! order. With the file out of the page cache (after a reboot, or once
//! memory went elsewhere) each of those is a random read of the disk.
//! Measured with 10M accounts and a 12-15 GB file (docs/performance.md,
//! 2026-12-03): the repair took 101-380 s on a cold cache, against 13-17 s
//! with the file cached, while the disk read 12 GB in file order in 13 s.
//! Reading ahead in file order turns the repair's random reads into cache
//! hits once the read-ahead has passed them: 31-192 s, median 51.5 s.
//!
//! Why it is safe: it only reads, into one buffer of its own that it
//! throws away, through a descriptor of its own (redb's file lock is an
//! open-file-description lock, which closing another descriptor does not
//! release). A slice already in the cache (`mincore`) is skipped, so a
//! warm start costs a lookup per slice. It reads at most three quarters of
//! the memory the kernel reports available (and of what the process's
//! cgroup may still use), leaving the rest to the server's own memory
//! (3.3 GB at 10M accounts). It stops after the slice it is reading once
//! the [`Warming`] is dropped (a server's is dropped when its ledger is
//! loaded). Off Linux it does not start.
//!
//! Why not `posix_fadvise(WILLNEED)`: Linux caps each such advice at the
//! device's read-ahead window (a few MiB at most), so most of the file
//! would not be read.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes checked for residency at once: between two slices the thread
/// checks whether it should stop.
#[cfg(target_os = "linux")]
const SLICE_BYTES: u64 = 64 << 20;

/// Bytes per read.
#[cfg(target_os = "linux")]
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
    /// available now. A file that does not exist yet (a new data folder),
    /// or whose size or the memory cannot be read, is not read ahead.
    #[must_use]
    pub fn start(path: &Path) -> Warming {
        let stop = Arc::new(AtomicBool::new(false));
        #[cfg(target_os = "linux")]
        let thread = std::fs::File::open(path).ok().and_then(|file| {
            let budget = memory_budget();
            let flag = stop.clone();
            std::thread::Builder::new()
                .name("tally-warm".into())
                .spawn(move || {
                    let started = std::time::Instant::now();
                    let read = read_ahead(&file, budget, &flag);
                    tracing::debug!(bytes = read, ms = started.elapsed().as_millis() as u64, "read ahead");
                    read
                })
                .ok()
        });
        #[cfg(not(target_os = "linux"))]
        let thread = {
            let _ = path;
            None
        };
        Warming { stop, thread }
    }

    /// Waits for the read-ahead to end, and returns the bytes it read.
    #[cfg(test)]
    fn finish(mut self) -> u64 {
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for Warming {
    fn drop(&mut self) {
        // Not joined: the thread ends after the slice it is reading.
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

/// The system's page size in bytes.
#[cfg(target_os = "linux")]
fn page_size() -> usize {
    // SAFETY: sysconf only reads a configuration value.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1)
}

/// Whether every page of `len` bytes of `file` from `offset` (a multiple
/// of the page size) is in the page cache. The mapping is only looked at
/// by `mincore`, never read, so a file cut short meanwhile cannot fault.
/// Linux answers truly only to a process that owns the file or may write
/// it (to others it says every page is cached): the server owns its
/// database.
#[cfg(target_os = "linux")]
fn cached(file: &std::fs::File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), usize::try_from(len)) else { return false };
    let mut pages = vec![0u8; len.div_ceil(page_size())];
    // SAFETY: a read-only shared mapping of an open descriptor, unmapped
    // before returning; its memory is never dereferenced, and `pages` has
    // one byte for each of its pages, as `mincore` writes.
    unsafe {
        let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), off);
        if map == libc::MAP_FAILED {
            return false;
        }
        let looked = libc::mincore(map, len, pages.as_mut_ptr()) == 0;
        libc::munmap(map, len);
        looked && pages.iter().all(|p| p & 1 == 1)
    }
}

/// Three quarters of what memory is left: `MemAvailable` of
/// `/proc/meminfo`, and in a cgroup with a memory limit what it may still
/// use (the page cache a read brings in is charged to it); 0 if unknown.
#[cfg(target_os = "linux")]
fn memory_budget() -> u64 {
    let available = (|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    })();
    let left = available.map(|a| cgroup_room().map_or(a, |room| a.min(room)));
    left.map_or(0, |m| m / 4 * 3)
}

/// What this process's cgroup (v2) may still use, if it has a limit.
#[cfg(target_os = "linux")]
fn cgroup_room() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max": no limit
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// A folder on the disk the tests were built on: `/tmp` may be tmpfs,
    /// whose pages cannot leave the cache.
    fn on_disk() -> tempfile::TempDir {
        let exe = std::env::current_exe().unwrap();
        tempfile::tempdir_in(exe.parent().unwrap()).unwrap()
    }

    /// A file of `len` bytes written to disk and dropped from the cache.
    fn uncached(dir: &Path, len: usize) -> std::fs::File {
        let path = dir.join("tally.redb");
        std::fs::File::create(&path).unwrap().write_all(&vec![7u8; len]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: an advice on an open descriptor. Written back above, the
        // pages can be dropped from the cache.
        assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        assert_eq!(residency(&file, len as u64), (false, true), "the file's pages did not leave the cache");
        file
    }

    /// Whether the whole file is in the page cache, and whether none of it is.
    fn residency(file: &std::fs::File, len: u64) -> (bool, bool) {
        let page = page_size() as u64;
        let none = (0..len / page).all(|n| !cached(file, n * page, page));
        (cached(file, 0, len), none)
    }

    #[test]
    fn the_file_is_brought_into_the_page_cache_once() {
        let dir = on_disk();
        let len = 3 * SLICE_BYTES / 2;
        let file = uncached(dir.path(), len as usize);
        let path = dir.path().join("tally.redb");
        assert_eq!(Warming::start(&path).finish(), len, "every byte read");
        assert_eq!(residency(&file, len), (true, false));
        assert_eq!(Warming::start(&path).finish(), 0, "a cached file is not read again");
    }

    #[test]
    fn a_missing_file_is_not_read_ahead() {
        let dir = on_disk();
        assert_eq!(Warming::start(&dir.path().join("tally.redb")).finish(), 0);
    }

    #[test]
    fn a_stopped_read_ahead_reads_nothing_more_and_the_budget_bounds_it() {
        let dir = on_disk();
        let file = uncached(dir.path(), 3 * READ_BYTES);
        let stop = AtomicBool::new(true);
        assert_eq!(read_ahead(&file, u64::MAX, &stop), 0);
        stop.store(false, Ordering::Relaxed);
        assert_eq!(read_ahead(&file, READ_BYTES as u64 + 1, &stop), READ_BYTES as u64 + 1);
    }

    #[test]
    fn the_budget_is_part_of_the_memory_left() {
        let budget = memory_budget();
        assert!(budget > 0, "this machine reports its available memory");
        let total = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = total.lines().next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(budget <= kib * 1024 / 4 * 3, "at most three quarters of the machine's memory");
    }
}
