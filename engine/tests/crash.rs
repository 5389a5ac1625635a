//! Crash-point replay: run a workload on a recording LUN, then rebuild the
//! LUN as a power loss would leave it at many points (every write since the
//! last flush kept, dropped, or a random subset of its 4 KiB blocks), and
//! check that each image opens, passes `check`, and returns for every block
//! either what it held at the last completed flush or something written
//! after it, never anything else.

use std::collections::HashMap;
use std::sync::Arc;
use thinlun::check::check;
use thinlun::dev::{Event, MemCopy, MemDevice, Trace};
use thinlun::{OpenOptions, Pool, PoolConfig, UnflushedPlace};

const BS: usize = 4096;
/// The boot identity images of a power loss are opened with: the machine
/// has rebooted, so it is not this boot's (a hash of the kernel's boot id).
const REBOOTED: u64 = 0x5eb0_07ed;

/// How an image of a power loss is opened: read-only, after the reboot.
fn after_power_loss() -> OpenOptions {
    OpenOptions {
        read_only: true,
        boot_id: Some(REBOOTED),
        ..Default::default()
    }
}
const VOL_BLOCKS: u64 = 256;

/// A block's content: tag 0 = zeros, else the tag repeated.
fn pattern(tag: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0u8; BS];
    }
    let mut b = Vec::with_capacity(BS);
    while b.len() < BS {
        b.extend_from_slice(&tag.to_le_bytes());
    }
    b
}

fn tag_of(block: &[u8]) -> Option<u64> {
    let tag = u64::from_le_bytes(block[..8].try_into().ok()?);
    (pattern(tag) == block).then_some(tag)
}

/// Bytes of surviving memory for the unflushed record in these tests.
const RECORD_BYTES: usize = 1 << 20;

/// What the workload did, in trace positions.
#[derive(Default)]
struct History {
    /// The unflushed record's memory when recording started.
    memory_base: Vec<u8>,
    /// (trace length when the flush returned, block -> tag at that time).
    flushes: Vec<(usize, HashMap<u64, u64>)>,
    /// The same for `persist`, which only a process crash must respect.
    persists: Vec<(usize, HashMap<u64, u64>)>,
    /// (trace length when the write started, block, tag written).
    writes: Vec<(usize, u64, u64)>,
}

impl History {
    /// Tags block `b` may hold after a power loss (or, if `process_crash`,
    /// a crash of the process) at trace position `k`.
    fn allowed(&self, k: usize, b: u64, process_crash: bool) -> Vec<u64> {
        let persists = self.persists.iter().filter(|_| process_crash);
        let (since, base) = self
            .flushes
            .iter()
            .chain(persists)
            .filter(|(at, _)| *at <= k)
            .max_by_key(|(at, _)| *at)
            .map(|(at, m)| (*at, m.get(&b).copied().unwrap_or(0)))
            .unwrap_or((0, 0));
        let mut tags = vec![base];
        // Anything issued after the last completed flush and before the
        // crash may or may not be there.
        for &(at, blk, tag) in &self.writes {
            if blk == b && at >= since && at < k {
                tags.push(tag);
            }
        }
        tags
    }
}

fn cfg() -> PoolConfig {
    PoolConfig {
        chunk_bytes: 64 << 10,
        max_hosts: 1,
        journal_bytes: Some(64 * 4096),
        ..PoolConfig::default()
    }
}

/// Runs a random workload of writes, discards, write-zeroes, flushes and
/// checkpoints on one volume; returns the recording and what was done.
fn record(seed: u64, ops: usize) -> (Trace, History) {
    let dev = Arc::new(MemDevice::new(8 << 20));
    let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
    pool.create_volume("vm-1-disk-0", VOL_BLOCKS * BS as u64)
        .unwrap();
    pool.close().unwrap();
    let memory = dev.surviving_memory(RECORD_BYTES);
    let opts = OpenOptions {
        unflushed: UnflushedPlace::In(memory.clone()),
        ..Default::default()
    };
    let pool = Pool::open(dev.clone(), "mem", &opts).unwrap();
    let mut h = History {
        memory_base: memory.contents(),
        ..Default::default()
    };
    dev.start_trace();
    let vol = pool.open_volume("vm-1-disk-0").unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut current: HashMap<u64, u64> = HashMap::new();
    h.flushes.push((0, current.clone()));
    let mut next_tag = seed << 20 | 1;
    for _ in 0..ops {
        let at = dev.trace_len();
        match rng.u64(..20) {
            0..=11 => {
                let b = rng.u64(..VOL_BLOCKS);
                let n = 1 + rng.u64(..4).min(VOL_BLOCKS - b - 1);
                let mut data = Vec::new();
                for i in 0..n {
                    next_tag += 1;
                    data.extend(pattern(next_tag));
                    h.writes.push((at, b + i, next_tag));
                    current.insert(b + i, next_tag);
                }
                vol.write(b * 8, &data).unwrap();
            }
            12 | 13 => {
                let b = rng.u64(..VOL_BLOCKS);
                let n = 1 + rng.u64(..8).min(VOL_BLOCKS - b - 1);
                if rng.u64(..2) == 0 {
                    vol.discard(b * 8, n * 8).unwrap();
                } else {
                    vol.write_zeroes(b * 8, n * 8).unwrap();
                }
                for i in 0..n {
                    h.writes.push((at, b + i, 0));
                    current.insert(b + i, 0);
                }
            }
            14..=16 => {
                vol.flush().unwrap();
                h.flushes.push((dev.trace_len(), current.clone()));
            }
            // Survives a process crash, not a power loss: no flush point.
            17 => {
                vol.persist().unwrap();
                h.persists.push((dev.trace_len(), current.clone()));
            }
            _ => {
                pool.checkpoint().unwrap();
                h.flushes.push((dev.trace_len(), current.clone()));
            }
        }
    }
    vol.flush().unwrap();
    h.flushes.push((dev.trace_len(), current.clone()));
    drop(vol);
    pool.close().unwrap();
    (dev.take_trace(), h)
}

/// The LUN after a crash at trace position `k` whose last event is a torn
/// write: only the first half of each of its blocks reached the medium,
/// everything issued before it did.
fn last_write_torn(trace: &Trace, k: usize) -> Option<Vec<u8>> {
    let Some(Event::Write { offset, data }) = k.checked_sub(1).map(|i| &trace.events[i]) else {
        return None;
    };
    let mut img = trace.crash_image(k - 1, &mut |_, _| true);
    for (i, blk) in data.chunks(BS).enumerate() {
        let at = *offset as usize + i * BS;
        img[at..at + BS / 2].copy_from_slice(&blk[..BS / 2]);
    }
    Some(img)
}

/// Checks an image of the LUN after a crash at trace position `k`, opened
/// on the boot `boot_id` (`None`: this one, as after a process crash;
/// `Some(REBOOTED)` after a power loss), with the unflushed record as the
/// process left it (a power loss clears it, but its boot check must
/// make a record that somehow survived harmless).
fn verify_image(
    trace: &Trace,
    img: Vec<u8>,
    boot_id: Option<u64>,
    volume: &str,
    k: usize,
    h: &History,
    what: &str,
) {
    let memory = trace.memory_image(k, &h.memory_base);
    let dev = Arc::new(MemDevice::from_image(img));
    let report = check(dev.as_ref(), "crash").unwrap();
    assert!(
        report.is_clean(),
        "{what}: check failed: {:?}",
        report.errors
    );
    let pool = Pool::open(
        dev,
        "crash",
        &OpenOptions {
            read_only: true,
            boot_id,
            unflushed: UnflushedPlace::In(Arc::new(MemCopy::new(memory))),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    let vol = pool.open_volume(volume).unwrap();
    let mut buf = vec![0u8; VOL_BLOCKS as usize * BS];
    vol.read(0, &mut buf).unwrap();
    for b in 0..VOL_BLOCKS {
        let blk = &buf[b as usize * BS..(b as usize + 1) * BS];
        let allowed = h.allowed(k, b, boot_id.is_none());
        match tag_of(blk) {
            Some(t) if allowed.contains(&t) => {}
            got => panic!("{what}: block {b} holds {got:?}, allowed {allowed:?}"),
        }
    }
}

fn run_campaign(seed: u64, ops: usize, subsets_per_point: usize) -> usize {
    let (trace, h) = record(seed, ops);
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut tried = 0;
    for k in 0..=trace.events.len() {
        verify_image(
            &trace,
            trace.crash_image(k, &mut |_, _| false),
            Some(REBOOTED),
            "vm-1-disk-0",
            k,
            &h,
            &format!("seed {seed} point {k} (unflushed dropped)"),
        );
        // Everything issued kept: a process crash (this boot), or a power
        // loss that happened to lose nothing.
        for (boot, what) in [(None, "process crash"), (Some(REBOOTED), "unflushed kept")] {
            verify_image(
                &trace,
                trace.crash_image(k, &mut |_, _| true),
                boot,
                "vm-1-disk-0",
                k,
                &h,
                &format!("seed {seed} point {k} ({what})"),
            );
        }
        tried += 3;
        for s in 0..subsets_per_point {
            let img = trace.crash_image(k, &mut |_, _| rng.u64(..2) == 0);
            verify_image(
                &trace,
                img,
                Some(REBOOTED),
                "vm-1-disk-0",
                k,
                &h,
                &format!("seed {seed} point {k} subset {s}"),
            );
            tried += 1;
        }
    }
    tried
}

#[test]
fn crash_points_lose_nothing_acknowledged() {
    let seeds: u64 = std::env::var("THINLUN_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut total = 0;
    for seed in 1..=seeds {
        total += run_campaign(seed, 120, 2);
    }
    eprintln!("crash points tried: {total}");
    assert!(total > 500);
}

/// Volume create, rename, resize and remove are durable when they return
/// and atomic before: after a crash the pool names exactly the volumes of
/// the last completed change, or of the change in progress.
#[test]
fn crash_points_during_volume_management() {
    let dev = Arc::new(MemDevice::new(8 << 20));
    let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
    pool.create_volume("keep", VOL_BLOCKS * BS as u64).unwrap();
    dev.start_trace();
    let keep = pool.open_volume("keep").unwrap();
    let mut rng = fastrand::Rng::with_seed(77);
    let names = ["vm-1-disk-0", "vm-2-disk-0", "base-3-disk-0"];
    // (trace length at start, at return, volume names afterwards)
    let mut changes: Vec<(usize, usize, Vec<String>)> = vec![(0, 0, vec!["keep".to_string()])];
    let mut h = History::default();
    let mut current: HashMap<u64, u64> = HashMap::new();
    h.flushes.push((0, current.clone()));
    let mut tag = 1u64 << 40;
    for step in 0..60 {
        let start = dev.trace_len();
        let name = names[rng.u64(..3) as usize];
        let exists = pool.volume_info(name).is_ok();
        let changed = match (step % 3, exists) {
            (0, _) => {
                let b = rng.u64(..VOL_BLOCKS);
                tag += 1;
                h.writes.push((start, b, tag));
                current.insert(b, tag);
                keep.write(b * 8, &pattern(tag)).unwrap();
                if rng.u64(..2) == 0 {
                    keep.flush().unwrap();
                    h.flushes.push((dev.trace_len(), current.clone()));
                }
                false
            }
            (_, false) => pool
                .create_volume(name, (1 + rng.u64(..64)) * 65536)
                .is_ok(),
            (_, true) => match rng.u64(..4) {
                0 => pool.remove_volume(name, false).is_ok(),
                1 => {
                    let to = names[rng.u64(..3) as usize];
                    pool.rename_volume(name, to).is_ok()
                }
                2 => {
                    let v = pool.open_volume(name).unwrap();
                    let _ = v.write(0, &pattern(tag));
                    drop(v);
                    pool.resize_volume(name, 4096, true).is_ok()
                }
                _ => {
                    pool.checkpoint().unwrap();
                    false
                }
            },
        };
        if changed {
            let mut now: Vec<String> = pool.volumes().into_iter().map(|v| v.name).collect();
            now.sort();
            changes.push((start, dev.trace_len(), now));
        }
    }
    keep.flush().unwrap();
    h.flushes.push((dev.trace_len(), current.clone()));
    drop(keep);
    pool.close().unwrap();
    let trace = dev.take_trace();
    let mut tried = 0;
    for k in 0..=trace.events.len() {
        for keep_unflushed in [false, true] {
            let img = trace.crash_image(k, &mut |_, _| keep_unflushed);
            verify_image(
                &trace,
                img.clone(),
                Some(REBOOTED),
                "keep",
                k,
                &h,
                &format!("volume management point {k}"),
            );
            let pool = Pool::open(
                Arc::new(MemDevice::from_image(img)),
                "crash",
                &after_power_loss(),
            )
            .unwrap();
            let mut got: Vec<String> = pool.volumes().into_iter().map(|v| v.name).collect();
            got.sort();
            let done = changes.iter().rposition(|c| c.1 <= k).unwrap_or(0);
            let mut allowed = vec![&changes[done].2];
            if let Some(next) = changes.get(done + 1) {
                if next.0 < k {
                    allowed.push(&next.2);
                }
            }
            assert!(
                allowed.contains(&&got),
                "point {k}: volumes {got:?}, allowed {allowed:?}"
            );
            tried += 1;
        }
    }
    eprintln!("volume-management crash points tried: {tried}");
}

/// Snapshots, clones, rollback and snapshot removal are crash-consistent:
/// after a power loss at any point every snapshot that exists holds exactly
/// what its volume held when it was taken, a rolled-back volume holds its
/// snapshot's content, and the pool checks clean.
#[test]
fn crash_points_with_snapshots_clones_and_rollback() {
    let dev = Arc::new(MemDevice::new(8 << 20));
    let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
    pool.create_volume("vm-1-disk-0", VOL_BLOCKS * BS as u64)
        .unwrap();
    pool.create_volume("r", 16 * BS as u64).unwrap();
    dev.start_trace();
    let keep = pool.open_volume("vm-1-disk-0").unwrap();
    let mut rng = fastrand::Rng::with_seed(4242);
    let mut h = History::default();
    let mut current: HashMap<u64, u64> = HashMap::new();
    h.flushes.push((0, current.clone()));
    // Snapshot name -> (content, trace length when created).
    let mut snaps: Vec<(String, HashMap<u64, u64>, usize)> = Vec::new();
    let mut removed: Vec<(String, usize)> = Vec::new();
    // Rollbacks of "r": (trace length at return, tag it must hold), and
    // when each later write to r started.
    let mut rollbacks: Vec<(usize, u64)> = Vec::new();
    let mut r_writes: Vec<usize> = Vec::new();
    let mut tag = 1u64 << 41;
    for step in 0..70 {
        let start = dev.trace_len();
        match rng.u64(..10) {
            0..=4 => {
                let b = rng.u64(..VOL_BLOCKS);
                tag += 1;
                h.writes.push((start, b, tag));
                current.insert(b, tag);
                keep.write(b * 8, &pattern(tag)).unwrap();
                if rng.u64(..3) == 0 {
                    keep.flush().unwrap();
                    h.flushes.push((dev.trace_len(), current.clone()));
                }
            }
            5 | 6 => {
                let name = format!("vm-1-disk-0@s{step}");
                pool.create_snapshot(&name).unwrap();
                snaps.push((name, current.clone(), dev.trace_len()));
            }
            7 if snaps.len() > 2 => {
                let (name, _, _) = snaps.remove(rng.u64(..snaps.len() as u64 - 1) as usize);
                pool.remove_volume(&name, false).unwrap();
                removed.push((name, dev.trace_len()));
            }
            8 if !snaps.is_empty() => {
                let src = snaps[rng.u64(..snaps.len() as u64) as usize].0.clone();
                let clone = format!("clone-{step}");
                pool.clone_volume(&src, &clone).unwrap();
                let c = pool.open_volume(&clone).unwrap();
                c.write(0, &pattern(tag + 1000)).unwrap();
                c.flush().unwrap();
                drop(c);
                // The source snapshot must stay while the clone exists.
                snaps.retain(|s| s.0 != src);
            }
            _ => {
                // Write r, snapshot it, scribble, roll back.
                let r = pool.open_volume("r").unwrap();
                tag += 1;
                r_writes.push(dev.trace_len());
                r.write(0, &pattern(tag)).unwrap();
                pool.create_snapshot(&format!("r@x{step}")).unwrap();
                r.write(0, &pattern(tag + 7)).unwrap();
                drop(r);
                pool.rollback(&format!("r@x{step}"), true).unwrap();
                rollbacks.push((dev.trace_len(), tag));
            }
        }
    }
    keep.flush().unwrap();
    h.flushes.push((dev.trace_len(), current.clone()));
    drop(keep);
    pool.close().unwrap();
    let trace = dev.take_trace();
    let mut tried = 0;
    for k in 0..=trace.events.len() {
        for kept in [false, true] {
            let img = trace.crash_image(k, &mut |_, _| kept);
            verify_image(
                &trace,
                img.clone(),
                Some(REBOOTED),
                "vm-1-disk-0",
                k,
                &h,
                &format!("snapshot point {k}"),
            );
            let p = Pool::open(
                Arc::new(MemDevice::from_image(img)),
                "crash",
                &after_power_loss(),
            )
            .unwrap();
            assert!(
                p.verify_space().is_empty(),
                "point {k}: {:?}",
                p.verify_space()
            );
            for (name, content, created) in &snaps {
                let Ok(v) = p.open_volume(name) else {
                    assert!(
                        *created > k,
                        "point {k}: snapshot {name} created at {created} is missing"
                    );
                    continue;
                };
                let mut buf = vec![0u8; VOL_BLOCKS as usize * BS];
                v.read(0, &mut buf).unwrap();
                for b in 0..VOL_BLOCKS {
                    let got = tag_of(&buf[b as usize * BS..(b as usize + 1) * BS]);
                    let want = content.get(&b).copied().unwrap_or(0);
                    assert_eq!(got, Some(want), "point {k}: snapshot {name} block {b}");
                }
            }
            for (name, gone_at) in &removed {
                if *gone_at <= k {
                    assert!(
                        p.open_volume(name).is_err(),
                        "point {k}: removed {name} is back"
                    );
                }
            }
            // Once a rollback returned, and until r is written again, r
            // holds the snapshot's content.
            if let Some(&(done, want)) = rollbacks.iter().rev().find(|r| r.0 <= k) {
                if !r_writes.iter().any(|&w| w >= done && w < k) {
                    let v = p.open_volume("r").unwrap();
                    let mut buf = vec![0u8; BS];
                    v.read(0, &mut buf).unwrap();
                    assert_eq!(tag_of(&buf), Some(want), "point {k}: r after rollback");
                }
            }
            tried += 1;
        }
    }
    eprintln!("snapshot crash points tried: {tried}");
}

/// Creating a snapshot commits with superblock copy A and writes copy B
/// without a flush of its own (FORMAT 6.2), so each update after it
/// overwrites A while B is not yet durable unless its own first flush made
/// it so. Power is cut at every write and flush of back-to-back snapshots
/// and removals, keeping all, none, a random subset or a torn last write
/// of what was not flushed: every acknowledged snapshot must be there with
/// its content, no removed one may come back, and the pool names the
/// volumes of the last completed change or of the one in progress.
#[test]
fn crash_points_in_back_to_back_snapshots() {
    let dev = Arc::new(MemDevice::new(8 << 20));
    let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
    pool.create_volume("v", VOL_BLOCKS * BS as u64).unwrap();
    let vol = pool.open_volume("v").unwrap();
    dev.start_trace();
    let mut rng = fastrand::Rng::with_seed(2024);
    let mut current: HashMap<u64, u64> = HashMap::new();
    // (trace length at start, at return, volume names afterwards)
    let mut changes: Vec<(usize, usize, Vec<String>)> = vec![(0, 0, vec!["v".to_string()])];
    let mut content: HashMap<String, HashMap<u64, u64>> = HashMap::new();
    let mut live: Vec<String> = Vec::new();
    let mut tag = 1u64 << 42;
    for step in 0..14 {
        if step % 3 == 0 {
            for _ in 0..3 {
                let b = rng.u64(..VOL_BLOCKS);
                tag += 1;
                current.insert(b, tag);
                vol.write(b * 8, &pattern(tag)).unwrap();
            }
            vol.flush().unwrap();
        }
        let start = dev.trace_len();
        if step % 5 == 4 {
            let name = live.remove(0);
            pool.remove_volume(&name, false).unwrap();
        } else {
            let name = format!("v@s{step}");
            pool.create_snapshot(&name).unwrap();
            content.insert(name.clone(), current.clone());
            live.push(name);
        }
        let mut names: Vec<String> = pool.volumes().into_iter().map(|v| v.name).collect();
        names.sort();
        changes.push((start, dev.trace_len(), names));
    }
    drop(vol);
    pool.close().unwrap();
    let trace = dev.take_trace();
    let mut tried = 0;
    for k in 0..=trace.events.len() {
        let mut images = vec![
            trace.crash_image(k, &mut |_, _| false),
            trace.crash_image(k, &mut |_, _| true),
        ];
        for _ in 0..3 {
            images.push(trace.crash_image(k, &mut |_, _| rng.u64(..2) == 0));
        }
        images.extend(last_write_torn(&trace, k));
        let done = changes.iter().rposition(|c| c.1 <= k).unwrap_or(0);
        let mut allowed = vec![&changes[done].2];
        if let Some(next) = changes.get(done + 1) {
            if next.0 < k {
                allowed.push(&next.2);
            }
        }
        for img in images {
            let dev = Arc::new(MemDevice::from_image(img));
            let report = check(dev.as_ref(), "crash").unwrap();
            assert!(report.is_clean(), "point {k}: {:?}", report.errors);
            let p = Pool::open(dev, "crash", &after_power_loss())
                .unwrap_or_else(|e| panic!("point {k}: open failed: {e}"));
            assert!(p.verify_space().is_empty(), "point {k}");
            let mut got: Vec<String> = p.volumes().into_iter().map(|v| v.name).collect();
            got.sort();
            assert!(
                allowed.contains(&&got),
                "point {k}: volumes {got:?}, allowed {allowed:?}"
            );
            for name in got.iter().filter(|n| n.contains('@')) {
                let v = p.open_volume(name).unwrap();
                let mut buf = vec![0u8; VOL_BLOCKS as usize * BS];
                v.read(0, &mut buf).unwrap();
                for b in 0..VOL_BLOCKS {
                    let want = content[name].get(&b).copied().unwrap_or(0);
                    let got = tag_of(&buf[b as usize * BS..(b as usize + 1) * BS]);
                    assert_eq!(got, Some(want), "point {k}: snapshot {name} block {b}");
                }
            }
            tried += 1;
        }
    }
    eprintln!("back-to-back snapshot crash points tried: {tried}");
}

/// Without an unflushed record (docs/FORMAT.md, 6.7), `persist` writes
/// journal blocks with no flush at all. A power loss may
/// keep such a block and lose the data it maps; the machine then reboots,
/// and the block must not be replayed. A process crash keeps every
/// completed write, the boot is the same, and the block must be replayed.
#[test]
fn unflushed_persists_are_replayed_only_on_the_boot_that_wrote_them() {
    // The background committer may flush between the writes and the
    // persist (at most once a second); then try again.
    let (trace, end) = (0..5)
        .find_map(|_| {
            let dev = Arc::new(MemDevice::new(8 << 20));
            let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
            pool.create_volume("v", VOL_BLOCKS * BS as u64).unwrap();
            pool.close().unwrap();
            let opts = OpenOptions {
                unflushed: UnflushedPlace::Off,
                ..Default::default()
            };
            let pool = Pool::open(dev.clone(), "mem", &opts).unwrap();
            let vol = pool.open_volume("v").unwrap();
            vol.write(0, &pattern(1)).unwrap();
            vol.flush().unwrap();
            pool.create_snapshot("v@s").unwrap();
            dev.start_trace();
            vol.write(0, &pattern(2)).unwrap(); // copy-on-write: a new block
            vol.write(7 * 8, &pattern(3)).unwrap(); // a first write
            vol.persist().unwrap();
            let end = dev.trace_len();
            let trace = dev.take_trace();
            (trace.durable_prefix(end) == 0).then_some((trace, end))
        })
        .expect("five tries in a row were interrupted by a commit");
    let is_journal =
        |i: usize| matches!(&trace.events[i], Event::Write { data, .. } if &data[..6] == b"TLJRNL");
    assert!((0..end).any(is_journal), "persist wrote no journal block");
    let read = |img: Vec<u8>, boot_id: Option<u64>| -> (Option<u64>, Option<u64>) {
        let dev = Arc::new(MemDevice::from_image(img));
        let opts = OpenOptions {
            read_only: true,
            boot_id,
            unflushed: UnflushedPlace::Off,
            ..Default::default()
        };
        let pool = Pool::open(dev, "mem", &opts).unwrap();
        let vol = pool.open_volume("v").unwrap();
        let mut buf = vec![0u8; BS];
        let mut tag = |block: u64| {
            vol.read(block * 8, &mut buf).unwrap();
            tag_of(&buf)
        };
        (tag(0), tag(7))
    };
    let rebooted = Some(REBOOTED);
    // Power loss: the journal blocks kept, the data lost. After the
    // reboot the volume is as at the last flush.
    let lost_data = trace.crash_image(end, &mut |i, _| is_journal(i));
    assert_eq!(read(lost_data.clone(), rebooted), (Some(1), Some(0)));
    // Replaying them anyway would map block 0 to a block that never got
    // its data: this is what the boot check prevents.
    assert_ne!(read(lost_data, None), (Some(1), Some(0)));
    // Process crash: everything completed is there, on the same boot.
    let all = trace.crash_image(end, &mut |_, _| true);
    assert_eq!(read(all.clone(), None), (Some(2), Some(3)));
    // Power loss that happened to keep everything: still not replayed
    // (nothing proves the data durable), and still consistent.
    assert_eq!(read(all.clone(), rebooted), (Some(1), Some(0)));
    let dev = Arc::new(MemDevice::from_image(all));
    assert!(check(dev.as_ref(), "mem").unwrap().is_clean());
}

/// A server that crashed after a persist is restarted on the same boot: it
/// replays the unflushed blocks, and the guest's next FLUSH must make them
/// durable even though it brings no new change (a power loss after that
/// flush must not drop them).
#[test]
fn a_flush_after_a_restart_vouches_for_the_replayed_persists() {
    let dev = Arc::new(MemDevice::new(8 << 20));
    let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
    pool.create_volume("v", VOL_BLOCKS * BS as u64).unwrap();
    pool.flush().unwrap();
    let vol = pool.open_volume("v").unwrap();
    vol.write(3 * 8, &pattern(7)).unwrap();
    vol.persist().unwrap();
    // The process dies here: the LUN holds every completed write.
    let after_crash = dev.image();
    std::mem::forget(vol);
    std::mem::forget(pool);

    let dev = Arc::new(MemDevice::from_image(after_crash));
    let pool = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
    let vol = pool.open_volume("v").unwrap();
    dev.start_trace();
    vol.flush().unwrap();
    let trace = dev.take_trace();
    let power_loss = trace.crash_image(trace.events.len(), &mut |_, _| false);
    let back = Pool::open(
        Arc::new(MemDevice::from_image(power_loss)),
        "mem",
        &after_power_loss(),
    )
    .unwrap();
    let mut buf = vec![0u8; BS];
    back.open_volume("v")
        .unwrap()
        .read(3 * 8, &mut buf)
        .unwrap();
    assert_eq!(tag_of(&buf), Some(7), "a flushed write was lost");
}

/// Persists may add entries to the last journal block while it has room.
/// A clone records that block's sequence in its header as "already in the
/// tree", so entries made after the clone must go to a later block, or
/// replay after a process crash would skip them.
#[test]
fn persists_after_a_clone_survive_a_process_crash() {
    let dev = Arc::new(MemDevice::new(8 << 20));
    let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
    for v in ["base", "v"] {
        pool.create_volume(v, VOL_BLOCKS * BS as u64).unwrap();
    }
    pool.make_base("base", None).unwrap();
    pool.flush().unwrap();
    let v = pool.open_volume("v").unwrap();
    v.write(0, &pattern(1)).unwrap();
    v.persist().unwrap(); // a journal block with room left
    pool.clone_volume("base", "c").unwrap();
    let c = pool.open_volume("c").unwrap();
    c.write(5 * 8, &pattern(2)).unwrap();
    c.persist().unwrap();
    // The process dies here, on this boot.
    let back = Pool::open(
        Arc::new(MemDevice::from_image(dev.image())),
        "mem",
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; BS];
    back.open_volume("v").unwrap().read(0, &mut buf).unwrap();
    assert_eq!(tag_of(&buf), Some(1));
    back.open_volume("c")
        .unwrap()
        .read(5 * 8, &mut buf)
        .unwrap();
    assert_eq!(
        tag_of(&buf),
        Some(2),
        "the clone's persisted write was lost"
    );
    std::mem::forget((v, c, pool));
}

/// The two copies of a ditto node (version 2 node: self block at 16, its
/// twin's at 48) written by `events[i]`, as (event, block offset, self
/// block, twin block).
fn node_copies(trace: &Trace, upto: usize) -> Vec<(usize, usize, u64, u64)> {
    let mut out = Vec::new();
    for (i, ev) in trace.events[..upto].iter().enumerate() {
        if let Event::Write { data, .. } = ev {
            for (k, blk) in data.chunks(BS).enumerate() {
                let le = |at: usize| u64::from_le_bytes(blk[at..at + 8].try_into().unwrap());
                if blk.starts_with(b"TLNODE") && u16::from_le_bytes([blk[8], blk[9]]) == 2 {
                    out.push((i, k, le(16), le(48)));
                }
            }
        }
    }
    out
}

/// Power loss between the writes of a node's two copies, and torn writes
/// of either copy: at every crash point of the workload, images that keep
/// only the first or only the second copy of every node written since
/// the last flush (everything else issued kept), and images with the last
/// node copy torn (its first half new, the rest old). Each must pass
/// `check` and read back only data it may hold.
#[test]
fn crash_points_between_and_within_the_copies_of_ditto_nodes() {
    let mut tried = 0;
    for seed in [21u64, 22] {
        let (trace, h) = record(seed, 120);
        let mut copies_seen = 0;
        for k in 0..=trace.events.len() {
            let durable = trace.durable_prefix(k);
            let unflushed: Vec<_> = node_copies(&trace, k)
                .into_iter()
                .filter(|c| c.0 >= durable)
                .collect();
            if unflushed.is_empty() {
                continue;
            }
            copies_seen += unflushed.len();
            let mut images = Vec::new();
            for first in [true, false] {
                let drop: Vec<(usize, usize)> = unflushed
                    .iter()
                    .filter(|c| (c.2 < c.3) != first)
                    .map(|c| (c.0, c.1))
                    .collect();
                images.push(trace.crash_image(k, &mut |i, b| !drop.contains(&(i, b))));
            }
            let &(i, b, _, _) = unflushed.last().unwrap();
            let mut torn = trace.crash_image(k, &mut |e, x| (e, x) != (i, b));
            if let Event::Write { offset, data } = &trace.events[i] {
                let at = *offset as usize + b * BS;
                torn[at..at + BS / 2].copy_from_slice(&data[b * BS..b * BS + BS / 2]);
            }
            images.push(torn);
            for (n, img) in images.into_iter().enumerate() {
                let what = format!("seed {seed} point {k} image {n}");
                verify_image(&trace, img, Some(REBOOTED), "vm-1-disk-0", k, &h, &what);
                tried += 1;
            }
        }
        assert!(copies_seen > 0, "seed {seed}: no ditto node written");
    }
    eprintln!("ditto-node crash images tried: {tried}");
}

/// A bad copy is rewritten from its twin in place (at a read-write open):
/// a crash at any point of that, with the writes since the last flush
/// kept, dropped or the last one torn, leaves a pool whose data reads
/// back whole and which `check` finds without errors.
#[test]
fn crash_points_while_a_bad_copy_is_rewritten_from_its_twin() {
    let dev = Arc::new(MemDevice::new(8 << 20));
    let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
    pool.create_volume("vm-1-disk-0", VOL_BLOCKS * BS as u64)
        .unwrap();
    let vol = pool.open_volume("vm-1-disk-0").unwrap();
    // Every other block: several leaves under an interior root.
    let mut data = vec![0u8; VOL_BLOCKS as usize * BS];
    for b in (0..VOL_BLOCKS).step_by(2) {
        let p = pattern(b + 1);
        vol.write(b * 8, &p).unwrap();
        data[b as usize * BS..(b as usize + 1) * BS].copy_from_slice(&p);
    }
    drop(vol);
    pool.close().unwrap();
    let d = thinlun::dump::dump(dev.as_ref(), "mem").unwrap();
    let root = d.volumes[0].on_disk.root as usize;
    let mut img = dev.image();
    img[root * BS + 100] ^= 1;
    let dev = Arc::new(MemDevice::from_image(img));
    dev.start_trace();
    let pool = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
    pool.close().unwrap();
    let trace = dev.take_trace();
    assert!(
        node_copies(&trace, trace.events.len())
            .iter()
            .any(|c| c.2 == root as u64),
        "the open rewrote the bad copy"
    );
    for k in 0..=trace.events.len() {
        let mut images = vec![
            trace.crash_image(k, &mut |_, _| false),
            trace.crash_image(k, &mut |_, _| true),
        ];
        images.extend(last_write_torn(&trace, k));
        for img in images {
            let dev = Arc::new(MemDevice::from_image(img));
            let report = check(dev.as_ref(), "crash").unwrap();
            assert!(report.is_clean(), "point {k}: {:?}", report.errors);
            let p = Pool::open(dev, "crash", &after_power_loss()).unwrap();
            let v = p.open_volume("vm-1-disk-0").unwrap();
            let mut buf = vec![0u8; data.len()];
            v.read(0, &mut buf).unwrap();
            assert!(buf == data, "point {k}: data changed");
        }
    }
}
