//! For the tests that run `thinctl daemon` or `thinctl serve` as a
//! process: a pool in a scratch directory, the thinctl that runs on it,
//! and the processes it started.

use super::vhost::scratch;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thinlun_tests::{parent_of, thinctl};

/// A pool file in a scratch directory and the `thinctl` to run on it.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub thinctl: PathBuf,
    pub pool: PathBuf,
    /// Processes started, killed on drop so a failing test leaves none.
    pub servers: std::cell::RefCell<Vec<u32>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for &pid in self.servers.borrow().iter() {
            // Only a process that is still our child: a server already
            // stopped and reaped may have had its pid reused.
            if parent_of(pid) == Some(std::process::id()) {
                // SAFETY: plain syscall on our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let dir = scratch(tag);
        let lab = Lab {
            thinctl: thinctl(),
            pool: dir.path().join("pool.img"),
            dir,
            servers: Default::default(),
        };
        lab.ctl(&["pool", "create", "--size", "256M"]);
        lab
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn control(&self) -> PathBuf {
        let mut s = std::fs::canonicalize(&self.pool).unwrap().into_os_string();
        s.push(".ctl");
        PathBuf::from(s)
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.thinctl)
            .arg("-p")
            .arg(&self.pool)
            .args(args)
            .env_remove("THINLUN_CONTROL")
            .output()
            .unwrap()
    }

    /// Runs thinctl, which must succeed; its stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "thinctl {args:?}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Runs thinctl, which must fail; its stderr.
    pub fn ctl_fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "thinctl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Starts `thinctl <args>` (daemon or serve) and waits until its
    /// control socket answers.
    pub fn start(&self, args: &[&str]) -> Child {
        let log = File::create(self.path("daemon.log")).unwrap();
        let mut child = Command::new(&self.thinctl)
            .arg("-p")
            .arg(&self.pool)
            .args(args)
            .env_remove("THINLUN_CONTROL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.borrow_mut().push(child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.control()).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("thinctl {args:?} exited with {st}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no control socket:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// SIGTERM; the process must exit cleanly and leave no socket.
    pub fn stop(&self, mut child: Child, sockets: &[&Path]) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let log = self.log();
        assert!(status.success(), "exited with {status}:\n{log}");
        assert!(log.contains("stopped serving"), "no clean stop in:\n{log}");
        for s in sockets {
            assert!(!s.exists(), "{} left behind:\n{log}", s.display());
        }
        assert!(!self.control().exists(), "control socket left behind");
        let check = self.ctl(&["check"]);
        assert!(check.contains("clean"), "pool check: {check}");
    }
}
