//! Snapshots, rollback, base images, linked clones, flatten, usage and diff.

mod common;
use common::new_pool;
use std::sync::Arc;
use thinlun::check::check;
use thinlun::dev::MemDevice;
use thinlun::{Error, OpenOptions, Pool};

const MIB: u64 = 1 << 20;
const BS: usize = 4096;

fn block(tag: u8) -> Vec<u8> {
    vec![tag; BS]
}

fn read_block(pool: &Pool, vol: &str, b: u64) -> u8 {
    let v = pool.open_volume(vol).unwrap();
    let mut buf = vec![0u8; BS];
    v.read(b * 8, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&x| x == buf[0]),
        "block {b} of {vol} is torn"
    );
    buf[0]
}

fn clean(dev: &MemDevice, pool: &Pool) {
    assert!(pool.verify_space().is_empty(), "{:?}", pool.verify_space());
    let _ = dev;
}

fn reopened(dev: &Arc<MemDevice>) -> Pool {
    let report = check(dev.as_ref(), "mem").unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    Pool::open(
        Arc::new(MemDevice::from_image(dev.image())),
        "mem",
        &OpenOptions::default(),
    )
    .unwrap()
}

#[test]
fn snapshot_keeps_its_content_while_the_volume_changes() {
    let (dev, pool) = new_pool(64 * MIB, 1);
    pool.create_volume("vm-1-disk-0", 4 * MIB).unwrap();
    let v = pool.open_volume("vm-1-disk-0").unwrap();
    for b in 0..64 {
        v.write(b * 8, &block(1)).unwrap();
    }
    let info = pool.create_snapshot("vm-1-disk-0@s1").unwrap();
    assert_eq!(info.name, "vm-1-disk-0@s1");
    assert!(info.snapshot && info.read_only);
    assert_eq!(info.snapshot_of.as_deref(), Some("vm-1-disk-0"));
    for b in 0..32 {
        v.write(b * 8, &block(2)).unwrap();
    }
    v.write(100 * 8, &block(3)).unwrap();
    pool.create_snapshot("vm-1-disk-0@s2").unwrap();
    v.discard(0, 16 * 8).unwrap();
    v.flush().unwrap();
    assert!(matches!(
        pool.create_snapshot("vm-1-disk-0@s1"),
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(
        pool.create_snapshot("vm-1-disk-0@bad/x"),
        Err(Error::InvalidName(_))
    ));
    assert!(matches!(
        pool.create_snapshot("nosuch@s"),
        Err(Error::NoSuchVolume(_))
    ));
    let s1 = pool.open_volume("vm-1-disk-0@s1").unwrap();
    assert!(matches!(s1.write(0, &block(9)), Err(Error::ReadOnly(_))));
    drop(s1);
    drop(v);
    let check_all = |pool: &Pool| {
        assert_eq!(read_block(pool, "vm-1-disk-0@s1", 5), 1);
        assert_eq!(read_block(pool, "vm-1-disk-0@s1", 40), 1);
        assert_eq!(read_block(pool, "vm-1-disk-0@s1", 100), 0);
        assert_eq!(read_block(pool, "vm-1-disk-0@s2", 5), 2);
        assert_eq!(read_block(pool, "vm-1-disk-0@s2", 40), 1);
        assert_eq!(read_block(pool, "vm-1-disk-0@s2", 100), 3);
        assert_eq!(read_block(pool, "vm-1-disk-0", 5), 0);
        assert_eq!(read_block(pool, "vm-1-disk-0", 20), 2);
        assert_eq!(read_block(pool, "vm-1-disk-0", 40), 1);
    };
    check_all(&pool);
    clean(&dev, &pool);
    // Before and after a checkpoint, and after reopening from disk.
    let p2 = reopened(&dev);
    check_all(&p2);
    assert!(p2.verify_space().is_empty(), "{:?}", p2.verify_space());
    drop(p2);
    pool.close().unwrap();
    let p3 = reopened(&dev);
    check_all(&p3);
    assert!(p3.verify_space().is_empty(), "{:?}", p3.verify_space());
}

#[test]
fn copy_on_write_writes_one_block_not_a_chunk() {
    let (dev, pool) = new_pool(64 * MIB, 1);
    pool.create_volume("v", 8 * MIB).unwrap();
    let v = pool.open_volume("v").unwrap();
    v.write(0, &vec![7u8; 4 * MIB as usize]).unwrap();
    v.flush().unwrap();
    pool.create_snapshot("v@base").unwrap();
    pool.checkpoint().unwrap();
    dev.start_trace();
    let n = 256u64;
    for i in 0..n {
        // Scattered 4 KiB writes into data shared with the snapshot.
        v.write((i * 3 % 1024) * 8, &block(8)).unwrap();
    }
    v.flush().unwrap();
    let bytes = dev.bytes_written();
    let per_write = bytes / n;
    eprintln!("{n} copy-on-write 4 KiB writes: {bytes} bytes to the LUN, {per_write} per write");
    assert!(
        per_write <= 8192,
        "{per_write} bytes per 4 KiB copy-on-write"
    );
    assert_eq!(read_block(&pool, "v@base", 3), 7);
    assert_eq!(read_block(&pool, "v", 3), 8);
}

#[test]
fn removing_snapshots_returns_only_their_own_space() {
    let (dev, pool) = new_pool(64 * MIB, 1);
    pool.create_volume("v", 4 * MIB).unwrap();
    let v = pool.open_volume("v").unwrap();
    v.write(0, &vec![1u8; 2 * MIB as usize]).unwrap();
    pool.create_snapshot("v@a").unwrap();
    v.write(0, &vec![2u8; MIB as usize]).unwrap();
    v.flush().unwrap();
    let u = pool.usage();
    let get = |name: &str| u.iter().find(|x| x.name == name).unwrap().clone();
    assert_eq!(get("v").mapped_bytes, 2 * MIB);
    assert_eq!(
        get("v").exclusive_bytes,
        MIB,
        "the rewritten half is v's own"
    );
    assert_eq!(get("v").shared_bytes, MIB);
    assert_eq!(
        get("v@a").exclusive_bytes,
        MIB,
        "the overwritten half is only in the snapshot"
    );
    let used = pool.status().data_used_bytes;
    drop(v);
    assert!(matches!(
        pool.remove_volume("v", false),
        Err(Error::Busy { .. })
    ));
    pool.remove_volume("v@a", false).unwrap();
    let freed = used - pool.status().data_used_bytes;
    assert!((MIB..MIB + 64 * 1024).contains(&freed), "freed {freed}");
    assert_eq!(pool.usage()[0].exclusive_bytes, 2 * MIB);
    clean(&dev, &pool);
    pool.create_snapshot("v@b").unwrap();
    pool.remove_volume("v", true).unwrap();
    assert!(pool.volumes().is_empty());
    assert_eq!(pool.status().data_used_bytes, 0);
    clean(&dev, &pool);
    pool.close().unwrap();
    reopened(&dev);
}

#[test]
fn rollback_restores_and_guards_newer_snapshots() {
    let (dev, pool) = new_pool(64 * MIB, 1);
    pool.create_volume("v", 4 * MIB).unwrap();
    let v = pool.open_volume("v").unwrap();
    v.write(0, &block(1)).unwrap();
    pool.create_snapshot("v@one").unwrap();
    v.write(0, &block(2)).unwrap();
    v.write(8, &block(2)).unwrap();
    pool.create_snapshot("v@two").unwrap();
    v.write(0, &block(3)).unwrap();
    assert!(
        matches!(pool.rollback("v@one", false), Err(Error::Busy { .. })),
        "open volume"
    );
    drop(v);
    assert!(matches!(
        pool.rollback("v", false),
        Err(Error::InvalidArgument(_))
    ));
    let e = pool.rollback("v@one", false).unwrap_err();
    assert!(e.to_string().contains("v@two"), "{e}");
    pool.rollback("v@two", false).unwrap();
    assert_eq!(read_block(&pool, "v", 0), 2);
    pool.rollback("v@one", true).unwrap();
    assert_eq!(read_block(&pool, "v", 0), 1);
    assert_eq!(read_block(&pool, "v", 1), 0);
    assert!(pool.volume_info("v@two").is_err());
    clean(&dev, &pool);
    let p2 = reopened(&dev);
    assert_eq!(read_block(&p2, "v", 0), 1);
    drop(p2);
    pool.close().unwrap();
    let p3 = reopened(&dev);
    assert_eq!(read_block(&p3, "v", 0), 1);
    assert_eq!(read_block(&p3, "v@one", 0), 1);
}

#[test]
fn base_images_linked_clones_and_flatten() {
    let (dev, pool) = new_pool(64 * MIB, 1);
    pool.create_volume("vm-9000-disk-0", 4 * MIB).unwrap();
    let v = pool.open_volume("vm-9000-disk-0").unwrap();
    v.write(0, &vec![5u8; 2 * MIB as usize]).unwrap();
    assert!(
        pool.clone_volume("vm-9000-disk-0", "x").is_err(),
        "live volume cannot be cloned"
    );
    assert!(matches!(
        pool.make_base("vm-9000-disk-0", Some("base-9000-disk-0")),
        Err(Error::Busy { .. })
    ));
    drop(v);
    let base = pool
        .make_base("vm-9000-disk-0", Some("base-9000-disk-0"))
        .unwrap();
    assert!(base.base && base.read_only);
    let before = pool.status().data_used_bytes;
    for i in 0..5 {
        let c = pool
            .clone_volume("base-9000-disk-0", &format!("vm-{}-disk-0", 100 + i))
            .unwrap();
        assert_eq!(c.clone_of.as_deref(), Some("base-9000-disk-0"));
    }
    assert!(
        pool.status().data_used_bytes - before < 64 * 1024,
        "clones share the base's data"
    );
    let c = pool.open_volume("vm-100-disk-0").unwrap();
    c.write(8, &block(6)).unwrap();
    drop(c);
    assert_eq!(read_block(&pool, "vm-100-disk-0", 0), 5);
    assert_eq!(read_block(&pool, "vm-100-disk-0", 1), 6);
    assert_eq!(read_block(&pool, "vm-101-disk-0", 1), 5);
    assert_eq!(read_block(&pool, "base-9000-disk-0", 1), 5);
    let e = pool.remove_volume("base-9000-disk-0", false).unwrap_err();
    assert!(e.to_string().contains("vm-100-disk-0"), "{e}");
    let mut seen = Vec::new();
    pool.flatten("vm-100-disk-0", &mut |d, t| seen.push((d, t)))
        .unwrap();
    assert_eq!(seen.last().map(|x| x.0), seen.last().map(|x| x.1));
    assert!(pool
        .volume_info("vm-100-disk-0")
        .unwrap()
        .clone_of
        .is_none());
    for i in 1..5 {
        pool.remove_volume(&format!("vm-{}-disk-0", 100 + i), false)
            .unwrap();
    }
    pool.remove_volume("base-9000-disk-0", false).unwrap();
    assert_eq!(read_block(&pool, "vm-100-disk-0", 0), 5);
    assert_eq!(read_block(&pool, "vm-100-disk-0", 1), 6);
    assert_eq!(pool.usage()[0].exclusive_bytes, 2 * MIB);
    clean(&dev, &pool);
    pool.close().unwrap();
    let p = reopened(&dev);
    assert_eq!(read_block(&p, "vm-100-disk-0", 300), 5);
}

#[test]
fn diff_lists_changed_ranges_and_depth_costs_nothing() {
    let (_dev, pool) = new_pool(64 * MIB, 1);
    pool.create_volume("v", 8 * MIB).unwrap();
    let v = pool.open_volume("v").unwrap();
    v.write(0, &vec![1u8; MIB as usize]).unwrap();
    pool.create_snapshot("v@s0").unwrap();
    for depth in 1..=20u64 {
        v.write(depth * 16 * 8, &block(depth as u8)).unwrap();
        pool.create_snapshot(&format!("v@s{depth}")).unwrap();
    }
    v.write(1000 * 8, &block(99)).unwrap();
    let d = pool.diff("v@s0", "v@s2").unwrap();
    assert_eq!(d, vec![(16 * 4096, 4096), (32 * 4096, 4096)]);
    let d = pool.diff("v@s20", "v").unwrap();
    assert_eq!(d, vec![(1000 * 4096, 4096)]);
    assert!(pool.diff("v@s3", "v@s1").is_err());
    assert!(pool.diff("v", "v@s1").is_err());
    for depth in 1..=20u64 {
        assert_eq!(
            read_block(&pool, &format!("v@s{depth}"), depth * 16),
            depth as u8
        );
        assert_eq!(read_block(&pool, &format!("v@s{depth}"), 1), 1);
    }
}

#[test]
fn snapshots_and_bases_cannot_be_resized_and_snapshots_rename_within_their_volume() {
    let (_dev, pool) = new_pool(64 * MIB, 1);
    pool.create_volume("v", 4 * MIB).unwrap();
    pool.create_volume("t", 4 * MIB).unwrap();
    pool.open_volume("v").unwrap().write(0, &block(1)).unwrap();
    pool.create_snapshot("v@s").unwrap();
    assert!(matches!(
        pool.resize_volume("v@s", 4096, true),
        Err(Error::ReadOnly(_))
    ));
    pool.rename_volume("v@s", "v@t").unwrap();
    pool.rename_volume("v@t", "u").unwrap();
    assert!(pool.volume_info("v@u").unwrap().snapshot);
    assert!(pool.rename_volume("v@u", "t@u").is_err());
    assert_eq!(read_block(&pool, "v@u", 0), 1);
    pool.make_base("t", None).unwrap();
    assert!(matches!(
        pool.resize_volume("t", 8 * MIB, false),
        Err(Error::ReadOnly(_))
    ));
    assert_eq!(pool.mapped_ranges("v").unwrap(), vec![(0, 4096)]);
}
