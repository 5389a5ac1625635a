//! End-to-end tests of thinctl on a shared pool: host ids, one writer per
//! volume across processes, `lock status` and `release`, changes made by
//! the serving process of the same host.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

mod common;
use common::{JExt, TempDir, J};

const BIN: &str = env!("CARGO_BIN_EXE_thinctl");

/// thinctl as host `host` (0 = no host id) on its own "machine" (lock-file
/// directory), so several hosts can run from one test.
fn thinctl(dir: &TempDir, host: u32, args: &[&str]) -> Output {
    command(dir, host, args).output().unwrap()
}

fn command(dir: &TempDir, host: u32, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("-p").arg(dir.path("pool.img"));
    c.env_remove("THINLUN_HOST_ID");
    c.env("THINLUN_CONFIG", dir.path("no-such.conf"));
    c.env("THINLUN_RUN_DIR", dir.path(&format!("run{host}")));
    if host != 0 {
        c.arg("--host-id").arg(host.to_string());
    }
    c.args(args);
    c
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(!out.status.success(), "unexpected success");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn new_shared_pool(dir: &TempDir) {
    ok(&thinctl(
        dir,
        0,
        &[
            "pool",
            "create",
            "--size",
            "128M",
            "--chunk-size",
            "64K",
            "--max-hosts",
            "4",
            "--shared",
            "--io-timeout",
            "50ms",
            "--group-size",
            "4M",
        ],
    ));
}

/// `thinctl serve` of a volume as `host`, holding it active until killed.
fn serve(dir: &TempDir, host: u32, vol: &str, socket: &Path) -> Child {
    let mut c = command(
        dir,
        host,
        &["serve", vol, "--socket", socket.to_str().unwrap()],
    );
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{} never appeared", path.display());
}

#[test]
fn shared_pool_needs_host_ids_and_reports_them() {
    let dir = TempDir::new("ids");
    new_shared_pool(&dir);
    let status = ok(&thinctl(&dir, 0, &["pool", "status"]));
    assert!(
        status.contains("shared through leases, I/O timeout 50 ms"),
        "{status}"
    );
    let e = err(&thinctl(&dir, 0, &["create", "vm-1", "16M"]));
    assert!(e.contains("--host-id"), "{e}");
    let e = err(&thinctl(&dir, 9, &["create", "vm-1", "16M"]));
    assert!(e.contains("out of range"), "{e}");
    ok(&thinctl(&dir, 1, &["create", "vm-1", "16M"]));
    // The config file names the host too.
    std::fs::write(dir.path("thinlun.conf"), "# this host\nhost_id = 2\n").unwrap();
    let out = command(&dir, 0, &["create", "vm-2", "16M"])
        .env("THINLUN_CONFIG", dir.path("thinlun.conf"))
        .output()
        .unwrap();
    ok(&out);
    // Read-only inspection needs no id.
    let list = ok(&thinctl(&dir, 0, &["list"]));
    assert!(list.contains("vm-1") && list.contains("vm-2"), "{list}");
    let j = J::parse(&ok(&thinctl(&dir, 0, &["lock", "status", "--json"])));
    assert_eq!(j.num("io_timeout_ms"), 50.0);
    ok(&thinctl(&dir, 0, &["check"]));
}

#[test]
fn one_writer_per_volume_across_hosts_and_release_for_migration() {
    let dir = TempDir::new("writers");
    new_shared_pool(&dir);
    ok(&thinctl(&dir, 1, &["create", "vm-100-disk-0", "16M"]));
    let sock = dir.path("vm.sock");
    let mut server = serve(&dir, 1, "vm-100-disk-0", &sock);
    wait_for(&sock);
    // Host 2 cannot take the volume while host 1 serves it.
    let e = err(&thinctl(&dir, 2, &["snapshot", "vm-100-disk-0@s"]));
    assert!(e.contains("active on host 1"), "{e}");
    let e = err(&thinctl(&dir, 2, &["resize", "vm-100-disk-0", "32M"]));
    assert!(e.contains("active on host 1"), "{e}");
    let status = ok(&thinctl(&dir, 0, &["lock", "status"]));
    assert!(status.contains("vm-100-disk-0: host 1"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("1 ") && l.ends_with("live")),
        "{status}"
    );
    // On host 1 the server holds the host id ("already in use by another
    // thinlun process"): host 1's changes are made by the server.
    let out = ok(&command(&dir, 1, &["create", "vm-200-disk-0", "16M"])
        .env_remove("THINLUN_CONTROL")
        .output()
        .unwrap());
    assert_eq!(
        out,
        "created volume 'vm-200-disk-0' (16M, 16777216 bytes)\n"
    );
    let e = err(&thinctl(&dir, 1, &["remove", "vm-100-disk-0"]));
    assert!(e.contains("'vm-100-disk-0' is open"), "{e}");
    // Migration: release on host 1 (the server stops serving it) ...
    let out = command(&dir, 1, &["release", "vm-100-disk-0"])
        .output()
        .unwrap();
    ok(&out);
    // ... then host 2 may change it.
    ok(&thinctl(&dir, 2, &["snapshot", "vm-100-disk-0@moved"]));
    let _ = server.kill();
    let _ = server.wait();
    let check = thinctl(&dir, 0, &["check"]);
    ok(&check);
}

/// Failover: host 1's server is killed with the volume active. On host 2,
/// `serve --no-wait` names the holder at once; a plain `serve` waits until
/// host 1 is proven dead, recovers it and serves the volume, with every
/// write host 1 made.
#[test]
fn serve_waits_for_a_dead_holder_and_takes_its_volume() {
    let dir = TempDir::new("failover");
    new_shared_pool(&dir);
    let image = dir.path("disk.raw");
    let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i / 4096) as u8 ^ 0x5a).collect();
    std::fs::write(&image, &data).unwrap();
    ok(&thinctl(
        &dir,
        1,
        &["import", "vm-100-disk-0", image.to_str().unwrap()],
    ));
    let sock1 = dir.path("vm1.sock");
    let mut server1 = serve(&dir, 1, "vm-100-disk-0", &sock1);
    wait_for(&sock1);
    std::thread::sleep(std::time::Duration::from_millis(200));
    server1.kill().unwrap();
    server1.wait().unwrap();

    let sock2 = dir.path("vm2.sock");
    let sock2_arg = sock2.to_str().unwrap();
    let e = err(&thinctl(
        &dir,
        2,
        &["serve", "vm-100-disk-0", "--socket", sock2_arg, "--no-wait"],
    ));
    assert!(e.contains("active on host 1"), "{e}");
    assert!(!sock2.exists());

    let log = std::fs::File::create(dir.path("serve2.log")).unwrap();
    let mut server2 = command(&dir, 2, &["serve", "vm-100-disk-0", "--socket", sock2_arg])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for(&sock2);
    let term = Command::new("kill")
        .args(["-TERM", &server2.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(server2.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path("serve2.log")).unwrap();
    assert!(log.contains("waiting up to"), "{log}");
    assert!(log.contains("host 1"), "{log}");

    let out = dir.path("out.raw");
    ok(&thinctl(
        &dir,
        2,
        &["export", "vm-100-disk-0", out.to_str().unwrap()],
    ));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "exported data differs"
    );
    ok(&thinctl(&dir, 0, &["check"]));
}

/// Issue 17 items 6 and 8: --host-id's range comes from the pool, and
/// lock status has a scripted form.
#[test]
fn host_id_range_from_the_pool_and_scripted_lock_status() {
    let dir = TempDir::new("host-range");
    new_shared_pool(&dir);
    for id in [5, 200] {
        let e = err(&thinctl(&dir, id, &["create", "x", "4M"]));
        assert!(e.contains("1..=4") && !e.contains("100"), "{e}");
    }
    // 0 is refused as a usage error, without the parser's u32 maximum.
    let zero = thinctl(&dir, 0, &["--host-id", "0", "create", "x", "4M"]);
    assert_eq!(zero.status.code(), Some(2));
    let e = err(&zero);
    assert!(e.contains("start at 1") && !e.contains("4294967295"), "{e}");
    ok(&thinctl(&dir, 1, &["create", "x", "4M"]));
    let out = ok(&thinctl(
        &dir,
        0,
        &["lock", "status", "-H", "-o", "host,state"],
    ));
    assert!(out.lines().any(|l| l == "1\tfree"), "{out}");
    assert!(out.lines().all(|l| l.split('\t').count() == 2), "{out}");
    assert!(
        !out.contains("HOST") && !out.contains("global lock"),
        "{out}"
    );
}
