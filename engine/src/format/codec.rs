//! Little-endian field access and the common 32-byte record header shared by
//! every metadata block (see docs/FORMAT.md, "Common block header").

use super::{BLOCK_SIZE, FORMAT_VERSION};
use crate::error::{Error, Result};

/// Offset of the CRC field inside the common header.
const CRC_OFFSET: usize = 12;
/// Size of the common header; record bodies start here.
pub const HEADER_LEN: usize = 32;

/// Reads the little-endian `u16` at byte `off`.
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Reads the little-endian `u32` at byte `off`.
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Reads the little-endian `u64` at byte `off`.
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Writes `v` as a little-endian `u16` at byte `off`.
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` as a little-endian `u32` at byte `off`.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` as a little-endian `u64` at byte `off`.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// CRC32 (IEEE) of a block with its CRC field taken as zero.
pub fn block_crc(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..CRC_OFFSET]);
    h.update(&[0u8; 4]);
    h.update(&b[CRC_OFFSET + 4..]);
    h.finalize()
}

/// The common header every metadata block starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The record type (one of [`super::magic`]).
    pub magic: [u8; 8],
    /// Record-specific 16-bit field (for example a tree node's level).
    pub aux: u16,
    /// The block address the record was written to: catches misdirected
    /// and stale writes that a checksum alone cannot.
    pub self_block: u64,
    /// Generation or sequence number, meaning defined per record type.
    pub seq: u64,
}

/// Writes `hdr` into `b` (a whole block whose body is already filled) and
/// seals the block with its checksum.
pub fn seal(b: &mut [u8], hdr: &Header) {
    seal_version(b, hdr, FORMAT_VERSION);
}

/// [`seal`] for a record of another version (mapping nodes with twins).
pub fn seal_version(b: &mut [u8], hdr: &Header, version: u32) {
    debug_assert_eq!(b.len(), BLOCK_SIZE);
    b[0..8].copy_from_slice(&hdr.magic);
    put_u16(b, 8, version as u16);
    put_u16(b, 10, hdr.aux);
    put_u64(b, 16, hdr.self_block);
    put_u64(b, 24, hdr.seq);
    let crc = block_crc(b);
    put_u32(b, CRC_OFFSET, crc);
}

/// Checks magic, version, checksum and self address of a block; `what`
/// names the record in error messages.
pub fn open(b: &[u8], magic: &[u8; 8], at_block: u64, what: &str) -> Result<Header> {
    open_version(b, magic, at_block, what, FORMAT_VERSION).map(|(h, _)| h)
}

/// [`open`] for a record type with versions 1..=`newest`; returns the
/// header and the block's version.
pub fn open_version(
    b: &[u8],
    magic: &[u8; 8],
    at_block: u64,
    what: &str,
    newest: u32,
) -> Result<(Header, u32)> {
    if b.len() != BLOCK_SIZE {
        return Err(Error::Corrupt(format!(
            "{what}: short block ({} bytes)",
            b.len()
        )));
    }
    if &b[0..8] != magic {
        return Err(Error::Corrupt(format!(
            "{what} at block {at_block}: wrong magic (not a {what} record)"
        )));
    }
    // Checksum first: a flipped bit in the version field is damage, not a
    // newer format.
    let stored = get_u32(b, CRC_OFFSET);
    let actual = block_crc(b);
    if stored != actual {
        return Err(Error::Corrupt(format!(
            "{what} at block {at_block}: checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    let version = get_u16(b, 8) as u32;
    if version == 0 || version > newest {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: newest,
        });
    }
    let self_block = get_u64(b, 16);
    if self_block != at_block {
        return Err(Error::Corrupt(format!(
            "{what} at block {at_block}: record says it belongs at block {self_block} (misdirected or stale write)"
        )));
    }
    let hdr = Header {
        magic: *magic,
        aux: get_u16(b, 10),
        self_block,
        seq: get_u64(b, 24),
    };
    Ok((hdr, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_roundtrips_and_detects_flips() {
        let mut b = vec![0u8; BLOCK_SIZE];
        b[100] = 7;
        let hdr = Header {
            magic: *b"TESTREC\0",
            aux: 3,
            self_block: 42,
            seq: 9,
        };
        seal(&mut b, &hdr);
        assert_eq!(open(&b, b"TESTREC\0", 42, "test").unwrap(), hdr);
        assert!(open(&b, b"TESTREC\0", 43, "test").is_err());
        for i in [0usize, 9, 13, 20, 100, 4095] {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(open(&c, b"TESTREC\0", 42, "test").is_err(), "flip at {i}");
        }
    }
}
