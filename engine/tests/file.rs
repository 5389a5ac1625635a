//! The real I/O path: a pool in a file (O_DIRECT + io_uring), written by
//! several threads at once, then reopened from the file.

mod common;
use std::sync::Arc;
use thinlun::{check::check, dev::FileDevice, OpenOptions, Pool, PoolConfig, Request};

const MIB: u64 = 1 << 20;

fn block_data(thread: u64, block: u64, round: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(4096);
    while v.len() < 4096 {
        v.extend_from_slice(&(thread << 48 | block << 16 | round).to_le_bytes());
    }
    v
}

#[test]
fn concurrent_batches_on_a_file_survive_reopen() {
    let f = common::pool_file("concurrent");
    let cfg = PoolConfig {
        size_bytes: Some(256 * MIB),
        ..PoolConfig::default()
    };
    let pool = Pool::create_path(f.path(), &cfg).unwrap();
    pool.create_volume("vm-100-disk-0", 64 * MIB).unwrap();
    let threads = 4u64;
    let blocks_per_thread = 1024u64;
    let rounds = 3u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let pool = pool.clone();
            s.spawn(move || {
                let vol = pool.open_volume("vm-100-disk-0").unwrap();
                for round in 0..rounds {
                    // Batches of 32 scattered 4 KiB writes in this thread's region.
                    for batch in 0..blocks_per_thread / 32 {
                        // k -> 37k mod 1024 is a permutation: every block once per round, scattered.
                        let blocks: Vec<u64> = (0..32)
                            .map(|i| {
                                t * blocks_per_thread + ((batch * 32 + i) * 37) % blocks_per_thread
                            })
                            .collect();
                        let data: Vec<Vec<u8>> =
                            blocks.iter().map(|&b| block_data(t, b, round)).collect();
                        let mut reqs: Vec<Request> = blocks
                            .iter()
                            .zip(&data)
                            .map(|(&b, d)| Request::Write {
                                sector: b * 8,
                                data: d,
                            })
                            .collect();
                        for r in vol.submit(&mut reqs) {
                            r.unwrap();
                        }
                    }
                    if round == 1 {
                        vol.flush().unwrap();
                    }
                }
                // Read back through the batch API.
                let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 4096]).collect();
                for chunk in 0..blocks_per_thread / 32 {
                    let mut reqs: Vec<Request> = bufs
                        .iter_mut()
                        .enumerate()
                        .map(|(i, b)| Request::Read {
                            sector: (t * blocks_per_thread + chunk * 32 + i as u64) * 8,
                            buf: b,
                        })
                        .collect();
                    for r in vol.submit(&mut reqs) {
                        r.unwrap();
                    }
                    drop(reqs);
                    for (i, b) in bufs.iter().enumerate() {
                        let blk = t * blocks_per_thread + chunk * 32 + i as u64;
                        assert!(
                            b == &block_data(t, blk, rounds - 1),
                            "thread {t} block {blk}: got {:?}",
                            &b[..16]
                        );
                    }
                }
            });
        }
    });
    assert!(pool.verify_space().is_empty());
    let mapped = pool.volume_info("vm-100-disk-0").unwrap().mapped_bytes;
    assert_eq!(mapped, threads * blocks_per_thread * 4096);
    pool.close().unwrap();

    let dev = FileDevice::open(f.path(), false).unwrap();
    let report = check(&dev, "file").unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    let pool = Pool::open_path(f.path(), &OpenOptions::default()).unwrap();
    let vol = pool.open_volume("vm-100-disk-0").unwrap();
    let mut b = vec![0u8; 4096];
    for t in 0..threads {
        for blk in [0, 17, blocks_per_thread - 1] {
            let block = t * blocks_per_thread + blk;
            vol.read(block * 8, &mut b).unwrap();
            assert!(
                b == block_data(t, block, rounds - 1),
                "reopened block {block}: got {:?}",
                &b[..16]
            );
        }
    }
}

#[test]
fn second_writer_process_is_refused() {
    let f = common::pool_file("lock");
    let cfg = PoolConfig {
        size_bytes: Some(64 * MIB),
        ..PoolConfig::default()
    };
    let pool = Pool::create_path(f.path(), &cfg).unwrap();
    // flock locks are per open file description: a second open for writing
    // from this process is refused just as another process would be.
    let second = Pool::open_path(f.path(), &OpenOptions::default());
    assert!(
        matches!(
            second,
            Err(thinlun::Error::Busy {
                kind: thinlun::BusyKind::PoolOpenElsewhere,
                ..
            })
        ),
        "{:?}",
        second.err()
    );
    let ro = Pool::open_path(
        f.path(),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ro.volumes().len(), 0);
    drop(pool);
    let again = Arc::new(Pool::open_path(f.path(), &OpenOptions::default()).unwrap());
    assert_eq!(again.volumes().len(), 0);
}

fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn trim_returns_free_space_to_the_file_system_and_grow_extends_the_pool() {
    let f = common::pool_file("trim");
    let cfg = PoolConfig {
        size_bytes: Some(128 * MIB),
        ..PoolConfig::default()
    };
    let pool = Pool::create_path(f.path(), &cfg).unwrap();
    pool.create_volume("v", 64 * MIB).unwrap();
    let v = pool.open_volume("v").unwrap();
    v.write(0, &vec![3u8; 32 * MIB as usize]).unwrap();
    v.flush().unwrap();
    let full = allocated_bytes(f.path());
    v.discard(0, 24 * MIB / 512).unwrap();
    drop(v);
    let trimmed = pool.trim(false).unwrap();
    assert!(trimmed >= 24 * MIB, "trimmed {trimmed}");
    let after = allocated_bytes(f.path());
    assert!(
        after + 20 * MIB < full,
        "file uses {after} bytes after trim, {full} before"
    );
    let v = pool.open_volume("v").unwrap();
    let mut buf = vec![0u8; 4096];
    v.read(30 * MIB / 512, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 3),
        "data that was not discarded survives trim"
    );
    drop(v);

    // Grow: refused until the file is bigger, then the new space is usable.
    assert!(matches!(
        pool.grow(),
        Err(thinlun::Error::InvalidArgument(_))
    ));
    let before = pool.status();
    std::fs::OpenOptions::new()
        .write(true)
        .open(f.path())
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    assert_eq!(pool.grow().unwrap(), 256 * MIB);
    let st = pool.status();
    assert_eq!(st.size_bytes, 256 * MIB);
    assert_eq!(st.data_free_bytes - before.data_free_bytes, 128 * MIB);
    pool.create_volume("big", 200 * MIB).unwrap();
    let big = pool.open_volume("big").unwrap();
    big.write(0, &vec![4u8; 150 * MIB as usize]).unwrap();
    drop(big);
    pool.close().unwrap();
    let report = check(&FileDevice::open(f.path(), false).unwrap(), "file").unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    let p = Pool::open_path(
        f.path(),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p.status().size_bytes, 256 * MIB);
}
