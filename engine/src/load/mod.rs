//! Opening a pool: superblock, catalog, volume trees, journal replay. Every
//! block is verified as it is read and every physical block is accounted
//! for exactly once, so a successful load is also the core of `check`.
//!
//! The parts: [`superblock`] picks the valid newer superblock copy,
//! [`tree`] reads and verifies volume trees, [`replay`] applies the journal
//! and the unflushed record, [`progress`] reports how far a check is.

mod progress;
mod replay;
mod superblock;
mod tree;

pub use progress::Progress;
pub(crate) use superblock::read_superblock;
pub(crate) use tree::{BadCopy, Copies, LeafCache};

use replay::{later_commit, Replay};
use tree::{load_tree, mark};

use crate::alloc::space::{Cursor, SpaceMap};
use crate::dev::{read_block, read_blocks, BlockDevice, SurvivingMemory};
use crate::error::{Error, Result};
use crate::format::catalog::flags;
use crate::format::catalog::{decode_catalog, decode_volume_header, VolumeRecord};
use crate::format::journal::{decode_block, decode_host_checkpoint, HostCheckpoint, JournalBlock};
use crate::format::node::{self, NodeAddr};
use crate::format::{BLOCK_SIZE, HOST_CHECKPOINT_BLOCKS};
use crate::map::extmap::RefChanges;
use crate::map::state::{State, Vol};
use crate::unflushed::Owner;
use std::collections::{HashMap, HashSet};

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
    /// Bad copies of ditto nodes, each with its good twin (among the
    /// warnings too).
    pub bad_node_copies: Vec<BadCopy>,
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
    load_observed(dev, label, host_id, boot, Copies::First, None, None)
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
    load_observed(dev, label, host_id, boot, Copies::First, None, unflushed)
}

/// [`load`], reading `copies` of ditto nodes and counting the volume trees
/// read in `progress`.
pub(crate) fn load_observed(
    dev: &dyn BlockDevice,
    label: &str,
    host_id: u32,
    boot: u64,
    copies: Copies,
    progress: Option<&Progress>,
    unflushed: Option<&dyn SurvivingMemory>,
) -> Result<Loaded> {
    let mut tries = 0;
    loop {
        match load_once(dev, label, host_id, boot, copies, progress, unflushed)? {
            Some(l) => return Ok(l),
            None if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2 * tries));
            }
            None => {
                return Err(Error::busy(
                    crate::BusyKind::Retry,
                    "volume trees kept changing while the pool was read; try again",
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
    copies: Copies,
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
    let mut bad_node_copies = Vec::new();
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
        let tree = load_tree(dev, &mut cache, &rec, &header, copies, &mut interior);
        if foreign && header_generation(dev, &rec) != Some(header.generation) {
            return Ok(None);
        }
        let tree::LoadedTree {
            map,
            damage,
            bad_copies,
        } = tree?;
        for c in &bad_copies {
            warnings.push(format!(
                "volume '{}' tree: damaged copy of a mapping node at block {} ({}); using its twin at block {}",
                rec.name, c.block, c.why, c.good
            ));
        }
        bad_node_copies.extend(bad_copies);
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
                damaged_nodes.extend(
                    NodeAddr {
                        block: d.node,
                        twin: d.twin,
                    }
                    .blocks(),
                );
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
                    leaf.disk().block,
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
    meta.extend(
        cache
            .values()
            .flat_map(|l| l.disk().blocks())
            .map(|b| (b, "mapping leaf".to_string())),
    );
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
            bad_node_copies,
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
        bad_node_copies,
    }))
}
