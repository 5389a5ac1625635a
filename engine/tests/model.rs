//! Model-based property test: random sequences of reads, writes (any sector
//! alignment and length), discards, write-zeroes, flushes, checkpoints and
//! clean reopens, checked against a plain byte array.

use proptest::prelude::*;
use std::sync::Arc;
use thinlun::dev::MemDevice;
use thinlun::{OpenOptions, Pool, PoolConfig};

const SECTORS: u64 = 256; // 128 KiB volume: 32 blocks

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, sectors: u64, byte: u8 },
    Read { sector: u64, sectors: u64 },
    Discard { sector: u64, sectors: u64 },
    Zero { sector: u64, sectors: u64 },
    Flush,
    Checkpoint,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(40)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((sector, sectors), byte)| Op::Write { sector, sectors, byte }),
        3 => range().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
        1 => Just(Op::Flush),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

fn open(dev: &Arc<MemDevice>) -> Pool {
    Pool::open(dev.clone(), "model", &OpenOptions::default()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_byte_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dev = Arc::new(MemDevice::new(8 << 20));
        let cfg = PoolConfig { chunk_bytes: 64 << 10, max_hosts: 1, journal_bytes: Some(64 * 4096), ..PoolConfig::default() };
        let mut pool = Pool::create(dev.clone(), "model", &cfg).unwrap();
        pool.create_volume("v", SECTORS * 512).unwrap();
        let mut vol = pool.open_volume("v").unwrap();
        let mut model = vec![0u8; (SECTORS * 512) as usize];
        for op in ops {
            match op {
                Op::Write { sector, sectors, byte } => {
                    let data = vec![byte; (sectors * 512) as usize];
                    vol.write(sector, &data).unwrap();
                    model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(byte);
                }
                Op::Read { sector, sectors } => {
                    let mut buf = vec![0xeeu8; (sectors * 512) as usize];
                    vol.read(sector, &mut buf).unwrap();
                    prop_assert_eq!(&buf[..], &model[(sector * 512) as usize..((sector + sectors) * 512) as usize]);
                }
                Op::Discard { sector, sectors } => {
                    vol.discard(sector, sectors).unwrap();
                    // Whole blocks inside the range read as zeros; partial ones keep their data.
                    let b0 = sector.div_ceil(8) * 8;
                    let b1 = (sector + sectors) / 8 * 8;
                    if b1 > b0 {
                        model[(b0 * 512) as usize..(b1 * 512) as usize].fill(0);
                    }
                }
                Op::Zero { sector, sectors } => {
                    vol.write_zeroes(sector, sectors).unwrap();
                    model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
                }
                Op::Flush => vol.flush().unwrap(),
                Op::Checkpoint => pool.checkpoint().unwrap(),
                Op::Reopen => {
                    drop(vol);
                    pool.close().unwrap();
                    let report = thinlun::check::check(dev.as_ref(), "model").unwrap();
                    prop_assert!(report.is_clean(), "{:?}", report.errors);
                    pool = open(&dev);
                    vol = pool.open_volume("v").unwrap();
                }
            }
            prop_assert!(pool.verify_space().is_empty(), "{:?}", pool.verify_space());
        }
        let mut all = vec![0u8; model.len()];
        vol.read(0, &mut all).unwrap();
        prop_assert_eq!(all, model);
    }
}

#[derive(Clone, Debug)]
enum SnapOp {
    Write {
        clone: bool,
        block: u64,
        blocks: u64,
        byte: u8,
    },
    Discard {
        block: u64,
        blocks: u64,
    },
    Snapshot,
    Rollback {
        pick: usize,
    },
    RemoveSnapshot {
        pick: usize,
    },
    Clone {
        pick: usize,
    },
    Flatten,
    RemoveClone,
    Grow,
    Checkpoint,
    Reopen,
}

const VBLOCKS: u64 = 32;

fn snap_op() -> impl Strategy<Value = SnapOp> {
    let range = (0..VBLOCKS).prop_flat_map(|b| (Just(b), 1..=(VBLOCKS - b).min(6)));
    prop_oneof![
        6 => (any::<bool>(), range.clone(), any::<u8>()).prop_map(|(clone, (block, blocks), byte)| SnapOp::Write { clone, block, blocks, byte }),
        1 => range.prop_map(|(block, blocks)| SnapOp::Discard { block, blocks }),
        2 => Just(SnapOp::Snapshot),
        1 => any::<usize>().prop_map(|pick| SnapOp::Rollback { pick }),
        1 => any::<usize>().prop_map(|pick| SnapOp::RemoveSnapshot { pick }),
        1 => any::<usize>().prop_map(|pick| SnapOp::Clone { pick }),
        1 => Just(SnapOp::Flatten),
        1 => Just(SnapOp::RemoveClone),
        1 => Just(SnapOp::Grow),
        1 => Just(SnapOp::Checkpoint),
        1 => Just(SnapOp::Reopen),
    ]
}

fn read_all(pool: &Pool, name: &str) -> Vec<u8> {
    let v = pool.open_volume(name).unwrap();
    let mut buf = vec![0u8; v.size_bytes() as usize];
    v.read(0, &mut buf).unwrap();
    buf
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Snapshots, clones, rollback, flatten and removal against a model
    /// holding every volume's bytes; every volume is compared after every
    /// step, and the space accounting re-derived.
    #[test]
    fn snapshots_and_clones_match_model(ops in proptest::collection::vec(snap_op(), 1..40)) {
        let dev = Arc::new(MemDevice::new(16 << 20));
        let cfg = PoolConfig { chunk_bytes: 64 << 10, max_hosts: 1, journal_bytes: Some(64 * 4096), ..PoolConfig::default() };
        let mut pool = Pool::create(dev.clone(), "model", &cfg).unwrap();
        pool.create_volume("v", VBLOCKS * 4096).unwrap();
        let mut model: std::collections::BTreeMap<String, Vec<u8>> = std::collections::BTreeMap::new();
        model.insert("v".into(), vec![0u8; (VBLOCKS * 4096) as usize]);
        let mut snaps: Vec<String> = Vec::new();
        let mut next = 0;
        for op in ops {
            match op {
                SnapOp::Write { clone, block, blocks, byte } => {
                    let name = if clone && model.contains_key("c") { "c" } else { "v" };
                    let vol = pool.open_volume(name).unwrap();
                    vol.write(block * 8, &vec![byte; (blocks * 4096) as usize]).unwrap();
                    let m = model.get_mut(name).unwrap();
                    m[(block * 4096) as usize..((block + blocks) * 4096) as usize].fill(byte);
                }
                SnapOp::Discard { block, blocks } => {
                    pool.open_volume("v").unwrap().discard(block * 8, blocks * 8).unwrap();
                    model.get_mut("v").unwrap()[(block * 4096) as usize..((block + blocks) * 4096) as usize].fill(0);
                }
                SnapOp::Snapshot => {
                    let name = format!("v@s{next}");
                    next += 1;
                    pool.create_snapshot(&name).unwrap();
                    let content = model["v"].clone();
                    model.insert(name.clone(), content);
                    snaps.push(name);
                }
                SnapOp::Rollback { pick } if !snaps.is_empty() => {
                    let i = pick % snaps.len();
                    let newer: Vec<String> = snaps[i + 1..].to_vec();
                    let blocked = newer.iter().any(|s| model.contains_key("c") && CLONE_OF.with(|c| c.borrow().as_deref() == Some(s.as_str())));
                    let r = pool.rollback(&snaps[i], true);
                    if blocked {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    r.unwrap();
                    let content = model[&snaps[i]].clone();
                    model.insert("v".into(), content);
                    for s in newer {
                        model.remove(&s);
                    }
                    snaps.truncate(i + 1);
                }
                SnapOp::RemoveSnapshot { pick } if !snaps.is_empty() => {
                    let i = pick % snaps.len();
                    let r = pool.remove_volume(&snaps[i], false);
                    if model.contains_key("c") && CLONE_OF.with(|c| c.borrow().as_deref() == Some(snaps[i].as_str())) {
                        prop_assert!(r.is_err(), "removing the origin of a clone must fail");
                        continue;
                    }
                    r.unwrap();
                    model.remove(&snaps[i]);
                    snaps.remove(i);
                }
                SnapOp::Clone { pick } if !snaps.is_empty() && !model.contains_key("c") => {
                    let src = snaps[pick % snaps.len()].clone();
                    pool.clone_volume(&src, "c").unwrap();
                    let content = model[&src].clone();
                    model.insert("c".into(), content);
                    CLONE_OF.with(|c| *c.borrow_mut() = Some(src));
                }
                SnapOp::Flatten if model.contains_key("c") && CLONE_OF.with(|c| c.borrow().is_some()) => {
                    pool.flatten("c", &mut |_, _| {}).unwrap();
                    CLONE_OF.with(|c| *c.borrow_mut() = None);
                }
                SnapOp::RemoveClone if model.contains_key("c") => {
                    pool.remove_volume("c", false).unwrap();
                    model.remove("c");
                    CLONE_OF.with(|c| *c.borrow_mut() = None);
                }
                SnapOp::Grow => {
                    let size = model["v"].len() as u64 + 4096;
                    pool.resize_volume("v", size, false).unwrap();
                    model.get_mut("v").unwrap().resize(size as usize, 0);
                }
                SnapOp::Checkpoint => pool.checkpoint().unwrap(),
                SnapOp::Reopen => {
                    pool.close().unwrap();
                    let report = thinlun::check::check(dev.as_ref(), "model").unwrap();
                    prop_assert!(report.is_clean(), "{:?}", report.errors);
                    pool = open(&dev);
                }
                _ => {}
            }
            for (name, want) in &model {
                let got = read_all(&pool, name);
                prop_assert!(&got == want, "volume {} differs from the model", name);
            }
            let problems = pool.verify_space();
            prop_assert!(problems.is_empty(), "{:?}", problems);
        }
        CLONE_OF.with(|c| *c.borrow_mut() = None);
    }
}

thread_local! {
    /// The snapshot the clone "c" was made from, while it depends on it.
    static CLONE_OF: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}
