//! `dump` and `restore` of a pool's metadata in a readable text form (JSON,
//! described in docs/FORMAT.md section 9), as `thin_dump` / `thin_restore`
//! do for dm-thin: for support, for inspecting a pool by eye, and as a way
//! back when metadata is lost while the data area is intact.
//!
//! A dump holds what the metadata means (pool geometry and policy, every
//! volume with its relations and its mapping after journal replay), plus,
//! under `on_disk`, where it happened to be stored. `restore` writes the
//! meaning back to fresh blocks, so after a restore only the `on_disk`
//! parts differ.
//!
//! The files: `model.rs`, the dump's types and the checks a dump must pass;
//! `json.rs`, its text form; `restore.rs`, writing a dump onto a device;
//! and here [`dump`], reading a pool into the model.

mod json;
mod model;
mod restore;

pub use model::{
    MetadataDump, PoolDump, PoolOnDisk, VolumeDump, VolumeOnDisk, DUMP_FORMAT, DUMP_VERSION,
};
pub use restore::{restore, RestoreOptions, RestoreReport};

use crate::dev::BlockDevice;
use crate::error::Result;
use crate::format::SINGLE_HOST_ID;
use crate::load::load;

/// Reads the pool's metadata (replaying the journal in memory, writing
/// nothing). Fails if the pool does not load: `check` says why.
pub fn dump(dev: &dyn BlockDevice, label: &str) -> Result<MetadataDump> {
    let l = load(dev, label, SINGLE_HOST_ID, crate::util::boot_id())?;
    // A dump lists extents; one of a damaged tree would omit what the
    // unreadable node mapped, and a restore of it would read zeros there.
    if let Some(v) = l.state.volumes.values().find(|v| !v.damage.is_empty()) {
        return Err(crate::map::state::damaged_error(&l.state, v, "dump"));
    }
    let sb = &l.state.sb;
    let layout = sb.layout;
    let volumes = l
        .state
        .volumes
        .values()
        .map(|v| {
            let mut extents = Vec::with_capacity(v.map.extent_count() as usize);
            v.map.for_each(|e| extents.push(*e));
            VolumeDump {
                id: v.rec.id,
                name: v.rec.name.clone(),
                flags: v.rec.flags,
                size_bytes: v.rec.size_bytes,
                parent_id: v.rec.parent_id,
                origin_id: v.rec.origin_id,
                created_unix: v.rec.created_unix,
                active_host: v.rec.active_host,
                extents,
                on_disk: VolumeOnDisk {
                    header_blocks: v.rec.header_blocks,
                    generation: v.header.generation,
                    root: v.header.root.block,
                    root_twin: v.header.root.twin,
                    depth: v.header.depth,
                    journal_seq: v.header.journal_seq,
                    journal_host: v.header.journal_host,
                },
            }
        })
        .collect();
    Ok(MetadataDump {
        pool: PoolDump {
            uuid: sb.uuid,
            pool_blocks: layout.pool_blocks,
            max_pool_blocks: layout.max_pool_blocks,
            chunk_blocks: layout.chunk_blocks,
            ag_blocks: layout.ag_blocks,
            max_hosts: layout.max_hosts,
            journal_blocks: layout.journal_blocks,
            io_timeout_ms: sb.shared.map_or(0, |s| s.io_timeout_ms),
            next_volume_id: sb.next_volume_id,
            created_unix: sb.created_unix,
            policy: sb.policy,
            on_disk: PoolOnDisk {
                generation: sb.generation,
                catalog_root: sb.catalog_root,
                commit_unix: sb.commit_unix,
                journal_blocks_replayed: l.replayed_blocks,
            },
        },
        volumes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::check::check;
    use crate::dev::MemDevice;
    use crate::format::node::NODE_CAPACITY;
    use crate::format::{magic, Layout, BLOCK_SIZE};
    use crate::{Pool, PoolConfig};
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    fn sample() -> (Arc<MemDevice>, Vec<(String, Vec<u8>)>) {
        let mem = Arc::new(MemDevice::new(64 * MIB));
        let pool = Pool::create(mem.clone(), "t", &PoolConfig::default()).unwrap();
        pool.create_volume("vm-1", 8 * MIB).unwrap();
        let v = pool.open_volume("vm-1").unwrap();
        // Many small extents so the tree has several leaves and a root.
        for i in 0..600u64 {
            v.write(i * 16, &[(i % 251) as u8 + 1; 4096]).unwrap();
        }
        v.flush().unwrap();
        drop(v);
        pool.create_snapshot("vm-1@s1").unwrap();
        let v = pool.open_volume("vm-1").unwrap();
        v.write(0, &[0xee; 8192]).unwrap();
        v.flush().unwrap();
        drop(v);
        pool.clone_volume("vm-1@s1", "clone-1").unwrap();
        let c = pool.open_volume("clone-1").unwrap();
        c.write(8 * 16, &[0x77; 4096]).unwrap();
        c.flush().unwrap();
        drop(c);
        pool.create_volume("empty", 4 * MIB).unwrap();
        let names: Vec<String> = pool.volumes().into_iter().map(|i| i.name).collect();
        let mut contents = Vec::new();
        for n in names {
            let v = pool.open_volume(&n).unwrap();
            let mut buf = vec![0u8; v.size_bytes() as usize];
            v.read(0, &mut buf).unwrap();
            contents.push((n, buf));
        }
        pool.close().unwrap();
        (mem, contents)
    }

    /// Zeroes every metadata record: the header zone, host and journal
    /// regions, and every catalog, header and node block in the data area.
    fn wipe_metadata(mem: &MemDevice, layout: &Layout) -> Vec<u8> {
        let mut img = mem.image();
        let bs = BLOCK_SIZE;
        img[..layout.data_start as usize * bs].fill(0);
        for blk in img.chunks_mut(bs) {
            let m = &blk[0..8];
            if m == magic::NODE || m == magic::CATALOG || m == magic::VOLUME_HEADER {
                blk.fill(0);
            }
        }
        img
    }

    fn read_all(dev: Arc<MemDevice>) -> Vec<(String, Vec<u8>)> {
        let pool = Pool::open(dev, "t", &Default::default()).unwrap();
        let mut out = Vec::new();
        for i in pool.volumes() {
            let v = pool.open_volume(&i.name).unwrap();
            let mut buf = vec![0u8; v.size_bytes() as usize];
            v.read(0, &mut buf).unwrap();
            out.push((i.name, buf));
        }
        pool.close().unwrap();
        out
    }

    #[test]
    fn text_round_trip_and_restore_onto_wiped_metadata() {
        let (mem, contents) = sample();
        let d = dump(mem.as_ref(), "t").unwrap();
        assert_eq!(d.volumes.len(), 4, "vm-1, vm-1@s1, clone-1, empty");
        assert!(d.volumes.iter().any(|v| v.extents.len() > NODE_CAPACITY));
        let text = d.to_json();
        assert_eq!(MetadataDump::from_json(&text).unwrap(), d);

        let wiped = Arc::new(MemDevice::from_image(wipe_metadata(&mem, &d.layout())));
        assert!(Pool::open(wiped.clone(), "t", &Default::default()).is_err());
        let r = restore(wiped.clone(), "t", &d, &RestoreOptions::default()).unwrap();
        assert_eq!((r.volumes, r.snapshots), (3, 1));
        assert!(r.blocks_written > 0);
        let c = check(wiped.as_ref(), "t").unwrap();
        assert!(c.errors.is_empty() && c.warnings.is_empty(), "{c:?}");
        assert_eq!(read_all(wiped.clone()), contents);
        // dump -> restore -> dump: the same but for the on_disk parts.
        let again = dump(wiped.as_ref(), "t").unwrap();
        assert_eq!(again.meaning(), d.meaning());
        assert_ne!(again.pool.on_disk, d.pool.on_disk);
    }

    #[test]
    fn restore_refuses_working_pool_other_geometry_and_bad_dumps() {
        let (mem, _) = sample();
        let d = dump(mem.as_ref(), "t").unwrap();
        let before = mem.image();
        // A pool that opens needs --force.
        let e = restore(mem.clone(), "t", &d, &RestoreOptions::default()).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(mem.image() == before);
        // Another geometry is refused even with force.
        let other = Arc::new(MemDevice::new(64 * MIB));
        let cfg = PoolConfig {
            chunk_bytes: 256 << 10,
            ..PoolConfig::default()
        };
        Pool::create(other.clone(), "o", &cfg)
            .unwrap()
            .close()
            .unwrap();
        let other_before = other.image();
        let opts = RestoreOptions {
            force: true,
            dry_run: false,
        };
        let e = restore(other.clone(), "o", &d, &opts).unwrap_err();
        assert!(e.to_string().contains("geometry"), "{e}");
        assert!(other.image() == other_before);
        // With force onto the same pool: works, data unchanged.
        let contents = read_all(Arc::new(MemDevice::from_image(before.clone())));
        restore(mem.clone(), "t", &d, &opts).unwrap();
        assert_eq!(read_all(mem.clone()), contents);

        // Dumps that contradict themselves are refused when parsed.
        let text = d.to_json();
        let pblock = d.volumes[0].extents[0].pblock;
        for (from, to) in [
            ("\"format\": \"thinlun-metadata-dump\"", "\"format\": \"x\""),
            ("\"chunk_blocks\": 256", "\"chunk_blocks\": 100"),
            ("\"name\": \"vm-1\"", "\"name\": \"-bad\""),
            (
                &format!("[0, {pblock}, "),
                &format!("[0, {}, ", d.layout().data_end()),
            ),
            ("\"extent_count\": ", "\"extent_count\": 9"),
        ] {
            let edited = text.replacen(from, to, 1);
            assert_ne!(edited, text, "{from}");
            assert!(MetadataDump::from_json(&edited).is_err(), "{from} -> {to}");
        }
        // Truncated dumps never panic.
        for cut in (0..text.len()).step_by(997) {
            assert!(MetadataDump::from_json(&text[..cut]).is_err());
        }
    }
}
