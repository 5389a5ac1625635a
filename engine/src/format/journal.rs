//! Per-host metadata journal: a circular run of 4 KiB blocks, each holding
//! up to 126 mapping changes, chained by sequence number and by the CRC of
//! the previous block; and the host checkpoint record that says where replay
//! starts. A block is replayed only if its magic, CRC, sequence and chain
//! all match, so torn, lost or stale blocks end the replay cleanly.

use super::codec::{self, get_u32, get_u64, put_u32, put_u64, Header, HEADER_LEN};
use super::{magic, BLOCK_SIZE, MAX_BLOCKS};
use crate::error::{Error, Result};

/// Bytes per journal entry.
pub const ENTRY_LEN: usize = 32;
const ENTRIES_AT: usize = 64;
/// Entries one journal block holds (126).
pub const ENTRIES_PER_BLOCK: usize = (BLOCK_SIZE - ENTRIES_AT) / ENTRY_LEN;

/// One mapping change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Virtual blocks `vblock..vblock+len` of `volume` now live at
    /// `pblock..pblock+len`.
    Map {
        /// The volume's id.
        volume: u64,
        /// First virtual block.
        vblock: u64,
        /// First physical block.
        pblock: u64,
        /// Blocks in the run.
        len: u32,
    },
    /// Virtual blocks `vblock..vblock+len` of `volume` are unmapped (read as
    /// zeros, or as the clone origin's data).
    Unmap {
        /// The volume's id.
        volume: u64,
        /// First virtual block.
        vblock: u64,
        /// Blocks in the run.
        len: u32,
    },
    /// Like Unmap, but the range reads as zeros even in a clone.
    Zero {
        /// The volume's id.
        volume: u64,
        /// First virtual block.
        vblock: u64,
        /// Blocks in the run.
        len: u32,
    },
}

const OP_MAP: u8 = 1;
const OP_UNMAP: u8 = 2;
const OP_ZERO: u8 = 3;

impl Entry {
    /// The id of the volume the change is for.
    pub fn volume(&self) -> u64 {
        match *self {
            Entry::Map { volume, .. }
            | Entry::Unmap { volume, .. }
            | Entry::Zero { volume, .. } => volume,
        }
    }

    pub(crate) fn encode(&self, b: &mut [u8]) {
        let (op, volume, vblock, pblock, len) = match *self {
            Entry::Map {
                volume,
                vblock,
                pblock,
                len,
            } => (OP_MAP, volume, vblock, pblock, len),
            Entry::Unmap {
                volume,
                vblock,
                len,
            } => (OP_UNMAP, volume, vblock, 0, len),
            Entry::Zero {
                volume,
                vblock,
                len,
            } => (OP_ZERO, volume, vblock, 0, len),
        };
        b[0] = op;
        put_u32(b, 4, len);
        put_u64(b, 8, volume);
        put_u64(b, 16, vblock);
        put_u64(b, 24, pblock);
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Entry> {
        let len = get_u32(b, 4);
        let volume = get_u64(b, 8);
        let vblock = get_u64(b, 16);
        let pblock = get_u64(b, 24);
        // Fields come from disk: compare without adding, which could overflow.
        if len == 0 || vblock > MAX_BLOCKS - len as u64 || pblock > MAX_BLOCKS - len as u64 {
            return None;
        }
        if b[1..4] != [0, 0, 0] {
            return None;
        }
        match b[0] {
            OP_MAP => Some(Entry::Map {
                volume,
                vblock,
                pblock,
                len,
            }),
            OP_UNMAP if pblock == 0 => Some(Entry::Unmap {
                volume,
                vblock,
                len,
            }),
            OP_ZERO if pblock == 0 => Some(Entry::Zero {
                volume,
                vblock,
                len,
            }),
            _ => None,
        }
    }
}

/// A journal block as decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalBlock {
    /// Position in the host's journal; grows by one per block written.
    pub seq: u64,
    /// Random per writer session: makes a block written after a crash differ
    /// from a stale block of the same sequence left by the previous session.
    pub nonce: u64,
    /// CRC of the previous journal block (the chain).
    pub prev_crc: u32,
    /// Sequence of the first block of the commit this block belongs to.
    /// A damaged block followed by a block of a later commit was durable
    /// (commits are flushed in order): that is corruption, not a torn tail.
    pub commit_first: u64,
    /// 0: written after a flush of the data its entries point to, so that
    /// data is durable whenever this block is. Otherwise written by
    /// `persist` without a flush, on the boot with this identity: the
    /// data is known to be on the LUN only while that boot lasts, or once
    /// a later block with `boot` 0 follows (its commit flushed first).
    pub boot: u64,
    /// The mapping changes, in order (at most [`ENTRIES_PER_BLOCK`]).
    pub entries: Vec<Entry>,
}

/// Encodes a journal block; returns the block and its CRC (the next block's
/// `prev_crc`).
pub fn encode_block(jb: &JournalBlock, at_block: u64) -> (Vec<u8>, u32) {
    debug_assert!(jb.entries.len() <= ENTRIES_PER_BLOCK);
    let mut b = vec![0u8; BLOCK_SIZE];
    put_u64(&mut b, HEADER_LEN, jb.nonce);
    put_u32(&mut b, HEADER_LEN + 8, jb.prev_crc);
    put_u64(&mut b, HEADER_LEN + 16, jb.commit_first);
    put_u64(&mut b, HEADER_LEN + 24, jb.boot);
    for (i, e) in jb.entries.iter().enumerate() {
        let off = ENTRIES_AT + i * ENTRY_LEN;
        e.encode(&mut b[off..off + ENTRY_LEN]);
    }
    codec::seal(
        &mut b,
        &Header {
            magic: *magic::JOURNAL,
            aux: jb.entries.len() as u16,
            self_block: at_block,
            seq: jb.seq,
        },
    );
    let crc = get_u32(&b, 12);
    (b, crc)
}

/// Decodes a journal block; `Ok(None)` means "not a valid block here" (the
/// normal end of a journal), `Err` a block that passed its checksum but
/// holds impossible content.
pub fn decode_block(b: &[u8], at_block: u64) -> Result<Option<(JournalBlock, u32)>> {
    let hdr = match codec::open(b, magic::JOURNAL, at_block, "journal block") {
        Ok(h) => h,
        Err(Error::UnsupportedVersion { .. }) | Err(Error::Corrupt(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let count = hdr.aux as usize;
    let bad = |what: String| Error::Corrupt(format!("journal block {at_block}: {what}"));
    if count > ENTRIES_PER_BLOCK {
        return Err(bad(format!(
            "{count} entries, at most {ENTRIES_PER_BLOCK} fit"
        )));
    }
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let off = ENTRIES_AT + i * ENTRY_LEN;
        let e = Entry::decode(&b[off..off + ENTRY_LEN])
            .ok_or_else(|| bad(format!("entry {i} is malformed")))?;
        entries.push(e);
    }
    Ok(Some((
        JournalBlock {
            seq: hdr.seq,
            nonce: get_u64(b, HEADER_LEN),
            prev_crc: get_u32(b, HEADER_LEN + 8),
            commit_first: get_u64(b, HEADER_LEN + 16),
            boot: get_u64(b, HEADER_LEN + 24),
            entries,
        },
        get_u32(b, 12),
    )))
}

/// Where a host's journal replay starts. Two copies at the start of the
/// host's region; the valid one with the higher generation wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCheckpoint {
    /// Bumped on every checkpoint write.
    pub generation: u64,
    /// Index of the first journal block to replay, within the circular part.
    pub head: u32,
    /// Sequence number the block at `head` must carry.
    pub seq: u64,
    /// CRC the block at `head` must name as its predecessor.
    pub prev_crc: u32,
}

/// A host checkpoint record as written at `at_block`.
pub fn encode_host_checkpoint(h: &HostCheckpoint, at_block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    put_u32(&mut b, HEADER_LEN, h.head);
    put_u32(&mut b, HEADER_LEN + 4, h.prev_crc);
    put_u64(&mut b, HEADER_LEN + 8, h.seq);
    codec::seal(
        &mut b,
        &Header {
            magic: *magic::HOST_CHECKPOINT,
            aux: 0,
            self_block: at_block,
            seq: h.generation,
        },
    );
    b
}

/// Decodes the checkpoint read from `at_block`; its head must lie within a
/// ring of `journal_len` blocks.
pub fn decode_host_checkpoint(b: &[u8], at_block: u64, journal_len: u32) -> Result<HostCheckpoint> {
    let hdr = codec::open(b, magic::HOST_CHECKPOINT, at_block, "host checkpoint")?;
    let head = get_u32(b, HEADER_LEN);
    if head >= journal_len {
        return Err(Error::Corrupt(format!(
            "host checkpoint at block {at_block}: journal head {head} outside the journal"
        )));
    }
    Ok(HostCheckpoint {
        generation: hdr.seq,
        head,
        prev_crc: get_u32(b, HEADER_LEN + 4),
        seq: get_u64(b, HEADER_LEN + 8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_roundtrip_and_chain_crc() {
        let jb = JournalBlock {
            seq: 10,
            nonce: 0xfeed,
            prev_crc: 0x1234,
            commit_first: 9,
            boot: 0x1234_5678_9abc,
            entries: vec![
                Entry::Map {
                    volume: 1,
                    vblock: 5,
                    pblock: 900,
                    len: 3,
                },
                Entry::Unmap {
                    volume: 2,
                    vblock: 0,
                    len: 100,
                },
                Entry::Zero {
                    volume: 2,
                    vblock: 7,
                    len: 1,
                },
            ],
        };
        let (b, crc) = encode_block(&jb, 40);
        let (back, crc2) = decode_block(&b, 40).unwrap().unwrap();
        assert_eq!(back, jb);
        assert_eq!(crc, crc2);
        assert!(decode_block(&b, 41).unwrap().is_none());
        assert!(decode_block(&vec![0u8; BLOCK_SIZE], 40).unwrap().is_none());
    }

    #[test]
    fn host_checkpoint_roundtrip() {
        let h = HostCheckpoint {
            generation: 3,
            head: 17,
            seq: 99,
            prev_crc: 5,
        };
        let b = encode_host_checkpoint(&h, 100);
        assert_eq!(decode_host_checkpoint(&b, 100, 64).unwrap(), h);
        assert!(decode_host_checkpoint(&b, 100, 10).is_err());
    }
}
