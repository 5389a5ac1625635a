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
//! * `rand4k_qd32/thinlun_cow_write`: 32 random 4 KiB writes to a fully
//!   written 1 GiB volume right after a snapshot of it: each block is
//!   written once after the snapshot, so every write is a copy-on-write of
//!   shared data; when every block has been written, the snapshot is
//!   removed and a new one taken, outside the timed region.
//! * `rand4k_qd32/raw_read_kept_full`, `raw_write_kept_full`,
//!   `thinlun_read_queue`, `thinlun_overwrite_queue`: 32 random 4 KiB
//!   reads / overwrites per iteration with 32 kept in flight throughout, as
//!   fio's `iodepth` does: on the raw file through a `thinlun::dev::Ring`,
//!   on the fully written volume through an `IoQueue` (each request
//!   completes on its own; the engine's streaming path).
//! * `rand4k_flush8/*`: 8 random 4 KiB writes followed by a flush, as a
//!   database commits: raw is 8 writes then `fdatasync`; thinlun is one
//!   `Volume::submit` of 8 `Request::Write` and a `Request::Flush`, as
//!   overwrites of the fully written volume (`thinlun_overwrite_flush`) and
//!   as first writes (`thinlun_first_write_flush`, whose flush also commits
//!   the journal).
//! * `seq1m_qd32/*`: 32 consecutive 1 MiB reads / writes per batch, walking
//!   the 1 GiB raw file / volume (thinlun writes are overwrites).
//! * `snapshot/create_1g`: `Pool::create_snapshot` of the fully written
//!   1 GiB volume (the snapshot is removed again outside the timed region).
//! * `snapshot/create_1t_1m`: the same for the 1 TiB volume with a million
//!   extents of the `scale` report, in the pool file that
//!   `THINLUN_BENCH_SCALE_POOL` names (skipped when unset; see the README
//!   for how to make one).
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
use fastrand::Rng;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};
use thinlun::dev::{AlignedBuf, BlockDevice, FileDevice, IoOp, RawOp, Ring};
use thinlun::{
    IoQueue, OpenOptions, Pool, PoolConfig, QueueOp, Request, Volume, BLOCK_SIZE, SECTOR_SIZE,
};
use thinlun_benches::{
    bench_dir, criterion_dir, criterion_estimate_ns, fill_pattern, remove_if_exists,
    write_full_file,
};

/// Requests per batch (the queue depth).
const QD: usize = 32;
/// Writes per flush in the flush-heavy cases.
const FLUSH_EVERY: usize = 8;
const BS: u64 = BLOCK_SIZE as u64;
/// Size of the raw file and of each volume.
const DATA_BYTES: u64 = 1 << 30;
const DATA_BLOCKS: u64 = DATA_BYTES / BS;
/// The pool: the fully written volume, two first-write volumes, the
/// copy-on-write volume and its snapshot (which ends up holding 1 GiB of
/// its own), metadata and headroom.
const POOL_BYTES: u64 = 6 << 30;
/// Sequential request size.
const SEQ: usize = 1 << 20;
const SEQ_PER_PASS: u64 = DATA_BYTES / SEQ as u64;

const RAND: &str = "rand4k_qd32";
const FLUSHG: &str = "rand4k_flush8";
const SEQG: &str = "seq1m_qd32";
const SNAPG: &str = "snapshot";
const SNAP_ID: &str = "create_1g";
const SNAP_BIG_ID: &str = "create_1t_1m";
/// The volume of the `scale` report's pool (1 TiB, a million extents).
const SCALE_VOLUME: &str = "scale";

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

/// `n` random 4 KiB reads (`write == false`) or writes on the raw file; with
/// `flush`, followed by an `fdatasync` (`BlockDevice::flush`).
fn raw_random(raw: &FileDevice, n: usize, write: bool, flush: bool, seed: u64) -> Op<'_> {
    let mut bufs = bufs(n, BLOCK_SIZE, seed);
    let mut rng = Rng::with_seed(seed);
    Box::new(move || {
        let mut ops: Vec<IoOp> = bufs
            .iter_mut()
            .map(|buf| {
                let offset = rng.u64(..DATA_BLOCKS) * BS;
                if write {
                    IoOp::Write { offset, buf }
                } else {
                    IoOp::Read { offset, buf }
                }
            })
            .collect();
        timed(|| {
            raw.submit(&mut ops).expect("raw I/O");
            if flush {
                raw.flush().expect("raw fdatasync");
            }
        })
    })
}

/// `n` random 4 KiB reads or writes on a fully written volume; with
/// `flush`, a `Request::Flush` ends the batch.
fn thinlun_random(vol: &Volume, n: usize, write: bool, flush: bool, seed: u64) -> Op<'_> {
    let mut bufs = bufs(n, BLOCK_SIZE, seed);
    let mut rng = Rng::with_seed(seed);
    Box::new(move || {
        let mut reqs: Vec<Request> = bufs
            .iter_mut()
            .map(|buf| {
                let sector = rng.u64(..DATA_BLOCKS) * BS / SECTOR_SIZE;
                if write {
                    Request::Write { sector, data: buf }
                } else {
                    Request::Read { sector, buf }
                }
            })
            .collect();
        if flush {
            reqs.push(Request::Flush);
        }
        timed(|| check_all(vol.submit(&mut reqs)))
    })
}

/// Requests per iteration of the kept-full cases (the group's throughput
/// unit); the queue stays full from one iteration to the next.
const KEPT: usize = QD;

/// Random 4 KiB reads or writes on the raw file with `QD` kept in flight
/// across iterations.
struct RawKeptFull {
    /// Declared first: dropped (waiting for the kernel) before the buffers.
    ring: Ring,
    bufs: Vec<AlignedBuf>,
    free: Vec<usize>,
    rng: Rng,
    write: bool,
}

impl RawKeptFull {
    fn new(raw: &FileDevice, write: bool, seed: u64) -> RawKeptFull {
        let ring = raw
            .ring(2 * QD as u32)
            .expect("a file device has a ring")
            .expect("setting up the ring");
        RawKeptFull {
            ring,
            bufs: bufs(QD, BLOCK_SIZE, seed),
            free: (0..QD).collect(),
            rng: Rng::with_seed(seed),
            write,
        }
    }

    /// Completes `KEPT` requests, refilling as they complete.
    fn run(&mut self) -> Duration {
        let mut done = Vec::new();
        let mut completed = 0;
        let t = Instant::now();
        while completed < KEPT {
            while let Some(i) = self.free.pop() {
                let op = RawOp {
                    write: self.write,
                    offset: self.rng.u64(..DATA_BLOCKS) * BS,
                    ptr: self.bufs[i].as_mut_ptr(),
                    len: BLOCK_SIZE,
                };
                // SAFETY: buffer `i` is owned by this struct, which keeps it
                // until the ring has returned its completion (`free` holds
                // only buffers not in flight), and the ring is dropped
                // (waiting for the kernel) before the buffers.
                unsafe { self.ring.push(op, i as u64) }.expect("raw I/O");
                self.ring.submit().expect("raw I/O");
            }
            self.ring.reap(1, &mut done).expect("raw I/O");
            for (i, r) in done.drain(..) {
                r.expect("raw I/O");
                self.free.push(i as usize);
                completed += 1;
            }
        }
        t.elapsed()
    }
}

/// The same on a volume through an `IoQueue`.
fn thinlun_kept_full(vol: &Volume, write: bool, seed: u64) -> Op<'_> {
    let mut q: IoQueue<AlignedBuf> = vol.queue(QD).expect("setting up the queue");
    let mut free = bufs(QD, BLOCK_SIZE, seed);
    let mut rng = Rng::with_seed(seed);
    let mut done = Vec::new();
    Box::new(move || {
        let mut completed = 0;
        let t = Instant::now();
        while completed < KEPT {
            while let Some(buf) = free.pop() {
                let sector = rng.u64(..DATA_BLOCKS) * BS / SECTOR_SIZE;
                let op = if write {
                    QueueOp::Write { sector, buf }
                } else {
                    QueueOp::Read { sector, buf }
                };
                q.submit(0, op);
            }
            q.complete(1, &mut done);
            for c in done.drain(..) {
                if let Err(e) = c.result {
                    panic!("thinlun request failed: {e}");
                }
                if let QueueOp::Read { buf, .. } | QueueOp::Write { buf, .. } = c.op {
                    free.push(buf);
                }
                completed += 1;
            }
        }
        t.elapsed()
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

/// Writes `vol` completely with 1 MiB writes, then flushes.
fn fill_volume(vol: &Volume, bufs: &SeqBufs) {
    let mut fill = thinlun_seq(vol, true, bufs.clone());
    for _ in 0..SEQ_PER_PASS / QD as u64 {
        fill();
    }
    vol.flush().expect("flush");
}

/// Writes each block of a volume once, in random order, in batches: into
/// fresh volumes (first writes: when one is full it is removed and a new
/// one created) or into a fully written volume right after a snapshot of
/// it (copy-on-write: when every block has been written once, the snapshot
/// is removed and a new one taken). The recycling is not timed.
struct OnceEach {
    pool: Pool,
    kind: Kind,
    vol: Option<Volume>,
    generation: u32,
    order: Vec<u32>,
    next: usize,
    rng: Rng,
    data: Vec<AlignedBuf>,
    /// Requests per batch; `flush` ends each batch with `Request::Flush`.
    n: usize,
    flush: bool,
}

enum Kind {
    /// Fresh volumes named `{prefix}-{generation}`.
    Fresh(&'static str),
    /// Snapshots `{volume}@s{generation}` of this (fully written) volume.
    Snapshot(&'static str),
}

impl OnceEach {
    fn new(pool: Pool, kind: Kind, n: usize, flush: bool, seed: u64) -> OnceEach {
        let vol = match kind {
            Kind::Fresh(_) => None,
            Kind::Snapshot(v) => Some(pool.open_volume(v).expect("opening the volume")),
        };
        let mut o = OnceEach {
            pool,
            kind,
            vol,
            generation: 0,
            order: (0..DATA_BLOCKS as u32).collect(),
            next: 0,
            rng: Rng::with_seed(seed),
            data: bufs(n, BLOCK_SIZE, seed),
            n,
            flush,
        };
        o.recycle();
        o
    }

    /// The name of what generation `g` creates (a volume or a snapshot).
    fn name(&self, g: u32) -> String {
        match self.kind {
            Kind::Fresh(prefix) => format!("{prefix}-{g}"),
            Kind::Snapshot(vol) => format!("{vol}@s{g}"),
        }
    }

    /// Starts a new round: a fresh volume, or a new snapshot in place of
    /// the old one.
    fn recycle(&mut self) {
        if self.generation > 0 {
            if let Kind::Fresh(_) = self.kind {
                self.vol = None;
            }
            self.pool
                .remove_volume(&self.name(self.generation), false)
                .expect("removing the previous round's volume or snapshot");
        }
        self.generation += 1;
        let name = self.name(self.generation);
        match self.kind {
            Kind::Fresh(_) => {
                self.pool
                    .create_volume(&name, DATA_BYTES)
                    .expect("creating a fresh volume");
                self.vol = Some(self.pool.open_volume(&name).expect("opening it"));
            }
            Kind::Snapshot(_) => {
                self.pool
                    .create_snapshot(&name)
                    .expect("creating a snapshot");
            }
        }
        self.rng.shuffle(&mut self.order);
        self.next = 0;
    }

    /// One batch (the recycling before it is not timed).
    fn batch(&mut self) -> Duration {
        if self.next + self.n > self.order.len() {
            self.recycle();
        }
        let vol = self.vol.as_ref().expect("volume open");
        let blocks = &self.order[self.next..self.next + self.n];
        let mut reqs: Vec<Request> = blocks
            .iter()
            .zip(&self.data)
            .map(|(&b, d)| Request::Write {
                sector: b as u64 * BS / SECTOR_SIZE,
                data: d,
            })
            .collect();
        if self.flush {
            reqs.push(Request::Flush);
        }
        let d = timed(|| check_all(vol.submit(&mut reqs)));
        self.next += self.n;
        d
    }

    /// Rounds begun, and the extents of the current volume.
    fn describe(&self) -> String {
        let vol = match self.kind {
            Kind::Fresh(_) => self.name(self.generation),
            Kind::Snapshot(v) => v.to_string(),
        };
        let extents = self.pool.volume_info(&vol).map_or(0, |i| i.extents);
        let what = match self.kind {
            Kind::Fresh(_) => "fresh volume(s)",
            Kind::Snapshot(_) => "snapshot(s)",
        };
        format!(
            "{} {what}; '{vol}' holds {extents} extents",
            self.generation
        )
    }
}

/// What one raw/thinlun pair is and how its figures are shown.
#[derive(Clone, Copy)]
struct Meta {
    label: &'static str,
    group: &'static str,
    raw_id: &'static str,
    tl_id: &'static str,
    /// Units per batch (requests, or MiB) and their name.
    per_batch: f64,
    unit: &'static str,
}

struct Case<'a> {
    meta: Meta,
    raw: Op<'a>,
    tl: Op<'a>,
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
    let seq_bufs: SeqBufs = Rc::new(RefCell::new(bufs(QD, SEQ, 100)));
    for name in ["full", "cow"] {
        pool.create_volume(name, DATA_BYTES)
            .expect("creating volume");
        let v = pool.open_volume(name).expect("opening volume");
        fill_volume(&v, &seq_bufs);
    }
    let full = pool.open_volume("full").expect("opening volume");
    pool.checkpoint().expect("checkpoint");
    let info = pool.volume_info("full").expect("info");
    eprintln!(
        "setup: raw file {} MiB, pool {} MiB ({}), volumes 'full' and 'cow' {} MiB mapped \
         in {} extents each; {:.1} s",
        DATA_BYTES >> 20,
        POOL_BYTES >> 20,
        if sparse {
            "sparse file"
        } else {
            "fully written file"
        },
        info.mapped_bytes >> 20,
        info.extents,
        t.elapsed().as_secs_f64()
    );

    let mut fw = OnceEach::new(pool.clone(), Kind::Fresh("fresh"), QD, false, 0xf1457);
    let mut fwf = OnceEach::new(
        pool.clone(),
        Kind::Fresh("fresh-flush"),
        FLUSH_EVERY,
        true,
        0xf1458,
    );
    let mut cow = OnceEach::new(pool.clone(), Kind::Snapshot("cow"), QD, false, 0xc0c0);
    let meta = |label, group, raw_id, tl_id, per_batch, unit| Meta {
        label,
        group,
        raw_id,
        tl_id,
        per_batch,
        unit,
    };
    let (qd, f8) = (QD as f64, FLUSH_EVERY as f64);
    let mib = (QD * SEQ) as f64 / (1 << 20) as f64;
    let mut cases: Vec<Case> = vec![
        Case {
            meta: meta(
                "4K random read",
                RAND,
                "raw_read",
                "thinlun_read",
                qd,
                "ops/s",
            ),
            raw: raw_random(&raw, QD, false, false, 11),
            tl: thinlun_random(&full, QD, false, false, 11),
        },
        Case {
            meta: meta(
                "4K random overwrite",
                RAND,
                "raw_write",
                "thinlun_overwrite",
                qd,
                "ops/s",
            ),
            raw: raw_random(&raw, QD, true, false, 12),
            tl: thinlun_random(&full, QD, true, false, 12),
        },
        Case {
            meta: meta(
                "4K read, kept 32 deep",
                RAND,
                "raw_read_kept_full",
                "thinlun_read_queue",
                KEPT as f64,
                "ops/s",
            ),
            raw: {
                let mut r = RawKeptFull::new(&raw, false, 15);
                Box::new(move || r.run())
            },
            tl: thinlun_kept_full(&full, false, 15),
        },
        Case {
            meta: meta(
                "4K overwrite, kept 32 deep",
                RAND,
                "raw_write_kept_full",
                "thinlun_overwrite_queue",
                KEPT as f64,
                "ops/s",
            ),
            raw: {
                let mut r = RawKeptFull::new(&raw, true, 16);
                Box::new(move || r.run())
            },
            tl: thinlun_kept_full(&full, true, 16),
        },
        Case {
            meta: meta(
                "4K random first write",
                RAND,
                "raw_write",
                "thinlun_first_write",
                qd,
                "ops/s",
            ),
            raw: raw_random(&raw, QD, true, false, 13),
            tl: Box::new(|| fw.batch()),
        },
        Case {
            meta: meta(
                "4K random write after snapshot",
                RAND,
                "raw_write",
                "thinlun_cow_write",
                qd,
                "ops/s",
            ),
            raw: raw_random(&raw, QD, true, false, 14),
            tl: Box::new(|| cow.batch()),
        },
        Case {
            meta: meta(
                "4K overwrite, flush every 8",
                FLUSHG,
                "raw_write_fdatasync",
                "thinlun_overwrite_flush",
                f8,
                "ops/s",
            ),
            raw: raw_random(&raw, FLUSH_EVERY, true, true, 15),
            tl: thinlun_random(&full, FLUSH_EVERY, true, true, 15),
        },
        Case {
            meta: meta(
                "4K first write, flush every 8",
                FLUSHG,
                "raw_write_fdatasync",
                "thinlun_first_write_flush",
                f8,
                "ops/s",
            ),
            raw: raw_random(&raw, FLUSH_EVERY, true, true, 16),
            tl: Box::new(|| fwf.batch()),
        },
        Case {
            meta: meta(
                "1M sequential read",
                SEQG,
                "raw_read",
                "thinlun_read",
                mib,
                "MiB/s",
            ),
            raw: raw_seq(&raw, false, seq_bufs.clone()),
            tl: thinlun_seq(&full, false, seq_bufs.clone()),
        },
        Case {
            meta: meta(
                "1M sequential write",
                SEQG,
                "raw_write",
                "thinlun_write",
                mib,
                "MiB/s",
            ),
            raw: raw_seq(&raw, true, seq_bufs.clone()),
            tl: thinlun_seq(&full, true, seq_bufs.clone()),
        },
    ];
    let metas: Vec<Meta> = cases.iter().map(|c| c.meta).collect();

    // --- criterion ----------------------------------------------------------
    for group in [RAND, FLUSHG, SEQG] {
        let mut g = c.benchmark_group(group);
        match group {
            RAND => g.throughput(Throughput::Elements(QD as u64)),
            FLUSHG => g.throughput(Throughput::Elements(FLUSH_EVERY as u64)),
            _ => {
                g.sampling_mode(SamplingMode::Flat);
                g.throughput(Throughput::Bytes((QD * SEQ) as u64))
            }
        };
        let mut done: Vec<&str> = Vec::new();
        for case in cases.iter_mut().filter(|c| c.meta.group == group) {
            // raw_write serves several cases; measure it once.
            for (id, op) in [
                (case.meta.raw_id, &mut case.raw),
                (case.meta.tl_id, &mut case.tl),
            ] {
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

    // Snapshot creation of the fully written 1 GiB volume, and of the
    // scale pool's 1 TiB volume when one is given; each snapshot is
    // removed again outside the timed region.
    let scale_pool = std::env::var_os("THINLUN_BENCH_SCALE_POOL").map(|p| {
        let pool = Pool::open_path(std::path::Path::new(&p), &OpenOptions::default())
            .expect("opening THINLUN_BENCH_SCALE_POOL");
        let info = pool
            .volume_info(SCALE_VOLUME)
            .expect("THINLUN_BENCH_SCALE_POOL holds no volume 'scale'");
        // Its tree clean on disk, as for a volume at rest.
        pool.checkpoint().expect("checkpoint");
        eprintln!(
            "scale pool: volume '{SCALE_VOLUME}', {} GiB, {} extents",
            info.size_bytes >> 30,
            info.extents
        );
        pool
    });
    let mut snap_times: Vec<Duration> = Vec::new();
    let mut big_snap_times: Vec<Duration> = Vec::new();
    {
        let mut g = c.benchmark_group(SNAPG);
        g.sampling_mode(SamplingMode::Flat);
        g.measurement_time(Duration::from_secs(2));
        let mut n = 0u64;
        let mut cases = vec![(SNAP_ID, &pool, "full", &mut snap_times)];
        if let Some(p) = &scale_pool {
            cases.push((SNAP_BIG_ID, p, SCALE_VOLUME, &mut big_snap_times));
        }
        for (id, pool, vol, times) in cases {
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        n += 1;
                        let name = format!("{vol}@bench{n}");
                        let d = timed(|| {
                            pool.create_snapshot(&name).expect("snapshot");
                        });
                        pool.remove_volume(&name, false).expect("removing it");
                        times.push(d);
                        total += d;
                    }
                    total
                })
            });
        }
        g.finish();
    }
    if let Some(p) = scale_pool {
        p.close().expect("closing the scale pool");
    }

    // --- interleaved pairs ----------------------------------------------------
    let mut paired_rates = Vec::new();
    if paired_secs > 0 {
        eprintln!("interleaved pairs: {paired_secs} s each");
        for case in cases.iter_mut() {
            paired_rates.push((
                case.meta.label,
                paired(
                    &mut case.raw,
                    &mut case.tl,
                    Duration::from_secs(paired_secs),
                ),
            ));
        }
    }
    drop(cases);
    let rounds = [
        ("first writes", fw.describe()),
        ("first writes with flushes", fwf.describe()),
        ("writes after a snapshot", cow.describe()),
    ];
    drop((fw, fwf, cow));

    drop(full);
    pool.close().expect("closing the pool");
    drop(raw);
    if !keep {
        remove_if_exists(&raw_path);
        remove_if_exists(&pool_path);
    }
    c.final_summary();
    for (what, d) in rounds {
        eprintln!("{what} used {d}");
    }
    summary(
        started,
        &metas,
        &paired_rates,
        &[
            (SNAP_ID, "the fully written 1 GiB volume", &snap_times),
            (
                SNAP_BIG_ID,
                "the 1 TiB volume, 1 M extents",
                &big_snap_times,
            ),
        ],
    );
}

/// Prints raw vs thinlun side by side: criterion's estimates of this run
/// (read back from its estimates.json) and the interleaved pairs; then the
/// snapshot creation times.
fn summary(
    since: std::time::SystemTime,
    metas: &[Meta],
    paired: &[(&str, (f64, f64))],
    snaps: &[(&str, &str, &Vec<Duration>)],
) {
    let dir = criterion_dir();
    let per_sec = |group: &str, id: &str, units: f64| {
        dir.as_ref()
            .and_then(|d| criterion_estimate_ns(d, group, id, since))
            .map(|ns| units * 1e9 / ns)
    };
    println!();
    println!("Summary: raw file vs thinlun, this run (QD {QD}; flush cases: {FLUSH_EVERY} writes + flush)");
    println!(
        "{:<30} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | unit",
        "", "criterion", "", "", "paired", "", ""
    );
    println!(
        "{:<30} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} |",
        "case", "raw", "thinlun", "ratio", "raw", "thinlun", "ratio"
    );
    let cell = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.3}", b / a),
        _ => "-".to_string(),
    };
    for m in metas {
        let (cr, ct) = (
            per_sec(m.group, m.raw_id, m.per_batch),
            per_sec(m.group, m.tl_id, m.per_batch),
        );
        let (pr, pt) = paired
            .iter()
            .find(|(l, _)| *l == m.label)
            .map_or((None, None), |(_, (r, t))| {
                (Some(r * m.per_batch), Some(t * m.per_batch))
            });
        println!(
            "{:<30} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {}",
            m.label,
            cell(cr),
            cell(ct),
            ratio(cr, ct),
            cell(pr),
            cell(pt),
            ratio(pr, pt),
            m.unit
        );
    }
    for &(id, what, times) in snaps.iter().filter(|s| !s.2.is_empty()) {
        let mut v: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        let crit = dir
            .as_ref()
            .and_then(|d| criterion_estimate_ns(d, SNAPG, id, since))
            .map_or_else(|| "-".to_string(), |ns| format!("{:.3}", ns / 1e6));
        println!(
            "Snapshot of {what}: criterion {crit} ms; over all {} \
             snapshots taken: median {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            v.len(),
            at(0.5),
            at(0.99),
            v[v.len() - 1]
        );
    }
    if let Some(d) = dir {
        println!("(criterion data: {})", d.display());
    }
}
