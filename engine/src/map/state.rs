//! The in-memory state of an open pool and the rules that keep freed space
//! safe to reuse.
//!
//! A data block freed by a mapping change may be handed out again only when
//! (a) the journal entry that freed it is durable, or a power loss could
//! bring the old mapping back over someone else's new data, and (b) no read
//! or in-place write that looked the block up before it was freed is still
//! in flight. Both are tracked here.

use crate::alloc::refs::SharedRefs;
use crate::alloc::space::{Cursor, SpaceMap};
use crate::format::catalog::{flags, VolumeHeader, VolumeRecord};
use crate::format::journal::Entry;
use crate::format::node::NodeAddr;
use crate::format::superblock::Superblock;
use crate::map::extmap::Leaf;
use crate::map::extmap::{ExtentMap, Freed, RefChanges};
use crate::unflushed::{RecordKey, UnflushedRecord};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

pub(crate) struct Vol {
    pub rec: VolumeRecord,
    pub map: ExtentMap,
    /// The header as last written (both copies).
    pub header: VolumeHeader,
    pub cursor: Cursor,
    /// Open handles; a volume with handles cannot be removed.
    pub handles: usize,
    /// Parts of the tree that could not be read at load (empty: healthy).
    /// A damaged volume is frozen: no writes, its tree is never rewritten.
    pub damage: Vec<Damage>,
}

/// A subtree of a volume's mapping that could not be loaded: the virtual
/// blocks `lo..hi` the parent node gives it are unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Damage {
    pub lo: u64,
    pub hi: u64,
    /// The unreadable node.
    pub node: u64,
    /// Its twin's block (0: a single-copy node).
    pub twin: u64,
    pub why: String,
}

impl Vol {
    /// The first damaged range overlapping virtual blocks `b0..b1`.
    pub fn damage_in(&self, b0: u64, b1: u64) -> Option<&Damage> {
        self.damage.iter().find(|d| d.lo < b1 && b0 < d.hi)
    }
}

struct PendingFree {
    pblock: u64,
    len: u64,
    /// Commit number whose durability makes the free final.
    batch: u64,
    /// I/O epoch at the time of the free.
    epoch: u64,
}

pub(crate) struct State {
    pub sb: Superblock,
    pub volumes: BTreeMap<u64, Vol>,
    pub space: SpaceMap,
    /// References to data blocks beyond the first (snapshots, clones).
    pub refs: SharedRefs,
    /// Allocation cursor of metadata (nodes, headers, catalog).
    pub meta_cursor: Cursor,
    /// Where the second copies of metadata go (away from `meta_cursor`).
    pub twin_cursor: Cursor,
    pub catalog_blocks: Vec<u64>,
    /// Superblock copy B was written after copy A without a flush of its
    /// own (6.2): A is the only durable copy of the current generation, so
    /// whatever writes the superblock next, or lets another writer do so,
    /// must flush first.
    pub twin_unflushed: bool,
    /// Journal entries not yet handed to a commit. Add to it with
    /// [`State::queue_entries`] only, which records them in surviving
    /// memory too.
    pub pending: Vec<Entry>,
    /// The unflushed record of a writer that keeps one (crate::unflushed).
    pub unflushed: Option<UnflushedRecord>,
    /// How many times `pending` was taken to be written (see
    /// [`State::take_pending`]).
    pub takes: u64,
    /// Number of the commit that will carry `pending`.
    pub batch: u64,
    /// Number of the last durable commit.
    pub committed: u64,
    pending_frees: Vec<PendingFree>,
    io_epoch: u64,
    active_io: BTreeMap<u64, usize>,
    /// Journal entries of damaged volumes found at load: their trees are
    /// never checkpointed, so every checkpoint writes these again after
    /// its new replay start, or they would be lost when the ring moves on.
    pub carried: Vec<Entry>,
    /// Data-area runs held in use for damaged volumes without being in any
    /// map: damaged node blocks, and blocks replayed journal entries name
    /// inside or replaced outside a damaged range (the tree on disk may
    /// still point at them).
    pub quarantine: Vec<(u64, u64)>,
}

impl State {
    pub fn new(sb: Superblock, space: SpaceMap) -> State {
        State {
            sb,
            volumes: BTreeMap::new(),
            space,
            refs: SharedRefs::default(),
            meta_cursor: Cursor::default(),
            twin_cursor: Cursor::default(),
            catalog_blocks: Vec::new(),
            twin_unflushed: false,
            pending: Vec::new(),
            unflushed: None,
            takes: 0,
            batch: 1,
            committed: 0,
            pending_frees: Vec::new(),
            io_epoch: 1,
            active_io: BTreeMap::new(),
            carried: Vec::new(),
            quarantine: Vec::new(),
        }
    }

    /// Whether any volume's tree could not be fully loaded.
    pub fn is_damaged(&self) -> bool {
        self.volumes.values().any(|v| !v.damage.is_empty())
    }

    /// Refuses `what` on volume `id` while it is damaged.
    pub fn refuse_damaged(&self, id: u64, what: &str) -> crate::Result<()> {
        match self.volumes.get(&id) {
            Some(v) if !v.damage.is_empty() => Err(damaged_error(self, v, what)),
            _ => Ok(()),
        }
    }

    /// Refuses `what` on volume `id` when it is damaged or may share blocks
    /// with a damaged volume (a snapshot, parent, clone or origin, however
    /// far): removing it could free blocks the unreadable part of that
    /// volume's tree still points at, which must stay allocated until the
    /// damage is repaired (docs/FORMAT.md 5.1).
    pub fn refuse_family_damaged(&self, id: u64, what: &str) -> crate::Result<()> {
        self.refuse_damaged(id, what)?;
        if !self.is_damaged() {
            return Ok(());
        }
        let mut family = HashSet::from([id]);
        loop {
            let before = family.len();
            for v in self.volumes.values() {
                let linked = [v.rec.parent_id, v.rec.origin_id]
                    .iter()
                    .any(|p| *p != 0 && family.contains(p));
                let of = family.contains(&v.rec.id);
                if linked || of {
                    family.insert(v.rec.id);
                    family.extend(
                        [v.rec.parent_id, v.rec.origin_id]
                            .iter()
                            .filter(|&&p| p != 0),
                    );
                }
            }
            if family.len() == before {
                break;
            }
        }
        match family
            .iter()
            .filter_map(|f| self.volumes.get(f))
            .find(|v| !v.damage.is_empty())
        {
            Some(d) => Err(crate::Error::busy(crate::BusyKind::Damaged, format!(
                "{what} '{}' refused: it may share blocks with damaged volume '{}', which must stay allocated until that damage is repaired",
                self.volumes.get(&id).map_or_else(String::new, |v| self.display_name(v)),
                self.display_name(d)
            ))),
            None => Ok(()),
        }
    }

    /// Finds a volume by name: `vol` for volumes, bases and clones,
    /// `vol@snap` for a snapshot of `vol`.
    pub fn volume_by_name(&self, name: &str) -> Option<&Vol> {
        match name.split_once('@') {
            None => self
                .volumes
                .values()
                .find(|v| v.rec.flags & flags::SNAPSHOT == 0 && v.rec.name == name),
            Some((vol, snap)) => {
                let parent = self.volume_by_name(vol)?.rec.id;
                self.volumes.values().find(|v| {
                    v.rec.flags & flags::SNAPSHOT != 0
                        && v.rec.parent_id == parent
                        && v.rec.name == snap
                })
            }
        }
    }

    pub fn id_by_name(&self, name: &str) -> Option<u64> {
        self.volume_by_name(name).map(|v| v.rec.id)
    }

    /// The name users address a volume by (`vol@snap` for snapshots).
    pub fn display_name(&self, v: &Vol) -> String {
        if v.rec.flags & flags::SNAPSHOT != 0 {
            let parent = self
                .volumes
                .get(&v.rec.parent_id)
                .map_or("?", |p| p.rec.name.as_str());
            format!("{parent}@{}", v.rec.name)
        } else {
            v.rec.name.clone()
        }
    }

    /// Snapshots of volume `id`, oldest first.
    pub fn snapshots_of(&self, id: u64) -> Vec<u64> {
        self.volumes
            .values()
            .filter(|v| v.rec.flags & flags::SNAPSHOT != 0 && v.rec.parent_id == id)
            .map(|v| v.rec.id)
            .collect()
    }

    /// Clones made from volume `id` (a base or snapshot).
    pub fn clones_of(&self, id: u64) -> Vec<u64> {
        self.volumes
            .values()
            .filter(|v| v.rec.origin_id == id)
            .map(|v| v.rec.id)
            .collect()
    }

    /// Registers an I/O that is about to use block addresses it looked up.
    pub fn io_begin(&mut self) -> u64 {
        *self.active_io.entry(self.io_epoch).or_insert(0) += 1;
        self.io_epoch
    }

    pub fn io_end(&mut self, token: u64) {
        self.io_end_no_reclaim(token);
        self.reclaim();
    }

    /// [`State::io_end`] for one of many requests ending together; the
    /// caller runs [`State::reclaim`] once after the last.
    pub fn io_end_no_reclaim(&mut self, token: u64) {
        if let Some(n) = self.active_io.get_mut(&token) {
            *n -= 1;
            if *n == 0 {
                self.active_io.remove(&token);
            }
        }
    }

    /// Queues mapping changes of completed writes for the journal, and
    /// records them in surviving memory: from here on they outlive a crash
    /// of the process.
    pub fn queue_entries(&mut self, entries: &[Entry]) {
        self.pending.extend_from_slice(entries);
        if let Some(r) = self.unflushed.as_mut() {
            r.append(entries);
        }
    }

    /// Whether every queued entry outlives a crash of the process without
    /// a journal write: they are all in the unflushed record.
    pub fn all_recorded(&self) -> bool {
        self.unflushed.as_ref().is_some_and(|r| !r.overflowed())
    }

    /// Starts the unflushed record over with what is still pending, which
    /// the journal from `key.start_seq` on will carry.
    pub fn restart_unflushed(&mut self, key: RecordKey) {
        if let Some(r) = self.unflushed.as_mut() {
            r.reset(key, &self.pending);
        }
    }

    /// Takes the pending journal entries to be written, numbered.
    pub fn take_pending(&mut self) -> (Vec<Entry>, u64) {
        self.takes += 1;
        (std::mem::take(&mut self.pending), self.takes)
    }

    /// Queues data runs freed by a mapping change of the current batch.
    pub fn free_later(&mut self, freed: &[Freed]) {
        if freed.is_empty() {
            return;
        }
        let epoch = self.io_epoch;
        self.io_epoch += 1;
        for &(pblock, len) in freed {
            self.pending_frees.push(PendingFree {
                pblock,
                len,
                batch: self.batch,
                epoch,
            });
        }
    }

    /// Applies the reference changes of a mapping update (gains first) and
    /// returns the runs whose last reference went.
    pub fn drop_refs(&mut self, ch: &RefChanges) -> Vec<Freed> {
        for &(p, n) in &ch.added {
            self.refs.add(p, n);
        }
        let mut gone = Vec::new();
        for &(p, n) in &ch.dropped {
            self.refs.release(p, n, &mut gone);
        }
        gone
    }

    /// Reference changes of a live mapping update: freed runs become
    /// reusable once the change is durable and no I/O still uses them.
    pub fn apply_changes(&mut self, ch: &RefChanges) {
        let gone = self.drop_refs(ch);
        self.free_later(&gone);
    }

    /// Moves frees that are now safe into the free-space map.
    pub fn reclaim(&mut self) {
        if self.pending_frees.is_empty() {
            return;
        }
        let oldest_io = self.active_io.keys().next().copied().unwrap_or(u64::MAX);
        let committed = self.committed;
        let space = &mut self.space;
        self.pending_frees.retain(|f| {
            let safe = f.batch <= committed && f.epoch < oldest_io;
            if safe {
                space.release(f.pblock, f.len);
            }
            !safe
        });
    }

    /// Takes over what a freshly loaded state cannot know from the LUN:
    /// commit numbering, in-flight I/O, frees not yet reusable (kept out of
    /// the fresh free map) and each volume's open handles and cursor.
    pub fn adopt_from(&mut self, old: &mut State) {
        self.batch = old.batch;
        self.committed = old.committed;
        self.io_epoch = old.io_epoch;
        self.active_io = std::mem::take(&mut old.active_io);
        self.pending = std::mem::take(&mut old.pending);
        self.unflushed = old.unflushed.take();
        self.takes = old.takes;
        self.pending_frees = std::mem::take(&mut old.pending_frees);
        let mut already = Vec::new();
        for f in &self.pending_frees {
            self.space.mark_or_share(f.pblock, f.len, &mut already);
        }
        for (id, v) in self.volumes.iter_mut() {
            if let Some(o) = old.volumes.get(id) {
                v.handles = o.handles;
                v.cursor = o.cursor;
            }
        }
        self.carried.extend(std::mem::take(&mut old.carried));
    }

    /// Blocks freed but not yet reusable.
    pub fn pending_free_blocks(&self) -> u64 {
        self.pending_frees.iter().map(|f| f.len).sum()
    }

    /// Blocks kept free for metadata so that a checkpoint (which writes a
    /// new copy of every changed node before freeing the old ones) can
    /// always finish: one block per node in use (two with ditto nodes),
    /// plus headroom.
    pub fn metadata_reserve(&self) -> u64 {
        let nodes: u64 = self
            .volumes
            .values()
            .map(|v| v.map.leaf_count() as u64 * 2 + 2)
            .sum();
        nodes * self.node_copies() + self.catalog_blocks.len() as u64 + 64
    }

    /// Blocks each tree node takes: 2 with ditto nodes, else 1.
    pub fn node_copies(&self) -> u64 {
        if self.sb.ditto_nodes {
            2
        } else {
            1
        }
    }

    /// Every metadata block in use (catalog, headers, nodes), each once
    /// even where volumes share leaves.
    pub fn metadata_block_set(&self) -> HashSet<u64> {
        let mut set: HashSet<u64> = self.catalog_blocks.iter().copied().collect();
        for v in self.volumes.values() {
            set.extend(v.rec.header_blocks);
            set.extend(v.map.node_blocks());
        }
        set
    }

    pub fn metadata_blocks(&self) -> u64 {
        self.metadata_block_set().len() as u64
    }

    /// Each mapping leaf once, however many volumes share it.
    pub fn distinct_leaves(&self) -> Vec<&Arc<Leaf>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for v in self.volumes.values() {
            for (_, leaf) in v.map.leaf_refs() {
                if seen.insert(Arc::as_ptr(leaf)) {
                    out.push(leaf);
                }
            }
        }
        out
    }

    /// Allocates the two header blocks of a new volume (both or neither),
    /// in different chunks so one bad run of sectors cannot take both.
    pub fn alloc_header_pair(&mut self) -> crate::Result<[u64; 2]> {
        let pair = self.alloc_apart_pair().ok_or(crate::Error::NoSpace)?;
        Ok([pair.block, pair.twin])
    }

    /// Allocates a tree node: one block, or on a pool with ditto nodes two
    /// blocks far apart (both or neither).
    pub fn alloc_node(&mut self) -> Option<NodeAddr> {
        if self.sb.ditto_nodes {
            self.alloc_apart_pair()
        } else {
            self.alloc_meta().map(NodeAddr::single)
        }
    }

    fn alloc_apart_pair(&mut self) -> Option<NodeAddr> {
        let (block, twin) = self
            .space
            .allocate_pair(&mut self.meta_cursor, &mut self.twin_cursor)?;
        Some(NodeAddr { block, twin })
    }

    /// Allocates one metadata block.
    pub fn alloc_meta(&mut self) -> Option<u64> {
        self.space
            .allocate_run(&mut self.meta_cursor, 1)
            .map(|(b, _)| b)
    }
}

/// The error for I/O or changes refused on a damaged volume.
pub(crate) fn damaged_error(st: &State, v: &Vol, what: &str) -> crate::Error {
    let d = &v.damage[0];
    let size_blocks = v.rec.size_bytes / crate::format::BLOCK_SIZE as u64;
    crate::Error::Damaged {
        volume: st.display_name(v),
        what: format!(
            "{what} refused: its mapping of blocks {}..{} is unreadable ({})",
            d.lo.min(size_blocks),
            d.hi.min(size_blocks),
            d.why
        ),
    }
}

/// Part of a volume's mapping lost with an unreadable tree node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedRange {
    /// First 4 KiB block of the volume that cannot be mapped.
    pub start_block: u64,
    /// One past the last (clipped to the volume's size).
    pub end_block: u64,
    /// The unreadable node.
    pub node_block: u64,
    /// What is wrong with it.
    pub reason: String,
}

impl DamagedRange {
    /// The range in 512-byte sectors: (first, one past the last).
    pub fn sectors(&self) -> (u64, u64) {
        let k = (crate::BLOCK_SIZE / crate::SECTOR_SIZE as usize) as u64;
        (self.start_block * k, self.end_block * k)
    }

    /// The range in bytes: (first, one past the last).
    pub fn bytes(&self) -> (u64, u64) {
        let b = crate::BLOCK_SIZE as u64;
        (self.start_block * b, self.end_block * b)
    }
}

/// A volume's damage as the public API reports it, clipped to its size.
pub(crate) fn damaged_ranges(v: &Vol) -> Vec<DamagedRange> {
    let end = v.rec.size_bytes / crate::format::BLOCK_SIZE as u64;
    v.damage
        .iter()
        .map(|d| DamagedRange {
            start_block: d.lo.min(end),
            end_block: d.hi.min(end),
            node_block: d.node,
            reason: d.why.clone(),
        })
        .collect()
}
