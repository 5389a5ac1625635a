//! The data path: reads, writes, discards and write-zeroes of a volume at
//! 512-byte sector addressing, processed in batches (one virtqueue's worth
//! of requests at a time) with one metadata lock round-trip before and one
//! after a single device batch.
//!
//! A batch runs in four steps:
//! 1. lock the stripes of every range it modifies, so overlapping writes
//!    (and read-modify-write of partial blocks) never interleave;
//! 2. turn requests into block-aligned operations on aligned buffers
//!    (guest buffers are used in place when already aligned);
//! 3. under the metadata lock, resolve reads, choose in-place targets for
//!    overwrites, allocate blocks for first writes, apply discards;
//! 4. run all device I/O as one batch, then publish the new mappings.

use crate::dev::{AlignedBuf, IoOp};
use crate::error::{Error, Result};
use crate::format::catalog::flags;
use crate::format::journal::Entry;
use crate::format::{BLOCK_SIZE, SECTORS_PER_BLOCK, SECTOR_SIZE};
use crate::map::extmap::Segment;
use crate::pool::io::plan::{self, Alloc, Piece, Scratch};
use crate::pool::{Inner, STRIPES};
use parking_lot::MutexGuard;
use std::sync::Arc;

const BS: u64 = BLOCK_SIZE as u64;
/// Blocks per stripe-lock region.
const STRIPE_SHIFT: u32 = 4;

/// One request of a batch. Sectors are 512 bytes; buffers may have any
/// length that is a multiple of 512 and any alignment.
pub enum Request<'a> {
    /// Fills `buf`; unmapped ranges read as zeros (or as a clone's origin).
    Read {
        /// First sector.
        sector: u64,
        /// Its length is the read's length.
        buf: &'a mut [u8],
    },
    /// Writes `data`, copying shared blocks first (copy-on-write).
    Write {
        /// First sector.
        sector: u64,
        /// Its length is the write's length.
        data: &'a [u8],
    },
    /// Hint that the range is unused; whole 4 KiB blocks are unmapped.
    Discard {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
    /// The range reads as zeros afterwards; whole blocks are unmapped.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
    /// Makes every request completed before this batch durable.
    Flush,
}

/// An open volume. Dropping it closes it.
pub struct Volume {
    inner: Arc<Inner>,
    id: u64,
    name: String,
}

impl Drop for Volume {
    fn drop(&mut self) {
        let last = match self.inner.state.lock().volumes.get_mut(&self.id) {
            Some(v) => {
                v.handles = v.handles.saturating_sub(1);
                v.handles == 0
            }
            None => false,
        };
        if last && self.inner.shared.is_some() {
            // On a shared pool the last close releases the activation so
            // another host may take the volume (live migration).
            if let Err(e) = self.inner.deactivate(self.id) {
                log::warn!(
                    "volume '{}' stays active on this host: releasing it failed: {e}",
                    self.name
                );
            }
        }
    }
}

enum Src<'r> {
    User(&'r [u8]),
    Own(AlignedBuf),
}

enum Dst<'r> {
    User(&'r mut [u8]),
    /// Bounce buffer, the caller's buffer, and where in the bounce its data starts.
    Own(AlignedBuf, &'r mut [u8], usize),
}

struct WriteOp<'r> {
    req: usize,
    b0: u64,
    n: u64,
    src: Src<'r>,
    /// Applied to an own buffer after the old contents of its partial
    /// blocks were read into it.
    overlay: Overlay<'r>,
}

enum Overlay<'r> {
    None,
    /// The caller's bytes, at this offset of the buffer.
    Data(&'r [u8], usize),
    /// Zeros over this byte range of the buffer.
    Zero(usize, usize),
}

struct ReadOp<'r> {
    req: usize,
    b0: u64,
    n: u64,
    dst: Dst<'r>,
}

struct TrimOp {
    req: usize,
    b0: u64,
    n: u64,
}

impl Volume {
    pub(crate) fn new(inner: Arc<Inner>, id: u64, name: &str) -> Volume {
        Volume {
            inner,
            id,
            name: name.to_string(),
        }
    }

    /// The name it was opened by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its current size (0 if it was removed meanwhile).
    pub fn size_bytes(&self) -> u64 {
        self.inner
            .state
            .lock()
            .volumes
            .get(&self.id)
            .map_or(0, |v| v.rec.size_bytes)
    }

    /// Reads `buf.len()` bytes at `sector` ([`Request::Read`]).
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.one(Request::Read { sector, buf })
    }

    /// Writes `data` at `sector` ([`Request::Write`]); durable after a flush.
    pub fn write(&self, sector: u64, data: &[u8]) -> Result<()> {
        self.one(Request::Write { sector, data })
    }

    /// Unmaps the whole blocks of the range ([`Request::Discard`]).
    pub fn discard(&self, sector: u64, sectors: u64) -> Result<()> {
        self.one(Request::Discard { sector, sectors })
    }

    /// Makes the range read as zeros ([`Request::WriteZeroes`]).
    pub fn write_zeroes(&self, sector: u64, sectors: u64) -> Result<()> {
        self.one(Request::WriteZeroes { sector, sectors })
    }

    /// Makes every write completed before this call durable: this
    /// volume's and the rest of the pool's, as [`crate::Pool::flush`].
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Makes every completed write survive a crash of this process (a
    /// server restarted under a reconnecting VM, on the same boot), though
    /// not a power loss: that needs [`Volume::flush`]. One journal-block
    /// write, no device flush, when mappings changed; nothing for
    /// overwrites in place (docs/FORMAT.md, 6.5).
    pub fn persist(&self) -> Result<()> {
        self.inner.persist()
    }

    /// What the bytes `offset..offset+len` hold, as runs of (length,
    /// stored) in order: `stored` is false where the volume reads as zeros
    /// without storage (never written, discarded or zeroed). For exports
    /// that report holes (NBD's `base:allocation`); runs are clipped to the
    /// range, and the range to the volume's end.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let bs = BLOCK_SIZE as u64;
        let st = self.inner.state.lock();
        let v = st
            .volumes
            .get(&self.id)
            .ok_or_else(|| Error::NoSuchVolume(self.name.clone()))?;
        let end = offset.saturating_add(len).min(v.rec.size_bytes);
        if offset >= end {
            return Ok(Vec::new());
        }
        let (b0, b1) = (offset / bs, end.div_ceil(bs));
        let mut segs = Vec::new();
        v.map.lookup(b0, b1 - b0, &mut segs);
        // A damaged range is reported as data, never as a hole a client
        // could skip and take for zeros: reading it gives the error.
        let damage: Vec<(u64, u64)> = v.damage.iter().map(|d| (d.lo, d.hi)).collect();
        drop(st);
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        for seg in &segs {
            let (vb, n, stored) = match *seg {
                Segment::Mapped { vblock, len, .. } => (vblock, len, true),
                Segment::Hole { vblock, len } | Segment::Zero { vblock, len } => {
                    (vblock, len, false)
                }
            };
            if stored || damage.is_empty() {
                pieces.push((vb, n, stored));
                continue;
            }
            // Split the hole at the damaged ranges' edges.
            let mut at = vb;
            while at < vb + n {
                let inside = damage.iter().find(|d| d.0 <= at && at < d.1);
                let stop = match inside {
                    Some(d) => d.1.min(vb + n),
                    None => damage
                        .iter()
                        .filter(|d| d.0 > at)
                        .map(|d| d.0)
                        .min()
                        .map_or(vb + n, |x| x.min(vb + n)),
                };
                pieces.push((at, stop - at, inside.is_some()));
                at = stop;
            }
        }
        let mut out: Vec<(u64, bool)> = Vec::new();
        for &(vb, n, stored) in &pieces {
            let lo = (vb * bs).max(offset);
            let hi = ((vb + n) * bs).min(end);
            if hi <= lo {
                continue;
            }
            match out.last_mut() {
                Some((l, s)) if *s == stored => *l += hi - lo,
                _ => out.push((hi - lo, stored)),
            }
        }
        Ok(out)
    }

    fn one(&self, r: Request<'_>) -> Result<()> {
        let mut reqs = [r];
        self.submit(&mut reqs).pop().unwrap_or(Ok(()))
    }

    /// Runs a batch of requests as if issued concurrently; returns one
    /// result per request, in order.
    ///
    /// Writes that need new blocks when the pool is full fail with
    /// [`Error::NoSpace`], after space freed but not yet committed has been
    /// made reusable, and, under the pool's `queue` policy, after waiting
    /// for space up to the policy's timeout.
    pub fn submit(&self, reqs: &mut [Request<'_>]) -> Vec<Result<()>> {
        let mut results = self.submit_in_waves(reqs);
        let since = std::time::Instant::now();
        let mut committed_frees = false;
        loop {
            let retry: Vec<usize> = (0..reqs.len())
                .filter(|&i| matches!(results[i], Err(Error::NoSpace)))
                .collect();
            if retry.is_empty() {
                return results;
            }
            let needed: u64 = retry
                .iter()
                .map(|&i| match &reqs[i] {
                    Request::Write { data, .. } => (data.len() as u64).div_ceil(BS),
                    _ => 1,
                })
                .sum();
            let pending = self.inner.state.lock().pending_free_blocks() > 0;
            if pending && !committed_frees {
                committed_frees = true;
                if self.inner.flush().is_err() {
                    return results;
                }
            } else if self.inner.claim_more_space() {
                // A shared pool's host claimed another allocation group.
            } else if !self.inner.wait_for_space(needed, since) {
                return results;
            }
            let mut again: Vec<Request<'_>> = retry
                .iter()
                .filter_map(|&i| match &reqs[i] {
                    Request::Write { sector, data } => Some(Request::Write {
                        sector: *sector,
                        data,
                    }),
                    Request::WriteZeroes { sector, sectors } => Some(Request::WriteZeroes {
                        sector: *sector,
                        sectors: *sectors,
                    }),
                    _ => None,
                })
                .collect();
            if again.len() != retry.len() {
                return results;
            }
            for (k, r) in self.submit_in_waves(&mut again).into_iter().enumerate() {
                results[retry[k]] = r;
            }
        }
    }

    /// Requests of one batch that modify the same 4 KiB block would each
    /// read-modify-write it from the same old contents, and all but one
    /// change would be lost: such requests run in successive waves, in
    /// batch order. Everything else stays one batch.
    fn submit_in_waves(&self, reqs: &mut [Request<'_>]) -> Vec<Result<()>> {
        let ranges: Vec<Option<(u64, u64)>> = reqs
            .iter()
            .map(|r| match r {
                Request::Write { sector, data } if !data.is_empty() => {
                    Some(Self::block_range(*sector, data.len() as u64 / SECTOR_SIZE))
                }
                Request::Discard { sector, sectors } | Request::WriteZeroes { sector, sectors }
                    if *sectors > 0 =>
                {
                    Some(Self::block_range(*sector, *sectors))
                }
                _ => None,
            })
            .collect();
        // Common case first: no two modifying requests share a block
        // (sorted by start, neighbours do not overlap): one batch.
        let mut sorted: Vec<(u64, u64)> = ranges.iter().flatten().copied().collect();
        sorted.sort_unstable();
        if sorted.windows(2).all(|w| w[0].1 <= w[1].0) {
            return self.submit_once(reqs);
        }
        let mut wave = vec![0usize; reqs.len()];
        let mut any = false;
        for i in 0..reqs.len() {
            let Some((a0, a1)) = ranges[i] else { continue };
            for j in 0..i {
                if let Some((b0, b1)) = ranges[j] {
                    if a0 < b1 && b0 < a1 && wave[i] <= wave[j] {
                        wave[i] = wave[j] + 1;
                        any = true;
                    }
                }
            }
        }
        if !any {
            return self.submit_once(reqs);
        }
        // Flushes cover everything before them: they go last.
        let last = wave.iter().copied().max().unwrap_or(0);
        for (i, r) in reqs.iter().enumerate() {
            if matches!(r, Request::Flush) {
                wave[i] = last;
            }
        }
        let mut results: Vec<Result<()>> = reqs.iter().map(|_| Ok(())).collect();
        for w in 0..=last {
            let idx: Vec<usize> = (0..reqs.len()).filter(|&i| wave[i] == w).collect();
            // Move this wave's requests out (a placeholder stays behind)
            // and back afterwards.
            let mut batch: Vec<Request<'_>> = idx
                .iter()
                .map(|&i| std::mem::replace(&mut reqs[i], Request::Flush))
                .collect();
            let rs = self.submit_once(&mut batch);
            for ((&i, r), req) in idx.iter().zip(rs).zip(batch) {
                results[i] = r;
                reqs[i] = req;
            }
        }
        results
    }

    fn submit_once(&self, reqs: &mut [Request<'_>]) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = reqs.iter().map(|_| Ok(())).collect();
        let (size, read_only) = match self.size_and_read_only() {
            Ok(v) => v,
            Err(_) => {
                return reqs
                    .iter()
                    .map(|_| Err(Error::NoSuchVolume(self.name.clone())))
                    .collect()
            }
        };
        let mut any_flush = false;
        for (i, r) in reqs.iter().enumerate() {
            results[i] = self.validate(r, size, read_only);
            any_flush |= matches!(r, Request::Flush);
        }
        let _stripes = self.lock_stripes(reqs, &results);
        let (mut reads, mut writes, trims) = match self.normalize(reqs, &mut results) {
            Ok(ops) => ops,
            Err(e) => {
                let msg = e.to_string();
                return results
                    .into_iter()
                    .map(|r| {
                        r.and(Err(Error::io(
                            "read-modify-write",
                            std::io::Error::other(msg.clone()),
                        )))
                    })
                    .collect();
            }
        };
        self.execute(&mut reads, &mut writes, &trims, &mut results);
        for op in reads {
            if let Dst::Own(bounce, user, off) = op.dst {
                if results[op.req].is_ok() {
                    user.copy_from_slice(&bounce[off..off + user.len()]);
                }
            }
        }
        if any_flush {
            let r = self.inner.flush();
            for (i, req) in reqs.iter().enumerate() {
                if matches!(req, Request::Flush) {
                    results[i] = match &r {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Error::io("flush", std::io::Error::other(e.to_string()))),
                    };
                }
            }
        }
        results
    }

    pub(crate) fn validate(&self, r: &Request<'_>, size: u64, read_only: bool) -> Result<()> {
        let (sector, bytes, modifies) = match r {
            Request::Read { sector, buf } => (*sector, buf.len() as u64, false),
            Request::Write { sector, data } => (*sector, data.len() as u64, true),
            Request::Discard { sector, sectors } | Request::WriteZeroes { sector, sectors } => {
                (*sector, sectors.saturating_mul(SECTOR_SIZE), true)
            }
            Request::Flush => return Ok(()),
        };
        if bytes % SECTOR_SIZE != 0 {
            return Err(Error::InvalidArgument(format!(
                "I/O length {bytes} is not a multiple of {SECTOR_SIZE} bytes"
            )));
        }
        let end = sector.saturating_mul(SECTOR_SIZE).saturating_add(bytes);
        if end > size || sector > size / SECTOR_SIZE {
            return Err(Error::OutOfRange {
                volume: self.name.clone(),
                size,
                end,
            });
        }
        if modifies {
            self.inner.writable()?;
            if read_only {
                return Err(Error::ReadOnly(self.name.clone()));
            }
        }
        if self
            .inner
            .damaged
            .load(std::sync::atomic::Ordering::Relaxed)
            && bytes > 0
        {
            self.check_damage(sector, bytes / SECTOR_SIZE, modifies)?;
        }
        Ok(())
    }

    /// Refuses a read of a range a damaged subtree covers, and any change
    /// of a damaged volume (its tree on disk must stay as it is).
    fn check_damage(&self, sector: u64, sectors: u64, modifies: bool) -> Result<()> {
        let st = self.inner.state.lock();
        let Some(v) = st.volumes.get(&self.id) else {
            return Ok(());
        };
        if v.damage.is_empty() {
            return Ok(());
        }
        if modifies {
            return Err(crate::map::state::damaged_error(&st, v, "write"));
        }
        let (b0, b1) = Self::block_range(sector, sectors);
        match v.damage_in(b0, b1) {
            Some(d) => Err(Error::Damaged {
                volume: st.display_name(v),
                what: format!(
                    "read of sectors {sector}..{} refused: the mapping of blocks {}..{} is unreadable ({})",
                    sector + sectors,
                    d.lo,
                    d.hi.min(v.rec.size_bytes / BS),
                    d.why
                ),
            }),
            None => Ok(()),
        }
    }

    fn block_range(sector: u64, sectors: u64) -> (u64, u64) {
        let b0 = sector / SECTORS_PER_BLOCK;
        let b1 = (sector + sectors).div_ceil(SECTORS_PER_BLOCK);
        (b0, b1)
    }

    fn lock_stripes(
        &self,
        reqs: &[Request<'_>],
        results: &[Result<()>],
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = Vec::new();
        for (r, ok) in reqs.iter().zip(results) {
            if ok.is_err() {
                continue;
            }
            let (sector, sectors) = match r {
                Request::Write { sector, data } => (*sector, data.len() as u64 / SECTOR_SIZE),
                Request::Discard { sector, sectors } | Request::WriteZeroes { sector, sectors } => {
                    (*sector, *sectors)
                }
                _ => continue,
            };
            if sectors == 0 {
                continue;
            }
            let (b0, b1) = Self::block_range(sector, sectors);
            idx.extend(self.stripes_of(b0, b1));
        }
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.inner.stripes[i].lock())
            .collect()
    }

    /// The stripe locks covering blocks `b0..b1` (non-empty), in order.
    pub(crate) fn stripes_of(&self, b0: u64, b1: u64) -> Vec<usize> {
        let (r0, r1) = (b0 >> STRIPE_SHIFT, (b1 - 1) >> STRIPE_SHIFT);
        if r1 - r0 >= STRIPES as u64 {
            return (0..STRIPES).collect();
        }
        let mut idx: Vec<usize> = (r0..=r1)
            .map(|region| ((region ^ self.id.rotate_left(17)) % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx
    }

    pub(crate) fn stripe(&self, i: usize) -> &Arc<parking_lot::Mutex<()>> {
        &self.inner.stripes[i]
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// The volume's size and whether it is read-only.
    pub(crate) fn size_and_read_only(&self) -> Result<(u64, bool)> {
        let st = self.inner.state.lock();
        match st.volumes.get(&self.id) {
            Some(v) => Ok((v.rec.size_bytes, v.rec.flags & flags::READ_ONLY != 0)),
            None => Err(Error::NoSuchVolume(self.name.clone())),
        }
    }

    /// Another handle on the same open volume.
    pub(crate) fn another_handle(&self) -> Result<Volume> {
        let mut st = self.inner.state.lock();
        let v = st
            .volumes
            .get_mut(&self.id)
            .ok_or_else(|| Error::NoSuchVolume(self.name.clone()))?;
        v.handles += 1;
        Ok(Volume::new(self.inner.clone(), self.id, &self.name))
    }

    /// Turns requests into block-aligned operations on aligned buffers,
    /// reading the old contents of partially written blocks.
    #[allow(clippy::type_complexity)]
    fn normalize<'r>(
        &self,
        reqs: &'r mut [Request<'_>],
        results: &mut [Result<()>],
    ) -> Result<(Vec<ReadOp<'r>>, Vec<WriteOp<'r>>, Vec<TrimOp>)> {
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        let mut trims = Vec::new();
        // Blocks whose old contents a partial write needs: (write index, block, offset in its buffer).
        let mut rmw: Vec<(usize, u64, usize)> = Vec::new();
        for (i, r) in reqs.iter_mut().enumerate() {
            if results[i].is_err() {
                continue;
            }
            match r {
                Request::Read { sector, buf } => {
                    if buf.is_empty() {
                        continue;
                    }
                    let (b0, b1) = Self::block_range(*sector, buf.len() as u64 / SECTOR_SIZE);
                    let off = ((*sector % SECTORS_PER_BLOCK) * SECTOR_SIZE) as usize;
                    let aligned = off == 0
                        && buf.len() % BLOCK_SIZE == 0
                        && (buf.as_ptr() as usize).is_multiple_of(BLOCK_SIZE);
                    let dst = if aligned {
                        Dst::User(buf)
                    } else {
                        Dst::Own(AlignedBuf::zeroed(((b1 - b0) * BS) as usize), buf, off)
                    };
                    reads.push(ReadOp {
                        req: i,
                        b0,
                        n: b1 - b0,
                        dst,
                    });
                }
                Request::Write { sector, data } => {
                    if data.is_empty() {
                        continue;
                    }
                    let (b0, b1) = Self::block_range(*sector, data.len() as u64 / SECTOR_SIZE);
                    let off = ((*sector % SECTORS_PER_BLOCK) * SECTOR_SIZE) as usize;
                    let tail_partial = !(off + data.len()).is_multiple_of(BLOCK_SIZE);
                    let aligned = off == 0
                        && !tail_partial
                        && (data.as_ptr() as usize).is_multiple_of(BLOCK_SIZE);
                    let (src, overlay) = if aligned {
                        (Src::User(data), Overlay::None)
                    } else {
                        let w = writes.len();
                        if off != 0 {
                            rmw.push((w, b0, 0));
                        }
                        if tail_partial && (b1 - 1 != b0 || off == 0) {
                            rmw.push((w, b1 - 1, ((b1 - 1 - b0) * BS) as usize));
                        }
                        let b = AlignedBuf::zeroed(((b1 - b0) * BS) as usize);
                        (Src::Own(b), Overlay::Data(data, off))
                    };
                    writes.push(WriteOp {
                        req: i,
                        b0,
                        n: b1 - b0,
                        src,
                        overlay,
                    });
                }
                Request::Discard { .. } | Request::WriteZeroes { .. } => {
                    let (zero, sector, sectors) = match *r {
                        Request::WriteZeroes { sector, sectors } => (true, sector, sectors),
                        Request::Discard { sector, sectors } => (false, sector, sectors),
                        _ => continue,
                    };
                    if sectors == 0 {
                        continue;
                    }
                    let full0 = sector.div_ceil(SECTORS_PER_BLOCK);
                    let full1 = (sector + sectors) / SECTORS_PER_BLOCK;
                    if full1 > full0 {
                        trims.push(TrimOp {
                            req: i,
                            b0: full0,
                            n: full1 - full0,
                        });
                    }
                    if !zero {
                        continue; // partial blocks of a discard are left alone
                    }
                    // Partial blocks at either end are written with zeros.
                    let (b0, b1) = Self::block_range(sector, sectors);
                    let mut partial = Vec::new();
                    if sector % SECTORS_PER_BLOCK != 0 {
                        partial.push(b0);
                    }
                    if (sector + sectors) % SECTORS_PER_BLOCK != 0
                        && (b1 - 1 != b0 || partial.is_empty())
                    {
                        partial.push(b1 - 1);
                    }
                    for b in partial {
                        let lo = (sector.max(b * SECTORS_PER_BLOCK) - b * SECTORS_PER_BLOCK)
                            * SECTOR_SIZE;
                        let hi = ((sector + sectors).min((b + 1) * SECTORS_PER_BLOCK)
                            - b * SECTORS_PER_BLOCK)
                            * SECTOR_SIZE;
                        rmw.push((writes.len(), b, 0));
                        writes.push(WriteOp {
                            req: i,
                            b0: b,
                            n: 1,
                            src: Src::Own(AlignedBuf::zeroed(BLOCK_SIZE)),
                            overlay: Overlay::Zero(lo as usize, hi as usize),
                        });
                    }
                }
                Request::Flush => {}
            }
        }
        if !rmw.is_empty() {
            self.fill_old_contents(&mut writes, &rmw)?;
        }
        for w in &mut writes {
            if let Src::Own(buf) = &mut w.src {
                match std::mem::replace(&mut w.overlay, Overlay::None) {
                    Overlay::None => {}
                    Overlay::Data(d, off) => buf[off..off + d.len()].copy_from_slice(d),
                    Overlay::Zero(lo, hi) => buf[lo..hi].fill(0),
                }
            }
        }
        Ok((reads, writes, trims))
    }

    /// Reads the current contents of partially written blocks into the
    /// write buffers, keeping the bytes the write itself brings.
    fn fill_old_contents(
        &self,
        writes: &mut [WriteOp<'_>],
        rmw: &[(usize, u64, usize)],
    ) -> Result<()> {
        let mut old: Vec<AlignedBuf> = rmw.iter().map(|_| AlignedBuf::zeroed(BLOCK_SIZE)).collect();
        let mut places = Vec::with_capacity(rmw.len());
        let token;
        {
            let mut st = self.inner.state.lock();
            let vol = st
                .volumes
                .get(&self.id)
                .ok_or_else(|| Error::NoSuchVolume(self.name.clone()))?;
            let mut segs = Vec::new();
            for &(_, b, _) in rmw {
                vol.map.lookup(b, 1, &mut segs);
                places.push(match segs.first() {
                    Some(Segment::Mapped { pblock, .. }) => Some(*pblock),
                    _ => None,
                });
            }
            token = st.io_begin();
        }
        let mut ops: Vec<IoOp> = old
            .iter_mut()
            .zip(&places)
            .filter_map(|(buf, p)| {
                p.map(|p| IoOp::Read {
                    offset: p * BS,
                    buf: &mut buf[..],
                })
            })
            .collect();
        let r = self
            .inner
            .dev
            .submit(&mut ops)
            .map_err(|e| Error::io("reading for a partial write", e));
        drop(ops);
        self.inner.state.lock().io_end(token);
        r?;
        for (k, &(w, _, at)) in rmw.iter().enumerate() {
            if let Src::Own(buf) = &mut writes[w].src {
                buf[at..at + BLOCK_SIZE].copy_from_slice(&old[k]);
            }
        }
        Ok(())
    }

    /// Plans every operation under one metadata lock, runs the device I/O
    /// as one batch, then publishes new mappings under a second lock.
    fn execute(
        &self,
        reads: &mut [ReadOp<'_>],
        writes: &mut [WriteOp<'_>],
        trims: &[TrimOp],
        results: &mut [Result<()>],
    ) {
        let mut read_plans: Vec<Vec<Piece>> = Vec::with_capacity(reads.len());
        let mut write_plans: Vec<Vec<Piece>> = Vec::with_capacity(writes.len());
        let mut allocs: Vec<Alloc> = Vec::new();
        let token;
        {
            let mut guard = self.inner.state.lock();
            let st = &mut *guard;
            let reserve = st.metadata_reserve();
            let Some(vol) = st.volumes.get_mut(&self.id) else {
                for r in results.iter_mut() {
                    *r = Err(Error::NoSuchVolume(self.name.clone()));
                }
                return;
            };
            let mut sc = Scratch::default();
            for r in reads.iter() {
                let mut plan = Vec::new();
                plan::plan_read(vol, r.b0, r.n, &mut sc, &mut plan);
                read_plans.push(plan);
            }
            for w in writes.iter() {
                let mut plan = Vec::new();
                if results[w.req].is_ok()
                    && !plan::plan_write(
                        vol,
                        &st.refs,
                        &mut st.space,
                        reserve,
                        w.b0,
                        w.n,
                        &mut sc,
                        &mut plan,
                        &mut allocs,
                    )
                {
                    results[w.req] = Err(Error::NoSpace);
                }
                write_plans.push(plan);
            }
            let mut ch = crate::map::extmap::RefChanges::default();
            let mut entries = Vec::new();
            for t in trims {
                if results[t.req].is_err() {
                    continue;
                }
                vol.map.unmap(t.b0, t.n, &mut ch);
                let mut at = t.b0;
                while at < t.b0 + t.n {
                    let n = (t.b0 + t.n - at).min(u32::MAX as u64);
                    entries.push(Entry::Unmap {
                        volume: self.id,
                        vblock: at,
                        len: n as u32,
                    });
                    at += n;
                }
            }
            st.apply_changes(&ch);
            st.queue_entries(&entries);
            token = st.io_begin();
        }

        let mut ops: Vec<IoOp> = Vec::new();
        let mut has_io = vec![false; results.len()];
        for (r, plan) in reads.iter_mut().zip(&read_plans) {
            let mut rest: &mut [u8] = match &mut r.dst {
                Dst::User(b) => b,
                Dst::Own(b, _, _) => &mut b[..],
            };
            for piece in plan {
                let (this, tail) = std::mem::take(&mut rest).split_at_mut((piece.n * BS) as usize);
                rest = tail;
                match piece.pblock {
                    Some(p) => {
                        has_io[r.req] = true;
                        ops.push(IoOp::Read {
                            offset: p * BS,
                            buf: this,
                        });
                    }
                    None => this.fill(0),
                }
            }
        }
        for (w, plan) in writes.iter().zip(&write_plans) {
            let mut rest: &[u8] = match &w.src {
                Src::User(d) => d,
                Src::Own(b) => &b[..],
            };
            for piece in plan {
                let (this, tail) = rest.split_at((piece.n * BS) as usize);
                rest = tail;
                if let Some(p) = piece.pblock {
                    has_io[w.req] = true;
                    ops.push(IoOp::Write {
                        offset: p * BS,
                        buf: this,
                    });
                }
            }
        }
        let io = self.inner.dev.submit(&mut ops);
        drop(ops);
        if let Err(e) = &io {
            for (i, r) in results.iter_mut().enumerate() {
                if has_io[i] && r.is_ok() {
                    *r = Err(Error::io(
                        format!("volume '{}' data", self.name),
                        std::io::Error::new(e.kind(), e.to_string()),
                    ));
                }
            }
        }

        let mut st = self.inner.state.lock();
        plan::publish(&mut st, self.id, &allocs, io.is_ok());
        st.io_end(token);
    }
}
