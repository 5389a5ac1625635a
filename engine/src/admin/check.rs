//! `check`: verifies a pool on its LUN without changing anything. Loading
//! already proves most invariants (every checksum, tree shape and key
//! ranges, every block owned once, journal chain); this adds the rest and
//! turns the outcome into a report an admin can read.

use crate::dev::{read_block, BlockDevice};
use crate::error::{Error, Result};
use crate::format::SINGLE_HOST_ID;
use crate::format::{
    claims, codec, journal::decode_host_checkpoint, magic, Layout, BLOCK_SIZE,
    HOST_CHECKPOINT_BLOCKS,
};
use crate::load::{load_observed, Copies};

/// The outcome of a check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that make the pool unusable or data untrustworthy.
    pub errors: Vec<String>,
    /// Damage that a redundant copy covers (rewritten on the next commit).
    pub warnings: Vec<String>,
    /// Catalog entries that are not snapshots (as `PoolStatus::volumes`).
    pub volumes: u64,
    /// Catalog entries that are snapshots.
    pub snapshots: u64,
    /// Blocks mapped, summed over every volume and snapshot (shared blocks
    /// count once per tree).
    pub mapped_blocks: u64,
    /// Extents, summed over every tree.
    pub extents: u64,
    /// Blocks of the data area.
    pub data_blocks: u64,
    /// Data blocks no tree or metadata record uses.
    pub free_blocks: u64,
    /// Data blocks that hold metadata (catalog, volume headers, tree nodes).
    pub metadata_blocks: u64,
    /// Journal blocks the load replayed on top of the checkpoints.
    pub journal_blocks_replayed: u64,
    /// The journal ends in a torn or damaged block (at this address): an
    /// interrupted commit. Replay stops before it, as after a power loss
    /// during that commit; `repair` clears it.
    pub torn_journal_block: Option<u64>,
    /// Volumes whose tree could not be fully read, with what they can no
    /// longer map (each also an error).
    pub damaged: Vec<(String, crate::map::state::DamagedRange)>,
}

impl CheckReport {
    /// No errors (warnings may remain).
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

pub use crate::load::Progress;

/// Checks the pool on `dev`. Returns `Err` only when the LUN cannot be read
/// at all or holds no pool; damage is reported in the report.
pub fn check(dev: &dyn BlockDevice, label: &str) -> Result<CheckReport> {
    check_with_progress(dev, label, &Progress::default())
}

/// [`check`], reporting its progress in `progress`.
pub fn check_with_progress(
    dev: &dyn BlockDevice,
    label: &str,
    progress: &Progress,
) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    // A shared pool's journals belong to their hosts; a single-host pool's
    // journal is replayed as opening it would.
    let host = match crate::load::read_superblock(dev, label, &mut Vec::new()) {
        Ok(sb) if sb.shared.is_some() => 0,
        _ => SINGLE_HOST_ID,
    };
    let loaded = match load_observed(
        dev,
        label,
        host,
        crate::util::boot_id(),
        Copies::Both,
        Some(progress),
        None,
    ) {
        Ok(l) => l,
        Err(e @ (Error::NotAPool(_) | Error::Io { .. } | Error::UnsupportedVersion { .. })) => {
            return Err(e)
        }
        Err(e) => {
            report.errors.push(e.to_string());
            return Ok(report);
        }
    };
    report.warnings = loaded.warnings;
    report.journal_blocks_replayed = loaded.replayed_blocks;
    let st = &loaded.state;
    let layout = st.sb.layout;
    match torn_tail(dev, &layout, loaded.tail) {
        Ok(Some(at)) => {
            report.torn_journal_block = Some(at);
            report.warnings.push(format!(
                "journal: block {at}, where the journal ends (sequence {}), is torn or damaged: a commit was interrupted (power loss) or the block was damaged later; its changes are not applied, as after a power loss during that commit",
                loaded.next_seq
            ));
        }
        Ok(None) => {}
        Err(e) => report.errors.push(e.to_string()),
    }
    for v in st.volumes.values() {
        let name = st.display_name(v);
        for d in crate::map::state::damaged_ranges(v) {
            let (s0, s1) = d.sectors();
            let (b0, b1) = d.bytes();
            report.errors.push(format!(
                "volume '{name}' is damaged: it cannot map sectors {s0}..{s1} (bytes {b0}..{b1}, {}): {}",
                crate::util::human_bytes(b1 - b0),
                d.reason
            ));
            report.damaged.push((name.clone(), d));
        }
        let end_block = v.rec.size_bytes / BLOCK_SIZE as u64;
        let mut beyond = 0u64;
        v.map.for_each(|e| {
            if e.vend() > end_block {
                beyond += 1;
            }
        });
        if beyond > 0 {
            report.errors.push(format!(
                "volume '{}': {beyond} extents lie past its end ({} bytes)",
                v.rec.name, v.rec.size_bytes
            ));
        }
        report.mapped_blocks += v.map.mapped_blocks();
        report.extents += v.map.extent_count();
    }
    report.snapshots = st
        .volumes
        .values()
        .filter(|v| v.rec.flags & crate::format::catalog::flags::SNAPSHOT != 0)
        .count() as u64;
    report.volumes = st.volumes.len() as u64 - report.snapshots;
    report.data_blocks = st.space.total_blocks();
    report.free_blocks = st.space.free_blocks();
    report.metadata_blocks = st.metadata_blocks();
    // Blocks in use = distinct data blocks + metadata; a block shared by
    // several leaves (snapshots, clones) counts once.
    let used = report.data_blocks - report.free_blocks;
    let leaf_refs: u64 = st
        .distinct_leaves()
        .iter()
        .flat_map(|l| l.data_runs())
        .map(|r| r.1)
        .sum();
    let data = leaf_refs - st.refs.extra_total();
    // A damaged pool holds blocks no readable tree names (5.1): the sum
    // cannot match, and the damage is reported above.
    if !st.is_damaged() && used != data + report.metadata_blocks {
        report.errors.push(format!(
            "space accounting: {used} blocks in use but {data} hold data and {} metadata",
            report.metadata_blocks
        ));
    }
    // Reserved multi-host structures must at least be intact.
    for i in 0..layout.ag_table_blocks {
        let at = layout.ag_table_start + i;
        match read_block(dev, at) {
            Ok(b) => {
                if let Err(e) = claims::decode(&b, at, layout.max_hosts) {
                    report.errors.push(e.to_string());
                }
            }
            Err(e) => report
                .errors
                .push(format!("reading allocation-group table: {e}")),
        }
    }
    check_leases(dev, &layout, &mut report);
    let ring_len = layout.journal_blocks - HOST_CHECKPOINT_BLOCKS;
    for host in 1..=layout.max_hosts {
        let region = layout.host_region(host);
        let mut good = 0;
        for k in 0..HOST_CHECKPOINT_BLOCKS as u64 {
            match read_block(dev, region + k)
                .map_err(|e| Error::io("host checkpoint", e))
                .and_then(|b| decode_host_checkpoint(&b, region + k, ring_len))
            {
                Ok(_) => good += 1,
                Err(e) => report.warnings.push(format!("host {host}: {e}")),
            }
        }
        if good == 0 {
            report
                .errors
                .push(format!("host {host}: both checkpoint copies are damaged"));
        }
    }
    Ok(report)
}

/// Host slots and lock registers: a damaged one is only a warning (its
/// host rewrites it on its next renewal, or it is treated as a dead host's
/// after the dead time; on a single-host pool, which never uses them,
/// `repair` and `restore` clear it), but an admin should know.
fn check_leases(dev: &dyn BlockDevice, layout: &crate::format::Layout, report: &mut CheckReport) {
    match damaged_lease_blocks(dev, layout) {
        Ok(damaged) => report.warnings.extend(
            damaged
                .into_iter()
                .map(|d| format!("host {}: {}", d.host, d.problem)),
        ),
        Err(e) => report.errors.push(e.to_string()),
    }
}

/// A host slot or lock register that does not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DamagedLease {
    pub host: u32,
    pub block: u64,
    pub problem: String,
}

/// Every host slot and lock register that is neither all zeros (never
/// used) nor a valid record. `Err` when one cannot be read.
pub(crate) fn damaged_lease_blocks(
    dev: &dyn BlockDevice,
    layout: &crate::format::Layout,
) -> Result<Vec<DamagedLease>> {
    use crate::format::lease::{HostSlot, LockRegister};
    let mut out = Vec::new();
    for h in 1..=layout.max_hosts {
        let (slot, reg) = (layout.host_slot(h), layout.lock_register(h));
        let b =
            read_block(dev, slot).map_err(|e| Error::io(format!("reading host slot {h}"), e))?;
        if let Err(e) = HostSlot::decode(&b, slot, h) {
            out.push(DamagedLease {
                host: h,
                block: slot,
                problem: e.to_string(),
            });
        }
        let b =
            read_block(dev, reg).map_err(|e| Error::io(format!("reading lock register {h}"), e))?;
        if let Err(e) = LockRegister::decode(&b, reg, h) {
            out.push(DamagedLease {
                host: h,
                block: reg,
                problem: e.to_string(),
            });
        }
    }
    Ok(out)
}

/// The address of the ring block where this host's journal replay stopped
/// (`tail`), if that block carries the journal magic but fails its
/// checksum or address check: the torn last block of an interrupted
/// commit. (A stale block of an earlier lap, or an empty one, is the normal
/// end of a journal.)
pub(crate) fn torn_tail(dev: &dyn BlockDevice, layout: &Layout, tail: u32) -> Result<Option<u64>> {
    let at = layout.host_region(SINGLE_HOST_ID) + HOST_CHECKPOINT_BLOCKS as u64 + tail as u64;
    let b = read_block(dev, at).map_err(|e| Error::io("reading journal", e))?;
    if &b[0..8] != magic::JOURNAL {
        return Ok(None);
    }
    Ok(match codec::open(&b, magic::JOURNAL, at, "journal block") {
        Err(Error::Corrupt(_)) => Some(at),
        _ => None,
    })
}
