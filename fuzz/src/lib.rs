//! Helpers shared by the fuzz targets and the seed generator.
//!
//! Every on-disk record is one 4 KiB block behind a 32-byte common header
//! (magic 0..8, version 8..10, aux 10..12, CRC 12..16, self block 16..24,
//! seq 24..32). Random bytes almost never pass the magic and CRC checks, so
//! each target decodes the input twice: as given, and "re-sealed" with the
//! expected magic, version 1, self address and a correct CRC, which sends
//! the fuzzer straight into the field validation behind the checksum.

use thinlun::format::{Layout, BLOCK_SIZE, FORMAT_VERSION};

/// Block addresses and geometry the targets decode at, and the seeds are
/// encoded for (so the seeds are valid records as they stand).
pub mod at {
    /// Superblock copy A (copy B is block 8).
    pub const SUPERBLOCK: u64 = thinlun::format::SUPERBLOCK_A;
    /// Allocation-group table, block 0 of the table for `layout()`.
    pub const CLAIMS: u64 = 49;
    /// Host 1's checkpoint copy A for `layout()`.
    pub const HOST_CHECKPOINT: u64 = 308;
    /// A journal block in host 1's ring for `layout()`.
    pub const JOURNAL: u64 = 312;
    /// Metadata blocks in the data area of `layout()`.
    pub const CATALOG: u64 = 1536;
    pub const VOLUME_HEADER: u64 = 1537;
    pub const NODE: u64 = 1540;
    /// Host 1's slot and lock register for `layout()`.
    pub const HOST_SLOT: u64 = 16;
    pub const LOCK_REGISTER: u64 = 32;
    /// `max_hosts` of `layout()`.
    pub const MAX_HOSTS: u32 = 16;
    /// Circular part of each host's journal in `layout()` (64 - 2 blocks).
    pub const RING_LEN: u32 = 62;
}

/// The geometry `Pool::create` picks for a 1 GiB pool with default
/// settings: 1 MiB chunks, 16 hosts, 64-block journals, room to grow to
/// 64 TiB. Its data area starts at block 1536.
pub fn layout() -> Layout {
    Layout::compute(1 << 18, 1 << 34, 256, 16, 64)
}

/// The input as one block: truncated, or zero-padded, to 4096 bytes.
pub fn to_block(data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    let n = data.len().min(BLOCK_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    b
}

/// Makes `block` pass the common-header checks for `magic` at `at_block`:
/// sets magic, version and self address, then stores a correct CRC32
/// (IEEE, over the whole block with bytes 12..16 zero) at 12..16.
pub fn reseal(block: &[u8], magic: &[u8; 8], at_block: u64) -> Vec<u8> {
    let mut b = to_block(block);
    b[0..8].copy_from_slice(magic);
    b[8..10].copy_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
    b[16..24].copy_from_slice(&at_block.to_le_bytes());
    b[12..16].fill(0);
    let crc = crc32fast::hash(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The `virtio_request` target's input: a virtio-blk descriptor chain, the
/// device limits and the guest memory it points into, packed into bytes so
/// the fuzzer mutates all three. Layout (little-endian):
///
/// - 0..8 capacity in sectors; 8..12 max discard sectors; 12 max discard
///   segments; 13..17 max write-zeroes sectors; 17 max write-zeroes
///   segments; 18..22 max transfer in bytes (segment limits are one byte:
///   the server advertises 32, and the parser sizes its range buffer by it);
/// - 22: number of descriptors (taken modulo 17);
/// - then per descriptor 7 bytes: flags (bit 0 device-writable, bit 1 the
///   address is far outside guest memory, bit 2 the length is multiplied by
///   65536), address offset (u16, from [`virtio::MEM_BASE`]), length (u16);
/// - the rest: guest memory, mapped at [`virtio::MEM_BASE`].
pub mod virtio {
    use thinlun_vhost::request::{BadAddress, Desc, GuestRead, Limits};

    pub const MEM_BASE: u64 = 0x10_000;
    const LIMITS_LEN: usize = 23;
    const DESC_LEN: usize = 7;
    pub const MAX_DESCS: usize = 16;

    /// Guest memory: one byte array at `MEM_BASE`.
    pub struct Mem<'a>(pub &'a [u8]);

    impl GuestRead for Mem<'_> {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), BadAddress> {
            let off = addr.checked_sub(MEM_BASE).ok_or(BadAddress)?;
            let off = usize::try_from(off).map_err(|_| BadAddress)?;
            let end = off.checked_add(buf.len()).ok_or(BadAddress)?;
            let src = self.0.get(off..end).ok_or(BadAddress)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    pub struct Input<'a> {
        pub limits: Limits,
        pub descs: Vec<Desc>,
        pub mem: Mem<'a>,
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[at..at + 4]);
        u32::from_le_bytes(a)
    }

    /// Unpacks fuzz bytes; short inputs are zero-padded.
    pub fn decode(data: &[u8]) -> Input<'_> {
        let mut head = [0u8; LIMITS_LEN];
        let n = data.len().min(LIMITS_LEN);
        head[..n].copy_from_slice(&data[..n]);
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&head[0..8]);
        let limits = Limits {
            capacity: u64::from_le_bytes(cap),
            max_discard_sectors: u32_at(&head, 8),
            max_discard_seg: head[12] as u32,
            max_write_zeroes_sectors: u32_at(&head, 13),
            max_write_zeroes_seg: head[17] as u32,
            max_transfer: u32_at(&head, 18) as u64,
        };
        let count = head[22] as usize % (MAX_DESCS + 1);
        let rest = data.get(LIMITS_LEN..).unwrap_or(&[]);
        let mut descs = Vec::with_capacity(count);
        for i in 0..count {
            let mut d = [0u8; DESC_LEN];
            if let Some(src) = rest.get(i * DESC_LEN..) {
                let k = src.len().min(DESC_LEN);
                d[..k].copy_from_slice(&src[..k]);
            }
            let off = u16::from_le_bytes([d[1], d[2]]) as u64;
            let len = u16::from_le_bytes([d[3], d[4]]) as u32;
            descs.push(Desc {
                addr: if d[0] & 2 != 0 {
                    // Near the top of the address space: overflow paths.
                    u64::MAX - off
                } else {
                    MEM_BASE + off
                },
                len: if d[0] & 4 != 0 {
                    len.saturating_mul(65536)
                } else {
                    len
                },
                write: d[0] & 1 != 0,
            });
        }
        let mem = rest.get(count * DESC_LEN..).unwrap_or(&[]);
        Input {
            limits,
            descs,
            mem: Mem(mem),
        }
    }

    /// Packs an input (for seeds): descriptors address guest memory only.
    pub fn encode(limits: &Limits, descs: &[(u16, u16, bool)], mem: &[u8]) -> Vec<u8> {
        assert!(descs.len() <= MAX_DESCS);
        let mut b = Vec::new();
        b.extend_from_slice(&limits.capacity.to_le_bytes());
        b.extend_from_slice(&limits.max_discard_sectors.to_le_bytes());
        b.push(limits.max_discard_seg as u8);
        b.extend_from_slice(&limits.max_write_zeroes_sectors.to_le_bytes());
        b.push(limits.max_write_zeroes_seg as u8);
        b.extend_from_slice(&(limits.max_transfer as u32).to_le_bytes());
        b.push(descs.len() as u8);
        for &(off, len, write) in descs {
            b.push(write as u8);
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&[0, 0]);
        }
        b.extend_from_slice(mem);
        b
    }
}
