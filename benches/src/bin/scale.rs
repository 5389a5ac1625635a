//! Metadata scale report: a pool with one 1 TiB volume holding a million
//! mapped extents (one million scattered, non-adjacent 4 KiB first writes),
//! then the cost of opening it read-write and read-only, of `check`, and the
//! metadata it needs on disk and in memory per extent.
//!
//! ```text
//! cargo run --release -p thinlun-benches --bin scale [-- OPTIONS]
//!   --extents N   extents to create (default 1000000; reduced with a note
//!                 when the file system lacks space)
//!   --runs R      fresh-process repetitions of each measurement (default 3)
//!   --reuse       reuse an existing scale pool instead of rebuilding it
//!   --keep        keep the pool file afterwards
//!   --node-copies N  1 or 2 copies of each tree node (default 2)
//!   --no-stall    skip the checkpoint stall probe
//!   --no-snap     skip the snapshot timing
//! ```
//!
//! The pool file (`scale-pool.img`, sparse) lives in `$THINLUN_BENCH_DIR`
//! (default /var/tmp/thinlun-bench). Every measurement runs in a fresh child
//! process (this binary re-executed with `--measure MODE PATH`), so memory
//! figures are not disturbed by the build and nothing is served from an
//! earlier open (the pool is read with O_DIRECT, so the page cache plays no
//! part either).
//!
//! * Timing children (`rw`, `ro`, `check`; `--runs` times each) report the
//!   time of `Pool::open_path` / `check::check` and the growth of VmRSS and
//!   VmHWM across the call.
//! * Heap children (`rw-heap`, `ro-heap`, `check-heap`; once each) count
//!   live and peak heap bytes with a wrapping global allocator: exact, and
//!   unaffected by memory the C allocator keeps after a free. Counting is off
//!   in the timing children, so it does not slow the timed calls.
//! * A child (`snap`) times `Pool::create_snapshot` of the 1 TiB volume and
//!   of a small volume (1 GiB, `SMALL_EXTENTS` extents) that it creates in
//!   the same pool, alternately, `SNAP_REPS` times each; every snapshot is
//!   removed again (also timed), then the small volume, so the pool is left
//!   as it was. Same device, same pool: the two medians differ only by what
//!   depends on the volume's size.
//! * A last child (`stall`) measures how long a checkpoint of a nearly
//!   all-dirty tree stalls concurrent reads (see `stall`); it leaves the
//!   extent count unchanged.

use fastrand::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;
use thinlun::dev::{AlignedBuf, FileDevice};
use thinlun::{OpenOptions, Pool, PoolConfig, Request, BLOCK_SIZE, SECTOR_SIZE};
use thinlun_benches::{
    bench_dir, fill_pattern, free_bytes, group_digits, peak_rss_bytes, remove_if_exists, rss_bytes,
    storage_write_bytes,
};

// --- heap accounting ----------------------------------------------------

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Counting is switched off in the timing children: its atomics would add
/// to every allocation the engine makes while opening.
static COUNTING: AtomicBool = AtomicBool::new(true);

fn grew(n: usize) {
    if !COUNTING.load(Ordering::Relaxed) {
        return;
    }
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: our caller's contract for `alloc`, passed on as is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: our caller's contract for `alloc_zeroed`, passed on.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System` with layout `l` (every
        // allocation here is forwarded to it).
        unsafe { System.dealloc(p, l) };
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and our caller's contract for `new`.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else if COUNTING.load(Ordering::Relaxed) {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn heap_live() -> u64 {
    LIVE.load(Ordering::Relaxed) as u64
}

/// Resets the peak to the current live heap; returns it.
fn heap_reset_peak() -> u64 {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now as u64
}

fn heap_peak() -> u64 {
    PEAK.load(Ordering::Relaxed) as u64
}

// --- parameters -----------------------------------------------------------

const VOLUME: &str = "scale";
const VOLUME_BYTES: u64 = 1 << 40;
const BS: u64 = BLOCK_SIZE as u64;
/// Requests per `Volume::submit` while building.
const BUILD_BATCH: usize = 1024;
/// Pool room beyond the data: metadata, journals, headroom.
const POOL_EXTRA: u64 = 512 << 20;
const MIB: f64 = (1 << 20) as f64;
/// Extra blocks the stall probe writes to dirty (nearly) every leaf.
const STALL_WRITES: u64 = 16_384;
/// Snapshots taken of each volume by the `snap` child (median reported).
const SNAP_REPS: usize = 7;
/// The small volume the snapshot timing compares with.
const SMALL_VOLUME: &str = "scale-small";
const SMALL_BYTES: u64 = 1 << 30;
const SMALL_EXTENTS: u64 = 1000;

struct Args {
    extents: u64,
    runs: usize,
    reuse: bool,
    keep: bool,
    stall: bool,
    snap: bool,
    /// Copies of each tree node (2: ditto nodes, the default).
    node_copies: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        extents: 1_000_000,
        runs: 3,
        reuse: false,
        keep: false,
        stall: true,
        snap: true,
        node_copies: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |what: &str| -> u64 {
            it.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| panic!("{what} needs a number"))
        };
        match arg.as_str() {
            "--extents" => a.extents = num("--extents"),
            "--runs" => a.runs = num("--runs").max(1) as usize,
            "--reuse" => a.reuse = true,
            "--keep" => a.keep = true,
            "--no-stall" => a.stall = false,
            "--no-snap" => a.snap = false,
            "--node-copies" => a.node_copies = num("--node-copies").clamp(1, 2),
            // `cargo bench` style flags, harmless here.
            "--bench" => {}
            other => {
                panic!("unknown argument {other}; see the doc comment of benches/src/bin/scale.rs")
            }
        }
    }
    a
}

fn main() {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("--measure") {
        let mode = argv.next().expect("mode");
        let path = PathBuf::from(argv.next().expect("path"));
        measure(&mode, &path);
        return;
    }
    let args = parse_args();
    let dir = bench_dir();
    let path = dir.join("scale-pool.img");

    if !(args.reuse && path.exists()) {
        build(&dir, &path, args.extents, args.node_copies == 2);
    } else {
        println!("reusing {}", path.display());
    }

    // --- measurements, each in a fresh process ----------------------------
    let mut rw = Vec::new();
    let mut ro = Vec::new();
    let mut ck = Vec::new();
    for _ in 0..args.runs {
        rw.push(child("rw", &path));
        ro.push(child("ro", &path));
        ck.push(child("check", &path));
    }
    // Heap accounting (deterministic, so once each).
    let heap = [
        child("rw-heap", &path),
        child("ro-heap", &path),
        child("check-heap", &path),
    ];
    let snap = args.snap.then(|| child("snap", &path));
    let st = args.stall.then(|| child("stall", &path));
    report(&path, &rw, &ro, &ck, &heap, st.as_ref(), snap.as_ref());
    if !args.keep {
        remove_if_exists(&path);
    }
}

/// Creates the pool and writes the scattered extents.
fn build(dir: &Path, path: &Path, want: u64, ditto_nodes: bool) {
    remove_if_exists(path);
    let vol_blocks = VOLUME_BYTES / BS;
    let free = free_bytes(dir).expect("statvfs");
    // Data is really written (4 KiB per extent); keep 10% of the free space.
    let room = (free as f64 * 0.9) as u64;
    let mut extents = want.min(vol_blocks / 2);
    if extents * BS + POOL_EXTRA > room {
        let fit = room.saturating_sub(POOL_EXTRA) / BS;
        println!(
            "NOTE: {} has {:.1} GiB free; {} extents need about {:.1} GiB; reducing to {} extents",
            dir.display(),
            free as f64 / (1u64 << 30) as f64,
            group_digits(extents),
            (extents * BS + POOL_EXTRA) as f64 / (1u64 << 30) as f64,
            group_digits(fit)
        );
        extents = fit;
    }
    assert!(extents > 0, "no room for a scale pool in {}", dir.display());
    let pool_bytes = extents * BS + POOL_EXTRA;
    let pool = Pool::create_path(
        path,
        &PoolConfig {
            size_bytes: Some(pool_bytes),
            force: true,
            ditto_nodes,
            ..PoolConfig::default()
        },
    )
    .expect("creating the scale pool");
    pool.create_volume(VOLUME, VOLUME_BYTES)
        .expect("create volume");
    let vol = pool.open_volume(VOLUME).expect("open volume");

    // Extent k sits at virtual block slot(k) * stride: never adjacent to
    // another (stride >= 2), written in random order, so none merge.
    let stride = vol_blocks / extents;
    let mut slots: Vec<u32> = (0..extents as u32).collect();
    Rng::with_seed(0x5ca1e).shuffle(&mut slots);
    let mut data = AlignedBuf::zeroed(BLOCK_SIZE);
    fill_pattern(&mut data, 42);

    println!(
        "building: pool {:.2} GiB (sparse file {}), volume 1 TiB, {} scattered 4 KiB first writes \
         (stride {stride} blocks, random order) in batches of {BUILD_BATCH}",
        pool_bytes as f64 / (1u64 << 30) as f64,
        path.display(),
        group_digits(extents),
    );
    let t = Instant::now();
    let mut last = Instant::now();
    let mut lat: Vec<f64> = Vec::with_capacity(slots.len() / BUILD_BATCH + 1);
    for (i, batch) in slots.chunks(BUILD_BATCH).enumerate() {
        let mut reqs: Vec<Request> = batch
            .iter()
            .map(|&s| Request::Write {
                sector: s as u64 * stride * BS / SECTOR_SIZE,
                data: &data[..],
            })
            .collect();
        let tb = Instant::now();
        for r in vol.submit(&mut reqs) {
            r.expect("scale write");
        }
        lat.push(tb.elapsed().as_secs_f64());
        if last.elapsed().as_secs() >= 10 {
            last = Instant::now();
            println!(
                "  {} / {} extents, {:.0} s",
                group_digits(((i + 1) * BUILD_BATCH) as u64),
                group_digits(extents),
                t.elapsed().as_secs_f64()
            );
        }
    }
    let written = t.elapsed();
    let info = pool.volume_info(VOLUME).expect("info");
    assert_eq!(info.extents, extents, "extents merged or were lost");
    let (p50, p99, max) = percentiles(lat);
    println!(
        "built: {} extents in {:.1} s ({:.0} first writes/s); per batch of {BUILD_BATCH}: \
         median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        group_digits(info.extents),
        written.as_secs_f64(),
        extents as f64 / written.as_secs_f64(),
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    let tf = Instant::now();
    vol.flush().expect("flush");
    let flushed = tf.elapsed();
    drop(vol);
    let tc = Instant::now();
    pool.close().expect("close");
    println!(
        "then: flush {:.3} s, close {:.3} s",
        flushed.as_secs_f64(),
        tc.elapsed().as_secs_f64()
    );
}

/// (median, 99th percentile, max) of a sample.
fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// Checkpoint stall probe (in a fresh process, within the first second
/// after open, before the background committer's first round): writes
/// `STALL_WRITES` extra 4 KiB blocks next to random existing extents, which
/// dirties nearly every leaf, then runs an explicit checkpoint while another
/// thread issues batches of 32 random 4 KiB reads of mapped blocks. The data
/// path needs the pool's state lock, which a checkpoint holds while it
/// snapshots and encodes the dirty leaves. Afterwards the extra blocks are
/// discarded again, so the volume keeps its extent count (the tree's leaf
/// layout may differ slightly afterwards).
fn stall(path: &Path, out: &mut Vec<(&'static str, f64)>) {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    let opened = Instant::now();
    let pool = Pool::open_path(path, &OpenOptions::default()).expect("open");
    let extents = pool.volume_info(VOLUME).expect("volume").extents;
    let stride = VOLUME_BYTES / BS / extents;
    assert!(stride >= 3, "too many extents for the stall probe");
    let vol = pool.open_volume(VOLUME).expect("volume");
    let mut data = AlignedBuf::zeroed(BLOCK_SIZE);
    fill_pattern(&mut data, 7);
    let mut rng = Rng::with_seed(0x57a11);
    let extra: Vec<u64> = (0..STALL_WRITES)
        .map(|_| rng.u64(..extents) * stride + 1)
        .collect();
    let sectors = |b: u64| b * BS / SECTOR_SIZE;
    for chunk in extra.chunks(BUILD_BATCH) {
        let mut reqs: Vec<Request> = chunk
            .iter()
            .map(|&b| Request::Write {
                sector: sectors(b),
                data: &data[..],
            })
            .collect();
        for r in vol.submit(&mut reqs) {
            r.expect("stall write");
        }
    }
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let lat: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let reader = {
        let vol = pool.open_volume(VOLUME).expect("second handle");
        let (stop, lat) = (stop.clone(), lat.clone());
        std::thread::spawn(move || {
            let mut bufs: Vec<AlignedBuf> =
                (0..32).map(|_| AlignedBuf::zeroed(BLOCK_SIZE)).collect();
            let mut rng = Rng::with_seed(3);
            let mut mine = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut reqs: Vec<Request> = bufs
                    .iter_mut()
                    .map(|b| Request::Read {
                        sector: rng.u64(..extents) * stride * BS / SECTOR_SIZE,
                        buf: &mut b[..],
                    })
                    .collect();
                let t = epoch.elapsed().as_secs_f64();
                for r in vol.submit(&mut reqs) {
                    r.expect("probe read");
                }
                mine.push((t, epoch.elapsed().as_secs_f64()));
            }
            *lat.lock().unwrap() = mine;
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let w0 = storage_write_bytes();
    let c0 = epoch.elapsed().as_secs_f64();
    pool.checkpoint().expect("checkpoint");
    let c1 = epoch.elapsed().as_secs_f64();
    let written = w0
        .zip(storage_write_bytes())
        .map_or(-1.0, |(a, b)| (b - a) as f64);
    let within = opened.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    let before: Vec<f64> = lat.iter().filter(|l| l.1 < c0).map(|l| l.1 - l.0).collect();
    let during: Vec<f64> = lat
        .iter()
        .filter(|l| l.1 >= c0 && l.0 <= c1)
        .map(|l| l.1 - l.0)
        .collect();
    let (base, _, _) = percentiles(before);
    let n_during = during.len();
    let (_, _, worst) = percentiles(during);
    // Undo the extra blocks.
    for chunk in extra.chunks(BUILD_BATCH) {
        let mut reqs: Vec<Request> = chunk
            .iter()
            .map(|&b| Request::Discard {
                sector: sectors(b),
                sectors: BS / SECTOR_SIZE,
            })
            .collect();
        for r in vol.submit(&mut reqs) {
            r.expect("stall discard");
        }
    }
    let after = pool.volume_info(VOLUME).expect("volume").extents;
    drop(vol);
    pool.close().expect("close");
    out.extend([
        ("ck_s", c1 - c0),
        ("ck_written", written),
        ("ck_done_after_open_s", within),
        ("read_base_ms", base * 1e3),
        ("read_during_n", n_during as f64),
        ("read_worst_ms", worst * 1e3),
        ("extents_before", extents as f64),
        ("extents_after", after as f64),
    ]);
}

/// Snapshot timing (in a fresh process): creates a small volume next to
/// the big one, then takes and removes `SNAP_REPS` snapshots of each,
/// alternating big and small so that drift of the disk hits both alike.
/// Reports the medians and how many bytes each snapshot wrote to storage.
fn snapshots(path: &Path, out: &mut Vec<(&'static str, f64)>) {
    let pool = Pool::open_path(path, &OpenOptions::default()).expect("open");
    let _ = pool.remove_volume(SMALL_VOLUME, true); // left by an interrupted run
    pool.create_volume(SMALL_VOLUME, SMALL_BYTES)
        .expect("creating the small volume");
    {
        let vol = pool.open_volume(SMALL_VOLUME).expect("small volume");
        let mut data = AlignedBuf::zeroed(BLOCK_SIZE);
        fill_pattern(&mut data, 9);
        let stride = SMALL_BYTES / BS / SMALL_EXTENTS;
        let mut reqs: Vec<Request> = (0..SMALL_EXTENTS)
            .map(|k| Request::Write {
                sector: k * stride * BS / SECTOR_SIZE,
                data: &data[..],
            })
            .collect();
        for r in vol.submit(&mut reqs) {
            r.expect("small volume write");
        }
        vol.flush().expect("flush");
    }
    // Both trees clean on disk, as they are for a volume at rest.
    pool.checkpoint().expect("checkpoint");
    let big_extents = pool.volume_info(VOLUME).expect("volume").extents;
    let small_extents = pool.volume_info(SMALL_VOLUME).expect("volume").extents;
    let mut t = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    let mut written = [Vec::new(), Vec::new()];
    for i in 0..SNAP_REPS {
        for (k, vol) in [VOLUME, SMALL_VOLUME].into_iter().enumerate() {
            let name = format!("{vol}@probe{i}");
            let w0 = storage_write_bytes();
            let t0 = Instant::now();
            pool.create_snapshot(&name).expect("snapshot");
            t[k][0].push(t0.elapsed().as_secs_f64());
            if let (Some(a), Some(b)) = (w0, storage_write_bytes()) {
                written[k].push((b - a) as f64);
            }
            let t1 = Instant::now();
            pool.remove_volume(&name, false)
                .expect("removing the snapshot");
            t[k][1].push(t1.elapsed().as_secs_f64());
        }
    }
    pool.remove_volume(SMALL_VOLUME, false)
        .expect("removing the small volume");
    pool.close().expect("close");
    let med = |v: &Vec<f64>| {
        if v.is_empty() {
            -1.0
        } else {
            median(v.clone())
        }
    };
    let max = |v: &Vec<f64>| v.iter().copied().fold(0.0, f64::max);
    out.extend([
        ("big_extents", big_extents as f64),
        ("small_extents", small_extents as f64),
        ("snap_big_ms", med(&t[0][0]) * 1e3),
        ("snap_big_max_ms", max(&t[0][0]) * 1e3),
        ("snap_small_ms", med(&t[1][0]) * 1e3),
        ("snap_small_max_ms", max(&t[1][0]) * 1e3),
        ("remove_big_ms", med(&t[0][1]) * 1e3),
        ("remove_small_ms", med(&t[1][1]) * 1e3),
        ("snap_big_written", med(&written[0])),
        ("snap_small_written", med(&written[1])),
        ("reps", SNAP_REPS as f64),
    ]);
}

/// Re-executes this binary to measure one thing in a fresh process.
fn child(mode: &str, path: &Path) -> HashMap<String, f64> {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args(["--measure", mode])
        .arg(path)
        .output()
        .expect("running a measurement child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "measurement '{mode}' failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("measurement '{mode}' printed no result: {stdout}"));
    line.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The child side: one measurement, printed as `RESULT key=value ...`.
fn measure(mode: &str, path: &Path) {
    let label = path.display().to_string();
    let mut out: Vec<(&str, f64)> = Vec::new();
    let rss0 = rss_bytes();
    let hwm0 = peak_rss_bytes();
    let (mode, counting) = match mode.strip_suffix("-heap") {
        Some(m) => (m, true),
        None => (mode, false),
    };
    COUNTING.store(counting, Ordering::Relaxed);
    let heap0 = heap_reset_peak();
    match mode {
        "rw" | "ro" => {
            let read_only = mode == "ro";
            let t = Instant::now();
            let pool = Pool::open_path(
                path,
                &OpenOptions {
                    read_only,
                    ..Default::default()
                },
            )
            .expect("open");
            let secs = t.elapsed().as_secs_f64();
            let (rss1, hwm1, heap1, heap_pk) =
                (rss_bytes(), peak_rss_bytes(), heap_live(), heap_peak());
            let st = pool.status();
            let info = pool.volume_info(VOLUME).expect("volume");
            out.extend([
                ("open_s", secs),
                ("rss_before", rss0 as f64),
                ("rss_growth", rss1 as f64 - rss0 as f64),
                ("hwm_growth", hwm1.saturating_sub(hwm0) as f64),
                ("heap_growth", heap1 as f64 - heap0 as f64),
                ("heap_peak_growth", heap_pk as f64 - heap0 as f64),
                ("extents", info.extents as f64),
                ("mapped_bytes", info.mapped_bytes as f64),
                ("meta_bytes", st.metadata_used_bytes as f64),
                ("pool_bytes", st.size_bytes as f64),
                ("chunk_bytes", st.chunk_bytes as f64),
            ]);
            let t = Instant::now();
            pool.close().expect("close");
            out.push(("close_s", t.elapsed().as_secs_f64()));
        }
        "check" => {
            let t = Instant::now();
            let dev = FileDevice::open(path, false).expect("open device");
            let rep = thinlun::check::check(&dev, &label).expect("check");
            let secs = t.elapsed().as_secs_f64();
            out.extend([
                ("check_s", secs),
                ("rss_growth", rss_bytes() as f64 - rss0 as f64),
                ("heap_growth", heap_live() as f64 - heap0 as f64),
                ("clean", rep.is_clean() as u8 as f64),
                ("errors", rep.errors.len() as f64),
                ("extents", rep.extents as f64),
                ("metadata_blocks", rep.metadata_blocks as f64),
                ("heap_peak_growth", heap_peak() as f64 - heap0 as f64),
                ("hwm_growth", peak_rss_bytes().saturating_sub(hwm0) as f64),
            ]);
            for e in &rep.errors {
                eprintln!("check error: {e}");
            }
        }
        "stall" => stall(path, &mut out),
        "snap" => snapshots(path, &mut out),
        other => panic!("unknown measurement {other}"),
    }
    let kv: Vec<String> = out.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT {}", kv.join(" "));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn stat(runs: &[HashMap<String, f64>], key: &str) -> (f64, f64, f64) {
    let v: Vec<f64> = runs.iter().map(|r| r[key]).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(v), lo, hi)
}

fn secs(runs: &[HashMap<String, f64>], key: &str) -> String {
    let (m, lo, hi) = stat(runs, key);
    format!(
        "{:.3} s (median of {}; {:.3}..{:.3})",
        m,
        runs.len(),
        lo,
        hi
    )
}

fn report(
    path: &Path,
    rw: &[HashMap<String, f64>],
    ro: &[HashMap<String, f64>],
    ck: &[HashMap<String, f64>],
    heap: &[HashMap<String, f64>; 3],
    st: Option<&HashMap<String, f64>>,
    snap: Option<&HashMap<String, f64>>,
) {
    let r = &rw[0];
    let extents = r["extents"];
    let per = |bytes: f64| bytes / extents;
    let (apparent, allocated) = std::fs::metadata(path)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.len(), m.blocks() * 512)
        })
        .unwrap_or((0, 0));
    let pool_blocks = r["pool_bytes"] / BS as f64;
    // The free-space bitmap (1 bit per pool block) and per-chunk counters
    // are sized by the pool, not by the extents; shown for reference.
    let space_map = pool_blocks / 8.0 + pool_blocks * BS as f64 / r["chunk_bytes"] * 4.0;
    println!();
    println!("thinlun scale report ({})", path.display());
    println!(
        "  pool: {:.2} GiB ({:.2} GiB allocated in the sparse file), 1 volume of 1 TiB",
        apparent as f64 / (1u64 << 30) as f64,
        allocated as f64 / (1u64 << 30) as f64
    );
    println!(
        "  extents: {} ({:.2} GiB mapped)",
        group_digits(extents as u64),
        r["mapped_bytes"] / (1u64 << 30) as f64
    );
    println!("  Pool::open_path read-write: {}", secs(rw, "open_s"));
    println!("  Pool::open_path read-only:  {}", secs(ro, "open_s"));
    println!("  check::check:               {}", secs(ck, "check_s"));
    println!("  Pool::close after rw open:  {}", secs(rw, "close_s"));
    println!(
        "  metadata on disk: {:.1} MiB = {:.1} bytes/extent (status.metadata_used_bytes; \
         an extent record is 16 bytes)",
        r["meta_bytes"] / MIB,
        per(r["meta_bytes"])
    );
    println!("  memory, growth across the call (VmRSS: median of the timing runs; heap: counted):");
    println!(
        "    {:<26} {:>14} {:>14} {:>14} {:>14}",
        "", "VmRSS after", "VmHWM (peak)", "live heap", "peak heap"
    );
    for (name, runs, h) in [
        ("Pool::open_path read-write", rw, &heap[0]),
        ("Pool::open_path read-only", ro, &heap[1]),
        ("check::check", ck, &heap[2]),
    ] {
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |b| format!("{:.1} B/ext", per(b)));
        let med = |k: &str| runs[0].contains_key(k).then(|| stat(runs, k).0);
        println!(
            "    {:<26} {:>14} {:>14} {:>14} {:>14}",
            name,
            cell(med("rss_growth")),
            cell(med("hwm_growth")),
            cell(h.get("heap_growth").copied()),
            cell(h.get("heap_peak_growth").copied()),
        );
    }
    println!(
        "    (MiB: VmRSS {:.1}, live heap {:.1}, peak heap {:.1} after a read-write open; the \
         live heap includes the {:.2} MiB free-space map, which scales with the pool, not \
         the extents)",
        stat(rw, "rss_growth").0 / MIB,
        heap[0]["heap_growth"] / MIB,
        heap[0]["heap_peak_growth"] / MIB,
        space_map / MIB
    );
    println!(
        "  check: clean={} in all {} runs",
        ck.iter().all(|c| c["clean"] == 1.0),
        ck.len()
    );
    if let Some(s) = snap {
        println!(
            "  snapshot creation (median of {:.0}, each snapshot removed again; fresh process, \
             trees clean on disk):",
            s["reps"]
        );
        for (what, k) in [("1 TiB volume", "big"), ("1 GiB volume", "small")] {
            println!(
                "    {what}, {:>9} extents: create {:.3} ms (max {:.3}), wrote {:.0} KiB; \
                 remove {:.3} ms",
                group_digits(s[&format!("{k}_extents")] as u64),
                s[&format!("snap_{k}_ms")],
                s[&format!("snap_{k}_max_ms")],
                s[&format!("snap_{k}_written")] / 1024.0,
                s[&format!("remove_{k}_ms")],
            );
        }
        println!(
            "    1 TiB / 1 GiB: {:.0}x the extents, {:.2}x the time, {:.0} KiB more written \
             (the new tree's interior nodes; its leaves are shared)",
            s["big_extents"] / s["small_extents"],
            s["snap_big_ms"] / s["snap_small_ms"],
            (s["snap_big_written"] - s["snap_small_written"]) / 1024.0,
        );
    }
    if let Some(s) = st {
        println!(
            "  checkpoint stall probe: {} extra first writes dirtied the tree; the checkpoint \
             wrote {:.0} blocks in {:.3} s (done {:.2} s after open); read batches (32 x 4 KiB) \
             took {:.2} ms (median) before it, {} overlapped it, the slowest {:.1} ms; \
             extents {} -> {} after discarding the extra blocks",
            group_digits(STALL_WRITES),
            s["ck_written"] / BS as f64,
            s["ck_s"],
            s["ck_done_after_open_s"],
            s["read_base_ms"],
            s["read_during_n"],
            s["read_worst_ms"],
            group_digits(s["extents_before"] as u64),
            group_digits(s["extents_after"] as u64),
        );
    }
}
