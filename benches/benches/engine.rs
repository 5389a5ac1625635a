//! thinlun vs. a raw file on the same file system, in one run.
//!
//! Both sides use O_DIRECT + io_uring (`thinlun::dev::FileDevice`) and
//! 4 KiB-aligned buffers (`thinlun::dev::AlignedBuf`); "queue depth 32" is a
//! batch of 32 requests handed over at once (one `BlockDevice::submit` or
//! one `Volume::submit`).
//!
//! * `rand4k_qd32/raw_read`, `raw_write`: 32 random 4 KiB reads / writes on a
//!   fully written 1 GiB raw file.
//! * `rand4k_qd32/thinlun_read`: 32 random 4 KiB reads of mapped data of a
//!   fully written 1 GiB volume.
//! * `rand4k_qd32/thinlun_overwrite`: 32 random 4 KiB writes to allocated
//!   blocks of that volume.
//! * `rand4k_qd32/thinlun_first_write`: 32 random 4 KiB writes to
//!   never-written blocks of a fresh 1 GiB volume (each block written once,
//!   in random order; when the volume is full it is removed and a fresh one
//!   created, outside the timed region).
//! * `seq1m_qd32/*`: 32 consecutive 1 MiB reads / writes per batch, walking
//!   the 1 GiB raw file / volume (thinlun writes are overwrites).
//!
//! Criterion runs one benchmark after another, so a raw figure and its
//! thinlun counterpart are measured seconds to minutes apart; on a shared or
//! virtual disk whose speed drifts, that alone moves ratios by tens of
//! percent. So after the criterion groups each pair is measured once more,
//! interleaved (100 ms of raw, 100 ms of thinlun, alternating the order, for
//! `THINLUN_BENCH_PAIRED_SECS` seconds per pair, default 4; 0 skips it), and
//! the summary prints both ratios.
//!
//! Files live in `$THINLUN_BENCH_DIR` (default /var/tmp/thinlun-bench) and
//! are removed at the end unless `THINLUN_BENCH_KEEP=1`. The pool file is
//! written fully before the pool is created, as a raw LUN would be, so that
//! file-system block allocation is not part of the figures
//! (`THINLUN_BENCH_SPARSE=1` keeps it sparse instead). Criterion's plots are
//! off (they take seconds each); `THINLUN_BENCH_PLOTS=1` turns them on.

use criterion::{Criterion, SamplingMode, Throughput};
use std::cell::RefCell;
use std::rc::Rc;
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

/// One batch of I/O; returns the time the batch itself took (setup such as
/// recreating an exhausted volume is excluded).
type Op<'a> = Box<dyn FnMut() -> Duration + 'a>;

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

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

// --- the operations ---------------------------------------------------------

/// 32 random 4 KiB reads (`write == false`) or writes on the raw file.
fn raw_random(raw: &FileDevice, write: bool, seed: u64) -> Op<'_> {
    let mut bufs = bufs(QD, BLOCK_SIZE, seed);
    let mut rng = Rng::new(seed);
    Box::new(move || {
        let mut ops: Vec<IoOp> = bufs
            .iter_mut()
            .map(|buf| {
                let offset = rng.below(DATA_BLOCKS) * BS;
                if write {
                    IoOp::Write { offset, buf }
                } else {
                    IoOp::Read { offset, buf }
                }
            })
            .collect();
        timed(|| raw.submit(&mut ops).expect("raw I/O"))
    })
}

/// 32 random 4 KiB reads or writes on a fully written volume.
fn thinlun_random(vol: &Volume, write: bool, seed: u64) -> Op<'_> {
    let mut bufs = bufs(QD, BLOCK_SIZE, seed);
    let mut rng = Rng::new(seed);
    Box::new(move || {
        let mut reqs: Vec<Request> = bufs
            .iter_mut()
            .map(|buf| {
                let sector = rng.below(DATA_BLOCKS) * BS / SECTOR_SIZE;
                if write {
                    Request::Write { sector, data: buf }
                } else {
                    Request::Read { sector, buf }
                }
            })
            .collect();
        timed(|| check_all(vol.submit(&mut reqs)))
    })
}

/// Buffers of the sequential cases, shared by raw and thinlun: a 1 MiB
/// buffer of 4 KiB pages is up to 256 DMA segments, and whether a request
/// must be split (e.g. virtio-blk with max_segments 254) depends on how
/// physically contiguous its pages happen to be; the same buffers on both
/// sides keep that luck out of the ratios.
type SeqBufs = Rc<RefCell<Vec<AlignedBuf>>>;

/// 32 consecutive 1 MiB reads or writes on the raw file, wrapping at its end.
fn raw_seq(raw: &FileDevice, write: bool, bufs: SeqBufs) -> Op<'_> {
    let mut pos = 0u64;
    Box::new(move || {
        let first = pos;
        pos = (pos + QD as u64) % SEQ_PER_PASS;
        let mut bufs = bufs.borrow_mut();
        let mut ops: Vec<IoOp> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| {
                let offset = (first + i as u64) * SEQ as u64;
                if write {
                    IoOp::Write { offset, buf }
                } else {
                    IoOp::Read { offset, buf }
                }
            })
            .collect();
        timed(|| raw.submit(&mut ops).expect("raw I/O"))
    })
}

/// 32 consecutive 1 MiB reads or writes on a volume, wrapping at its end.
fn thinlun_seq(vol: &Volume, write: bool, bufs: SeqBufs) -> Op<'_> {
    let mut pos = 0u64;
    Box::new(move || {
        let first = pos;
        pos = (pos + QD as u64) % SEQ_PER_PASS;
        let mut bufs = bufs.borrow_mut();
        let mut reqs: Vec<Request> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| {
                let sector = (first + i as u64) * SEQ as u64 / SECTOR_SIZE;
                if write {
                    Request::Write { sector, data: buf }
                } else {
                    Request::Read { sector, buf }
                }
            })
            .collect();
        timed(|| check_all(vol.submit(&mut reqs)))
    })
}

/// Volumes filled by first writes in random block order.
struct FirstWrites {
    pool: Pool,
    vol: Option<Volume>,
    generation: u32,
    order: Vec<u32>,
    next: usize,
    rng: Rng,
    data: Vec<AlignedBuf>,
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
            data: bufs(QD, BLOCK_SIZE, 3),
        };
        fw.recycle();
        fw
    }

    /// Replaces the volume by a fresh, empty one.
    fn recycle(&mut self) {
        if self.vol.take().is_some() {
            self.pool
                .remove_volume(&Self::name(self.generation), false)
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

    /// One batch of 32 first writes (the recycling before it is not timed).
    fn batch(&mut self) -> Duration {
        if self.next + QD > self.order.len() {
            self.recycle();
        }
        let vol = self.vol.as_ref().expect("volume open");
        let blocks = &self.order[self.next..self.next + QD];
        let mut reqs: Vec<Request> = blocks
            .iter()
            .zip(&self.data)
            .map(|(&b, d)| Request::Write {
                sector: b as u64 * BS / SECTOR_SIZE,
                data: d,
            })
            .collect();
        let d = timed(|| check_all(vol.submit(&mut reqs)));
        self.next += QD;
        d
    }
}

/// Runs two operations interleaved in `slice`-long turns (ABBA order) for
/// about `total`; returns each one's batches per second of its own time.
fn paired(a: &mut Op<'_>, b: &mut Op<'_>, total: Duration) -> (f64, f64) {
    let slice = Duration::from_millis(100);
    let rounds = (total.as_millis() / (2 * slice.as_millis())).max(1) as usize;
    let mut time = [Duration::ZERO; 2];
    let mut count = [0u64; 2];
    let mut turn = |op: &mut Op<'_>, k: usize| {
        let start = Instant::now();
        while start.elapsed() < slice {
            time[k] += op();
            count[k] += 1;
        }
    };
    // Warm both up first.
    let _ = (a(), b());
    for r in 0..rounds {
        if r % 2 == 0 {
            turn(a, 0);
            turn(b, 1);
        } else {
            turn(b, 1);
            turn(a, 0);
        }
    }
    (
        count[0] as f64 / time[0].as_secs_f64(),
        count[1] as f64 / time[1].as_secs_f64(),
    )
}

fn main() {
    let started = std::time::SystemTime::now();
    let dir = bench_dir();
    let keep = env_flag("THINLUN_BENCH_KEEP");
    let raw_path = dir.join("raw.img");
    let pool_path = dir.join("pool.img");
    // Criterion's test, list and profile modes measure nothing: no pairs.
    let measuring = !std::env::args().any(|a| {
        matches!(a.as_str(), "--test" | "--list" | "--profile-time")
            || a.starts_with("--profile-time=")
    });
    let paired_secs: u64 = if measuring {
        std::env::var("THINLUN_BENCH_PAIRED_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4)
    } else {
        0
    };

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    if !env_flag("THINLUN_BENCH_PLOTS") {
        // Plot rendering costs seconds per benchmark on a small machine.
        c = c.without_plots();
    }
    let mut c = c.configure_from_args();

    // --- setup ------------------------------------------------------------
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
    let sparse = env_flag("THINLUN_BENCH_SPARSE");
    if !sparse {
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
    let seq_bufs: SeqBufs = Rc::new(RefCell::new(bufs(QD, SEQ, 100)));
    {
        let mut fill = thinlun_seq(&full, true, seq_bufs.clone());
        for _ in 0..SEQ_PER_PASS / QD as u64 {
            fill();
        }
    }
    full.flush().expect("flush");
    pool.checkpoint().expect("checkpoint");
    let info = pool.volume_info("full").expect("info");
    eprintln!(
        "setup: raw file {} MiB, pool {} MiB ({}), volume 'full' {} MiB mapped in {} extents; {:.1} s",
        DATA_BYTES >> 20,
        POOL_BYTES >> 20,
        if sparse { "sparse file" } else { "fully written file" },
        info.mapped_bytes >> 20,
        info.extents,
        t.elapsed().as_secs_f64()
    );

    let mut fw = FirstWrites::new(pool.clone());
    // (summary label, group, raw id, raw op, thinlun id, thinlun op)
    let mut cases: Vec<(&str, &str, &str, Op, &str, Op)> = vec![
        (
            "4K random read",
            RAND,
            "raw_read",
            raw_random(&raw, false, 11),
            "thinlun_read",
            thinlun_random(&full, false, 11),
        ),
        (
            "4K random overwrite",
            RAND,
            "raw_write",
            raw_random(&raw, true, 12),
            "thinlun_overwrite",
            thinlun_random(&full, true, 12),
        ),
        (
            "4K random first write",
            RAND,
            "raw_write",
            raw_random(&raw, true, 13),
            "thinlun_first_write",
            Box::new(|| fw.batch()),
        ),
        (
            "1M sequential read",
            SEQG,
            "raw_read",
            raw_seq(&raw, false, seq_bufs.clone()),
            "thinlun_read",
            thinlun_seq(&full, false, seq_bufs.clone()),
        ),
        (
            "1M sequential write",
            SEQG,
            "raw_write",
            raw_seq(&raw, true, seq_bufs.clone()),
            "thinlun_write",
            thinlun_seq(&full, true, seq_bufs.clone()),
        ),
    ];

    // --- criterion ----------------------------------------------------------
    for group in [RAND, SEQG] {
        let mut g = c.benchmark_group(group);
        if group == RAND {
            g.throughput(Throughput::Elements(QD as u64));
        } else {
            g.throughput(Throughput::Bytes((QD * SEQ) as u64));
            g.sampling_mode(SamplingMode::Flat);
        }
        let mut done: Vec<&str> = Vec::new();
        for (_, grp, raw_id, raw_op, tl_id, tl_op) in cases.iter_mut() {
            if *grp != group {
                continue;
            }
            // raw_write serves two cases; measure it once.
            for (id, op) in [(*raw_id, raw_op), (*tl_id, tl_op)] {
                if done.contains(&id) {
                    continue;
                }
                done.push(id);
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| (0..iters).map(|_| op()).sum())
                });
            }
        }
        g.finish();
    }

    // --- interleaved pairs ----------------------------------------------------
    let mut paired_rates = Vec::new();
    if paired_secs > 0 {
        eprintln!("interleaved pairs: {paired_secs} s each");
        for (label, _, _, raw_op, _, tl_op) in cases.iter_mut() {
            paired_rates.push((
                *label,
                paired(raw_op, tl_op, Duration::from_secs(paired_secs)),
            ));
        }
    }
    drop(cases);
    let (fresh_volumes, last_extents) = (
        fw.generation,
        pool.volume_info(&FirstWrites::name(fw.generation))
            .map_or(0, |i| i.extents),
    );
    drop(fw);

    drop(full);
    pool.close().expect("closing the pool");
    drop(raw);
    if !keep {
        remove_if_exists(&raw_path);
        remove_if_exists(&pool_path);
    }
    c.final_summary();
    eprintln!(
        "first writes used {fresh_volumes} fresh volume(s); the last holds {last_extents} extents"
    );
    summary(started, &paired_rates);
}

/// Prints raw vs thinlun side by side: criterion's estimates of this run
/// (read back from its estimates.json) and the interleaved pairs.
fn summary(since: std::time::SystemTime, paired: &[(&str, (f64, f64))]) {
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
    let dir = criterion_dir();
    let per_sec = |group: &str, id: &str, units: f64| {
        dir.as_ref()
            .and_then(|d| criterion_estimate_ns(d, group, id, since))
            .map(|ns| units * 1e9 / ns)
    };
    println!();
    println!("Summary: raw file vs thinlun, QD {QD}, this run");
    println!(
        "{:<22} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | unit",
        "", "criterion", "", "", "paired", "", ""
    );
    println!(
        "{:<22} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} |",
        "case", "raw", "thinlun", "ratio", "raw", "thinlun", "ratio"
    );
    let cell = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.3}", b / a),
        _ => "-".to_string(),
    };
    for (name, group, raw_id, tl_id, units, unit) in rows {
        let (cr, ct) = (per_sec(group, raw_id, units), per_sec(group, tl_id, units));
        let (pr, pt) = paired
            .iter()
            .find(|(l, _)| *l == name)
            .map_or((None, None), |(_, (r, t))| {
                (Some(r * units), Some(t * units))
            });
        println!(
            "{name:<22} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {unit}",
            cell(cr),
            cell(ct),
            ratio(cr, ct),
            cell(pr),
            cell(pt),
            ratio(pr, pt)
        );
    }
    if let Some(d) = dir {
        println!("(criterion data: {})", d.display());
    }
}
