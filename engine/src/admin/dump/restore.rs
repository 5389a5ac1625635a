//! `restore`: a dump's metadata written onto a device as new metadata
//! (docs/FORMAT.md section 9 gives the order), after it has been built and
//! verified in memory.

use super::model::{mapped_blocks, MetadataDump, VolumeDump};
use crate::admin::check::{check, damaged_lease_blocks, torn_tail};
use crate::alloc::space::{Cursor, SpaceMap};
use crate::dev::{read_block, read_blocks, write_blocks, BlockDevice, OverlayDevice};
use crate::error::{Error, Result};
use crate::format::catalog::{
    encode_catalog, encode_volume_header, flags, CatalogBlock, VolumeHeader, VolumeRecord,
    RECORDS_PER_BLOCK,
};
use crate::format::claims;
use crate::format::journal::{
    decode_block, decode_host_checkpoint, encode_host_checkpoint, HostCheckpoint,
};
use crate::format::node::{self, Child, Node, NodeAddr, NODE_CAPACITY};
use crate::format::superblock::Superblock;
use crate::format::{
    format_uuid, Layout, BLOCK_SIZE, HOST_CHECKPOINT_BLOCKS, SINGLE_HOST_ID, SUPERBLOCK_A,
    SUPERBLOCK_B,
};
use crate::load::load;
use crate::util::{journal_seed, now_unix};
use std::sync::Arc;

/// How `restore` may proceed.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Restore over a pool that still opens, or one of another identity.
    pub force: bool,
    /// Build and verify everything in memory, write nothing.
    pub dry_run: bool,
}

/// What `restore` wrote (or would write, on a dry run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Volumes restored, snapshots apart (as `PoolStatus::volumes`).
    pub volumes: u64,
    /// Snapshots restored.
    pub snapshots: u64,
    /// Extents written into the restored trees.
    pub extents: u64,
    /// Metadata blocks the restored pool uses (catalog, headers, nodes).
    pub metadata_blocks: u64,
    /// The new superblock generation.
    pub generation: u64,
    /// Blocks written to the LUN (0 on a dry run).
    pub blocks_written: u64,
    /// What the target held before, in words.
    pub notes: Vec<String>,
}

/// A restored pool is written in the current format: with ditto nodes,
/// whatever the dumped pool had (so restore also converts an older pool).
pub(super) const DITTO: bool = true;

/// Blocks to write: `(block, contents)`.
type Blocks = Vec<(u64, Vec<u8>)>;

/// Writes the dump's metadata onto `dev` (which the caller holds
/// exclusively): new mapping trees, volume headers and catalog in free
/// blocks of the data area, a new superblock generation, a fresh journal
/// start for host 1. Everything is built and verified on an in-memory
/// overlay first (it must load, check clean, and dump back to the same
/// meaning); only then is it written, in the engine's update order.
///
/// Refused, with nothing written: a dump of another geometry than the
/// pool on `dev`; without `force`, a target that still opens or belongs
/// to another pool (uuid).
pub fn restore(
    dev: Arc<dyn BlockDevice>,
    label: &str,
    d: &MetadataDump,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    check_restorable(dev.as_ref(), label, d)?;
    let layout = d.layout();
    let mut report = RestoreReport::default();
    let target = survey_target(dev.as_ref(), label, d, &layout, opts, &mut report.notes)?;
    let generation = target.generation + 1;

    // New metadata goes where neither the dump's data nor the target's
    // metadata is.
    let dumped_data = d.volumes.iter().flat_map(|v| {
        v.extents
            .iter()
            .filter(|e| !e.is_zero())
            .map(|e| (e.pblock, e.pblock + e.len as u64))
    });
    let mut alloc = Alloc::new(target.keep.into_iter().chain(dumped_data), &layout);
    let host_ckpt = fresh_checkpoint(dev.as_ref(), &layout, &d.pool.uuid, SINGLE_HOST_ID, 1)?;
    // Every header says its tree holds everything up to there.
    let journal_seq = host_ckpt.seq - 1;

    let mut blocks = Blocks::new();
    let records = write_volumes(d, journal_seq, &mut alloc, &mut blocks)?;
    let catalog_root = write_catalog(&records, generation, &mut alloc, &mut blocks)?;
    report.metadata_blocks = blocks.len() as u64;
    reset_damaged_reserved(dev.as_ref(), label, &layout, &d.pool.uuid, &mut blocks)?;
    let sb = Superblock {
        generation,
        layout,
        uuid: d.pool.uuid,
        catalog_root,
        next_volume_id: d.pool.next_volume_id,
        created_unix: d.pool.created_unix,
        commit_unix: now_unix(),
        policy: d.pool.policy,
        shared: None,
        ditto_nodes: DITTO,
    };

    let ov = build_on_overlay(dev, label, &blocks, &sb, &host_ckpt)?;
    verify(ov.as_ref(), label, d)?;
    report.extents = d.volumes.iter().map(|v| v.extents.len() as u64).sum();
    report.snapshots = d
        .volumes
        .iter()
        .filter(|v| v.flags & flags::SNAPSHOT != 0)
        .count() as u64;
    report.volumes = d.volumes.len() as u64 - report.snapshots;
    report.generation = generation;
    if !opts.dry_run {
        report.blocks_written = ov.apply().map_err(|e| restoring(label, e))?;
    }
    Ok(report)
}

/// The I/O error of writing the restored metadata.
fn restoring(label: &str, e: std::io::Error) -> Error {
    Error::io(format!("{label}: restoring metadata"), e)
}

/// Refuses a dump restore cannot write: one the loader would refuse, one of
/// a shared pool, or one larger than the device.
fn check_restorable(dev: &dyn BlockDevice, label: &str, d: &MetadataDump) -> Result<()> {
    d.validate()
        .map_err(|e| Error::InvalidArgument(format!("metadata dump: {e}")))?;
    if d.pool.io_timeout_ms != 0 {
        // Every host's journal and the group claims would need resetting
        // too; until restore knows how, it refuses rather than guesses.
        return Err(Error::InvalidArgument(
            "the dump is of a shared pool; restore supports single-host pools only".into(),
        ));
    }
    let size = dev.size_bytes().map_err(|e| Error::io(label, e))?;
    let need = d.pool.pool_blocks * BLOCK_SIZE as u64;
    if size < need {
        return Err(Error::InvalidArgument(format!(
            "{label} is {size} bytes; the dumped pool needs {need}"
        )));
    }
    Ok(())
}

/// What the target holds before the restore.
struct Target {
    /// The highest superblock generation on it, or the dump's if higher.
    generation: u64,
    /// Block ranges its metadata still uses (when it opens): left untouched
    /// until the new superblock is durable, so a crash during the restore
    /// leaves it intact.
    keep: Vec<(u64, u64)>,
}

/// Looks at the target's superblocks and whether its pool opens; refuses
/// another geometry, and without `force` another pool or one that opens.
/// Says in `notes` what it found.
fn survey_target(
    dev: &dyn BlockDevice,
    label: &str,
    d: &MetadataDump,
    layout: &Layout,
    opts: &RestoreOptions,
    notes: &mut Vec<String>,
) -> Result<Target> {
    let mut target = Target {
        generation: d.pool.on_disk.generation,
        keep: Vec::new(),
    };
    let mut superblocks = Vec::new();
    for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
        let b = read_block(dev, at).map_err(|e| Error::io(label, e))?;
        if let Ok(sb) = Superblock::decode(&b, at) {
            superblocks.push(sb);
        }
    }
    for sb in &superblocks {
        if !same_geometry(&sb.layout, layout) {
            return Err(Error::InvalidArgument(format!(
                "the dump is of a pool with another geometry ({}) than {label} ({}); refusing",
                describe(layout),
                describe(&sb.layout)
            )));
        }
        if sb.uuid != d.pool.uuid && !opts.force {
            return Err(Error::InvalidArgument(format!(
                "the dump is of pool {} but {label} holds pool {}; use --force to restore anyway",
                format_uuid(&d.pool.uuid),
                format_uuid(&sb.uuid)
            )));
        }
        target.generation = target.generation.max(sb.generation);
    }
    match load(dev, label, SINGLE_HOST_ID, crate::util::boot_id()) {
        Ok(l) => {
            if !opts.force {
                return Err(Error::busy(crate::BusyKind::NeedsForce, format!(
                    "{label} holds a pool that opens without errors ({} volumes); restoring replaces its metadata with the dump's (changes since the dump are lost): use --force",
                    l.state.volumes.len()
                )));
            }
            notes.push(format!(
                "{label} held a working pool ({} volumes); its metadata is replaced",
                l.state.volumes.len()
            ));
            let metadata = l.state.metadata_block_set().into_iter();
            target.keep.extend(metadata.map(|b| (b, b + 1)));
        }
        Err(e @ Error::Io { .. }) => return Err(e),
        Err(e) => notes.push(format!("{label} did not open before the restore ({e})")),
    }
    if superblocks.is_empty() {
        notes.push("no valid superblock was found; the dump's geometry is used".into());
    }
    Ok(target)
}

fn same_geometry(a: &Layout, b: &Layout) -> bool {
    (
        a.pool_blocks,
        a.max_pool_blocks,
        a.chunk_blocks,
        a.ag_blocks,
        a.max_hosts,
        a.journal_blocks,
    ) == (
        b.pool_blocks,
        b.max_pool_blocks,
        b.chunk_blocks,
        b.ag_blocks,
        b.max_hosts,
        b.journal_blocks,
    )
}

fn describe(l: &Layout) -> String {
    format!(
        "{} blocks (growth limit {}), chunk {} blocks, {} hosts, journal {} blocks per host",
        l.pool_blocks, l.max_pool_blocks, l.chunk_blocks, l.max_hosts, l.journal_blocks
    )
}

/// Where restore puts the new metadata: data-area blocks nothing kept
/// holds, lowest first, second copies away from the first.
struct Alloc {
    space: SpaceMap,
    first: Cursor,
    second: Cursor,
}

impl Alloc {
    fn new(keep: impl IntoIterator<Item = (u64, u64)>, layout: &Layout) -> Alloc {
        let mut space = SpaceMap::new(layout);
        let mut overlap = Vec::new();
        for (s, e) in keep {
            let (s, e) = (s.max(layout.data_start), e.min(layout.data_end()));
            if s < e {
                overlap.clear();
                space.mark_or_share(s, e - s, &mut overlap);
            }
        }
        Alloc {
            space,
            first: Cursor::default(),
            second: Cursor::default(),
        }
    }

    fn take(&mut self) -> Result<u64> {
        let run = self.space.allocate_run(&mut self.first, 1);
        run.map(|(b, _)| b).ok_or(Error::NoSpace)
    }

    /// Two blocks in different chunks, far apart (both copies of a record).
    fn take_pair(&mut self) -> Result<NodeAddr> {
        let (block, twin) = self
            .space
            .allocate_pair(&mut self.first, &mut self.second)
            .ok_or(Error::NoSpace)?;
        Ok(NodeAddr { block, twin })
    }
}

/// A new checkpoint for `host`'s journal: the next generation, the ring
/// restarting at its head past every sequence number in it (and past
/// `min_seq`), so no old journal block can be replayed after it.
fn fresh_checkpoint(
    dev: &dyn BlockDevice,
    layout: &Layout,
    uuid: &[u8; 16],
    host: u32,
    min_seq: u64,
) -> Result<HostCheckpoint> {
    let (generation, max_seq) = host_state(dev, layout, host)?;
    Ok(HostCheckpoint {
        generation: generation.unwrap_or(0) + 1,
        head: 0,
        seq: max_seq.max(min_seq) + 1,
        prev_crc: journal_seed(uuid, host),
    })
}

/// Highest generation among the valid copies of a host checkpoint, and the
/// highest journal sequence number in the host's ring.
fn host_state(dev: &dyn BlockDevice, layout: &Layout, host: u32) -> Result<(Option<u64>, u64)> {
    let region = layout.host_region(host);
    let ring_len = layout.journal_blocks - HOST_CHECKPOINT_BLOCKS;
    let blocks: Vec<u64> = (region..region + layout.journal_blocks as u64).collect();
    let bufs = read_blocks(dev, &blocks, "reading journal")?;
    let mut gen = None;
    for k in 0..HOST_CHECKPOINT_BLOCKS as usize {
        if let Ok(c) = decode_host_checkpoint(&bufs[k], blocks[k], ring_len) {
            gen = gen.max(Some(c.generation));
        }
    }
    let mut max_seq = 0;
    for k in HOST_CHECKPOINT_BLOCKS as usize..blocks.len() {
        if let Ok(Some((jb, _))) = decode_block(&bufs[k], blocks[k]) {
            max_seq = max_seq.max(jb.seq);
        }
    }
    Ok((gen, max_seq))
}

/// Each volume's mapping tree and header pair, into `out`; returns the
/// volumes' catalog records.
fn write_volumes(
    d: &MetadataDump,
    journal_seq: u64,
    alloc: &mut Alloc,
    out: &mut Blocks,
) -> Result<Vec<VolumeRecord>> {
    let mut records = Vec::with_capacity(d.volumes.len());
    for v in &d.volumes {
        let (root, depth) = write_tree(v, journal_seq, alloc, out)?;
        let header = VolumeHeader {
            volume_id: v.id,
            generation: 1,
            root,
            depth,
            mapped_blocks: mapped_blocks(&v.extents),
            extent_count: v.extents.len() as u64,
            journal_seq,
            journal_host: SINGLE_HOST_ID,
        };
        let pair = alloc.take_pair()?;
        let header_blocks = [pair.block, pair.twin];
        for at in header_blocks {
            out.push((at, encode_volume_header(&header, at)));
        }
        records.push(VolumeRecord {
            id: v.id,
            flags: v.flags,
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            header_blocks,
            parent_id: v.parent_id,
            origin_id: v.origin_id,
            created_unix: v.created_unix,
            active_host: v.active_host,
            active_gen: 0,
        });
    }
    Ok(records)
}

/// A volume's mapping tree, every node as two copies: leaves of up to
/// `NODE_CAPACITY` extents, then the interior levels above them. Returns
/// the root and the depth.
fn write_tree(
    v: &VolumeDump,
    journal_seq: u64,
    alloc: &mut Alloc,
    out: &mut Blocks,
) -> Result<(NodeAddr, u16)> {
    let mut children = Vec::new();
    for (i, chunk) in v.extents.chunks(NODE_CAPACITY).enumerate() {
        let at = alloc.take_pair()?;
        let key = if i == 0 { 0 } else { chunk[0].vblock };
        let leaf = Node::Leaf(chunk.to_vec());
        out.extend(node::encode_copies(&leaf, v.id, journal_seq, at));
        children.push(Child { key, at });
    }
    node::build_interior(
        children,
        DITTO,
        || alloc.take_pair(),
        |at, n| out.extend(node::encode_copies(&n, v.id, journal_seq, at)),
    )
}

/// The catalog holding `records`, into `out`; returns its first block (0
/// for no volumes), the superblock's `catalog_root`.
fn write_catalog(
    records: &[VolumeRecord],
    generation: u64,
    alloc: &mut Alloc,
    out: &mut Blocks,
) -> Result<u64> {
    let nblocks = records.len().div_ceil(RECORDS_PER_BLOCK);
    let cat_blocks = (0..nblocks)
        .map(|_| alloc.take())
        .collect::<Result<Vec<u64>>>()?;
    for (i, recs) in records.chunks(RECORDS_PER_BLOCK).enumerate() {
        let cb = CatalogBlock {
            records: recs.to_vec(),
            next: cat_blocks.get(i + 1).copied().unwrap_or(0),
        };
        out.push((
            cat_blocks[i],
            encode_catalog(&cb, generation, cat_blocks[i]),
        ));
    }
    Ok(cat_blocks.first().copied().unwrap_or(0))
}

/// Reserved structures the loader and check verify, where damaged, as at
/// pool creation, into `out`: an AG table block becomes an empty one (v1
/// never claims groups); a host other than 1 without a valid checkpoint
/// pair gets a fresh one past its ring's sequences; a host slot or lock
/// register (unused on a single-host pool; random bytes from a stray dd)
/// becomes never-used again.
fn reset_damaged_reserved(
    dev: &dyn BlockDevice,
    label: &str,
    layout: &Layout,
    uuid: &[u8; 16],
    out: &mut Blocks,
) -> Result<()> {
    for i in 0..layout.ag_table_blocks {
        let at = layout.ag_table_start + i;
        let b = read_block(dev, at).map_err(|e| Error::io(label, e))?;
        if claims::decode(&b, at, layout.max_hosts).is_err() {
            let empty = vec![claims::Claim::default(); claims::CLAIMS_PER_BLOCK];
            out.push((at, claims::encode(&empty, 1, at)));
        }
    }
    let ring_len = layout.journal_blocks - HOST_CHECKPOINT_BLOCKS;
    for host in (1..=layout.max_hosts).filter(|&h| h != SINGLE_HOST_ID) {
        let region = layout.host_region(host);
        let mut valid = 0;
        for k in 0..HOST_CHECKPOINT_BLOCKS as u64 {
            let b = read_block(dev, region + k).map_err(|e| Error::io(label, e))?;
            valid += decode_host_checkpoint(&b, region + k, ring_len).is_ok() as u32;
        }
        if valid < HOST_CHECKPOINT_BLOCKS {
            let ck = fresh_checkpoint(dev, layout, uuid, host, 0)?;
            out.extend(checkpoint_copies(layout, host, &ck));
        }
    }
    for dl in damaged_lease_blocks(dev, layout)? {
        out.push((dl.block, vec![0u8; BLOCK_SIZE]));
    }
    Ok(())
}

/// Both copies of a host checkpoint, in order.
fn checkpoint_copies(layout: &Layout, host: u32, ck: &HostCheckpoint) -> Blocks {
    let region = layout.host_region(host);
    (0..HOST_CHECKPOINT_BLOCKS as u64)
        .map(|k| (region + k, encode_host_checkpoint(ck, region + k)))
        .collect()
}

/// `blocks`, `sb` and host 1's checkpoint written onto an in-memory overlay
/// of `dev` in the engine's update order: the new blocks, a flush, then
/// superblock copy A and B and the checkpoint copies A and B that start
/// the new journal, each flushed.
fn build_on_overlay(
    dev: Arc<dyn BlockDevice>,
    label: &str,
    blocks: &Blocks,
    sb: &Superblock,
    host_ckpt: &HostCheckpoint,
) -> Result<Arc<OverlayDevice>> {
    let layout = &sb.layout;
    let ov = Arc::new(OverlayDevice::new(dev));
    let io = |e| restoring(label, e);
    for batch in blocks.chunks(1024) {
        write_blocks(ov.as_ref(), batch).map_err(io)?;
    }
    // A torn block where the new journal starts would read as an
    // interrupted commit: clear it.
    let ring0 = layout.host_region(SINGLE_HOST_ID) + HOST_CHECKPOINT_BLOCKS as u64;
    if torn_tail(ov.as_ref(), layout, 0)?.is_some() {
        write_blocks(ov.as_ref(), &[(ring0, vec![0u8; BLOCK_SIZE])]).map_err(io)?;
    }
    ov.flush().map_err(io)?;
    let superblocks = [SUPERBLOCK_A, SUPERBLOCK_B].map(|at| (at, sb.encode(at)));
    let checkpoints = checkpoint_copies(layout, SINGLE_HOST_ID, host_ckpt);
    for block in superblocks.into_iter().chain(checkpoints) {
        write_blocks(ov.as_ref(), &[block]).map_err(io)?;
        ov.flush().map_err(io)?;
    }
    Ok(ov)
}

/// The restored metadata on the overlay must check clean and dump back to
/// the dump's meaning; otherwise nothing is written.
fn verify(ov: &OverlayDevice, label: &str, d: &MetadataDump) -> Result<()> {
    let after = check(ov, label)?;
    let problems: Vec<&String> = after.errors.iter().chain(&after.warnings).collect();
    if let Some(first) = problems.first() {
        for p in &problems {
            log::debug!("{label}: restored metadata: {p}");
        }
        let more = match problems.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        return Err(Error::Corrupt(format!(
            "the restored metadata did not verify ({first}{more}); nothing was written"
        )));
    }
    let back = super::dump(ov, label)?;
    if back.meaning() != d.meaning() {
        return Err(Error::Corrupt(
            "the restored metadata reads back differently from the dump; nothing was written"
                .into(),
        ));
    }
    Ok(())
}
