//! End to end: restarting a dead host's VM on a live host of a shared
//! pool, as an HA manager does.
//!
//! Host 1 serves volume `vm` to a guest (tests/guest/failover-write.sh)
//! that syncs records to an ext4 log; then host 1's server and its QEMU
//! are killed with SIGKILL, leaving the volume active on host 1. A
//! one-shot `thinctl serve` on host 2 must wait until host 1 is proven
//! dead (its lease slot unchanged for the dead time, 9 x io_timeout, as
//! host 2 watched it), recover it and serve. A guest booted on host 2
//! (tests/guest/failover-check.sh) finds every record synced before the
//! kill and the synced file, fsck is clean, and it can write.

use std::path::Path;
use std::time::{Duration, Instant};

mod hosts;
mod lab;
use hosts::Hosts;
use lab::{
    assert_guest_ok, boot_until, console, guest_script, kill_guest, lab_ready, spawn_guest, GUEST,
};

/// The pool's io_timeout (Hosts::new) and the dead time it gives.
const DEAD_TIME: Duration = Duration::from_secs(9);

#[test]
fn a_dead_hosts_vm_restarts_on_a_live_host() {
    let _one = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_ready() {
        return;
    }
    let mut hosts = Hosts::new("failover", true);
    let (mut server1, s1) = hosts.serve(1, &[]);
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");

    let (mut guest1, _, lines) =
        boot_until(&s1, &here.join("failover-write.sh"), &[], "FLUSHED 10");
    let keep = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("KEEP "))
        .expect("the synced file's checksum")
        .to_string();
    let flushed = lines
        .iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix("FLUSHED "))
        .expect("a synced record")
        .to_string();

    // Host 1 dies: its server and its QEMU at once, nothing released.
    server1.kill().unwrap();
    server1.wait().unwrap();
    kill_guest(&mut guest1);
    assert!(
        !hosts.log(1).contains("released"),
        "host 1 released the volume:\n{}",
        hosts.log(1)
    );

    let asked = Instant::now();
    let (server2, s2) = hosts.serve(2, &[]);
    let took = asked.elapsed();
    let log2 = hosts.log(2);
    assert!(
        log2.contains("waiting up to") && log2.contains("for host 1"),
        "host 2 did not say what it waited for:\n{log2}"
    );
    // Never before host 1 is proven dead; and not long after.
    assert!(
        took >= DEAD_TIME,
        "served after {took:?}, before the dead time:\n{log2}"
    );
    assert!(took < DEAD_TIME * 3, "served only after {took:?}:\n{log2}");
    eprintln!(
        "host 2 took the volume {} ms after it was asked",
        took.as_millis()
    );

    let check = guest_script(
        &hosts.dir,
        &here.join("failover-check.sh"),
        &[("KEEP_MD5", &keep), ("FLUSHED", &flushed)],
    );
    let (mut guest2, rx) = spawn_guest(&s2, &check, &[]);
    let lines = console(&rx, |_| {}, None);
    let _ = guest2.wait();
    assert_guest_ok(
        &lines,
        &[
            "mount",
            "synced-file",
            "synced-records",
            "fsck",
            "write-after",
        ],
    );
    hosts.stop(2, server2);
    hosts.assert_pool_clean(3);
}
