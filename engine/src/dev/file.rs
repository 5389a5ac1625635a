//! A LUN that is a regular file or a block device, driven with O_DIRECT and
//! io_uring. Each batch takes a ring from a small pool, so concurrent
//! callers (one per virtqueue, say) never share a submission queue.

use super::{BlockDevice, IoOp};
use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

const RING_ENTRIES: u32 = 256;

/// The production LUN: a file or block device opened with O_DIRECT where
/// possible, with batches submitted through io_uring.
pub struct FileDevice {
    file: File,
    is_block_device: bool,
    direct: bool,
    rings: Mutex<Vec<IoUring>>,
}

impl FileDevice {
    /// Opens an existing file or block device. O_DIRECT is used when the
    /// file system supports it (tmpfs does not; then the page cache is used
    /// and `flush` still makes writes durable).
    pub fn open(path: &Path, writable: bool) -> io::Result<FileDevice> {
        let meta = std::fs::metadata(path)?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, false),
            Err(e) => return Err(e),
        };
        Ok(FileDevice {
            file,
            is_block_device,
            direct,
            rings: Mutex::new(Vec::new()),
        })
    }

    /// Whether data bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn take_ring(&self) -> io::Result<IoUring> {
        match self.rings.lock().pop() {
            Some(r) => Ok(r),
            None => IoUring::new(RING_ENTRIES),
        }
    }

    /// Runs `ops[..]` on one ring, `RING_ENTRIES` at a time. Every
    /// submitted operation is reaped before returning, even on error, so
    /// the kernel never touches a buffer after this returns.
    fn run(&self, ring: &mut IoUring, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let mut first_err: Option<io::Error> = None;
        for (base, batch) in ops.chunks_mut(RING_ENTRIES as usize).enumerate() {
            let base = base * RING_ENTRIES as usize;
            let mut expected = vec![0usize; batch.len()];
            for (i, op) in batch.iter_mut().enumerate() {
                let entry = match op {
                    IoOp::Read { offset, buf } => {
                        expected[i] = buf.len();
                        opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                            .offset(*offset)
                            .build()
                    }
                    IoOp::Write { offset, buf } => {
                        expected[i] = buf.len();
                        opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32)
                            .offset(*offset)
                            .build()
                    }
                }
                .user_data((base + i) as u64);
                // SAFETY: the buffer behind `entry` is borrowed from `ops`,
                // which outlives this function, and we reap every submitted
                // entry below before returning, so the kernel never uses the
                // buffer after the borrow ends. The queue has room: at most
                // RING_ENTRIES entries are pushed per round and each round is
                // fully drained.
                let pushed = unsafe { ring.submission().push(&entry) };
                if pushed.is_err() {
                    return Err(io::Error::other("io_uring submission queue full"));
                }
            }
            let mut done = 0;
            let mut short: Vec<usize> = Vec::new();
            while done < batch.len() {
                // Wait for everything still outstanding in one call.
                if let Err(e) = ring.submit_and_wait(batch.len() - done) {
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    // Nothing more completes if submission fails; the
                    // entries already in flight still own their buffers,
                    // so wait for them without submitting new ones.
                    first_err.get_or_insert(e);
                }
                for cqe in ring.completion() {
                    done += 1;
                    let i = cqe.user_data() as usize - base;
                    let res = cqe.result();
                    if res < 0 {
                        first_err.get_or_insert(io::Error::from_raw_os_error(-res));
                    } else if (res as usize) < expected[i] {
                        short.push(i);
                    }
                }
            }
            // Short transfers (rare: signals, end of file) are finished
            // synchronously from the start; reads past the end are zeros.
            for i in short {
                self.finish_sync(&mut batch[i])?;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn finish_sync(&self, op: &mut IoOp<'_>) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        match op {
            IoOp::Read { offset, buf } => {
                let mut pos = 0;
                while pos < buf.len() {
                    match self.file.read_at(&mut buf[pos..], *offset + pos as u64)? {
                        0 => {
                            buf[pos..].fill(0);
                            break;
                        }
                        n => pos += n,
                    }
                }
                Ok(())
            }
            IoOp::Write { offset, buf } => self.file.write_all_at(buf, *offset),
        }
    }
}

impl BlockDevice for FileDevice {
    fn size_bytes(&self) -> io::Result<u64> {
        if self.is_block_device {
            // Seeking a shared handle is safe here: all I/O is positional.
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        for op in ops.iter() {
            op.check()?;
        }
        let mut ring = self.take_ring()?;
        let r = self.run(&mut ring, ops);
        self.rings.lock().push(ring);
        r
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn ring(&self, entries: u32) -> Option<io::Result<super::Ring>> {
        Some(super::Ring::new(&self.file, entries))
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        if self.is_block_device {
            let range = [offset, len];
            const BLKDISCARD: libc::c_ulong = 0x1277;
            // SAFETY: BLKDISCARD reads two u64 (offset, length) from the
            // pointer, which points to a live local array of two u64.
            let r = unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) };
            return if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            };
        }
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl FileDevice {
    /// Takes an exclusive advisory lock (flock) so that two processes on
    /// this host never both write the pool; fails with EWOULDBLOCK if held.
    pub fn lock_exclusive(&self) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let r = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
