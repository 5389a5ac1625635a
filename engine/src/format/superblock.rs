//! The superblock: pool geometry, pool-wide policy and the pointer to the
//! volume catalog. Two copies (blocks 0 and 8) are written in turn on every
//! pool-wide commit; the valid copy with the higher generation wins.

use super::codec::{self, get_u32, get_u64, put_u32, put_u64, Header};
use super::{
    magic, Layout, AG_BLOCKS, BLOCK_SIZE, MAX_AGS, MAX_BLOCKS, MAX_CHUNK_BYTES, MAX_HOSTS,
    MIN_CHUNK_BYTES, MIN_JOURNAL_BLOCKS,
};
use crate::error::{Error, Result};

/// Pool policy for space exhaustion (issue-level behaviour lives in the
/// engine; the fields are part of the v1 format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Warning thresholds for data use, in percent, ascending; 0 = unused.
    pub data_warn_pct: [u8; 3],
    /// Warning thresholds for metadata use, in percent.
    pub meta_warn_pct: [u8; 3],
    /// 0 = fail writes that need space with ENOSPC, 1 = queue them.
    pub when_full: u8,
    /// How long queued writes wait for space before failing.
    pub queue_timeout_ms: u32,
    /// Refuse volume creation past this overcommit (percent); 0 = no limit.
    pub max_overcommit_pct: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            data_warn_pct: [80, 90, 95],
            meta_warn_pct: [80, 90, 95],
            when_full: 0,
            queue_timeout_ms: 60_000,
            max_overcommit_pct: 0,
        }
    }
}

/// The pool's root record, as decoded from either copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Commit generation; grows by one on every superblock write.
    pub generation: u64,
    /// The pool's geometry (the derived fields are checked on decode).
    pub layout: Layout,
    /// Random at creation: tells pools (and their surviving memory) apart.
    pub uuid: [u8; 16],
    /// First block of the catalog chain (0 = no volumes yet).
    pub catalog_root: u64,
    /// Volume ids are never reused.
    pub next_volume_id: u64,
    /// Pool creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Time of this superblock write, seconds since the Unix epoch.
    pub commit_unix: u64,
    /// Space-exhaustion policy.
    pub policy: Policy,
    /// Shared by several hosts through leases on the LUN (docs/LOCKING.md);
    /// `None` for a single-host pool, guarded by a local flock only.
    pub shared: Option<SharedParams>,
    /// Every tree node is written twice, far apart (docs/FORMAT.md 4.7).
    /// Pools made before ditto nodes keep single copies.
    pub ditto_nodes: bool,
}

/// Lease timing of a shared pool: everything derives from the I/O timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedParams {
    /// The lease I/O timeout `T` in milliseconds ([`crate::lease::Timing`]).
    pub io_timeout_ms: u32,
}

/// Incompatible feature: the pool is shared through on-LUN leases; a
/// thinlun that does not know them must not write it.
pub const INCOMPAT_SHARED: u32 = 1;
/// Incompatible feature: mapping-tree nodes are written twice (ditto
/// nodes, record version 2); a thinlun that does not know them cannot
/// read the trees.
pub const INCOMPAT_DITTO_NODES: u32 = 2;
const INCOMPAT_KNOWN: u32 = INCOMPAT_SHARED | INCOMPAT_DITTO_NODES;

// Body offsets (after the 32-byte common header).
const O_BLOCK_SIZE: usize = 32;
const O_CHUNK_BLOCKS: usize = 36;
const O_AG_BLOCKS: usize = 40;
const O_MAX_HOSTS: usize = 44;
const O_JOURNAL_BLOCKS: usize = 48;
const O_INCOMPAT: usize = 52;
const O_POOL_BLOCKS: usize = 56;
const O_MAX_POOL_BLOCKS: usize = 64;
const O_HOST_SLOT_START: usize = 72;
const O_LOCK_START: usize = 80;
const O_LOCK_BLOCKS: usize = 88;
const O_AG_TABLE_START: usize = 96;
const O_AG_TABLE_BLOCKS: usize = 104;
const O_JOURNAL_START: usize = 112;
const O_DATA_START: usize = 120;
const O_CATALOG_ROOT: usize = 128;
const O_NEXT_VOLUME_ID: usize = 136;
const O_UUID: usize = 144;
const O_CREATED: usize = 160;
const O_COMMITTED: usize = 168;
const O_COMPAT: usize = 176;
const O_RO_COMPAT: usize = 180;
const O_DATA_WARN: usize = 184;
const O_META_WARN: usize = 187;
const O_WHEN_FULL: usize = 190;
const O_QUEUE_TIMEOUT: usize = 192;
const O_MAX_OVERCOMMIT: usize = 196;
const O_IO_TIMEOUT: usize = 200;

impl Superblock {
    /// The superblock as written at `at_block` (either copy's location).
    pub fn encode(&self, at_block: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        let l = &self.layout;
        put_u32(&mut b, O_BLOCK_SIZE, BLOCK_SIZE as u32);
        put_u32(&mut b, O_CHUNK_BLOCKS, l.chunk_blocks);
        put_u32(&mut b, O_AG_BLOCKS, l.ag_blocks);
        put_u32(&mut b, O_MAX_HOSTS, l.max_hosts);
        put_u32(&mut b, O_JOURNAL_BLOCKS, l.journal_blocks);
        put_u32(
            &mut b,
            O_INCOMPAT,
            if self.shared.is_some() {
                INCOMPAT_SHARED
            } else {
                0
            } | if self.ditto_nodes {
                INCOMPAT_DITTO_NODES
            } else {
                0
            },
        );
        put_u32(
            &mut b,
            O_IO_TIMEOUT,
            self.shared.map_or(0, |s| s.io_timeout_ms),
        );
        put_u64(&mut b, O_POOL_BLOCKS, l.pool_blocks);
        put_u64(&mut b, O_MAX_POOL_BLOCKS, l.max_pool_blocks);
        put_u64(&mut b, O_HOST_SLOT_START, l.host_slot_start);
        put_u64(&mut b, O_LOCK_START, l.lock_start);
        put_u64(&mut b, O_LOCK_BLOCKS, l.lock_blocks);
        put_u64(&mut b, O_AG_TABLE_START, l.ag_table_start);
        put_u64(&mut b, O_AG_TABLE_BLOCKS, l.ag_table_blocks);
        put_u64(&mut b, O_JOURNAL_START, l.journal_start);
        put_u64(&mut b, O_DATA_START, l.data_start);
        put_u64(&mut b, O_CATALOG_ROOT, self.catalog_root);
        put_u64(&mut b, O_NEXT_VOLUME_ID, self.next_volume_id);
        b[O_UUID..O_UUID + 16].copy_from_slice(&self.uuid);
        put_u64(&mut b, O_CREATED, self.created_unix);
        put_u64(&mut b, O_COMMITTED, self.commit_unix);
        put_u32(&mut b, O_COMPAT, 0);
        put_u32(&mut b, O_RO_COMPAT, 0);
        b[O_DATA_WARN..O_DATA_WARN + 3].copy_from_slice(&self.policy.data_warn_pct);
        b[O_META_WARN..O_META_WARN + 3].copy_from_slice(&self.policy.meta_warn_pct);
        b[O_WHEN_FULL] = self.policy.when_full;
        put_u32(&mut b, O_QUEUE_TIMEOUT, self.policy.queue_timeout_ms);
        put_u32(&mut b, O_MAX_OVERCOMMIT, self.policy.max_overcommit_pct);
        codec::seal(
            &mut b,
            &Header {
                magic: *magic::SUPERBLOCK,
                aux: 0,
                self_block: at_block,
                seq: self.generation,
            },
        );
        b
    }

    /// Decodes and validates one superblock copy, including that its layout
    /// is internally consistent (a checksum only proves what was written).
    pub fn decode(b: &[u8], at_block: u64) -> Result<Superblock> {
        let hdr = codec::open(b, magic::SUPERBLOCK, at_block, "superblock")?;
        let bad = |what: &str| Error::Corrupt(format!("superblock at block {at_block}: {what}"));
        if get_u32(b, O_BLOCK_SIZE) as usize != BLOCK_SIZE {
            return Err(bad("unsupported block size"));
        }
        // Unknown incompat or ro_compat bits mean a newer thinlun wrote
        // structures this one could damage, so the pool is refused; compat
        // bits are safe to ignore.
        let (incompat, ro_compat) = (get_u32(b, O_INCOMPAT), get_u32(b, O_RO_COMPAT));
        if incompat & !INCOMPAT_KNOWN != 0 || ro_compat != 0 {
            return Err(Error::Corrupt(format!(
                "superblock at block {at_block}: pool uses features this thinlun does not know (incompat {incompat:#x}, ro_compat {ro_compat:#x}); use a newer thinlun"
            )));
        }
        let chunk_blocks = get_u32(b, O_CHUNK_BLOCKS);
        let ag_blocks = get_u32(b, O_AG_BLOCKS);
        if !ag_blocks.is_power_of_two() || ag_blocks < chunk_blocks {
            return Err(bad(
                "allocation-group size is not a power of two of whole chunks",
            ));
        }
        let chunk_bytes = (chunk_blocks as u64) * BLOCK_SIZE as u64;
        if !chunk_blocks.is_power_of_two()
            || !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
        {
            return Err(bad("chunk size out of range"));
        }
        let max_hosts = get_u32(b, O_MAX_HOSTS);
        if max_hosts == 0 || max_hosts > MAX_HOSTS {
            return Err(bad("host count out of range"));
        }
        let journal_blocks = get_u32(b, O_JOURNAL_BLOCKS);
        if journal_blocks < MIN_JOURNAL_BLOCKS {
            return Err(bad("journal too small"));
        }
        let pool_blocks = get_u64(b, O_POOL_BLOCKS);
        let max_pool_blocks = get_u64(b, O_MAX_POOL_BLOCKS);
        if pool_blocks == 0 || pool_blocks > max_pool_blocks || max_pool_blocks > MAX_BLOCKS {
            return Err(bad("pool size out of range"));
        }
        // Groups smaller than the default must not blow up the claim table.
        if ag_blocks < AG_BLOCKS && max_pool_blocks.div_ceil(ag_blocks as u64) > MAX_AGS {
            return Err(bad("too many allocation groups"));
        }
        let layout = Layout::compute_with_groups(
            pool_blocks,
            max_pool_blocks,
            chunk_blocks,
            ag_blocks,
            max_hosts,
            journal_blocks,
        );
        let stored = [
            (O_HOST_SLOT_START, layout.host_slot_start),
            (O_LOCK_START, layout.lock_start),
            (O_LOCK_BLOCKS, layout.lock_blocks),
            (O_AG_TABLE_START, layout.ag_table_start),
            (O_AG_TABLE_BLOCKS, layout.ag_table_blocks),
            (O_JOURNAL_START, layout.journal_start),
            (O_DATA_START, layout.data_start),
        ];
        if stored.iter().any(|&(off, v)| get_u64(b, off) != v) {
            return Err(bad("region layout does not match the pool geometry"));
        }
        if layout.data_start >= pool_blocks {
            return Err(bad("no data area"));
        }
        let catalog_root = get_u64(b, O_CATALOG_ROOT);
        if catalog_root != 0 && !layout.is_data_block(catalog_root) {
            return Err(bad("catalog pointer outside the data area"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[O_UUID..O_UUID + 16]);
        let mut data_warn_pct = [0u8; 3];
        data_warn_pct.copy_from_slice(&b[O_DATA_WARN..O_DATA_WARN + 3]);
        let mut meta_warn_pct = [0u8; 3];
        meta_warn_pct.copy_from_slice(&b[O_META_WARN..O_META_WARN + 3]);
        Ok(Superblock {
            generation: hdr.seq,
            layout,
            uuid,
            catalog_root,
            next_volume_id: get_u64(b, O_NEXT_VOLUME_ID),
            created_unix: get_u64(b, O_CREATED),
            commit_unix: get_u64(b, O_COMMITTED),
            policy: Policy {
                data_warn_pct,
                meta_warn_pct,
                when_full: b[O_WHEN_FULL],
                queue_timeout_ms: get_u32(b, O_QUEUE_TIMEOUT),
                max_overcommit_pct: get_u32(b, O_MAX_OVERCOMMIT),
            },
            shared: if incompat & INCOMPAT_SHARED != 0 {
                let io_timeout_ms = get_u32(b, O_IO_TIMEOUT);
                if io_timeout_ms == 0 {
                    return Err(bad("shared pool without an I/O timeout"));
                }
                Some(SharedParams { io_timeout_ms })
            } else {
                None
            },
            ditto_nodes: incompat & INCOMPAT_DITTO_NODES != 0,
        })
    }
}

/// True when the block starts with the superblock magic (used to tell
/// "not a pool" from "a damaged pool").
pub fn has_magic(b: &[u8]) -> bool {
    b.len() >= 8 && &b[0..8] == magic::SUPERBLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Superblock {
        Superblock {
            generation: 5,
            layout: Layout::compute(1 << 20, 1 << 24, 256, 8, 256),
            uuid: [7; 16],
            catalog_root: 0,
            next_volume_id: 1,
            created_unix: 1,
            commit_unix: 2,
            policy: Policy::default(),
            shared: None,
            ditto_nodes: true,
        }
    }

    #[test]
    fn roundtrip() {
        let sb = sample();
        let b = sb.encode(8);
        assert_eq!(Superblock::decode(&b, 8).unwrap(), sb);
        assert!(Superblock::decode(&b, 0).is_err());
    }

    #[test]
    fn shared_roundtrip() {
        let mut sb = sample();
        sb.shared = Some(SharedParams { io_timeout_ms: 250 });
        let b = sb.encode(0);
        assert_eq!(Superblock::decode(&b, 0).unwrap(), sb);
    }

    #[test]
    fn inconsistent_layout_is_rejected_even_with_valid_crc() {
        let sb = sample();
        let mut b = sb.encode(0);
        put_u64(&mut b, O_DATA_START, 17);
        let crc = codec::block_crc(&b);
        put_u32(&mut b, 12, crc);
        assert!(matches!(Superblock::decode(&b, 0), Err(Error::Corrupt(_))));
    }
}
