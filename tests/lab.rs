//! The guest lab (../shared/lab) for the end-to-end tests: whether it can
//! run here, a guest on a socket, and its console.

#![allow(dead_code)] // each e2e test crate uses part of the lab

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One guest at a time: two TCG guests on two cores would each take twice
/// as long.
pub static GUEST: Mutex<()> = Mutex::new(());

pub fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/lab")
}

fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_guest_kernel() -> bool {
    std::fs::read_dir("/boot").is_ok_and(|d| {
        d.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("vmlinuz-") && n.contains("cloud")
        })
    })
}

/// Whether the lab can run here; prints why not.
pub fn lab_ready() -> bool {
    let lab = lab_dir();
    if !lab.join("run-guest.sh").exists() {
        eprintln!(
            "SKIP: no guest lab at {} (shared/ beside the checkout)",
            lab.display()
        );
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if (!have_qemu() || !have_guest_kernel())
        && root
        && std::env::var("THINLUN_E2E_INSTALL").as_deref() != Ok("0")
    {
        eprintln!("installing QEMU and the guest kernel with install-qemu.sh");
        let _ = Command::new("bash")
            .arg(lab.join("install-qemu.sh"))
            .stdout(Stdio::null())
            .status();
    }
    if !have_qemu() {
        eprintln!(
            "SKIP: qemu-system-x86_64 not available (run ../shared/lab/install-qemu.sh as root)"
        );
        return false;
    }
    if !have_guest_kernel() {
        eprintln!(
            "SKIP: no /boot/vmlinuz-*cloud* guest kernel (run ../shared/lab/install-qemu.sh)"
        );
        return false;
    }
    true
}

/// Starts a guest on `sock` running `script`; its console lines (QEMU's
/// own messages prefixed `[qemu]`) arrive on the channel.
pub fn spawn_guest(
    sock: &Path,
    script: &Path,
    env: &[(&str, &str)],
) -> (Child, mpsc::Receiver<String>) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("bash");
    // Its own process group, so that kill_guest reaches QEMU too.
    cmd.process_group(0);
    cmd.arg(lab_dir().join("run-guest.sh"))
        .arg(sock)
        .arg(script)
        .env("GUEST_TIMEOUT", "150")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || each_line(out, |l| drop(tx.send(l))));
    std::thread::spawn(move || each_line(err, |l| drop(tx2.send(format!("[qemu] {l}")))));
    (child, rx)
}

/// Reads `from` to its end, a line at a time. Bytes that are not UTF-8
/// (a serial console prints some) are replaced, not the end of reading:
/// a reader that stops closes the pipe, and QEMU's next console write
/// then meets a closed pipe.
fn each_line(from: impl std::io::Read, mut f: impl FnMut(String)) {
    let mut r = BufReader::new(from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                f(line.trim_end_matches(['\n', '\r']).to_string());
            }
        }
    }
}

/// Boots a guest and reads its console up to the line holding `marker`:
/// the guest, its console channel, and the lines so far. Under TCG a
/// starved host can keep a guest from booting at all (see vhost_qemu.rs):
/// one more try. A guest that boots must reach the marker.
pub fn boot_until(
    sock: &Path,
    script: &Path,
    env: &[(&str, &str)],
    marker: &str,
) -> (Child, mpsc::Receiver<String>, Vec<String>) {
    for _attempt in 1..=2 {
        let (mut guest, rx) = spawn_guest(sock, script, env);
        let lines = console(&rx, |_| {}, Some(marker));
        if lines.iter().any(|l| l.contains(marker)) {
            return (guest, rx, lines);
        }
        kill_guest(&mut guest);
        assert!(
            !booted(&lines),
            "the guest booted but never printed {marker}:\n{}",
            lines.join("\n")
        );
    }
    panic!("the guest never booted");
}

/// A guest's console kept for a failing test: if the test panics while
/// this is alive, what the guest and its QEMU printed is shown (a QEMU
/// that exited mid-test says why only there).
pub struct ConsoleOnPanic(pub mpsc::Receiver<String>);

impl Drop for ConsoleOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines: Vec<String> = self.0.try_iter().collect();
            eprintln!("---- guest console (last 40 lines):");
            for l in lines.iter().skip(lines.len().saturating_sub(40)) {
                eprintln!("{l}");
            }
        }
    }
}

/// Kills a guest as a dead host would lose it: run-guest.sh and its QEMU
/// at once (SIGKILL to the process group spawn_guest gave them).
pub fn kill_guest(guest: &mut Child) {
    // SAFETY: plain syscall; the group is our child's own.
    unsafe { libc::kill(-(guest.id() as i32), libc::SIGKILL) };
    let _ = guest.wait();
}

/// `script` with shell variables set at its top, written into `dir`: the
/// guest sees no environment of ours.
pub fn guest_script(dir: &Path, script: &Path, vars: &[(&str, &str)]) -> PathBuf {
    let mut text: String = vars.iter().map(|(k, v)| format!("{k}='{v}'\n")).collect();
    text.push_str(&std::fs::read_to_string(script).unwrap());
    let out = dir.join(script.file_name().unwrap());
    std::fs::write(&out, text).unwrap();
    out
}

/// Collects the console until GUEST-END (or the guest exits). `on_event`
/// sees each line, and `None` at least every 200 ms.
/// `until`: stop after the line that contains it too.
pub fn console(
    rx: &mpsc::Receiver<String>,
    mut on_event: impl FnMut(Option<&str>),
    until: Option<&str>,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let line = line.replace('\r', "");
                on_event(Some(&line));
                let end = line.contains("GUEST-END") || until.is_some_and(|u| line.contains(u));
                lines.push(line);
                if end {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => on_event(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    lines
}

/// Whether the guest got as far as running its script.
pub fn booted(lines: &[String]) -> bool {
    lines.iter().any(|l| l.contains("GUEST-BEGIN"))
}

/// Every expected check passed, nothing failed, the script ended with 0.
pub fn assert_guest_ok(lines: &[String], expected: &[&str]) {
    let text = lines.join("\n");
    for name in expected {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("CHECK {name} ok"))),
            "check '{name}' did not pass; console:\n{text}"
        );
    }
    assert!(!text.contains("FAIL"), "a check failed; console:\n{text}");
    assert!(
        lines.iter().any(|l| l.contains("GUEST-END rc=0")),
        "no 'GUEST-END rc=0'; console:\n{text}"
    );
    for l in lines
        .iter()
        .filter(|l| l.contains("CHECK") || l.contains("INFO"))
    {
        eprintln!("guest: {}", l.trim());
    }
}

/// A QMP connection to one QEMU.
pub struct Qmp {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut qmp = Qmp {
            input: BufReader::new(out.try_clone().unwrap()),
            out,
        };
        qmp.line(); // the greeting
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        if let Err(e) = self.input.read_line(&mut l) {
            panic!("QMP: reading QEMU's monitor failed ({e})");
        }
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP said {l:?}: {e}"))
    }

    /// Asks QEMU to exit, and waits for it. A source QEMU may already be
    /// leaving on its own once a migration has completed (its monitor then
    /// closes before the command is read); that is fine, a crash is not.
    pub fn quit(&mut self, qemu: &mut std::process::Child) {
        let msg = json!({"execute": "quit", "arguments": {}});
        let _ = writeln!(self.out, "{msg}");
        let status = qemu.wait().expect("waiting for QEMU");
        use std::os::unix::process::ExitStatusExt;
        assert!(status.signal().is_none(), "QEMU died: {status}");
    }

    /// Runs a command; returns its `return` (events in between are skipped).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        self.try_execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
    }

    /// Runs a command: its `return`, or its `error`.
    pub fn try_execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let msg = json!({"execute": cmd, "arguments": args});
        if let Err(e) = writeln!(self.out, "{msg}") {
            // QEMU is gone: its console (shown on failure) says why.
            panic!("QMP {cmd}: QEMU closed its monitor ({e})");
        }
        loop {
            let r = self.line();
            if let Some(e) = r.get("error") {
                return Err(e.clone());
            }
            if let Some(v) = r.get("return") {
                return Ok(v.clone());
            }
        }
    }
}

/// Migrates the VM behind `src` to `uri` (a target QEMU started with
/// INCOMING=uri) and waits for the end; returns query-migrate's answer.
pub fn migrate(src: &mut Qmp, uri: &str) -> Value {
    src.execute("migrate", json!({ "uri": uri }));
    migration_end(src)
}

/// Waits for the migration under way to end; returns query-migrate's answer.
pub fn migration_end(src: &mut Qmp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = src.execute("query-migrate", json!({}));
        let s = r["status"].as_str().unwrap_or("");
        if ["completed", "failed", "cancelled"].contains(&s) {
            return r;
        }
        assert!(Instant::now() < deadline, "migration did not finish: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
