//! Reading a volume's tree: level by level in batches, every node verified,
//! damage confined to the subtree of a bad node.

use crate::alloc::space::SpaceMap;
use crate::dev::{read_blocks, BlockDevice};
use crate::error::{Error, Result};
use crate::format::catalog::{VolumeHeader, VolumeRecord};
use crate::format::node::{self, Node};
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

/// Loads a volume's tree, level by level with batched reads, checking that
/// every node's keys lie inside the range its parent gives it. Interior
/// node blocks are appended to `interior_out`.
///
/// A node that fails its checks (damaged, misdirected, wrong level, keys
/// outside its range) does not fail the load: its subtree is left out and
/// its key range returned as damage, so one bad node costs the volumes
/// that share it, not the pool. Read errors of the device still fail.
pub(super) fn load_tree(
    dev: &dyn BlockDevice,
    cache: &mut LeafCache,
    rec: &VolumeRecord,
    h: &VolumeHeader,
    interior_out: &mut Vec<u64>,
) -> Result<(ExtentMap, Vec<Damage>)> {
    if h.root == 0 {
        return Ok((ExtentMap::new(), Vec::new()));
    }
    // (block, key lower bound, key upper bound, expected level)
    let mut level: Vec<(u64, u64, u64, u16)> = vec![(h.root, 0, u64::MAX, h.depth)];
    let mut interior = Vec::new();
    let mut leaves: Vec<(u64, Arc<Leaf>)> = Vec::new();
    let mut own_leaves = HashSet::new();
    let mut lost: Vec<Damage> = Vec::new();
    let damage = |node: u64, lo: u64, hi: u64, why: &str| Damage {
        lo,
        hi,
        node,
        why: format!("mapping node at block {node}: {why}"),
    };
    while !level.is_empty() {
        let mut next = Vec::new();
        for batch in level.chunks(LOAD_BATCH) {
            // Shared leaves already loaded need no read.
            let mut to_read = Vec::new();
            for &(block, lo, hi, want_level) in batch {
                match cache.get(&block) {
                    Some(leaf) if want_level == 0 => {
                        if !own_leaves.insert(block) {
                            lost.push(damage(block, lo, hi, "referenced twice in one tree"));
                        } else if !leaf.within(lo, hi) {
                            lost.push(damage(
                                block,
                                lo,
                                hi,
                                "extents outside the range the parent node gives",
                            ));
                        } else {
                            leaves.push((lo, leaf.clone()));
                        }
                    }
                    _ => to_read.push((block, lo, hi, want_level)),
                }
            }
            let blocks: Vec<u64> = to_read.iter().map(|l| l.0).collect();
            let bufs = read_blocks(dev, &blocks, "reading mapping nodes")?;
            for (i, &(block, lo, hi, want_level)) in to_read.iter().enumerate() {
                let decoded = match node::decode(&bufs[i], block) {
                    Ok(n) => n,
                    Err(e) => {
                        let why = match e {
                            Error::Corrupt(m) => m,
                            e => e.to_string(),
                        };
                        lost.push(Damage {
                            lo,
                            hi,
                            node: block,
                            why,
                        });
                        continue;
                    }
                };
                match decoded {
                    Node::Leaf(extents) => {
                        if want_level != 0 {
                            lost.push(damage(
                                block,
                                lo,
                                hi,
                                "leaf found where an interior node belongs",
                            ));
                        } else if extents.first().is_some_and(|e| e.vblock < lo)
                            || extents.last().is_some_and(|e| e.vend() > hi)
                        {
                            lost.push(damage(
                                block,
                                lo,
                                hi,
                                "extents outside the range the parent node gives",
                            ));
                        } else if !own_leaves.insert(block) {
                            lost.push(damage(block, lo, hi, "referenced twice in one tree"));
                        } else {
                            let leaf = Leaf::new_loaded(&extents, block);
                            cache.insert(block, leaf.clone());
                            leaves.push((lo, leaf));
                        }
                    }
                    Node::Interior { level: l, children } => {
                        if l != want_level || l == 0 {
                            lost.push(damage(block, lo, hi, "wrong tree level"));
                        } else if children[0].0 != lo || children.last().is_some_and(|c| c.0 >= hi)
                        {
                            lost.push(damage(
                                block,
                                lo,
                                hi,
                                "child keys outside the range the parent node gives",
                            ));
                        } else {
                            for (i, &(key, child)) in children.iter().enumerate() {
                                let child_hi = children.get(i + 1).map_or(hi, |c| c.0);
                                next.push((child, key, child_hi, l - 1));
                            }
                            interior.push(block);
                        }
                    }
                }
            }
        }
        level = next;
    }
    leaves.sort_by_key(|l| l.0);
    lost.sort_by_key(|d| d.lo);
    interior_out.extend(&interior);
    let map = ExtentMap::from_leaves(leaves, interior);
    if lost.is_empty()
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
    Ok((map, lost))
}
