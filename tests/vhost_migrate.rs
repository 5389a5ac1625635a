//! End to end: live migration of a running guest between two "hosts"
//! (two `thinctl serve` processes with their own host ids on one shared
//! pool file), each serving one QEMU over vhost-user-blk.
//!
//! The source's server has the volume active; the target's is started
//! with `--incoming` and opens nothing until its QEMU starts the rings.
//! The guest (tests/guest/migrate.sh) reads the device with O_DIRECT in a
//! loop across the migration, so the data the source's server reads into
//! guest pages must reach the target through the dirty log, and writes
//! and reads back blocks; fio verify runs on the target afterwards.
//! A cancelled migration comes first: the source keeps serving and the
//! target never opens the volume. Checked: QEMU reports the second
//! migration completed, every guest check passes, the source released
//! before the target activated, and the pool checks clean. Without the
//! server's marking of read data, the guest's read check fails.

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thinlun_tests::{parent_of, thinctl, thinctl_ok};

mod lab;
use lab::{assert_guest_ok, booted, console, lab_ready, migrate, spawn_guest, Qmp, GUEST};

struct Hosts {
    dir: PathBuf,
    pool: PathBuf,
    servers: Vec<u32>,
}

impl Hosts {
    fn new() -> Hosts {
        let dir = std::env::temp_dir().join(format!("thinlun-e2e-mig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = Hosts {
            pool: dir.join("lun.img"),
            dir,
            servers: Vec::new(),
        };
        hosts.ctl(
            1,
            &[
                "pool",
                "create",
                "--size",
                "2G",
                "--shared",
                "--io-timeout",
                "1s",
            ],
        );
        hosts.ctl(1, &["create", "vm", "1G"]);
        hosts
    }

    fn ctl(&self, host: u32, args: &[&str]) -> String {
        let host = host.to_string();
        let mut all = vec!["--host-id", &host];
        all.extend_from_slice(args);
        thinctl_ok(&self.pool, &all)
    }

    fn log(&self, host: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("host{host}.log"))).unwrap_or_default()
    }

    /// `thinctl serve vm` as host `host`, waiting for its socket.
    fn serve(&mut self, host: u32, extra: &[&str]) -> (Child, PathBuf) {
        let sock = self.dir.join(format!("host{host}.sock"));
        let log = std::fs::File::create(self.dir.join(format!("host{host}.log"))).unwrap();
        let mut child = Command::new(thinctl())
            .arg("-p")
            .arg(&self.pool)
            .args(["--host-id", &host.to_string(), "serve", "vm", "--socket"])
            .arg(&sock)
            .arg("--control")
            .arg(self.dir.join(format!("host{host}.ctl")))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.push(child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("serve exited with {status}:\n{}", self.log(host));
            }
            assert!(Instant::now() < deadline, "no socket:\n{}", self.log(host));
            std::thread::sleep(Duration::from_millis(20));
        }
        (child, sock)
    }

    fn stop(&self, host: u32, mut server: Child) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
        let status = server.wait().unwrap();
        assert!(
            status.success(),
            "host {host}: {status}\n{}",
            self.log(host)
        );
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for &pid in &self.servers {
            if parent_of(pid) == Some(std::process::id()) {
                // SAFETY: plain syscall on our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- host 1:\n{}\n---- host 2:\n{}",
                self.log(1),
                self.log(2)
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long the guest's read loop runs: across both migrations.
const LOOP_SECS: &str = "35";

#[test]
fn guest_migrates_between_hosts() {
    let _one = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_ready() {
        return;
    }
    let mut hosts = Hosts::new();
    let (source, src_sock) = hosts.serve(1, &[]);
    let (target, dst_sock) = hosts.serve(2, &["--incoming"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/migrate.sh");
    let src_qmp = hosts.dir.join("src.qmp");
    let dst_qmp = hosts.dir.join("dst.qmp");
    let mig = format!("unix:{}", hosts.dir.join("mig.sock").display());

    // Under TCG a starved host can keep a guest from booting at all (see
    // vhost_qemu.rs): one more try. A guest that boots must get ready.
    let mut source_guest = None;
    for _attempt in 1..=2 {
        let (mut src, src_rx) = spawn_guest(
            &src_sock,
            &script,
            &[("QMP", src_qmp.to_str().unwrap()), ("LOOP_SECS", LOOP_SECS)],
        );
        let before = console(&src_rx, |_| {}, Some("MIGRATE-READY"));
        if before.iter().any(|l| l.contains("MIGRATE-READY")) {
            source_guest = Some(src);
            break;
        }
        let _ = src.kill();
        let _ = src.wait();
        assert!(
            !booted(&before),
            "the source guest booted but did not get ready:\n{}",
            before.join("\n")
        );
    }
    let mut src = source_guest.expect("the source guest never booted");
    // A target QEMU starts only now: two run-guest.sh building the lab's
    // initramfs cache at once would corrupt it.
    let target_qemu = || {
        let guest = spawn_guest(
            &dst_sock,
            &script,
            &[
                ("QMP", dst_qmp.to_str().unwrap()),
                ("INCOMING", &mig),
                ("LOOP_SECS", LOOP_SECS),
            ],
        );
        let qmp = Qmp::connect(&dst_qmp);
        (guest, qmp)
    };
    let mut qmp = Qmp::connect(&src_qmp);

    // A cancelled migration first (slow, so it is still running): the
    // source keeps the volume and keeps serving, the target never opens
    // it. The target QEMU exits, as an incoming QEMU does.
    let ((mut dst, _), dst_qmp_conn) = target_qemu();
    drop(dst_qmp_conn);
    qmp.execute("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    qmp.execute("migrate", json!({"uri": mig}));
    std::thread::sleep(Duration::from_millis(1500));
    qmp.execute("migrate_cancel", json!({}));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = qmp.execute("query-migrate", json!({}));
        if r["status"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "cancel did not finish: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = dst.kill();
    let _ = dst.wait();
    assert!(!hosts.log(1).contains("released"), "{}", hosts.log(1));
    assert!(!hosts.log(2).contains("activated"), "{}", hosts.log(2));
    let _ = std::fs::remove_file(&dst_qmp);

    // Then the migration: 100 MiB/s makes the first pass over the
    // guest's memory last seconds, with the guest's read loop inside it.
    let ((mut dst, dst_rx), _dst_qmp_conn) = target_qemu();
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 100 << 20}),
    );
    let status = migrate(&mut qmp, &mig);
    assert_eq!(status["status"], "completed", "{status}");
    eprintln!(
        "migrated: downtime {} ms, total {} ms",
        status["downtime"], status["total-time"]
    );
    qmp.execute("quit", json!({}));
    let _ = src.wait();

    let lines = console(&dst_rx, |_| {}, None);
    let _ = dst.wait();
    assert_guest_ok(&lines, &["migrate-reads", "migrate-writes", "fio-verify"]);

    let (a, b) = (hosts.log(1), hosts.log(2));
    assert!(a.contains("dirty logging on"), "source log:\n{a}");
    assert!(
        a.contains("released (the front end stopped the device for a migration)"),
        "source log:\n{a}"
    );
    assert!(
        b.contains("activated for the front end's rings"),
        "target log:\n{b}"
    );
    hosts.stop(1, source);
    hosts.stop(2, target);
    let check = hosts.ctl(3, &["check"]);
    assert!(check.contains("clean"), "pool check: {check}");
}
