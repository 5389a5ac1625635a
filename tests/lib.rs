//! Helpers shared by the thinlun integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `thinctl` binary of this workspace, built once per test process if
/// needed (a test cannot name another package's binary).
pub fn thinctl() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(build_thinctl).clone()
}

fn build_thinctl() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", "thinctl"])
        .current_dir(&ws)
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build -p thinctl failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| ws.join("target"));
    target.join("debug/thinctl")
}

/// Runs `thinctl -p POOL ARGS...`, which must succeed; returns its stdout.
pub fn thinctl_ok(pool: &Path, args: &[&str]) -> String {
    let out = Command::new(thinctl())
        .arg("-p")
        .arg(pool)
        .args(args)
        .output()
        .expect("running thinctl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "thinctl {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Parent pid of a live process, from /proc.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The seeded generator of the test workloads: the same seed gives the
/// same run, so a failure printed with its seed can be replayed.
pub type Rng = fastrand::Rng;
