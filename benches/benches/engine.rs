//! thinlun vs. a raw file on the same file system, in one run.
//!
//! Both sides use O_DIRECT + io_uring (`thinlun::dev::FileDevice`) and
//! 4 KiB-aligned buffers; "queue depth 32" is a batch of 32 requests handed
//! over at once (one `BlockDevice::submit` or one `Volume::submit`).
//!
//! * `rand4k_qd32/raw_read`, `raw_write`: 32 random 4 KiB reads / writes on a
//!   fully written 1 GiB raw file.
//! * `rand4k_qd32/thinlun_read`: 32 random 4 KiB reads of mapped data of a
//!   fully written 1 GiB volume.
//! * `rand4k_qd32/thinlun_overwrite`: 32 random 4 KiB writes to allocated
//!   blocks of that volume.
//! * `rand4k_qd32/thinlun_first_write`: 32 random 4 KiB writes to
//!   never-written blocks of a fresh 1 GiB volume (each block written once,
//!   in random order; when the volume is full it is removed and recreated
//!   outside the timed region).
//! * `seq1m_qd32/*`: 32 consecutive 1 MiB reads / writes per batch, walking
//!   the 1 GiB raw file / volume (thinlun writes are overwrites).
//!
//! Files live in `$THINLUN_BENCH_DIR` (default /var/tmp/thinlun-bench) and
//! are removed at the end unless `THINLUN_BENCH_KEEP=1`. The pool file is
//! written fully before the pool is created, as a raw LUN would be, so that
//! file-system block allocation is not part of the figures
//! (`THINLUN_BENCH_SPARSE=1` keeps it sparse instead).

use criterion::{Criterion, SamplingMode, Throughput};
use std::path::Path;
use std::time::{Duration, Instant};
use thinlun::dev::{AlignedBuf, BlockDevice, FileDevice, IoOp};
use thinlun::{Pool, PoolConfig, Request, Volume, BLOCK_SIZE, SECTOR_SIZE};
use thinlun_benches::{
    bench_dir, criterion_dir, criterion_estimate_ns, fill_pattern, remove_if_exists,
    write_full_file, Rng,
};

/// Requests per batch (the queue depth).
const QD: usize = 32;
const BS: u64 = BLOCK_SIZE as u64;
/// Size of the raw file and of each volume.
const DATA_BYTES: u64 = 1 << 30;
const DATA_BLOCKS: u64 = DATA_BYTES / BS;
/// The pool: the full volume, a first-write volume, metadata and headroom.
const POOL_BYTES: u64 = 3 << 30;
/// Sequential request size.
const SEQ: usize = 1 << 20;
const SEQ_PER_PASS: u64 = DATA_BYTES / SEQ as u64;

const RAND: &str = "rand4k_qd32";
const SEQG: &str = "seq1m_qd32";

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn bufs(n: usize, len: usize, seed: u64) -> Vec<AlignedBuf> {
    (0..n)
        .map(|i| {
            let mut b = AlignedBuf::zeroed(len);
            fill_pattern(&mut b, seed + i as u64);
            b
        })
        .collect()
}

fn check_all(results: Vec<thinlun::Result<()>>) {
    for r in results {
        if let Err(e) = r {
            panic!("thinlun request failed: {e}");
        }
    }
}

/// A volume being filled by first writes in random block order.
struct FirstWrites {
    pool: Pool,
    vol: Option<Volume>,
    generation: u32,
    order: Vec<u32>,
    next: usize,
    rng: Rng,
}

impl FirstWrites {
    fn name(g: u32) -> String {
        format!("fresh-{g}")
    }

    fn new(pool: Pool) -> FirstWrites {
        let mut fw = FirstWrites {
            pool,
            vol: None,
            generation: 0,
            order: (0..DATA_BLOCKS as u32).collect(),
            next: 0,
            rng: Rng::new(0xf1457),
        };
        fw.recycle();
        fw
    }

    /// Replaces the volume by a fresh, empty one (not timed).
    fn recycle(&mut self) {
        if self.vol.take().is_some() {
            self.pool
                .remove_volume(&Self::name(self.generation))
                .expect("removing the filled volume");
        }
        self.generation += 1;
        let name = Self::name(self.generation);
        self.pool
            .create_volume(&name, DATA_BYTES)
            .expect("creating a fresh volume");
        self.vol = Some(self.pool.open_volume(&name).expect("opening it"));
        self.rng.shuffle(&mut self.order);
        self.next = 0;
    }

    fn batches_left(&self) -> u64 {
        ((self.order.len() - self.next) / QD) as u64
    }

    fn run(&mut self, iters: u64, data: &[AlignedBuf]) -> Duration {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            if self.batches_left() == 0 {
                self.recycle();
            }
            let n = self.batches_left().min(iters - done);
            let vol = self.vol.as_ref().expect("volume open");
            let t = Instant::now();
            for _ in 0..n {
                let blocks = &self.order[self.next..self.next + QD];
                let mut reqs: Vec<Request> = blocks
                    .iter()
                    .zip(data)
                    .map(|(&b, d)| Request::Write {
                        sector: b as u64 * BS / SECTOR_SIZE,
                        data: &d[..],
                    })
                    .collect();
                check_all(vol.submit(&mut reqs));
                self.next += QD;
            }
            total += t.elapsed();
            done += n;
        }
        total
    }
}

fn main() {
    let started = std::time::SystemTime::now();
    let dir = bench_dir();
    let keep = env_flag("THINLUN_BENCH_KEEP");
    let raw_path = dir.join("raw.img");
    let pool_path = dir.join("pool.img");

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    // --- setup --------------------------------------------------------
    let t = Instant::now();
    write_full_file(&raw_path, DATA_BYTES).expect("writing the raw file");
    let raw = FileDevice::open(&raw_path, true).expect("opening the raw file");
    if !raw.is_direct() {
        eprintln!(
            "WARNING: O_DIRECT unavailable on {}: figures measure the page cache",
            dir.display()
        );
    }
    remove_if_exists(&pool_path);
    if !env_flag("THINLUN_BENCH_SPARSE") {
        write_full_file(&pool_path, POOL_BYTES).expect("writing the pool file");
    }
    let pool = Pool::create_path(
        &pool_path,
        &PoolConfig {
            size_bytes: Some(POOL_BYTES),
            force: true,
            ..PoolConfig::default()
        },
    )
    .expect("creating the pool");
    pool.create_volume("full", DATA_BYTES)
        .expect("creating volume");
    let full = pool.open_volume("full").expect("opening volume");
    let mut seq_bufs = bufs(QD, SEQ, 100);
    for batch in 0..SEQ_PER_PASS / QD as u64 {
        let mut reqs: Vec<Request> = seq_bufs
            .iter()
            .enumerate()
            .map(|(i, d)| Request::Write {
                sector: (batch * QD as u64 + i as u64) * SEQ as u64 / SECTOR_SIZE,
                data: &d[..],
            })
            .collect();
        check_all(full.submit(&mut reqs));
    }
    full.flush().expect("flush");
    pool.checkpoint().expect("checkpoint");
    let info = pool.volume_info("full").expect("info");
    eprintln!(
        "setup: raw file {} MiB, pool {} MiB ({}), volume 'full' {} MiB mapped in {} extents; {:.1} s",
        DATA_BYTES >> 20,
        POOL_BYTES >> 20,
        if env_flag("THINLUN_BENCH_SPARSE") { "sparse file" } else { "fully written file" },
        info.mapped_bytes >> 20,
        info.extents,
        t.elapsed().as_secs_f64()
    );

    // --- random 4 KiB, QD 32 -------------------------------------------
    let mut rbufs = bufs(QD, BLOCK_SIZE, 1);
    let wbufs = bufs(QD, BLOCK_SIZE, 2);
    {
        let mut g = c.benchmark_group(RAND);
        g.throughput(Throughput::Elements(QD as u64));

        let mut rng = Rng::new(11);
        g.bench_function("raw_read", |b| {
            b.iter(|| {
                let mut ops: Vec<IoOp> = rbufs
                    .iter_mut()
                    .map(|buf| IoOp::Read {
                        offset: rng.below(DATA_BLOCKS) * BS,
                        buf: &mut buf[..],
                    })
                    .collect();
                raw.submit(&mut ops).expect("raw read");
            })
        });
        let mut rng = Rng::new(11);
        g.bench_function("thinlun_read", |b| {
            b.iter(|| {
                let mut reqs: Vec<Request> = rbufs
                    .iter_mut()
                    .map(|buf| Request::Read {
                        sector: rng.below(DATA_BLOCKS) * BS / SECTOR_SIZE,
                        buf: &mut buf[..],
                    })
                    .collect();
                check_all(full.submit(&mut reqs));
            })
        });
        let mut rng = Rng::new(12);
        g.bench_function("raw_write", |b| {
            b.iter(|| {
                let mut ops: Vec<IoOp> = wbufs
                    .iter()
                    .map(|buf| IoOp::Write {
                        offset: rng.below(DATA_BLOCKS) * BS,
                        buf: &buf[..],
                    })
                    .collect();
                raw.submit(&mut ops).expect("raw write");
            })
        });
        let mut rng = Rng::new(12);
        g.bench_function("thinlun_overwrite", |b| {
            b.iter(|| {
                let mut reqs: Vec<Request> = wbufs
                    .iter()
                    .map(|buf| Request::Write {
                        sector: rng.below(DATA_BLOCKS) * BS / SECTOR_SIZE,
                        data: &buf[..],
                    })
                    .collect();
                check_all(full.submit(&mut reqs));
            })
        });
        let mut fw = FirstWrites::new(pool.clone());
        g.bench_function("thinlun_first_write", |b| {
            b.iter_custom(|iters| fw.run(iters, &wbufs))
        });
        g.finish();
        let vols = fw.generation;
        let extents = pool
            .volume_info(&FirstWrites::name(fw.generation))
            .map(|i| i.extents)
            .unwrap_or(0);
        drop(fw);
        eprintln!("first writes: {vols} fresh volume(s) used; the last holds {extents} extents");
    }

    // --- sequential 1 MiB, QD 32 ---------------------------------------
    {
        let mut g = c.benchmark_group(SEQG);
        g.throughput(Throughput::Bytes((QD * SEQ) as u64));
        g.sampling_mode(SamplingMode::Flat);
        let seq_req = |pos: &mut u64| {
            let first = *pos;
            *pos = (*pos + QD as u64) % SEQ_PER_PASS;
            (0..QD as u64).map(move |i| (first + i) * SEQ as u64)
        };
        let mut pos = 0;
        g.bench_function("raw_read", |b| {
            b.iter(|| {
                let mut ops: Vec<IoOp> = seq_bufs
                    .iter_mut()
                    .zip(seq_req(&mut pos))
                    .map(|(buf, offset)| IoOp::Read {
                        offset,
                        buf: &mut buf[..],
                    })
                    .collect();
                raw.submit(&mut ops).expect("raw read");
            })
        });
        let mut pos = 0;
        g.bench_function("thinlun_read", |b| {
            b.iter(|| {
                let mut reqs: Vec<Request> = seq_bufs
                    .iter_mut()
                    .zip(seq_req(&mut pos))
                    .map(|(buf, offset)| Request::Read {
                        sector: offset / SECTOR_SIZE,
                        buf: &mut buf[..],
                    })
                    .collect();
                check_all(full.submit(&mut reqs));
            })
        });
        let mut pos = 0;
        g.bench_function("raw_write", |b| {
            b.iter(|| {
                let mut ops: Vec<IoOp> = seq_bufs
                    .iter()
                    .zip(seq_req(&mut pos))
                    .map(|(buf, offset)| IoOp::Write {
                        offset,
                        buf: &buf[..],
                    })
                    .collect();
                raw.submit(&mut ops).expect("raw write");
            })
        });
        let mut pos = 0;
        g.bench_function("thinlun_write", |b| {
            b.iter(|| {
                let mut reqs: Vec<Request> = seq_bufs
                    .iter()
                    .zip(seq_req(&mut pos))
                    .map(|(buf, offset)| Request::Write {
                        sector: offset / SECTOR_SIZE,
                        data: &buf[..],
                    })
                    .collect();
                check_all(full.submit(&mut reqs));
            })
        });
        g.finish();
    }

    drop(full);
    pool.close().expect("closing the pool");
    drop(raw);
    if !keep {
        remove_if_exists(&raw_path);
        remove_if_exists(&pool_path);
    }
    c.final_summary();
    summary(started);
}

/// Prints raw vs thinlun side by side from criterion's saved estimates.
fn summary(since: std::time::SystemTime) {
    let Some(dir) = criterion_dir() else { return };
    let per_sec = |group: &str, id: &str, units: f64| {
        criterion_estimate_ns(&dir, group, id, since).map(|ns| units * 1e9 / ns)
    };
    let qd = QD as f64;
    let mib = (QD * SEQ) as f64 / (1 << 20) as f64;
    let rows: [(&str, &str, &str, &str, f64, &str); 5] = [
        (
            "4K random read",
            RAND,
            "raw_read",
            "thinlun_read",
            qd,
            "ops/s",
        ),
        (
            "4K random overwrite",
            RAND,
            "raw_write",
            "thinlun_overwrite",
            qd,
            "ops/s",
        ),
        (
            "4K random first write",
            RAND,
            "raw_write",
            "thinlun_first_write",
            qd,
            "ops/s",
        ),
        (
            "1M sequential read",
            SEQG,
            "raw_read",
            "thinlun_read",
            mib,
            "MiB/s",
        ),
        (
            "1M sequential write",
            SEQG,
            "raw_write",
            "thinlun_write",
            mib,
            "MiB/s",
        ),
    ];
    println!();
    println!("Summary (QD {QD}; criterion point estimates of this run)");
    println!(
        "{:<24} {:>14} {:>14} {:>8}  unit",
        "case", "raw", "thinlun", "ratio"
    );
    for (name, group, raw_id, tl_id, units, unit) in rows {
        match (per_sec(group, raw_id, units), per_sec(group, tl_id, units)) {
            (Some(r), Some(t)) => println!("{name:<24} {r:>14.0} {t:>14.0} {:>8.3}  {unit}", t / r),
            _ => println!("{name:<24} {:>14} (not run)", ""),
        }
    }
    if let Some(p) = Path::new(&dir).to_str() {
        println!("(criterion data: {p})");
    }
}
