//! A queue of requests on one volume that stay in flight across calls and
//! complete one by one, as soon as their own device I/O does. A batch
//! ([`Volume::submit`]) returns when its slowest request is done, so a
//! caller that keeps 32 requests in flight sees the device idle between
//! batches; a queue keeps it busy, as fio's `iodepth` does.
//!
//! Block-aligned reads and writes take the fast path: planned under the
//! metadata lock, handed to the queue's own io_uring, published when their
//! last piece completes. Everything else (partial blocks, discards,
//! write-zeroes, flushes, a full pool) waits for the queue to empty and
//! runs as a batch of one, with all of the batch path's rules.
//!
//! Requests that overlap an unfinished one of the same queue, where either
//! modifies, wait for the queue to empty first, so the queue's results are
//! those of running its requests one after another in submission order.
//! Completions may come back in any order.

use crate::dev::{AlignedBuf, RawOp, Ring, IO_ALIGN};
use crate::error::{Error, Result};
use crate::format::{BLOCK_SIZE, SECTORS_PER_BLOCK};
use crate::pool::io::plan::{self, Alloc, Piece, Scratch};
use crate::pool::io::volume::{Request, Volume};
use parking_lot::RawMutex;
use std::collections::VecDeque;
use std::io;

/// A buffer that a queue may lend to the kernel while it owns it.
///
/// # Safety
/// The slice `as_mut` returns must have the same address and length every
/// time, for as long as the value lives, even when the value is moved; and
/// nothing but the value's owner may use that memory meanwhile.
pub unsafe trait IoBuf: AsMut<[u8]> + Send + 'static {}

// SAFETY: an AlignedBuf owns its heap allocation, never reallocates it and
// hands out the same aligned window of it every time.
unsafe impl IoBuf for AlignedBuf {}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// One request of a queue. Sectors are 512 bytes; buffers are owned by the
/// queue until the request's [`Completion`] gives them back.
pub enum QueueOp<B> {
    /// Fills `buf` from the volume (see [`Request::Read`]).
    Read {
        /// First sector.
        sector: u64,
        /// Its length is the read's length.
        buf: B,
    },
    /// Writes `buf` to the volume (see [`Request::Write`]).
    Write {
        /// First sector.
        sector: u64,
        /// Its length is the write's length.
        buf: B,
    },
    /// Unmaps the whole blocks of the range (see [`Request::Discard`]).
    Discard {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
    /// The range reads as zeros afterwards (see [`Request::WriteZeroes`]).
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
    /// Makes every request completed before it durable.
    Flush,
}

impl<B: IoBuf> QueueOp<B> {
    fn as_request(&mut self) -> Request<'_> {
        match self {
            QueueOp::Read { sector, buf } => Request::Read {
                sector: *sector,
                buf: buf.as_mut(),
            },
            QueueOp::Write { sector, buf } => Request::Write {
                sector: *sector,
                data: buf.as_mut(),
            },
            QueueOp::Discard { sector, sectors } => Request::Discard {
                sector: *sector,
                sectors: *sectors,
            },
            QueueOp::WriteZeroes { sector, sectors } => Request::WriteZeroes {
                sector: *sector,
                sectors: *sectors,
            },
            QueueOp::Flush => Request::Flush,
        }
    }
}

/// A finished request: the caller's tag, the request with its buffer, and
/// how it went.
pub struct Completion<B> {
    /// The tag given to [`IoQueue::submit`].
    pub tag: u64,
    /// The request as submitted, its buffer filled for a read.
    pub op: QueueOp<B>,
    /// How it went; the error's [`Error::errno`] is what to report.
    pub result: Result<()>,
}

struct Slot<B> {
    tag: u64,
    op: QueueOp<B>,
    /// Device operations still in flight.
    waiting: usize,
    error: Option<io::Error>,
    allocs: Vec<Alloc>,
    /// The I/O epoch the request's lookups belong to (`State::io_begin`).
    token: u64,
    blocks: (u64, u64),
    modifies: bool,
    stripes: Vec<usize>,
}

type StripeGuard = parking_lot::ArcMutexGuard<RawMutex, ()>;

/// A stripe lock the queue holds for its unfinished writes.
struct Held {
    stripe: usize,
    users: usize,
    _guard: StripeGuard,
}

/// See the module documentation. Made by [`Volume::queue`].
pub struct IoQueue<B: IoBuf> {
    /// Declared first so that it drops first: it waits for the kernel
    /// before the slots (and their buffers) go.
    ring: Option<Ring>,
    vol: Volume,
    depth: usize,
    slots: Vec<Option<Slot<B>>>,
    free: Vec<usize>,
    in_flight: usize,
    ready: VecDeque<Completion<B>>,
    held: Vec<Held>,
    scratch: Scratch,
    plan: Vec<Piece>,
    reaped: Vec<(u64, io::Result<()>)>,
    /// Why the ring stopped answering; its requests never complete.
    broken: Option<String>,
}

const BS: u64 = BLOCK_SIZE as u64;

impl Volume {
    /// A queue of up to `depth` requests in flight on this volume (a
    /// handle of its own: the volume stays open while the queue lives).
    pub fn queue<B: IoBuf>(&self, depth: usize) -> Result<IoQueue<B>> {
        let depth = depth.clamp(1, 1024);
        let ring = match self
            .inner()
            .dev
            .ring((depth as u32 * 2).next_power_of_two())
        {
            None => None,
            Some(r) => Some(r.map_err(|e| Error::io("setting up an I/O queue", e))?),
        };
        Ok(IoQueue {
            ring,
            vol: self.another_handle()?,
            depth,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            ready: VecDeque::new(),
            held: Vec::new(),
            scratch: Scratch::default(),
            plan: Vec::new(),
            reaped: Vec::new(),
            broken: None,
        })
    }
}

impl<B: IoBuf> IoQueue<B> {
    /// The volume the queue runs on.
    pub fn volume(&self) -> &Volume {
        &self.vol
    }

    /// Most requests in flight at once (the clamped depth it was made with).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Requests submitted whose completion has not been returned yet.
    pub fn pending(&self) -> usize {
        self.in_flight + self.ready.len()
    }

    /// Starts a request. When `depth` requests are unfinished, first waits
    /// for one of them. Its completion, tagged `tag`, comes from
    /// [`IoQueue::complete`].
    pub fn submit(&mut self, tag: u64, mut op: QueueOp<B>) {
        if self.in_flight >= self.depth {
            self.wait_for(1);
        }
        if self.broken.is_some() {
            return self.refuse(tag, op);
        }
        if let Err(e) = self.validate(&mut op) {
            return self.ready.push_back(Completion {
                tag,
                op,
                result: Err(e),
            });
        }
        let Some((b0, b1, modifies)) = self.fast_path_range(&mut op) else {
            return self.run_alone(tag, op);
        };
        if self.conflicts(b0, b1, modifies) {
            self.wait_for(self.in_flight);
        }
        let stripes = if modifies {
            match self.hold_stripes(b0, b1) {
                Some(s) => s,
                None => return self.refuse(tag, op),
            }
        } else {
            Vec::new()
        };
        match self.start(tag, op, b0, b1, modifies, stripes) {
            Ok(()) => {}
            Err(op) => self.run_alone(tag, op), // no room: the batch path waits or fails
        }
    }

    /// Waits until at least `min` requests (no more than are unfinished)
    /// have completed, and appends every completion available to `out`.
    pub fn complete(&mut self, min: usize, out: &mut Vec<Completion<B>>) {
        let need = min.saturating_sub(self.ready.len());
        if need > 0 || self.in_flight > 0 {
            self.reap(need);
        }
        out.extend(self.ready.drain(..));
    }

    /// Waits for every unfinished request and appends their completions.
    pub fn drain(&mut self, out: &mut Vec<Completion<B>>) {
        self.wait_for(self.in_flight);
        out.extend(self.ready.drain(..));
    }

    /// Completes a request at once with the error of a broken ring.
    fn refuse(&mut self, tag: u64, op: QueueOp<B>) {
        let why = self.broken.as_deref().unwrap_or("unknown");
        let result = Err(Error::io(
            "I/O queue",
            io::Error::other(format!("the queue's io_uring failed: {why}")),
        ));
        self.ready.push_back(Completion { tag, op, result });
    }

    fn validate(&self, op: &mut QueueOp<B>) -> Result<()> {
        let (size, read_only) = self.vol.size_and_read_only()?;
        self.vol.validate(&op.as_request(), size, read_only)
    }

    /// The blocks of a request the fast path can take: a read or write of
    /// whole, aligned blocks in an aligned buffer, on a device with a ring.
    fn fast_path_range(&mut self, op: &mut QueueOp<B>) -> Option<(u64, u64, bool)> {
        self.ring.as_ref()?;
        let (sector, buf, modifies) = match op {
            QueueOp::Read { sector, buf } => (*sector, buf.as_mut(), false),
            QueueOp::Write { sector, buf } => (*sector, buf.as_mut(), true),
            _ => return None,
        };
        let aligned = sector % SECTORS_PER_BLOCK == 0
            && !buf.is_empty()
            && buf.len() % BLOCK_SIZE == 0
            && (buf.as_ptr() as usize).is_multiple_of(IO_ALIGN);
        let b0 = sector / SECTORS_PER_BLOCK;
        aligned.then_some((b0, b0 + (buf.len() / BLOCK_SIZE) as u64, modifies))
    }

    fn conflicts(&self, b0: u64, b1: u64, modifies: bool) -> bool {
        self.slots.iter().flatten().any(|s| {
            let (s0, s1) = s.blocks;
            (modifies || s.modifies) && b0 < s1 && s0 < b1
        })
    }

    /// Runs a request the fast path does not take as a batch of one, once
    /// nothing else of this queue is in flight (so it holds no stripe the
    /// batch path would wait for).
    fn run_alone(&mut self, tag: u64, mut op: QueueOp<B>) {
        self.wait_for(self.in_flight);
        let result = self
            .vol
            .submit(std::slice::from_mut(&mut op.as_request()))
            .pop()
            .unwrap_or(Ok(()));
        self.ready.push_back(Completion { tag, op, result });
    }

    /// Takes the stripe locks of blocks `b0..b1` for a new write. Another
    /// writer holding one makes the queue empty itself first, then wait in
    /// stripe order like every batch, so no two ever wait for each other.
    /// `None` when the ring broke while emptying (its requests keep their
    /// stripes).
    fn hold_stripes(&mut self, b0: u64, b1: u64) -> Option<Vec<usize>> {
        let wanted = self.vol.stripes_of(b0, b1);
        let mut taken = Vec::with_capacity(wanted.len());
        for &s in &wanted {
            if let Some(h) = self.held.iter_mut().find(|h| h.stripe == s) {
                h.users += 1;
                taken.push(s);
                continue;
            }
            match self.vol.stripe(s).try_lock_arc() {
                Some(g) => {
                    self.held.push(Held {
                        stripe: s,
                        users: 1,
                        _guard: g,
                    });
                    taken.push(s);
                }
                None => {
                    self.release_stripes(&taken);
                    self.wait_for(self.in_flight);
                    if self.broken.is_some() {
                        return None;
                    }
                    for &s in &wanted {
                        let g = self.vol.stripe(s).lock_arc();
                        self.held.push(Held {
                            stripe: s,
                            users: 1,
                            _guard: g,
                        });
                    }
                    return Some(wanted);
                }
            }
        }
        Some(taken)
    }

    fn release_stripes(&mut self, stripes: &[usize]) {
        for &s in stripes {
            if let Some(i) = self.held.iter().position(|h| h.stripe == s) {
                self.held[i].users -= 1;
                if self.held[i].users == 0 {
                    self.held.swap_remove(i);
                }
            }
        }
    }

    /// Plans a fast-path request and hands its pieces to the ring. Gives
    /// the request back when the pool has no room for a first write.
    fn start(
        &mut self,
        tag: u64,
        mut op: QueueOp<B>,
        b0: u64,
        b1: u64,
        modifies: bool,
        stripes: Vec<usize>,
    ) -> std::result::Result<(), QueueOp<B>> {
        let id = self.vol.id();
        self.plan.clear();
        let mut allocs = Vec::new();
        let token;
        {
            let mut guard = self.vol.inner().state.lock();
            let st = &mut *guard;
            let reserve = if modifies { st.metadata_reserve() } else { 0 };
            let Some(vol) = st.volumes.get_mut(&id) else {
                drop(guard);
                self.release_stripes(&stripes);
                let result = Err(Error::NoSuchVolume(self.vol.name().to_string()));
                self.ready.push_back(Completion { tag, op, result });
                return Ok(());
            };
            let planned = if modifies {
                plan::plan_write(
                    vol,
                    &st.refs,
                    &mut st.space,
                    reserve,
                    b0,
                    b1 - b0,
                    &mut self.scratch,
                    &mut self.plan,
                    &mut allocs,
                )
            } else {
                plan::plan_read(vol, b0, b1 - b0, &mut self.scratch, &mut self.plan);
                true
            };
            if !planned {
                drop(guard);
                self.release_stripes(&stripes);
                return Err(op);
            }
            token = st.io_begin();
        }

        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let buf = match &mut op {
            QueueOp::Read { buf, .. } | QueueOp::Write { buf, .. } => buf.as_mut(),
            _ => &mut [],
        };
        let base = buf.as_mut_ptr();
        let mut at = 0usize;
        let mut waiting = 0;
        let mut error = None;
        if let Some(ring) = self.ring.as_mut() {
            for piece in &self.plan {
                let len = (piece.n * BS) as usize;
                match piece.pblock {
                    Some(p) => {
                        let raw = RawOp {
                            write: modifies,
                            offset: p * BS,
                            // SAFETY: `at + len` stays within the buffer:
                            // the pieces of a plan cover exactly b1 - b0
                            // blocks, the buffer's length.
                            ptr: unsafe { base.add(at) },
                            len,
                        };
                        // SAFETY: the buffer belongs to `op`, which the slot
                        // keeps until every piece has been reaped; an IoBuf
                        // stays at one address however it moves; and the
                        // queue's Drop waits for the ring before the slots go.
                        match unsafe { ring.push(raw, idx as u64) } {
                            Ok(()) => waiting += 1,
                            Err(e) => {
                                error = Some(e);
                                break;
                            }
                        }
                    }
                    None => buf[at..at + len].fill(0),
                }
                at += len;
            }
            // Start the device now, as fio does for each request: a request
            // waiting in the ring for the next reap idles the device. New
            // blocks are the exception: they are allocated one after
            // another, so writes to them that reach the kernel together
            // merge into larger device writes.
            if waiting > 0 && allocs.is_empty() {
                if let Err(e) = ring.submit() {
                    error.get_or_insert(e);
                }
            }
        }
        self.in_flight += 1;
        self.slots[idx] = Some(Slot {
            tag,
            op,
            waiting,
            error,
            allocs,
            token,
            blocks: (b0, b1),
            modifies,
            stripes,
        });
        if waiting == 0 {
            self.finish(vec![idx]);
        }
        Ok(())
    }

    /// Waits until `n` more requests have completed (into `ready`).
    fn wait_for(&mut self, n: usize) {
        let target = self.ready.len() + n.min(self.in_flight);
        while self.ready.len() < target && self.in_flight > 0 && self.broken.is_none() {
            self.reap(target - self.ready.len());
        }
    }

    /// Reaps device completions, waiting until at least `min` requests
    /// have finished (or nothing is left in the ring).
    fn reap(&mut self, min: usize) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let mut finished = Vec::new();
        let mut reaped = std::mem::take(&mut self.reaped);
        loop {
            // Pieces, not requests, complete: wait for one piece at a time
            // until enough requests are done (most requests are one piece).
            let want = usize::from(finished.len() < min);
            reaped.clear();
            if let Err(e) = ring.reap(want, &mut reaped) {
                self.broken = Some(e.to_string());
                break;
            }
            for (tag, res) in reaped.drain(..) {
                let Some(Some(slot)) = self.slots.get_mut(tag as usize) else {
                    continue;
                };
                slot.waiting -= 1;
                if let Err(e) = res {
                    slot.error.get_or_insert(e);
                }
                if slot.waiting == 0 {
                    finished.push(tag as usize);
                }
            }
            if finished.len() >= min || ring.in_flight() == 0 {
                break;
            }
        }
        self.reaped = reaped;
        self.finish(finished);
    }

    /// Publishes finished requests (one metadata lock for all) and moves
    /// them to `ready`.
    fn finish(&mut self, idx: Vec<usize>) {
        if idx.is_empty() {
            return;
        }
        let id = self.vol.id();
        let mut slots = Vec::with_capacity(idx.len());
        for i in idx {
            if let Some(s) = self.slots.get_mut(i).and_then(Option::take) {
                self.free.push(i);
                self.in_flight -= 1;
                slots.push(s);
            }
        }
        {
            let mut st = self.vol.inner().state.lock();
            for s in &slots {
                plan::publish(&mut st, id, &s.allocs, s.error.is_none());
                st.io_end_no_reclaim(s.token);
            }
            st.reclaim();
        }
        for s in slots {
            self.release_stripes(&s.stripes);
            let result = match s.error {
                None => Ok(()),
                Some(e) => Err(Error::io(format!("volume '{}' data", self.vol.name()), e)),
            };
            self.ready.push_back(Completion {
                tag: s.tag,
                op: s.op,
                result,
            });
        }
    }
}

impl<B: IoBuf> Drop for IoQueue<B> {
    fn drop(&mut self) {
        // Publish what completes, so no new block is left unmapped and
        // unfreed.
        self.wait_for(self.in_flight);
        if self.ring.as_ref().is_some_and(|r| r.in_flight() > 0) {
            // The kernel may still write into the buffers: leak them
            // rather than free memory it uses.
            std::mem::forget(std::mem::take(&mut self.slots));
            if let Some(r) = self.ring.take() {
                std::mem::forget(r);
            }
        }
    }
}
