//! thinlun through the engine directly, in this process: an `IoQueue` kept
//! `qd` deep (as fio keeps its iodepth), or `Volume::submit` batches of
//! `qd` requests, as the vhost-user-blk server issues one drained
//! virtqueue.

use crate::pattern::{Measured, Pattern};
use std::time::{Duration, Instant};
use thinlun::dev::AlignedBuf;
use thinlun::{IoQueue, QueueOp, Request, Volume, SECTOR_SIZE};
use thinlun_benches::fill_pattern;

/// User + system CPU time of this process (all threads, including the
/// pool's background committer).
pub fn self_cpu() -> Duration {
    cpu_of(libc::RUSAGE_SELF)
}

/// User + system CPU time of the waited-for children.
pub fn children_cpu() -> Duration {
    cpu_of(libc::RUSAGE_CHILDREN)
}

/// Context switches of this process so far (all threads).
pub fn self_switches() -> u64 {
    // SAFETY: a zeroed rusage is valid for getrusage to fill.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    (ru.ru_nvcsw + ru.ru_nivcsw) as u64
}

fn cpu_of(who: libc::c_int) -> Duration {
    // SAFETY: a zeroed rusage is valid for getrusage to fill.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `qd` buffers of `bs` bytes, each with its own pattern.
fn data_bufs(qd: usize, bs: usize) -> Vec<AlignedBuf> {
    (0..qd)
        .map(|i| {
            let mut b = AlignedBuf::zeroed(bs);
            fill_pattern(&mut b, 0x3333 + i as u64);
            b
        })
        .collect()
}

/// The figures of a run that started at `t0` with `cpu0` of CPU used.
fn measured(lat: Vec<f64>, t0: Instant, cpu0: Duration, exhausted: bool) -> Measured {
    let secs = t0.elapsed().as_secs_f64();
    let cpu = self_cpu() - cpu0;
    let mut m = Measured::from_latencies(lat, secs, exhausted);
    if m.ios > 0 {
        m.cpu_us_per_io = Some(cpu.as_secs_f64() * 1e6 / m.ios as f64);
    }
    m
}

/// Batches of up to `qd` requests of `bs` bytes for about `secs` (or until
/// the pattern is exhausted). Every request of a batch is given the batch's
/// latency: they are handed over together and complete together.
pub fn run_batches(
    vol: &Volume,
    pattern: &mut Pattern,
    qd: usize,
    bs: usize,
    write: bool,
    secs: f64,
) -> Measured {
    let mut bufs = data_bufs(qd, bs);
    let mut lat: Vec<f64> = Vec::new();
    let mut exhausted = false;
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(secs);
    while Instant::now() < until {
        let offs: Vec<u64> = (0..qd).map_while(|_| pattern.next()).collect();
        if offs.len() < qd {
            exhausted = true;
        }
        if offs.is_empty() {
            break;
        }
        let mut reqs: Vec<Request> = bufs
            .iter_mut()
            .zip(&offs)
            .map(|(b, &off)| {
                let sector = off / SECTOR_SIZE;
                if write {
                    Request::Write { sector, data: b }
                } else {
                    Request::Read { sector, buf: b }
                }
            })
            .collect();
        let t = Instant::now();
        for r in vol.submit(&mut reqs) {
            if let Err(e) = r {
                panic!("thinlun request failed: {e}");
            }
        }
        let us = t.elapsed().as_secs_f64() * 1e6;
        lat.extend(std::iter::repeat_n(us, offs.len()));
        if exhausted {
            break;
        }
    }
    measured(lat, t0, cpu0, exhausted)
}

/// An `IoQueue` kept `qd` deep with requests of `bs` bytes for about
/// `secs` (or until the pattern is exhausted); latency per request, from
/// submission to completion.
pub fn run_queue(
    vol: &Volume,
    pattern: &mut Pattern,
    qd: usize,
    bs: usize,
    write: bool,
    secs: f64,
) -> Measured {
    let mut q: IoQueue<AlignedBuf> = vol.queue(qd).expect("setting up the queue");
    let mut free = data_bufs(qd, bs);
    let mut started: Vec<Instant> = Vec::new();
    let mut lat: Vec<f64> = Vec::new();
    let mut done = Vec::with_capacity(qd);
    let mut exhausted = false;
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(secs);
    let mut collect = |done: &mut Vec<thinlun::Completion<AlignedBuf>>,
                       free: &mut Vec<AlignedBuf>,
                       started: &[Instant]| {
        let now = Instant::now();
        for c in done.drain(..) {
            if let Err(e) = c.result {
                panic!("thinlun request failed: {e}");
            }
            lat.push((now - started[c.tag as usize]).as_secs_f64() * 1e6);
            match c.op {
                QueueOp::Read { buf, .. } | QueueOp::Write { buf, .. } => free.push(buf),
                _ => {}
            }
        }
    };
    while Instant::now() < until {
        while let Some(buf) = free.pop() {
            let Some(off) = pattern.next() else {
                exhausted = true;
                free.push(buf);
                break;
            };
            let sector = off / SECTOR_SIZE;
            let op = if write {
                QueueOp::Write { sector, buf }
            } else {
                QueueOp::Read { sector, buf }
            };
            q.submit(started.len() as u64, op);
            started.push(Instant::now());
        }
        if exhausted {
            break;
        }
        q.complete(1, &mut done);
        collect(&mut done, &mut free, &started);
    }
    q.drain(&mut done);
    collect(&mut done, &mut free, &started);
    measured(lat, t0, cpu0, exhausted)
}
