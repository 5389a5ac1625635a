//! Thinctl "hosts" for the end-to-end tests: one pool file, shared by
//! host ids or of one host, and the `thinctl serve` and `thinctl daemon`
//! processes that serve its volume `vm`, each logging to its own file.

#![allow(dead_code)] // each e2e test crate uses part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thinlun_tests::{parent_of, thinctl, thinctl_ok};

pub struct Hosts {
    pub dir: PathBuf,
    pub pool: PathBuf,
    shared: bool,
    servers: Vec<u32>,
}

impl Hosts {
    /// A pool with volume `vm`: shared by hosts, or of one host.
    pub fn new(tag: &str, shared: bool) -> Hosts {
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

    pub fn command(&self, host: u32, args: &[&str]) -> Command {
        let mut cmd = Command::new(thinctl());
        cmd.arg("-p").arg(&self.pool);
        if self.shared {
            cmd.args(["--host-id", &host.to_string()]);
        }
        cmd.args(args);
        cmd
    }

    pub fn ctl(&self, host: u32, args: &[&str]) -> String {
        let host = host.to_string();
        let mut all = vec!["--host-id", &host];
        if !self.shared {
            all.clear();
        }
        all.extend_from_slice(args);
        thinctl_ok(&self.pool, &all)
    }

    /// The error of a thinctl command that must fail.
    pub fn ctl_fails(&self, host: u32, args: &[&str]) -> String {
        let out = self.command(host, args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn control(&self, host: u32) -> PathBuf {
        self.dir.join(format!("host{host}.ctl"))
    }

    /// `thinctl daemon` as host `host`, waiting for its control socket.
    pub fn daemon(&mut self, host: u32) -> Child {
        let ctl = self.control(host);
        let cmd = self.command(host, &["daemon", "--control", ctl.to_str().unwrap()]);
        self.start(host, cmd, &ctl)
    }

    /// Runs `cmd` as host `host`'s server, logging to its file, and waits
    /// for `path` (its socket) to appear.
    fn start(&mut self, host: u32, mut cmd: Command, path: &Path) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("host{host}.log"))).unwrap();
        let mut child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.servers.push(child.id());
        self.wait_for(host, &mut child, path);
        child
    }

    fn wait_for(&self, host: u32, child: &mut Child, path: &Path) {
        // A one-shot serve of a dead host's volume waits out the dead time
        // first.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !path.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("thinctl exited with {status}:\n{}", self.log(host));
            }
            assert!(Instant::now() < deadline, "no socket:\n{}", self.log(host));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self, host: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("host{host}.log"))).unwrap_or_default()
    }

    /// `thinctl serve vm` as host `host`, waiting for its socket.
    pub fn serve(&mut self, host: u32, extra: &[&str]) -> (Child, PathBuf) {
        self.serve_volume(host, "vm", extra)
    }

    /// `thinctl serve VOL` as host `host`, waiting for its socket.
    pub fn serve_volume(&mut self, host: u32, vol: &str, extra: &[&str]) -> (Child, PathBuf) {
        let sock = self.dir.join(format!("host{host}.sock"));
        let mut cmd = self.command(host, &["serve", vol, "--socket"]);
        cmd.arg(&sock)
            .arg("--control")
            .arg(self.control(host))
            .args(extra);
        let child = self.start(host, cmd, &sock);
        (child, sock)
    }

    pub fn stop(&self, host: u32, mut server: Child) {
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

/// The timestamp of the first line of a server's log that holds `needle`
/// (thinctl's logger starts each line with an RFC 3339 UTC time, which
/// compares as text).
pub fn stamp(log: &str, needle: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let ts = line.split_whitespace().next()?;
    ts.ends_with('Z').then(|| ts.to_string())
}

impl Hosts {
    /// `thinctl check` as host `host` finds the pool clean.
    pub fn assert_pool_clean(&self, host: u32) {
        let check = self.ctl(host, &["check"]);
        assert!(check.contains("clean"), "pool check: {check}");
    }
}

/// A server's log line at the source's release that ends a migration.
pub const RELEASED_FOR_MIGRATION: &str =
    "released (the front end stopped the device for a migration)";
/// A server's log line when it starts writing for its front end.
pub const ACTIVATED: &str = "activated for the front end's rings";

/// One server's log shows the release that ended a migration and, after
/// it, an activation (the same daemon's other server, or itself again).
pub fn assert_released_then_activated(log: &str) {
    let released = log
        .find(RELEASED_FOR_MIGRATION)
        .unwrap_or_else(|| panic!("no release at the migration:\n{log}"));
    let activated = log
        .rfind(ACTIVATED)
        .unwrap_or_else(|| panic!("no activation:\n{log}"));
    assert!(
        released < activated,
        "no activation after the release:\n{log}"
    );
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
