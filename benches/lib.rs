//! Shared helpers for thinlun benchmarks: where the bench files live, a
//! small deterministic PRNG, preparing fully written files, and reading
//! process memory and free space.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

/// Environment variable naming the directory for pool and raw files.
pub const DIR_ENV: &str = "THINLUN_BENCH_DIR";
/// Default bench directory: on a real file system (O_DIRECT does not work
/// on tmpfs, which /tmp often is).
pub const DEFAULT_DIR: &str = "/var/tmp/thinlun-bench";

/// The bench directory (created if missing).
pub fn bench_dir() -> PathBuf {
    let dir = std::env::var_os(DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating bench directory {}: {e}", dir.display()));
    if is_tmpfs(&dir) {
        eprintln!(
            "WARNING: {} is on tmpfs: O_DIRECT is unavailable there and the figures \
             measure the page cache, not a disk. Set {DIR_ENV} to a directory on a real file system.",
            dir.display()
        );
    }
    dir
}

/// Whether `path` lies on tmpfs.
pub fn is_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized,
    // writable statfs buffer that outlives the call.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC
    }
}

/// Bytes available to an unprivileged user on the file system of `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: as in `is_tmpfs`.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// Removes `path` if it exists.
pub fn remove_if_exists(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing {}: {e}", path.display()),
    }
}

/// Creates (or replaces) `path` as a file of `size` bytes (a multiple of
/// 1 MiB) whose every block has really been written, not just fallocated:
/// reads of unwritten extents never reach the disk, and writes to them
/// convert extents. Written with O_DIRECT + io_uring in 1 MiB pieces, 32 at
/// a time, then synced.
pub fn write_full_file(path: &Path, size: u64) -> io::Result<()> {
    use thinlun::dev::{AlignedBuf, BlockDevice, FileDevice, IoOp};
    const PIECE: usize = 1 << 20;
    const AT_ONCE: u64 = 32;
    assert!(
        size.is_multiple_of(PIECE as u64),
        "size must be a multiple of 1 MiB"
    );
    remove_if_exists(path);
    {
        let f = OpenOptions::new().write(true).create_new(true).open(path)?;
        f.set_len(size)?;
    }
    let dev = FileDevice::open(path, true)?;
    let mut buf = AlignedBuf::zeroed(PIECE);
    fill_pattern(&mut buf, 0x5eed);
    let pieces = size / PIECE as u64;
    let mut at = 0;
    while at < pieces {
        let n = AT_ONCE.min(pieces - at);
        let mut ops: Vec<IoOp> = (at..at + n)
            .map(|i| IoOp::Write {
                offset: i * PIECE as u64,
                buf: &buf[..],
            })
            .collect();
        dev.submit(&mut ops)?;
        at += n;
    }
    dev.flush()
}

/// Fills `buf` with a non-zero, seed-dependent pattern.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    fastrand::Rng::with_seed(seed).fill(buf);
}

/// A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`, ...).
pub fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Resident set size in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS").unwrap_or(0) * 1024
}

/// Peak resident set size in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM").unwrap_or(0) * 1024
}

/// Bytes this process has caused to be written to storage so far
/// (`write_bytes` of /proc/self/io; includes O_DIRECT writes from every
/// thread of the process).
pub fn storage_write_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes:")?.trim().parse().ok())
}

/// Formats a count with thousands separators.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Criterion's estimate of the time per iteration (ns) for a benchmark, read
/// back from its `estimates.json` (the slope for linear sampling, else the
/// mean: the same figure criterion prints in the middle of `time:`). Files
/// older than `since` (left by an earlier run) are ignored.
pub fn criterion_estimate_ns(
    criterion_dir: &Path,
    group: &str,
    id: &str,
    since: std::time::SystemTime,
) -> Option<f64> {
    let path = criterion_dir
        .join(group)
        .join(id.replace('/', "_"))
        .join("new")
        .join("estimates.json");
    if std::fs::metadata(&path).ok()?.modified().ok()? < since {
        return None;
    }
    let json = std::fs::read_to_string(path).ok()?;
    let point = |key: &str| -> Option<f64> {
        let at = json.find(&format!("\"{key}\":"))?;
        let rest = &json[at + key.len() + 3..];
        if rest.trim_start().starts_with("null") {
            return None;
        }
        let p = rest.find("\"point_estimate\":")?;
        let num = &rest[p + "\"point_estimate\":".len()..];
        let end = num.find([',', '}'])?;
        num[..end].trim().parse().ok()
    };
    point("slope").or_else(|| point("mean"))
}

/// Where criterion writes its results: `$CRITERION_HOME`, else
/// `$CARGO_TARGET_DIR/criterion`, else `<target>/criterion` derived from the
/// bench executable's path (`<target>/release/deps/<bench>`).
pub fn criterion_dir() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(h));
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(t).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1234567), "1,234,567");
    }

    #[test]
    fn fill_pattern_is_seeded() {
        let (mut a, mut b, mut c) = (vec![0u8; 4100], vec![0u8; 4100], vec![0u8; 4100]);
        fill_pattern(&mut a, 7);
        fill_pattern(&mut b, 7);
        fill_pattern(&mut c, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.chunks(4096).all(|block| block.iter().any(|&x| x != 0)));
    }
}
