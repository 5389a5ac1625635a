//! What a dump holds: the pool's metadata by meaning, plus where it was
//! stored (`on_disk`), and the checks a dump must pass before `restore`
//! writes any of it.

use crate::format::catalog::flags;
use crate::format::node::{Extent, MAX_EXTENT_BLOCKS};
use crate::format::superblock::{Policy, SharedParams, Superblock};
use crate::format::{Layout, BLOCK_SIZE, MAX_BLOCKS, MAX_VOLUME_BYTES, SUPERBLOCK_A};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// First line of every dump (`"format"`), and its version.
pub const DUMP_FORMAT: &str = "thinlun-metadata-dump";
/// The dump format's version; a reader refuses any other.
pub const DUMP_VERSION: u64 = 1;

/// A pool's metadata as `dump` writes it and `restore` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataDump {
    /// The pool-wide settings and superblock fields.
    pub pool: PoolDump,
    /// In id order.
    pub volumes: Vec<VolumeDump>,
}

/// The pool's geometry and settings, as its superblock holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolDump {
    /// The pool's identity; a restore keeps it.
    pub uuid: [u8; 16],
    /// Blocks the pool spans now.
    pub pool_blocks: u64,
    /// Blocks the pool may grow to.
    pub max_pool_blocks: u64,
    /// Blocks per allocation chunk.
    pub chunk_blocks: u32,
    /// Allocation-group size.
    pub ag_blocks: u32,
    /// Host slots (1 for a single-host pool).
    pub max_hosts: u32,
    /// Blocks of each host's journal region, host checkpoints included.
    pub journal_blocks: u32,
    /// Lease I/O timeout of a shared pool; 0 for a single-host pool.
    pub io_timeout_ms: u32,
    /// The id the next volume created gets.
    pub next_volume_id: u64,
    /// When the pool was created (Unix seconds).
    pub created_unix: u64,
    /// Space thresholds and the full-pool policy.
    pub policy: Policy,
    /// Where the dumped superblock was.
    pub on_disk: PoolOnDisk,
}

/// Where and when the dumped superblock was written; `restore` writes new
/// values. Its text is its fields, so it derives serde (`json.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(expecting = "an object")]
pub struct PoolOnDisk {
    /// Superblock generation.
    pub generation: u64,
    /// First block of the catalog chain.
    pub catalog_root: u64,
    /// When the superblock was last written (Unix seconds).
    pub commit_unix: u64,
    /// Journal blocks replayed into the dumped mappings.
    pub journal_blocks_replayed: u64,
}

/// One catalog entry (a volume, snapshot, base image or clone) and its mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeDump {
    /// The catalog id, unique in the pool.
    pub id: u64,
    /// The catalog name (for a snapshot, the part after `@`).
    pub name: String,
    /// Catalog flags (snapshot, base, ...; FORMAT.md 4.5).
    pub flags: u32,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// For a snapshot: the volume it belongs to (0 otherwise).
    pub parent_id: u64,
    /// For a clone: the base image or snapshot it was made from (0 otherwise).
    pub origin_id: u64,
    /// When it was created (Unix seconds).
    pub created_unix: u64,
    /// The host that holds it active on a shared pool (0: none).
    pub active_host: u16,
    /// In virtual order, as the mapping tree holds them.
    pub extents: Vec<Extent>,
    /// Where its header pair and tree were.
    pub on_disk: VolumeOnDisk,
}

/// Where the dumped volume's header pair and tree were. Its text is its
/// fields, so it derives serde (`json.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(expecting = "an object")]
pub struct VolumeOnDisk {
    /// The two copies of the volume header.
    #[serde(deserialize_with = "super::json::exactly")]
    pub header_blocks: [u64; 2],
    /// Volume header generation.
    pub generation: u64,
    /// The tree's root node (0: an empty tree).
    pub root: u64,
    /// The root's second copy (0: single-copy nodes; absent in dumps made
    /// before ditto nodes).
    #[serde(default)]
    pub root_twin: u64,
    /// Tree depth (0: the root is a leaf).
    pub depth: u16,
    /// The journal sequence the tree holds everything up to.
    pub journal_seq: u64,
    /// The host whose journal `journal_seq` counts.
    pub journal_host: u32,
}

impl MetadataDump {
    /// The pool's on-disk layout, computed from the dumped geometry.
    pub fn layout(&self) -> Layout {
        self.pool.layout()
    }

    /// The dump without its `on_disk` parts: what a restore must keep.
    pub fn meaning(&self) -> MetadataDump {
        let mut d = self.clone();
        d.pool.on_disk = PoolOnDisk::default();
        for v in &mut d.volumes {
            v.on_disk = VolumeOnDisk::default();
        }
        d
    }

    /// The name users address a volume by (`vol@snap` for a snapshot).
    pub(super) fn full_name(&self, v: &VolumeDump) -> String {
        if v.flags & flags::SNAPSHOT != 0 {
            let parent = self
                .volumes
                .iter()
                .find(|p| p.id == v.parent_id)
                .map_or("?", |p| p.name.as_str());
            format!("{parent}@{}", v.name)
        } else {
            v.name.clone()
        }
    }

    /// Everything the loader would refuse, refused before anything is written.
    pub(super) fn validate(&self) -> Result<(), String> {
        let layout = self.layout();
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        let mut prev_id = 0;
        for v in &self.volumes {
            let ctx = format!("volume {} ('{}')", v.id, v.name);
            if v.id == 0 || v.id >= self.pool.next_volume_id {
                return Err(format!(
                    "{ctx}: id must be 1..next_volume_id ({})",
                    self.pool.next_volume_id
                ));
            }
            if v.id <= prev_id {
                return Err(format!(
                    "{ctx}: volumes must be listed in ascending id order"
                ));
            }
            prev_id = v.id;
            ids.insert(v.id);
            if !crate::format::names::is_valid_volume_name(&v.name) {
                return Err(format!("{ctx}: invalid name"));
            }
            if v.flags & !flags::KNOWN != 0 {
                return Err(format!("{ctx}: unknown flags"));
            }
            let scope = if v.flags & flags::SNAPSHOT != 0 {
                v.parent_id
            } else {
                0
            };
            if !names.insert((scope, v.name.clone())) {
                return Err(format!("{ctx}: name used twice"));
            }
            if v.size_bytes == 0
                || v.size_bytes > MAX_VOLUME_BYTES
                || !v.size_bytes.is_multiple_of(BLOCK_SIZE as u64)
            {
                return Err(format!("{ctx}: size out of range"));
            }
            if v.flags & flags::SNAPSHOT != 0 && v.parent_id == 0 {
                return Err(format!("{ctx}: a snapshot needs a parent_id"));
            }
            validate_extents(v, &ctx, &layout)?;
        }
        for v in &self.volumes {
            for (what, id) in [("parent_id", v.parent_id), ("origin_id", v.origin_id)] {
                if id != 0 && !ids.contains(&id) {
                    return Err(format!(
                        "volume {} ('{}'): {what} {id} is not in the dump",
                        v.id, v.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A volume's extents: each 1..=MAX_EXTENT_BLOCKS long, in order without
/// overlap, inside the volume, and (unless a zero extent) in the data area.
fn validate_extents(v: &VolumeDump, ctx: &str, layout: &Layout) -> Result<(), String> {
    let end = v.size_bytes / BLOCK_SIZE as u64;
    let mut prev_end = 0;
    for (k, e) in v.extents.iter().enumerate() {
        let ectx = format!("{ctx}, extent {k} [{}, {}, {}]", e.vblock, e.pblock, e.len);
        if e.len == 0 || e.len as u64 > MAX_EXTENT_BLOCKS {
            return Err(format!("{ectx}: length must be 1..={MAX_EXTENT_BLOCKS}"));
        }
        if k > 0 && e.vblock < prev_end {
            return Err(format!("{ectx}: overlaps or is out of order"));
        }
        if e.vblock > end || e.len as u64 > end - e.vblock {
            return Err(format!("{ectx}: lies past the end of the volume"));
        }
        prev_end = e.vend();
        let in_data =
            layout.is_data_block(e.pblock) && layout.is_data_block(e.pblock + e.len as u64 - 1);
        if !e.is_zero() && !in_data {
            return Err(format!("{ectx}: outside the pool's data area"));
        }
    }
    Ok(())
}

impl PoolDump {
    pub(super) fn layout(&self) -> Layout {
        Layout::compute_with_groups(
            self.pool_blocks,
            self.max_pool_blocks,
            self.chunk_blocks,
            self.ag_blocks,
            self.max_hosts,
            self.journal_blocks,
        )
    }

    /// The layout, if the geometry is one a superblock can hold.
    pub(super) fn checked_layout(&self) -> Result<Layout, String> {
        if self.max_pool_blocks > MAX_BLOCKS {
            return Err("pool: max_pool_blocks out of range".into());
        }
        let probe = Superblock {
            generation: 1,
            layout: self.layout(),
            uuid: self.uuid,
            catalog_root: 0,
            next_volume_id: self.next_volume_id,
            created_unix: 0,
            commit_unix: 0,
            policy: self.policy,
            // As restore writes it.
            ditto_nodes: super::restore::DITTO,
            shared: (self.io_timeout_ms != 0).then_some(SharedParams {
                io_timeout_ms: self.io_timeout_ms,
            }),
        };
        Superblock::decode(&probe.encode(SUPERBLOCK_A), SUPERBLOCK_A)
            .map_err(|e| format!("pool geometry is not valid: {e}"))?;
        Ok(probe.layout)
    }
}

/// Blocks of data the extents map (zero extents apart).
pub(super) fn mapped_blocks(extents: &[Extent]) -> u64 {
    extents
        .iter()
        .filter(|e| !e.is_zero())
        .map(|e| e.len as u64)
        .sum()
}
