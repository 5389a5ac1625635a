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
use std::process::Child;
use std::time::{Duration, Instant};

mod hosts;
mod lab;
use hosts::{assert_released_then_activated, stamp, Hosts, ACTIVATED, RELEASED_FOR_MIGRATION};
use lab::{
    assert_guest_ok, boot_until, console, guest_script, kill_guest, lab_ready, migrate,
    migration_end, spawn_guest, ConsoleOnPanic, Qmp, GUEST,
};

/// How long the guest's read loop runs: across both migrations.
const LOOP_SECS: &str = "25";

/// Boots the source guest on `sock` with a QMP socket and waits until its
/// script is ready to be migrated.
fn boot_source(sock: &Path, script: &Path, qmp: &Path) -> (Child, ConsoleOnPanic) {
    let env = [("QMP", qmp.to_str().unwrap())];
    let (guest, rx, _) = boot_until(sock, script, &env, "MIGRATE-READY");
    (guest, ConsoleOnPanic(rx))
}

/// The guest's script, its read loop running for `loop_secs`.
fn migrate_script(dir: &Path, loop_secs: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/migrate.sh");
    guest_script(dir, &script, &[("LOOP_SECS", loop_secs)])
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
    let script = migrate_script(&hosts.dir, LOOP_SECS);
    let src_qmp = hosts.dir.join("src.qmp");
    let dst_qmp = hosts.dir.join("dst.qmp");
    let mig = format!("unix:{}", hosts.dir.join("mig.sock").display());
    let (mut src, _src_console) = boot_source(&src_sock, &script, &src_qmp);
    // A target QEMU starts only now: two run-guest.sh building the lab's
    // initramfs cache at once would corrupt it.
    let target_qemu = || {
        let guest = spawn_guest(
            &dst_sock,
            &script,
            &[("QMP", dst_qmp.to_str().unwrap()), ("INCOMING", &mig)],
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
    kill_guest(&mut dst);
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
    qmp.quit(&mut src);

    let lines = console(&dst_rx, |_| {}, None);
    let _ = dst.wait();
    assert_guest_ok(&lines, &["migrate-reads", "migrate-writes", "fio-verify"]);

    let (a, b) = (hosts.log(1), hosts.log(2));
    assert!(a.contains("dirty logging on"), "source log:\n{a}");
    assert!(a.contains(RELEASED_FOR_MIGRATION), "source log:\n{a}");
    let released = stamp(&a, RELEASED_FOR_MIGRATION);
    let activated = stamp(&b, ACTIVATED);
    match (released, activated) {
        (Some(r), Some(t)) => assert!(
            r <= t,
            "host 2 activated at {t}, before host 1 released at {r}"
        ),
        _ => panic!("no release on host 1 or no activation on host 2:\n{a}\n----\n{b}"),
    }
    hosts.stop(1, source);
    hosts.stop(2, target);
    hosts.assert_pool_clean(3);
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

    let script = migrate_script(&hosts.dir, "20");
    let (src_qmp, dst_qmp) = (hosts.dir.join("src.qmp"), hosts.dir.join("dst.qmp"));
    let mig = format!("unix:{}", hosts.dir.join("mig.sock").display());
    let (mut src, _src_console) = boot_source(Path::new(s1), &script, &src_qmp);
    let (mut dst, dst_rx) = spawn_guest(
        Path::new(s2),
        &script,
        &[("QMP", dst_qmp.to_str().unwrap()), ("INCOMING", &mig)],
    );
    let _dst_qmp = Qmp::connect(&dst_qmp);
    let mut qmp = Qmp::connect(&src_qmp);
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 100 << 20}),
    );
    let status = migrate(&mut qmp, &mig);
    assert_eq!(status["status"], "completed", "{status}");
    qmp.quit(&mut src);

    // The old process's server goes; the new one keeps serving.
    let t = hosts.ctl(1, &["serve-remove", "vm", "--socket", s1, "--control", ctl]);
    assert!(t.contains("stopped vm"), "{t}");
    use thinlun_vhost::control::{request, Answer, Request, ServedVolume};
    let list = request(Path::new(ctl), &Request::List {}).unwrap();
    let one = ServedVolume {
        name: "vm".into(),
        socket: s2.into(),
        transport: "vhost-user".into(),
    };
    assert_eq!(list, Ok(Answer::Served { volumes: vec![one] }));

    let lines = console(&dst_rx, |_| {}, None);
    let _ = dst.wait();
    assert_guest_ok(&lines, &["migrate-reads", "migrate-writes", "fio-verify"]);

    // One log, so the order shows: the source's release, then the
    // target's activation.
    assert_released_then_activated(&hosts.log(1));
    hosts.stop(1, daemon);
    hosts.assert_pool_clean(1);
}

/// QEMU does not compare the disks of a migration: with a target served
/// another volume (of another size or not), the migration completes and
/// the VM goes on with the wrong disk (seen with QEMU 10). So a target's
/// server refuses a volume that no server has active, since no VM can be
/// migrating from it. The target QEMU then cannot start, the migration
/// fails in QEMU, and the VM goes on on the source, its volume untouched.
#[test]
fn a_migration_to_a_wrong_volume_fails_and_the_vm_stays() {
    let _one = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_ready() {
        return;
    }
    let mut hosts = Hosts::new("migbad", true);
    hosts.ctl(1, &["create", "small", "512M"]);
    hosts.ctl(1, &["create", "other", "1G"]);
    let (source, src_sock) = hosts.serve(1, &[]);
    let dst_sock = hosts.dir.join("host2.sock");
    for vol in ["small", "other"] {
        let e = hosts.ctl_fails(
            2,
            &[
                "serve",
                vol,
                "--socket",
                dst_sock.to_str().unwrap(),
                "--incoming",
            ],
        );
        assert!(
            e.contains("not in use") && e.contains("check the name"),
            "{e}"
        );
    }
    assert!(!dst_sock.exists());

    let script = migrate_script(&hosts.dir, "15");
    let (src_qmp, dst_qmp) = (hosts.dir.join("src.qmp"), hosts.dir.join("dst.qmp"));
    let mig = format!("unix:{}", hosts.dir.join("mig.sock").display());
    let env = [("QMP", src_qmp.to_str().unwrap())];
    let (mut src, src_rx, _) = boot_until(&src_sock, &script, &env, "MIGRATE-READY");
    // The target QEMU finds no server and does not start.
    let (mut dst, dst_rx) = spawn_guest(
        &dst_sock,
        &script,
        &[("QMP", dst_qmp.to_str().unwrap()), ("INCOMING", &mig)],
    );
    let status = dst.wait().unwrap();
    let said = console(&dst_rx, |_| {}, None).join("\n");
    assert!(
        !status.success() && said.contains("host2.sock"),
        "{status}: {said}"
    );

    let mut qmp = Qmp::connect(&src_qmp);
    match qmp.try_execute("migrate", json!({ "uri": mig })) {
        Err(e) => eprintln!("migrate refused: {e}"),
        Ok(_) => {
            let r = migration_end(&mut qmp);
            assert_eq!(r["status"], "failed", "{r}");
        }
    }
    let run = qmp.execute("query-status", json!({}));
    assert_eq!(run["status"], "running", "{run}");
    let lines = console(&src_rx, |_| {}, None);
    let _ = src.wait();
    assert_guest_ok(&lines, &["migrate-reads", "migrate-writes", "fio-verify"]);
    let a = hosts.log(1);
    assert!(
        !a.contains(RELEASED_FOR_MIGRATION),
        "the source handed the volume over:\n{a}"
    );
    hosts.stop(1, source);
    hosts.assert_pool_clean(3);
}

/// The case the refusal above cannot catch: a target served another
/// running VM's volume. The migration completes in QEMU, but the target's
/// server never gets the volume: it waits out --incoming-wait and answers
/// IOERR, writing nothing. The source's VM, paused after the migration,
/// resumes with QMP `cont`: its server opens the volume again at the next
/// kick, and the guest finishes every check there.
#[test]
fn a_target_without_its_volume_fails_and_the_source_resumes() {
    let _one = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_ready() {
        return;
    }
    let mut hosts = Hosts::new("migbusy", true);
    hosts.ctl(1, &["create", "other", "1G"]);
    let (source, src_sock) = hosts.serve(1, &[]);
    // Another VM's volume, active on host 3.
    let (holder, _) = hosts.serve_volume(3, "other", &[]);
    let (target, dst_sock) =
        hosts.serve_volume(2, "other", &["--incoming", "--incoming-wait", "2"]);

    let script = migrate_script(&hosts.dir, "20");
    let (src_qmp, dst_qmp) = (hosts.dir.join("src.qmp"), hosts.dir.join("dst.qmp"));
    let mig = format!("unix:{}", hosts.dir.join("mig.sock").display());
    let env = [("QMP", src_qmp.to_str().unwrap())];
    let (mut src, src_rx, _) = boot_until(&src_sock, &script, &env, "MIGRATE-READY");
    let (mut dst, _dst_rx) = spawn_guest(
        &dst_sock,
        &script,
        &[("QMP", dst_qmp.to_str().unwrap()), ("INCOMING", &mig)],
    );
    let _dst_qmp = Qmp::connect(&dst_qmp);
    let mut qmp = Qmp::connect(&src_qmp);
    let status = migrate(&mut qmp, &mig);
    assert_eq!(status["status"], "completed", "{status}");

    let deadline = Instant::now() + Duration::from_secs(60);
    while !hosts.log(2).contains("not activated after") {
        assert!(Instant::now() < deadline, "target log:\n{}", hosts.log(2));
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_guest(&mut dst);
    qmp.execute("cont", json!({}));
    let run = qmp.execute("query-status", json!({}));
    assert_eq!(run["status"], "running", "{run}");
    let lines = console(&src_rx, |_| {}, None);
    let _ = src.wait();
    assert_guest_ok(&lines, &["migrate-reads", "migrate-writes", "fio-verify"]);

    assert_released_then_activated(&hosts.log(1));
    assert!(!hosts.log(2).contains("activated for"), "{}", hosts.log(2));
    hosts.stop(1, source);
    hosts.stop(2, target);
    hosts.stop(3, holder);
    hosts.assert_pool_clean(4);
}
