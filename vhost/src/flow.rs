//! The streaming side of a virtqueue: reads and writes that go to the
//! engine's [`IoQueue`] and stay in flight while the worker takes more
//! requests, and the in-order record of every request taken from the
//! avail ring until its used entry is published.
//!
//! Requests complete in the engine in any order; their used entries go
//! out in the order they were taken, which is what makes reconnect safe
//! (crate README). A request that does not stream (flush, discard,
//! write-zeroes, GET_ID, bounced buffers, malformed chains) runs as an
//! engine batch once everything before it has completed.

use crate::guest::{self, HostSeg, Mem};
use crate::request::Status;
use std::collections::VecDeque;
use std::sync::Arc;
use thinlun::{Completion, IoBuf, IoQueue, QueueOp, Volume};

/// Failed requests, logged a few at a time (shared by every queue).
pub(crate) static REQUEST_ERRORS: crate::loglimit::LogLimit = crate::loglimit::LogLimit::new();

/// Requests one queue keeps in the engine at most.
const DEPTH: usize = 256;

/// A data segment of guest memory lent to the engine while its request is
/// in flight. Holding the memory map keeps the mapping alive even if the
/// front end replaces the memory table meanwhile.
pub struct GuestBuf {
    seg: HostSeg,
    _mem: Arc<Mem>,
}

// SAFETY: the pointer is into a shared mapping that `_mem` keeps mapped;
// the buffer is used by one thread at a time (the queue's owner, then the
// kernel, then the owner again).
unsafe impl Send for GuestBuf {}

impl AsMut<[u8]> for GuestBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `seg` was translated by `guest::translate` to `len` bytes
        // inside one region of the mapping `_mem` holds, so the memory is
        // valid for the buffer's whole life. Segments of one drain that
        // overlap where the device writes were sent to the batch path
        // (`guest::overlapping_owners`), and the slice lives only for the
        // call that asked for it, so no two slices of ours alias at once.
        // The guest gave the buffer to the device until its used entry is
        // published (VIRTIO 2.7.13); a guest that reuses it earlier, or
        // lends one buffer to two requests in flight, only corrupts its own
        // data: the bytes are copied or handed to the kernel, never
        // interpreted.
        unsafe { std::slice::from_raw_parts_mut(self.seg.ptr, self.seg.len) }
    }
}

// SAFETY: the slice is always the same `seg` (fixed address and length)
// in a mapping the value keeps alive, however the value moves.
unsafe impl IoBuf for GuestBuf {}

/// A read or write that streams: its segments translated in place.
pub struct DataRequest {
    pub status_addr: u64,
    pub sector: u64,
    pub segs: Vec<HostSeg>,
    pub write: bool,
}

/// One request taken from the avail ring, until its used entry goes out.
struct Taken {
    head: u16,
    status_addr: Option<u64>,
    /// Engine operations still in flight.
    left: u32,
    status: Status,
    /// Bytes written to the guest's buffers on success.
    used_data: u32,
    modifies: bool,
    /// Finished by the batch path: the used length to publish as is.
    finished: Option<u32>,
}

/// The per-queue state that outlives one kick.
pub struct Flow {
    queue: Option<IoQueue<GuestBuf>>,
    taken: VecDeque<Taken>,
    /// Sequence number of `taken.front()`.
    first_seq: u64,
    completions: Vec<Completion<GuestBuf>>,
}

/// A used entry ready to publish, after its status byte is written.
pub struct Done {
    pub head: u16,
    pub status_addr: Option<u64>,
    pub status: Status,
    pub used_data: u32,
    pub finished: Option<u32>,
}

impl Flow {
    pub fn new() -> Flow {
        Flow {
            queue: None,
            taken: VecDeque::new(),
            first_seq: 0,
            completions: Vec::new(),
        }
    }

    /// Requests whose used entry has not gone out yet.
    pub fn outstanding(&self) -> usize {
        self.taken.len()
    }

    /// Engine operations in flight.
    pub fn in_flight(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.pending())
    }

    /// Records a request and starts its segments in the engine: a read
    /// into, or a write from, guest memory in place.
    pub fn start(
        &mut self,
        volume: &Volume,
        mem: &Arc<Mem>,
        head: u16,
        req: &DataRequest,
    ) -> thinlun::Result<()> {
        if self.queue.is_none() {
            self.queue = Some(volume.queue(DEPTH)?);
        }
        let seq = self.first_seq + self.taken.len() as u64;
        self.taken.push_back(Taken {
            head,
            status_addr: Some(req.status_addr),
            left: req.segs.len() as u32,
            status: Status::Ok,
            used_data: if req.write {
                0
            } else {
                req.segs.iter().map(|s| s.len as u32).sum()
            },
            modifies: req.write,
            finished: None,
        });
        let Some(q) = self.queue.as_mut() else {
            return Ok(());
        };
        let mut at = req.sector;
        for &seg in &req.segs {
            let buf = GuestBuf {
                seg,
                _mem: mem.clone(),
            };
            let op = if req.write {
                QueueOp::Write { sector: at, buf }
            } else {
                QueueOp::Read { sector: at, buf }
            };
            q.submit(seq, op);
            at += seg.len as u64 / crate::request::SECTOR;
        }
        if req.segs.is_empty() {
            self.note(seq, Ok(()));
        }
        Ok(())
    }

    /// Waits for everything in flight, then closes the engine queue (it
    /// holds a handle of the volume, which a release must close).
    pub fn close(&mut self) {
        self.drain();
        self.queue = None;
    }

    /// Records requests the batch path already finished, in order.
    pub fn finished(&mut self, done: impl IntoIterator<Item = (u16, u32)>) {
        for (head, used) in done {
            self.taken.push_back(Taken {
                head,
                status_addr: None,
                left: 0,
                status: Status::Ok,
                used_data: 0,
                modifies: false,
                finished: Some(used),
            });
        }
    }

    /// Collects engine completions, waiting for at least `min`.
    pub fn reap(&mut self, min: usize) {
        let Some(q) = self.queue.as_mut() else {
            return;
        };
        let mut got = std::mem::take(&mut self.completions);
        q.complete(min, &mut got);
        for c in got.drain(..) {
            match (&c.result, &c.op) {
                (Err(e), _) => REQUEST_ERRORS.warn(|| format!("request failed: {e}")),
                (Ok(()), QueueOp::Read { buf, .. }) => guest::mark_written(&buf._mem, &buf.seg),
                _ => {}
            }
            self.note(c.tag, c.result.map_err(|_| ()));
        }
        self.completions = got;
    }

    /// Waits for everything in flight.
    pub fn drain(&mut self) {
        while self.in_flight() > 0 {
            self.reap(usize::MAX);
        }
    }

    fn note(&mut self, seq: u64, result: Result<(), ()>) {
        let Some(t) = seq
            .checked_sub(self.first_seq)
            .and_then(|i| self.taken.get_mut(i as usize))
        else {
            return;
        };
        t.left = t.left.saturating_sub(1);
        if result.is_err() {
            t.status = Status::IoErr;
            t.used_data = 0;
        }
    }

    /// Whether a finished write waits at the front, whose mapping must be
    /// persisted before it is published.
    pub fn writes_ready(&self) -> bool {
        self.taken
            .iter()
            .take_while(|t| t.left == 0)
            .any(|t| t.modifies && t.status == Status::Ok)
    }

    /// Takes the finished requests at the front, in order. `failed_writes`
    /// turns finished writes into errors (their mapping could not be
    /// persisted).
    pub fn take_ready(&mut self, failed_writes: bool, out: &mut Vec<Done>) {
        while self.taken.front().is_some_and(|t| t.left == 0) {
            let Some(mut t) = self.taken.pop_front() else {
                break;
            };
            self.first_seq += 1;
            if failed_writes && t.modifies {
                t.status = Status::IoErr;
            }
            out.push(Done {
                head: t.head,
                status_addr: t.status_addr,
                status: t.status,
                used_data: if t.status == Status::Ok {
                    t.used_data
                } else {
                    0
                },
                finished: t.finished,
            });
        }
    }
}
