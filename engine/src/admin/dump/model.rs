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
pub const DUMP_VERSION: u64 = 1;

/// A pool's metadata as `dump` writes it and `restore` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataDump {
    pub pool: PoolDump,
    /// In id order.
    pub volumes: Vec<VolumeDump>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolDump {
    pub uuid: [u8; 16],
    pub pool_blocks: u64,
    pub max_pool_blocks: u64,
    pub chunk_blocks: u32,
    /// Allocation-group size.
    pub ag_blocks: u32,
    pub max_hosts: u32,
    pub journal_blocks: u32,
    /// Lease I/O timeout of a shared pool; 0 for a single-host pool.
    pub io_timeout_ms: u32,
    pub next_volume_id: u64,
    pub created_unix: u64,
    pub policy: Policy,
    pub on_disk: PoolOnDisk,
}

/// Where and when the dumped superblock was written; `restore` writes new
/// values. Its text is its fields, so it derives serde (`json.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(expecting = "an object")]
pub struct PoolOnDisk {
    pub generation: u64,
    pub catalog_root: u64,
    pub commit_unix: u64,
    /// Journal blocks replayed into the dumped mappings.
    pub journal_blocks_replayed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeDump {
    pub id: u64,
    /// The catalog name (for a snapshot, the part after `@`).
    pub name: String,
    pub flags: u32,
    pub size_bytes: u64,
    pub parent_id: u64,
    pub origin_id: u64,
    pub created_unix: u64,
    pub active_host: u16,
    /// In virtual order, as the mapping tree holds them.
    pub extents: Vec<Extent>,
    pub on_disk: VolumeOnDisk,
}

/// Where the dumped volume's header pair and tree were. Its text is its
/// fields, so it derives serde (`json.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(expecting = "an object")]
pub struct VolumeOnDisk {
    #[serde(deserialize_with = "super::json::exactly")]
    pub header_blocks: [u64; 2],
    pub generation: u64,
    pub root: u64,
    /// The root's second copy (0: single-copy nodes; absent in dumps made
    /// before ditto nodes).
    #[serde(default)]
    pub root_twin: u64,
    pub depth: u16,
    pub journal_seq: u64,
    pub journal_host: u32,
}

impl MetadataDump {
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
