//! A vhost-user-blk benchmark client (no VM): random 4 KiB I/O at a fixed
//! queue depth on each queue, against any vhost-user-blk server (thinctl
//! serve, qemu-storage-daemon).
//!
//!     vhost_bench SOCKET [randwrite|randread|seqwrite] [QUEUES] [QD] [SECS] [RANGE_MIB] [BS]
//!
//! Prints one line: mode, queues, depth, IOPS, MiB/s, errors.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};
use virtio_driver::{VhostUser, VirtioBlkQueue, VirtioBlkTransport, VirtioFeatureFlags};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let sock = a
        .get(1)
        .expect("usage: vhost_bench SOCKET [mode] [queues] [qd] [secs] [range_mib] [bs]");
    let mode = a.get(2).map_or("randwrite", |s| s.as_str()).to_string();
    let nq: usize = a.get(3).map_or(1, |s| s.parse().unwrap());
    let qd: usize = a.get(4).map_or(32, |s| s.parse().unwrap());
    let secs: f64 = a.get(5).map_or(5.0, |s| s.parse().unwrap());
    let range: u64 = a.get(6).map_or(1024, |s| s.parse().unwrap()) << 20;
    let bs: usize = a.get(7).map_or(4096, |s| s.parse().unwrap());

    let features = VirtioFeatureFlags::VERSION_1.bits()
        | VirtioFeatureFlags::RING_EVENT_IDX.bits()
        | (1 << 12); // MQ
    let vu = VhostUser::new(sock, features).expect("connect");
    let mut t: Box<VirtioBlkTransport> = Box::new(vu);
    let mut queues = VirtioBlkQueue::<usize>::setup_queues(&mut *t, nq, 128).expect("queues");
    for q in queues.iter_mut() {
        // Ask for completion interrupts (used_event is kept current).
        q.set_used_notif_enabled(true);
    }

    // Buffers: qd per queue, in shared memory the server maps.
    let len = nq * qd * bs;
    // SAFETY: a fresh memfd mapped shared for the whole run.
    let (ptr, _file) = unsafe {
        let fd = libc::memfd_create(c"bench".as_ptr(), 0);
        assert!(fd >= 0);
        let f = File::from_raw_fd(fd);
        f.set_len(len as u64).unwrap();
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        (p as *mut u8, f)
    };
    t.map_mem_region(ptr as usize, len, _file.as_raw_fd(), 0)
        .expect("map memory");
    // SAFETY: the mapping above, len bytes; each request uses its own slot.
    let mem = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    for (i, b) in mem.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }

    let blocks = range / bs as u64;
    let mut seeds: Vec<u64> = (0..nq as u64)
        .map(|q| 0x9e37_79b9 ^ ((q + 1) * 7919))
        .collect();
    let mut seq: Vec<u64> = (0..nq as u64).map(|q| q * blocks / nq as u64).collect();
    let next = |q: usize, seeds: &mut [u64], seq: &mut [u64]| -> u64 {
        if mode == "seqwrite" {
            let b = seq[q] % blocks;
            seq[q] += 1;
            b * bs as u64
        } else {
            let x = &mut seeds[q];
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            (*x % blocks) * bs as u64
        }
    };
    let write = mode != "randread";
    let submit = |q: &mut VirtioBlkQueue<usize>, slot: usize, off: u64, mem: &mut [u8]| {
        let buf = &mut mem[slot * bs..(slot + 1) * bs];
        if write {
            q.write(off, buf, slot).unwrap();
        } else {
            q.read(off, buf, slot).unwrap();
        }
    };

    // Each queue is driven from this one thread: the client is cheap
    // next to the server, and one thread keeps the measurement simple.
    for (qi, q) in queues.iter_mut().enumerate() {
        for k in 0..qd {
            let off = next(qi, &mut seeds, &mut seq);
            submit(q, qi * qd + k, off, mem);
        }
        t.get_submission_notifier(qi).notify().unwrap();
    }
    let fds: Vec<_> = (0..nq).map(|q| t.get_completion_fd(q)).collect();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let (mut done, mut errors) = (0u64, 0u64);
    let mut inflight = nq * qd;
    let mut stopping = false;
    while inflight > 0 {
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: valid pollfd array.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if Instant::now() >= end {
            stopping = true;
        }
        for (qi, q) in queues.iter_mut().enumerate() {
            if pfds[qi].revents & libc::POLLIN != 0 {
                let _ = fds[qi].read();
            }
            let slots: Vec<(usize, i32)> = q.completions().map(|c| (c.context, c.ret)).collect();
            if slots.is_empty() {
                continue;
            }
            for (slot, ret) in slots {
                inflight -= 1;
                done += 1;
                if ret != 0 {
                    errors += 1;
                }
                if !stopping {
                    let off = next(qi, &mut seeds, &mut seq);
                    submit(q, slot, off, mem);
                    inflight += 1;
                }
            }
            t.get_submission_notifier(qi).notify().unwrap();
        }
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "{mode} queues={nq} qd={qd} bs={bs}: {:.0} IOPS, {:.1} MiB/s, {done} requests in {el:.1} s, {errors} errors",
        done as f64 / el,
        done as f64 * bs as f64 / el / (1 << 20) as f64
    );
}
