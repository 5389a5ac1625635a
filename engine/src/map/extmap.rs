//! A volume's mapping in memory: virtual block runs -> physical block runs,
//! kept in leaves of at most one on-disk node's worth of extents, so a
//! checkpoint writes exactly the leaves that changed. Each extent costs 16
//! bytes in memory, as on disk.

use crate::format::node::{Extent, NodeAddr, EXTENT_ZERO, MAX_EXTENT_BLOCKS, NODE_CAPACITY};
use crate::format::MAX_BLOCKS;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// An extent packed as on disk: (vblock | flags << 48, pblock | len << 48).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Packed(u64, u64);

impl Packed {
    fn pack(e: Extent) -> Packed {
        Packed(
            e.vblock | (e.flags as u64) << 48,
            e.pblock | (e.len as u64) << 48,
        )
    }
    fn unpack(self) -> Extent {
        Extent {
            vblock: self.0 & (MAX_BLOCKS - 1),
            flags: (self.0 >> 48) as u8,
            pblock: self.1 & (MAX_BLOCKS - 1),
            len: (self.1 >> 48) as u32,
        }
    }
    fn vblock(self) -> u64 {
        self.0 & (MAX_BLOCKS - 1)
    }
    fn vend(self) -> u64 {
        self.vblock() + (self.1 >> 48)
    }
}

/// What a virtual range resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Stored at `pblock..pblock+len`; `shared_leaf` when the leaf holding
    /// it is shared with a snapshot or clone (so the blocks are too).
    Mapped {
        vblock: u64,
        pblock: u64,
        len: u64,
        shared_leaf: bool,
    },
    /// Never written or unmapped: reads as zeros.
    Hole { vblock: u64, len: u64 },
    /// Explicitly zeroed.
    Zero { vblock: u64, len: u64 },
}

impl Segment {
    pub fn len(&self) -> u64 {
        match *self {
            Segment::Mapped { len, .. } | Segment::Hole { len, .. } | Segment::Zero { len, .. } => {
                len
            }
        }
    }
}

/// A leaf: up to one node's worth of extents. Leaves are shared (by
/// reference count) between a volume and its snapshots and clones; a
/// volume that changes a shared leaf changes its own copy.
#[derive(Debug, Default)]
pub(crate) struct Leaf {
    /// Behind an `Arc` of its own so a checkpoint can take the extents
    /// under the state lock for the price of a reference, and unpack and
    /// encode them after; a change meanwhile copies them (`make_mut`).
    /// Sharing between volumes is the outer `Arc<Leaf>`'s count.
    extents: Arc<Vec<Packed>>,
    /// Block holding this leaf on disk (0 = not written yet), and its
    /// twin's on a pool with ditto nodes. Atomic so a checkpoint can record
    /// them in a leaf that is shared meanwhile (always under the state
    /// lock); the contents of a shared leaf never change.
    disk: AtomicU64,
    twin: AtomicU64,
    /// Changes on every update, so a checkpoint can tell whether the leaf
    /// it wrote is still the current one.
    version: u64,
}

impl Clone for Leaf {
    /// A copy is a new leaf: not on disk yet.
    fn clone(&self) -> Leaf {
        Leaf {
            extents: self.extents.clone(),
            disk: AtomicU64::new(0),
            twin: AtomicU64::new(0),
            version: self.version,
        }
    }
}

impl Leaf {
    pub(crate) fn new_loaded(extents: &[Extent], at: NodeAddr) -> Arc<Leaf> {
        // Not `into_iter().collect()` from a Vec<Extent>: that would reuse
        // the 24-byte-per-entry allocation for 16-byte entries.
        let mut v = Vec::with_capacity(extents.len());
        v.extend(extents.iter().map(|&e| Packed::pack(e)));
        Arc::new(Leaf {
            extents: Arc::new(v),
            disk: AtomicU64::new(at.block),
            twin: AtomicU64::new(at.twin),
            version: 0,
        })
    }

    /// Where the leaf is on disk ([`NodeAddr::NONE`]: not written yet).
    pub(crate) fn disk(&self) -> NodeAddr {
        NodeAddr {
            block: self.disk.load(Relaxed),
            twin: self.twin.load(Relaxed),
        }
    }

    fn set_disk(&self, at: NodeAddr) {
        self.twin.store(at.twin, Relaxed);
        self.disk.store(at.block, Relaxed);
    }

    /// Whether every extent lies in virtual blocks `lo..hi`.
    pub(crate) fn within(&self, lo: u64, hi: u64) -> bool {
        self.extents.first().is_none_or(|e| e.vblock() >= lo)
            && self.extents.last().is_none_or(|e| e.vend() <= hi)
    }

    pub(crate) fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.extents.iter().map(|p| p.unpack())
    }

    /// Data runs the leaf maps (zero extents own no blocks).
    pub(crate) fn data_runs(&self) -> impl Iterator<Item = Freed> + '_ {
        self.extents
            .iter()
            .map(|p| p.unpack())
            .filter(|e| !e.is_zero())
            .map(|e| (e.pblock, e.len as u64))
    }
}

/// Data reference changes caused by a mapping update: runs that gained a
/// reference (a shared leaf was copied) and runs that lost one. Apply the
/// gains first.
#[derive(Debug, Default)]
pub struct RefChanges {
    pub added: Vec<Freed>,
    pub dropped: Vec<Freed>,
}

impl RefChanges {
    pub fn clear(&mut self) {
        self.added.clear();
        self.dropped.clear();
    }
}

/// A leaf as a checkpoint sees it.
pub(crate) struct LeafSnapshot {
    pub key: u64,
    pub version: u64,
    /// Where it is on disk if unchanged since the last checkpoint, else
    /// [`NodeAddr::NONE`].
    pub disk: NodeAddr,
    /// The extents, when the leaf must be written.
    pub extents: Option<LeafExtents>,
}

/// A leaf's extents as a checkpoint took them: shared with the live leaf
/// until either changes, unpacked only when encoded.
pub(crate) struct LeafExtents(Arc<Vec<Packed>>);

impl LeafExtents {
    pub fn unpack(&self) -> Vec<Extent> {
        self.0.iter().map(|p| p.unpack()).collect()
    }
}

/// A physical run released by a mapping change.
pub type Freed = (u64, u64);

/// A leaf a checkpoint wrote: which leaf (key and version) and where.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WrittenLeaf {
    pub key: u64,
    pub version: u64,
    pub at: NodeAddr,
}

#[derive(Clone, Debug, Default)]
pub struct ExtentMap {
    /// Leaf key -> leaf. A leaf holds extents starting in [key, next key);
    /// when the map is not empty the first key is 0.
    leaves: BTreeMap<u64, Arc<Leaf>>,
    mapped_blocks: u64,
    extent_count: u64,
    /// Node blocks of the last checkpoint that are no longer part of the
    /// tree (free once the next checkpoint is durable).
    stale_nodes: Vec<u64>,
    /// Interior node blocks (both copies) of the last checkpoint.
    interior_nodes: Vec<u64>,
    /// Changed since the last checkpoint.
    dirty: bool,
    next_version: u64,
}

impl ExtentMap {
    pub fn new() -> ExtentMap {
        ExtentMap::default()
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.mapped_blocks
    }

    pub fn extent_count(&self) -> u64 {
        self.extent_count
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Resolves `vblock..vblock+len` into segments covering it in order.
    pub fn lookup(&self, vblock: u64, len: u64, out: &mut Vec<Segment>) {
        out.clear();
        let end = vblock + len;
        let mut pos = vblock;
        let start_key = self.leaf_key_for(vblock).unwrap_or(0);
        'leaves: for (_, leaf) in self.leaves.range(start_key..end.max(start_key + 1)) {
            let shared_leaf = Arc::strong_count(leaf) > 1;
            let first = leaf.extents.partition_point(|e| e.vend() <= pos);
            for p in &leaf.extents[first..] {
                let e = p.unpack();
                if e.vblock >= end {
                    break 'leaves;
                }
                if e.vblock > pos {
                    out.push(Segment::Hole {
                        vblock: pos,
                        len: e.vblock - pos,
                    });
                    pos = e.vblock;
                }
                let skip = pos - e.vblock;
                let n = (e.vend().min(end)) - pos;
                out.push(if e.is_zero() {
                    Segment::Zero {
                        vblock: pos,
                        len: n,
                    }
                } else {
                    Segment::Mapped {
                        vblock: pos,
                        pblock: e.pblock + skip,
                        len: n,
                        shared_leaf,
                    }
                });
                pos += n;
            }
        }
        if pos < end {
            out.push(Segment::Hole {
                vblock: pos,
                len: end - pos,
            });
        }
    }

    /// Maps `vblock..vblock+len` to `pblock..`; returns the physical runs it
    /// replaced.
    pub fn map(&mut self, vblock: u64, pblock: u64, len: u64, ch: &mut RefChanges) {
        self.set(vblock, len, Some((pblock, 0)), ch);
    }

    /// Marks `vblock..vblock+len` as explicitly zero.
    pub fn zero(&mut self, vblock: u64, len: u64, ch: &mut RefChanges) {
        self.set(vblock, len, Some((0, EXTENT_ZERO)), ch);
    }

    /// Unmaps `vblock..vblock+len`.
    pub fn unmap(&mut self, vblock: u64, len: u64, ch: &mut RefChanges) {
        self.set(vblock, len, None, ch);
    }

    /// Visits every extent in virtual order.
    pub fn for_each(&self, mut f: impl FnMut(&Extent)) {
        for leaf in self.leaves.values() {
            for p in leaf.extents.iter() {
                f(&p.unpack());
            }
        }
    }

    /// The core update: replace whatever maps `[vblock, vblock+len)` with
    /// `new` (a physical start and flags) or nothing, leaf by leaf.
    fn set(&mut self, vblock: u64, len: u64, new: Option<(u64, u8)>, ch: &mut RefChanges) {
        let end = vblock + len;
        let mut pos = vblock;
        while pos < end {
            let key = match self.leaf_key_for(pos) {
                Some(k) => k,
                None => {
                    if new.is_none() {
                        return; // nothing mapped anywhere
                    }
                    self.leaves.insert(0, Arc::new(Leaf::default()));
                    0
                }
            };
            let leaf_end = self
                .leaves
                .range(key + 1..)
                .next()
                .map_or(MAX_BLOCKS, |(&k, _)| k);
            let piece_end = end.min(leaf_end);
            // One extent holds at most MAX_EXTENT_BLOCKS.
            let piece_end = match new {
                Some(_) => piece_end.min(pos + MAX_EXTENT_BLOCKS),
                None => piece_end,
            };
            let piece_new = new.map(|(p, f)| {
                let pb = if f & EXTENT_ZERO != 0 {
                    0
                } else {
                    p + (pos - vblock)
                };
                (pb, f)
            });
            self.set_in_leaf(key, pos, piece_end, piece_new, ch);
            pos = piece_end;
        }
    }

    fn set_in_leaf(
        &mut self,
        key: u64,
        start: u64,
        end: u64,
        new: Option<(u64, u8)>,
        ch: &mut RefChanges,
    ) {
        let Some(arc) = self.leaves.get_mut(&key) else {
            return;
        };
        {
            let ext = &arc.extents;
            let first = ext.partition_point(|e| e.vend() <= start);
            if new.is_none() && ext.get(first).is_none_or(|e| e.vblock() >= end) {
                return; // nothing to unmap here
            }
        }
        if Arc::strong_count(arc) > 1 {
            // Copy a shared leaf: its blocks gain the copy's reference;
            // the on-disk block stays with the other holders.
            ch.added.extend(arc.data_runs());
        } else {
            let old = arc.disk();
            arc.set_disk(NodeAddr::NONE);
            self.stale_nodes.extend(old.blocks());
        }
        let leaf = Arc::make_mut(arc);
        let ext = Arc::make_mut(&mut leaf.extents);
        let first = ext.partition_point(|e| e.vend() <= start);
        let mut last = first;
        while last < ext.len() && ext[last].vblock() < end {
            last += 1;
        }
        // Cut [start, end) out of the overlapping extents.
        let mut keep: Vec<Packed> = Vec::with_capacity(3);
        let mut removed_blocks = 0u64;
        for p in &ext[first..last] {
            let e = p.unpack();
            let cut_start = start.max(e.vblock);
            let cut_end = end.min(e.vend());
            if e.vblock < cut_start {
                keep.push(Packed::pack(Extent {
                    len: (cut_start - e.vblock) as u32,
                    ..e
                }));
            }
            if !e.is_zero() {
                ch.dropped
                    .push((e.pblock + (cut_start - e.vblock), cut_end - cut_start));
                removed_blocks += cut_end - cut_start;
            }
            if cut_end < e.vend() {
                let skip = cut_end - e.vblock;
                keep.push(Packed::pack(Extent {
                    vblock: cut_end,
                    pblock: if e.is_zero() { 0 } else { e.pblock + skip },
                    len: (e.vend() - cut_end) as u32,
                    flags: e.flags,
                }));
            }
        }
        if let Some((pblock, flags)) = new {
            let e = Packed::pack(Extent {
                vblock: start,
                pblock,
                len: (end - start) as u32,
                flags,
            });
            let at = keep
                .iter()
                .position(|k| k.vblock() > start)
                .unwrap_or(keep.len());
            keep.insert(at, e);
            if flags & EXTENT_ZERO == 0 {
                self.mapped_blocks += end - start;
            }
        }
        self.mapped_blocks -= removed_blocks;
        let old_count = (last - first) as u64;
        let new_count = keep.len() as u64;
        ext.splice(first..last, keep);
        self.extent_count = self.extent_count + new_count - old_count;
        // Merge with neighbours where virtually and physically contiguous.
        let lo = first.saturating_sub(1);
        let mut i = lo;
        let hi = (first + new_count as usize + 1).min(ext.len());
        let mut hi = hi;
        while i + 1 < hi {
            let (a, b) = (ext[i].unpack(), ext[i + 1].unpack());
            let contiguous = a.vend() == b.vblock
                && a.flags == b.flags
                && (a.is_zero() || a.pblock + a.len as u64 == b.pblock)
                && (a.len + b.len) as u64 <= MAX_EXTENT_BLOCKS;
            if contiguous {
                ext[i] = Packed::pack(Extent {
                    len: a.len + b.len,
                    ..a
                });
                ext.remove(i + 1);
                self.extent_count -= 1;
                hi -= 1;
            } else {
                i += 1;
            }
        }
        self.dirty = true;
        self.next_version += 1;
        leaf.version = self.next_version;
        self.rebalance(key);
    }

    /// Splits an overfull leaf, drops an empty one.
    fn rebalance(&mut self, key: u64) {
        let Some(leaf) = self.leaves.get(&key) else {
            return;
        };
        if leaf.extents.len() > NODE_CAPACITY {
            // Appends to the last leaf (sequential writes) leave a nearly
            // full left leaf; elsewhere split in half so random inserts
            // keep leaves about 70 % full, on disk as in memory.
            let last = self.leaves.range(key + 1..).next().is_none();
            // The leaf was just changed, so this map holds its only copy.
            let Some(leaf) = self.leaves.get_mut(&key).map(Arc::make_mut) else {
                return;
            };
            let at = if last {
                NODE_CAPACITY * 7 / 8
            } else {
                leaf.extents.len() / 2
            };
            let right = Arc::make_mut(&mut leaf.extents).split_off(at);
            let right_key = right[0].vblock();
            self.next_version += 1;
            self.leaves.insert(
                right_key,
                Arc::new(Leaf {
                    extents: Arc::new(right),
                    disk: AtomicU64::new(0),
                    twin: AtomicU64::new(0),
                    version: self.next_version,
                }),
            );
        } else if leaf.extents.is_empty() {
            self.leaves.remove(&key);
            if key == 0 {
                // Keep the first leaf at key 0.
                if let Some((&k, _)) = self.leaves.iter().next() {
                    if let Some(l) = self.leaves.remove(&k) {
                        self.leaves.insert(0, l);
                    }
                }
            }
        }
    }

    fn leaf_key_for(&self, vblock: u64) -> Option<u64> {
        self.leaves.range(..=vblock).next_back().map(|(&k, _)| k)
    }

    // --- checkpoint support -------------------------------------------

    /// Starts a checkpoint: returns every leaf (those with `disk != 0` are
    /// unchanged on disk) and the node blocks the new tree will not use,
    /// which may be freed once it is durable.
    pub(crate) fn checkpoint_begin(&mut self) -> (Vec<LeafSnapshot>, Vec<u64>) {
        let leaves = self
            .leaves
            .iter()
            .map(|(&key, l)| LeafSnapshot {
                key,
                version: l.version,
                disk: l.disk(),
                extents: l.disk().is_none().then(|| LeafExtents(l.extents.clone())),
            })
            .collect();
        let mut unused = std::mem::take(&mut self.stale_nodes);
        unused.extend(std::mem::take(&mut self.interior_nodes));
        self.dirty = false;
        (leaves, unused)
    }

    /// Finishes a checkpoint once its tree is durable: `written` are the
    /// leaves it wrote. A leaf changed since `checkpoint_begin` keeps being
    /// dirty; the blocks written for it are stale from now on.
    pub(crate) fn checkpoint_finish(&mut self, written: &[WrittenLeaf], interior: Vec<u64>) {
        for w in written {
            match self.leaves.get(&w.key) {
                Some(l) if l.version == w.version && l.disk().is_none() => l.set_disk(w.at),
                _ => self.stale_nodes.extend(w.at.blocks()),
            }
        }
        self.interior_nodes = interior;
    }

    /// Restores "the first key is 0" after leaves were left out at load
    /// (a lost first leaf): the first remaining leaf takes key 0. Its
    /// extents and block stay as they are; only the parent's key changes.
    pub(crate) fn rekey_first_leaf(&mut self) {
        if let Some((&k, _)) = self.leaves.iter().next().filter(|(&k, _)| k != 0) {
            if let Some(l) = self.leaves.remove(&k) {
                self.leaves.insert(0, l);
            }
        }
    }

    /// Marks the map changed (after a failed checkpoint).
    pub(crate) fn set_dirty(&mut self) {
        self.dirty = true;
    }

    /// Every node block the map references on disk: the last checkpoint's
    /// tree and blocks replaced since (both still in use until the next
    /// checkpoint is durable).
    pub(crate) fn node_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.leaves
            .values()
            .flat_map(|l| l.disk().blocks())
            .chain(self.interior_nodes.iter().copied())
            .chain(self.stale_nodes.iter().copied())
    }

    /// A new map sharing every leaf with this one: the mapping of a
    /// snapshot or clone. Its interior nodes are its own (written by its
    /// first checkpoint), so it starts dirty.
    pub(crate) fn share(&self) -> ExtentMap {
        ExtentMap {
            leaves: self.leaves.clone(),
            mapped_blocks: self.mapped_blocks,
            extent_count: self.extent_count,
            stale_nodes: Vec::new(),
            interior_nodes: Vec::new(),
            dirty: true,
            next_version: self.next_version,
        }
    }

    /// Gives up the map: returns the data runs and node blocks that no
    /// other map shares (they are free once nothing on disk points here).
    pub(crate) fn release_all(self) -> (Vec<Freed>, Vec<u64>) {
        let mut data = Vec::new();
        let mut nodes = self.interior_nodes;
        nodes.extend(self.stale_nodes);
        for leaf in self.leaves.into_values() {
            if Arc::strong_count(&leaf) == 1 {
                data.extend(leaf.data_runs());
                nodes.extend(leaf.disk().blocks());
            }
        }
        (data, nodes)
    }

    /// Leaves in key order with whether each is shared with another map.
    pub(crate) fn leaf_refs(&self) -> impl Iterator<Item = (u64, &Arc<Leaf>)> + '_ {
        self.leaves.iter().map(|(&k, l)| (k, l))
    }

    /// Blocks of this map in leaves it shares with no other map, whose data
    /// runs `refs` does not count as shared: what removing it would free.
    pub(crate) fn exclusive_blocks(&self, shared: &crate::alloc::refs::SharedRefs) -> u64 {
        let mut runs = Vec::new();
        let mut n = 0;
        for leaf in self.leaves.values().filter(|l| Arc::strong_count(l) == 1) {
            for (p, len) in leaf.data_runs() {
                runs.clear();
                shared.runs(p, len, &mut runs);
                n += runs.iter().filter(|r| !r.2).map(|r| r.1).sum::<u64>();
            }
        }
        n
    }

    pub(crate) fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    /// Virtual block runs where `other` maps differently from `self`.
    /// Leaves both maps share are skipped without looking inside, so the
    /// cost follows the changes, not the size.
    pub(crate) fn diff(&self, other: &ExtentMap, out: &mut Vec<(u64, u64)>) {
        let mut keys: Vec<u64> = self
            .leaves
            .keys()
            .chain(other.leaves.keys())
            .copied()
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        for (i, &lo) in keys.iter().enumerate() {
            let hi = keys.get(i + 1).copied().unwrap_or(MAX_BLOCKS);
            let leaf_at = |m: &ExtentMap| {
                m.leaves
                    .range(..=lo)
                    .next_back()
                    .map(|(_, l)| Arc::as_ptr(l))
            };
            if leaf_at(self).is_some() && leaf_at(self) == leaf_at(other) {
                continue;
            }
            // The last interval reaches the end of the address space: stop
            // at the last mapped block of either map.
            let end = if i + 1 == keys.len() {
                let last = |m: &ExtentMap| {
                    m.leaves
                        .values()
                        .next_back()
                        .and_then(|l| l.extents.last())
                        .map_or(0, |e| e.vend())
                };
                last(self).max(last(other)).max(lo)
            } else {
                hi
            };
            if end <= lo {
                continue;
            }
            self.lookup(lo, end - lo, &mut sa);
            other.lookup(lo, end - lo, &mut sb);
            diff_segments(lo, &sa, &sb, out);
        }
    }

    /// Builds a map from loaded leaves (key order) and interior node blocks.
    pub(crate) fn from_leaves(leaves: Vec<(u64, Arc<Leaf>)>, interior: Vec<u64>) -> ExtentMap {
        let mut m = ExtentMap {
            interior_nodes: interior,
            ..ExtentMap::default()
        };
        for (key, leaf) in leaves {
            m.mapped_blocks += leaf.data_runs().map(|r| r.1).sum::<u64>();
            m.extent_count += leaf.extents.len() as u64;
            m.leaves.insert(key, leaf);
        }
        m
    }
}

/// Appends to `out` the runs (from `start`) where two segment lists of the
/// same range resolve differently.
fn diff_segments(start: u64, a: &[Segment], b: &[Segment], out: &mut Vec<(u64, u64)>) {
    // What a block resolves to: Some(pblock), or None for zeros.
    fn at(s: &Segment, off: u64) -> Option<u64> {
        match *s {
            Segment::Mapped { pblock, .. } => Some(pblock + off),
            _ => None,
        }
    }
    let (mut i, mut j) = (0, 0);
    let (mut oa, mut ob) = (0u64, 0u64);
    let mut pos = start;
    while i < a.len() && j < b.len() {
        let n = (a[i].len() - oa).min(b[j].len() - ob);
        let (pa, pb) = (at(&a[i], oa), at(&b[j], ob));
        let differs = match (pa, pb) {
            (None, None) => false,
            (Some(x), Some(y)) => x != y,
            _ => true,
        };
        if differs {
            match out.last_mut() {
                Some((s, l)) if *s + *l == pos => *l += n,
                _ => out.push((pos, n)),
            }
        }
        pos += n;
        oa += n;
        ob += n;
        if oa == a[i].len() {
            i += 1;
            oa = 0;
        }
        if ob == b[j].len() {
            j += 1;
            ob = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference model: one entry per block.
    fn model_apply(
        model: &mut std::collections::BTreeMap<u64, Option<u64>>,
        v: u64,
        len: u64,
        p: Option<Option<u64>>,
    ) {
        for i in 0..len {
            match p {
                Some(Some(pb)) => {
                    model.insert(v + i, Some(pb + i));
                }
                Some(None) => {
                    model.insert(v + i, None);
                }
                None => {
                    model.remove(&(v + i));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn map_matches_block_model(ops in proptest::collection::vec((0u8..3, 0u64..3000, 1u64..400), 1..300)) {
            let mut m = ExtentMap::new();
            let mut model = std::collections::BTreeMap::new();
            let mut freed = RefChanges::default();
            let mut next_p = 1_000_000u64;
            for (op, v, len) in ops {
                match op {
                    0 => { m.map(v, next_p, len, &mut freed); model_apply(&mut model, v, len, Some(Some(next_p))); next_p += len; }
                    1 => { m.unmap(v, len, &mut freed); model_apply(&mut model, v, len, None); }
                    _ => { m.zero(v, len, &mut freed); model_apply(&mut model, v, len, Some(None)); }
                }
            }
            let mut segs = Vec::new();
            m.lookup(0, 4000, &mut segs);
            let mut v = 0;
            for s in &segs {
                for i in 0..s.len() {
                    let want = model.get(&(v + i)).copied();
                    let got = match *s {
                        Segment::Mapped { pblock, .. } => Some(Some(pblock + i)),
                        Segment::Zero { .. } => Some(None),
                        Segment::Hole { .. } => None,
                    };
                    prop_assert_eq!(got, want, "block {}", v + i);
                }
                v += s.len();
            }
            prop_assert_eq!(v, 4000);
            let mapped = model.values().filter(|p| p.is_some()).count() as u64;
            prop_assert_eq!(m.mapped_blocks(), mapped);
            let mut n = 0;
            m.for_each(|_| n += 1);
            prop_assert_eq!(n, m.extent_count());
        }
    }

    #[test]
    fn freed_runs_are_exactly_the_replaced_blocks() {
        let mut m = ExtentMap::new();
        let mut freed = RefChanges::default();
        m.map(10, 500, 10, &mut freed);
        assert!(freed.dropped.is_empty());
        m.map(12, 900, 3, &mut freed);
        assert_eq!(freed.dropped, vec![(502, 3)]);
        freed.clear();
        m.unmap(0, 100, &mut freed);
        freed.dropped.sort();
        assert_eq!(freed.dropped, vec![(500, 2), (505, 5), (900, 3)]);
        assert_eq!(m.mapped_blocks(), 0);
    }

    #[test]
    fn changing_a_shared_leaf_copies_it() {
        let mut a = ExtentMap::new();
        let mut ch = RefChanges::default();
        a.map(0, 100, 4, &mut ch);
        a.map(10, 200, 2, &mut ch);
        let b = a.share();
        ch.clear();
        a.map(1, 300, 1, &mut ch);
        // The copy took a reference to every run of the shared leaf, then
        // dropped the block it replaced.
        assert_eq!(ch.added, vec![(100, 4), (200, 2)]);
        assert_eq!(ch.dropped, vec![(101, 1)]);
        let mut segs = Vec::new();
        b.lookup(1, 1, &mut segs);
        assert!(matches!(
            segs[0],
            Segment::Mapped {
                pblock: 101,
                shared_leaf: false,
                ..
            }
        ));
        a.lookup(1, 1, &mut segs);
        assert!(matches!(
            segs[0],
            Segment::Mapped {
                pblock: 300,
                shared_leaf: false,
                ..
            }
        ));
        let (data, _) = b.release_all();
        assert_eq!(data, vec![(100, 4), (200, 2)]);
    }

    #[test]
    fn sequential_appends_merge_into_one_extent() {
        let mut m = ExtentMap::new();
        let mut freed = RefChanges::default();
        for i in 0..1000 {
            m.map(i, 7000 + i, 1, &mut freed);
        }
        assert_eq!(m.extent_count(), 1);
    }

    #[test]
    fn many_scattered_extents_split_leaves() {
        let mut m = ExtentMap::new();
        let mut freed = RefChanges::default();
        for i in 0..10_000u64 {
            m.map((i * 7919) % 100_000 * 2, 1_000_000 + i * 2, 1, &mut freed);
        }
        assert_eq!(m.extent_count(), 10_000);
        assert!(m.leaf_count() >= 10_000 / NODE_CAPACITY);
        let mut segs = Vec::new();
        m.lookup(0, 200_000, &mut segs);
        assert_eq!(
            segs.iter()
                .filter(|s| matches!(s, Segment::Mapped { .. }))
                .count(),
            10_000
        );
    }
}
