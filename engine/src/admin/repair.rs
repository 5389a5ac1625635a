//! `repair`: fixes what can be fixed without guessing, refuses the rest,
//! and never makes things worse.
//!
//! What it fixes is exactly what a redundant record or the update
//! protocols already determine:
//! - a damaged, missing or out-of-date superblock copy, from its twin;
//! - a damaged volume-header copy or host-checkpoint copy, from its twin;
//! - a torn block at the end of the journal (an interrupted commit, which
//!   replay already ignores): a checkpoint makes that permanent and the
//!   block is cleared;
//! - journal changes not yet folded into the trees: folded in;
//! - a damaged host slot or lock register, which a single-host pool never
//!   uses: cleared to the never-used (zero) state;
//! - free space and reference counts: nothing to do on disk. They are not
//!   stored; every open derives them from the mapping trees, so blocks
//!   leaked by interrupted operations are free again by construction.
//!
//! Anything `check` reports as an error (both copies of a record bad, a bad
//! mapping-tree node or catalog block, blocks owned twice, ...) would need a
//! guess about which data is right, so repair refuses and writes nothing;
//! `thinctl dump`/`restore` or backups are the way on from there. For a
//! damaged mapping node the refusal names the other way, which gives up
//! what the node mapped and so is only run when asked for:
//! [`crate::admin::salvage`].
//!
//! The work happens on an in-memory overlay of the LUN: the pool is opened
//! there (which rewrites both copies of every two-copy record), checkpointed
//! and closed; the result must pass `check` with no error and no warning;
//! only then are the recorded writes applied to the LUN, in their original
//! order with their flushes, so each intermediate state is one the normal
//! update protocol also produces.

use crate::admin::check::{check, torn_tail, CheckReport};
use crate::dev::{read_block, write_blocks, BlockDevice, OverlayDevice};
use crate::error::{Error, Result};
use crate::format::catalog::decode_volume_header;
use crate::format::journal::{decode_host_checkpoint, encode_host_checkpoint, HostCheckpoint};
use crate::format::superblock::Superblock;
use crate::format::SINGLE_HOST_ID;
use crate::format::{BLOCK_SIZE, HOST_CHECKPOINT_BLOCKS, SUPERBLOCK_A, SUPERBLOCK_B};
use crate::load::{load, load_observed, Copies};
use crate::pool::{OpenOptions, Pool};
use std::sync::Arc;

/// What `repair` found and did.
#[derive(Clone, Debug, Default)]
pub struct RepairReport {
    /// Problems repair fixes (fixed, unless a dry run or refused).
    pub fixes: Vec<String>,
    /// Damage that cannot be repaired without guessing. When not empty,
    /// nothing was written.
    pub refused: Vec<String>,
    /// Facts for the admin that need no action.
    pub notes: Vec<String>,
    /// Nothing was written: the report says what repair would do.
    pub dry_run: bool,
    /// Blocks written to the LUN (0 on a dry run, when refused, or when
    /// there was nothing to repair).
    pub blocks_written: u64,
    /// `check` of the result: of the LUN after a repair, of the in-memory
    /// result on a dry run; `None` when nothing was (to be) done.
    pub after: Option<CheckReport>,
}

impl RepairReport {
    /// Whether the LUN was changed.
    pub fn repaired(&self) -> bool {
        self.blocks_written > 0
    }
}

/// Repairs the pool on `dev`, which the caller must hold exclusively (no
/// other process may have it open for writing). `Err` only when the LUN
/// cannot be read or holds no pool; refused damage is in the report.
pub fn repair(dev: Arc<dyn BlockDevice>, label: &str, dry_run: bool) -> Result<RepairReport> {
    let mut report = RepairReport {
        dry_run,
        ..Default::default()
    };
    let sb = crate::load::read_superblock(dev.as_ref(), label, &mut Vec::new());
    if sb.is_ok_and(|sb| sb.shared.is_some()) {
        // Each host's journal, the claims and the activations would need
        // repairing too; until repair knows how, it refuses to guess.
        report.refused.push(
            "this pool is shared by several hosts: repair supports single-host pools only (a damaged superblock copy or header copy is rewritten by the next host that opens the pool)".into(),
        );
        return Ok(report);
    }
    let before = check(dev.as_ref(), label)?;
    if !before.errors.is_empty() {
        report.refused = before.errors.clone();
        // Salvage gives up data, so it is only ever run when asked for.
        let mut named: Vec<&str> = Vec::new();
        for (name, d) in &before.damaged {
            if named.contains(&name.as_str()) {
                continue;
            }
            named.push(name);
            let (s0, s1) = d.sectors();
            report.notes.push(format!(
                "volume '{name}' has an unreadable mapping node: 'thinctl repair --salvage {name}' rebuilds its tree from what is still readable; what the node mapped (from sector {s0}, up to {s1}) then reads as zeros"
            ));
        }
        report.notes.push(
            "nothing was written: this damage cannot be repaired without guessing which data is right (restore the metadata from a dump or the volumes from backups)".into(),
        );
        return Ok(report);
    }
    // check passed, so this load succeeds; it gives the catalog and journal
    // position the twin checks need, and the bad copies of ditto nodes.
    let loaded = load_observed(
        dev.as_ref(),
        label,
        SINGLE_HOST_ID,
        crate::util::boot_id(),
        Copies::Both,
        None,
        None,
    )?;
    let st = &loaded.state;
    let layout = st.sb.layout;
    let used = st.space.total_blocks() - st.space.free_blocks();
    report.notes.push(format!(
        "free space and reference counts are not stored on disk: they were rebuilt from the mapping trees ({used} of {} data blocks in use); blocks left allocated by interrupted operations are free again",
        st.space.total_blocks()
    ));

    // Superblock copies.
    for (at, twin) in [(SUPERBLOCK_A, SUPERBLOCK_B), (SUPERBLOCK_B, SUPERBLOCK_A)] {
        let b = read_block(dev.as_ref(), at).map_err(|e| Error::io(label, e))?;
        match Superblock::decode(&b, at) {
            Err(e) => report.fixes.push(format!(
                "superblock copy at block {at} is damaged or missing ({e}): rewritten from the copy at block {twin}"
            )),
            Ok(sb) if sb.generation < st.sb.generation => report.fixes.push(format!(
                "superblock copy at block {at} is out of date (generation {}, the other copy {}): rewritten",
                sb.generation, st.sb.generation
            )),
            Ok(_) => {}
        }
    }
    // Volume header pairs.
    for v in st.volumes.values() {
        for (k, &hb) in v.rec.header_blocks.iter().enumerate() {
            let b = read_block(dev.as_ref(), hb).map_err(|e| Error::io(label, e))?;
            let bad = match decode_volume_header(&b, hb) {
                Err(e) => Some(e.to_string()),
                Ok(h) if h.volume_id != v.rec.id => {
                    Some(format!("it belongs to volume id {}", h.volume_id))
                }
                Ok(_) => None,
            };
            if let Some(why) = bad {
                report.fixes.push(format!(
                    "volume '{}': header copy {} at block {hb} is damaged ({why}): rewritten from the other copy",
                    st.display_name(v),
                    ["A", "B"][k]
                ));
            }
        }
    }
    // Host checkpoint pairs. Host 1's are rewritten by the checkpoint the
    // repair runs; other hosts' (unused by v1) get their good copy back.
    let ring_len = layout.journal_blocks - HOST_CHECKPOINT_BLOCKS;
    let mut rewrites: Vec<(u64, Vec<u8>)> = Vec::new();
    for host in 1..=layout.max_hosts {
        let region = layout.host_region(host);
        let mut copies: Vec<(u64, Result<HostCheckpoint>)> = Vec::new();
        for k in 0..HOST_CHECKPOINT_BLOCKS as u64 {
            let b = read_block(dev.as_ref(), region + k).map_err(|e| Error::io(label, e))?;
            copies.push((region + k, decode_host_checkpoint(&b, region + k, ring_len)));
        }
        let good = copies.iter().find_map(|(_, c)| c.as_ref().ok().copied());
        for (at, c) in &copies {
            if let (Err(e), Some(g)) = (c, good) {
                report.fixes.push(format!(
                    "host {host}: journal checkpoint copy at block {at} is damaged ({e}): rewritten from the other copy"
                ));
                if host != SINGLE_HOST_ID {
                    rewrites.push((*at, encode_host_checkpoint(&g, *at)));
                }
            }
        }
    }
    // Ditto nodes: a bad copy gets its twin's contents (nodes are never
    // rewritten in place otherwise, so nothing else writes that block).
    for c in &loaded.bad_node_copies {
        report.fixes.push(format!(
            "mapping node copy at block {} is damaged ({}): rewritten from its twin at block {}",
            c.block, c.why, c.good
        ));
        rewrites.push(c.rewrite_from_twin(dev.as_ref())?);
    }
    // Host slots and lock registers: a single-host pool never uses them
    // (a never-used one is all zeros), so a damaged one is cleared, not
    // guessed at.
    for d in crate::admin::check::damaged_lease_blocks(dev.as_ref(), &layout)? {
        report.fixes.push(format!(
            "host {}: {}: cleared (a single-host pool does not use host slots or lock registers)",
            d.host, d.problem
        ));
        rewrites.push((d.block, vec![0u8; BLOCK_SIZE]));
    }
    if let Some(at) = before.torn_journal_block {
        report.fixes.push(format!(
            "journal: block {at} at its end is torn (an interrupted commit, or damaged later): its changes stay unapplied, as after a power loss during that commit, and the block is cleared"
        ));
    }
    if loaded.replayed_blocks > 0 {
        report.fixes.push(format!(
            "journal: {} block{} of changes not yet in the volume trees (the pool was not closed cleanly): folded into the trees",
            loaded.replayed_blocks,
            if loaded.replayed_blocks == 1 { "" } else { "s" }
        ));
    }
    drop(loaded);
    if report.fixes.is_empty() {
        return Ok(report);
    }

    let ov = Arc::new(OverlayDevice::new(dev.clone()));
    let io = |e| Error::io(format!("{label}: repairing"), e);
    if !rewrites.is_empty() {
        write_blocks(ov.as_ref(), &rewrites).map_err(io)?;
        ov.flush().map_err(io)?;
    }
    // Opening read-write rewrites both copies of every two-copy record when
    // one was damaged or stale; the checkpoint folds the journal; close
    // leaves the journal empty.
    let pool = Pool::open(ov.clone(), label, &OpenOptions::default())?;
    let done = pool.checkpoint();
    let closed = pool.close();
    done?;
    closed?;
    let after_open = load(ov.as_ref(), label, SINGLE_HOST_ID, crate::util::boot_id())?;
    if let Some(at) = torn_tail(ov.as_ref(), &layout, after_open.tail)? {
        // The journal starts here now; a zeroed block is its normal end.
        write_blocks(ov.as_ref(), &[(at, vec![0u8; BLOCK_SIZE])]).map_err(io)?;
        ov.flush().map_err(io)?;
    }
    drop(after_open);
    let after = check(ov.as_ref(), label)?;
    if !after.errors.is_empty() || !after.warnings.is_empty() {
        report.refused = after
            .errors
            .iter()
            .chain(&after.warnings)
            .map(|p| format!("after repair, check still reports: {p}"))
            .collect();
        report
            .notes
            .push("nothing was written: the repaired metadata did not verify".into());
        return Ok(report);
    }
    if dry_run {
        report.after = Some(after);
        return Ok(report);
    }
    report.blocks_written = ov.apply().map_err(io)?;
    report.after = Some(check(dev.as_ref(), label)?);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;
    use crate::{Pool, PoolConfig};

    const MIB: u64 = 1 << 20;

    fn pool_with_data() -> (Arc<MemDevice>, Vec<u64>) {
        let mem = Arc::new(MemDevice::new(64 * MIB));
        let pool = Pool::create(mem.clone(), "t", &PoolConfig::default()).unwrap();
        pool.create_volume("vm-1", 4 * MIB).unwrap();
        let v = pool.open_volume("vm-1").unwrap();
        v.write(0, &[5u8; 8192]).unwrap();
        v.flush().unwrap();
        drop(v);
        let headers = pool
            .inner
            .state
            .lock()
            .volumes
            .values()
            .flat_map(|v| v.rec.header_blocks)
            .collect();
        pool.close().unwrap();
        (mem, headers)
    }

    fn flip(mem: &MemDevice, block: u64, byte: usize) -> Arc<MemDevice> {
        let mut img = mem.image();
        img[block as usize * BLOCK_SIZE + byte] ^= 0x5a;
        Arc::new(MemDevice::from_image(img))
    }

    fn open_read_only(dev: Arc<MemDevice>) -> Pool {
        let opts = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        Pool::open(dev, "t", &opts).unwrap()
    }

    fn read_vm1(dev: Arc<MemDevice>) -> Vec<u8> {
        let pool = open_read_only(dev);
        let v = pool.open_volume("vm-1").unwrap();
        let mut buf = vec![0u8; 8192];
        v.read(0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn clean_pool_needs_nothing() {
        let (mem, _) = pool_with_data();
        let before = mem.image();
        let r = repair(mem.clone(), "t", false).unwrap();
        assert!(r.fixes.is_empty() && r.refused.is_empty(), "{r:?}");
        assert!(!r.repaired());
        assert!(mem.image() == before);
    }

    #[test]
    fn twin_copies_are_restored() {
        let (mem, headers) = pool_with_data();
        for (block, what) in [
            (SUPERBLOCK_B, "superblock copy at block 8"),
            (headers[0], "header copy A"),
            (headers[1], "header copy B"),
        ] {
            let dev = flip(&mem, block, 200);
            // A dry run finds it and writes nothing.
            let img = dev.image();
            let r = repair(dev.clone(), "t", true).unwrap();
            assert!(r.fixes.iter().any(|f| f.contains(what)), "{r:?}");
            assert!(r.after.as_ref().is_some_and(|a| a.warnings.is_empty()));
            assert!(dev.image() == img);
            let r = repair(dev.clone(), "t", false).unwrap();
            assert!(r.refused.is_empty(), "{r:?}");
            assert!(r.repaired());
            let c = check(dev.as_ref(), "t").unwrap();
            assert!(
                c.errors.is_empty() && c.warnings.is_empty(),
                "{what}: {c:?}"
            );
            assert_eq!(read_vm1(dev), vec![5u8; 8192]);
        }
    }

    #[test]
    fn torn_journal_tail_is_cleared_and_the_journal_folded() {
        use crate::format::journal::decode_block;
        let mem = Arc::new(MemDevice::new(64 * MIB));
        let pool = Pool::create(mem.clone(), "t", &PoolConfig::default()).unwrap();
        pool.create_volume("vm-1", 4 * MIB).unwrap();
        let v = pool.open_volume("vm-1").unwrap();
        v.write(0, &[1u8; 4096]).unwrap();
        v.flush().unwrap();
        v.write(64, &[2u8; 4096]).unwrap();
        v.flush().unwrap();
        // The LUN as a power loss now would leave it: two commits in the
        // journal, not yet checkpointed.
        let mut img = mem.image();
        let layout = pool.inner.state.lock().sb.layout;
        drop(v);
        pool.close().unwrap();
        let ring = layout.host_region(SINGLE_HOST_ID) + HOST_CHECKPOINT_BLOCKS as u64;
        let ring_len = (layout.journal_blocks - HOST_CHECKPOINT_BLOCKS) as u64;
        let last = (ring..ring + ring_len)
            .filter_map(|at| {
                let b = &img[at as usize * BLOCK_SIZE..(at as usize + 1) * BLOCK_SIZE];
                decode_block(b, at)
                    .ok()
                    .flatten()
                    .map(|(jb, _)| (jb.seq, at))
            })
            .max()
            .expect("journal blocks written")
            .1 as usize;
        // The last commit's block torn.
        img[last * BLOCK_SIZE + 100] ^= 0xff;
        let dev = Arc::new(MemDevice::from_image(img));
        let c = check(dev.as_ref(), "t").unwrap();
        assert_eq!(c.torn_journal_block, Some(last as u64));
        assert!(c.errors.is_empty(), "{c:?}");
        let r = repair(dev.clone(), "t", false).unwrap();
        assert!(r.fixes.iter().any(|f| f.contains("is torn")), "{r:?}");
        assert!(r.fixes.iter().any(|f| f.contains("folded")), "{r:?}");
        assert!(r.repaired() && r.refused.is_empty(), "{r:?}");
        let c = check(dev.as_ref(), "t").unwrap();
        assert!(c.errors.is_empty() && c.warnings.is_empty(), "{c:?}");
        assert_eq!(
            c.journal_blocks_replayed, 0,
            "journal folded into the trees"
        );
        // The first commit survives; the torn one is dropped, as after a
        // power loss during it.
        let pool = open_read_only(dev);
        let v = pool.open_volume("vm-1").unwrap();
        let mut buf = vec![0u8; 4096];
        v.read(0, &mut buf).unwrap();
        assert_eq!(buf, vec![1u8; 4096]);
        v.read(64, &mut buf).unwrap();
        assert_eq!(buf, vec![0u8; 4096]);
    }

    #[test]
    fn both_copies_bad_is_refused_and_nothing_written() {
        let (mem, headers) = pool_with_data();
        let dev = flip(&mem, headers[0], 100);
        let dev = flip(&dev, headers[1], 100);
        let img = dev.image();
        let r = repair(dev.clone(), "t", false).unwrap();
        assert!(!r.refused.is_empty() && !r.repaired(), "{r:?}");
        assert!(dev.image() == img);
    }
}
