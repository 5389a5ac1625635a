//! Guest memory for the data path: request bytes the parser reads, status
//! bytes, bounce copies, and the translation of data segments to host
//! slices that the engine uses in place.

use crate::request::{BadAddress, GuestRead, Segment};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Guest memory with the dirty log of a live migration: the crate's
/// bitmap fills in once the front end sends SET_LOG_BASE. Copies through
/// `Bytes` (status bytes, bounce copies, used-ring entries) mark the pages
/// they write; data the kernel reads into guest memory in place is marked
/// with [`mark_written`] once it has landed.
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;

/// The parser's view of guest memory: volatile copies, bounds-checked.
pub struct Reader<'a>(pub &'a Mem);

impl GuestRead for Reader<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), BadAddress> {
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| BadAddress)
    }
}

/// A data segment translated to host memory: a pointer into one mapped
/// region, valid for `len` bytes.
#[derive(Clone, Copy, Debug)]
pub struct HostSeg {
    pub ptr: *mut u8,
    pub len: usize,
    /// Where it is in guest memory, for the dirty log.
    pub guest: u64,
}

/// Translates a segment to host memory when it lies inside one region;
/// `None` when it crosses regions or is not mapped (the caller then
/// bounces it through the checked copy functions below).
pub fn translate(mem: &Mem, seg: Segment) -> Option<HostSeg> {
    if seg.len == 0 {
        return None;
    }
    let slice = mem
        .get_slice(GuestAddress(seg.addr), seg.len as usize)
        .ok()?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    Some(HostSeg {
        ptr,
        len: seg.len as usize,
        guest: seg.addr,
    })
}

/// Marks a segment the device wrote in place (a read's data, after the
/// I/O completed) in the dirty log. Marking earlier would let the front
/// end copy the page and clear its bit before the data lands. Costs a
/// lookup and an empty check while no log is set.
pub fn mark_written(mem: &Mem, seg: &HostSeg) {
    let addr = GuestAddress(seg.guest);
    if let Some(region) = mem.find_region(addr) {
        let offset = addr.unchecked_offset_from(region.start_addr()) as usize;
        region.bitmap().mark_dirty(offset, seg.len);
    }
}

/// Copies the concatenated segments out of guest memory.
pub fn gather(mem: &Mem, segs: &[Segment], out: &mut [u8]) -> Result<(), BadAddress> {
    let mut at = 0usize;
    for s in segs {
        let n = s.len as usize;
        let dst = out.get_mut(at..at + n).ok_or(BadAddress)?;
        mem.read_slice(dst, GuestAddress(s.addr))
            .map_err(|_| BadAddress)?;
        at += n;
    }
    Ok(())
}

/// Copies `data` into the segments, in order, as far as they reach.
/// Returns how many bytes were written.
pub fn scatter(mem: &Mem, segs: &[Segment], data: &[u8]) -> Result<usize, BadAddress> {
    let mut at = 0usize;
    for s in segs {
        if at >= data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], GuestAddress(s.addr))
            .map_err(|_| BadAddress)?;
        at += n;
    }
    Ok(at)
}

/// Writes the status byte; false if it is not in guest memory.
pub fn put_status(mem: &Mem, addr: u64, status: u8) -> bool {
    mem.write_slice(&[status], GuestAddress(addr)).is_ok()
}

/// A data segment of a batch in host memory, for the overlap check.
#[derive(Clone, Copy, Debug)]
pub struct SegUse {
    /// Host address of its first byte.
    pub start: usize,
    pub len: usize,
    /// The device writes it (a read's buffer).
    pub device_writes: bool,
    /// Index of the request it belongs to.
    pub owner: usize,
}

impl SegUse {
    pub fn new(seg: &HostSeg, device_writes: bool, owner: usize) -> SegUse {
        SegUse {
            start: seg.ptr as usize,
            len: seg.len,
            device_writes,
            owner,
        }
    }
}

/// Marks which owners have a segment overlapping another segment of the
/// batch where at least one of the two is written by the device. Such
/// requests are served through bounce buffers, so the batch never holds a
/// `&mut [u8]` aliasing another slice.
pub fn overlapping_owners(segs: &mut [SegUse], flagged: &mut [bool]) {
    segs.sort_unstable_by_key(|s| s.start);
    // Sweep keeping the furthest-reaching earlier segment of each kind.
    let mut reach_any: Option<(usize, usize)> = None; // (end, owner)
    let mut reach_w: Option<(usize, usize)> = None;
    for &SegUse {
        start,
        len,
        device_writes: write,
        owner,
    } in segs.iter()
    {
        let end = start.saturating_add(len);
        if let Some((e, o)) = reach_w {
            if e > start {
                flagged[owner] = true;
                flagged[o] = true;
            }
        }
        if write {
            if let Some((e, o)) = reach_any {
                if e > start {
                    flagged[owner] = true;
                    flagged[o] = true;
                }
            }
        }
        if reach_any.is_none_or(|(e, _)| end > e) {
            reach_any = Some((end, owner));
        }
        if write && reach_w.is_none_or(|(e, _)| end > e) {
            reach_w = Some((end, owner));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: usize, len: usize, device_writes: bool, owner: usize) -> SegUse {
        SegUse {
            start,
            len,
            device_writes,
            owner,
        }
    }

    #[test]
    fn overlaps_flag_writers_only() {
        let mut flagged = vec![false; 5];
        let mut segs = vec![
            seg(0, 100, false, 0),
            seg(50, 100, false, 1), // read/read overlap: fine
            seg(1000, 10, true, 2),
            seg(1005, 10, false, 3), // device-written overlaps device-read
            seg(2000, 10, true, 4),
        ];
        overlapping_owners(&mut segs, &mut flagged);
        assert_eq!(flagged, vec![false, false, true, true, false]);

        let mut flagged = vec![false; 3];
        let mut segs = vec![
            seg(0, 1000, true, 0),
            seg(10, 10, false, 1),
            seg(990, 20, false, 2),
        ];
        overlapping_owners(&mut segs, &mut flagged);
        assert_eq!(flagged, vec![true, true, true]);

        // A long read segment covering a later written one.
        let mut flagged = vec![false; 3];
        let mut segs = vec![
            seg(0, 1000, false, 0),
            seg(10, 10, false, 1),
            seg(500, 20, true, 2),
        ];
        overlapping_owners(&mut segs, &mut flagged);
        assert_eq!(flagged, vec![true, false, true]);
    }

    #[test]
    fn copies_and_translation() {
        let mem = Mem::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .unwrap();
        let segs = [
            Segment {
                addr: 0x1ff0,
                len: 0x20,
            },
            Segment {
                addr: 0x1000,
                len: 4,
            },
        ];
        let data: Vec<u8> = (0..0x24).collect();
        assert_eq!(scatter(&mem, &segs, &data), Ok(0x24));
        let mut back = vec![0u8; 0x24];
        gather(&mem, &segs, &mut back).unwrap();
        assert_eq!(back, data);
        // Crosses the region boundary: not translatable in place.
        assert!(translate(&mem, segs[0]).is_none());
        assert!(translate(&mem, segs[1]).is_some());
        assert!(translate(
            &mem,
            Segment {
                addr: 0x9000,
                len: 1
            }
        )
        .is_none());
        assert!(put_status(&mem, 0x1000, 2));
        assert!(!put_status(&mem, 0x9000, 2));
        assert!(gather(
            &mem,
            &[Segment {
                addr: 0x2ff0,
                len: 0x20
            }],
            &mut [0u8; 0x20]
        )
        .is_err());
    }
}
