//! Multi-host harness: several host processes (tests/multihost/host.rs) on
//! one O_DIRECT pool file do random work (activate, write, release,
//! snapshot, clone, remove) while this harness SIGKILLs them and
//! SIGSTOP/SIGCONTs them, including pauses longer than the host-dead time.
//! Afterwards it proves from their logs and the LUN that:
//! - no two hosts ever held write access to one volume at once (log
//!   intervals, and the on-disk canary each holder checks);
//! - a host paused past the dead time issued no write afterwards (its
//!   watchdog killed it while stopped);
//! - every acknowledged-and-flushed write reads back, and every block
//!   holds data written to that very volume and block;
//! - `check` finds the pool clean.
//!
//! CI runs it briefly; `THINLUN_MULTIHOST_SECS=600 cargo test --release -p
//! thinlun-tests --test multihost -- --nocapture` runs a long campaign.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use thinlun::lease::now_ms;
use thinlun::{Error, HostOptions, OpenOptions, Pool, PoolConfig, SharedConfig};
use thinlun_tests::Rng;

const HOSTS: u32 = 3;
const VOLUMES: u32 = 4;
const BLOCKS: u64 = 64;
const BS: usize = 4096;
const IO_TIMEOUT_MS: u32 = 100;
/// Dead time is 9 x the I/O timeout; a long pause outlasts it.
const LONG_PAUSE: Duration = Duration::from_millis(1500);

struct Host {
    id: u32,
    child: Option<Child>,
    runs: u32,
}

/// How a process's life ended: when it stopped writing for sure.
#[derive(Default)]
struct Life {
    end_ms: Option<u64>,
    joined: bool,
}

#[derive(Default)]
struct Figures {
    kills: u32,
    short_pauses: u32,
    long_pauses: u32,
    watchdog_kills: u32,
    restarts: u32,
}

struct Harness {
    dir: PathBuf,
    pool: PathBuf,
    stop: PathBuf,
    hosts: Vec<Host>,
    lives: HashMap<u32, Life>,
    rng: Rng,
    figures: Figures,
    violations: Vec<String>,
    /// (pid, resumed at) of hosts paused past the dead time that lived on.
    paused_past_dead: Vec<(u32, u64)>,
}

fn host_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_multihost-host"))
}

impl Harness {
    fn spawn(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        h.runs += 1;
        let child = Command::new(host_binary())
            .arg(&self.pool)
            .arg(h.id.to_string())
            .arg(self.dir.join(format!("host{}.log", h.id)))
            .arg(&self.stop)
            .arg(self.dir.join(format!("run{}", h.id)))
            .arg((self.rng.u64(..) >> 1).to_string())
            .arg(VOLUMES.to_string())
            .spawn()
            .expect("starting a host process");
        self.lives.insert(child.id(), Life::default());
        h.child = Some(child);
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.hosts[i].child.as_ref().map(|c| c.id())
    }

    fn signal(&self, i: usize, sig: i32) {
        if let Some(pid) = self.pid(i) {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// Notes processes that exited on their own (lost lease, error) and
    /// restarts them.
    fn reap(&mut self) {
        for i in 0..self.hosts.len() {
            let exited = matches!(
                self.hosts[i].child.as_mut().map(|c| c.try_wait()),
                Some(Ok(Some(_)))
            );
            if exited {
                let pid = self.pid(i).unwrap_or(0);
                self.lives
                    .entry(pid)
                    .or_default()
                    .end_ms
                    .get_or_insert(now_ms());
                self.hosts[i].child = None;
                self.figures.restarts += 1;
                self.spawn(i);
            }
        }
    }

    fn kill(&mut self, i: usize) {
        let Some(pid) = self.pid(i) else { return };
        self.signal(i, libc::SIGKILL);
        self.lives.entry(pid).or_default().end_ms = Some(now_ms());
        if let Some(mut c) = self.hosts[i].child.take() {
            let _ = c.wait();
        }
        self.figures.kills += 1;
    }

    fn pause(&mut self, i: usize, long: bool) {
        let Some(pid) = self.pid(i) else { return };
        let stopped_at = now_ms();
        self.signal(i, libc::SIGSTOP);
        let d = if long {
            LONG_PAUSE
        } else {
            Duration::from_millis(50 + self.rng.u64(..200))
        };
        std::thread::sleep(d);
        self.signal(i, libc::SIGCONT);
        if !long {
            self.figures.short_pauses += 1;
            return;
        }
        self.figures.long_pauses += 1;
        std::thread::sleep(Duration::from_millis(50));
        let status = self.hosts[i]
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        match status {
            Some(s) if s.signal() == Some(libc::SIGKILL) => {
                // Killed by its own watchdog while stopped: it wrote
                // nothing after the stop.
                self.figures.watchdog_kills += 1;
                self.lives.entry(pid).or_default().end_ms = Some(stopped_at);
                self.hosts[i].child = None;
            }
            _ => self.paused_past_dead.push((pid, now_ms())),
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    ms: u64,
    pid: u32,
    words: Vec<String>,
}

fn read_logs(dir: &Path) -> Vec<Event> {
    let mut out = Vec::new();
    for h in 1..=HOSTS {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("host{h}.log"))) else {
            continue;
        };
        for line in text.lines() {
            let mut w = line.split_whitespace();
            let (Some(ms), Some(pid)) = (w.next(), w.next()) else {
                continue;
            };
            let (Ok(ms), Ok(pid)) = (ms.parse(), pid.parse()) else {
                continue;
            };
            out.push(Event {
                ms,
                pid,
                words: w.map(str::to_string).collect(),
            });
        }
    }
    out.sort_by_key(|e| e.ms);
    out
}

fn shared_opts(id: u32, dir: &Path) -> OpenOptions {
    OpenOptions {
        read_only: false,
        host: Some(HostOptions {
            host_id: id,
            host_name: Some(format!("harness{id}")),
            watchdog: false,
            run_dir: Some(dir.join(format!("run{id}"))),
        }),
        boot_id: None,
        ..OpenOptions::default()
    }
}

#[test]
fn hosts_share_a_pool_safely_under_kills_and_pauses() {
    let secs: u64 = std::env::var("THINLUN_MULTIHOST_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("multihost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pool_path = dir.join("pool.img");
    let cfg = PoolConfig {
        size_bytes: Some(256 << 20),
        chunk_bytes: 64 << 10,
        max_hosts: 8,
        shared: Some(SharedConfig {
            io_timeout_ms: IO_TIMEOUT_MS,
            group_bytes: Some(4 << 20),
        }),
        ..PoolConfig::default()
    };
    Pool::create_path(&pool_path, &cfg)
        .unwrap()
        .close()
        .unwrap();
    let admin = Pool::open_path(&pool_path, &shared_opts(8, &dir)).unwrap();
    for n in 0..VOLUMES {
        admin
            .create_volume(&format!("vol-{n}"), BLOCKS * BS as u64)
            .unwrap();
    }
    admin.close().unwrap();

    let seed = now_ms() | 1;
    eprintln!("multihost: seed {seed}, {secs} s, {HOSTS} hosts, {VOLUMES} contested volumes");
    let mut h = Harness {
        stop: dir.join("stop"),
        pool: pool_path.clone(),
        dir: dir.clone(),
        hosts: (1..=HOSTS)
            .map(|id| Host {
                id,
                child: None,
                runs: 0,
            })
            .collect(),
        lives: HashMap::new(),
        rng: Rng::with_seed(seed),
        figures: Figures::default(),
        violations: Vec::new(),
        paused_past_dead: Vec::new(),
    };
    for i in 0..HOSTS as usize {
        h.spawn(i);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300 + h.rng.u64(..700)));
        h.reap();
        let i = h.rng.u64(..HOSTS as u64) as usize;
        match h.rng.u64(..10) {
            0..=2 => {
                h.kill(i);
                std::thread::sleep(Duration::from_millis(h.rng.u64(..400)));
                h.spawn(i);
            }
            3..=5 => h.pause(i, false),
            6..=7 => {
                h.pause(i, true);
                if h.hosts[i].child.is_none() {
                    h.spawn(i);
                }
            }
            _ => {}
        }
    }
    std::fs::write(&h.stop, b"").unwrap();
    for i in 0..HOSTS as usize {
        h.signal(i, libc::SIGCONT);
    }
    let until = Instant::now() + Duration::from_secs(30);
    for i in 0..HOSTS as usize {
        let pid = h.pid(i).unwrap_or(0);
        if let Some(mut c) = h.hosts[i].child.take() {
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > until {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        h.lives
            .entry(pid)
            .or_default()
            .end_ms
            .get_or_insert(now_ms());
    }

    // What the logs prove.
    let events = read_logs(&dir);
    for e in &events {
        if e.words.first().map(String::as_str) == Some("JOINED") {
            h.lives.entry(e.pid).or_default().joined = true;
        }
        if e.words.first().map(String::as_str) == Some("VIOLATION") {
            h.violations
                .push(format!("pid {}: {}", e.pid, e.words.join(" ")));
        }
    }
    for &(pid, resumed) in &h.paused_past_dead {
        let joined = h.lives.get(&pid).is_some_and(|l| l.joined);
        if let Some(e) = events
            .iter()
            .find(|e| e.pid == pid && e.ms > resumed && matches!(e.words[0].as_str(), "I" | "ACQ"))
        {
            if joined {
                h.violations.push(format!(
                    "pid {pid} was paused past the dead time yet went on writing: {:?}",
                    e.words
                ));
            }
        }
    }
    // Write-access intervals per volume must not overlap across processes.
    let mut open: HashMap<(u32, String), u64> = HashMap::new();
    let mut intervals: HashMap<String, Vec<(u64, u64, u32)>> = HashMap::new();
    for e in &events {
        match e.words.first().map(String::as_str) {
            Some("ACQ") => {
                open.insert((e.pid, e.words[1].clone()), e.ms);
            }
            Some("REL") => {
                if let Some(start) = open.remove(&(e.pid, e.words[1].clone())) {
                    intervals
                        .entry(e.words[1].clone())
                        .or_default()
                        .push((start, e.ms, e.pid));
                }
            }
            _ => {}
        }
    }
    for ((pid, vol), start) in open {
        let end = h.lives.get(&pid).and_then(|l| l.end_ms).unwrap_or(u64::MAX);
        intervals.entry(vol).or_default().push((start, end, pid));
    }
    let mut holds = 0;
    for (vol, iv) in intervals.iter_mut() {
        iv.sort();
        holds += iv.len();
        for w in iv.windows(2) {
            let ((s1, e1, p1), (s2, _, p2)) = (w[0], w[1]);
            if p1 != p2 && s2 < e1 {
                h.violations.push(format!(
                    "{vol}: pid {p2} acquired it at {s2} while pid {p1} held it ({s1}..{e1})"
                ));
            }
        }
    }

    // What the LUN proves: a fresh host (recovering any dead one) reads
    // back every acknowledged write.
    let checker = Pool::open_path(&pool_path, &shared_opts(7, &dir)).unwrap();
    let mut verified = 0u64;
    for n in 0..VOLUMES {
        let name = format!("vol-{n}");
        let vol = {
            let until = Instant::now() + Duration::from_secs(20);
            loop {
                match checker.open_volume(&name) {
                    Ok(v) => break v,
                    Err(Error::Busy { .. }) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Err(e) => panic!("opening {name} to verify it: {e}"),
                }
            }
        };
        for block in 1..BLOCKS {
            let mut buf = vec![0u8; BS];
            vol.read(block * 8, &mut buf).unwrap();
            let issued: Vec<&Event> = events
                .iter()
                .filter(|e| {
                    e.words.len() == 4 && e.words[1] == name && e.words[2] == block.to_string()
                })
                .collect();
            let acked = issued.iter().rev().find(|e| e.words[0] == "A");
            let acked_issue_ms = acked.and_then(|a| {
                issued
                    .iter()
                    .find(|e| e.words[0] == "I" && e.words[3] == a.words[3])
                    .map(|e| e.ms)
            });
            let got_zero = buf.iter().all(|&b| b == 0);
            let word = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
            if !got_zero && (word(0) != n as u64 || word(1) != block) {
                h.violations.push(format!(
                    "{name} block {block} holds data of volume {} block {}",
                    word(0),
                    word(1)
                ));
                continue;
            }
            let value = word(2).to_string();
            let ok = match (acked, acked_issue_ms) {
                (Some(a), Some(t)) => {
                    !got_zero
                        && (value == a.words[3]
                            || issued
                                .iter()
                                .any(|e| e.words[0] == "I" && e.ms >= t && e.words[3] == value))
                }
                _ => {
                    got_zero
                        || issued
                            .iter()
                            .any(|e| e.words[0] == "I" && e.words[3] == value)
                }
            };
            if !ok {
                h.violations.push(format!(
                    "{name} block {block}: reads {} but the last acknowledged write was {:?}",
                    if got_zero { "zeros".to_string() } else { value },
                    acked.map(|a| &a.words[3])
                ));
            }
            verified += 1;
        }
    }
    checker.close().unwrap();
    let dev = thinlun::dev::FileDevice::open(&pool_path, false).unwrap();
    let report = thinlun::check::check(&dev, "pool").unwrap();
    if !report.is_clean() {
        h.violations.push(format!("check: {:?}", report.errors));
    }

    let acked = events
        .iter()
        .filter(|e| e.words.first().map(String::as_str) == Some("A"))
        .count();
    let f = &h.figures;
    eprintln!(
        "multihost: {} host runs, {holds} volume activations, {acked} acknowledged writes, {verified} blocks verified; faults: {} SIGKILL, {} short pauses, {} pauses past the dead time ({} ended by the watchdog), {} restarts after errors; {} violations",
        h.hosts.iter().map(|x| x.runs).sum::<u32>(),
        f.kills,
        f.short_pauses,
        f.long_pauses,
        f.watchdog_kills,
        f.restarts,
        h.violations.len()
    );
    assert!(
        h.violations.is_empty(),
        "violations:\n{}",
        h.violations.join("\n")
    );
    assert!(holds > 0 && acked > 0, "the hosts did no work");
    let _ = std::fs::remove_dir_all(&dir);
}
