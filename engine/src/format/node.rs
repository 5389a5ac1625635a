//! Mapping-tree nodes. A volume's mapping is a B+tree of 4 KiB nodes:
//! leaves hold extents (virtual block run -> physical block run), interior
//! nodes hold (first virtual block, child node) pairs. Nodes are never
//! updated in place: a checkpoint writes changed nodes to new blocks.
//!
//! On a pool with ditto nodes (`INCOMPAT_DITTO_NODES`) every node is
//! written twice, to blocks far apart, and whatever points at a node names
//! both copies ([`NodeAddr`]). Those nodes are record version 2: each copy
//! names its twin, and interior entries carry the child's twin address.

use super::codec::{self, get_u32, get_u64, put_u32, put_u64, Header, HEADER_LEN};
use super::{magic, BLOCK_SIZE, MAX_BLOCKS};
use crate::error::{Error, Result};

/// Bytes per leaf entry, and per interior entry of a version-1 node.
pub const ENTRY_LEN: usize = 16;
/// An interior entry of a version-2 node: key, child, child's twin.
const DITTO_ENTRY_LEN: usize = 24;
const O_VOLUME: usize = HEADER_LEN;
const O_COUNT: usize = HEADER_LEN + 8;
/// Version 2: the block of this node's other copy.
const O_TWIN: usize = HEADER_LEN + 16;
const ENTRIES_AT: usize = 64;
/// Entries per node (leaf, or interior node of a single-copy tree).
pub const NODE_CAPACITY: usize = (BLOCK_SIZE - ENTRIES_AT) / ENTRY_LEN;
/// Children per interior node of a tree with ditto nodes.
pub const DITTO_INTERIOR_CAPACITY: usize = (BLOCK_SIZE - ENTRIES_AT) / DITTO_ENTRY_LEN;
/// Record version of nodes written with a twin (version 1: single copy).
pub const DITTO_NODE_VERSION: u32 = 2;
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
    /// First virtual block.
    pub vblock: u64,
    /// First physical block (0 for a zero extent).
    pub pblock: u64,
    /// Blocks in the run (at most [`MAX_EXTENT_BLOCKS`]).
    pub len: u32,
    /// Extent flags ([`EXTENT_ZERO`]).
    pub flags: u8,
}

impl Extent {
    /// One past the last virtual block.
    pub fn vend(&self) -> u64 {
        self.vblock + self.len as u64
    }

    /// Whether the run reads as zeros and owns no physical blocks.
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

/// Where a node is on the LUN: its block and, for a ditto node, the block
/// of its second copy (`twin` 0: the node has one copy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    /// The node's (first) copy; 0 = no node.
    pub block: u64,
    /// The second copy of a ditto node; 0 = none.
    pub twin: u64,
}

impl NodeAddr {
    /// No node (an empty tree's root).
    pub const NONE: NodeAddr = NodeAddr { block: 0, twin: 0 };

    /// A node with one copy, at `block`.
    pub fn single(block: u64) -> NodeAddr {
        NodeAddr { block, twin: 0 }
    }

    /// Whether this names no node.
    pub fn is_none(&self) -> bool {
        self.block == 0
    }

    /// The blocks the node occupies (none, one or two).
    pub fn blocks(self) -> impl Iterator<Item = u64> {
        [self.block, self.twin].into_iter().filter(|&b| b != 0)
    }
}

/// An interior node's entry: the first virtual block the child covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Child {
    /// The first virtual block under the child.
    pub key: u64,
    /// Where the child is.
    pub at: NodeAddr,
}

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// Level 0: extents in ascending virtual order.
    Leaf(Vec<Extent>),
    /// Children in ascending key order.
    Interior {
        /// Height above the leaves (1 = children are leaves).
        level: u16,
        /// Its children, by key.
        children: Vec<Child>,
    },
}

impl Node {
    /// Whether the node must be written as version 2: an interior node
    /// with a twinned child (a leaf's layout is the same in both).
    fn needs_ditto_layout(&self) -> bool {
        match self {
            Node::Leaf(_) => false,
            Node::Interior { children, .. } => children.iter().any(|c| c.at.twin != 0),
        }
    }
}

/// Encodes `node` for every block of `at`: one buffer for a single-copy
/// node, two for a ditto node (each copy names its own block and its
/// twin's). A node with a twinned child must itself have a twin.
pub fn encode_copies(
    node: &Node,
    volume_id: u64,
    generation: u64,
    at: NodeAddr,
) -> Vec<(u64, Vec<u8>)> {
    if at.twin == 0 {
        debug_assert!(!node.needs_ditto_layout());
        return vec![(at.block, encode(node, volume_id, generation, at.block))];
    }
    let first = encode_version(node, volume_id, generation, at.block, at.twin);
    let mut second = first.clone();
    reseal_copy(&mut second, at.twin, at.block);
    vec![(at.block, first), (at.twin, second)]
}

/// The other copy of the ditto node `good` (read at `good_block`, and
/// checked here): where it belongs and its contents, to rewrite a bad copy
/// from its twin.
pub fn twin_copy(good: &[u8], good_block: u64) -> Result<(u64, Vec<u8>)> {
    let d = decode_copy(good, good_block)?;
    if d.twin == 0 {
        return Err(Error::Corrupt(format!(
            "mapping node at block {good_block} has no twin"
        )));
    }
    let mut b = good.to_vec();
    reseal_copy(&mut b, d.twin, good_block);
    Ok((d.twin, b))
}

/// Rewrites an encoded version-2 node for the other location of the pair.
fn reseal_copy(b: &mut [u8], at_block: u64, twin: u64) {
    put_u64(b, O_TWIN, twin);
    let hdr = Header {
        magic: *magic::NODE,
        aux: codec::get_u16(b, 10),
        self_block: at_block,
        seq: get_u64(b, 24),
    };
    codec::seal_version(b, &hdr, DITTO_NODE_VERSION);
}

/// Encodes a single-copy (version 1) node.
pub fn encode(node: &Node, volume_id: u64, generation: u64, at_block: u64) -> Vec<u8> {
    encode_version(node, volume_id, generation, at_block, 0)
}

/// Version 1 when `twin` is 0, else version 2 naming `twin`.
fn encode_version(
    node: &Node,
    volume_id: u64,
    generation: u64,
    at_block: u64,
    twin: u64,
) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    put_u64(&mut b, O_VOLUME, volume_id);
    let ditto = twin != 0;
    if ditto {
        put_u64(&mut b, O_TWIN, twin);
    }
    let entry_len = if ditto { DITTO_ENTRY_LEN } else { ENTRY_LEN };
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
            for (i, c) in children.iter().enumerate() {
                let off = ENTRIES_AT + i * entry_len;
                put_u64(&mut b, off, c.key);
                put_u64(&mut b, off + 8, c.at.block);
                if ditto {
                    put_u64(&mut b, off + 16, c.at.twin);
                }
            }
            *level
        }
    };
    let hdr = Header {
        magic: *magic::NODE,
        aux: level,
        self_block: at_block,
        seq: generation,
    };
    codec::seal_version(&mut b, &hdr, if ditto { DITTO_NODE_VERSION } else { 1 });
    b
}

/// Builds the interior levels of a tree above `children` (its leaves, in
/// key order): each node is placed by `alloc` and handed to `emit`.
/// Returns the root (none for an empty tree) and the tree's depth.
pub fn build_interior(
    mut children: Vec<Child>,
    ditto: bool,
    mut alloc: impl FnMut() -> Result<NodeAddr>,
    mut emit: impl FnMut(NodeAddr, Node),
) -> Result<(NodeAddr, u16)> {
    let fanout = if ditto {
        DITTO_INTERIOR_CAPACITY
    } else {
        NODE_CAPACITY
    };
    let mut depth = 0u16;
    while children.len() > 1 {
        depth += 1;
        let mut parents = Vec::with_capacity(children.len().div_ceil(fanout));
        for group in children.chunks(fanout) {
            let at = alloc()?;
            parents.push(Child {
                key: group[0].key,
                at,
            });
            let children = group.to_vec();
            emit(
                at,
                Node::Interior {
                    level: depth,
                    children,
                },
            );
        }
        children = parents;
    }
    Ok((children.first().map_or(NodeAddr::NONE, |c| c.at), depth))
}

/// A decoded node with what its header says about its copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The node's contents.
    pub node: Node,
    /// The block of the other copy (version 2), else 0.
    pub twin: u64,
}

/// Decodes a node of either version (a single-copy node has `twin` 0).
/// The fuzz targets' and seeds' entry point; the engine itself keeps the
/// twin ([`decode_copy`]).
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code))]
pub fn decode(b: &[u8], at_block: u64) -> Result<Node> {
    decode_copy(b, at_block).map(|d| d.node)
}

/// Decodes a node and checks what can be checked locally: entry count,
/// sorted non-overlapping keys, lengths and address ranges.
pub fn decode_copy(b: &[u8], at_block: u64) -> Result<Decoded> {
    let (hdr, version) =
        codec::open_version(b, magic::NODE, at_block, "mapping node", DITTO_NODE_VERSION)?;
    let bad = |what: String| Error::Corrupt(format!("mapping node at block {at_block}: {what}"));
    let ditto = version == DITTO_NODE_VERSION;
    let twin = if ditto { get_u64(b, O_TWIN) } else { 0 };
    if ditto && (twin == 0 || twin == at_block || twin >= MAX_BLOCKS) {
        return Err(bad(format!("invalid twin address {twin}")));
    }
    let (entry_len, capacity) = if ditto && hdr.aux > 0 {
        (DITTO_ENTRY_LEN, DITTO_INTERIOR_CAPACITY)
    } else {
        (ENTRY_LEN, NODE_CAPACITY)
    };
    let count = get_u32(b, O_COUNT) as usize;
    if count > capacity {
        return Err(bad(format!("{count} entries, at most {capacity} fit")));
    }
    if hdr.aux > MAX_LEVEL {
        return Err(bad(format!(
            "level {} is deeper than any valid tree",
            hdr.aux
        )));
    }
    let entry = |i: usize| &b[ENTRIES_AT + i * entry_len..ENTRIES_AT + (i + 1) * entry_len];
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
        Ok(Decoded {
            node: Node::Leaf(extents),
            twin,
        })
    } else {
        if count == 0 {
            return Err(bad("interior node without children".into()));
        }
        let mut children = Vec::with_capacity(count);
        for i in 0..count {
            let key = get_u64(entry(i), 0);
            let block = get_u64(entry(i), 8);
            let twin = if ditto { get_u64(entry(i), 16) } else { 0 };
            if key >= MAX_BLOCKS || block == 0 || block >= MAX_BLOCKS {
                return Err(bad(format!("child {i} has an invalid key or address")));
            }
            if twin >= MAX_BLOCKS || twin == block {
                return Err(bad(format!("child {i} has an invalid twin address")));
            }
            if children.last().is_some_and(|c: &Child| key <= c.key) {
                return Err(bad(format!("child {i} key is out of order")));
            }
            children.push(Child {
                key,
                at: NodeAddr { block, twin },
            });
        }
        Ok(Decoded {
            node: Node::Interior {
                level: hdr.aux,
                children,
            },
            twin,
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
            children: vec![child(0, 500, 0), child(900, 501, 0)],
        };
        let b = encode(&int, 3, 1, 78);
        assert_eq!(decode(&b, 78).unwrap(), int);
    }

    fn child(key: u64, block: u64, twin: u64) -> Child {
        Child {
            key,
            at: NodeAddr { block, twin },
        }
    }

    #[test]
    fn ditto_copies_name_each_other_and_hold_the_same_node() {
        let children: Vec<Child> = (0..DITTO_INTERIOR_CAPACITY as u64)
            .map(|i| child(i * 10, 1000 + i, 90_000 + i))
            .collect();
        let int = Node::Interior { level: 2, children };
        let at = NodeAddr {
            block: 77,
            twin: 5077,
        };
        let copies = encode_copies(&int, 3, 9, at);
        assert_eq!(copies.len(), 2);
        assert_eq!((copies[0].0, copies[1].0), (77, 5077));
        let a = decode_copy(&copies[0].1, 77).unwrap();
        let b = decode_copy(&copies[1].1, 5077).unwrap();
        assert_eq!((a.twin, b.twin), (5077, 77));
        assert_eq!(a.node, int);
        assert_eq!(b.node, int);
        // Each copy is valid only where it was written.
        assert!(decode(&copies[0].1, 5077).is_err());
        // A single-copy leaf is version 1, as before ditto nodes.
        let leaf = encode_copies(&Node::Leaf(Vec::new()), 3, 9, NodeAddr::single(40));
        assert_eq!(leaf.len(), 1);
        assert_eq!(codec::get_u16(&leaf[0].1, 8), 1);
        assert_eq!(decode_copy(&leaf[0].1, 40).unwrap().twin, 0);
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
