//! Comparison harness: a raw file, qcow2 and thinlun on the same file
//! system, in one run.
//!
//! ```text
//! cargo build --release -p thinctl -p thinlun-benches
//! cargo run --release -p thinlun-benches --bin compare [-- OPTIONS]
//!   (or: bash benches/compare.sh [OPTIONS], which installs fio and
//!   qemu-utils when missing and builds both first)
//!   --size SIZE      data size of every image and volume (default 1G)
//!   --secs S         seconds per measurement (default 0.8)
//!   --rounds N       repetitions of every case (default 3; medians shown)
//!   --cases LIST     comma-separated case ids (default: all; see below)
//!   --only LIST      comma-separated back ends (default: all available)
//!   --skip LIST      back ends to leave out
//!   --json PATH      where to write the results (default <target>/compare.json)
//!   --thinctl PATH   thinctl binary (default: next to this program)
//!   --keep           keep the image files afterwards
//! ```
//!
//! Back ends (ids for --only/--skip):
//! * `raw`: the raw file with fio (io_uring, O_DIRECT): the baseline.
//! * `raw-batch`: the same, in whole batches of the queue depth (fio's
//!   `iodepth_batch_submit` and `iodepth_batch_complete_min`): submit 32,
//!   wait for all 32, as one `Volume::submit` does; shown for depth 32.
//! * `qcow2`: `qemu-img bench` (io_uring, `-t none` = O_DIRECT) on qcow2.
//! * `thinlun`: the engine in this process, through an `IoQueue` kept
//!   full (each request completes on its own, as with fio).
//! * `thinlun-batch`: the same in whole batches (`Volume::submit`), as
//!   `raw-batch` is to `raw`; depth 32 only.
//! * `thinlun-vhost`, `thinlun-vhost-lazy`: `thinctl serve` (default
//!   durability, and `--lazy-commit`) over vhost-user-blk, driven by a
//!   `virtio-driver` front end in this process.
//! * `qsd-raw`, `qsd-qcow2`: qemu-storage-daemon exporting the raw file or
//!   qcow2 image over vhost-user-blk, same front end.
//! * `thinlun-vhost-2q`, `qsd-raw-2q`, `qsd-qcow2-2q`: the same servers
//!   with two virtqueues (`thinctl serve --queues 2`, qsd `num-queues=2`),
//!   each driven by a front-end thread of its own with half the queue
//!   depth, so the total in flight matches the raw baseline. Depth 32 only.
//!
//! Cases: `rr1`, `rr32` 4 KiB random reads at queue depth 1 and 32; `ow1`,
//! `ow32` random overwrites of fully written data; `fw1`, `fw32` first
//! writes (every write allocates: a fresh volume or qcow2 image); `cow1`,
//! `cow32` writes into data shared with a snapshot (thinlun: a snapshot of a
//! fully written volume; qcow2: an overlay over a fully written backing
//! file); `sr32`, `sw32` 1 MiB sequential reads and overwrites at depth 32.
//! The raw baseline of the write cases is fio's random write to the fully
//! written raw file.
//!
//! The cases run one after another; within a case every back end runs
//! back to back, bracketed by two raw runs (before and after), whose mean
//! is the baseline for that round's ratios: the disk of a virtual machine
//! drifts by tens of percent within minutes, and this keeps each ratio's
//! parts seconds apart. Each case runs `--rounds` times (the order of the
//! back ends reversed every other round); the table shows the round with
//! the median IOPS and the median ratio. The drift between each round's two
//! raw runs is printed.

mod direct;
mod external;
mod pattern;
mod vhost;

use external::{available, fio, qcow2_create, qemu_img_bench, Server};
use pattern::{Measured, Pattern};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thinlun::{OpenOptions, Pool, PoolConfig};
use thinlun_benches::{bench_dir, remove_if_exists, write_full_file};

const K4: usize = 4096;
const M1: usize = 1 << 20;
const CLUSTER: u64 = 64 << 10;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Work {
    Read,
    Overwrite,
    FirstWrite,
    Cow,
    SeqRead,
    SeqWrite,
}

impl Work {
    fn writes(self) -> bool {
        !matches!(self, Work::Read | Work::SeqRead)
    }
}

struct Case {
    id: &'static str,
    label: &'static str,
    work: Work,
    qd: usize,
    bs: usize,
}

const CASES: [Case; 10] = [
    Case {
        id: "rr1",
        label: "4K random read, QD1",
        work: Work::Read,
        qd: 1,
        bs: K4,
    },
    Case {
        id: "rr32",
        label: "4K random read, QD32",
        work: Work::Read,
        qd: 32,
        bs: K4,
    },
    Case {
        id: "ow1",
        label: "4K random overwrite, QD1",
        work: Work::Overwrite,
        qd: 1,
        bs: K4,
    },
    Case {
        id: "ow32",
        label: "4K random overwrite, QD32",
        work: Work::Overwrite,
        qd: 32,
        bs: K4,
    },
    Case {
        id: "fw1",
        label: "4K random first write, QD1",
        work: Work::FirstWrite,
        qd: 1,
        bs: K4,
    },
    Case {
        id: "fw32",
        label: "4K random first write, QD32",
        work: Work::FirstWrite,
        qd: 32,
        bs: K4,
    },
    Case {
        id: "cow1",
        label: "4K random write after snapshot, QD1",
        work: Work::Cow,
        qd: 1,
        bs: K4,
    },
    Case {
        id: "cow32",
        label: "4K random write after snapshot, QD32",
        work: Work::Cow,
        qd: 32,
        bs: K4,
    },
    Case {
        id: "sr32",
        label: "1M sequential read, QD32",
        work: Work::SeqRead,
        qd: 32,
        bs: M1,
    },
    Case {
        id: "sw32",
        label: "1M sequential overwrite, QD32",
        work: Work::SeqWrite,
        qd: 32,
        bs: M1,
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Raw,
    RawBatch,
    Qcow2,
    Thinlun,
    ThinlunBatch,
    ThinlunVhost,
    ThinlunVhostLazy,
    ThinlunVhost2q,
    QsdRaw,
    QsdRaw2q,
    QsdQcow2,
    QsdQcow22q,
}

const BACKENDS: [Backend; 12] = [
    Backend::Raw,
    Backend::RawBatch,
    Backend::Qcow2,
    Backend::Thinlun,
    Backend::ThinlunBatch,
    Backend::ThinlunVhost,
    Backend::ThinlunVhostLazy,
    Backend::ThinlunVhost2q,
    Backend::QsdRaw,
    Backend::QsdRaw2q,
    Backend::QsdQcow2,
    Backend::QsdQcow22q,
];

impl Backend {
    fn id(self) -> &'static str {
        match self {
            Backend::Raw => "raw",
            Backend::RawBatch => "raw-batch",
            Backend::Qcow2 => "qcow2",
            Backend::Thinlun => "thinlun",
            Backend::ThinlunBatch => "thinlun-batch",
            Backend::ThinlunVhost => "thinlun-vhost",
            Backend::ThinlunVhostLazy => "thinlun-vhost-lazy",
            Backend::ThinlunVhost2q => "thinlun-vhost-2q",
            Backend::QsdRaw => "qsd-raw",
            Backend::QsdRaw2q => "qsd-raw-2q",
            Backend::QsdQcow2 => "qsd-qcow2",
            Backend::QsdQcow22q => "qsd-qcow2-2q",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Backend::Raw => "raw file, fio",
            Backend::RawBatch => "raw file, fio, batches",
            Backend::Qcow2 => "qcow2, qemu-img bench",
            Backend::Thinlun => "thinlun, engine",
            Backend::ThinlunBatch => "thinlun, engine, batches",
            Backend::ThinlunVhost => "thinlun, vhost (default)",
            Backend::ThinlunVhostLazy => "thinlun, vhost --lazy-commit",
            Backend::ThinlunVhost2q => "thinlun, vhost, 2 queues",
            Backend::QsdRaw => "raw, qsd vhost",
            Backend::QsdRaw2q => "raw, qsd vhost, 2 queues",
            Backend::QsdQcow2 => "qcow2, qsd vhost",
            Backend::QsdQcow22q => "qcow2, qsd vhost, 2 queues",
        }
    }

    /// Virtqueues of a vhost-user-blk back end.
    fn queues(self) -> usize {
        match self {
            Backend::ThinlunVhost2q | Backend::QsdRaw2q | Backend::QsdQcow22q => 2,
            _ => 1,
        }
    }

    fn applies(self, w: Work) -> bool {
        match self {
            Backend::QsdRaw | Backend::QsdRaw2q => matches!(
                w,
                Work::Read | Work::Overwrite | Work::SeqRead | Work::SeqWrite
            ),
            Backend::ThinlunVhostLazy => w.writes(),
            _ => true,
        }
    }

    fn applies_to(self, c: &Case) -> bool {
        let batch = matches!(self, Backend::RawBatch | Backend::ThinlunBatch);
        self.applies(c.work) && (c.qd > 1 || !(batch || self.queues() > 1))
    }
}

struct Opts {
    size: u64,
    secs: f64,
    rounds: usize,
    cases: Vec<String>,
    backends: Vec<Backend>,
    json: PathBuf,
    thinctl: PathBuf,
    keep: bool,
    ditto_nodes: bool,
}

/// `--size`: a number with an optional K, M, G or T suffix, a multiple
/// of 1 MiB and at least 64 MiB.
fn size_arg(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (
            &s[..i],
            match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in '{s}' (K, M, G, T)")),
            },
        ),
        _ => (s, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let bytes = (v * mult as f64) as u64;
    if bytes < 64 << 20 || !bytes.is_multiple_of(M1 as u64) {
        return Err("the size must be a multiple of 1 MiB, at least 64M".into());
    }
    Ok(bytes)
}

fn case_arg(s: &str) -> Result<String, String> {
    let s = s.trim();
    if CASES.iter().any(|c| c.id == s) {
        Ok(s.to_string())
    } else {
        let ids: Vec<&str> = CASES.iter().map(|c| c.id).collect();
        Err(format!("unknown case '{s}' (cases: {})", ids.join(", ")))
    }
}

fn backend_arg(s: &str) -> Result<Backend, String> {
    let s = s.trim();
    BACKENDS
        .iter()
        .copied()
        .find(|b| b.id() == s)
        .ok_or_else(|| {
            let ids: Vec<&str> = BACKENDS.iter().map(|b| b.id()).collect();
            format!("unknown back end '{s}' (back ends: {})", ids.join(", "))
        })
}

/// compare: raw file (fio), qcow2 (qemu-img bench, qemu-storage-daemon) and
/// thinlun (engine, thinctl serve over vhost-user-blk) on the same file
/// system.
#[derive(clap::Parser)]
#[command(
    name = "compare",
    after_help = "Files go to $THINLUN_BENCH_DIR/compare (default /var/tmp/thinlun-bench). \
                  See benches/README.md; bash benches/compare.sh passes its options here."
)]
struct Cli {
    /// Data size of every image and volume (a multiple of 1M, at least 64M)
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = size_arg)]
    size: u64,
    /// Seconds per measurement
    #[arg(long, value_name = "S", default_value_t = 0.8)]
    secs: f64,
    /// Repetitions of every case (medians shown)
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Case ids, comma-separated [default: all]: rr1, rr32, ow1, ow32, fw1,
    /// fw32, cow1, cow32, sr32, sw32
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = case_arg)]
    cases: Option<Vec<String>>,
    /// Back ends, comma-separated [default: all available]: raw, raw-batch,
    /// qcow2, thinlun, thinlun-vhost, thinlun-vhost-lazy, thinlun-vhost-2q,
    /// qsd-raw, qsd-raw-2q, qsd-qcow2, qsd-qcow2-2q
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = backend_arg)]
    only: Option<Vec<Backend>>,
    /// Back ends to leave out, comma-separated
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = backend_arg)]
    skip: Vec<Backend>,
    /// Where to write the results [default: <target>/compare.json]
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// thinctl binary [default: next to this program]
    #[arg(long, value_name = "PATH")]
    thinctl: Option<PathBuf>,
    /// Keep the image files afterwards
    #[arg(long)]
    keep: bool,
    /// Copies of each mapping-tree node in the pool (2: ditto nodes)
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u8).range(1..=2))]
    node_copies: u8,
    /// Passed by `cargo bench`; ignored
    #[arg(long, hide = true)]
    bench: bool,
}

fn target_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn parse_args() -> Opts {
    use clap::Parser;
    let cli = Cli::parse();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut backends = cli.only.unwrap_or_else(|| BACKENDS.to_vec());
    backends.retain(|b| !cli.skip.contains(b));
    // The ratios are to the raw file: it always runs.
    if !backends.contains(&Backend::Raw) {
        backends.insert(0, Backend::Raw);
    }
    Opts {
        size: cli.size,
        secs: cli.secs,
        rounds: cli.rounds as usize,
        cases: cli
            .cases
            .unwrap_or_else(|| CASES.iter().map(|c| c.id.to_string()).collect()),
        backends,
        json: cli
            .json
            .unwrap_or_else(|| target_dir().join("compare.json")),
        thinctl: cli.thinctl.unwrap_or_else(|| exe_dir.join("thinctl")),
        keep: cli.keep,
        ditto_nodes: cli.node_copies == 2,
    }
}

/// An odd stride near `n` × 0.618, coprime with `n`: visiting
/// `k × stride mod n` for k = 0.. touches every one of `n` slots once, far
/// apart from one another (what `qemu-img bench -S` can do for "random").
fn scatter_stride(n: u64) -> u64 {
    let mut s = ((n as f64 * 0.618_034) as u64).max(1) | 1;
    while gcd(s, n) != 1 {
        s += 2;
    }
    s
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Files and tools of one harness run.
struct Env {
    o: Opts,
    dir: PathBuf,
    raw: PathBuf,
    qfull: PathBuf,
    pool: PathBuf,
    have_qemu_img: bool,
    have_qsd: bool,
    have_serve: bool,
    notes: Vec<String>,
}

impl Env {
    fn sock(&self) -> PathBuf {
        self.dir.join("vhost.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn open_pool(&self) -> Pool {
        Pool::open_path(&self.pool, &OpenOptions::default()).expect("opening the pool")
    }

    fn usable(&self, b: Backend) -> bool {
        match b {
            Backend::Raw | Backend::RawBatch | Backend::Thinlun | Backend::ThinlunBatch => true,
            Backend::Qcow2 => self.have_qemu_img,
            Backend::ThinlunVhost | Backend::ThinlunVhostLazy | Backend::ThinlunVhost2q => {
                self.have_serve
            }
            Backend::QsdRaw | Backend::QsdRaw2q => self.have_qsd,
            Backend::QsdQcow2 | Backend::QsdQcow22q => self.have_qsd && self.have_qemu_img,
        }
    }
}

fn setup(o: Opts) -> Env {
    let dir = bench_dir().join("compare");
    std::fs::create_dir_all(&dir).expect("creating the compare directory");
    let mut notes = Vec::new();
    assert!(
        available("fio", "--version"),
        "fio is missing: apt-get install fio (benches/compare.sh does it)"
    );
    let have_qemu_img = available("qemu-img", "--version");
    let have_qsd = available("qemu-storage-daemon", "--version");
    if !have_qemu_img || !have_qsd {
        notes.push(
            "qemu-img or qemu-storage-daemon missing (apt-get install qemu-utils): qcow2 back ends skipped"
                .to_string(),
        );
    }
    let have_serve = std::process::Command::new(&o.thinctl)
        .args(["serve", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_serve {
        notes.push(format!(
            "{} serve is unavailable (cargo build --release -p thinctl): thinlun over vhost-user-blk skipped",
            o.thinctl.display()
        ));
    }
    let env = Env {
        raw: dir.join("raw.img"),
        qfull: dir.join("full.qcow2"),
        pool: dir.join("pool.img"),
        dir,
        o,
        have_qemu_img,
        have_qsd,
        have_serve,
        notes,
    };
    let size = env.o.size;
    let t = Instant::now();
    write_full_file(&env.raw, size).expect("writing the raw file");
    if env.have_qemu_img {
        qcow2_create(&env.qfull, size, None).expect("creating the qcow2 image");
        qemu_img_bench(&env.qfull, true, M1, 32, size / M1 as u64, M1 as u64)
            .expect("filling the qcow2 image");
    }
    // The pool: 'full' and 'cow' (fully written), a fresh volume for
    // first writes, and what a snapshot of 'cow' comes to hold; plus
    // metadata. Written fully first, as a LUN would be.
    let pool_bytes = (4 * size + (512 << 20)).next_multiple_of(M1 as u64);
    write_full_file(&env.pool, pool_bytes).expect("writing the pool file");
    let pool = Pool::create_path(
        &env.pool,
        &PoolConfig {
            size_bytes: Some(pool_bytes),
            force: true,
            ditto_nodes: env.o.ditto_nodes,
            ..PoolConfig::default()
        },
    )
    .expect("creating the pool");
    for name in ["full", "cow"] {
        pool.create_volume(name, size).expect("creating a volume");
        let v = pool.open_volume(name).expect("opening it");
        let mut p = Pattern::Once {
            order: (0..(size / M1 as u64) as u32).collect(),
            next: 0,
            bs: M1 as u64,
        };
        direct::run_queue(&v, &mut p, 32, M1, true, 1e9);
        v.flush().expect("flush");
    }
    pool.close().expect("closing the pool");
    eprintln!(
        "setup: raw file, qcow2 image and volumes of {} MiB, pool of {} MiB, in {}; {:.1} s",
        size >> 20,
        pool_bytes >> 20,
        env.dir.display(),
        t.elapsed().as_secs_f64()
    );
    env
}

/// The raw file's counterpart of a case (fio's rw= value).
fn raw_rw(w: Work) -> &'static str {
    match w {
        Work::Read => "randread",
        Work::Overwrite | Work::FirstWrite | Work::Cow => "randwrite",
        Work::SeqRead => "read",
        Work::SeqWrite => "write",
    }
}

fn pattern_for(c: &Case, size: u64, seed: u64) -> Pattern {
    match c.work {
        Work::Read | Work::Overwrite => Pattern::random(size, c.bs as u64, seed),
        Work::FirstWrite | Work::Cow => Pattern::once(size, c.bs as u64, seed),
        Work::SeqRead | Work::SeqWrite => Pattern::seq(size, c.bs as u64),
    }
}

/// qemu-img bench: a short probe to learn the rate, then a run of about
/// `secs`. First writes and writes over a backing file go one 4 KiB write
/// per 64 KiB cluster (each allocates), at most one pass.
fn run_qcow2(env: &Env, c: &Case, raw_iops: f64) -> std::io::Result<Measured> {
    let size = env.o.size;
    let secs = env.o.secs;
    let write = c.work.writes();
    match c.work {
        Work::Read | Work::Overwrite | Work::SeqRead | Work::SeqWrite => {
            let step = if c.bs == K4 {
                K4 as u64 * scatter_stride(size / K4 as u64)
            } else {
                c.bs as u64
            };
            let count = ((raw_iops * secs) as u64).clamp(64, 4_000_000);
            qemu_img_bench(&env.qfull, write, c.bs, c.qd, count, step)
        }
        Work::FirstWrite | Work::Cow => {
            let clusters = size / CLUSTER;
            let step = CLUSTER * scatter_stride(clusters);
            let img = env.dir.join("scratch.qcow2");
            let backing = (c.work == Work::Cow).then_some(env.qfull.as_path());
            let probe = 256.min(clusters);
            qcow2_create(&img, size, backing)?;
            let p = qemu_img_bench(&img, true, c.bs, c.qd, probe, step)?;
            let count = ((p.iops() * secs) as u64).clamp(probe, clusters);
            qcow2_create(&img, size, backing)?;
            let mut m = qemu_img_bench(&img, true, c.bs, c.qd, count, step)?;
            remove_if_exists(&img);
            m.exhausted = count == clusters;
            m.note = format!(
                "{count} writes, one per 64 KiB cluster (each allocates{}); no latencies",
                if backing.is_some() {
                    " and copies from the backing file"
                } else {
                    ""
                }
            );
            Ok(m)
        }
    }
}

/// thinlun through the engine in this process.
fn run_thinlun(env: &Env, c: &Case, seed: u64, batches: bool) -> Measured {
    let pool = env.open_pool();
    let (vol, cleanup): (&str, Option<(&str, bool)>) = match c.work {
        Work::FirstWrite => {
            pool.create_volume("fresh", env.o.size)
                .expect("creating a fresh volume");
            ("fresh", Some(("fresh", false)))
        }
        Work::Cow => {
            pool.create_snapshot("cow@cmp").expect("snapshot");
            ("cow", Some(("cow@cmp", false)))
        }
        _ => ("full", None),
    };
    let v = pool.open_volume(vol).expect("opening the volume");
    let mut p = pattern_for(c, env.o.size, seed);
    let run = if batches {
        direct::run_batches
    } else {
        direct::run_queue
    };
    let mut m = run(&v, &mut p, c.qd, c.bs, c.work.writes(), env.o.secs);
    drop(v);
    if let Some((name, rec)) = cleanup {
        pool.remove_volume(name, rec).expect("cleaning up");
    }
    pool.close().expect("closing the pool");
    m.note = if batches {
        "batches of QD requests (one Volume::submit); latency = the batch's".into()
    } else {
        "an IoQueue kept QD deep; latency per request".into()
    };
    m
}

/// A vhost-user-blk server for the case, the front end connected to it.
fn run_vhost(env: &Env, b: Backend, c: &Case, seed: u64) -> std::io::Result<Measured> {
    let sock = env.sock();
    let log = env.log();
    let mut scratch: Option<PathBuf> = None;
    let mut thin_cleanup: Option<&str> = None;
    let nq = b.queues();
    let server = match b {
        Backend::ThinlunVhost | Backend::ThinlunVhostLazy | Backend::ThinlunVhost2q => {
            let vol = {
                let pool = env.open_pool();
                let v = match c.work {
                    Work::FirstWrite => {
                        pool.create_volume("fresh", env.o.size)
                            .expect("creating a fresh volume");
                        thin_cleanup = Some("fresh");
                        "fresh"
                    }
                    Work::Cow => {
                        pool.create_snapshot("cow@cmp").expect("snapshot");
                        thin_cleanup = Some("cow@cmp");
                        "cow"
                    }
                    _ => "full",
                };
                pool.close().expect("closing the pool");
                v
            };
            Server::thinctl(
                &env.o.thinctl,
                &env.pool,
                vol,
                &sock,
                b == Backend::ThinlunVhostLazy,
                nq,
                &log,
            )
        }
        Backend::QsdRaw | Backend::QsdRaw2q => Server::qsd(&env.raw, false, None, nq, &sock, &log),
        Backend::QsdQcow2 | Backend::QsdQcow22q => match c.work {
            Work::FirstWrite | Work::Cow => {
                let img = env.dir.join("scratch.qcow2");
                let backing = (c.work == Work::Cow).then_some(env.qfull.as_path());
                scratch = Some(img.clone());
                qcow2_create(&img, env.o.size, backing)
                    .and_then(|()| Server::qsd(&img, true, backing, nq, &sock, &log))
            }
            _ => Server::qsd(&env.qfull, true, None, nq, &sock, &log),
        },
        _ => unreachable!(),
    };
    // What this run created goes again whatever happens, so that the next
    // back end finds the pool and directory as they were.
    let cleanup = || {
        if let Some(img) = &scratch {
            remove_if_exists(img);
        }
        if let Some(name) = thin_cleanup {
            let pool = env.open_pool();
            pool.remove_volume(name, false).expect("cleaning up");
            pool.close().expect("closing the pool");
        }
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            cleanup();
            return Err(e);
        }
    };
    let result = (|| {
        let mut client = vhost::Client::connect(&sock, nq, c.qd, c.bs, Duration::from_secs(10))?;
        if client.capacity_bytes < env.o.size {
            return Err(std::io::Error::other(format!(
                "device has {} bytes, fewer than --size",
                client.capacity_bytes
            )));
        }
        let p = pattern_for(c, env.o.size, seed);
        let (cpu0, sw0, own0) = (server.cpu(), server.switches(), direct::self_switches());
        let mut m = client.run(p, c.qd, c.bs, c.work.writes(), env.o.secs)?;
        let own = direct::self_switches() - own0;
        if m.ios > 0 {
            let per = |x: f64| x / m.ios as f64;
            if let (Some(a), Some(z)) = (cpu0, server.cpu()) {
                m.cpu_us_per_io = Some(per((z - a).as_secs_f64() * 1e6));
            }
            if let (Some(a), Some(z)) = (sw0, server.switches()) {
                m.switches_per_io = Some(per(z.saturating_sub(a) as f64));
            }
            m.client_switches_per_io = Some(per(own as f64));
        }
        m.server_rss = server.rss();
        drop(client);
        Ok(m)
    })();
    let stopped = server.stop();
    cleanup();
    let mut m = result?;
    stopped?;
    m.note = if nq == 1 {
        "one queue, QD requests kept in flight; server CPU per request".into()
    } else {
        format!(
            "{nq} queues, one client thread each, QD/{nq} requests in flight on each; \
             server CPU per request"
        )
    };
    Ok(m)
}

/// One round of a back end: what it measured and its ratio to the raw
/// file, or why it failed.
type RoundResult = Result<(Measured, f64), String>;

struct Row {
    case: &'static Case,
    backend: Backend,
    /// The round with the median IOPS (the lower middle one for an even
    /// count).
    m: Option<Measured>,
    error: Option<String>,
    /// The median of the rounds' ratios.
    ratio: Option<f64>,
    rounds: Vec<RoundResult>,
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.prec$}"))
}

fn print_header() {
    println!(
        "{:<38} {:<28} {:>9} {:>8} {:>8} {:>8} {:>6} {:>7} {:>6}",
        "case", "back end", "IOPS", "MiB/s", "p50 us", "p99 us", "ratio", "CPU us", "RSS MB"
    );
    // Context switches per request follow each row where measured.
}

fn print_row(r: &Row) {
    match (&r.m, &r.error) {
        (Some(m), _) => {
            let iops = m.iops();
            println!(
                "{:<38} {:<28} {:>9.0} {:>8.1} {:>8} {:>8} {:>6} {:>7} {:>6}{}",
                r.case.label,
                r.backend.label(),
                iops,
                iops * r.case.bs as f64 / M1 as f64,
                fmt_opt(m.p50_us, 0),
                fmt_opt(m.p99_us, 0),
                fmt_opt(r.ratio, 2),
                fmt_opt(m.cpu_us_per_io, 1),
                fmt_opt(m.server_rss.map(|b| b as f64 / 1e6), 0),
                if m.exhausted {
                    "  (every block written once)"
                } else {
                    ""
                }
            );
            if m.switches_per_io.is_some() || m.client_switches_per_io.is_some() {
                println!(
                    "{:<38} {:<28} context switches per request: {} (client: {})",
                    "",
                    "",
                    fmt_opt(m.switches_per_io, 2),
                    fmt_opt(m.client_switches_per_io, 2)
                );
            }
        }
        (None, Some(e)) => println!(
            "{:<38} {:<28} FAILED: {}",
            r.case.label,
            r.backend.label(),
            e.lines().next().unwrap_or("")
        ),
        _ => {}
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cmd_out(prog: &str, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new(prog).args(args).output().ok()?;
    o.status.success().then(|| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
}

fn main() {
    let o = parse_args();
    let started = Instant::now();
    let load0 = loadavg();
    let env = setup(o);
    for n in &env.notes {
        eprintln!("NOTE: {n}");
    }
    let backends: Vec<Backend> = env
        .o
        .backends
        .iter()
        .copied()
        .filter(|&b| env.usable(b))
        .collect();
    let cases: Vec<&'static Case> = CASES
        .iter()
        .filter(|c| env.o.cases.iter().any(|id| id == c.id))
        .collect();
    let mut rows: Vec<Row> = Vec::new();
    // (case, round, first raw IOPS, second raw IOPS)
    let mut drifts: Vec<(&str, usize, f64, f64)> = Vec::new();
    println!();
    if env.o.rounds > 1 {
        println!(
            "(each figure: the round with the median IOPS of {}; ratio: the median of the rounds' ratios)",
            env.o.rounds
        );
    }
    print_header();
    for (ci, c) in cases.iter().enumerate() {
        let seed = 1000 + ci as u64;
        let fio_raw = |e: &Env, batches: bool| {
            fio(
                &e.raw,
                e.o.size,
                raw_rw(c.work),
                c.bs,
                c.qd,
                e.o.secs,
                batches,
            )
        };
        let order: Vec<Backend> = backends
            .iter()
            .copied()
            .filter(|&b| b != Backend::Raw && b.applies_to(c))
            .collect();
        // Per back end (raw first), one (measurement, ratio) or error per round.
        let mut runs: Vec<(Backend, Vec<RoundResult>)> = std::iter::once(Backend::Raw)
            .chain(order.iter().copied())
            .map(|b| (b, Vec::new()))
            .collect();
        for round in 0..env.o.rounds {
            let raw1 = fio_raw(&env, false).expect("fio on the raw file");
            let mut this: Vec<(Backend, Result<Measured, String>)> = Vec::new();
            // Alternate the order between rounds.
            let mut ord = order.clone();
            if round % 2 == 1 {
                ord.reverse();
            }
            for &b in &ord {
                let r = match b {
                    Backend::RawBatch => fio_raw(&env, true).map(|mut m| {
                        m.note = format!(
                            "fio {}, whole batches of {} (iodepth_batch_submit = \
                             iodepth_batch_complete_min), as Volume::submit does",
                            raw_rw(c.work),
                            c.qd
                        );
                        m
                    }),
                    Backend::Qcow2 => run_qcow2(&env, c, raw1.iops()),
                    Backend::Thinlun => Ok(run_thinlun(&env, c, seed + round as u64, false)),
                    Backend::ThinlunBatch => Ok(run_thinlun(&env, c, seed + round as u64, true)),
                    _ => run_vhost(&env, b, c, seed + round as u64),
                };
                if let Err(e) = &r {
                    eprintln!("{} / {}: {e}", c.id, b.id());
                }
                this.push((b, r.map_err(|e| e.to_string())));
            }
            let raw2 = fio_raw(&env, false).expect("fio on the raw file");
            let base = (raw1.iops() + raw2.iops()) / 2.0;
            drifts.push((c.id, round, raw1.iops(), raw2.iops()));
            let mut rawm = raw1.clone();
            rawm.ios = raw1.ios + raw2.ios;
            rawm.secs = raw1.secs + raw2.secs;
            let avg = |a: Option<f64>, b: Option<f64>| Some((a? + b?) / 2.0);
            rawm.p50_us = avg(raw1.p50_us, raw2.p50_us);
            rawm.p99_us = avg(raw1.p99_us, raw2.p99_us);
            rawm.cpu_us_per_io = avg(raw1.cpu_us_per_io, raw2.cpu_us_per_io);
            rawm.switches_per_io = avg(raw1.switches_per_io, raw2.switches_per_io);
            rawm.note = format!(
                "fio {}, two runs bracketing the case: {:.0} and {:.0} IOPS",
                raw_rw(c.work),
                raw1.iops(),
                raw2.iops()
            );
            this.push((Backend::Raw, Ok(rawm)));
            for (b, r) in this {
                let slot = runs.iter_mut().find(|x| x.0 == b).expect("back end");
                slot.1.push(r.map(|m| {
                    let ratio = m.iops() / base;
                    (m, ratio)
                }));
            }
        }
        for (b, rs) in runs {
            let ok: Vec<&(Measured, f64)> = rs.iter().filter_map(|r| r.as_ref().ok()).collect();
            let error = rs.iter().find_map(|r| r.as_ref().err().cloned());
            let (m, ratio) = if ok.is_empty() {
                (None, None)
            } else {
                let mut by_iops = ok.clone();
                by_iops.sort_by(|a, b| a.0.iops().total_cmp(&b.0.iops()));
                let mut ratios: Vec<f64> = ok.iter().map(|x| x.1).collect();
                ratios.sort_by(|a, b| a.total_cmp(b));
                let mid = |n: usize| (n - 1) / 2;
                (
                    Some(by_iops[mid(by_iops.len())].0.clone()),
                    Some(ratios[mid(ratios.len())]),
                )
            };
            let row = Row {
                case: c,
                backend: b,
                m,
                error,
                ratio,
                rounds: rs,
            };
            print_row(&row);
            rows.push(row);
        }
    }

    // --- summary: ratio matrix --------------------------------------------
    println!();
    println!("Ratio to the raw file (IOPS / mean of the two bracketing fio runs):");
    let width = |b: &Backend| b.id().len().max(6);
    print!("{:<38}", "case");
    for b in &backends {
        print!(" {:>w$}", b.id(), w = width(b));
    }
    println!(" raw drift");
    for c in &cases {
        print!("{:<38}", c.label);
        for b in &backends {
            let cell = rows
                .iter()
                .find(|r| std::ptr::eq(r.case, *c) && r.backend == *b)
                .and_then(|r| r.ratio);
            print!(" {:>w$}", fmt_opt(cell, 2), w = width(b));
        }
        let d: Vec<String> = drifts
            .iter()
            .filter(|d| d.0 == c.id)
            .map(|d| format!("{:+.0}%", (d.3 / d.2 - 1.0) * 100.0))
            .collect();
        println!(" {}", d.join(" "));
    }
    println!("(raw drift: per round, the second bracketing fio run against the first)");
    let load1 = loadavg();
    let wall = started.elapsed().as_secs_f64();
    println!(
        "\n{} cases in {:.0} s; load average {} at the start, {} at the end \
         (other processes share the disk and the 2 CPUs).",
        cases.len(),
        wall,
        load0,
        load1
    );

    // --- JSON -------------------------------------------------------------
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let m = r.m.clone().unwrap_or_default();
            json!({
                "case": r.case.id,
                "label": r.case.label,
                "backend": r.backend.id(),
                "backend_label": r.backend.label(),
                "qd": r.case.qd,
                "bs": r.case.bs,
                "ios": m.ios,
                "secs": m.secs,
                "iops": r.m.as_ref().map(|m| m.iops()),
                "mib_s": r.m.as_ref().map(|m| m.iops() * r.case.bs as f64 / M1 as f64),
                "p50_us": m.p50_us,
                "p99_us": m.p99_us,
                "ratio_to_raw": r.ratio,
                "cpu_us_per_io": m.cpu_us_per_io,
                "switches_per_io": m.switches_per_io,
                "client_switches_per_io": m.client_switches_per_io,
                "server_rss_bytes": m.server_rss,
                "every_block_once_exhausted": m.exhausted,
                "note": m.note,
                "error": r.error,
                "rounds": r.rounds.iter().map(|x| match x {
                    Ok((m, ratio)) => json!({
                        "iops": m.iops(),
                        "p50_us": m.p50_us,
                        "p99_us": m.p99_us,
                        "cpu_us_per_io": m.cpu_us_per_io,
                        "ratio_to_raw": ratio,
                    }),
                    Err(e) => json!({"error": e}),
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = json!({
        "meta": {
            "size_bytes": env.o.size,
            "secs_per_run": env.o.secs,
            "rounds": env.o.rounds,
            "dir": env.dir.display().to_string(),
            "wall_secs": wall,
            "loadavg_start": load0,
            "loadavg_end": load1,
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            "kernel": cmd_out("uname", &["-r"]),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "fio": cmd_out("fio", &["--version"]),
            "qemu_img": cmd_out("qemu-img", &["--version"]),
            "git_commit": cmd_out("git", &["rev-parse", "--short", "HEAD"]),
            "notes": env.notes,
        },
        "raw_drift": drifts
            .iter()
            .map(|d| json!({"case": d.0, "round": d.1, "first_iops": d.2, "second_iops": d.3}))
            .collect::<Vec<_>>(),
        "results": results,
    });
    if let Some(p) = env.o.json.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    std::fs::write(
        &env.o.json,
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("writing the JSON results");
    println!("results: {}", env.o.json.display());

    if !env.o.keep {
        for f in [&env.raw, &env.qfull, &env.pool] {
            remove_if_exists(f);
        }
        let _ = std::fs::remove_file(env.log());
        let _ = std::fs::remove_dir(&env.dir);
    }
}
