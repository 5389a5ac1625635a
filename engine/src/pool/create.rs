//! Making a new pool: the configuration checked and turned into a
//! [`Layout`], the initial records written (reserved regions zeroed, an
//! empty claim table, every host's checkpoints, the superblock last), and
//! the result opened.

use super::{open_device, Pool};
use crate::dev::{write_blocks, BlockDevice};
use crate::error::{Error, Result};
use crate::format::journal::{encode_host_checkpoint, HostCheckpoint};
use crate::format::superblock::{has_magic, Policy, SharedParams, Superblock};
use crate::format::{
    claims, Layout, AG_BLOCKS, BLOCK_SIZE, HOST_CHECKPOINT_BLOCKS, MAX_AGS, MAX_BLOCKS,
    MAX_CHUNK_BYTES, MAX_HOSTS, MIN_CHUNK_BYTES, MIN_JOURNAL_BLOCKS, SUPERBLOCK_A, SUPERBLOCK_B,
};
use crate::util::{journal_seed, now_unix, random_uuid};
use crate::{OpenOptions, PoolConfig};
use std::path::Path;
use std::sync::Arc;

impl Pool {
    /// Creates a pool on a file (made sparse if missing) or block device.
    pub fn create_path(path: &Path, cfg: &PoolConfig) -> Result<Pool> {
        let label = path.display().to_string();
        let created = !path.exists();
        let result = Pool::create_new_file(path, &label, cfg);
        if result.is_err() && created {
            // Leave nothing behind from a failed create.
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn create_new_file(path: &Path, label: &str, cfg: &PoolConfig) -> Result<Pool> {
        if !path.exists() {
            let size = cfg.size_bytes.ok_or_else(|| {
                Error::InvalidArgument(format!("{label} does not exist; give a size to create it"))
            })?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| Error::io(label, e))?;
            f.set_len(size).map_err(|e| Error::io(label, e))?;
        } else if let Some(size) = cfg.size_bytes {
            let meta = std::fs::metadata(path).map_err(|e| Error::io(label, e))?;
            if meta.is_file() && meta.len() < size {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(label, e))?;
                f.set_len(size).map_err(|e| Error::io(label, e))?;
            }
        }
        let dev = open_device(path, false)?;
        Pool::create(dev, label, cfg)
    }

    /// Writes a new, empty pool onto `dev` and opens it.
    pub fn create(dev: Arc<dyn BlockDevice>, label: &str, cfg: &PoolConfig) -> Result<Pool> {
        let dev_bytes = dev.size_bytes().map_err(|e| Error::io(label, e))?;
        let layout = new_layout(cfg, dev_bytes, label)?;
        if !cfg.force {
            refuse_existing_pool(dev.as_ref(), label)?;
        }
        let sb = new_superblock(layout, cfg);
        write_new_pool(dev.as_ref(), label, &sb)?;
        // A shared pool needs a host identity to be written; the creator
        // gets a read-only handle.
        let opts = OpenOptions {
            read_only: sb.shared.is_some(),
            ..OpenOptions::default()
        };
        Pool::open(dev, label, &opts)
    }
}

/// The layout of a pool made with `cfg` on a device of `dev_bytes`, after
/// checking every setting against the format's limits; the pool must have
/// room for at least four chunks of data.
fn new_layout(cfg: &PoolConfig, dev_bytes: u64, label: &str) -> Result<Layout> {
    let size = cfg.size_bytes.unwrap_or(dev_bytes);
    if size > dev_bytes {
        return Err(Error::InvalidArgument(format!(
            "pool size {size} is larger than {label} ({dev_bytes} bytes)"
        )));
    }
    let chunk = cfg.chunk_bytes;
    if !chunk.is_power_of_two() || !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk) {
        return Err(Error::InvalidArgument(format!(
            "chunk size {chunk} must be a power of two from 64K to 1G"
        )));
    }
    if cfg.max_hosts == 0 || cfg.max_hosts > MAX_HOSTS {
        return Err(Error::InvalidArgument(format!(
            "host count must be 1..={MAX_HOSTS}"
        )));
    }
    let pool_blocks = size / BLOCK_SIZE as u64;
    if pool_blocks >= MAX_BLOCKS {
        return Err(Error::InvalidArgument(format!(
            "pool size {size} exceeds the format's 1 EiB limit"
        )));
    }
    let journal_blocks = match cfg.journal_bytes {
        Some(j) => {
            let b = j / BLOCK_SIZE as u64;
            if b < MIN_JOURNAL_BLOCKS as u64 || b > u32::MAX as u64 {
                return Err(Error::InvalidArgument(format!(
                    "journal size must be at least {} KiB",
                    MIN_JOURNAL_BLOCKS as usize * BLOCK_SIZE / 1024
                )));
            }
            b as u32
        }
        None => default_journal_blocks(pool_blocks, cfg.max_hosts),
    };
    let max_pool_blocks = (pool_blocks.saturating_mul(64))
        .max((64u64 << 40) / BLOCK_SIZE as u64)
        .min(MAX_BLOCKS - 1);
    let chunk_blocks = (chunk / BLOCK_SIZE as u64) as u32;
    let ag_blocks = match cfg.shared.and_then(|s| s.group_bytes) {
        Some(g) => {
            let b = g / BLOCK_SIZE as u64;
            if !b.is_power_of_two() || b < chunk_blocks as u64 || b > u32::MAX as u64 {
                return Err(Error::InvalidArgument(format!(
                    "allocation-group size {g} must be a power of two of at least one chunk"
                )));
            }
            b as u32
        }
        None => AG_BLOCKS.max(chunk_blocks),
    };
    // Small groups bound how far the pool may grow (the claim table is
    // sized at creation).
    let max_pool_blocks = if ag_blocks < AG_BLOCKS {
        max_pool_blocks.min(MAX_AGS * ag_blocks as u64)
    } else {
        max_pool_blocks
    };
    if let Some(s) = cfg.shared {
        if s.io_timeout_ms == 0 {
            return Err(Error::InvalidArgument(
                "the I/O timeout must be positive".into(),
            ));
        }
    }
    let layout = Layout::compute_with_groups(
        pool_blocks,
        max_pool_blocks,
        chunk_blocks,
        ag_blocks,
        cfg.max_hosts,
        journal_blocks,
    );
    if layout.data_chunks() < 4 {
        let need = (layout.data_start + 4 * chunk_blocks as u64) * BLOCK_SIZE as u64;
        return Err(Error::InvalidArgument(format!(
            "pool too small: with these settings it needs at least {} MiB",
            need.div_ceil(1 << 20)
        )));
    }
    Ok(layout)
}

/// Journal blocks per host when the configuration names none: 1/512 of
/// the pool shared among the hosts, from 256 KiB to 8 MiB each.
fn default_journal_blocks(pool_blocks: u64, max_hosts: u32) -> u32 {
    let per_host = pool_blocks / 512 / max_hosts as u64;
    per_host.clamp(MIN_JOURNAL_BLOCKS as u64, 2048) as u32
}

/// Refuses a device where either superblock copy already says "pool"
/// (overwriting one needs `force`).
fn refuse_existing_pool(dev: &dyn BlockDevice, label: &str) -> Result<()> {
    for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
        let b = crate::dev::read_block(dev, at).map_err(|e| Error::io(label, e))?;
        if has_magic(&b) {
            return Err(Error::busy(
                crate::BusyKind::NeedsForce,
                format!("{label} already holds a thinlun pool; use --force to overwrite it"),
            ));
        }
    }
    Ok(())
}

/// The first superblock of a new pool: generation 1, no volumes, a fresh
/// uuid, the default policy.
fn new_superblock(layout: Layout, cfg: &PoolConfig) -> Superblock {
    let now = now_unix();
    Superblock {
        generation: 1,
        layout,
        uuid: random_uuid(),
        catalog_root: 0,
        next_volume_id: 1,
        created_unix: now,
        commit_unix: now,
        policy: Policy::default(),
        shared: cfg.shared.map(|s| SharedParams {
            io_timeout_ms: s.io_timeout_ms,
        }),
        ditto_nodes: cfg.ditto_nodes,
    }
}

/// Writes the records a new pool starts with: reserved regions zeroed,
/// the claim table and every host's checkpoints valid and empty, flushed;
/// then the two superblock copies, each flushed on its own. Until the
/// superblock is durable the LUN is not a pool.
fn write_new_pool(dev: &dyn BlockDevice, label: &str, sb: &Superblock) -> Result<()> {
    let layout = sb.layout;
    let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
    for b in layout.host_slot_start..layout.ag_table_start {
        blocks.push((b, vec![0u8; BLOCK_SIZE]));
    }
    let empty_claims = vec![claims::Claim::default(); claims::CLAIMS_PER_BLOCK];
    for i in 0..layout.ag_table_blocks {
        let at = layout.ag_table_start + i;
        blocks.push((at, claims::encode(&empty_claims, 1, at)));
    }
    for host in 1..=layout.max_hosts {
        let region = layout.host_region(host);
        for k in 0..HOST_CHECKPOINT_BLOCKS as u64 {
            let ck = HostCheckpoint {
                generation: 1,
                head: 0,
                seq: 1,
                prev_crc: journal_seed(&sb.uuid, host),
            };
            blocks.push((region + k, encode_host_checkpoint(&ck, region + k)));
        }
    }
    let io = |e| Error::io(format!("{label}: writing new pool"), e);
    // A journal an earlier pool left on this LUN fails the new chain's
    // first check, but its valid blocks would still count as "a later
    // commit follows" (FORMAT.md 6.4) and make the new pool refuse to
    // open: the rings start zeroed.
    let journals = layout.max_hosts as u64 * layout.journal_blocks as u64;
    crate::dev::clear_blocks(dev, layout.journal_start, journals).map_err(io)?;
    for batch in blocks.chunks(1024) {
        write_blocks(dev, batch).map_err(io)?;
    }
    dev.flush().map_err(io)?;
    for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
        write_blocks(dev, &[(at, sb.encode(at))]).map_err(io)?;
        dev.flush().map_err(io)?;
    }
    Ok(())
}
