//! Mapping-tree nodes. A volume's mapping is a B+tree of 4 KiB nodes:
//! leaves hold extents (virtual block run -> physical block run), interior
//! nodes hold (first virtual block, child node) pairs. Nodes are never
//! updated in place: a checkpoint writes changed nodes to new blocks.

use super::codec::{self, get_u32, get_u64, put_u32, put_u64, Header, HEADER_LEN};
use super::{magic, BLOCK_SIZE, MAX_BLOCKS};
use crate::error::{Error, Result};

pub const ENTRY_LEN: usize = 16;
const O_VOLUME: usize = HEADER_LEN;
const O_COUNT: usize = HEADER_LEN + 8;
const ENTRIES_AT: usize = 64;
/// Entries per node (leaf or interior).
pub const NODE_CAPACITY: usize = (BLOCK_SIZE - ENTRIES_AT) / ENTRY_LEN;
/// Longest extent one entry can describe (16-bit length).
pub const MAX_EXTENT_BLOCKS: u64 = u16::MAX as u64;
/// Deepest tree a decoder accepts (252^8 entries is far beyond 2^48 blocks).
pub const MAX_LEVEL: u16 = 8;

/// Extent flag: the range reads as zeros and owns no physical blocks (masks
/// data of a clone's origin).
pub const EXTENT_ZERO: u8 = 1;

/// A run of `len` virtual blocks starting at `vblock`, stored at physical
/// blocks `pblock..pblock+len` (unless it is a zero extent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub vblock: u64,
    pub pblock: u64,
    pub len: u32,
    pub flags: u8,
}

impl Extent {
    pub fn vend(&self) -> u64 {
        self.vblock + self.len as u64
    }

    pub fn is_zero(&self) -> bool {
        self.flags & EXTENT_ZERO != 0
    }

    fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.vblock | (self.flags as u64) << 48);
        put_u64(b, 8, self.pblock | (self.len as u64) << 48);
    }

    fn decode(b: &[u8]) -> Extent {
        let a = get_u64(b, 0);
        let p = get_u64(b, 8);
        Extent {
            vblock: a & (MAX_BLOCKS - 1),
            flags: (a >> 48) as u8,
            pblock: p & (MAX_BLOCKS - 1),
            len: (p >> 48) as u32,
        }
    }
}

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Leaf(Vec<Extent>),
    /// (first virtual block covered, child block) pairs, keys ascending.
    Interior {
        level: u16,
        children: Vec<(u64, u64)>,
    },
}

pub fn encode(node: &Node, volume_id: u64, generation: u64, at_block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    put_u64(&mut b, O_VOLUME, volume_id);
    let level = match node {
        Node::Leaf(extents) => {
            put_u32(&mut b, O_COUNT, extents.len() as u32);
            for (i, e) in extents.iter().enumerate() {
                let off = ENTRIES_AT + i * ENTRY_LEN;
                e.encode(&mut b[off..off + ENTRY_LEN]);
            }
            0
        }
        Node::Interior { level, children } => {
            put_u32(&mut b, O_COUNT, children.len() as u32);
            for (i, &(key, child)) in children.iter().enumerate() {
                let off = ENTRIES_AT + i * ENTRY_LEN;
                put_u64(&mut b, off, key);
                put_u64(&mut b, off + 8, child);
            }
            *level
        }
    };
    codec::seal(
        &mut b,
        &Header {
            magic: *magic::NODE,
            aux: level,
            self_block: at_block,
            seq: generation,
        },
    );
    b
}

/// Decodes a node and checks what can be checked locally: entry count,
/// sorted non-overlapping keys, lengths and address ranges.
pub fn decode(b: &[u8], at_block: u64) -> Result<Node> {
    let hdr = codec::open(b, magic::NODE, at_block, "mapping node")?;
    let bad = |what: String| Error::Corrupt(format!("mapping node at block {at_block}: {what}"));
    let count = get_u32(b, O_COUNT) as usize;
    if count > NODE_CAPACITY {
        return Err(bad(format!("{count} entries, at most {NODE_CAPACITY} fit")));
    }
    if hdr.aux > MAX_LEVEL {
        return Err(bad(format!(
            "level {} is deeper than any valid tree",
            hdr.aux
        )));
    }
    let entry = |i: usize| &b[ENTRIES_AT + i * ENTRY_LEN..ENTRIES_AT + (i + 1) * ENTRY_LEN];
    if hdr.aux == 0 {
        let mut extents = Vec::with_capacity(count);
        let mut prev_end = 0u64;
        for i in 0..count {
            let e = Extent::decode(entry(i));
            if e.len == 0 || e.flags & !EXTENT_ZERO != 0 || get_u64(entry(i), 0) >> 56 != 0 {
                return Err(bad(format!("extent {i} has an invalid length or flags")));
            }
            if e.vend() > MAX_BLOCKS || e.pblock + e.len as u64 > MAX_BLOCKS {
                return Err(bad(format!("extent {i} runs past the largest address")));
            }
            if i > 0 && e.vblock < prev_end {
                return Err(bad(format!("extent {i} overlaps or is out of order")));
            }
            prev_end = e.vend();
            extents.push(e);
        }
        Ok(Node::Leaf(extents))
    } else {
        if count == 0 {
            return Err(bad("interior node without children".into()));
        }
        let mut children = Vec::with_capacity(count);
        for i in 0..count {
            let key = get_u64(entry(i), 0);
            let child = get_u64(entry(i), 8);
            if key >= MAX_BLOCKS || child == 0 || child >= MAX_BLOCKS {
                return Err(bad(format!("child {i} has an invalid key or address")));
            }
            if let Some(&(pk, _)) = children.last() {
                if key <= pk {
                    return Err(bad(format!("child {i} key is out of order")));
                }
            }
            children.push((key, child));
        }
        Ok(Node::Interior {
            level: hdr.aux,
            children,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_and_interior_roundtrip() {
        let leaf = Node::Leaf(vec![
            Extent {
                vblock: 0,
                pblock: 1000,
                len: 3,
                flags: 0,
            },
            Extent {
                vblock: (1 << 47) + 5,
                pblock: 0,
                len: 65535,
                flags: EXTENT_ZERO,
            },
        ]);
        let b = encode(&leaf, 3, 1, 77);
        assert_eq!(decode(&b, 77).unwrap(), leaf);
        let int = Node::Interior {
            level: 1,
            children: vec![(0, 500), (900, 501)],
        };
        let b = encode(&int, 3, 1, 78);
        assert_eq!(decode(&b, 78).unwrap(), int);
    }

    #[test]
    fn full_leaf_fits() {
        let extents: Vec<Extent> = (0..NODE_CAPACITY as u64)
            .map(|i| Extent {
                vblock: i * 2,
                pblock: 10_000 + i,
                len: 1,
                flags: 0,
            })
            .collect();
        let n = Node::Leaf(extents);
        assert_eq!(decode(&encode(&n, 1, 1, 5), 5).unwrap(), n);
    }
}
