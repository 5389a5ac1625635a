//! One engine batch of a queue's requests: what does not stream through
//! the I/O queue ([`crate::flow`]): flush, discard, write-zeroes, GET_ID,
//! and reads and writes that need bounce buffers. The chains are parsed,
//! their segments translated (or bounced), planned as engine operations in
//! request order, submitted in waves that never change one 4 KiB block
//! twice, and answered with status bytes and used lengths.

use crate::backend::{Device, Durability, ZERO_BUF};
use crate::guest::{self, HostSeg, Mem, Reader, SegUse};
use crate::guest_fault;
use crate::request::{self, Command, Desc, Parsed, Status, SECTOR};
use std::sync::atomic::Ordering;
use thinlun::dev::AlignedBuf;
use thinlun::{Request, Volume};

/// Runs one drained batch; returns (head, used length) in chain order.
pub(crate) fn run(
    dev: &Device,
    lim: &request::Limits,
    write_through: bool,
    mem: &Mem,
    vol: &Volume,
    chains: &[(u16, Vec<Desc>)],
) -> Vec<(u16, u32)> {
    let cfg = &dev.config;
    let reader = Reader(mem);
    let n = chains.len();
    dev.stats.batches.fetch_add(1, Ordering::Relaxed);

    let mut reqs: Vec<Pending> = chains
        .iter()
        .map(|(head, descs)| Pending::new(*head, request::parse(descs, &reader, lim)))
        .collect();

    // Writes to a read-only device fail before anything is done.
    for p in reqs.iter_mut() {
        if let Some(Ok(c)) = &p.cmd {
            if c.modifies() && cfg.read_only {
                p.fail(Status::IoErr);
            }
        }
    }

    // Translate data segments; requests that cannot be used in place
    // (odd segment lengths, segments crossing regions, overlaps with
    // another segment of the batch) are bounced.
    let mut host: Vec<Vec<HostSeg>> = vec![Vec::new(); n];
    let mut bounce = vec![false; n];
    let mut all: Vec<SegUse> = Vec::new();
    for (i, p) in reqs.iter().enumerate() {
        let (segs, write) = match &p.cmd {
            Some(Ok(Command::Read { segs, .. })) => (segs, true),
            Some(Ok(Command::Write { segs, .. })) => (segs, false),
            _ => continue,
        };
        for s in segs {
            match guest::translate(mem, *s) {
                Some(h) if (s.len as u64).is_multiple_of(SECTOR) => {
                    all.push(SegUse::new(&h, write, i));
                    host[i].push(h);
                }
                _ => {
                    bounce[i] = true;
                    break;
                }
            }
        }
    }
    guest::overlapping_owners(&mut all, &mut bounce);
    for (i, h) in host.iter_mut().enumerate() {
        if bounce[i] {
            h.clear();
        }
    }

    // Plan the engine operations, in request order.
    let mut ops: Vec<Op> = Vec::new();
    let mut modifies = false;
    for (i, p) in reqs.iter_mut().enumerate() {
        let Some(Ok(cmd)) = &p.cmd else { continue };
        let first = ops.len();
        match cmd {
            Command::Read { sector, segs } => {
                if bounce[i] {
                    let len = segs.iter().map(|s| s.len as usize).sum();
                    ops.push(Op::ReadBounce {
                        sector: *sector,
                        buf: AlignedBuf::zeroed(len),
                    });
                } else {
                    let mut at = *sector;
                    for h in &host[i] {
                        ops.push(Op::ReadGuest {
                            sector: at,
                            seg: *h,
                        });
                        at += (h.len as u64) / SECTOR;
                    }
                }
            }
            Command::Write { sector, segs } => {
                modifies = true;
                if bounce[i] {
                    let len = segs.iter().map(|s| s.len as usize).sum();
                    let mut buf = AlignedBuf::zeroed(len);
                    // A contained fault (a truncated memory file)
                    // gathered zeros, not the guest's data.
                    if guest::gather(mem, segs, &mut buf).is_err() || guest_fault::fault_pending() {
                        outside_memory(vol, "write");
                        p.fail(Status::IoErr);
                        continue;
                    }
                    ops.push(Op::WriteBounce {
                        sector: *sector,
                        buf,
                    });
                } else {
                    let mut at = *sector;
                    for h in &host[i] {
                        ops.push(Op::WriteGuest {
                            sector: at,
                            seg: *h,
                        });
                        at += (h.len as u64) / SECTOR;
                    }
                }
            }
            Command::Flush => ops.push(Op::Flush),
            Command::GetId { segs } => {
                match guest::scatter(mem, segs, &dev.serial) {
                    Ok(written) => p.used_data = written as u32,
                    Err(_) => p.fail(Status::IoErr),
                }
                continue;
            }
            Command::Discard { ranges } => {
                modifies = true;
                for r in ranges {
                    ops.push(Op::Discard {
                        sector: r.sector,
                        sectors: r.sectors as u64,
                    });
                }
            }
            Command::WriteZeroes { ranges } => {
                modifies = true;
                for r in ranges {
                    if r.unmap {
                        ops.push(Op::WriteZeroes {
                            sector: r.sector,
                            sectors: r.sectors as u64,
                        });
                    } else {
                        // Keep the range allocated: write real zeros.
                        let mut at = r.sector;
                        let end = r.sector + r.sectors as u64;
                        let step = (ZERO_BUF as u64) / SECTOR;
                        while at < end {
                            let k = step.min(end - at);
                            ops.push(Op::WriteZeroBuf {
                                sector: at,
                                len: (k * SECTOR) as usize,
                            });
                            at += k;
                        }
                    }
                }
            }
        }
        p.ops = first..ops.len();
    }
    // Write-through (WCE off): every write is durable before it
    // completes. Otherwise, by default, completed writes must survive
    // a restart of this server: `persist` journals new mappings after
    // flushing their data (one device flush, and only when mappings
    // changed), short of the full commit a guest FLUSH asks for.
    let write_through = modifies && write_through;
    let persist = modifies && !write_through && dev.durability == Durability::ProcessCrash;
    let commit_at = ops.len();
    if write_through {
        ops.push(Op::Flush);
    }

    // One engine batch for the whole drain (more only when changes
    // share a 4 KiB block, see `waves`).
    let mut results = Vec::with_capacity(ops.len());
    for wave in waves(&ops) {
        let mut batch: Vec<Request<'_>> = ops[wave]
            .iter_mut()
            .map(|op| op.request(&dev.zeroes))
            .collect();
        results.extend(vol.submit(&mut batch));
    }
    let commit_failed = (write_through && results.get(commit_at).is_none_or(|r| r.is_err()))
        || (persist && vol.persist().is_err());

    // Statuses, bounce copies, and the used lengths.
    let mut done = Vec::with_capacity(n);
    for p in reqs.iter_mut() {
        let mut outcome = None;
        if let Some(Ok(cmd)) = &p.cmd {
            let failed = results[p.ops.clone()].iter().find_map(|r| r.as_ref().err());
            if let Some(e) = failed {
                crate::flow::REQUEST_ERRORS.warn(|| format!("'{}': {e}", vol.name()));
                outcome = Some(Err(Status::IoErr));
            } else if commit_failed && cmd.modifies() {
                outcome = Some(Err(Status::IoErr));
            } else if let Command::Read { segs, .. } = cmd {
                let copied = ops[p.ops.clone()].iter().all(|op| match op {
                    Op::ReadBounce { buf, .. } => guest::scatter(mem, segs, buf).is_ok(),
                    Op::ReadGuest { seg, .. } => {
                        guest::mark_written(mem, seg);
                        true
                    }
                    _ => true,
                });
                outcome = Some(if copied {
                    Ok(segs.iter().map(|s| s.len).sum())
                } else {
                    outside_memory(vol, "read");
                    Err(Status::IoErr)
                });
            }
        }
        match outcome {
            Some(Err(s)) => p.fail(s),
            Some(Ok(used)) => p.used_data = used,
            None => {}
        }
        if p.status() != Status::Ok {
            dev.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        done.push((p.head, p.finish(mem)));
    }
    done
}

/// Splits the operations of a drain into consecutive engine batches such
/// that no two changes within one batch touch the same 4 KiB block.
///
/// The engine runs a batch "as if issued concurrently": two partial-block
/// writes of one block in one batch each read-modify-write the old block,
/// and one of them is lost even when their sectors do not overlap (two
/// ranges of one write-zeroes request, or adjacent 512-byte writes). Such
/// batches are rare (Linux keeps 4 KiB-aligned I/O apart), so splitting
/// costs nothing in the common case.
fn waves(ops: &[Op]) -> Vec<std::ops::Range<usize>> {
    use std::collections::BTreeMap;
    let mut out = Vec::new();
    let mut start = 0;
    // Block ranges changed in the current wave: start -> end, disjoint.
    let mut changed: BTreeMap<u64, u64> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        let Some((b0, b1)) = op.changed_blocks() else {
            continue;
        };
        let clash = changed
            .range(..b1)
            .next_back()
            .is_some_and(|(_, &end)| end > b0);
        if clash {
            out.push(start..i);
            start = i;
            changed.clear();
        }
        // Merge with neighbours so the map stays disjoint.
        let mut lo = b0;
        let mut hi = b1;
        if let Some((&s, &e)) = changed.range(..=b0).next_back() {
            if e >= b0 {
                lo = s;
                hi = hi.max(e);
            }
        }
        let inner: Vec<u64> = changed.range(lo..=hi).map(|(&s, _)| s).collect();
        for s in inner {
            if let Some(e) = changed.remove(&s) {
                hi = hi.max(e);
            }
        }
        changed.insert(lo, hi);
    }
    out.push(start..ops.len());
    out
}

/// One virtio request of a batch.
pub(crate) struct Pending {
    head: u16,
    /// `None`: no status byte (nothing can be answered).
    status_addr: Option<u64>,
    /// `None` for chains without a status byte.
    cmd: Option<Result<Command, Status>>,
    /// Bytes written to the guest's data buffers on success.
    used_data: u32,
    /// Engine operations of this request.
    ops: std::ops::Range<usize>,
}

impl Pending {
    pub(crate) fn new(head: u16, parsed: Result<Parsed, request::NoStatus>) -> Pending {
        let (status_addr, cmd) = match parsed {
            Ok(p) => (Some(p.status_addr), Some(p.cmd)),
            Err(request::NoStatus) => (None, None),
        };
        Pending {
            head,
            status_addr,
            cmd,
            used_data: 0,
            ops: 0..0,
        }
    }

    pub(crate) fn fail(&mut self, s: Status) {
        if let Some(c) = &mut self.cmd {
            if c.is_ok() {
                *c = Err(s);
            }
        }
        self.used_data = 0;
    }

    fn status(&self) -> Status {
        match &self.cmd {
            Some(Ok(_)) => Status::Ok,
            Some(Err(s)) => *s,
            None => Status::IoErr,
        }
    }

    /// Writes the status byte; returns the used length.
    pub(crate) fn finish(&self, mem: &Mem) -> u32 {
        match self.status_addr {
            Some(addr) if guest::put_status(mem, addr, self.status() as u8) => self.used_data + 1,
            _ => 0,
        }
    }
}

/// One engine operation, owning its bounce buffer if it has one.
enum Op {
    ReadGuest { sector: u64, seg: HostSeg },
    WriteGuest { sector: u64, seg: HostSeg },
    ReadBounce { sector: u64, buf: AlignedBuf },
    WriteBounce { sector: u64, buf: AlignedBuf },
    WriteZeroBuf { sector: u64, len: usize },
    Discard { sector: u64, sectors: u64 },
    WriteZeroes { sector: u64, sectors: u64 },
    Flush,
}

impl Op {
    /// The 4 KiB blocks an operation changes, as `[start, end)`.
    fn changed_blocks(&self) -> Option<(u64, u64)> {
        let (sector, sectors) = match self {
            Op::WriteGuest { sector, seg } => (*sector, seg.len as u64 / SECTOR),
            Op::WriteBounce { sector, buf } => (*sector, buf.len() as u64 / SECTOR),
            Op::WriteZeroBuf { sector, len } => (*sector, *len as u64 / SECTOR),
            Op::Discard { sector, sectors } | Op::WriteZeroes { sector, sectors } => {
                (*sector, *sectors)
            }
            _ => return None,
        };
        if sectors == 0 {
            return None;
        }
        const PER_BLOCK: u64 = 4096 / SECTOR;
        Some((sector / PER_BLOCK, (sector + sectors).div_ceil(PER_BLOCK)))
    }

    fn request<'a>(&'a mut self, zeroes: &'a [u8]) -> Request<'a> {
        match self {
            Op::ReadGuest { sector, seg } => Request::Read {
                sector: *sector,
                // SAFETY: `seg` was translated by `guest::translate` from a
                // segment inside one mapped region of guest memory. The
                // region stays mapped for the whole batch: the caller holds
                // the memory guard (an `Arc` of the mappings) from
                // translation until after `submit` returns and the slice is
                // dropped. It is not aliased by any other slice of the
                // batch: `guest::overlapping_owners` moved every request
                // whose segments overlap a device-written segment to bounce
                // buffers. The guest gave the buffer to the device until it
                // appears in the used ring (VIRTIO 2.7.13), which happens
                // after this batch; a driver breaking that rule only
                // corrupts its own data, as the bytes are only copied or
                // handed to the kernel, never interpreted.
                buf: unsafe { std::slice::from_raw_parts_mut(seg.ptr, seg.len) },
            },
            Op::WriteGuest { sector, seg } => Request::Write {
                sector: *sector,
                // SAFETY: as for `ReadGuest`; no device-written slice of the
                // batch overlaps this one.
                data: unsafe { std::slice::from_raw_parts(seg.ptr, seg.len) },
            },
            Op::ReadBounce { sector, buf } => Request::Read {
                sector: *sector,
                buf: &mut buf[..],
            },
            Op::WriteBounce { sector, buf } => Request::Write {
                sector: *sector,
                data: &buf[..],
            },
            Op::WriteZeroBuf { sector, len } => Request::Write {
                sector: *sector,
                data: &zeroes[..*len],
            },
            Op::Discard { sector, sectors } => Request::Discard {
                sector: *sector,
                sectors: *sectors,
            },
            Op::WriteZeroes { sector, sectors } => Request::WriteZeroes {
                sector: *sector,
                sectors: *sectors,
            },
            Op::Flush => Request::Flush,
        }
    }
}

/// A request whose buffers are not in the guest memory the front end
/// mapped: the front end's bug (or a race of its memory table against its
/// kicks), answered IOERR and said in the log, a few times at most.
fn outside_memory(vol: &Volume, what: &str) {
    crate::flow::REQUEST_ERRORS.warn(|| {
        format!(
            "'{}': a {what} whose buffers are outside the guest memory the front end mapped; answering IOERR",
            vol.name()
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(sector: u64, sectors: u64) -> Op {
        Op::WriteZeroBuf {
            sector,
            len: (sectors * SECTOR) as usize,
        }
    }

    #[test]
    fn waves_split_only_on_shared_blocks() {
        // Disjoint blocks, reads and flushes: one wave.
        let ops = vec![
            write(0, 8),
            write(8, 16),
            Op::Flush,
            Op::Discard {
                sector: 64,
                sectors: 8,
            },
            write(1024, 8),
        ];
        assert_eq!(waves(&ops), vec![0..5]);
        // Two 512-byte writes in one block: split.
        let ops = vec![write(0, 1), write(1, 3), write(8, 1), write(7, 1)];
        assert_eq!(waves(&ops), vec![0..1, 1..3, 3..4]);
        // Write-zeroes ranges sharing a block with an earlier write.
        let ops = vec![
            write(16, 16),
            write(100, 1),
            Op::WriteZeroes {
                sector: 30,
                sectors: 4,
            },
        ];
        assert_eq!(waves(&ops), vec![0..2, 2..3]);
        // Merged neighbours still detect a clash in the middle.
        let ops = vec![write(0, 8), write(16, 8), write(8, 8), write(12, 1)];
        assert_eq!(waves(&ops), vec![0..3, 3..4]);
        assert_eq!(waves(&[]), vec![0..0]);
    }
}
