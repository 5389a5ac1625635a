//! Pool and volume life cycle on an in-memory LUN.

mod common;
use common::{new_pool, small_config};
use std::sync::Arc;
use thinlun::dev::{BlockDevice, MemDevice};
use thinlun::{check::check, Error, OpenOptions, Pool};

const MIB: u64 = 1 << 20;

/// The host slots of this file's pools (two, as they have always had).
const HOSTS: u32 = 2;

fn reopen(dev: &Arc<MemDevice>) -> Pool {
    let img = MemDevice::from_image(dev.image());
    Pool::open(Arc::new(img), "mem", &OpenOptions::default()).unwrap()
}

#[test]
fn write_read_reopen_check() {
    let (dev, pool) = new_pool(64 * MIB, HOSTS);
    pool.create_volume("vm-100-disk-0", 16 * MIB).unwrap();
    let vol = pool.open_volume("vm-100-disk-0").unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    vol.write(8, &data).unwrap();
    let mut back = vec![0u8; 8192];
    vol.read(8, &mut back).unwrap();
    assert_eq!(back, data);
    let mut zeros = vec![1u8; 4096];
    vol.read(100, &mut zeros).unwrap();
    assert!(
        zeros.iter().all(|&b| b == 0),
        "never-written blocks read as zeros"
    );
    vol.flush().unwrap();
    assert_eq!(
        pool.volume_info("vm-100-disk-0").unwrap().mapped_bytes,
        8192
    );
    // Reopen from the image as it is now (journal, no checkpoint yet).
    let p2 = reopen(&dev);
    let v2 = p2.open_volume("vm-100-disk-0").unwrap();
    let mut back2 = vec![0u8; 8192];
    v2.read(8, &mut back2).unwrap();
    assert_eq!(back2, data);
    drop(v2);
    drop(p2);
    drop(vol);
    pool.close().unwrap();
    let report = check(dev.as_ref(), "mem").unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(report.mapped_blocks, 2);
}

#[test]
fn partial_and_unaligned_writes() {
    let (_dev, pool) = new_pool(64 * MIB, HOSTS);
    pool.create_volume("v", MIB).unwrap();
    let vol = pool.open_volume("v").unwrap();
    vol.write(0, &[1u8; 4096]).unwrap();
    vol.write(3, &[2u8; 512]).unwrap(); // inside a mapped block
    vol.write(9, &[3u8; 1024]).unwrap(); // inside a hole
    vol.write(15, &[4u8; 1024]).unwrap(); // straddles two blocks
    let mut all = vec![0u8; 3 * 4096];
    vol.read(0, &mut all).unwrap();
    let mut want = vec![0u8; 3 * 4096];
    want[..4096].fill(1);
    want[3 * 512..4 * 512].fill(2);
    want[9 * 512..11 * 512].fill(3);
    want[15 * 512..17 * 512].fill(4);
    assert_eq!(all, want);
    let mut odd = vec![0u8; 1536];
    vol.read(2, &mut odd).unwrap();
    assert_eq!(odd[..], want[1024..2560]);
    vol.write_zeroes(1, 6).unwrap();
    vol.read(0, &mut all).unwrap();
    want[512..3584].fill(0);
    assert_eq!(all, want);
    assert!(pool.verify_space().is_empty());
}

#[test]
fn discard_and_remove_return_space() {
    let (dev, pool) = new_pool(64 * MIB, HOSTS);
    let free0 = pool.status().data_free_bytes;
    pool.create_volume("a", 8 * MIB).unwrap();
    let vol = pool.open_volume("a").unwrap();
    vol.write(0, &vec![9u8; 4 * MIB as usize]).unwrap();
    vol.flush().unwrap();
    let used = pool.status().data_used_bytes;
    vol.discard(0, 2 * MIB / 512).unwrap();
    vol.flush().unwrap();
    assert_eq!(pool.volume_info("a").unwrap().mapped_bytes, 2 * MIB);
    assert_eq!(pool.status().data_used_bytes, used - 2 * MIB);
    let mut b = vec![1u8; 4096];
    vol.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert!(matches!(
        pool.remove_volume("a", false),
        Err(Error::Busy {
            kind: thinlun::BusyKind::VolumeOpen,
            ..
        })
    ));
    drop(vol);
    pool.remove_volume("a", false).unwrap();
    assert_eq!(pool.status().data_free_bytes, free0);
    pool.close().unwrap();
    assert!(check(dev.as_ref(), "mem").unwrap().is_clean());
}

#[test]
fn volume_management_and_bad_input() {
    let (dev, pool) = new_pool(64 * MIB, HOSTS);
    pool.create_volume("vm-1-disk-0", 4 * MIB).unwrap();
    assert!(matches!(
        pool.create_volume("vm-1-disk-0", MIB),
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(
        pool.create_volume("bad/name", MIB),
        Err(Error::InvalidName(_))
    ));
    assert!(matches!(
        pool.create_volume("x", 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        pool.create_volume("x", 1000),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        pool.create_volume("x", u64::MAX - 4095),
        Err(Error::InvalidArgument(_))
    ));
    pool.rename_volume("vm-1-disk-0", "vm-2-disk-0").unwrap();
    assert!(matches!(
        pool.volume_info("vm-1-disk-0"),
        Err(Error::NoSuchVolume(_))
    ));
    let vol = pool.open_volume("vm-2-disk-0").unwrap();
    vol.write(0, &vec![5u8; 4 * MIB as usize]).unwrap();
    assert!(matches!(
        vol.write(8192, &[0u8; 512]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.read(8191, &mut [0u8; 1024]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write(0, &[0u8; 100]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(pool.resize_volume("vm-2-disk-0", 2 * MIB, false).is_err());
    pool.resize_volume("vm-2-disk-0", 2 * MIB, true).unwrap();
    assert_eq!(
        pool.volume_info("vm-2-disk-0").unwrap().mapped_bytes,
        2 * MIB
    );
    pool.resize_volume("vm-2-disk-0", 8 * MIB, false).unwrap();
    let mut b = vec![1u8; 4096];
    vol.read(3 * MIB / 512, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "grown range reads zeros");
    drop(vol);
    pool.close().unwrap();
    let p = reopen(&dev);
    let info = p.volume_info("vm-2-disk-0").unwrap();
    assert_eq!((info.size_bytes, info.mapped_bytes), (8 * MIB, 2 * MIB));
}

#[test]
fn not_a_pool_and_damaged_superblocks() {
    let dev = MemDevice::new(64 * MIB);
    assert!(matches!(
        Pool::open(Arc::new(dev), "x", &OpenOptions::default()),
        Err(Error::NotAPool(_))
    ));
    let (dev, pool) = new_pool(64 * MIB, HOSTS);
    pool.create_volume("v", MIB).unwrap();
    pool.close().unwrap();
    let img = dev.image();
    // One copy damaged: opens from the other, with a warning.
    let mut one = img.clone();
    one[100] ^= 1;
    let p = Pool::open(
        Arc::new(MemDevice::from_image(one.clone())),
        "x",
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p.volumes().len(), 1);
    assert!(!p.warnings().is_empty());
    // Opening it for writing rewrites the damaged copy.
    let one_dev = Arc::new(MemDevice::from_image(one.clone()));
    drop(p);
    let w = Pool::open(one_dev.clone(), "x", &OpenOptions::default()).unwrap();
    assert!(!w.warnings().is_empty());
    w.close().unwrap();
    let report = check(one_dev.as_ref(), "x").unwrap();
    assert!(
        report.is_clean() && report.warnings.is_empty(),
        "{:?}",
        report.warnings
    );
    // Both superblocks wiped: the pool's other records still identify it.
    let mut wiped = img.clone();
    wiped[..4096].fill(0);
    wiped[8 * 4096..9 * 4096].fill(0);
    let e = Pool::open(
        Arc::new(MemDevice::from_image(wiped)),
        "x",
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("superblock copies are missing"),
        "{e}"
    );
    // Both damaged: a clear error.
    let mut both = img.clone();
    both[100] ^= 1;
    both[8 * 4096 + 100] ^= 1;
    let e = Pool::open(
        Arc::new(MemDevice::from_image(both)),
        "x",
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("both superblock copies"), "{e}");
    // Truncated LUN.
    let short = img[..(32 * MIB) as usize].to_vec();
    let e = Pool::open(
        Arc::new(MemDevice::from_image(short)),
        "x",
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("truncated"), "{e}");
    // Newer format version (validly sealed by that newer version).
    let mut newer = img.clone();
    for at in [0usize, 8 * 4096] {
        let blk = &mut newer[at..at + 4096];
        blk[8] = 2;
        blk[12..16].fill(0);
        let crc = crc32fast::hash(blk);
        blk[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    // A flipped bit in one copy's version field is damage, not a new format.
    let mut flipped = img.clone();
    flipped[8] ^= 2;
    let p = Pool::open(
        Arc::new(MemDevice::from_image(flipped)),
        "x",
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!p.warnings().is_empty());
    let e = Pool::open(
        Arc::new(MemDevice::from_image(newer)),
        "x",
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        matches!(e, Error::UnsupportedVersion { found: 2, .. }),
        "{e}"
    );
    // Creating over an existing pool needs force.
    let d = Arc::new(MemDevice::from_image(img));
    assert!(matches!(
        Pool::create(d.clone(), "x", &small_config(HOSTS)),
        Err(Error::Busy {
            kind: thinlun::BusyKind::NeedsForce,
            ..
        })
    ));
    let _ = d.size_bytes();
}

#[test]
fn partial_writes_to_one_block_in_one_batch_all_land() {
    use thinlun::Request;
    let (_dev, pool) = new_pool(64 * MIB, HOSTS);
    pool.create_volume("v", MIB).unwrap();
    let vol = pool.open_volume("v").unwrap();
    let a = [0xaau8; 512];
    let b = [0xbbu8; 512];
    let c = [0xccu8; 1024];
    let mut out = [0u8; 512];
    let mut reqs = [
        Request::Write {
            sector: 0,
            data: &a,
        },
        Request::Write {
            sector: 1,
            data: &b,
        },
        Request::WriteZeroes {
            sector: 8,
            sectors: 1,
        },
        Request::Write {
            sector: 6,
            data: &c,
        }, // straddles into block 1
        Request::Read {
            sector: 20,
            buf: &mut out,
        },
        Request::Flush,
    ];
    for r in vol.submit(&mut reqs) {
        r.unwrap();
    }
    let mut all = vec![0u8; 2 * 4096];
    vol.read(0, &mut all).unwrap();
    assert!(all[..512].iter().all(|&x| x == 0xaa));
    assert!(all[512..1024].iter().all(|&x| x == 0xbb));
    assert!(all[1024..3072].iter().all(|&x| x == 0));
    assert!(all[3072..4096].iter().all(|&x| x == 0xcc));
    assert!(all[4096..].iter().all(|&x| x == 0));
}

#[test]
fn persist_survives_a_process_crash() {
    let (dev, pool) = new_pool(64 * MIB, HOSTS);
    pool.create_volume("v", MIB).unwrap();
    let vol = pool.open_volume("v").unwrap();
    vol.write(0, &[7u8; 4096]).unwrap();
    // A process crash keeps every write the device completed; persist puts
    // the new mapping, still only in memory, into the journal.
    let mut b = vec![0u8; 4096];
    vol.persist().unwrap();
    let kept = reopen(&dev);
    kept.open_volume("v").unwrap().read(0, &mut b).unwrap();
    assert_eq!(b[0], 7);
}

/// A pool created with `force` over an earlier one opens, however much of
/// its journal ring the earlier pool left written: those blocks belong to
/// another chain and must neither be replayed nor taken for proof that a
/// commit of the new pool was lost (FORMAT.md 6.4).
#[test]
fn a_pool_created_over_an_earlier_one_ignores_its_journal() {
    let (dev, old) = new_pool(32 * MIB, HOSTS);
    old.create_volume("a", 8 * MIB).unwrap();
    let v = old.open_volume("a").unwrap();
    // Many small commits: the old ring holds a long chain of valid blocks.
    for i in 0..40u64 {
        v.write(i * 8, &vec![i as u8 + 1; 4096]).unwrap();
        v.flush().unwrap();
    }
    drop(v);
    // The earlier pool dies without a checkpoint: its ring stays written.
    std::mem::forget(old);
    let forced = thinlun::PoolConfig {
        force: true,
        ..small_config(HOSTS)
    };
    let new = Pool::create(dev.clone(), "mem", &forced).unwrap();
    new.create_volume("b", 8 * MIB).unwrap();
    let w = new.open_volume("b").unwrap();
    w.write(0, &vec![9u8; 4096]).unwrap();
    w.flush().unwrap();
    drop(w);
    std::mem::forget(new);
    let reopened = reopen(&dev);
    assert_eq!(reopened.volumes().len(), 1, "only the new pool's volume");
    let mut buf = vec![0u8; 4096];
    reopened
        .open_volume("b")
        .unwrap()
        .read(0, &mut buf)
        .unwrap();
    assert_eq!(buf, vec![9u8; 4096]);
    let report = check(dev.as_ref(), "mem").unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}
