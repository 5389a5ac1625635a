//! Reading a volume's tree: level by level in batches, every node verified,
//! damage confined to the subtree of a bad node.

use crate::alloc::space::SpaceMap;
use crate::dev::{read_block, read_blocks, BlockDevice};
use crate::error::{Error, Result};
use crate::format::catalog::{VolumeHeader, VolumeRecord};
use crate::format::node::{self, Node, NodeAddr};
use crate::format::Layout;
use crate::map::extmap::{ExtentMap, Leaf};
use crate::map::state::Damage;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub(super) fn mark(
    space: &mut SpaceMap,
    layout: &Layout,
    pblock: u64,
    len: u64,
    what: &dyn Fn() -> String,
) -> Result<()> {
    if !layout.is_data_block(pblock) || !layout.is_data_block(pblock + len - 1) {
        return Err(Error::Corrupt(format!(
            "{} points outside the data area (blocks {pblock}..{})",
            what(),
            pblock + len
        )));
    }
    space.mark_used(pblock, len).map_err(|d| {
        Error::Corrupt(format!(
            "{} uses block {} which is already used elsewhere (owned twice)",
            what(),
            d.0
        ))
    })
}

/// Blocks read per batch while loading trees (bounds memory at open).
const LOAD_BATCH: usize = 2048;

/// Leaves already loaded, by block: snapshots and clones share leaves with
/// their origin, and each shared leaf is read and counted once.
pub(crate) type LeafCache = HashMap<u64, Arc<Leaf>>;

/// Which copies of ditto nodes a load reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copies {
    /// The first copy, and the second only where the first is bad (open).
    First,
    /// Both copies of every node (check).
    Both,
}

/// One copy of a ditto node that is bad while its twin is good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BadCopy {
    pub block: u64,
    /// The good copy: the bad one is rewritten from it.
    pub good: u64,
    pub why: String,
}

impl BadCopy {
    /// The bad copy as its good twin says it should be: (block, contents).
    pub(crate) fn rewrite_from_twin(&self, dev: &dyn BlockDevice) -> Result<(u64, Vec<u8>)> {
        let good = read_block(dev, self.good).map_err(|e| Error::io("reading mapping node", e))?;
        let (at, copy) = node::twin_copy(&good, self.good)?;
        if at != self.block {
            return Err(Error::Corrupt(format!(
                "mapping node at block {}: its twin names block {at}",
                self.block
            )));
        }
        Ok((at, copy))
    }
}

/// What loading one volume's tree found.
pub(super) struct LoadedTree {
    pub map: ExtentMap,
    /// Key ranges lost with nodes of which no copy is good.
    pub damage: Vec<Damage>,
    /// Bad copies of nodes whose twin was used.
    pub bad_copies: Vec<BadCopy>,
}

/// A node to read, with the key range its parent gives it.
#[derive(Clone, Copy)]
struct Pending {
    at: NodeAddr,
    lo: u64,
    hi: u64,
    level: u16,
}

/// Loads a volume's tree, level by level with batched reads, checking that
/// every node's keys lie inside the range its parent gives it. Interior
/// node blocks (both copies) are appended to `interior_out`.
///
/// A ditto node whose first copy is bad or unreadable is read from its
/// twin. A node of which no copy passes its checks (damaged, misdirected,
/// wrong level, keys outside its range) does not fail the load: its
/// subtree is left out and its key range returned as damage, so one bad
/// node costs the volumes that share it, not the pool. A read error on a
/// node without a good twin still fails: the node may be fine, and
/// treating it as lost would let its blocks be reused.
pub(super) fn load_tree(
    dev: &dyn BlockDevice,
    cache: &mut LeafCache,
    rec: &VolumeRecord,
    h: &VolumeHeader,
    copies: Copies,
    interior_out: &mut Vec<u64>,
) -> Result<LoadedTree> {
    let mut out = LoadedTree {
        map: ExtentMap::new(),
        damage: Vec::new(),
        bad_copies: Vec::new(),
    };
    if h.root.is_none() {
        return Ok(out);
    }
    let mut level = vec![Pending {
        at: h.root,
        lo: 0,
        hi: u64::MAX,
        level: h.depth,
    }];
    let mut interior = Vec::new();
    let mut leaves: Vec<(u64, Arc<Leaf>)> = Vec::new();
    let mut own_leaves = HashSet::new();
    while !level.is_empty() {
        let mut next = Vec::new();
        for batch in level.chunks(LOAD_BATCH) {
            // Shared leaves already loaded need no read.
            let mut to_read = Vec::new();
            for p in batch {
                match cache.get(&p.at.block) {
                    Some(leaf) if p.level == 0 => {
                        if !own_leaves.insert(p.at.block) {
                            out.damage
                                .push(damage(p, "referenced twice in one tree".into()));
                        } else if !leaf.within(p.lo, p.hi) {
                            out.damage.push(damage(p, OUTSIDE.into()));
                        } else {
                            leaves.push((p.lo, leaf.clone()));
                        }
                    }
                    _ => to_read.push(*p),
                }
            }
            for (p, node) in read_nodes(dev, &to_read, copies, &mut out)? {
                match node {
                    Node::Leaf(extents) => {
                        if !own_leaves.insert(p.at.block) {
                            out.damage
                                .push(damage(&p, "referenced twice in one tree".into()));
                        } else {
                            let leaf = Leaf::new_loaded(&extents, p.at);
                            cache.insert(p.at.block, leaf.clone());
                            leaves.push((p.lo, leaf));
                        }
                    }
                    Node::Interior { level: l, children } => {
                        for (i, c) in children.iter().enumerate() {
                            next.push(Pending {
                                at: c.at,
                                lo: c.key,
                                hi: children.get(i + 1).map_or(p.hi, |n| n.key),
                                level: l - 1,
                            });
                        }
                        interior.extend(p.at.blocks());
                    }
                }
            }
        }
        level = next;
    }
    leaves.sort_by_key(|l| l.0);
    out.damage.sort_by_key(|d| d.lo);
    interior_out.extend(&interior);
    out.map = ExtentMap::from_leaves(leaves, interior);
    let map = &out.map;
    if out.damage.is_empty()
        && (map.mapped_blocks() != h.mapped_blocks || map.extent_count() != h.extent_count)
    {
        return Err(Error::Corrupt(format!(
            "volume '{}': header says {} mapped blocks in {} extents, tree holds {} in {}",
            rec.name,
            h.mapped_blocks,
            h.extent_count,
            map.mapped_blocks(),
            map.extent_count()
        )));
    }
    Ok(out)
}

const OUTSIDE: &str = "extents outside the range the parent node gives";

fn damage(p: &Pending, why: String) -> Damage {
    Damage {
        lo: p.lo,
        hi: p.hi,
        node: p.at.block,
        twin: p.at.twin,
        why,
    }
}

/// Reads and checks the nodes `to_read`, each from the first of its copies
/// that is good. Returns the good ones; the others go to `out.damage`, and
/// bad copies with a good twin to `out.bad_copies`.
fn read_nodes(
    dev: &dyn BlockDevice,
    to_read: &[Pending],
    copies: Copies,
    out: &mut LoadedTree,
) -> Result<Vec<(Pending, Node)>> {
    let firsts: Vec<u64> = to_read.iter().map(|p| p.at.block).collect();
    let first = read_checked(dev, &firsts, |i, b| {
        let p = &to_read[i];
        accept(b, p.at.block, p.at.twin, p)
    });
    let wanted =
        |p: &Pending, a: &Result<Node>| p.at.twin != 0 && (copies == Copies::Both || a.is_err());
    let twins: Vec<&Pending> = to_read
        .iter()
        .zip(&first)
        .filter(|(p, a)| wanted(p, a))
        .map(|(p, _)| p)
        .collect();
    let seconds: Vec<u64> = twins.iter().map(|p| p.at.twin).collect();
    let mut second = read_checked(dev, &seconds, |i, b| {
        let p = twins[i];
        accept(b, p.at.twin, p.at.block, p)
    })
    .into_iter();
    let mut good = Vec::with_capacity(to_read.len());
    for (p, a) in to_read.iter().zip(first) {
        let b = if wanted(p, &a) { second.next() } else { None };
        let bad = |block: u64, good: u64, why: String| BadCopy { block, good, why };
        match (a, b) {
            (Ok(n), None) => good.push((*p, n)),
            (Ok(n), Some(Ok(m))) if n == m => good.push((*p, n)),
            (Ok(n), Some(Ok(_))) => {
                let why = "holds another node than its twin".to_string();
                out.bad_copies.push(bad(p.at.twin, p.at.block, why));
                good.push((*p, n));
            }
            (Ok(n), Some(Err(e))) => {
                out.bad_copies.push(bad(p.at.twin, p.at.block, reason(e)));
                good.push((*p, n));
            }
            (Err(e), Some(Ok(m))) => {
                out.bad_copies.push(bad(p.at.block, p.at.twin, reason(e)));
                good.push((*p, m));
            }
            // No good copy and one unreadable: the node may be fine.
            (Err(e @ Error::Io { .. }), _) => return Err(e),
            (Err(_), Some(Err(f @ Error::Io { .. }))) => return Err(f),
            (Err(e), None) => out.damage.push(damage(p, reason(e))),
            (Err(e), Some(Err(f))) => {
                let why = format!(
                    "{}; its twin at block {}: {}",
                    reason(e),
                    p.at.twin,
                    reason(f)
                );
                out.damage.push(damage(p, why));
            }
        }
    }
    Ok(good)
}

fn reason(e: Error) -> String {
    match e {
        Error::Corrupt(m) => m,
        e => e.to_string(),
    }
}

/// Reads `blocks` in one batch and checks block `i` with `check(i, ..)`;
/// if the batch fails, reads each on its own, so an unreadable block
/// costs only its node.
fn read_checked(
    dev: &dyn BlockDevice,
    blocks: &[u64],
    check: impl Fn(usize, &[u8]) -> Result<Node>,
) -> Vec<Result<Node>> {
    if blocks.is_empty() {
        return Vec::new();
    }
    if let Ok(bufs) = read_blocks(dev, blocks, "reading mapping nodes") {
        return (0..blocks.len()).map(|i| check(i, &bufs[i])).collect();
    }
    blocks
        .iter()
        .enumerate()
        .map(|(i, &b)| match read_block(dev, b) {
            Ok(buf) => check(i, &buf),
            Err(e) => Err(Error::io("reading mapping node", e)),
        })
        .collect()
}

/// Decodes one copy of a node and checks it against what its parent says:
/// its twin, its level and its key range.
fn accept(b: &[u8], block: u64, twin: u64, p: &Pending) -> Result<Node> {
    let bad = |why: &str| Error::Corrupt(format!("mapping node at block {block}: {why}"));
    let d = node::decode_copy(b, block)?;
    if d.twin != twin {
        return Err(bad(&format!(
            "names block {} as its twin, its parent block {twin}",
            d.twin
        )));
    }
    match &d.node {
        Node::Leaf(_) if p.level != 0 => Err(bad("leaf found where an interior node belongs")),
        Node::Leaf(extents)
            if extents.first().is_some_and(|e| e.vblock < p.lo)
                || extents.last().is_some_and(|e| e.vend() > p.hi) =>
        {
            Err(bad(OUTSIDE))
        }
        Node::Interior { level, .. } if *level != p.level || *level == 0 => {
            Err(bad("wrong tree level"))
        }
        Node::Interior { children, .. }
            if children[0].key != p.lo || children.last().is_some_and(|c| c.key >= p.hi) =>
        {
            Err(bad("child keys outside the range the parent node gives"))
        }
        _ => Ok(d.node),
    }
}
