//! The engine's 4 KiB write path, as a small program to run under a
//! profiler (callgrind, perf). See BENCHMARKS.md, "Profile of the write
//! path".
//!
//! ```text
//! cargo build --release -p thinlun-benches --bin profile_write
//! P=target/release/profile_write
//! $P setup                                  # pool + a fully written volume
//! valgrind --tool=callgrind $P first 32 32768
//! valgrind --tool=callgrind $P first 32 0   # the same without the writes
//! ```
//!
//! Modes (`KIND QD COUNT [persist]`), each in a fresh process on the pool
//! that `setup` made:
//! * `first`: COUNT first writes into a fresh volume, every block at most
//!   once in random order (each allocates);
//! * `over`: COUNT random overwrites of the fully written volume `full`;
//! * `cow`: a snapshot of `full`, then COUNT writes into `full`, each to a
//!   different block (each is a copy-on-write of shared data).
//!
//! Writes go in `Volume::submit` batches of QD. With `persist`, every batch
//! is followed by `Volume::persist`, as `thinctl serve` does by default.
//! Each run opens the pool, creates what the mode needs, writes, flushes,
//! removes what it created and closes: a run with COUNT = 0 costs the same
//! minus the writes, so the difference of two runs is the writes alone.

use fastrand::Rng;
use std::time::Instant;
use thinlun::dev::AlignedBuf;
use thinlun::{OpenOptions, Pool, PoolConfig, Request, Volume, SECTOR_SIZE};
use thinlun_benches::{bench_dir, fill_pattern, write_full_file};

const BLOCK: usize = 4096;
const VOL_BYTES: u64 = 1 << 30;
const FULL_BYTES: u64 = 256 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = bench_dir().join("profile-pool.img");
    let usage = "usage: profile_write setup | (first|over|cow) QD COUNT [persist] | clean";
    match args.first().map(String::as_str) {
        Some("setup") => setup(&path),
        Some("clean") => thinlun_benches::remove_if_exists(&path),
        Some(kind @ ("first" | "over" | "cow")) => {
            let qd: usize = args.get(1).and_then(|s| s.parse().ok()).expect(usage);
            let count: usize = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
            let persist = args.get(3).is_some_and(|s| s == "persist");
            run(&path, kind, qd.max(1), count, persist);
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}

fn setup(path: &std::path::Path) {
    let bytes = VOL_BYTES + FULL_BYTES + (256 << 20);
    write_full_file(path, bytes).expect("writing the pool file");
    let pool = Pool::create_path(
        path,
        &PoolConfig {
            size_bytes: Some(bytes),
            force: true,
            ..PoolConfig::default()
        },
    )
    .expect("creating the pool");
    pool.create_volume("full", FULL_BYTES).expect("volume");
    let v = pool.open_volume("full").expect("open");
    let mut buf = AlignedBuf::zeroed(1 << 20);
    fill_pattern(&mut buf, 1);
    for i in 0..FULL_BYTES >> 20 {
        let mut r = [Request::Write {
            sector: (i << 20) / SECTOR_SIZE,
            data: &mut buf,
        }];
        for x in v.submit(&mut r) {
            x.expect("write");
        }
    }
    v.flush().expect("flush");
    drop(v);
    pool.close().expect("close");
    eprintln!("pool at {}", path.display());
}

fn run(path: &std::path::Path, kind: &str, qd: usize, count: usize, persist: bool) {
    let pool = Pool::open_path(path, &OpenOptions::default()).expect("opening the pool");
    let (vol, blocks, cleanup) = match kind {
        "first" => {
            pool.create_volume("fresh", VOL_BYTES).expect("volume");
            ("fresh", VOL_BYTES / BLOCK as u64, Some("fresh"))
        }
        "cow" => {
            pool.create_snapshot("full@p").expect("snapshot");
            ("full", FULL_BYTES / BLOCK as u64, Some("full@p"))
        }
        _ => ("full", FULL_BYTES / BLOCK as u64, None),
    };
    let v = pool.open_volume(vol).expect("opening the volume");
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut rng = Rng::with_seed(7);
    if kind == "over" {
        order = (0..count).map(|_| rng.u64(..blocks)).collect();
    } else {
        rng.shuffle(&mut order);
        assert!(count as u64 <= blocks, "COUNT is at most {blocks} here");
        order.truncate(count);
    }
    let t = Instant::now();
    writes(&v, &order, qd, persist);
    let secs = t.elapsed().as_secs_f64();
    v.flush().expect("flush");
    drop(v);
    if let Some(name) = cleanup {
        pool.remove_volume(name, false).expect("cleaning up");
    }
    pool.close().expect("close");
    eprintln!(
        "{kind}: {count} writes of 4 KiB in batches of {qd}{} in {secs:.2} s",
        if persist { ", persist after each" } else { "" }
    );
}

/// The measured part: `Volume::submit` batches of `qd` 4 KiB writes at
/// the blocks of `order`.
#[inline(never)]
fn writes(v: &Volume, order: &[u64], qd: usize, persist: bool) {
    let mut bufs: Vec<AlignedBuf> = (0..qd)
        .map(|i| {
            let mut b = AlignedBuf::zeroed(BLOCK);
            fill_pattern(&mut b, 0x5555 + i as u64);
            b
        })
        .collect();
    for chunk in order.chunks(qd) {
        let mut reqs: Vec<Request> = bufs
            .iter_mut()
            .zip(chunk)
            .map(|(b, &blk)| Request::Write {
                sector: blk * (BLOCK as u64 / SECTOR_SIZE),
                data: b,
            })
            .collect();
        for r in v.submit(&mut reqs) {
            r.expect("write");
        }
        if persist {
            v.persist().expect("persist");
        }
    }
}
