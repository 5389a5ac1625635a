//! virtio-blk request parsing: a descriptor chain in, a request
//! description out.
//!
//! This module is pure: it sees the chain as a list of [`Desc`] (guest
//! address, length, device-writable or not) and reads the few bytes it must
//! interpret (the 16-byte header, discard/write-zeroes ranges) through
//! [`GuestRead`], so it runs on a fake memory in unit tests and fuzzing.
//! Every malformed chain gives an error carrying the status to report
//! (`IOERR` or `UNSUPP`), never a panic.
//!
//! Framing follows VIRTIO 1.x ("the device MUST NOT make assumptions about
//! the particular arrangement of descriptors"): the header is the first 16
//! readable bytes, wherever the descriptor boundaries fall; the status is the
//! last writable byte; data is what lies between, split into segments at
//! descriptor boundaries.

/// virtio-blk request types (VIRTIO 1.2, 5.2.6), from the kernel's
/// headers (virtio-bindings).
pub mod req_type {
    pub use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD as DISCARD, VIRTIO_BLK_T_FLUSH as FLUSH,
        VIRTIO_BLK_T_GET_ID as GET_ID, VIRTIO_BLK_T_IN as IN, VIRTIO_BLK_T_OUT as OUT,
        VIRTIO_BLK_T_WRITE_ZEROES as WRITE_ZEROES,
    };
}

/// The status byte a request completes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
}

/// Sector size of virtio-blk addressing, whatever the advertised block size.
pub const SECTOR: u64 = 512;
/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: usize = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes`.
pub const RANGE_LEN: usize = 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// The only flag defined for discard and write-zeroes ranges.
pub const FLAG_UNMAP: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// One descriptor of a chain, as the queue gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A piece of guest memory holding request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// One range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub sectors: u32,
    pub unmap: bool,
}

/// What a well-formed request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `sector` into the (device-writable) segments.
    Read {
        sector: u64,
        segs: Vec<Segment>,
    },
    /// Write the (device-readable) segments at `sector`.
    Write {
        sector: u64,
        segs: Vec<Segment>,
    },
    Flush,
    /// Write the 20-byte serial into the segments (as much as fits).
    GetId {
        segs: Vec<Segment>,
    },
    Discard {
        ranges: Vec<Range>,
    },
    WriteZeroes {
        ranges: Vec<Range>,
    },
}

impl Command {
    /// Whether the command changes the volume's contents.
    pub fn modifies(&self) -> bool {
        matches!(
            self,
            Command::Write { .. } | Command::Discard { .. } | Command::WriteZeroes { .. }
        )
    }
}

/// A parsed chain: where to put the status, and either the command or the
/// status to complete it with at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Guest address of the status byte.
    pub status_addr: u64,
    pub cmd: Result<Command, Status>,
}

/// A chain that cannot even be answered: no writable byte for the status.
/// The request is completed with a used length of 0 and nothing written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoStatus;

/// Limits the device advertised; requests beyond them are errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Volume size in 512-byte sectors.
    pub capacity: u64,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    /// Largest data transfer of one read or write, in bytes.
    pub max_transfer: u64,
}

/// A guest address range that is not (wholly) in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadAddress;

/// Reads guest memory for the parser.
pub trait GuestRead {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), BadAddress>;
}

/// Parses one descriptor chain.
pub fn parse(descs: &[Desc], mem: &dyn GuestRead, lim: &Limits) -> Result<Parsed, NoStatus> {
    // Device-readable descriptors come first, then device-writable ones.
    let split = descs.iter().position(|d| d.write).unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);
    // The status is the last byte of the last non-empty writable descriptor
    // (never one marked device-readable, even in a malformed chain that
    // mixes them: the device must not write into those).
    let Some(last_w) = writable.iter().rposition(|d| d.write && d.len > 0) else {
        return Err(NoStatus);
    };
    let status_desc = writable[last_w];
    let status_addr = status_desc
        .addr
        .checked_add(status_desc.len as u64 - 1)
        .ok_or(NoStatus)?;
    let mut w_data: Vec<Segment> = writable[..last_w]
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    if status_desc.len > 1 {
        w_data.push(Segment {
            addr: status_desc.addr,
            len: status_desc.len - 1,
        });
    }
    let reply = |cmd| Ok(Parsed { status_addr, cmd });
    // A readable descriptor after a writable one breaks the layout.
    if writable.iter().any(|d| !d.write) {
        return reply(Err(Status::IoErr));
    }
    let r_segs: Vec<Segment> = readable
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    let Some((header, r_data)) = take_prefix(&r_segs, HEADER_LEN) else {
        return reply(Err(Status::IoErr));
    };
    let mut hdr = [0u8; HEADER_LEN];
    if read_segments(mem, &header, &mut hdr).is_err() {
        return reply(Err(Status::IoErr));
    }
    let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let r_len = total(&r_data);
    let w_len = total(&w_data);
    let cmd = match rtype {
        req_type::IN => {
            if r_len != 0 {
                Err(Status::IoErr)
            } else {
                check_rw(sector, w_len, lim).map(|()| Command::Read {
                    sector,
                    segs: w_data,
                })
            }
        }
        req_type::OUT => {
            if w_len != 0 {
                Err(Status::IoErr)
            } else {
                check_rw(sector, r_len, lim).map(|()| Command::Write {
                    sector,
                    segs: r_data,
                })
            }
        }
        req_type::FLUSH => {
            if r_len != 0 || w_len != 0 {
                Err(Status::IoErr)
            } else {
                Ok(Command::Flush)
            }
        }
        req_type::GET_ID => {
            if r_len != 0 || w_len == 0 {
                Err(Status::IoErr)
            } else {
                Ok(Command::GetId { segs: w_data })
            }
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let zero = rtype == req_type::WRITE_ZEROES;
            let (max_sectors, max_seg) = if zero {
                (lim.max_write_zeroes_sectors, lim.max_write_zeroes_seg)
            } else {
                (lim.max_discard_sectors, lim.max_discard_seg)
            };
            if w_len != 0 {
                Err(Status::IoErr)
            } else {
                parse_ranges(
                    mem,
                    &r_data,
                    r_len,
                    zero,
                    max_sectors,
                    max_seg,
                    lim.capacity,
                )
                .map(|ranges| {
                    if zero {
                        Command::WriteZeroes { ranges }
                    } else {
                        Command::Discard { ranges }
                    }
                })
            }
        }
        _ => Err(Status::Unsupp),
    };
    reply(cmd)
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len as u64).sum()
}

/// Read or write of `len` bytes at `sector`: a whole number of sectors,
/// within the volume and the transfer limit.
fn check_rw(sector: u64, len: u64, lim: &Limits) -> Result<(), Status> {
    if !len.is_multiple_of(SECTOR) || len > lim.max_transfer {
        return Err(Status::IoErr);
    }
    match sector.checked_add(len / SECTOR) {
        Some(end) if end <= lim.capacity => Ok(()),
        _ => Err(Status::IoErr),
    }
}

fn parse_ranges(
    mem: &dyn GuestRead,
    segs: &[Segment],
    len: u64,
    zero: bool,
    max_sectors: u32,
    max_seg: u32,
    capacity: u64,
) -> Result<Vec<Range>, Status> {
    if len == 0 || !len.is_multiple_of(RANGE_LEN as u64) || len / RANGE_LEN as u64 > max_seg as u64
    {
        return Err(Status::IoErr);
    }
    let mut raw = vec![0u8; len as usize];
    read_segments(mem, segs, &mut raw).map_err(|_| Status::IoErr)?;
    let mut ranges = Vec::with_capacity(raw.len() / RANGE_LEN);
    let mut unsupported = false;
    let mut bad = false;
    for r in raw.chunks_exact(RANGE_LEN) {
        let sector = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
        let sectors = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
        let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
        // Unknown flags, and UNMAP on a discard, are unsupported (5.2.6.2).
        if flags & !FLAG_UNMAP != 0 || (!zero && flags & FLAG_UNMAP != 0) {
            unsupported = true;
        }
        if sectors > max_sectors
            || sector
                .checked_add(sectors as u64)
                .is_none_or(|e| e > capacity)
        {
            bad = true;
        }
        ranges.push(Range {
            sector,
            sectors,
            unmap: flags & FLAG_UNMAP != 0,
        });
    }
    if unsupported {
        Err(Status::Unsupp)
    } else if bad {
        Err(Status::IoErr)
    } else {
        Ok(ranges)
    }
}

/// Splits `segs` after `n` bytes; `None` if they hold fewer.
fn take_prefix(segs: &[Segment], n: usize) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut head = Vec::new();
    let mut need = n as u64;
    let mut i = 0;
    while need > 0 {
        let s = segs.get(i)?;
        let take = need.min(s.len as u64);
        head.push(Segment {
            addr: s.addr,
            len: take as u32,
        });
        need -= take;
        if take < s.len as u64 {
            let rest = Segment {
                addr: s.addr.checked_add(take)?,
                len: s.len - take as u32,
            };
            let mut tail = vec![rest];
            tail.extend_from_slice(&segs[i + 1..]);
            return Some((head, tail));
        }
        i += 1;
    }
    Some((head, segs[i..].to_vec()))
}

/// Reads exactly `buf.len()` bytes spread over `segs`.
fn read_segments(mem: &dyn GuestRead, segs: &[Segment], buf: &mut [u8]) -> Result<(), BadAddress> {
    let mut at = 0;
    for s in segs {
        if at == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - at);
        mem.read(s.addr, &mut buf[at..at + n])?;
        at += n;
    }
    if at == buf.len() {
        Ok(())
    } else {
        Err(BadAddress)
    }
}

/// The GET_ID answer: the serial, NUL-padded to 20 bytes (not terminated
/// when it is exactly 20 long, as the spec allows).
pub fn serial_bytes(serial: &str) -> [u8; ID_BYTES] {
    let mut out = [0u8; ID_BYTES];
    let b = serial.as_bytes();
    let n = b.len().min(ID_BYTES);
    out[..n].copy_from_slice(&b[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Guest memory made of a few byte arrays at chosen addresses.
    #[derive(Default)]
    struct FakeMem {
        regions: BTreeMap<u64, Vec<u8>>,
    }

    impl FakeMem {
        fn put(&mut self, addr: u64, bytes: &[u8]) {
            self.regions.insert(addr, bytes.to_vec());
        }
    }

    impl GuestRead for FakeMem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), BadAddress> {
            let (base, data) = self.regions.range(..=addr).next_back().ok_or(BadAddress)?;
            let off = (addr - base) as usize;
            let src = data.get(off..off + buf.len()).ok_or(BadAddress)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    const LIM: Limits = Limits {
        capacity: 2048,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1024,
        max_write_zeroes_seg: 4,
        max_transfer: 1 << 20,
    };

    fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&sector.to_le_bytes());
        r.extend_from_slice(&sectors.to_le_bytes());
        r.extend_from_slice(&flags.to_le_bytes());
        r
    }

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: false,
        }
    }

    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: true,
        }
    }

    fn mem_with_header(t: u32, sector: u64) -> FakeMem {
        let mut m = FakeMem::default();
        m.put(0x1000, &header(t, sector));
        m
    }

    fn cmd(descs: &[Desc], m: &FakeMem) -> Result<Command, Status> {
        parse(descs, m, &LIM).expect("has status").cmd
    }

    #[test]
    fn status_never_goes_into_a_readable_descriptor() {
        // Found by fuzzing: a readable descriptor after the writable ones
        // is an error, and its status still goes to the last writable byte.
        let m = mem_with_header(req_type::IN, 0);
        let p = parse(&[r(0x1000, 16), w(0x2000, 512), r(0x3000, 8)], &m, &LIM).unwrap();
        assert_eq!(p.status_addr, 0x2000 + 511);
        assert_eq!(p.cmd, Err(Status::IoErr));
    }

    #[test]
    fn read_with_segments() {
        let m = mem_with_header(req_type::IN, 8);
        let p = parse(
            &[r(0x1000, 16), w(0x2000, 4096), w(0x4000, 512), w(0x9000, 1)],
            &m,
            &LIM,
        )
        .unwrap();
        assert_eq!(p.status_addr, 0x9000);
        assert_eq!(
            p.cmd,
            Ok(Command::Read {
                sector: 8,
                segs: vec![
                    Segment {
                        addr: 0x2000,
                        len: 4096
                    },
                    Segment {
                        addr: 0x4000,
                        len: 512
                    }
                ]
            })
        );
    }

    #[test]
    fn write_with_header_and_data_in_one_descriptor_and_status_at_end_of_data() {
        // Header and data share a descriptor: 16 + 512 bytes.
        let mut m = FakeMem::default();
        let mut bytes = header(req_type::OUT, 3);
        bytes.extend_from_slice(&[7u8; 512]);
        m.put(0x1000, &bytes);
        let p = parse(&[r(0x1000, 16 + 512), w(0x9000, 1)], &m, &LIM).unwrap();
        assert_eq!(
            p.cmd,
            Ok(Command::Write {
                sector: 3,
                segs: vec![Segment {
                    addr: 0x1010,
                    len: 512
                }]
            })
        );
        // A read whose status shares the last data descriptor.
        let m = mem_with_header(req_type::IN, 0);
        let p = parse(&[r(0x1000, 16), w(0x2000, 513)], &m, &LIM).unwrap();
        assert_eq!(p.status_addr, 0x2000 + 512);
        assert_eq!(
            p.cmd,
            Ok(Command::Read {
                sector: 0,
                segs: vec![Segment {
                    addr: 0x2000,
                    len: 512
                }]
            })
        );
    }

    #[test]
    fn header_split_over_descriptors() {
        let mut m = FakeMem::default();
        let h = header(req_type::OUT, 5);
        m.put(0x1000, &h[..4]);
        m.put(0x3000, &h[4..]);
        let p = parse(
            &[r(0x1000, 4), r(0x3000, 12), r(0x5000, 1024), w(0x9000, 1)],
            &m,
            &LIM,
        )
        .unwrap();
        assert_eq!(
            p.cmd,
            Ok(Command::Write {
                sector: 5,
                segs: vec![Segment {
                    addr: 0x5000,
                    len: 1024
                }]
            })
        );
    }

    #[test]
    fn flush_get_id_and_unknown() {
        let m = mem_with_header(req_type::FLUSH, 0);
        assert_eq!(cmd(&[r(0x1000, 16), w(0x9000, 1)], &m), Ok(Command::Flush));
        let m = mem_with_header(req_type::GET_ID, 0);
        assert_eq!(
            cmd(&[r(0x1000, 16), w(0x2000, 20), w(0x9000, 1)], &m),
            Ok(Command::GetId {
                segs: vec![Segment {
                    addr: 0x2000,
                    len: 20
                }]
            })
        );
        for t in [2, 3, 14, 15, 16, 99, u32::MAX] {
            let m = mem_with_header(t, 0);
            assert_eq!(cmd(&[r(0x1000, 16), w(0x9000, 1)], &m), Err(Status::Unsupp));
        }
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mut m = mem_with_header(req_type::DISCARD, 0);
        let mut ranges = range(8, 16, 0);
        ranges.extend(range(100, 8, 0));
        m.put(0x2000, &ranges);
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 32), w(0x9000, 1)], &m),
            Ok(Command::Discard {
                ranges: vec![
                    Range {
                        sector: 8,
                        sectors: 16,
                        unmap: false
                    },
                    Range {
                        sector: 100,
                        sectors: 8,
                        unmap: false
                    }
                ]
            })
        );
        // UNMAP on a discard, and unknown flags anywhere, are UNSUPP.
        m.put(0x2000, &range(8, 16, FLAG_UNMAP));
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 16), w(0x9000, 1)], &m),
            Err(Status::Unsupp)
        );
        let mut m = mem_with_header(req_type::WRITE_ZEROES, 0);
        m.put(0x2000, &range(0, 8, FLAG_UNMAP));
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 16), w(0x9000, 1)], &m),
            Ok(Command::WriteZeroes {
                ranges: vec![Range {
                    sector: 0,
                    sectors: 8,
                    unmap: true
                }]
            })
        );
        m.put(0x2000, &range(0, 8, 0));
        assert!(matches!(
            cmd(&[r(0x1000, 16), r(0x2000, 16), w(0x9000, 1)], &m),
            Ok(Command::WriteZeroes { ranges }) if !ranges[0].unmap
        ));
        m.put(0x2000, &range(0, 8, 2));
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 16), w(0x9000, 1)], &m),
            Err(Status::Unsupp)
        );
        // Beyond the end, too long, too many ranges, partial range.
        m.put(0x2000, &range(2040, 16, 0));
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 16), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        m.put(0x2000, &range(0, 2000, 0));
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 16), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        m.put(0x2000, &range(u64::MAX, 1, 0));
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 16), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        m.put(0x2000, &[0u8; 80]);
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 80), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        assert_eq!(
            cmd(&[r(0x1000, 16), r(0x2000, 15), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        assert_eq!(cmd(&[r(0x1000, 16), w(0x9000, 1)], &m), Err(Status::IoErr));
    }

    #[test]
    fn malformed_chains() {
        let m = mem_with_header(req_type::IN, 0);
        // No writable byte at all: nothing can be answered.
        assert_eq!(parse(&[r(0x1000, 16)], &m, &LIM), Err(NoStatus));
        assert_eq!(parse(&[], &m, &LIM), Err(NoStatus));
        assert_eq!(
            parse(&[r(0x1000, 16), w(0x9000, 0)], &m, &LIM),
            Err(NoStatus)
        );
        // Short header; header in unmapped memory.
        assert_eq!(cmd(&[r(0x1000, 8), w(0x9000, 1)], &m), Err(Status::IoErr));
        assert_eq!(cmd(&[w(0x9000, 1)], &m), Err(Status::IoErr));
        assert_eq!(cmd(&[r(0x7000, 16), w(0x9000, 1)], &m), Err(Status::IoErr));
        // Readable after writable.
        assert_eq!(
            cmd(
                &[r(0x1000, 16), w(0x2000, 512), r(0x3000, 512), w(0x9000, 1)],
                &m
            ),
            Err(Status::IoErr)
        );
        // Not a whole sector; past the end; sector overflow; readable data on a read.
        assert_eq!(
            cmd(&[r(0x1000, 16), w(0x2000, 100), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        let m = mem_with_header(req_type::IN, 2047);
        assert_eq!(
            cmd(&[r(0x1000, 16), w(0x2000, 1024), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        assert!(cmd(&[r(0x1000, 16), w(0x2000, 512), w(0x9000, 1)], &m).is_ok());
        let m = mem_with_header(req_type::IN, u64::MAX);
        assert_eq!(
            cmd(&[r(0x1000, 16), w(0x2000, 512), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        let mut m = FakeMem::default();
        let mut bytes = header(req_type::IN, 0);
        bytes.extend_from_slice(&[0u8; 512]);
        m.put(0x1000, &bytes);
        assert_eq!(cmd(&[r(0x1000, 528), w(0x9000, 1)], &m), Err(Status::IoErr));
        // A write with writable data; a flush with data; GET_ID without room.
        let m = mem_with_header(req_type::OUT, 0);
        assert_eq!(
            cmd(&[r(0x1000, 16), w(0x2000, 512), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        let m = mem_with_header(req_type::FLUSH, 0);
        assert_eq!(
            cmd(&[r(0x1000, 16), w(0x2000, 512), w(0x9000, 1)], &m),
            Err(Status::IoErr)
        );
        let m = mem_with_header(req_type::GET_ID, 0);
        assert_eq!(cmd(&[r(0x1000, 16), w(0x9000, 1)], &m), Err(Status::IoErr));
        // Status byte at the very top of the address space.
        assert_eq!(
            parse(&[r(0x1000, 16), w(u64::MAX, 2)], &m, &LIM),
            Err(NoStatus)
        );
        // Transfer limit.
        let m = mem_with_header(req_type::IN, 0);
        let lim = Limits {
            max_transfer: 4096,
            ..LIM
        };
        let p = parse(&[r(0x1000, 16), w(0x2000, 8192), w(0x9000, 1)], &m, &lim).unwrap();
        assert_eq!(p.cmd, Err(Status::IoErr));
    }

    #[test]
    fn serial_is_padded_or_truncated() {
        assert_eq!(&serial_bytes("vm-1")[..5], b"vm-1\0");
        assert_eq!(serial_bytes("vm-1")[19], 0);
        assert_eq!(
            &serial_bytes("abcdefghijklmnopqrstuvwxyz"),
            b"abcdefghijklmnopqrst"
        );
    }

    /// A small deterministic fuzzer: random chains over random memory must
    /// never panic, and every data segment of an accepted request must lie
    /// inside the chain's descriptors.
    #[test]
    fn random_chains_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut m = FakeMem::default();
            let n = (rnd() % 6) as usize;
            let mut descs = Vec::new();
            for i in 0..n {
                let addr = match rnd() % 8 {
                    0 => u64::MAX - (rnd() % 64),
                    _ => 0x1000 * (i as u64 + 1) * 16,
                };
                let len = match rnd() % 4 {
                    0 => (rnd() % 40) as u32,
                    1 => 16,
                    2 => 512 * (rnd() % 4) as u32,
                    _ => (rnd() % 5000) as u32,
                };
                let write = rnd() % 3 == 0 || i + 1 == n && rnd() % 4 != 0;
                let mut bytes: Vec<u8> = (0..len.min(4096)).map(|_| rnd() as u8).collect();
                if i == 0 && bytes.len() >= 16 {
                    let t = [0u32, 1, 4, 8, 11, 13, 5][(rnd() % 7) as usize];
                    bytes[..4].copy_from_slice(&t.to_le_bytes());
                    let s = rnd() % 4096;
                    bytes[8..16].copy_from_slice(&s.to_le_bytes());
                }
                m.put(addr, &bytes);
                descs.push(Desc { addr, len, write });
            }
            if let Ok(p) = parse(&descs, &m, &LIM) {
                let inside = |s: &Segment| {
                    descs.iter().any(|d| {
                        s.addr >= d.addr
                            && s.addr + s.len as u64 <= d.addr.saturating_add(d.len as u64)
                    })
                };
                match &p.cmd {
                    Ok(Command::Read { segs, .. })
                    | Ok(Command::Write { segs, .. })
                    | Ok(Command::GetId { segs }) => assert!(segs.iter().all(inside)),
                    _ => {}
                }
            }
        }
    }
}
