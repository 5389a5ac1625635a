//! The programs the harness drives: fio, `qemu-img bench`, and the two
//! vhost-user-blk servers (`thinctl serve`, `qemu-storage-daemon`).

use crate::direct::children_cpu;
use crate::pattern::Measured;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `prog` runs (`prog --version` or `--help` exits 0).
pub fn available(prog: &str, arg: &str) -> bool {
    Command::new(prog)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_output(cmd: &mut Command, what: &str) -> io::Result<String> {
    let out = cmd.stderr(Stdio::piped()).stdout(Stdio::piped()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// fio with io_uring and O_DIRECT on `file`: `rw` is randread, randwrite,
/// read or write. With `batches`, requests go in whole batches of `qd`
/// (submit `qd`, wait for all of them), otherwise `qd` are kept in flight.
pub fn fio(
    file: &Path,
    size: u64,
    rw: &str,
    bs: usize,
    qd: usize,
    secs: f64,
    batches: bool,
) -> io::Result<Measured> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=raw",
        "--ioengine=io_uring",
        "--direct=1",
        "--time_based=1",
        "--norandommap=1",
        "--randrepeat=0",
        "--lat_percentiles=1",
        "--output-format=json",
    ])
    .arg(format!("--filename={}", file.display()))
    .arg(format!("--rw={rw}"))
    .arg(format!("--bs={bs}"))
    .arg(format!("--iodepth={qd}"))
    .arg(format!("--size={size}"))
    .arg(format!("--runtime={}ms", (secs * 1000.0).round() as u64));
    if batches {
        cmd.arg(format!("--iodepth_batch_submit={qd}"))
            .arg(format!("--iodepth_batch_complete_min={qd}"));
    }
    let out = run_output(&mut cmd, "fio")?;
    let json = &out[out.find('{').unwrap_or(0)..];
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| io::Error::other(format!("fio output: {e}")))?;
    let job = &v["jobs"][0];
    let dir = if rw.contains("read") { "read" } else { "write" };
    let d = &job[dir];
    let ios = d["total_ios"].as_u64().unwrap_or(0);
    let runtime_ms = d["runtime"].as_f64().unwrap_or(0.0);
    let pct = |k: &str| d["lat_ns"]["percentile"][k].as_f64().map(|ns| ns / 1e3);
    let cpu_pct = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    let job_secs = job["job_runtime"].as_f64().unwrap_or(runtime_ms) / 1e3;
    Ok(Measured {
        ios,
        secs: runtime_ms / 1e3,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        cpu_us_per_io: (ios > 0).then(|| cpu_pct / 100.0 * job_secs * 1e6 / ios as f64),
        switches_per_io: job["ctx"]
            .as_f64()
            .filter(|_| ios > 0)
            .map(|c| c / ios as f64),
        ..Measured::default()
    })
}

/// `qemu-img bench` on a qcow2 image with O_DIRECT (`-t none`) and
/// io_uring: `count` requests of `bs` bytes, `qd` at a time, at offsets
/// advancing by `step` modulo the image size.
pub fn qemu_img_bench(
    image: &Path,
    write: bool,
    bs: usize,
    qd: usize,
    count: u64,
    step: u64,
) -> io::Result<Measured> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "qcow2", "-t", "none", "-i", "io_uring"])
        .args(["-d", &qd.to_string()])
        .args(["-c", &count.to_string()])
        .args(["-s", &bs.to_string()])
        .args(["-S", &step.to_string()]);
    if write {
        cmd.args(["-w", "--pattern=0x5a"]);
    }
    cmd.arg(image);
    let cpu0 = children_cpu();
    let out = run_output(&mut cmd, "qemu-img bench")?;
    let cpu = children_cpu() - cpu0;
    let secs: f64 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse()
                .ok()
        })
        .ok_or_else(|| io::Error::other(format!("qemu-img bench printed no time: {out}")))?;
    Ok(Measured {
        ios: count,
        secs,
        cpu_us_per_io: Some(cpu.as_secs_f64() * 1e6 / count as f64),
        note: "no latencies (qemu-img bench reports only the total time)".into(),
        ..Measured::default()
    })
}

/// Creates a qcow2 image (64 KiB clusters, the default), optionally over a
/// qcow2 backing file.
pub fn qcow2_create(image: &Path, size: u64, backing: Option<&Path>) -> io::Result<()> {
    let _ = std::fs::remove_file(image);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    cmd.arg(image).arg(size.to_string());
    run_output(&mut cmd, "qemu-img create").map(|_| ())
}

/// A vhost-user-blk server process.
pub struct Server {
    child: Child,
    pub sock: PathBuf,
    log: PathBuf,
    what: String,
}

impl Server {
    /// `thinctl -p POOL serve --socket SOCK VOL [--lazy-commit] [--queues N]`.
    pub fn thinctl(
        thinctl: &Path,
        pool: &Path,
        vol: &str,
        sock: &Path,
        lazy: bool,
        queues: usize,
        log: &Path,
    ) -> io::Result<Server> {
        let mut cmd = Command::new(thinctl);
        cmd.arg("-p")
            .arg(pool)
            .arg("serve")
            .arg("--socket")
            .arg(sock);
        if lazy {
            cmd.arg("--lazy-commit");
        }
        if queues > 1 {
            cmd.arg("--queues").arg(queues.to_string());
        }
        cmd.arg(vol);
        Server::start(cmd, sock, log, "thinctl serve")
    }

    /// qemu-storage-daemon exporting `image` (raw, or qcow2 with an
    /// optional qcow2 backing file) over vhost-user-blk with `queues`
    /// virtqueues, O_DIRECT and io_uring throughout.
    pub fn qsd(
        image: &Path,
        qcow2: bool,
        backing: Option<&Path>,
        queues: usize,
        sock: &Path,
        log: &Path,
    ) -> io::Result<Server> {
        let file = |node: &str, path: &Path, ro: bool| {
            format!(
                "driver=file,node-name={node},filename={},cache.direct=on,aio=io_uring{}",
                path.display(),
                if ro { ",read-only=on" } else { "" }
            )
        };
        let mut cmd = Command::new("qemu-storage-daemon");
        if let Some(b) = backing {
            cmd.arg("--blockdev").arg(file("bfile", b, true));
            cmd.arg("--blockdev")
                .arg("driver=qcow2,node-name=base,file=bfile,read-only=on");
        }
        cmd.arg("--blockdev").arg(file("file", image, false));
        let fmt = if qcow2 { "qcow2" } else { "raw" };
        let backing_opt = if backing.is_some() {
            ",backing=base"
        } else {
            ""
        };
        cmd.arg("--blockdev").arg(format!(
            "driver={fmt},node-name=disk,file=file{backing_opt}"
        ));
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},\
             writable=on,num-queues={queues}",
            sock.display()
        ));
        Server::start(cmd, sock, log, "qemu-storage-daemon")
    }

    fn start(mut cmd: Command, sock: &Path, log: &Path, what: &str) -> io::Result<Server> {
        let _ = std::fs::remove_file(sock);
        let logf = File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let child = cmd.spawn()?;
        let mut s = Server {
            child,
            sock: sock.to_path_buf(),
            log: log.to_path_buf(),
            what: what.to_string(),
        };
        // Ready once the socket exists (the client retries its connect).
        let t = Instant::now();
        while !sock.exists() {
            if let Some(st) = s.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{what} exited ({st}) before listening: {}",
                    s.log_text()
                )));
            }
            if t.elapsed() > Duration::from_secs(20) {
                return Err(io::Error::other(format!(
                    "{what} did not create {} within 20 s",
                    sock.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(s)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time of the server so far (clock-tick resolution).
    pub fn cpu(&self) -> Option<Duration> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
    }

    /// Context switches (voluntary and not) of all the server's threads.
    pub fn switches(&self) -> Option<u64> {
        let mut total = 0;
        for t in std::fs::read_dir(format!("/proc/{}/task", self.pid())).ok()? {
            let s = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
            total += s
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|n| n.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
        Some(total)
    }

    /// Resident set size of the server.
    pub fn rss(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines().find_map(|l| {
            let kib: u64 = l
                .strip_prefix("VmRSS:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
    }

    /// SIGTERM, then wait (SIGKILL after 20 s).
    pub fn stop(mut self) -> io::Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> io::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() && st.signal().is_none() {
                    return Err(io::Error::other(format!(
                        "{} exited with {st}: {}",
                        self.what,
                        self.log_text()
                    )));
                }
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(io::Error::other(format!(
                    "{} did not stop within 20 s of SIGTERM",
                    self.what
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

use std::os::unix::process::ExitStatusExt;

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.terminate();
        let _ = std::fs::remove_file(&self.sock);
    }
}
