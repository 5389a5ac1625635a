//! Guest memory that cannot fault the server.
//!
//! A front end hands the server file descriptors for its guest memory
//! (SET_MEM_TABLE, ADD_MEM_REG) and for the dirty log (SET_LOG_BASE), and
//! the server maps them shared. A page of such a mapping past the end of
//! its file raises SIGBUS on access, and SIGBUS kills the whole process:
//! every volume of a daemon, for one front end's mistake or malice. Two
//! defences (vhost/README.md, "Hostile front ends"):
//!
//! 1. [`check_table`] refuses a memory table whose regions reach past the
//!    end of their files, or whose files are not regular files, before
//!    the server touches it; it seals memfds against shrinking where the
//!    front end allowed sealing (QEMU's memory-backend-memfd seals them
//!    itself).
//! 2. A file can still be truncated later (a regular file, a memfd that
//!    forbids sealing). [`install`] sets a SIGBUS handler that contains a
//!    fault on a front end's shared mapping: it maps anonymous memory
//!    over the rest of that mapping, so the access completes (reading
//!    zeros), and flags the thread. The queue worker sees the flag
//!    ([`take_fault`]) before it completes anything, fails the batch and
//!    disconnects that front end only. A fault anywhere else keeps the
//!    default action.
//!
//! Whose mapping a fault is in is decided from `/proc/self/maps` (open,
//! read and close are async-signal-safe; nothing here allocates): a
//! shared mapping of a file registered by [`FileRegistry::register`], or
//! of a memfd (the dirty log, which QEMU always allocates as a memfd and
//! which the backend never sees). The kernel's own accesses (io_uring
//! reading or writing guest pages in place) fail with EFAULT instead and
//! end as an I/O error of that request.

use crate::guest::Mem;
use std::cell::Cell;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Files of front ends' memory tables, by (device, inode), with the
/// connection that registered them. Fixed size: the signal handler reads
/// it without locks or allocation.
const FILE_SLOTS: usize = 1024;

struct FileSlot {
    owner: AtomicU64,
    dev: AtomicU64,
    ino: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // only as an array initialiser
const FREE_SLOT: FileSlot = FileSlot {
    owner: AtomicU64::new(0),
    dev: AtomicU64::new(0),
    ino: AtomicU64::new(0),
};

static FILES: [FileSlot; FILE_SLOTS] = [FREE_SLOT; FILE_SLOTS];
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    // Const-initialised and without a destructor: a plain thread-local
    // word, safe to touch from a signal handler on this thread.
    static FAULTED: Cell<bool> = const { Cell::new(false) };
}

/// Installs the SIGBUS handler, once per process.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; the
        // handler is an `extern "C"` function with the SA_SIGINFO
        // signature, and `sigemptyset` gets a valid pointer.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "cannot handle SIGBUS ({}): a front end that truncates its memory can stop the server",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// True once if a guest-memory fault was contained on this thread since
/// the last call.
pub fn take_fault() -> bool {
    FAULTED.with(|f| f.replace(false))
}

/// True if a guest-memory fault was contained on this thread and not yet
/// taken: data gathered from guest memory since may be zeros.
pub fn fault_pending() -> bool {
    FAULTED.with(|f| f.get())
}

/// One connection's registration of its memory files; dropping it
/// unregisters them.
pub struct FileRegistry {
    owner: u64,
}

impl FileRegistry {
    pub fn new() -> FileRegistry {
        FileRegistry {
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Replaces this connection's files with `files`. The new ones are
    /// added before the old ones go, so a fault on a file in both tables
    /// is contained throughout.
    pub fn register(&self, files: &[(u64, u64)]) -> Result<(), String> {
        for &(dev, ino) in files {
            if self.holds(dev, ino) {
                continue;
            }
            let free = FILES.iter().find(|s| {
                s.owner
                    .compare_exchange(0, self.owner, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            });
            let Some(slot) = free else {
                self.retain(files);
                return Err(format!(
                    "more than {FILE_SLOTS} guest memory files are in use in this process"
                ));
            };
            slot.dev.store(dev, Ordering::Release);
            slot.ino.store(ino, Ordering::Release);
        }
        self.retain(files);
        Ok(())
    }

    fn holds(&self, dev: u64, ino: u64) -> bool {
        self.slots()
            .any(|s| s.dev.load(Ordering::Acquire) == dev && s.ino.load(Ordering::Acquire) == ino)
    }

    fn slots(&self) -> impl Iterator<Item = &'static FileSlot> + '_ {
        FILES
            .iter()
            .filter(move |s| s.owner.load(Ordering::Acquire) == self.owner)
    }

    /// Frees this connection's slots of files not in `keep`.
    fn retain(&self, keep: &[(u64, u64)]) {
        for s in self.slots() {
            let file = (s.dev.load(Ordering::Acquire), s.ino.load(Ordering::Acquire));
            if !keep.contains(&file) {
                s.dev.store(0, Ordering::Release);
                s.ino.store(0, Ordering::Release);
                s.owner.store(0, Ordering::Release);
            }
        }
    }
}

impl Default for FileRegistry {
    fn default() -> Self {
        FileRegistry::new()
    }
}

impl Drop for FileRegistry {
    fn drop(&mut self) {
        self.retain(&[]);
    }
}

fn registered(dev: u64, ino: u64) -> bool {
    FILES.iter().any(|s| {
        s.owner.load(Ordering::Acquire) != 0
            && s.ino.load(Ordering::Acquire) == ino
            && s.dev.load(Ordering::Acquire) == dev
    })
}

/// Checks that every region of a memory table is a regular file (memfd,
/// shm, hugetlbfs) that backs the whole region, and seals memfds against
/// shrinking where allowed. Returns the (device, inode) of each file.
pub fn check_table(mem: &Mem) -> Result<Vec<(u64, u64)>, String> {
    let mut files = Vec::new();
    for region in mem.iter() {
        let gpa = region.start_addr().0;
        let len = region.len();
        let Some(fo) = region.file_offset() else {
            return Err(format!(
                "memory region at 0x{gpa:x} ({len} bytes) has no file"
            ));
        };
        let fd = fo.file().as_raw_fd();
        seal_against_shrinking(fd);
        // SAFETY: `st` is written by fstat for a descriptor the region owns.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                return Err(format!(
                    "memory region at 0x{gpa:x}: fstat: {}",
                    std::io::Error::last_os_error()
                ));
            }
            st
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(format!(
                "memory region at 0x{gpa:x} is not backed by a regular file or memfd"
            ));
        }
        let need = fo
            .start()
            .checked_add(len)
            .ok_or_else(|| format!("memory region at 0x{gpa:x}: offset plus size overflows"))?;
        let have = u64::try_from(st.st_size).unwrap_or(0);
        if have < need {
            return Err(format!(
                "memory region at 0x{gpa:x} of {len} bytes at file offset {} needs {need} bytes of its file, which has {have}",
                fo.start()
            ));
        }
        files.push((dev_number(st.st_dev), st.st_ino));
    }
    Ok(files)
}

/// Adds F_SEAL_SHRINK to a memfd that allows sealing; other files (and
/// memfds created without MFD_ALLOW_SEALING) are left as they are.
fn seal_against_shrinking(fd: libc::c_int) {
    // SAFETY: fcntl on a descriptor the caller owns; both calls fail
    // harmlessly (EINVAL, EPERM) on files without seals.
    unsafe {
        let seals = libc::fcntl(fd, libc::F_GET_SEALS);
        if seals >= 0 && seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL) == 0 {
            let _ = libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
        }
    }
}

/// `st_dev` as /proc/self/maps prints it, major:minor, folded into one
/// number: major << 32 | minor.
fn dev_number(dev: libc::dev_t) -> u64 {
    (u64::from(libc::major(dev)) << 32) | u64::from(libc::minor(dev))
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    // BUS_ADRERR: a page with no backing, i.e. past the end of the file.
    if code == libc::BUS_ADRERR && contain(addr) {
        FAULTED.with(|f| f.set(true));
        return;
    }
    // Not a front end's memory: the default action, so the access faults
    // again and the process ends as it would have without this handler.
    // SAFETY: signal() is async-signal-safe; SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Replaces the rest of the front end's mapping holding `addr` with
/// anonymous memory. Async-signal-safe: system calls and stack only.
fn contain(addr: usize) -> bool {
    let Some(m) = mapping_of(addr) else {
        return false;
    };
    let front_end = m.shared && (m.memfd || registered(m.dev, m.ino));
    if !front_end {
        return false;
    }
    let page = addr & !(4096 - 1);
    // SAFETY: the range lies inside one existing mapping of this process
    // (from /proc/self/maps) that belongs to a front end's guest memory;
    // replacing it with anonymous pages is what the owner of that mapping
    // (the vm-memory region, which unmaps the whole range on drop) sees as
    // the content of a truncated file.
    let r = unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            m.end - page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    r != libc::MAP_FAILED
}

#[derive(Debug, PartialEq)]
struct Mapping {
    end: usize,
    shared: bool,
    dev: u64,
    ino: u64,
    memfd: bool,
}

/// Finds the mapping holding `addr` in /proc/self/maps, reading it in
/// pieces into a stack buffer.
fn mapping_of(addr: usize) -> Option<Mapping> {
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 8192];
    let mut have = 0usize;
    let mut found = None;
    'read: loop {
        // SAFETY: reads into the unused tail of `buf`.
        let n = unsafe {
            libc::read(
                fd,
                buf[have..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - have,
            )
        };
        if n <= 0 {
            // The last line may lack its newline.
            if have > 0 {
                found = parse_line(&buf[..have], addr);
            }
            break;
        }
        have += n as usize;
        let mut start = 0;
        while let Some(nl) = buf[start..have].iter().position(|&b| b == b'\n') {
            if let Some(m) = parse_line(&buf[start..start + nl], addr) {
                found = Some(m);
                break 'read;
            }
            start += nl + 1;
        }
        if start == 0 && have == buf.len() {
            break; // a line longer than the buffer: give up
        }
        buf.copy_within(start..have, 0);
        have -= start;
    }
    // SAFETY: `fd` was opened above.
    unsafe {
        libc::close(fd);
    }
    found
}

/// `start-end perms offset major:minor inode   path`, if it holds `addr`.
fn parse_line(line: &[u8], addr: usize) -> Option<Mapping> {
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let range = fields.next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = hex(&range[..dash])? as usize;
    let end = hex(&range[dash + 1..])? as usize;
    if addr < start || addr >= end {
        return None;
    }
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let dev = fields.next()?;
    let colon = dev.iter().position(|&b| b == b':')?;
    let dev = (hex(&dev[..colon])? << 32) | hex(&dev[colon + 1..])?;
    let ino = dec(fields.next()?)?;
    let path = fields.next().unwrap_or(b"");
    Some(Mapping {
        end,
        shared: perms.get(3) == Some(&b's'),
        dev,
        ino,
        memfd: path.starts_with(b"/memfd:"),
    })
}

fn hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |v, &b| {
        let d = (b as char).to_digit(16)?;
        Some(v << 4 | u64::from(d))
    })
}

fn dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |v, &b| {
        let d = (b as char).to_digit(10)?;
        v.checked_mul(10)?.checked_add(u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let line = b"7f12a0000000-7f12b0000000 rw-s 00000000 00:01 4242                       /memfd:guest (deleted)";
        let m = parse_line(line, 0x7f12a0001000).unwrap();
        assert_eq!(
            m,
            Mapping {
                end: 0x7f12b0000000,
                shared: true,
                dev: 1,
                ino: 4242,
                memfd: true,
            }
        );
        assert!(parse_line(line, 0x7f12b0000000).is_none());
        let anon = b"55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0          [heap]";
        let m = parse_line(anon, 0x55d0c0000010).unwrap();
        assert!(!m.shared && !m.memfd);
        assert!(parse_line(b"garbage", 0).is_none());
        assert!(parse_line(b"", 0).is_none());
    }

    #[test]
    fn finds_its_own_mappings() {
        let v = vec![1u8; 1 << 20];
        let m = mapping_of(v.as_ptr() as usize + 4096).unwrap();
        assert!(!m.shared);
        assert!(mapping_of(8).is_none());
    }

    #[test]
    fn registry_slots_are_released() {
        let a = FileRegistry::new();
        a.register(&[(1, 2), (3, 4)]).unwrap();
        assert!(registered(1, 2) && registered(3, 4));
        a.register(&[(3, 4), (5, 6)]).unwrap();
        assert!(!registered(1, 2) && registered(3, 4) && registered(5, 6));
        assert_eq!(a.slots().count(), 2, "a file in both tables keeps one slot");
        a.register(&[(5, 6)]).unwrap();
        assert!(!registered(3, 4) && registered(5, 6));
        drop(a);
        assert!(!registered(5, 6));
    }
}
