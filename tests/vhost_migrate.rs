//! End to end: live migration of a running guest between two "hosts"
//! (two `thinctl serve` processes with their own host ids on one shared
//! pool file), each serving one QEMU over vhost-user-blk; and between two
//! QEMU processes of one host, served by one `thinctl daemon` of a pool
//! of one host on two sockets.
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
    shared: bool,
    servers: Vec<u32>,
}

impl Hosts {
    /// A pool with volume `vm`: shared by hosts, or of one host.
    fn new(tag: &str, shared: bool) -> Hosts {
        let dir = std::env::temp_dir().join(format!("thinlun-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = Hosts {
            pool: dir.join("lun.img"),
            dir,
            shared,
            servers: Vec::new(),
        };
        let mut create = vec!["pool", "create", "--size", "2G"];
        if shared {
            create.extend(["--shared", "--io-timeout", "1s"]);
        }
        hosts.ctl(1, &create);
        hosts.ctl(1, &["create", "vm", "1G"]);
        hosts
    }

    fn command(&self, host: u32, args: &[&str]) -> Command {
        let mut cmd = Command::new(thinctl());
        cmd.arg("-p").arg(&self.pool);
        if self.shared {
            cmd.args(["--host-id", &host.to_string()]);
        }
        cmd.args(args);
        cmd
    }

    fn ctl(&self, host: u32, args: &[&str]) -> String {
        let host = host.to_string();
        let mut all = vec!["--host-id", &host];
        if !self.shared {
            all.clear();
        }
        all.extend_from_slice(args);
        thinctl_ok(&self.pool, &all)
    }

    /// The error of a thinctl command that must fail.
    fn ctl_fails(&self, host: u32, args: &[&str]) -> String {
        let out = self.command(host, args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn control(&self, host: u32) -> PathBuf {
        self.dir.join(format!("host{host}.ctl"))
    }

    /// `thinctl daemon` as host `host`, waiting for its control socket.
    fn daemon(&mut self, host: u32) -> Child {
        let ctl = self.control(host);
        let log = std::fs::File::create(self.dir.join(format!("host{host}.log"))).unwrap();
        let mut child = self
            .command(host, &["daemon", "--control", ctl.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.push(child.id());
        self.wait_for(host, &mut child, &ctl);
        child
    }

    fn wait_for(&self, host: u32, child: &mut Child, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("thinctl exited with {status}:\n{}", self.log(host));
            }
            assert!(Instant::now() < deadline, "no socket:\n{}", self.log(host));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self, host: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("host{host}.log"))).unwrap_or_default()
    }

    /// `thinctl serve vm` as host `host`, waiting for its socket.
    fn serve(&mut self, host: u32, extra: &[&str]) -> (Child, PathBuf) {
        let sock = self.dir.join(format!("host{host}.sock"));
        let log = std::fs::File::create(self.dir.join(format!("host{host}.log"))).unwrap();
        let mut child = self
            .command(host, &["serve", "vm", "--socket"])
            .arg(&sock)
            .arg("--control")
            .arg(self.control(host))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.push(child.id());
        self.wait_for(host, &mut child, &sock);
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

/// Boots the source guest on `sock` with a QMP socket and waits until its
/// script is ready to be migrated. Under TCG a starved host can keep a
/// guest from booting at all (see vhost_qemu.rs): one more try. A guest
/// that boots must get ready.
fn boot_source(sock: &Path, script: &Path, qmp: &Path, loop_secs: &str) -> Child {
    for _attempt in 1..=2 {
        let (mut src, src_rx) = spawn_guest(
            sock,
            script,
            &[("QMP", qmp.to_str().unwrap()), ("LOOP_SECS", loop_secs)],
        );
        let before = console(&src_rx, |_| {}, Some("MIGRATE-READY"));
        if before.iter().any(|l| l.contains("MIGRATE-READY")) {
            return src;
        }
        let _ = src.kill();
        let _ = src.wait();
        assert!(
            !booted(&before),
            "the source guest booted but did not get ready:\n{}",
            before.join("\n")
        );
    }
    panic!("the source guest never booted");
}

fn migrate_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/migrate.sh")
}

#[test]
fn guest_migrates_between_hosts() {
    let _one = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_ready() {
        return;
    }
    let mut hosts = Hosts::new("mig", true);
    let (source, src_sock) = hosts.serve(1, &[]);
    let (target, dst_sock) = hosts.serve(2, &["--incoming"]);
    let script = migrate_script();
    let src_qmp = hosts.dir.join("src.qmp");
    let dst_qmp = hosts.dir.join("dst.qmp");
    let mig = format!("unix:{}", hosts.dir.join("mig.sock").display());
    let mut src = boot_source(&src_sock, &script, &src_qmp, LOOP_SECS);
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

/// A VM moves to a new QEMU process on the same host: one daemon of a
/// pool of one host serves the volume on two sockets, the second added
/// `--incoming`; the writer passes from the first server to the second
/// at the migration's last stop.
#[test]
fn guest_moves_to_another_qemu_process_on_one_host() {
    let _one = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_ready() {
        return;
    }
    let mut hosts = Hosts::new("mig1", false);
    let daemon = hosts.daemon(1);
    let ctl = hosts.control(1);
    let ctl = ctl.to_str().unwrap();
    let (s1, s2) = (hosts.dir.join("qemu1.sock"), hosts.dir.join("qemu2.sock"));
    let (s1, s2) = (s1.to_str().unwrap(), s2.to_str().unwrap());
    hosts.ctl(1, &["serve-add", "vm", "--socket", s1, "--control", ctl]);
    // Two writers of one volume are refused; the target of a move is not.
    let e = hosts.ctl_fails(1, &["serve-add", "vm", "--socket", s2, "--control", ctl]);
    assert!(e.contains("add it with incoming"), "{e}");
    let t = hosts.ctl(
        1,
        &[
            "serve-add",
            "vm",
            "--socket",
            s2,
            "--incoming",
            "--control",
            ctl,
        ],
    );
    assert!(t.contains("incoming"), "{t}");

    let script = migrate_script();
    let (src_qmp, dst_qmp) = (hosts.dir.join("src.qmp"), hosts.dir.join("dst.qmp"));
    let mig = format!("unix:{}", hosts.dir.join("mig.sock").display());
    let mut src = boot_source(Path::new(s1), &script, &src_qmp, "20");
    let (mut dst, dst_rx) = spawn_guest(
        Path::new(s2),
        &script,
        &[
            ("QMP", dst_qmp.to_str().unwrap()),
            ("INCOMING", &mig),
            ("LOOP_SECS", "20"),
        ],
    );
    let _dst_qmp = Qmp::connect(&dst_qmp);
    let mut qmp = Qmp::connect(&src_qmp);
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 100 << 20}),
    );
    let status = migrate(&mut qmp, &mig);
    assert_eq!(status["status"], "completed", "{status}");
    qmp.execute("quit", json!({}));
    let _ = src.wait();

    // The old process's server goes; the new one keeps serving.
    let t = hosts.ctl(1, &["serve-remove", "vm", "--socket", s1, "--control", ctl]);
    assert!(t.contains("stopped vm"), "{t}");
    let list = thinlun_vhost::control::request(Path::new(ctl), "list").unwrap();
    assert_eq!(list, Ok(format!("1 vm={s2}")));

    let lines = console(&dst_rx, |_| {}, None);
    let _ = dst.wait();
    assert_guest_ok(&lines, &["migrate-reads", "migrate-writes", "fio-verify"]);

    // One log, so the order shows: the source's release, then the
    // target's activation.
    let log = hosts.log(1);
    let released = log
        .find("released (the front end stopped the device for a migration)")
        .unwrap_or_else(|| panic!("no release at the migration:\n{log}"));
    let activated = log
        .rfind("activated for the front end's rings")
        .unwrap_or_else(|| panic!("no activation:\n{log}"));
    assert!(released < activated, "activated before the release:\n{log}");
    hosts.stop(1, daemon);
    let check = hosts.ctl(1, &["check"]);
    assert!(check.contains("clean"), "pool check: {check}");
}
