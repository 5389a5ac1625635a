//! Helpers shared by the thinlun integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `thinctl` binary of this workspace, built if needed (a test cannot
/// name another package's binary).
pub fn thinctl() -> PathBuf {
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
