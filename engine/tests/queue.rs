//! `IoQueue`: requests kept in flight on a pool in a file (io_uring),
//! checked against a byte model, and alongside batches and snapshots of
//! other threads.

mod common;
use proptest::prelude::*;
use std::collections::HashMap;
use thinlun::dev::{AlignedBuf, FileDevice};
use thinlun::{check::check, Completion, IoQueue, OpenOptions, Pool, QueueOp};

const MIB: u64 = 1 << 20;
const SECTORS: u64 = 512; // a 256 KiB volume: 64 blocks

#[derive(Clone, Debug)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        byte: u8,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Zero {
        sector: u64,
        sectors: u64,
    },
    Flush,
    /// Drain, snapshot, and remember the model at that point.
    Snapshot,
}

/// Mostly whole aligned blocks (the fast path), sometimes any sectors.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        4 => (0..SECTORS / 8).prop_flat_map(|b| (Just(b * 8), (1..=(SECTORS / 8 - b).min(4)).prop_map(|n| n * 8))),
        1 => (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(24))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), 1..=255u8).prop_map(|((sector, sectors), byte)| Op::Write { sector, sectors, byte }),
        6 => range().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
        1 => Just(Op::Flush),
        1 => Just(Op::Snapshot),
    ]
}

fn sl(sector: u64, sectors: u64) -> std::ops::Range<usize> {
    (sector * 512) as usize..((sector + sectors) * 512) as usize
}

/// Checks a completion: reads against what the model held when they were
/// submitted.
fn check_done(c: Completion<AlignedBuf>, expect: &mut HashMap<u64, Vec<u8>>) {
    if let Err(e) = &c.result {
        panic!("request {} failed: {e}", c.tag);
    }
    if let QueueOp::Read { buf, .. } = &c.op {
        let want = expect.remove(&c.tag).expect("expected bytes of a read");
        assert!(buf[..] == want[..], "read {} returned other bytes", c.tag);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever completes out of order, the queue's results are those of
    /// its requests run one after another in submission order.
    #[test]
    fn queue_matches_byte_model(ops in proptest::collection::vec(op(), 1..120), depth in 1usize..12) {
        let f = common::pool_file("model");
        let pool = common::new_file_pool(&f, 16 * MIB, 1);
        pool.create_volume("vm", SECTORS * 512).unwrap();
        let vol = pool.open_volume("vm").unwrap();
        let mut q: IoQueue<AlignedBuf> = vol.queue(depth).unwrap();
        let mut model = vec![0u8; (SECTORS * 512) as usize];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut expect: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut done = Vec::new();
        for (tag, op) in ops.iter().enumerate() {
            let tag = tag as u64;
            match *op {
                Op::Write { sector, sectors, byte } => {
                    let mut buf = AlignedBuf::zeroed((sectors * 512) as usize);
                    buf.fill(byte);
                    model[sl(sector, sectors)].fill(byte);
                    q.submit(tag, QueueOp::Write { sector, buf });
                }
                Op::Read { sector, sectors } => {
                    expect.insert(tag, model[sl(sector, sectors)].to_vec());
                    let buf = AlignedBuf::zeroed((sectors * 512) as usize);
                    q.submit(tag, QueueOp::Read { sector, buf });
                }
                Op::Discard { sector, sectors } => {
                    // Only whole blocks are unmapped (and read as zeros).
                    let b0 = sector.div_ceil(8) * 8;
                    let b1 = (sector + sectors) / 8 * 8;
                    if b1 > b0 {
                        model[sl(b0, b1 - b0)].fill(0);
                    }
                    q.submit(tag, QueueOp::Discard { sector, sectors });
                }
                Op::Zero { sector, sectors } => {
                    model[sl(sector, sectors)].fill(0);
                    q.submit(tag, QueueOp::WriteZeroes { sector, sectors });
                }
                Op::Flush => q.submit(tag, QueueOp::Flush),
                Op::Snapshot => {
                    // A snapshot waits for every write in flight (stripe
                    // locks): the thread that owns the queue drains first.
                    q.drain(&mut done);
                    let name = format!("vm@s{tag}");
                    pool.create_snapshot(&name).unwrap();
                    snaps.push((name, model.clone()));
                }
            }
            q.complete(0, &mut done);
            for c in done.drain(..) {
                check_done(c, &mut expect);
            }
        }
        q.drain(&mut done);
        for c in done.drain(..) {
            check_done(c, &mut expect);
        }
        prop_assert!(expect.is_empty());
        prop_assert_eq!(q.pending(), 0);
        drop(q);
        let mut all = vec![0u8; model.len()];
        vol.read(0, &mut all).unwrap();
        prop_assert!(all == model, "volume differs from the model");
        for (name, want) in &snaps {
            let s = pool.open_volume(name).unwrap();
            s.read(0, &mut all).unwrap();
            prop_assert!(&all == want, "snapshot {} differs", name);
        }
        drop(vol);
        pool.close().unwrap();
        let pool = Pool::open_path(f.path(), &OpenOptions::default()).unwrap();
        let vol = pool.open_volume("vm").unwrap();
        vol.read(0, &mut all).unwrap();
        prop_assert!(all == model, "volume differs from the model after reopen");
        drop(vol);
        pool.close().unwrap();
        let report = check(&FileDevice::open(f.path(), false).unwrap(), "file").unwrap();
        prop_assert!(report.is_clean(), "{:?}", report.errors);
    }
}

fn pattern(writer: u64, block: u64, round: u64) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(4096);
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(
            &(writer << 56 | block << 24 | round << 8 | (i as u64 & 0xff)).to_le_bytes(),
        );
    }
    b
}

/// A queue kept full of writes on the even 64 KiB regions of a volume,
/// while another thread makes 512-byte batch writes on the odd ones
/// (stripe locks shared between the two) and a third takes snapshots.
/// Nothing deadlocks, no snapshot changes after it is taken, queue-side
/// blocks hold whole writes, and the pool checks clean after reopen.
#[test]
fn a_full_queue_beside_batches_and_snapshots() {
    let f = common::pool_file("beside");
    // Room for the volume and every snapshot's copy of it.
    let pool = common::new_file_pool(&f, 96 * MIB, 1);
    let blocks = 1024u64; // 4 MiB
    pool.create_volume("vm", blocks * 4096).unwrap();
    let rounds = 6u64;
    let even: Vec<u64> = (0..blocks).filter(|b| (b / 16).is_multiple_of(2)).collect();
    let odd: Vec<u64> = (0..blocks)
        .filter(|b| !(b / 16).is_multiple_of(2))
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let snapshots = std::thread::scope(|s| {
        let queue_side = s.spawn(|| {
            let vol = pool.open_volume("vm").unwrap();
            let mut q: IoQueue<AlignedBuf> = vol.queue(32).unwrap();
            let mut done = Vec::new();
            for round in 1..=rounds {
                for k in 0..even.len() {
                    // Scattered: k -> 37k mod 512 visits every block once.
                    let b = even[(k * 37) % even.len()];
                    q.submit(
                        b,
                        QueueOp::Write {
                            sector: b * 8,
                            buf: pattern(1, b, round),
                        },
                    );
                    q.complete(0, &mut done);
                }
            }
            q.drain(&mut done);
            done.len()
        });
        let batch_side = s.spawn(|| {
            let vol = pool.open_volume("vm").unwrap();
            for round in 1..=rounds {
                for chunk in odd.chunks(16) {
                    // Each block written as eight 512-byte writes in one
                    // batch: read-modify-write under the stripe locks.
                    let data: Vec<AlignedBuf> =
                        chunk.iter().map(|&b| pattern(2, b, round)).collect();
                    let mut reqs: Vec<thinlun::Request> = Vec::new();
                    for (&b, d) in chunk.iter().zip(&data) {
                        for k in 0..8u64 {
                            let part = &d[(k * 512) as usize..((k + 1) * 512) as usize];
                            reqs.push(thinlun::Request::Write {
                                sector: b * 8 + k,
                                data: part,
                            });
                        }
                    }
                    for r in vol.submit(&mut reqs) {
                        r.unwrap();
                    }
                }
            }
        });
        let snapper = s.spawn(|| {
            let mut names = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && names.len() < 16 {
                let name = format!("vm@s{}", names.len());
                pool.create_snapshot(&name).unwrap();
                let mut first = AlignedBuf::zeroed((blocks * 4096) as usize);
                pool.open_volume(&name)
                    .unwrap()
                    .read(0, &mut first)
                    .unwrap();
                names.push((name, first));
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            names
        });
        let completed = queue_side.join().unwrap();
        batch_side.join().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(completed, even.len() * rounds as usize);
        snapper.join().unwrap()
    });
    assert!(!snapshots.is_empty());

    // Every block of every snapshot is zeros or one whole write.
    let whole = |data: &[u8], b: u64| -> bool {
        if data.iter().all(|&x| x == 0) {
            return true;
        }
        let writer = if (b / 16).is_multiple_of(2) { 1 } else { 2 };
        (1..=rounds).any(|r| data == &pattern(writer, b, r)[..])
    };
    let mut buf = AlignedBuf::zeroed((blocks * 4096) as usize);
    for (name, first) in &snapshots {
        let s = pool.open_volume(name).unwrap();
        s.read(0, &mut buf).unwrap();
        // A write still in flight when the snapshot was taken must not
        // land in it afterwards.
        assert!(
            buf[..] == first[..],
            "snapshot {name} changed after it was taken"
        );
        for b in 0..blocks {
            let data = &buf[(b * 4096) as usize..((b + 1) * 4096) as usize];
            // Batch-side blocks may hold a partly applied batch (its 512-byte
            // writes are separate requests); queue-side blocks never do.
            if (b / 16).is_multiple_of(2) {
                assert!(
                    whole(data, b),
                    "snapshot {name}: block {b} holds a torn write"
                );
            }
        }
    }
    drop(pool);
    let pool = Pool::open_path(f.path(), &OpenOptions::default()).unwrap();
    let vol = pool.open_volume("vm").unwrap();
    vol.read(0, &mut buf).unwrap();
    for b in 0..blocks {
        let writer = if (b / 16).is_multiple_of(2) { 1 } else { 2 };
        let data = &buf[(b * 4096) as usize..((b + 1) * 4096) as usize];
        assert!(
            data == &pattern(writer, b, rounds)[..],
            "block {b} lost its last write"
        );
    }
    drop(vol);
    pool.close().unwrap();
    let report = check(&FileDevice::open(f.path(), false).unwrap(), "file").unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
}

/// A snapshot waits for the queue's unfinished writes (they hold stripe
/// locks until reaped), so no write planned in place before the snapshot
/// lands in the snapshot's blocks afterwards.
#[test]
fn a_snapshot_waits_for_unfinished_queue_writes() {
    let f = common::pool_file("snapwait");
    let pool = common::new_file_pool(&f, 16 * MIB, 1);
    pool.create_volume("vm", MIB).unwrap();
    let vol = pool.open_volume("vm").unwrap();
    // Map every block first, so the queue's writes go in place.
    let old = vec![7u8; MIB as usize];
    vol.write(0, &old).unwrap();
    let mut q: IoQueue<AlignedBuf> = vol.queue(8).unwrap();
    for b in 0..8u64 {
        let mut buf = AlignedBuf::zeroed(4096);
        buf.fill(9);
        q.submit(
            b,
            QueueOp::Write {
                sector: b * 32,
                buf,
            },
        );
    }
    let taken = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let snap = s.spawn(|| {
            pool.create_snapshot("vm@during").unwrap();
            taken.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !taken.load(std::sync::atomic::Ordering::SeqCst),
            "the snapshot was taken while writes were unfinished"
        );
        let mut done = Vec::new();
        q.drain(&mut done);
        assert_eq!(done.len(), 8);
        snap.join().unwrap();
    });
    // Completed before the snapshot: in it, and in the volume.
    let snap = pool.open_volume("vm@during").unwrap();
    let mut got = vec![0u8; 4096];
    for b in 0..8u64 {
        snap.read(b * 32, &mut got).unwrap();
        assert!(
            got.iter().all(|&x| x == 9),
            "block {} of the snapshot",
            b * 4
        );
    }
}
