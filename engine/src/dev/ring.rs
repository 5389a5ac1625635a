//! An io_uring of one's own over a [`super::FileDevice`], whose operations
//! stay in flight across calls and complete one by one: what a queue that
//! is kept full needs ([`crate::IoQueue`]), where [`super::BlockDevice::submit`]
//! waits for a whole batch.

use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// One read or write, by address: the caller keeps the memory alive (see
/// [`Ring::push`]).
#[derive(Clone, Copy)]
pub struct RawOp {
    /// A write of the memory at `ptr` (else a read into it).
    pub write: bool,
    /// Byte offset on the device.
    pub offset: u64,
    /// Start of the caller's buffer.
    pub ptr: *mut u8,
    /// Length of the transfer in bytes.
    pub len: usize,
}

// SAFETY: a RawOp is an address and a length; whoever pushes it promises
// the memory stays valid until completion, from whichever thread reaps it.
unsafe impl Send for RawOp {}

/// An io_uring over one device whose operations complete one by one (see
/// the module docs), from [`super::BlockDevice::ring`].
pub struct Ring {
    /// A handle of the device's own, so the descriptor outlives every
    /// operation in flight even if the device is dropped first.
    file: File,
    ring: IoUring,
    /// In flight, by io_uring user data: the caller's tag and the op (to
    /// finish a short transfer).
    slots: Vec<Option<(u64, RawOp)>>,
    free: Vec<usize>,
    in_flight: usize,
}

impl Ring {
    pub(super) fn new(file: &File, entries: u32) -> io::Result<Ring> {
        Ok(Ring {
            file: file.try_clone()?,
            ring: IoUring::new(entries)?,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues one operation; it reaches the kernel at the next
    /// [`Ring::reap`] (or earlier, when the submission queue is full).
    ///
    /// # Safety
    /// `op.ptr .. op.ptr + op.len` must stay valid for the kernel to read
    /// (writes) or write (reads), and unused by anything else, until `reap`
    /// has returned this operation's completion. Dropping the ring waits
    /// for every operation in flight.
    pub unsafe fn push(&mut self, op: RawOp, tag: u64) -> io::Result<()> {
        if op.len > u32::MAX as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "I/O too large"));
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = if op.write {
            opcode::Write::new(fd, op.ptr, op.len as u32)
                .offset(op.offset)
                .build()
        } else {
            opcode::Read::new(fd, op.ptr, op.len as u32)
                .offset(op.offset)
                .build()
        }
        .user_data(idx as u64);
        // SAFETY: the caller keeps the buffer valid until the completion is
        // reaped (this function's contract), and the descriptor is our own.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            // Full: hand what is queued to the kernel, which frees the slots.
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    self.free.push(idx);
                    return Err(e);
                }
                // Completions must be reaped first; wait for one.
                let _ = self.ring.submit_and_wait(1);
            }
        }
        self.slots[idx] = Some((tag, op));
        self.in_flight += 1;
        Ok(())
    }

    /// Hands what was pushed to the kernel now, without waiting for
    /// anything: the device starts on it while the caller goes on.
    pub fn submit(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits what was pushed, waits until at least `min` operations
    /// (at most those in flight) have completed, and appends every
    /// completion available as (tag, result).
    pub fn reap(&mut self, min: usize, out: &mut Vec<(u64, io::Result<()>)>) -> io::Result<()> {
        let want = min.min(self.in_flight);
        let mut got = 0;
        loop {
            let wait = want.saturating_sub(got);
            // Enter the kernel only to submit or to wait: completions
            // already in the ring are read without a system call.
            let unsent = !self.ring.submission().is_empty();
            let ready = self.ring.completion().len();
            if unsent || ready < wait {
                if let Err(e) = self.ring.submit_and_wait(wait) {
                    if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) {
                        return Err(e);
                    }
                }
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (user, res) in cqes {
                let Some((tag, op)) = self.slots.get_mut(user as usize).and_then(Option::take)
                else {
                    continue; // not ours: cannot happen, nothing to finish
                };
                self.free.push(user as usize);
                self.in_flight -= 1;
                got += 1;
                let result = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else if (res as usize) < op.len {
                    // Short transfer (signals, end of file): finish it here.
                    // SAFETY: the op is still owned by the caller until this
                    // completion is returned (push's contract), and the
                    // kernel is done with it.
                    unsafe { self.finish(op, res as usize) }
                } else {
                    Ok(())
                };
                out.push((tag, result));
            }
            if got >= want {
                return Ok(());
            }
        }
    }

    /// # Safety
    /// As for [`Ring::push`]: `op`'s memory is valid and not in use.
    unsafe fn finish(&self, op: RawOp, done: usize) -> io::Result<()> {
        let at = op.offset + done as u64;
        if op.write {
            // SAFETY: the caller's memory, valid for `op.len` bytes.
            let rest = unsafe { std::slice::from_raw_parts(op.ptr.add(done), op.len - done) };
            self.file.write_all_at(rest, at)
        } else {
            // SAFETY: as above, and no one else uses it until completion.
            let rest = unsafe { std::slice::from_raw_parts_mut(op.ptr.add(done), op.len - done) };
            let mut pos = 0;
            while pos < rest.len() {
                match self.file.read_at(&mut rest[pos..], at + pos as u64)? {
                    0 => {
                        rest[pos..].fill(0); // past the end: zeros
                        break;
                    }
                    n => pos += n,
                }
            }
            Ok(())
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The owner of the buffers waits for them before dropping the ring
        // (`IoQueue` does, and leaks them if it cannot); this only keeps
        // the kernel from outliving a careless owner where it can.
        let mut sink = Vec::new();
        while self.in_flight > 0 && self.reap(self.in_flight, &mut sink).is_ok() {
            sink.clear();
        }
    }
}
