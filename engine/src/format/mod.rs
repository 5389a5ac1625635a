//! The on-disk format (version 1, and version 2 with ditto nodes):
//! fixed-layout little-endian records, each with a magic, a version, a
//! CRC32 and its own block address. The authoritative
//! description is docs/FORMAT.md; this module is its executable form.
//!
//! Everything here is pure encoding and decoding of 4 KiB blocks, so the
//! decoders can be fuzzed and a corrupt block always becomes an [`Error`].
//!
//! [`Error`]: crate::Error

pub mod catalog;
pub mod claims;
pub mod codec;
pub mod journal;
pub mod lease;
pub(crate) mod names;
pub mod node;
pub mod superblock;
pub mod unflushed;

// The block and sector sizes belong to the I/O layer below; the format is
// written in them.
pub use crate::dev::{BLOCK_SHIFT, BLOCK_SIZE, SECTORS_PER_BLOCK, SECTOR_SIZE};

/// The host id a single-host pool uses.
pub const SINGLE_HOST_ID: u32 = 1;

/// A pool uuid as text: `8-4-4-4-12` lowercase hex digits.
pub(crate) fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Block addresses (physical and virtual) are 48-bit: 1 EiB of 4 KiB blocks.
pub const MAX_BLOCKS: u64 = 1 << 48;
/// Largest volume (virtual size) the format can describe.
pub const MAX_VOLUME_BYTES: u64 = MAX_BLOCKS << BLOCK_SHIFT;

/// Superblock copy locations: block 0 and block 8 (kept apart so one bad
/// sector or one torn write cannot take both).
pub const SUPERBLOCK_A: u64 = 0;
/// The second superblock copy (see [`SUPERBLOCK_A`]).
pub const SUPERBLOCK_B: u64 = 8;
/// First block after the fixed header zone.
pub const HEADER_ZONE_BLOCKS: u64 = 16;

/// Hosts a pool can hold at most (slot ids 1..=MAX_HOSTS).
pub const MAX_HOSTS: u32 = 100;
/// Default allocation-group size: 1 GiB of 4 KiB blocks.
pub const AG_BLOCKS: u32 = 262_144;
/// Most allocation groups a pool with groups smaller than the default may
/// have (bounds the claim table).
pub const MAX_AGS: u64 = 1 << 20;
/// Bytes per allocation-group claim record.
pub const AG_CLAIM_LEN: usize = 16;

/// Smallest chunk (the unit of first allocation) a pool may have.
pub const MIN_CHUNK_BYTES: u64 = 64 << 10;
/// Largest chunk a pool may have.
pub const MAX_CHUNK_BYTES: u64 = 1 << 30;
/// The chunk size of a new pool unless configured.
pub const DEFAULT_CHUNK_BYTES: u64 = 1 << 20;

/// Blocks at the start of each host's journal region that hold its two
/// checkpoint records; the rest is the circular journal.
pub const HOST_CHECKPOINT_BLOCKS: u32 = 2;
/// Smallest journal region per host (checkpoints included).
pub const MIN_JOURNAL_BLOCKS: u32 = 64;

/// Magic numbers of every record type.
pub mod magic {
    /// Superblock (both copies); also what tells a pool from other data.
    pub const SUPERBLOCK: &[u8; 8] = b"THINLUN\x01";
    /// Mapping-tree node (leaf or interior).
    pub const NODE: &[u8; 8] = b"TLNODE\0\0";
    /// Catalog block (the list of volumes).
    pub const CATALOG: &[u8; 8] = b"TLCATLG\0";
    /// Volume header: one volume's tree root and counters.
    pub const VOLUME_HEADER: &[u8; 8] = b"TLVOLHD\0";
    /// Journal block of a host's ring.
    pub const JOURNAL: &[u8; 8] = b"TLJRNL\0\0";
    /// Host checkpoint record (the first two blocks of a host region).
    pub const HOST_CHECKPOINT: &[u8; 8] = b"TLHOSTCK";
    /// Block of the allocation-group claim table.
    pub const AG_TABLE: &[u8; 8] = b"TLAGTAB\0";
    /// Host slot (delta lease).
    pub const HOST_SLOT: &[u8; 8] = b"TLHOSTSL";
    /// Register of the global lock.
    pub const LOCK_REGISTER: &[u8; 8] = b"TLLOCKRG";
    /// Record of the unflushed-writes area in surviving memory.
    pub const UNFLUSHED: &[u8; 8] = b"TLUNFLSH";
}

/// Where each region of a pool lies, in blocks from the start of the LUN.
/// Derived from a few superblock fields; see docs/FORMAT.md, "Layout".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The LUN's size as the pool uses it.
    pub pool_blocks: u64,
    /// Growth limit: the metadata regions are sized for it.
    pub max_pool_blocks: u64,
    /// Chunk size (the unit of first allocation).
    pub chunk_blocks: u32,
    /// Allocation-group size: a power of two, a multiple of the chunk.
    pub ag_blocks: u32,
    /// Host ids the pool has room for (1..=max_hosts).
    pub max_hosts: u32,
    /// Per host, including its checkpoint records.
    pub journal_blocks: u32,
    /// First host slot (host 1's).
    pub host_slot_start: u64,
    /// First block of the global lock area.
    pub lock_start: u64,
    /// Blocks of the global lock area (`max_hosts + 1`).
    pub lock_blocks: u64,
    /// First block of the allocation-group claim table.
    pub ag_table_start: u64,
    /// Blocks of the claim table, sized for `max_pool_blocks`.
    pub ag_table_blocks: u64,
    /// First block of host 1's journal region.
    pub journal_start: u64,
    /// First data block: chunk-aligned, after every journal region.
    pub data_start: u64,
}

impl Layout {
    /// Computes the layout of a new pool with the default group size.
    pub fn compute(
        pool_blocks: u64,
        max_pool_blocks: u64,
        chunk_blocks: u32,
        max_hosts: u32,
        journal_blocks: u32,
    ) -> Layout {
        let ag_blocks = AG_BLOCKS.max(chunk_blocks);
        Layout::compute_with_groups(
            pool_blocks,
            max_pool_blocks,
            chunk_blocks,
            ag_blocks,
            max_hosts,
            journal_blocks,
        )
    }

    /// Computes the layout of a new pool.
    pub fn compute_with_groups(
        pool_blocks: u64,
        max_pool_blocks: u64,
        chunk_blocks: u32,
        ag_blocks: u32,
        max_hosts: u32,
        journal_blocks: u32,
    ) -> Layout {
        let host_slot_start = HEADER_ZONE_BLOCKS;
        let lock_start = host_slot_start + max_hosts as u64;
        let lock_blocks = max_hosts as u64 + 1;
        let ag_table_start = lock_start + lock_blocks;
        let max_ags = max_pool_blocks.div_ceil(ag_blocks as u64);
        let claims_per_block = (BLOCK_SIZE - codec::HEADER_LEN) / AG_CLAIM_LEN;
        let ag_table_blocks = max_ags.div_ceil(claims_per_block as u64);
        let journal_start = ag_table_start + ag_table_blocks;
        let journals_end = journal_start + max_hosts as u64 * journal_blocks as u64;
        let data_start = journals_end.div_ceil(chunk_blocks as u64) * chunk_blocks as u64;
        Layout {
            pool_blocks,
            max_pool_blocks,
            chunk_blocks,
            ag_blocks,
            max_hosts,
            journal_blocks,
            host_slot_start,
            lock_start,
            lock_blocks,
            ag_table_start,
            ag_table_blocks,
            journal_start,
            data_start,
        }
    }

    /// First block of host `host_id`'s journal region (its checkpoint records).
    pub fn host_region(&self, host_id: u32) -> u64 {
        self.journal_start + (host_id as u64 - 1) * self.journal_blocks as u64
    }

    /// Number of whole chunks in the data area.
    pub fn data_chunks(&self) -> u64 {
        self.pool_blocks.saturating_sub(self.data_start) / self.chunk_blocks as u64
    }

    /// One past the last usable data block (whole chunks only).
    pub fn data_end(&self) -> u64 {
        self.data_start + self.data_chunks() * self.chunk_blocks as u64
    }

    /// Whether block `b` lies in the data area (`data_start..data_end`).
    pub fn is_data_block(&self, b: u64) -> bool {
        b >= self.data_start && b < self.data_end()
    }

    /// Allocation groups covering the data area (the last may be partial).
    pub fn groups(&self) -> u64 {
        (self.data_end() - self.data_start).div_ceil(self.ag_blocks as u64)
    }

    /// The allocation group a data block belongs to.
    pub fn group_of(&self, b: u64) -> u64 {
        (b - self.data_start) / self.ag_blocks as u64
    }

    /// Host `h`'s slot.
    pub fn host_slot(&self, h: u32) -> u64 {
        self.host_slot_start + (h as u64 - 1)
    }

    /// Host `h`'s lock register.
    pub fn lock_register(&self, h: u32) -> u64 {
        self.lock_start + (h as u64 - 1)
    }
}
