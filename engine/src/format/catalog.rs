//! The volume catalog (a chain of blocks of 256-byte volume records, written
//! copy-on-write under the global lock) and per-volume header blocks (the
//! volume's tree root, written only by the host that has the volume active).

use super::codec::{self, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, Header};
use super::node::NodeAddr;
use super::{magic, Layout, BLOCK_SIZE, MAX_BLOCKS, MAX_VOLUME_BYTES};
use crate::error::{Error, Result};

/// Bytes per volume record in a catalog block.
pub const RECORD_LEN: usize = 256;
const RECORDS_AT: usize = 64;
/// Volume records one catalog block holds (15).
pub const RECORDS_PER_BLOCK: usize = (BLOCK_SIZE - RECORDS_AT) / RECORD_LEN;
pub use super::names::MAX_NAME_LEN;

/// Bits of a volume record's `flags` (as a metadata dump's volumes carry
/// them; `thinlun::volume_flags` at the crate root).
pub mod flags {
    /// A read-only point-in-time image of `parent_id`.
    pub const SNAPSHOT: u32 = 1;
    /// A read-only base image (template) that clones may share.
    pub const BASE: u32 = 2;
    /// Writes are refused.
    pub const READ_ONLY: u32 = 4;
    /// Every flag this version knows; a record with others is corrupt.
    pub const KNOWN: u32 = SNAPSHOT | BASE | READ_ONLY;
}

/// One volume, snapshot or base as the catalog lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Pool-unique, never reused, never 0.
    pub id: u64,
    /// Bits of [`flags`].
    pub flags: u32,
    /// The volume's name (`vol` or `vol@snap`).
    pub name: String,
    /// Virtual size: a non-zero multiple of the block size.
    pub size_bytes: u64,
    /// The two copies of the volume's header block.
    pub header_blocks: [u64; 2],
    /// For a snapshot: the volume it was taken of (0 = none).
    pub parent_id: u64,
    /// For a clone: the snapshot or base it was cloned from (0 = none).
    pub origin_id: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Host holding the volume active for writing (0 = none).
    pub active_host: u16,
    /// That host's incarnation (slot generation) when it activated it.
    pub active_gen: u64,
}

impl VolumeRecord {
    fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.id);
        put_u32(b, 8, self.flags);
        put_u16(b, 12, self.name.len() as u16);
        put_u64(b, 16, self.size_bytes);
        put_u64(b, 24, self.header_blocks[0]);
        put_u64(b, 32, self.header_blocks[1]);
        put_u64(b, 40, self.parent_id);
        put_u64(b, 48, self.origin_id);
        put_u64(b, 56, self.created_unix);
        put_u16(b, 64, self.active_host);
        put_u64(b, 72, self.active_gen);
        b[96..96 + self.name.len()].copy_from_slice(self.name.as_bytes());
    }

    fn decode(b: &[u8], layout: &Layout, at_block: u64, i: usize) -> Result<VolumeRecord> {
        let bad =
            |what: &str| Error::Corrupt(format!("catalog block {at_block}, record {i}: {what}"));
        let id = get_u64(b, 0);
        let flags = get_u32(b, 8);
        let name_len = get_u16(b, 12) as usize;
        if id == 0 {
            return Err(bad("volume id 0"));
        }
        if flags & !flags::KNOWN != 0 {
            return Err(bad("unknown volume flags"));
        }
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(bad("name length out of range"));
        }
        let name = std::str::from_utf8(&b[96..96 + name_len])
            .ok()
            .filter(|n| super::names::is_valid_volume_name(n))
            .ok_or_else(|| bad("invalid volume name"))?
            .to_string();
        let size_bytes = get_u64(b, 16);
        if size_bytes == 0
            || size_bytes > MAX_VOLUME_BYTES
            || !size_bytes.is_multiple_of(BLOCK_SIZE as u64)
        {
            return Err(bad("volume size out of range"));
        }
        let header_blocks = [get_u64(b, 24), get_u64(b, 32)];
        if header_blocks.iter().any(|&h| !layout.is_data_block(h))
            || header_blocks[0] == header_blocks[1]
        {
            return Err(bad("volume header pointer outside the data area"));
        }
        Ok(VolumeRecord {
            id,
            flags,
            name,
            size_bytes,
            header_blocks,
            parent_id: get_u64(b, 40),
            origin_id: get_u64(b, 48),
            created_unix: get_u64(b, 56),
            active_host: get_u16(b, 64),
            active_gen: get_u64(b, 72),
        })
    }
}

/// One block of the catalog chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogBlock {
    /// At most [`RECORDS_PER_BLOCK`] records.
    pub records: Vec<VolumeRecord>,
    /// Next block of the chain (0 = last).
    pub next: u64,
}

/// A catalog block as written at `at_block`, for catalog `generation`.
pub fn encode_catalog(cb: &CatalogBlock, generation: u64, at_block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    put_u64(&mut b, 32, cb.next);
    for (i, r) in cb.records.iter().enumerate() {
        let off = RECORDS_AT + i * RECORD_LEN;
        r.encode(&mut b[off..off + RECORD_LEN]);
    }
    codec::seal(
        &mut b,
        &Header {
            magic: *magic::CATALOG,
            aux: cb.records.len() as u16,
            self_block: at_block,
            seq: generation,
        },
    );
    b
}

/// Decodes and checks the catalog block read from `at_block`.
pub fn decode_catalog(b: &[u8], layout: &Layout, at_block: u64) -> Result<CatalogBlock> {
    let hdr = codec::open(b, magic::CATALOG, at_block, "catalog block")?;
    let count = hdr.aux as usize;
    if count > RECORDS_PER_BLOCK {
        return Err(Error::Corrupt(format!(
            "catalog block {at_block}: {count} records, at most {RECORDS_PER_BLOCK} fit"
        )));
    }
    let next = get_u64(b, 32);
    if next != 0 && !layout.is_data_block(next) {
        return Err(Error::Corrupt(format!(
            "catalog block {at_block}: next pointer outside the data area"
        )));
    }
    let records = (0..count)
        .map(|i| {
            let off = RECORDS_AT + i * RECORD_LEN;
            VolumeRecord::decode(&b[off..off + RECORD_LEN], layout, at_block, i)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CatalogBlock { records, next })
}

/// A volume header: where the volume's mapping tree is, as of its last
/// checkpoint, and which journal entries that checkpoint already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeHeader {
    /// The volume it belongs to (checked against the catalog).
    pub volume_id: u64,
    /// Checkpoint generation of this volume; the newer valid copy wins.
    pub generation: u64,
    /// Root node (0 = empty mapping); its twin on a pool with ditto nodes.
    pub root: NodeAddr,
    /// Tree height: 0 for a single leaf.
    pub depth: u16,
    /// Blocks the tree maps.
    pub mapped_blocks: u64,
    /// Extents in the tree's leaves.
    pub extent_count: u64,
    /// Journal entries of `journal_host` with block sequence <= this are
    /// already part of the tree.
    pub journal_seq: u64,
    /// The host whose journal `journal_seq` counts in.
    pub journal_host: u32,
}

/// A volume header block as written at `at_block`.
pub fn encode_volume_header(h: &VolumeHeader, at_block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    put_u64(&mut b, 32, h.volume_id);
    put_u64(&mut b, 40, h.root.block);
    put_u64(&mut b, 48, h.mapped_blocks);
    put_u64(&mut b, 56, h.extent_count);
    put_u64(&mut b, 64, h.journal_seq);
    put_u32(&mut b, 72, h.journal_host);
    put_u64(&mut b, 76, h.root.twin);
    codec::seal(
        &mut b,
        &Header {
            magic: *magic::VOLUME_HEADER,
            aux: h.depth,
            self_block: at_block,
            seq: h.generation,
        },
    );
    b
}

/// Decodes and checks the volume header read from `at_block`.
pub fn decode_volume_header(b: &[u8], at_block: u64) -> Result<VolumeHeader> {
    let hdr = codec::open(b, magic::VOLUME_HEADER, at_block, "volume header")?;
    let root = NodeAddr {
        block: get_u64(b, 40),
        twin: get_u64(b, 76),
    };
    let twin_ok = root.twin == 0 || (root.block != 0 && root.twin != root.block);
    if root.block >= MAX_BLOCKS
        || root.twin >= MAX_BLOCKS
        || !twin_ok
        || hdr.aux > super::node::MAX_LEVEL
    {
        return Err(Error::Corrupt(format!(
            "volume header at block {at_block}: invalid root pointer or depth"
        )));
    }
    Ok(VolumeHeader {
        volume_id: get_u64(b, 32),
        generation: hdr.seq,
        root,
        depth: hdr.aux,
        mapped_blocks: get_u64(b, 48),
        extent_count: get_u64(b, 56),
        journal_seq: get_u64(b, 64),
        journal_host: get_u32(b, 72),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::compute(1 << 20, 1 << 22, 256, 4, 128)
    }

    #[test]
    fn catalog_roundtrip() {
        let l = layout();
        let rec = |id: u64, name: &str| VolumeRecord {
            id,
            flags: flags::SNAPSHOT,
            name: name.into(),
            size_bytes: 1 << 30,
            header_blocks: [l.data_start + 1, l.data_start + 2],
            parent_id: 1,
            origin_id: 0,
            created_unix: 99,
            active_host: 0,
            active_gen: 0,
        };
        let cb = CatalogBlock {
            records: (1..=RECORDS_PER_BLOCK as u64)
                .map(|i| rec(i, &format!("vm-{i}-disk-0")))
                .collect(),
            next: l.data_start + 9,
        };
        let b = encode_catalog(&cb, 3, l.data_start);
        assert_eq!(decode_catalog(&b, &l, l.data_start).unwrap(), cb);
    }

    #[test]
    fn volume_header_roundtrip() {
        let h = VolumeHeader {
            volume_id: 4,
            generation: 7,
            root: NodeAddr {
                block: 12345,
                twin: 67890,
            },
            depth: 2,
            mapped_blocks: 1000,
            extent_count: 10,
            journal_seq: 55,
            journal_host: 1,
        };
        assert_eq!(
            decode_volume_header(&encode_volume_header(&h, 9), 9).unwrap(),
            h
        );
    }
}
