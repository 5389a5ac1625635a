//! Hostile vhost-user front ends against `thinctl daemon`: one daemon
//! serves two volumes, a front end that sends what QEMU never would works
//! on one (raw messages, `hostile/wire.rs`), and a real virtio driver
//! (`common/vhost.rs`) checks that the other, and the daemon, go on. Every
//! message that asks for a reply gets one or a closed connection, never a
//! hang; the daemon never dies (a SIGBUS from guest memory would end it
//! with status 135) and ends with the threads and descriptors it had.

#[path = "hostile/wire.rs"]
mod wire;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinlun_tests::Rng;

mod common;
use common::daemon::*;
use common::vhost::*;
use wire::*;

/// One hostile sequence against the target's `hostile` volume.
type Case = fn(&Target);

/// A daemon serving `hostile` (the target) and `good` (the bystander).
struct Target {
    lab: Lab,
    daemon: Option<Child>,
    hostile: PathBuf,
    good: PathBuf,
}

impl Target {
    fn start(tag: &str) -> Target {
        let lab = Lab::new(tag);
        lab.ctl(&["create", "hostile", "64M"]);
        lab.ctl(&["create", "good", "64M"]);
        let daemon = lab.start(&["daemon"]);
        let (hostile, good) = (lab.path("hostile.sock"), lab.path("good.sock"));
        for (name, sock) in [("hostile", &hostile), ("good", &good)] {
            lab.ctl(&["serve-add", name, "--socket", sock.to_str().unwrap()]);
        }
        Target {
            lab,
            daemon: Some(daemon),
            hostile,
            good,
        }
    }

    fn pid(&self) -> u32 {
        self.daemon.as_ref().unwrap().id()
    }

    /// A hostile front end on `hostile`, past QEMU's handshake.
    fn front_end(&self) -> FrontEnd {
        let mut fe = connect_when_listening(&self.hostile);
        fe.handshake().unwrap();
        fe
    }

    /// The daemon is running, and a real driver's write and read on
    /// `sock` complete and agree.
    #[track_caller]
    fn assert_serves(&mut self, sock: &Path, seed: u64) {
        if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
            panic!("the daemon exited with {st}:\n{}", self.lab.log());
        }
        let mut c = connect_client(sock);
        let want = pattern(seed, 64 << 10);
        c.data(0, want.len()).copy_from_slice(&want);
        assert_eq!(c.write(seed % 1000 * 128, 0, want.len()), S_OK);
        assert_eq!(c.read(seed % 1000 * 128, 1 << 20, want.len()), S_OK);
        same(c.data(1 << 20, want.len()), &want, "read back");
    }

    /// Both volumes serve, and the log says what the daemon did.
    #[track_caller]
    fn assert_both_serve(&mut self, log_has: &str) {
        let (h, g) = (self.hostile.clone(), self.good.clone());
        self.assert_serves(&g, 1);
        self.assert_serves(&h, 2);
        if !log_has.is_empty() {
            let log = self.lab.log();
            assert!(log.contains(log_has), "no {log_has:?} in the log:\n{log}");
        }
    }

    /// Threads and descriptors once both volumes have served a front end
    /// (the first activation starts threads of its own).
    fn warm_resources(&mut self) -> (usize, usize) {
        self.assert_both_serve("");
        let pid = self.pid();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = resources(pid);
            std::thread::sleep(Duration::from_millis(500));
            if resources(pid) == before || Instant::now() > deadline {
                return before;
            }
        }
    }

    fn stop(mut self) {
        let daemon = self.daemon.take().unwrap();
        let (h, g) = (self.hostile.clone(), self.good.clone());
        self.lab.stop(daemon, &[&h, &g]);
    }
}

/// Connects once the server listens again (after a refused front end the
/// daemon is between two connections for a moment).
fn connect_when_listening(sock: &Path) -> FrontEnd {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match FrontEnd::connect(sock) {
            Ok(mut fe) => {
                if fe.alive() {
                    return fe;
                }
            }
            Err(e) => assert!(Instant::now() < deadline, "{}: {e}", sock.display()),
        }
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real driver, once the previous front end on the socket is gone.
fn connect_client(sock: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The virtio driver panics on a refused connection: catch that
        // and retry while the server finishes with the last front end.
        let sock = sock.to_path_buf();
        match std::panic::catch_unwind(move || Client::connect(&sock, 1)) {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => panic!("no real front end could connect"),
        }
    }
}

/// Threads and open descriptors of a process. io_uring's worker threads
/// (`iou-wrk-*`) are left out: the kernel starts them for blocking
/// requests and keeps or ends them as it sees fit (one can stay for good).
fn resources(pid: u32) -> (usize, usize) {
    let threads = thread_names(pid)
        .iter()
        .filter(|n| !n.starts_with("iou-"))
        .count();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (threads, fds)
}

fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the daemon is back to `base` threads and descriptors.
#[track_caller]
fn assert_released(t: &Target, base: (usize, usize)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = resources(t.pid());
        if now == base {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon holds {now:?} (threads, fds) against {base:?} before; threads: {}",
            thread_names(t.pid()).join(", ")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn refused(a: std::io::Result<Answer>, what: &str) {
    let a = a.unwrap_or_else(|e| panic!("{what}: no answer (hang?): {e}"));
    assert!(a.refused(), "{what} was accepted: {a:?}");
}

/// The case of the issue: a 256 MiB region backed by a 1 MiB memfd, a
/// ring past the end of the file, a kick. Before, `thinctl` died of SIGBUS.
fn oversized_region(t: &Target) {
    let mut fe = t.front_end();
    let small = memfd(1 << 20, false);
    let table = mem_table(&[Region {
        gpa: 0,
        size: 256 << 20,
        uva: UVA,
        offset: 0,
    }]);
    refused(
        fe.call(SET_MEM_TABLE, &table, &[small.as_raw_fd()]),
        "SET_MEM_TABLE past the end of its file",
    );
    // Had it been accepted: a ring 128 MiB into the region, and a kick.
    let _ = fe.call(SET_VRING_NUM, &vring_state(0, 16), &[]);
    let _ = fe.call(
        SET_VRING_ADDR,
        &vring_addr(0, UVA + (128 << 20), UVA + (129 << 20), UVA + (130 << 20)),
        &[],
    );
    let k = eventfd();
    let _ = fe.call(SET_VRING_KICK, &0u64.to_le_bytes(), &[k.as_raw_fd()]);
    let _ = fe.call(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
    kick(&k);
    drop(fe);

    // The same through ADD_MEM_REG, and at an offset past the end.
    let mut fe = t.front_end();
    let r = Region {
        gpa: 0,
        size: 2 << 20,
        uva: UVA,
        offset: 0,
    };
    refused(
        fe.call(ADD_MEM_REG, &one_region(r), &[small.as_raw_fd()]),
        "ADD_MEM_REG past the end of its file",
    );
    let mut fe = t.front_end();
    let r = Region {
        gpa: 0,
        size: 4096,
        uva: UVA,
        offset: 1 << 20,
    };
    refused(
        fe.call(SET_MEM_TABLE, &mem_table(&[r]), &[small.as_raw_fd()]),
        "a region at an offset past the end of its file",
    );
}

#[test]
fn a_memory_table_its_files_do_not_back_is_refused() {
    let mut t = Target::start("oversized");
    oversized_region(&t);
    t.assert_both_serve("refusing the front end's memory table");
    t.stop();
}

/// Serves one read through a hand-made queue, then truncates the memory
/// file under the server and kicks again.
fn truncated_memory(t: &Target) {
    let mut fe = t.front_end();
    let mem = GuestMem::new(1 << 20, false);
    let ok = fe
        .call(
            SET_MEM_TABLE,
            &mem_table(&[mem.region()]),
            &[mem.file.as_raw_fd()],
        )
        .unwrap();
    assert_eq!(ok.value(), Some(0), "a sound memory table was refused");
    let (kick_fd, _call) = start_queue(&mut fe).unwrap();
    mem.queue_read(0, 0);
    kick(&kick_fd);
    let deadline = Instant::now() + Duration::from_secs(20);
    while mem.used_idx() != 1 {
        assert!(Instant::now() < deadline, "the first read never completed");
        std::thread::sleep(Duration::from_millis(10));
    }
    mem.queue_read(1, 1);
    mem.file.set_len(0).unwrap();
    kick(&kick_fd);
    // The server disconnects this front end: its next message finds the
    // connection closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match fe.call(GET_FEATURES, &[], &[]) {
            Ok(Answer::Closed) => break,
            Ok(Answer::Reply(_)) => {
                assert!(
                    Instant::now() < deadline,
                    "still connected after the fault:\n{}",
                    t.lab.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no answer after the fault: {e}"),
        }
    }
}

#[test]
fn a_memory_file_truncated_under_the_server_disconnects_only_its_front_end() {
    let mut t = Target::start("truncated");
    truncated_memory(&t);
    t.assert_both_serve("no longer backed by its file");
    t.stop();
}

#[test]
fn a_sealable_memfd_is_sealed_against_shrinking() {
    let mut t = Target::start("sealed");
    let mut fe = t.front_end();
    let mem = GuestMem::new(1 << 20, true);
    let a = fe
        .call(
            SET_MEM_TABLE,
            &mem_table(&[mem.region()]),
            &[mem.file.as_raw_fd()],
        )
        .unwrap();
    assert_eq!(a.value(), Some(0));
    let e = mem.file.set_len(0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "not sealed: {e}");
    drop(fe);
    t.assert_both_serve("");
    t.stop();
}

/// Rings outside guest memory, or running off its end.
fn rings_outside_memory(t: &Target) {
    let mem = GuestMem::new(1 << 20, false);
    let table = mem_table(&[mem.region()]);
    let mut fe = t.front_end();
    assert_eq!(
        fe.call(SET_MEM_TABLE, &table, &[mem.file.as_raw_fd()])
            .unwrap()
            .value(),
        Some(0)
    );
    assert_eq!(
        fe.call(SET_VRING_NUM, &vring_state(0, 16), &[])
            .unwrap()
            .value(),
        Some(0)
    );
    refused(
        fe.call(
            SET_VRING_ADDR,
            &vring_addr(0, UVA + (64 << 30), UVA, UVA),
            &[],
        ),
        "a descriptor table outside guest memory",
    );

    // Inside, but the tables run past the region's end.
    let mut fe = t.front_end();
    let _ = fe
        .call(SET_MEM_TABLE, &table, &[mem.file.as_raw_fd()])
        .unwrap();
    let _ = fe.call(SET_VRING_NUM, &vring_state(0, 256), &[]).unwrap();
    let end = UVA + (1 << 20) - 16;
    let a = fe
        .call(SET_VRING_ADDR, &vring_addr(0, end, end, end), &[])
        .unwrap();
    if !a.refused() {
        let k = eventfd();
        let _ = fe.call(SET_VRING_KICK, &0u64.to_le_bytes(), &[k.as_raw_fd()]);
        let _ = fe.call(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
        kick(&k);
        std::thread::sleep(Duration::from_millis(200));
        let _ = fe.call(GET_FEATURES, &[], &[]).unwrap();
    }
}

#[test]
fn vring_addresses_outside_guest_memory() {
    let mut t = Target::start("rings");
    rings_outside_memory(&t);
    t.assert_both_serve("");
    t.stop();
}

/// Ring sizes that are not powers of two, 0 and 32768 and past, and
/// queue indexes past the device's queues.
fn bad_sizes_and_indexes(t: &Target) {
    let mut fe = t.front_end();
    // Sizes past the queue's maximum are refused; others that are not
    // powers of two are answered, and the ring keeps its last valid size.
    for (num, must_refuse) in [
        (0u32, true),
        (3, false),
        (1000, false),
        (2048, true),
        (32768, true),
        (65535, true),
        (u32::MAX, true),
    ] {
        let a = fe.call(SET_VRING_NUM, &vring_state(0, num), &[]).unwrap();
        assert!(a.refused() || !must_refuse, "ring size {num} accepted");
        if a == Answer::Closed {
            fe = t.front_end();
        }
    }
    for index in [1u32, 63, 64, 1000, u32::MAX] {
        refused(
            fe.call(SET_VRING_NUM, &vring_state(index, 16), &[]),
            &format!("queue {index}"),
        );
        fe = t.front_end();
        let k = eventfd();
        // The index is the low byte; 0x100 means "no descriptor".
        refused(
            fe.call(
                SET_VRING_KICK,
                &u64::from(index & 0xff).to_le_bytes(),
                &[k.as_raw_fd()],
            ),
            &format!("a kick for queue {index}"),
        );
        fe = t.front_end();
        refused(
            fe.call(GET_VRING_BASE, &vring_state(index, 0), &[]),
            &format!("GET_VRING_BASE of queue {index}"),
        );
        fe = t.front_end();
    }
}

#[test]
fn ring_sizes_and_queue_indexes_out_of_range() {
    let mut t = Target::start("sizes");
    bad_sizes_and_indexes(&t);
    t.assert_both_serve("");
    t.stop();
}

/// A queue started and kicked with no memory table at all.
fn kicks_without_memory(t: &Target) {
    let mut fe = t.front_end();
    let _ = fe.call(SET_VRING_NUM, &vring_state(0, 16), &[]).unwrap();
    let k = eventfd();
    let _ = fe.call(SET_VRING_KICK, &0u64.to_le_bytes(), &[k.as_raw_fd()]);
    let _ = fe.call(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
    for _ in 0..100 {
        kick(&k);
    }
    std::thread::sleep(Duration::from_millis(200));
    // Still answering (or closed, never hung).
    let _ = fe.call(GET_FEATURES, &[], &[]).unwrap();
}

#[test]
fn kicks_before_a_memory_table() {
    let mut t = Target::start("early-kick");
    kicks_without_memory(&t);
    t.assert_both_serve("");
    t.stop();
}

/// SET_LOG_BASE with a descriptor that cannot be mapped, and with a log
/// smaller than it claims, which the server then writes to.
fn bad_log(t: &Target) {
    let mut fe = t.front_end();
    let mut fds = [0i32; 2];
    // SAFETY: pipe() fills two descriptors, closed by the Files.
    let (r, w) = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
    };
    let log = |size: u64, offset: u64| {
        let mut p = size.to_le_bytes().to_vec();
        p.extend_from_slice(&offset.to_le_bytes());
        p
    };
    refused(
        fe.call(SET_LOG_BASE, &log(4096, 0), &[r.as_raw_fd()]),
        "a pipe as the dirty log",
    );
    drop((r, w));

    let mut fe = t.front_end();
    let mem = GuestMem::new(1 << 20, false);
    assert_eq!(
        fe.call(
            SET_MEM_TABLE,
            &mem_table(&[mem.region()]),
            &[mem.file.as_raw_fd()]
        )
        .unwrap()
        .value(),
        Some(0)
    );
    let (kick_fd, _call) = start_queue(&mut fe).unwrap();
    // Dirty logging on, as QEMU turns it on when a migration starts.
    let feats = F_PROTOCOL | F_VERSION_1 | F_LOG_ALL;
    let _ = fe.call(SET_FEATURES, &feats.to_le_bytes(), &[]).unwrap();
    let empty_log = memfd(0, false);
    let a = fe
        .call(SET_LOG_BASE, &log(1 << 20, 0), &[empty_log.as_raw_fd()])
        .unwrap();
    if a == Answer::Closed {
        return;
    }
    // A read makes the server write guest memory, and mark the log.
    mem.queue_read(0, 0);
    kick(&kick_fd);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fe.call(GET_FEATURES, &[], &[]).unwrap() != Answer::Closed {
        assert!(
            Instant::now() < deadline,
            "still connected with a broken log:\n{}",
            t.lab.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_log_base_that_is_not_backed_fails_only_its_front_end() {
    let mut t = Target::start("log");
    bad_log(&t);
    t.assert_both_serve("");
    t.stop();
}

#[test]
fn set_inflight_fd_is_refused() {
    let mut t = Target::start("inflight");
    let mut fe = t.front_end();
    let f = memfd(1 << 16, false);
    let mut p = (1u64 << 16).to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1u16.to_le_bytes());
    p.extend_from_slice(&16u16.to_le_bytes());
    refused(
        fe.call(SET_INFLIGHT_FD, &p, &[f.as_raw_fd()]),
        "SET_INFLIGHT_FD",
    );
    t.assert_both_serve("");
    t.stop();
}

/// Messages the protocol does not have, truncated payloads, payloads
/// that claim more than they send, and too many descriptors.
fn garbage(t: &Target) {
    let mut rng = Rng::with_seed(7);
    for case in 0..40u32 {
        let mut fe = t.front_end();
        let req = match case % 4 {
            0 => 1000 + case,
            1 => SET_MEM_TABLE,
            2 => SET_VRING_ADDR,
            _ => (rng.u64(..45) + 1) as u32,
        };
        let len = rng.u64(..300) as usize;
        let payload: Vec<u8> = (0..len).map(|_| rng.u64(..) as u8).collect();
        let files: Vec<File> = (0..rng.u64(..10)).map(|_| memfd(4096, false)).collect();
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        let a = fe.call(req, &payload, &fds);
        assert!(
            a.is_ok(),
            "request {req} with {len} bytes: no answer: {a:?}"
        );
    }
    // A header that promises a payload it never sends, then silence: the
    // server waits on this connection only.
    let mut fe = t.front_end();
    let mut hdr = SET_MEM_TABLE.to_le_bytes().to_vec();
    hdr.extend_from_slice(&(NEED_REPLY | 1).to_le_bytes());
    hdr.extend_from_slice(&200u32.to_le_bytes());
    fe.sock.write_all(&hdr).unwrap();
    std::mem::forget(fe); // held open until the test ends
}

#[test]
fn unknown_truncated_and_garbage_messages() {
    let mut t = Target::start("garbage");
    garbage(&t);
    // The silent front end holds the hostile socket: only the good one
    // is checked.
    let g = t.good.clone();
    t.assert_serves(&g, 3);
    t.daemon.as_mut().unwrap().kill().unwrap();
}

/// A flood of requests whose replies are never read: the server blocks
/// writing to this front end only.
fn flood(t: &Target) -> FrontEnd {
    let mut fe = t.front_end();
    fe.sock
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut sent = 0u64;
    for _ in 0..1_000_000 {
        if fe.send(GET_FEATURES, NEED_REPLY, &[], &[]).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent > 100, "only {sent} messages went out");
    fe
}

#[test]
fn a_flood_from_a_front_end_that_stops_reading() {
    let mut t = Target::start("flood");
    let base = t.warm_resources();
    let fe = flood(&t);
    let g = t.good.clone();
    t.assert_serves(&g, 4);
    drop(fe);
    // Once it closes, the socket serves again, and nothing is left over.
    t.assert_both_serve("");
    assert_released(&t, base);
    t.stop();
}

#[test]
fn a_second_front_end_on_a_busy_socket_is_refused() {
    let mut t = Target::start("second");
    let mut first = connect_client(&t.hostile);
    let mut second = FrontEnd::connect(&t.hostile).unwrap();
    let started = Instant::now();
    let a = second.call(GET_FEATURES, &[], &[]).unwrap();
    assert_eq!(a, Answer::Closed, "the second front end was served");
    assert!(started.elapsed() < ANSWER_TIMEOUT);
    let log = t.lab.log();
    assert!(log.contains("refused a second front end"), "{log}");
    // The first goes on.
    let want = pattern(9, 4096);
    first.data(0, 4096).copy_from_slice(&want);
    assert_eq!(first.write(0, 0, 4096), S_OK);
    drop(first);
    t.assert_both_serve("");
    t.stop();
}

/// Every case above against one volume while a real driver writes and
/// reads the other volume, checked against a model, throughout.
#[test]
fn a_hostile_front_end_does_not_stop_another_volumes_io() {
    let mut t = Target::start("isolation");
    let base = t.warm_resources();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let good = t.good.clone();
    let io = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut c = connect_client(&good);
            // The model: the seed of what each of 64 slots of 64 KiB last
            // received.
            let mut model: Vec<u64> = (0..64).collect();
            for (slot, &seed) in model.iter().enumerate() {
                c.data(0, 65536).copy_from_slice(&pattern(seed, 65536));
                assert_eq!(c.write(slot as u64 * 128, 0, 65536), S_OK, "fill {slot}");
            }
            let mut rng = Rng::with_seed(11);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 50 {
                let slot = rng.u64(..64) as usize;
                let sector = slot as u64 * 128;
                if rng.u64(..2) == 0 {
                    let seed = rng.u64(..);
                    c.data(0, 65536).copy_from_slice(&pattern(seed, 65536));
                    assert_eq!(c.write(sector, 0, 65536), S_OK, "write {n}");
                    model[slot] = seed;
                } else {
                    assert_eq!(c.read(sector, 1 << 20, 65536), S_OK, "read {n}");
                    same(c.data(1 << 20, 65536), &pattern(model[slot], 65536), "slot");
                }
                n += 1;
                done.store(n, Ordering::Relaxed);
            }
        })
    };
    let progress = |what: &str, before: u64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while done.load(Ordering::Relaxed) <= before {
            assert!(
                Instant::now() < deadline,
                "no I/O completed on 'good' during {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let cases: [(&str, Case); 6] = [
        ("an oversized region", oversized_region),
        ("a truncated memory file", truncated_memory),
        ("rings outside memory", rings_outside_memory),
        ("bad ring sizes", bad_sizes_and_indexes),
        ("kicks without memory", kicks_without_memory),
        ("a bad log", bad_log),
    ];
    for (what, case) in cases {
        let before = done.load(Ordering::Relaxed);
        case(&t);
        progress(what, before);
    }
    let before = done.load(Ordering::Relaxed);
    let fe = flood(&t);
    progress("a flood", before);
    drop(fe);
    stop.store(true, Ordering::Relaxed);
    io.join().unwrap();
    let h = t.hostile.clone();
    t.assert_serves(&h, 5);
    assert_released(&t, base);
    t.stop();
}

/// The control socket: mode 0600, and a client that is neither root nor
/// the daemon's user is refused even when the mode is widened by hand.
#[test]
fn the_control_socket_admits_only_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let t = Target::start("control");
    let ctl = t.lab.control();
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    let reply = request_as(65534, &ctl, b"status\n");
    assert!(
        reply.starts_with(r#"{"error":"permission denied"#),
        "{reply:?}"
    );
    let log = t.lab.log();
    assert!(log.contains("refused a client"), "{log}");
    // Requests for volumes it does not serve, and a socket path that is
    // a file: error lines, the file untouched.
    let file = t.lab.path("precious");
    std::fs::write(&file, b"keep").unwrap();
    let e = t.lab.ctl_fails(&["serve-remove", "nosuch"]);
    assert!(e.contains("nosuch"), "{e}");
    t.lab.ctl(&["create", "spare", "1M"]);
    let e = t
        .lab
        .ctl_fails(&["serve-add", "spare", "--socket", file.to_str().unwrap()]);
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    t.stop();
}

/// Sends `req` on the control socket from a child running as `uid`;
/// returns the reply line.
fn request_as(uid: u32, path: &Path, req: &[u8]) -> String {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = path.as_os_str().as_bytes();
    assert!(p.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    let mut out = [0i32; 2];
    // SAFETY: pipe() fills two descriptors.
    assert_eq!(unsafe { libc::pipe(out.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes system calls on memory prepared before
    // the fork (no allocation, no locks), then _exit()s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: as above; every pointer is to memory of this process.
        unsafe {
            libc::close(out[0]);
            if libc::setuid(uid) != 0 {
                libc::_exit(2);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(s, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                libc::_exit(3);
            }
            libc::write(s, req.as_ptr().cast(), req.len());
            let mut buf = [0u8; 512];
            let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                libc::write(out[1], buf.as_ptr().cast(), n as usize);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closes our copy of the write end; the read end is owned by
    // the File below.
    let mut r = unsafe {
        libc::close(out[1]);
        File::from_raw_fd(out[0])
    };
    let mut reply = String::new();
    let _ = BufReader::new(&mut r).read_line(&mut reply);
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child running as uid {uid} failed: {status:#x}"
    );
    reply
}
