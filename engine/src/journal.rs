//! The host's journal writer: appends mapping changes as chained blocks to
//! the circular journal, and knows how much room is left before the next
//! checkpoint must move the replay start forward.

use crate::dev::{AlignedBuf, BlockDevice, IoOp};
use crate::error::{Error, Result};
use crate::format::journal::{
    encode_block, Entry, HostCheckpoint, JournalBlock, ENTRIES_PER_BLOCK,
};
use crate::format::{BLOCK_SIZE, HOST_CHECKPOINT_BLOCKS};

pub(crate) struct JournalWriter {
    /// First block of the circular part.
    ring_start: u64,
    /// Blocks in the circular part.
    ring_len: u32,
    /// Replay start (as recorded in the durable host checkpoint).
    head: u32,
    /// Where the next block goes.
    tail: u32,
    /// Sequence of the next block.
    next_seq: u64,
    /// CRC of the last block written (or the chain seed).
    prev_crc: u32,
    nonce: u64,
    /// The last block written was an unflushed persist's: the next commit
    /// must write a block (even an empty one) to vouch for it.
    unsealed: bool,
    /// That block and its ring position, while it has room: the next
    /// persist rewrites it with its entries added instead of taking a new
    /// block, so persists of a few entries do not fill the ring one block
    /// each. Rewriting in place is safe only for such blocks: they are
    /// replayed only on the boot that wrote them, where no write is torn
    /// (a power loss ends the boot). A commit, a checkpoint or a recorded
    /// sequence closes it.
    open: Option<(u32, JournalBlock)>,
}

impl JournalWriter {
    pub fn new(
        region_start: u64,
        region_blocks: u32,
        ckpt: &HostCheckpoint,
        tail: u32,
        next_seq: u64,
        prev_crc: u32,
        unsealed: bool,
    ) -> Self {
        JournalWriter {
            ring_start: region_start + HOST_CHECKPOINT_BLOCKS as u64,
            ring_len: region_blocks - HOST_CHECKPOINT_BLOCKS,
            head: ckpt.head,
            tail,
            next_seq,
            prev_crc,
            nonce: crate::util::random_u64(),
            unsealed,
            open: None,
        }
    }

    /// Sequence the next block will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Blocks between the replay start and the tail.
    pub fn used_blocks(&self) -> u32 {
        (self.tail + self.ring_len - self.head) % self.ring_len
    }

    pub fn capacity(&self) -> u32 {
        // One block stays unused so head == tail always means "empty".
        self.ring_len - 1
    }

    pub fn blocks_for(entries: usize) -> u32 {
        entries.div_ceil(ENTRIES_PER_BLOCK) as u32
    }

    pub fn has_room(&self, entries: usize) -> bool {
        self.used_blocks() + Self::blocks_for(entries) <= self.capacity()
    }

    /// Sequence number of the last block written, which from now on takes
    /// no more entries: the caller records it as "already in the trees",
    /// and replay skips what such a block holds.
    pub fn settled_seq(&mut self) -> u64 {
        self.open = None;
        self.next_seq - 1
    }

    /// Appends `entries` (the caller checked `has_room`); durable only after
    /// the device is flushed. `boot` is 0 when the data the entries point
    /// to was flushed first, else this boot's identity (see
    /// [`JournalBlock::boot`]). No entries still write one (empty) block: a
    /// commit's seal.
    pub fn append(&mut self, dev: &dyn BlockDevice, entries: &[Entry], boot: u64) -> Result<()> {
        let mut blocks: Vec<(u64, AlignedBuf)> = Vec::new();
        let mut rest = entries;
        let mut still_open = false;
        if let Some((pos, jb)) = self.open.as_mut() {
            if boot != 0 && jb.boot == boot {
                let take = (ENTRIES_PER_BLOCK - jb.entries.len()).min(rest.len());
                jb.entries.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                let at = self.ring_start + *pos as u64;
                let (bytes, crc) = encode_block(jb, at);
                blocks.push((at, AlignedBuf::from_slice(&bytes)));
                self.prev_crc = crc;
                still_open = rest.is_empty() && jb.entries.len() < ENTRIES_PER_BLOCK;
            }
        }
        if !still_open {
            self.open = None;
        }
        let commit_first = self.next_seq;
        let chunks: Vec<&[Entry]> = if entries.is_empty() {
            vec![&[]]
        } else {
            rest.chunks(ENTRIES_PER_BLOCK).collect()
        };
        for chunk in chunks {
            let pos = self.tail;
            let at = self.ring_start + pos as u64;
            let jb = JournalBlock {
                seq: self.next_seq,
                nonce: self.nonce,
                prev_crc: self.prev_crc,
                commit_first,
                boot,
                entries: chunk.to_vec(),
            };
            let (bytes, crc) = encode_block(&jb, at);
            blocks.push((at, AlignedBuf::from_slice(&bytes)));
            self.open = (boot != 0 && chunk.len() < ENTRIES_PER_BLOCK).then_some((pos, jb));
            self.prev_crc = crc;
            self.next_seq += 1;
            self.tail = (self.tail + 1) % self.ring_len;
        }
        let mut ops: Vec<IoOp> = blocks
            .iter()
            .map(|(at, buf)| IoOp::Write {
                offset: at * BLOCK_SIZE as u64,
                buf,
            })
            .collect();
        let written = dev.submit(&mut ops);
        if written.is_err() {
            // What is on disk is unknown: never rewrite it.
            self.open = None;
        }
        written.map_err(|e| Error::io("journal write", e))?;
        self.unsealed = boot != 0;
        Ok(())
    }

    /// Blocks of unflushed persists were written since the last flushed
    /// block: a power loss on another boot would drop them unless a
    /// flushed block follows.
    pub fn unsealed(&self) -> bool {
        self.unsealed
    }

    /// The host checkpoint that makes everything written so far "already in
    /// the trees": replay would start at the current tail.
    pub fn checkpoint_at_tail(&mut self, generation: u64) -> HostCheckpoint {
        // The checkpoint records the last block's CRC: it must not change.
        self.open = None;
        HostCheckpoint {
            generation,
            head: self.tail,
            seq: self.next_seq,
            prev_crc: self.prev_crc,
        }
    }

    /// Records that a host checkpoint at the tail is durable.
    pub fn advance_head_to(&mut self, ckpt: &HostCheckpoint) {
        self.head = ckpt.head;
        if self.head == self.tail {
            // Nothing is left to replay, so nothing needs vouching for.
            self.unsealed = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{read_block, MemDevice};
    use crate::format::journal::decode_block;

    fn map(vblock: u64) -> Entry {
        Entry::Map {
            volume: 1,
            vblock,
            pblock: 1000 + vblock,
            len: 1,
        }
    }

    #[test]
    fn persists_share_a_block_until_a_commit_closes_it() {
        let dev = MemDevice::new(64 * BLOCK_SIZE as u64);
        let ckpt = HostCheckpoint {
            generation: 1,
            head: 0,
            seq: 1,
            prev_crc: 7,
        };
        let mut w = JournalWriter::new(0, 32, &ckpt, 0, 1, 7, false);
        let ring_block = |i: u64| HOST_CHECKPOINT_BLOCKS as u64 + i;
        for v in 0..3 {
            w.append(&dev, &[map(v)], 42).unwrap();
        }
        assert_eq!(w.used_blocks(), 1, "three small persists, one block");
        assert!(w.unsealed());
        let (jb, crc) = decode_block(&read_block(&dev, ring_block(0)).unwrap(), ring_block(0))
            .unwrap()
            .unwrap();
        assert_eq!((jb.seq, jb.prev_crc, jb.boot), (1, 7, 42));
        assert_eq!(jb.entries, vec![map(0), map(1), map(2)]);
        // A commit seals with a new, flushed block chained to the last
        // version of the shared one; later persists start a new block.
        w.append(&dev, &[], 0).unwrap();
        assert!(!w.unsealed());
        w.append(&dev, &[map(9)], 42).unwrap();
        assert_eq!(w.used_blocks(), 3);
        let (seal, _) = decode_block(&read_block(&dev, ring_block(1)).unwrap(), ring_block(1))
            .unwrap()
            .unwrap();
        assert_eq!((seal.seq, seal.prev_crc, seal.boot), (2, crc, 0));
        assert!(seal.entries.is_empty());
        // A recorded sequence closes the open block too.
        assert_eq!(w.settled_seq(), 3);
        w.append(&dev, &[map(10)], 42).unwrap();
        assert_eq!(w.used_blocks(), 4);
    }
}
