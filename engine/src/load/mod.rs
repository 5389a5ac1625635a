//! Opening a pool: superblock, catalog, volume trees, journal replay. Every
//! block is verified as it is read and every physical block is accounted
//! for exactly once, so a successful load is also the core of `check`.

use crate::alloc::space::{Cursor, SpaceMap};
use crate::dev::{read_block, read_blocks, BlockDevice, Blocks, SurvivingMemory};
use crate::error::{Error, Result};
use crate::format::catalog::flags;
use crate::format::catalog::{decode_catalog, decode_volume_header, VolumeHeader, VolumeRecord};
use crate::format::journal::{
    decode_block, decode_host_checkpoint, Entry, HostCheckpoint, JournalBlock,
};
use crate::format::node::{self, Node};
use crate::format::superblock::{has_magic, Superblock};
use crate::format::{Layout, BLOCK_SIZE, HOST_CHECKPOINT_BLOCKS, SUPERBLOCK_A, SUPERBLOCK_B};
use crate::map::extmap::{ExtentMap, Leaf, RefChanges};
use crate::map::state::{Damage, State, Vol};
use crate::unflushed::Owner;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How far a running check is, for a progress bar drawn by another
/// thread: volume trees read so far, of how many.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub(crate) fn start(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    pub(crate) fn step(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// (volumes read, volumes in the pool); (0, 0) before the catalog is read.
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

pub(crate) struct Loaded {
    pub state: State,
    pub host_ckpt: HostCheckpoint,
    /// Journal position after replay.
    pub tail: u32,
    pub next_seq: u64,
    pub prev_crc: u32,
    /// The replayed journal ends in blocks of unflushed persists: the next
    /// commit must write a block after them (see `JournalWriter`).
    pub unsealed: bool,
    pub replayed_blocks: u64,
    /// Entries replayed from the unflushed record (now in `state.pending`,
    /// not yet in the journal).
    pub from_record: usize,
    /// Highest epoch found in the unflushed record's memory, and its slot.
    pub record_epoch: (u64, usize),
    /// Problems that did not stop the load (a damaged copy of a record
    /// that has a good twin).
    pub warnings: Vec<String>,
}

/// Reads both superblock copies and picks the valid one with the newer
/// generation.
pub(crate) fn read_superblock(
    dev: &dyn BlockDevice,
    label: &str,
    warnings: &mut Vec<String>,
) -> Result<Superblock> {
    let size = dev.size_bytes().map_err(|e| Error::io(label, e))?;
    if size < (SUPERBLOCK_B + 1) * BLOCK_SIZE as u64 {
        return Err(Error::NotAPool(label.to_string()));
    }
    let mut copies = Vec::new();
    let mut saw_magic = false;
    for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
        let b = read_block(dev, at).map_err(|e| Error::io(format!("{label}: superblock"), e))?;
        saw_magic |= has_magic(&b);
        copies.push((at, Superblock::decode(&b, at)));
    }
    if !saw_magic {
        if has_other_pool_records(dev, size) {
            return Err(Error::Corrupt(format!(
                "{label} holds thinlun metadata but both superblock copies are missing (overwritten?)"
            )));
        }
        return Err(Error::NotAPool(label.to_string()));
    }
    for (_, r) in &copies {
        if let Err(e @ Error::UnsupportedVersion { .. }) = r {
            return Err(Error::UnsupportedVersion {
                found: match e {
                    Error::UnsupportedVersion { found, .. } => *found,
                    _ => 0,
                },
                supported: crate::format::FORMAT_VERSION,
            });
        }
    }
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    for (at, r) in copies {
        match r {
            Ok(sb) => {
                if best.as_ref().is_none_or(|b| sb.generation > b.generation) {
                    if let Some(b) = &best {
                        warnings.push(format!(
                            "superblock copy at block {} is older (generation {}) than the other; it will be rewritten",
                            if at == SUPERBLOCK_A { SUPERBLOCK_B } else { SUPERBLOCK_A },
                            b.generation
                        ));
                    }
                    best = Some(sb);
                } else if best.as_ref().is_some_and(|b| sb.generation < b.generation) {
                    warnings.push(format!(
                        "superblock copy at block {at} is older (generation {}) than the other; it will be rewritten",
                        sb.generation
                    ));
                }
            }
            Err(e) => errors.push(format!("copy at block {at}: {e}")),
        }
    }
    match best {
        Some(sb) => {
            for e in errors {
                warnings.push(format!("damaged superblock {e}; using the other copy"));
            }
            let need = sb.layout.pool_blocks * BLOCK_SIZE as u64;
            if size < need {
                return Err(Error::Corrupt(format!(
                    "{label} is {size} bytes but the pool needs {need}: the file or LUN was truncated"
                )));
            }
            Ok(sb)
        }
        None => Err(Error::Corrupt(format!(
            "both superblock copies are damaged ({})",
            errors.join("; ")
        ))),
    }
}

/// Whether the start of the LUN holds records only a pool writes (its
/// allocation-group table sits right after the header zone and lock areas),
/// to tell "superblocks destroyed" from "never a pool".
fn has_other_pool_records(dev: &dyn BlockDevice, size: u64) -> bool {
    use crate::format::magic;
    let end = (size / BLOCK_SIZE as u64).min(1024);
    let blocks: Vec<u64> = (crate::format::HEADER_ZONE_BLOCKS..end).collect();
    read_blocks(dev, &blocks, "scanning for pool records").is_ok_and(|bufs| {
        (0..blocks.len()).any(|i| {
            let m = &bufs[i][0..8];
            m == magic::AG_TABLE || m == magic::HOST_CHECKPOINT
        })
    })
}

fn mark(
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
fn load_tree(
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

/// Looks past a journal position that ends the replay for a valid block of
/// a commit that began after sequence `seq`; returns its block address.
fn later_commit(ring: &Blocks, ring_start: u64, ring_len: u32, from: u32, seq: u64) -> Option<u64> {
    (1..ring_len).find_map(|k| {
        let pos = (from + k) % ring_len;
        let at = ring_start + pos as u64;
        match decode_block(&ring[pos as usize], at) {
            // Only a flushed block proves the blocks before it durable.
            Ok(Some((jb, _)))
                if jb.seq > seq
                    && jb.commit_first > seq
                    && jb.seq - seq < ring_len as u64
                    && jb.boot == 0 =>
            {
                Some(at)
            }
            _ => None,
        }
    })
}

/// Reads both copies of a two-copy record and keeps the valid newer one.
fn newer_of<T>(
    copies: [(u64, Result<T>); 2],
    generation: impl Fn(&T) -> u64,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<T> {
    let [(a_at, a), (b_at, b)] = copies;
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if generation(&b) > generation(&a) {
            b
        } else {
            a
        }),
        (Ok(a), Err(e)) => {
            warnings.push(format!(
                "{what}: damaged copy at block {b_at} ({e}); using the other"
            ));
            Ok(a)
        }
        (Err(e), Ok(b)) => {
            warnings.push(format!(
                "{what}: damaged copy at block {a_at} ({e}); using the other"
            ));
            Ok(b)
        }
        (Err(ea), Err(eb)) => Err(Error::Corrupt(format!(
            "{what}: both copies are damaged ({ea}; {eb})"
        ))),
    }
}

/// Loads the pool as `host_id` (replaying that host's journal; 0 replays
/// none) on the boot `boot` (which unflushed journal blocks it may trust:
/// [`JournalBlock::boot`]). On a shared pool another host may checkpoint a
/// volume it has active while we read its tree; such a read is validated
/// seqlock-style (the header generation must not change across it) and
/// retried.
pub(crate) fn load(dev: &dyn BlockDevice, label: &str, host_id: u32, boot: u64) -> Result<Loaded> {
    load_observed(dev, label, host_id, boot, None, None)
}

/// [`load`], then the mapping changes that `host_id`'s unflushed record in
/// `unflushed` holds beyond the journal (crate::unflushed).
pub(crate) fn load_with_record(
    dev: &dyn BlockDevice,
    label: &str,
    host_id: u32,
    boot: u64,
    unflushed: Option<&dyn SurvivingMemory>,
) -> Result<Loaded> {
    load_observed(dev, label, host_id, boot, None, unflushed)
}

/// [`load`], counting the volume trees read in `progress`.
pub(crate) fn load_observed(
    dev: &dyn BlockDevice,
    label: &str,
    host_id: u32,
    boot: u64,
    progress: Option<&Progress>,
    unflushed: Option<&dyn SurvivingMemory>,
) -> Result<Loaded> {
    let mut tries = 0;
    loop {
        match load_once(dev, label, host_id, boot, progress, unflushed)? {
            Some(l) => return Ok(l),
            None if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2 * tries));
            }
            None => {
                return Err(Error::Busy(
                    "volume trees kept changing while the pool was read; try again".into(),
                ))
            }
        }
    }
}

/// The newest valid generation of a volume's header pair, if readable.
fn header_generation(dev: &dyn BlockDevice, rec: &VolumeRecord) -> Option<u64> {
    let bufs = read_blocks(dev, &rec.header_blocks, "reading volume headers").ok()?;
    (0..2)
        .filter_map(|i| decode_volume_header(&bufs[i], rec.header_blocks[i]).ok())
        .map(|h| h.generation)
        .max()
}

fn load_once(
    dev: &dyn BlockDevice,
    label: &str,
    host_id: u32,
    boot: u64,
    progress: Option<&Progress>,
    unflushed: Option<&dyn SurvivingMemory>,
) -> Result<Option<Loaded>> {
    let mut warnings = Vec::new();
    let sb = read_superblock(dev, label, &mut warnings)?;
    let layout = sb.layout;
    let mut state = State::new(sb.clone(), SpaceMap::new(&layout));

    // Catalog chain.
    let mut records = Vec::new();
    let mut meta: Vec<(u64, String)> = Vec::new();
    let mut at = sb.catalog_root;
    let mut seen = HashSet::new();
    while at != 0 {
        if !seen.insert(at) {
            return Err(Error::Corrupt(format!(
                "catalog chain loops back to block {at}"
            )));
        }
        let b = read_block(dev, at).map_err(|e| Error::io("reading catalog", e))?;
        let cb = decode_catalog(&b, &layout, at)?;
        state.catalog_blocks.push(at);
        meta.push((at, "catalog".into()));
        records.extend(cb.records);
        at = cb.next;
    }
    // Snapshot names are unique per volume, other names pool-wide.
    let mut names = HashMap::new();
    for r in &records {
        let scope = if r.flags & flags::SNAPSHOT != 0 {
            r.parent_id
        } else {
            0
        };
        if let Some(other) = names.insert((scope, r.name.clone()), r.id) {
            return Err(Error::Corrupt(format!(
                "catalog names two volumes '{}' (ids {other} and {})",
                r.name, r.id
            )));
        }
        if r.id >= sb.next_volume_id {
            return Err(Error::Corrupt(format!(
                "volume '{}' has id {} but the superblock's next id is {}",
                r.name, r.id, sb.next_volume_id
            )));
        }
    }
    let ids: HashSet<u64> = records.iter().map(|r| r.id).collect();
    for r in &records {
        for (what, id) in [("parent", r.parent_id), ("origin", r.origin_id)] {
            if id != 0 && !ids.contains(&id) {
                return Err(Error::Corrupt(format!(
                    "volume '{}' names missing {what} volume id {id}",
                    r.name
                )));
            }
        }
        if r.flags & flags::SNAPSHOT != 0 && r.parent_id == 0 {
            return Err(Error::Corrupt(format!(
                "snapshot '{}' has no parent volume",
                r.name
            )));
        }
    }

    // Volume headers and trees.
    if let Some(p) = progress {
        p.start(records.len() as u64);
    }
    let mut cache = LeafCache::new();
    let mut withheld = 0u64;
    let mut damaged_nodes: Vec<u64> = Vec::new();
    for rec in records {
        if state.volumes.contains_key(&rec.id) {
            return Err(Error::Corrupt(format!(
                "catalog lists volume id {} twice",
                rec.id
            )));
        }
        for &hb in &rec.header_blocks {
            meta.push((hb, format!("volume '{}' header", rec.name)));
        }
        let bufs = read_blocks(dev, &rec.header_blocks, "reading volume headers")?;
        let decode = |i: usize| {
            decode_volume_header(&bufs[i], rec.header_blocks[i]).and_then(|h| {
                if h.volume_id == rec.id {
                    Ok(h)
                } else {
                    Err(Error::Corrupt(format!(
                        "header at block {} belongs to volume id {}",
                        rec.header_blocks[i], h.volume_id
                    )))
                }
            })
        };
        // Active on another host: that host may rewrite the tree meanwhile.
        let foreign = rec.active_host != 0 && rec.active_host as u32 != host_id;
        let header = newer_of(
            [
                (rec.header_blocks[0], decode(0)),
                (rec.header_blocks[1], decode(1)),
            ],
            |h| h.generation,
            &format!("volume '{}' header", rec.name),
            &mut warnings,
        );
        let header = match header {
            Err(_) if foreign => return Ok(None),
            h => h?,
        };
        let mut interior = Vec::new();
        let map = load_tree(dev, &mut cache, &rec, &header, &mut interior);
        if foreign && header_generation(dev, &rec) != Some(header.generation) {
            return Ok(None);
        }
        let (map, damage) = map?;
        meta.extend(
            interior
                .into_iter()
                .map(|b| (b, format!("volume '{}' tree", rec.name))),
        );
        if !damage.is_empty() {
            // Where the unreadable subtree's blocks are is unknown; how many
            // it maps is what the header counts beyond the readable part.
            // They are withheld from the free space (5.1).
            let lost_extents = header.extent_count.saturating_sub(map.extent_count());
            withheld = withheld
                .saturating_add(header.mapped_blocks.saturating_sub(map.mapped_blocks()))
                .saturating_add(lost_extents.div_ceil(node::NODE_CAPACITY as u64));
            for d in &damage {
                log::error!(
                    "{label}: volume '{}' is damaged: blocks {}..{} cannot be mapped ({}); its reads there and all its writes fail until repaired",
                    rec.name, d.lo, d.hi.min(rec.size_bytes / BLOCK_SIZE as u64), d.why
                );
                damaged_nodes.push(d.node);
            }
        }
        state.volumes.insert(
            rec.id,
            Vol {
                rec,
                map,
                header,
                cursor: Cursor::default(),
                handles: 0,
                damage,
            },
        );
        if let Some(p) = progress {
            p.step();
        }
    }

    // Data first, counting every distinct leaf's reference; then metadata,
    // which must not overlap anything.
    let mut already = Vec::new();
    for leaf in cache.values() {
        for (p, n) in leaf.data_runs() {
            if !layout.is_data_block(p) || !layout.is_data_block(p + n - 1) {
                return Err(Error::Corrupt(format!(
                    "mapping leaf at block {} points outside the data area (blocks {p}..{})",
                    leaf.disk(),
                    p + n
                )));
            }
            already.clear();
            state.space.mark_or_share(p, n, &mut already);
            for &(sp, sn) in &already {
                state.refs.add(sp, sn);
            }
        }
    }
    meta.extend(cache.keys().map(|&b| (b, "mapping leaf".to_string())));
    // Leaves must be held only by volumes from here on: a leaf held twice
    // counts as shared, and changing it would copy it.
    drop(cache);
    for (b, what) in &meta {
        mark(&mut state.space, &layout, *b, 1, &|| what.clone())?;
    }
    // A damaged node's block stays allocated (it may be repaired or
    // examined); it may also be a block something else validly holds (a
    // stale pointer), which is then that owner's.
    for b in damaged_nodes {
        if layout.is_data_block(b) {
            already.clear();
            state.space.mark_or_share(b, 1, &mut already);
            if already.is_empty() {
                state.quarantine.push((b, 1));
            }
        }
    }
    state.space.withhold(withheld);
    let meta_blocks: HashSet<u64> = meta.iter().map(|m| m.0).collect();
    drop(meta);

    if host_id == 0 {
        let host_ckpt = HostCheckpoint {
            generation: 0,
            head: 0,
            seq: 0,
            prev_crc: 0,
        };
        return Ok(Some(Loaded {
            state,
            host_ckpt,
            tail: 0,
            next_seq: 0,
            prev_crc: 0,
            unsealed: false,
            replayed_blocks: 0,
            from_record: 0,
            record_epoch: (0, 1),
            warnings,
        }));
    }
    // This host's journal.
    let region = layout.host_region(host_id);
    let ring_len = layout.journal_blocks - HOST_CHECKPOINT_BLOCKS;
    let ck_blocks = [region, region + 1];
    let ck_bufs = read_blocks(dev, &ck_blocks, "reading host checkpoint")?;
    let host_ckpt = newer_of(
        [
            (
                region,
                decode_host_checkpoint(&ck_bufs[0], region, ring_len),
            ),
            (
                region + 1,
                decode_host_checkpoint(&ck_bufs[1], region + 1, ring_len),
            ),
        ],
        |h| h.generation,
        &format!("host {host_id} checkpoint"),
        &mut warnings,
    )?;
    let ring_start = region + HOST_CHECKPOINT_BLOCKS as u64;
    let ring: Vec<u64> = (0..ring_len as u64).map(|i| ring_start + i).collect();
    let jbufs = read_blocks(dev, &ring, "reading journal")?;
    let (mut pos, mut seq, mut prev_crc) = (host_ckpt.head, host_ckpt.seq, host_ckpt.prev_crc);
    // The chain first: whether a block may be replayed depends on the
    // blocks after it.
    let mut chain: Vec<(u64, JournalBlock, u32)> = Vec::new();
    for _ in 0..ring_len - 1 {
        let at = ring_start + pos as u64;
        let next = decode_block(&jbufs[pos as usize], at)?;
        let Some((jb, crc)) = next.filter(|(jb, _)| jb.seq == seq && jb.prev_crc == prev_crc)
        else {
            // The end of the journal, unless a later commit follows: then
            // this block was durable and is damaged.
            if let Some(later) = later_commit(&jbufs, ring_start, ring_len, pos, seq) {
                return Err(Error::Corrupt(format!(
                    "journal block {at} (sequence {seq}) is damaged or missing but block {later} of a later commit follows: acknowledged changes would be lost"
                )));
            }
            break;
        };
        chain.push((at, jb, crc));
        seq += 1;
        prev_crc = crc;
        pos = (pos + 1) % ring_len;
    }
    // Blocks of unflushed persists after the last flushed block may point
    // to data a power loss dropped: they are replayed only on the boot
    // that wrote them, and the first that is not ends the journal.
    let flushed = chain.iter().rposition(|(_, jb, _)| jb.boot == 0);
    let trusted = chain
        .iter()
        .enumerate()
        .position(|(i, (_, jb, _))| flushed.is_none_or(|f| i > f) && jb.boot != boot)
        .unwrap_or(chain.len());
    if trusted < chain.len() {
        chain.truncate(trusted);
        pos = (host_ckpt.head + trusted as u32) % ring_len;
        seq = host_ckpt.seq + trusted as u64;
        prev_crc = chain.last().map_or(host_ckpt.prev_crc, |c| c.2);
    }
    let mut replay = Replay {
        state: &mut state,
        layout: &layout,
        meta_blocks: &meta_blocks,
        host_id,
        ch: RefChanges::default(),
        already,
    };
    for (at, jb, _) in &chain {
        for e in &jb.entries {
            replay
                .entry(e, jb.seq)
                .map_err(|what| Error::Corrupt(format!("journal block {at} {what}")))?;
        }
    }
    let (mut from_record, mut record_epoch) = (0, (0, 1));
    if let Some(mem) = unflushed {
        let owner = Owner {
            uuid: replay.state.sb.uuid,
            host_id,
            boot,
        };
        let (found, top) = crate::unflushed::read(mem, owner);
        record_epoch = top;
        if let Some(found) = found {
            from_record = replay.record(&found, &host_ckpt, &chain, seq);
        }
    }
    Ok(Some(Loaded {
        state,
        host_ckpt,
        tail: pos,
        next_seq: seq,
        prev_crc,
        unsealed: chain.last().is_some_and(|(_, jb, _)| jb.boot != 0),
        replayed_blocks: chain.len() as u64,
        from_record,
        record_epoch,
        warnings,
    }))
}

/// Applies replayed journal entries to a loaded state.
struct Replay<'a> {
    state: &'a mut State,
    layout: &'a Layout,
    meta_blocks: &'a HashSet<u64>,
    host_id: u32,
    ch: RefChanges,
    already: Vec<(u64, u64)>,
}

impl Replay<'_> {
    /// Applies `e`, as carried by the journal block of sequence `seq`;
    /// an error says what is wrong with it.
    fn entry(&mut self, e: &Entry, seq: u64) -> std::result::Result<(), String> {
        let state = &mut *self.state;
        let layout = self.layout;
        let Some(vol) = state.volumes.get_mut(&e.volume()) else {
            return Ok(()); // volume removed after this entry
        };
        if vol.header.journal_host == self.host_id && vol.header.journal_seq >= seq {
            return Ok(()); // already in the checkpointed tree
        }
        if !vol.damage.is_empty() {
            return self.damaged_entry(e);
        }
        let ch = &mut self.ch;
        ch.clear();
        match *e {
            Entry::Map {
                vblock,
                pblock,
                len,
                ..
            } => {
                let len = len as u64;
                if !layout.is_data_block(pblock)
                    || !layout.is_data_block(pblock + len - 1)
                    || (pblock..pblock + len).any(|b| self.meta_blocks.contains(&b))
                {
                    return Err(format!(
                        "(volume '{}') maps blocks {pblock}..{} outside the data area or onto metadata",
                        vol.rec.name,
                        pblock + len
                    ));
                }
                vol.map.map(vblock, pblock, len, ch);
                for p in state.drop_refs(ch) {
                    state.space.release(p.0, p.1);
                }
                // The block may already be held by a snapshot taken
                // after this write but before its entry was journaled.
                self.already.clear();
                state.space.mark_or_share(pblock, len, &mut self.already);
                for &(sp, sn) in &self.already {
                    state.refs.add(sp, sn);
                }
            }
            Entry::Unmap { vblock, len, .. } | Entry::Zero { vblock, len, .. } => {
                if matches!(e, Entry::Zero { .. }) {
                    vol.map.zero(vblock, len as u64, ch);
                } else {
                    vol.map.unmap(vblock, len as u64, ch);
                }
                for p in state.drop_refs(ch) {
                    state.space.release(p.0, p.1);
                }
            }
        }
        Ok(())
    }

    /// Applies `e` to a damaged volume. Its tree on disk is never
    /// replaced, so nothing it names may be freed: replaced blocks stay
    /// held, not released. Parts of the range that fall in a damaged
    /// subtree cannot be applied to the map at all; the blocks they map
    /// are held too. The entry is kept to be journaled again by every
    /// checkpoint (`State::carried`).
    fn damaged_entry(&mut self, e: &Entry) -> std::result::Result<(), String> {
        let state = &mut *self.state;
        let layout = self.layout;
        let Some(vol) = state.volumes.get_mut(&e.volume()) else {
            return Ok(());
        };
        let (vblock, len) = match *e {
            Entry::Map {
                vblock,
                pblock,
                len,
                ..
            } => {
                let len = len as u64;
                if !layout.is_data_block(pblock)
                    || !layout.is_data_block(pblock + len - 1)
                    || (pblock..pblock + len).any(|b| self.meta_blocks.contains(&b))
                {
                    return Err(format!(
                        "(volume '{}') maps blocks {pblock}..{} outside the data area or onto metadata",
                        vol.rec.name,
                        pblock + len
                    ));
                }
                (vblock, len)
            }
            Entry::Unmap { vblock, len, .. } | Entry::Zero { vblock, len, .. } => {
                (vblock, len as u64)
            }
        };
        let mut held: Vec<(u64, u64)> = Vec::new();
        for (at, n, inside) in split_by_damage(&vol.damage, vblock, len) {
            let ch = &mut self.ch;
            ch.clear();
            let pblock = match *e {
                Entry::Map { pblock, .. } => Some(pblock + (at - vblock)),
                _ => None,
            };
            if !inside {
                match (*e, pblock) {
                    (Entry::Map { .. }, Some(p)) => vol.map.map(at, p, n, ch),
                    (Entry::Zero { .. }, _) => vol.map.zero(at, n, ch),
                    _ => vol.map.unmap(at, n, ch),
                }
                for &(p, k) in &ch.added {
                    state.refs.add(p, k);
                }
                held.extend(ch.dropped.iter().copied());
            }
            if let Some(p) = pblock {
                self.already.clear();
                state.space.mark_or_share(p, n, &mut self.already);
                for &(sp, sn) in &self.already {
                    state.refs.add(sp, sn);
                }
                if inside {
                    held.push((p, n));
                }
            }
        }
        state.quarantine.extend(held);
        state.carried.push(*e);
        Ok(())
    }

    /// Applies what the unflushed record holds beyond the replayed journal
    /// `chain` (which ends before sequence `end_seq`), and queues it for
    /// the next commit. Returns how many entries it applied.
    ///
    /// A slot is current only under the host checkpoint it was written
    /// for: another host's recovery of this host's journal writes a later
    /// one, and its record is stale then. Its first entries may already be
    /// in journal blocks from its `start_seq` on, written by a commit that
    /// died before it could start the other slot; applying from an earlier
    /// entry than needed would still be right (replaying a suffix of the
    /// changes in order ends in the same state), applying from a later one
    /// would not.
    fn record(
        &mut self,
        found: &crate::unflushed::Found,
        ckpt: &HostCheckpoint,
        chain: &[(u64, JournalBlock, u32)],
        end_seq: u64,
    ) -> usize {
        let k = found.key;
        let current = (k.gen_lo..=k.gen_hi).contains(&ckpt.generation)
            && (ckpt.seq..=end_seq).contains(&k.start_seq);
        if !current {
            log::warn!(
                "host {}: the unflushed record in memory belongs to an earlier checkpoint (generation {}..={}, sequence {}; the journal is at generation {}, sequence {}..{}): it is not replayed",
                self.host_id, k.gen_lo, k.gen_hi, k.start_seq, ckpt.generation, ckpt.seq, end_seq
            );
            return 0;
        }
        let journaled: usize = chain
            .iter()
            .filter(|(_, jb, _)| jb.seq >= k.start_seq)
            .map(|(_, jb, _)| jb.entries.len())
            .sum();
        let rest = found.entries.get(journaled..).unwrap_or(&[]);
        for (i, e) in rest.iter().enumerate() {
            if let Err(what) = self.entry(e, k.start_seq) {
                // Memory this process wrote: a bad entry is a bug, and the
                // entries before it are still a consistent older state.
                log::warn!(
                    "host {}: unflushed record entry {} {what}; replay stops there",
                    self.host_id,
                    journaled + i
                );
                self.state.pending.extend_from_slice(&rest[..i]);
                return i;
            }
        }
        self.state.pending.extend_from_slice(rest);
        rest.len()
    }
}

/// Splits virtual blocks `vblock..vblock+len` at the edges of `damage`
/// (sorted, from `load_tree`): (start, length, inside a damaged range).
fn split_by_damage(damage: &[Damage], vblock: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = vblock + len;
    let mut out = Vec::new();
    let mut pos = vblock;
    while pos < end {
        let inside = damage.iter().find(|d| d.lo <= pos && pos < d.hi);
        let stop = match inside {
            Some(d) => d.hi.min(end),
            None => damage
                .iter()
                .filter(|d| d.lo > pos)
                .map(|d| d.lo)
                .min()
                .unwrap_or(end)
                .min(end),
        };
        out.push((pos, stop - pos, inside.is_some()));
        pos = stop;
    }
    out
}
