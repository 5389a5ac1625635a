//! A vhost-user-blk front end without a VM: the `virtio-driver` crate's
//! vhost-user transport and virtio-blk queue, driven as a guest driver
//! would drive them. One or more virtqueues, each driven by a thread of
//! its own (as a guest's per-CPU queues are); requests are kept in flight
//! continuously (a completion is replaced by a new request at once, as fio
//! does), and each queue's completion eventfd is waited on with `poll`, as
//! a guest waits for an interrupt.

use crate::pattern::{Measured, Pattern};
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};
use thinlun_benches::fill_pattern;
use virtio_driver::{
    EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue,
    VirtioBlkReqBuf, VirtioBlkTransport, VirtioFeatureFlags,
};

const QUEUE_SIZE: u16 = 128;

/// Shared memory for data buffers ("guest RAM"), registered with the
/// back end.
struct DataMem {
    ptr: *mut u8,
    len: usize,
    file: File,
}

impl DataMem {
    fn new(len: usize) -> io::Result<DataMem> {
        // SAFETY: a fresh memfd, sized, then mapped shared; the mapping
        // lives as long as the DataMem.
        unsafe {
            let fd = libc::memfd_create(c"thinlun-compare".as_ptr(), 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let file = File::from_raw_fd(fd);
            file.set_len(len as u64)?;
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(DataMem {
                ptr: ptr as *mut u8,
                len,
                file,
            })
        }
    }
}

impl Drop for DataMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// A connected vhost-user-blk device with one or more queues.
pub struct Client {
    // The queues live in the transport's queue memory: dropped first.
    queues: Vec<VirtioBlkQueue<'static, usize>>,
    transport: Box<VirtioBlkTransport>,
    mem: DataMem,
    slot_bytes: usize,
    slots: usize,
    pub capacity_bytes: u64,
}

impl Client {
    /// Connects to `sock` (retrying for up to `wait` while the server
    /// starts) and sets up `nq` queues and `slots` data buffers of
    /// `slot_bytes` each.
    pub fn connect(
        sock: &Path,
        nq: usize,
        slots: usize,
        slot_bytes: usize,
        wait: Duration,
    ) -> io::Result<Client> {
        let features = VirtioFeatureFlags::VERSION_1.bits()
            | VirtioFeatureFlags::RING_EVENT_IDX.bits()
            | (VirtioBlkFeatureFlags::FLUSH
                | VirtioBlkFeatureFlags::SEG_MAX
                | VirtioBlkFeatureFlags::SIZE_MAX
                | VirtioBlkFeatureFlags::BLK_SIZE
                | VirtioBlkFeatureFlags::TOPOLOGY)
                .bits()
            | if nq > 1 {
                VirtioBlkFeatureFlags::MQ.bits()
            } else {
                0
            };
        let path = sock
            .to_str()
            .ok_or_else(|| io::Error::other("socket path is not UTF-8"))?;
        let start = Instant::now();
        let vu = loop {
            match VhostUser::<VirtioBlkConfig, VirtioBlkReqBuf>::new(path, features) {
                Ok(v) => break v,
                Err(e) if start.elapsed() < wait => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "connecting to {}: {e}",
                        sock.display()
                    )))
                }
            }
        };
        let mut transport: Box<VirtioBlkTransport> = Box::new(vu);
        let cfg = transport.get_config()?;
        let capacity = cfg.capacity;
        let capacity_bytes = u64::from(capacity) * 512;
        let mut queues =
            VirtioBlkQueue::<usize>::setup_queues(transport.as_mut(), nq.max(1), QUEUE_SIZE)?;
        for q in &mut queues {
            q.set_used_notif_enabled(true);
        }
        let mem = DataMem::new(slots * slot_bytes)?;
        transport.map_mem_region(mem.ptr as usize, mem.len, mem.file.as_raw_fd(), 0)?;
        for i in 0..slots {
            // SAFETY: slot i of the mapping.
            let s =
                unsafe { std::slice::from_raw_parts_mut(mem.ptr.add(i * slot_bytes), slot_bytes) };
            fill_pattern(s, 0x7777 + i as u64);
        }
        Ok(Client {
            queues,
            transport,
            mem,
            slot_bytes,
            slots,
            capacity_bytes,
        })
    }

    /// Runs `pattern` with `qd` requests of `bs` bytes in flight for about
    /// `secs` (or until the pattern is exhausted); reads or writes. With
    /// several queues, the pattern is split between them and so are the
    /// `qd` requests (`qd / queues` each), one thread per queue.
    pub fn run(
        &mut self,
        pattern: Pattern,
        qd: usize,
        bs: usize,
        write: bool,
        secs: f64,
    ) -> io::Result<Measured> {
        let nq = self.queues.len();
        let per = qd.div_ceil(nq);
        assert!(nq * per <= self.slots && bs <= self.slot_bytes && per < QUEUE_SIZE as usize);
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs_f64(secs);
        let base = self.mem.ptr as usize;
        let slot_bytes = self.slot_bytes;
        let transport = &self.transport;
        let results: Vec<io::Result<Driven>> = std::thread::scope(|s| {
            let threads: Vec<_> = self
                .queues
                .iter_mut()
                .zip(pattern.split(nq))
                .enumerate()
                .map(|(i, (queue, mut pat))| {
                    let notifier = transport.get_submission_notifier(i);
                    let cfd = transport.get_completion_fd(i);
                    let buf = move |slot: usize| (base + (i * per + slot) * slot_bytes) as *mut u8;
                    s.spawn(move || {
                        drive(
                            queue,
                            &*notifier,
                            &cfd,
                            &buf,
                            &mut pat,
                            per,
                            bs,
                            write,
                            (t0, until),
                        )
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("queue thread panicked"))
                .collect()
        });
        let mut lat = Vec::new();
        let mut last = t0;
        let mut exhausted = false;
        for r in results {
            let d = r?;
            lat.extend(d.lat);
            last = last.max(d.last);
            exhausted |= d.exhausted;
        }
        Ok(Measured::from_latencies(
            lat,
            (last - t0).as_secs_f64(),
            exhausted,
        ))
    }
}

/// What one queue's thread saw.
struct Driven {
    lat: Vec<f64>,
    last: Instant,
    exhausted: bool,
}

/// Keeps `qd` requests in flight on one queue until `until` (or until the
/// pattern runs out), then waits for the rest. `buf(slot)` is the data
/// buffer of slot `slot` (`0..qd`), private to this queue.
#[allow(clippy::too_many_arguments)]
fn drive(
    queue: &mut VirtioBlkQueue<'static, usize>,
    notifier: &dyn QueueNotifier,
    cfd: &EventFd,
    buf: &dyn Fn(usize) -> *mut u8,
    pattern: &mut Pattern,
    qd: usize,
    bs: usize,
    write: bool,
    (t0, until): (Instant, Instant),
) -> io::Result<Driven> {
    let mut started = vec![t0; qd];
    let mut lat: Vec<f64> = Vec::new();
    let mut inflight = 0usize;
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut exhausted = false;
    let mut errors = 0u64;
    let mut done: Vec<(usize, i32)> = Vec::with_capacity(qd);
    let mut last = t0;
    loop {
        // Refill.
        let mut added = false;
        if !exhausted && Instant::now() < until {
            while let Some(slot) = free.pop() {
                let Some(off) = pattern.next() else {
                    exhausted = true;
                    free.push(slot);
                    break;
                };
                started[slot] = Instant::now();
                // SAFETY: the slot's buffer lies in the registered mapping,
                // and no other request in flight uses it.
                unsafe {
                    if write {
                        queue.write_raw(off, buf(slot), bs, slot)?;
                    } else {
                        queue.read_raw(off, buf(slot), bs, slot)?;
                    }
                }
                inflight += 1;
                added = true;
            }
        }
        if added && queue.avail_notif_needed() {
            notifier.notify()?;
        }
        if inflight == 0 {
            break;
        }
        // Reap.
        done.clear();
        done.extend(queue.completions().map(|c| (c.context, c.ret)));
        if done.is_empty() {
            let mut pfd = libc::pollfd {
                fd: cfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
            if r == 0 {
                return Err(io::Error::other(format!(
                    "no completion within 5 s ({inflight} requests in flight)"
                )));
            }
            let _ = cfd.read();
            continue;
        }
        let now = Instant::now();
        for &(slot, ret) in &done {
            if ret != 0 {
                errors += 1;
            }
            lat.push((now - started[slot]).as_secs_f64() * 1e6);
            free.push(slot);
            inflight -= 1;
        }
        last = now;
    }
    if errors > 0 {
        return Err(io::Error::other(format!("{errors} requests failed")));
    }
    Ok(Driven {
        lat,
        last,
        exhausted,
    })
}
