//! A vhost-user-blk front end without a VM: the `virtio-driver` crate's
//! vhost-user transport and virtio-blk queue, driven as a guest driver
//! would drive them. One virtqueue; requests are kept in flight
//! continuously (a completion is replaced by a new request at once, as fio
//! does), and the completion eventfd is waited on with `poll`, as a guest
//! waits for an interrupt.

use crate::pattern::{Measured, Pattern};
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};
use thinlun_benches::fill_pattern;
use virtio_driver::{
    VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkReqBuf,
    VirtioBlkTransport, VirtioFeatureFlags,
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

/// A connected vhost-user-blk device with one queue.
pub struct Client {
    // The queue lives in the transport's queue memory: dropped first.
    queue: VirtioBlkQueue<'static, usize>,
    transport: Box<VirtioBlkTransport>,
    mem: DataMem,
    slot_bytes: usize,
    slots: usize,
    pub capacity_bytes: u64,
}

impl Client {
    /// Connects to `sock` (retrying for up to `wait` while the server
    /// starts) and sets up one queue and `slots` data buffers of
    /// `slot_bytes` each.
    pub fn connect(
        sock: &Path,
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
                .bits();
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
        let mut queues = VirtioBlkQueue::<usize>::setup_queues(transport.as_mut(), 1, QUEUE_SIZE)?;
        let mut queue = queues.pop().expect("one queue");
        queue.set_used_notif_enabled(true);
        let mem = DataMem::new(slots * slot_bytes)?;
        transport.map_mem_region(mem.ptr as usize, mem.len, mem.file.as_raw_fd(), 0)?;
        for i in 0..slots {
            // SAFETY: slot i of the mapping.
            let s =
                unsafe { std::slice::from_raw_parts_mut(mem.ptr.add(i * slot_bytes), slot_bytes) };
            fill_pattern(s, 0x7777 + i as u64);
        }
        Ok(Client {
            queue,
            transport,
            mem,
            slot_bytes,
            slots,
            capacity_bytes,
        })
    }

    /// Runs `pattern` with `qd` requests of `bs` bytes in flight for about
    /// `secs` (or until the pattern is exhausted); reads or writes.
    pub fn run(
        &mut self,
        pattern: &mut Pattern,
        qd: usize,
        bs: usize,
        write: bool,
        secs: f64,
    ) -> io::Result<Measured> {
        assert!(qd <= self.slots && bs <= self.slot_bytes && qd < QUEUE_SIZE as usize);
        let notifier = self.transport.get_submission_notifier(0);
        let cfd = self.transport.get_completion_fd(0);
        let mut started = vec![Instant::now(); qd];
        let mut lat: Vec<f64> = Vec::new();
        let mut inflight = 0usize;
        let mut free: Vec<usize> = (0..qd).rev().collect();
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs_f64(secs);
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
                    // SAFETY: slot `slot` of the registered mapping; no
                    // other request in flight uses it.
                    let buf = unsafe { self.mem.ptr.add(slot * self.slot_bytes) };
                    started[slot] = Instant::now();
                    unsafe {
                        if write {
                            self.queue.write_raw(off, buf, bs, slot)?;
                        } else {
                            self.queue.read_raw(off, buf, bs, slot)?;
                        }
                    }
                    inflight += 1;
                    added = true;
                }
            }
            if added && self.queue.avail_notif_needed() {
                notifier.notify()?;
            }
            if inflight == 0 {
                break;
            }
            // Reap.
            done.clear();
            done.extend(self.queue.completions().map(|c| (c.context, c.ret)));
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
        Ok(Measured::from_latencies(
            lat,
            (last - t0).as_secs_f64(),
            exhausted,
        ))
    }
}
