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
