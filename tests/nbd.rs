//! End to end: `thinctl serve --nbd` with clients nobody here wrote
//! (qemu-img, qemu-io, nbdinfo, nbdcopy) and with hostile ones.
//!
//! Skipped with a note when a tool is missing (.ci/run installs
//! qemu-utils and libnbd-bin).

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use thinlun_tests::{parent_of, thinctl, thinctl_ok, Rng};

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed (apt-get install qemu-utils libnbd-bin)");
    }
    ok
}

struct Nbd {
    dir: PathBuf,
    pool: PathBuf,
    sock: PathBuf,
    server: Option<Child>,
}

impl Nbd {
    /// A pool with volume `vm` of 256 MiB, not yet served.
    fn new(tag: &str) -> Nbd {
        let dir = std::env::temp_dir().join(format!("thinlun-nbd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let n = Nbd {
            pool: dir.join("pool.img"),
            sock: dir.join("nbd.sock"),
            dir,
            server: None,
        };
        n.ctl(&["pool", "create", "--size", "1G"]);
        n.ctl(&["create", "vm", "256M"]);
        n
    }

    fn ctl(&self, args: &[&str]) -> String {
        thinctl_ok(&self.pool, args)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    fn serve(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .unwrap();
        let _ = std::fs::remove_file(&self.sock);
        let mut child = Command::new(thinctl())
            .arg("-p")
            .arg(&self.pool)
            .args(["serve", "vm", "--nbd"])
            .arg(&self.sock)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.sock).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("serve exited with {st}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no socket:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server = Some(child);
    }

    fn kill9(&mut self) {
        let mut s = self.server.take().unwrap();
        s.kill().unwrap();
        let _ = s.wait();
    }

    fn stop(&mut self) {
        let mut s = self.server.take().unwrap();
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(s.id() as i32, libc::SIGTERM) };
        let st = s.wait().unwrap();
        assert!(st.success(), "serve exited with {st}:\n{}", self.log());
        assert!(self.ctl(&["check"]).contains("clean"));
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            if parent_of(s.id()) == Some(std::process::id()) {
                // SAFETY: a signal to our own child.
                unsafe { libc::kill(s.id() as i32, libc::SIGKILL) };
            }
        }
        if std::thread::panicking() {
            eprintln!("---- serve.log of the failed run:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{cmd} {args:?}: {all}");
    // qemu-io reports failed commands and patterns but exits with 0.
    if cmd == "qemu-io" {
        assert!(
            !all.contains("verification failed")
                && !all.contains("error")
                && !all.contains("failed"),
            "{cmd} {args:?}: {all}"
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdinfo --map` as (offset, length, is-data) runs.
fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    run("nbdinfo", &["--map", uri])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((
                w.first()?.parse().ok()?,
                w.get(1)?.parse().ok()?,
                *w.get(2)? == "0",
            ))
        })
        .collect()
}

fn data_runs(uri: &str) -> Vec<(u64, u64)> {
    map(uri)
        .into_iter()
        .filter(|r| r.2)
        .map(|r| (r.0, r.1))
        .collect()
}

const MIB: u64 = 1 << 20;

/// A raw image with 8 MiB of data, a hole, 3 MiB more at 40 MiB.
fn raw_image(path: &Path) {
    let mut rng = Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    let mut chunk = |n: u64| -> Vec<u8> { (0..n).map(|_| rng.u64(..) as u8).collect() };
    let f = std::fs::File::create(path).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&chunk(8 * MIB), 0).unwrap();
    f.write_all_at(&chunk(3 * MIB), 40 * MIB).unwrap();
    f.set_len(256 * MIB).unwrap();
}

#[test]
fn qemu_img_and_libnbd_tools_round_trip() {
    if !have("qemu-img") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let mut n = Nbd::new("tools");
    n.serve();
    let uri = n.uri("vm");
    let src = n.dir.join("src.raw");
    raw_image(&src);
    let src_s = src.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    // The holes of the image stay holes: only its data was stored.
    assert_eq!(data_runs(&uri), vec![(0, 8 * MIB), (40 * MIB, 3 * MIB)]);
    let du = n.ctl(&["du", "--json"]);
    assert!(du.contains(&format!("{}", 11 * MIB)), "thinctl du: {du}");

    // Out again: as sparse as the volume.
    let out = n.dir.join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out.to_str().unwrap(),
        ],
    );
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated <= 12 * MIB,
        "the copy allocates {allocated} bytes for 11 MiB of data"
    );
    run("cmp", &[src_s, out.to_str().unwrap()]);
    let copy = n.dir.join("copy.raw");
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    run("cmp", &[src_s, copy.to_str().unwrap()]);
    n.stop();
}

#[test]
fn qemu_io_patterns_and_a_kill_9() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let mut n = Nbd::new("io");
    n.serve();
    let uri = n.uri("vm");
    let io = |cmds: &[&str]| {
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(&uri);
        run("qemu-io", &args)
    };
    io(&[
        "write -P 0xab 100M 1M",
        "read -P 0xab 100M 1M",
        "discard 100M 512k",
        "read -P 0 100M 512k",
        "read -P 0xab 100.5M 512k",
        "write -z -u 100.5M 256k",
        "read -P 0 100.5M 256k",
        "write -z 101M 64k",
        "read -P 0 101M 64k",
        "write -P 0x5a -f 0 64k",
    ]);
    // The discard and the unmapping zero-write left holes; zeros without
    // -u (NO_HOLE) are stored.
    assert_eq!(
        data_runs(&uri),
        vec![
            (0, 64 << 10),
            (100 * MIB + 768 * 1024, 256 << 10 | 64 << 10)
        ],
        "{:?}",
        map(&uri)
    );
    // Completed writes survive a kill -9 of the server (persisted, not
    // flushed: qemu-io exits without FLUSH after this write).
    io(&["write -P 0x77 200M 128k"]);
    n.kill9();
    n.serve();
    io(&["read -P 0x77 200M 128k", "read -P 0x5a 0 64k"]);
    n.stop();
}

/// A raw client: the handshake up to OPT_GO with structured replies,
/// then requests by hand.
struct Raw(UnixStream);

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let mut hello = [0u8; 18];
        r.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        r.0.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        r
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// Reads option replies until ACK or an error; returns the last type.
    fn replies(&mut self) -> u32 {
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.0.read_exact(&mut d).unwrap();
            if kind == 1 || kind & (1 << 31) != 0 {
                return kind;
            }
        }
    }

    fn go(sock: &Path, export: &str) -> Raw {
        let mut r = Raw::connect(sock);
        r.option(8, &[]); // structured replies
        assert_eq!(r.replies(), 1);
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        r.option(7, &d);
        assert_eq!(r.replies(), 1, "OPT_GO {export}");
        r
    }

    /// Sends a request; returns the error of its (final) reply chunk.
    fn request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&42u64.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 42);
        let ty = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        if ty & (1 << 15) != 0 {
            u32::from_be_bytes(d[..4].try_into().unwrap())
        } else {
            0
        }
    }

    /// The server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn hostile_clients_leave_the_server_serving() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let mut n = Nbd::new("hostile");
    n.serve();
    n.ctl(&["snapshot", "vm@s1"]);
    n.ctl(&["serve-add", "vm@s1", "--nbd", n.sock.to_str().unwrap()]);

    // A bad option magic: closed.
    let mut r = Raw::connect(&n.sock);
    r.0.write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0").unwrap();
    assert!(r.closed());
    // An option length past anything sensible: closed, nothing allocated.
    let mut r = Raw::connect(&n.sock);
    r.0.write_all(b"IHAVEOPT\0\0\0\x07\xff\xff\xff\xff")
        .unwrap();
    assert!(r.closed());
    // An option whose payload lies about its name length: an error reply.
    let mut r = Raw::connect(&n.sock);
    r.option(7, &[0, 0, 0, 200, b'v', b'm', 0, 0]);
    assert_eq!(r.replies(), (1 << 31) + 3, "NBD_REP_ERR_INVALID");
    // An unknown export.
    r.option(7, &[0, 0, 0, 2, b'n', b'o', 0, 0]);
    assert_eq!(r.replies(), (1 << 31) + 6, "NBD_REP_ERR_UNKNOWN");

    let mut r = Raw::go(&n.sock, "vm");
    assert_eq!(
        r.request(0, 256 * MIB, 4096, &[]),
        22,
        "read past the end: EINVAL"
    );
    assert_eq!(
        r.request(0, u64::MAX - 511, 512, &[]),
        22,
        "offset overflow"
    );
    assert_eq!(
        r.request(1, 256 * MIB, 512, &[0; 512]),
        28,
        "write past the end: ENOSPC"
    );
    assert_eq!(r.request(0, 1, 512, &[]), 22, "unaligned: EINVAL");
    assert_eq!(r.request(0, 0, 64 << 20, &[]), 75, "too long: EOVERFLOW");
    assert_eq!(r.request(99, 0, 512, &[]), 22, "unknown command");
    assert_eq!(r.request(0, 0, 512, &[]), 0, "still serving");
    // A bad request magic: closed.
    r.0.write_all(&[0u8; 28]).unwrap();
    assert!(r.closed());

    // The snapshot is read-only.
    let mut r = Raw::go(&n.sock, "vm@s1");
    assert_eq!(r.request(1, 0, 512, &[1; 512]), 1, "write: EPERM");
    assert_eq!(r.request(4, 0, 512, &[]), 1, "trim: EPERM");
    assert_eq!(r.request(0, 0, 512, &[]), 0);

    // Many connections that go away at every stage.
    for i in 0..500 {
        let mut s = UnixStream::connect(&n.sock).unwrap();
        if i % 2 == 0 {
            let mut hello = [0u8; 18];
            let _ = s.read_exact(&mut hello);
        }
        if i % 3 == 0 {
            let _ = s.write_all(&[0, 0, 0, 3, b'I']);
        }
    }
    // A legitimate client still works, on both exports.
    let info = run("nbdinfo", &["--size", &n.uri("vm")]);
    assert_eq!(info.trim(), (256 * MIB).to_string());
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read 0 4k", &n.uri("vm@s1")],
    );
    n.ctl(&["serve-remove", "vm@s1"]);
    n.stop();
}

/// A backup reads a consistent snapshot while the live volume is written.
#[test]
fn a_snapshot_export_reads_consistently_beside_writes() {
    if !have("qemu-io") {
        return;
    }
    let mut n = Nbd::new("snap");
    n.serve();
    let live = n.uri("vm");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 4M", &live]);
    n.ctl(&["snapshot", "vm@backup"]);
    n.ctl(&["serve-add", "vm@backup", "--nbd", n.sock.to_str().unwrap()]);
    // The removal of an exported snapshot is refused.
    let out = Command::new(thinctl())
        .arg("-p")
        .arg(&n.pool)
        .args(["remove", "vm@backup"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "removed while exported");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x22 0 4M", &live]);
    run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 4M",
            &n.uri("vm@backup"),
        ],
    );
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x22 0 4M", &live],
    );
    n.ctl(&["serve-remove", "vm@backup"]);
    n.ctl(&["remove", "vm@backup"]);
    n.stop();
}

/// Without the kernel's nbd module (these machines have none), map and
/// unmap fail with one line that says what is missing.
#[test]
fn map_without_the_kernel_module_says_what_is_missing() {
    if Path::new("/sys/module/nbd").exists() {
        eprintln!("SKIP: this kernel has the nbd module");
        return;
    }
    let n = Nbd::new("map");
    for args in [vec!["map", "vm"], vec!["unmap", "/dev/nbd0"]] {
        let out = Command::new(thinctl())
            .arg("-p")
            .arg(&n.pool)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("the kernel has no NBD client") && err.contains("-blockdev driver=nbd"),
            "{err}"
        );
    }
}

mod lab;

/// A real guest on the export (QEMU's NBD client under virtio-blk): the
/// lab's example script, while the server is killed with SIGKILL and
/// restarted during the guest's file write; QEMU reconnects.
#[test]
fn guest_on_the_export_survives_a_server_kill() {
    let _one = lab::GUEST.lock().unwrap_or_else(|e| e.into_inner());
    if !lab::lab_ready() {
        return;
    }
    let mut n = Nbd::new("guest");
    n.serve();
    let script = lab::lab_dir().join("example-guest.sh");
    // QEMU fails requests paused longer than reconnect-delay: give the
    // restart (which may wait for the dead process's pool lock) 5 s.
    let env = [("DISK", "nbd"), ("EXPORT", "vm"), ("RECONNECT", "5000")];
    let mut lines = Vec::new();
    let mut kills = 0;
    // One more try only if the guest never booted (see vhost_qemu.rs).
    for _attempt in 1..=2 {
        let (mut guest, rx) = lab::spawn_guest(&n.sock, &script, &env);
        lines = lab::console(
            &rx,
            |line| {
                if line.is_some_and(|l| l.contains("CHECK mount ok")) {
                    std::thread::sleep(Duration::from_millis(300));
                    let t = Instant::now();
                    n.kill9();
                    n.serve();
                    eprintln!("server back in {} ms", t.elapsed().as_millis());
                    kills += 1;
                }
            },
            None,
        );
        let _ = guest.wait();
        if lab::booted(&lines) {
            break;
        }
    }
    assert_eq!(kills, 1, "the server was killed mid-run");
    lab::assert_guest_ok(&lines, &["mkfs", "mount", "fsck", "readback", "fio-verify"]);
    n.stop();
}

/// A live migration between two QEMU processes attached to one export
/// (shared storage: QEMU hands the image over itself). The guest's fio
/// reads verify across it (tests/guest/migrate.sh).
#[test]
fn guest_migrates_on_one_export() {
    let _one = lab::GUEST.lock().unwrap_or_else(|e| e.into_inner());
    if !lab::lab_ready() {
        return;
    }
    let mut n = Nbd::new("migrate");
    n.serve();
    let script = lab::guest_script(
        &n.dir,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/migrate.sh"),
        &[("LOOP_SECS", "25")],
    );
    let (src_qmp, dst_qmp) = (n.dir.join("src.qmp"), n.dir.join("dst.qmp"));
    let mig = format!("unix:{}", n.dir.join("mig.sock").display());
    let common = [("DISK", "nbd"), ("EXPORT", "vm")];
    let with = |extra: &[(&'static str, String)]| {
        let mut v: Vec<(&str, String)> = common.iter().map(|(k, v)| (*k, v.to_string())).collect();
        v.extend(extra.iter().cloned());
        v
    };
    let src_env = with(&[("QMP", src_qmp.display().to_string())]);
    let src_env: Vec<(&str, &str)> = src_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut src, _, _) = lab::boot_until(&n.sock, &script, &src_env, "MIGRATE-READY");
    let dst_env = with(&[
        ("QMP", dst_qmp.display().to_string()),
        ("INCOMING", mig.clone()),
    ]);
    let dst_env: Vec<(&str, &str)> = dst_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut dst, dst_rx) = lab::spawn_guest(&n.sock, &script, &dst_env);
    let _dst = lab::Qmp::connect(&dst_qmp);
    let mut qmp = lab::Qmp::connect(&src_qmp);
    let status = lab::migrate(&mut qmp, &mig);
    assert_eq!(status["status"], "completed", "{status}");
    eprintln!(
        "migrated on one NBD export: downtime {} ms, total {} ms",
        status["downtime"], status["total-time"]
    );
    qmp.quit(&mut src);
    let lines = lab::console(&dst_rx, |_| {}, None);
    let _ = dst.wait();
    lab::assert_guest_ok(&lines, &["migrate-reads", "migrate-writes", "fio-verify"]);
    n.stop();
}
