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
