//! One host of the multi-host harness (tests/multihost.rs): joins a shared
//! pool as `--host-id`, then does random pool work until the stop file
//! appears, logging what it did so the harness can prove safety:
//!
//! - `ACQ vol` / `REL vol`: it holds (stops holding) write access to vol;
//! - `I vol block value` before a write is issued, `A vol block value`
//!   once a flush after it returned (acknowledged);
//! - `VIOLATION ...` when the on-disk canary (sanlock's devcount idea)
//!   shows another host wrote a volume this host holds.
//!
//! Each line starts with the boot-time clock in ms and the pid. The
//! contested volumes `vol-N` are written by every host in turn; block 0
//! holds the canary, every other block (volume id, block, value) so a
//! block handed to two volumes would show the wrong volume.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use thinlun::lease::now_ms;
use thinlun::{Error, HostOptions, OpenOptions, Pool, Volume};
use thinlun_tests::Rng;

const BS: usize = 4096;
const BLOCKS: u64 = 64;

struct Args {
    pool: PathBuf,
    host_id: u32,
    log: PathBuf,
    stop: PathBuf,
    run_dir: PathBuf,
    seed: u64,
    volumes: u32,
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let mut next = || it.next().expect("missing argument");
    Args {
        pool: next().into(),
        host_id: next().parse().expect("host id"),
        log: next().into(),
        stop: next().into(),
        run_dir: next().into(),
        seed: next().parse().expect("seed"),
        volumes: next().parse().expect("volume count"),
    }
}

struct Log(File);

impl Log {
    fn line(&mut self, text: &str) {
        // One write per line (O_APPEND): lines of a killed process are whole.
        let l = format!("{} {} {text}\n", now_ms(), std::process::id());
        let _ = self.0.write_all(l.as_bytes());
    }
}

/// Block content: (volume number, block, value) repeated.
fn content(vol: u32, block: u64, value: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for chunk in b.chunks_mut(24) {
        if chunk.len() == 24 {
            chunk[0..8].copy_from_slice(&(vol as u64).to_le_bytes());
            chunk[8..16].copy_from_slice(&block.to_le_bytes());
            chunk[16..24].copy_from_slice(&value.to_le_bytes());
        }
    }
    b
}

fn canary(host: u32, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    b[0..8].copy_from_slice(b"CANARY\0\0");
    b[8..12].copy_from_slice(&host.to_le_bytes());
    b[12..16].copy_from_slice(&std::process::id().to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b
}

fn main() {
    let a = parse();
    let mut log = Log(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.log)
        .expect("log"));
    let mut rng = Rng::with_seed(a.seed | 1);
    let opts = OpenOptions {
        read_only: false,
        host: Some(HostOptions {
            host_id: a.host_id,
            host_name: Some(format!("h{}", a.host_id)),
            watchdog: true,
            run_dir: Some(a.run_dir.clone()),
        }),
        boot_id: None,
        ..OpenOptions::default()
    };
    let pool = match Pool::open_path(&a.pool, &opts) {
        Ok(p) => p,
        Err(e) => {
            log.line(&format!("ERR join: {e}"));
            std::process::exit(3);
        }
    };
    log.line("JOINED");
    let mut value = (a.seed & 0xffff) << 32;
    let mut round = 0u64;
    while !a.stop.exists() {
        round += 1;
        let r = match rng.u64(..10) {
            0..=5 => contested(&pool, &a, &mut rng, &mut log, &mut value),
            6..=7 => own_snapshots(&pool, &a, &mut rng, round),
            _ => own_clone(&pool, &a, &mut rng, round),
        };
        match r {
            Ok(()) | Err(Error::Busy { .. }) | Err(Error::NoSpace) => {}
            Err(e) => {
                log.line(&format!("ERR {e}"));
                if pool.lease_lost().is_some() {
                    std::process::exit(4);
                }
            }
        }
    }
    match pool.close() {
        Ok(()) => log.line("CLOSED"),
        Err(e) => log.line(&format!("ERR close: {e}")),
    }
}

/// Activates a contested volume, writes to it, checks the canary, releases.
fn contested(
    pool: &Pool,
    a: &Args,
    rng: &mut Rng,
    log: &mut Log,
    value: &mut u64,
) -> thinlun::Result<()> {
    let n = rng.u64(..a.volumes as u64) as u32;
    let name = format!("vol-{n}");
    let vol = pool.open_volume(&name)?;
    log.line(&format!("ACQ {name}"));
    let r = write_some(&vol, n, &name, rng, log, value, a.host_id);
    // Stop writing before saying so: the release happens in the drop.
    log.line(&format!("REL {name}"));
    drop(vol);
    r
}

fn write_some(
    vol: &Volume,
    n: u32,
    name: &str,
    rng: &mut Rng,
    log: &mut Log,
    value: &mut u64,
    host: u32,
) -> thinlun::Result<()> {
    let seq = rng.u64(..);
    vol.write(0, &canary(host, seq))?;
    vol.flush()?;
    for _ in 0..1 + rng.u64(..4) {
        let mut pending = Vec::new();
        for _ in 0..1 + rng.u64(..8) {
            let block = 1 + rng.u64(..BLOCKS - 1);
            *value += 1;
            log.line(&format!("I {name} {block} {value}"));
            vol.write(block * 8, &content(n, block, *value))?;
            pending.push((block, *value));
        }
        let mut buf = vec![0u8; BS];
        vol.read(0, &mut buf)?;
        if buf != canary(host, seq) {
            log.line(&format!(
                "VIOLATION canary of {name} overwritten while held"
            ));
        }
        vol.flush()?;
        for (block, v) in pending {
            log.line(&format!("A {name} {block} {v}"));
        }
        std::thread::sleep(Duration::from_millis(rng.u64(..20)));
    }
    Ok(())
}

/// Snapshots of this host's own volume, and removal of old ones.
fn own_snapshots(pool: &Pool, a: &Args, rng: &mut Rng, round: u64) -> thinlun::Result<()> {
    let name = format!("h{}-disk", a.host_id);
    if pool.volume_info(&name).is_err() {
        pool.create_volume(&name, BLOCKS * BS as u64)?;
    }
    {
        let v = pool.open_volume(&name)?;
        for _ in 0..4 {
            let b = rng.u64(..BLOCKS);
            v.write(b * 8, &content(1000 + a.host_id, b, round))?;
        }
        v.flush()?;
    }
    pool.create_snapshot(&format!("{name}@r{round}"))?;
    let snaps: Vec<String> = pool
        .volumes()
        .into_iter()
        .filter(|v| v.snapshot && v.snapshot_of.as_deref() == Some(name.as_str()))
        .map(|v| v.name)
        .collect();
    if snaps.len() > 3 {
        pool.remove_volume(&snaps[0], false)?;
    }
    Ok(())
}

/// A linked clone of one of its snapshots, written and removed.
fn own_clone(pool: &Pool, a: &Args, rng: &mut Rng, round: u64) -> thinlun::Result<()> {
    let base = format!("h{}-disk", a.host_id);
    let Some(snap) = pool
        .volumes()
        .into_iter()
        .find(|v| v.snapshot && v.snapshot_of.as_deref() == Some(base.as_str()))
    else {
        return Ok(());
    };
    let clone = format!("h{}-clone{round}", a.host_id);
    pool.clone_volume(&snap.name, &clone)?;
    {
        let v = pool.open_volume(&clone)?;
        let b = rng.u64(..BLOCKS);
        v.write(b * 8, &content(2000 + a.host_id, b, round))?;
        v.flush()?;
    }
    pool.remove_volume(&clone, false)
}
