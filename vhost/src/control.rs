//! Many volumes of one pool served from one process, changed at run time
//! through a control socket.
//!
//! The process that holds a pool for writing (its `flock`) is the only one
//! that may change it, so whatever has to happen to the pool while volumes
//! are served (a snapshot, serving another volume, stopping one) is asked
//! of that process on a Unix socket, by default `<pool path>.ctl`.
//!
//! The protocol is one request line per connection and one reply line:
//!
//! | request | reply |
//! |---|---|
//! | `snapshot VOL@SNAP` | `ok VOL@SNAP mapped_bytes=N` |
//! | `add VOL SOCKET [QUEUES]` | `ok serving VOL on SOCKET (N queues[, read-only])` |
//! | `remove VOL` | `ok stopped VOL: N connections, R requests in B batches, E errors` |
//! | `list` | `ok N [VOL=SOCKET]...` |
//! | `status` | `ok key=value ...` (pool figures, `served=N`) |
//!
//! Any failure is `error <text>`. Lines are at most [`MAX_LINE`] bytes of
//! UTF-8; words are separated by blanks (so socket paths cannot hold
//! blanks). Bad input of any kind gets an error line, never a crash.

use crate::backend::StatsSnapshot;
use crate::server::{check_stale_socket, default_serial, ServeOptions, Server, StopHandle};
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use thinlun::{Pool, Volume};

/// Longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 4096;
/// How long the daemon waits for a client's request line, and a client
/// for the reply (a snapshot waits for in-flight writes).
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The control socket of the pool at `pool`: `<pool path>.ctl` for a file
/// (the path made canonical, so every client finds the same socket
/// whatever its working directory), and for a block device (or anything
/// not a regular file) `/run/thinlun/<path with / as ->.ctl`.
pub fn default_control_path(pool: &Path) -> PathBuf {
    let canon = std::fs::canonicalize(pool).unwrap_or_else(|_| pool.to_path_buf());
    let regular = std::fs::metadata(&canon)
        .map(|m| m.is_file())
        .unwrap_or(true);
    if regular {
        let mut s = canon.into_os_string();
        s.push(".ctl");
        PathBuf::from(s)
    } else {
        let flat: String = canon
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', "-");
        Path::new("/run/thinlun").join(format!("{flat}.ctl"))
    }
}

/// A parsed control request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Snapshot(String),
    /// Grow the pool onto its grown file or LUN.
    Grow,
    Add {
        name: String,
        socket: PathBuf,
        queues: u16,
    },
    Remove(String),
    List,
    Status,
}

/// Parses one request line (without its newline). Pure; every malformed
/// line is an `Err` with the text of the error reply.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let usage = |u: &str| Err(format!("usage: {u}"));
    match words.as_slice() {
        [] => {
            Err("empty request (commands: snapshot, grow, add, remove, list, status)".to_string())
        }
        ["snapshot", spec] => {
            if !spec.contains('@') {
                return Err(format!("'{spec}' is not a snapshot name; use VOL@SNAP"));
            }
            Ok(Request::Snapshot(spec.to_string()))
        }
        ["snapshot", ..] => usage("snapshot VOL@SNAP"),
        ["add", name, socket] | ["add", name, socket, _] => {
            let queues = match words.get(3) {
                None => 1,
                Some(q) => match q.parse::<u16>() {
                    Ok(n @ 1..=64) => n,
                    _ => return Err(format!("'{q}' queues: use 1 to 64")),
                },
            };
            if !socket.starts_with('/') {
                return Err(format!("socket '{socket}' is not an absolute path"));
            }
            Ok(Request::Add {
                name: name.to_string(),
                socket: PathBuf::from(socket),
                queues,
            })
        }
        ["add", ..] => usage("add VOL SOCKET [QUEUES]"),
        ["remove", name] => Ok(Request::Remove(name.to_string())),
        ["remove", ..] => usage("remove VOL"),
        ["list"] => Ok(Request::List),
        ["grow"] => Ok(Request::Grow),
        ["status"] => Ok(Request::Status),
        ["list" | "status" | "grow", ..] => Err(format!("'{}' takes no arguments", words[0])),
        [cmd, ..] => Err(format!(
            "unknown command '{}' (commands: snapshot, add, remove, list, status)",
            cmd.chars().take(64).collect::<String>()
        )),
    }
}

/// Sends one request to the control socket at `control`; the reply's
/// text, `Ok` for `ok`, `Err` for `error`. The outer error is a failure
/// to talk to the socket at all.
pub fn request(control: &Path, line: &str) -> io::Result<Result<String, String>> {
    let mut s = UnixStream::connect(control)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut reply = String::new();
    BufReader::new(s.take(64 * 1024)).read_line(&mut reply)?;
    let reply = reply.trim_end_matches(['\r', '\n']);
    if let Some(t) = reply.strip_prefix("ok") {
        Ok(Ok(t.trim_start().to_string()))
    } else if let Some(t) = reply.strip_prefix("error") {
        Ok(Err(t.trim_start().to_string()))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply from {}: '{reply}'", control.display()),
        ))
    }
}

/// What serving a volume came to, once stopped.
#[derive(Clone, Debug)]
pub struct Stopped {
    pub name: String,
    pub connections: u64,
    pub stats: StatsSnapshot,
    /// The serve loop's error, or a failed final flush.
    pub error: Option<String>,
}

impl Stopped {
    fn summary(&self) -> String {
        format!(
            "{}: {} connection{}, {} requests in {} batches, {} errors{}",
            self.name,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.stats.requests,
            self.stats.batches,
            self.stats.errors,
            self.error
                .as_ref()
                .map_or(String::new(), |e| format!(" (failed: {e})"))
        )
    }
}

struct Served {
    socket: PathBuf,
    queues: u16,
    read_only: bool,
    vol: Arc<Volume>,
    stop: StopHandle,
    thread: JoinHandle<(io::Result<()>, Server)>,
}

/// The control socket; unlinked on drop.
struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves volumes of one open pool, one vhost-user socket and one serving
/// thread each, and answers the control socket.
pub struct Daemon {
    pool: Option<Pool>,
    template: ServeOptions,
    served: BTreeMap<String, Served>,
    control: Option<ControlSocket>,
    stop: StopHandle,
}

impl Daemon {
    /// Takes over `pool` and listens on `control` (replacing a stale
    /// socket; only the owner may connect). `template` gives the options
    /// of every volume added (block size, durability, read-only); its
    /// socket, queues and serial are set per volume. Without `control`
    /// the set of volumes is fixed by the caller ([`Daemon::add`]).
    pub fn new(pool: Pool, control: Option<&Path>, template: ServeOptions) -> io::Result<Daemon> {
        let control = match control {
            None => None,
            Some(path) => {
                check_stale_socket(path)?;
                let _ = std::fs::remove_file(path);
                if let Some(dir) = path.parent() {
                    if !dir.as_os_str().is_empty() && !dir.exists() {
                        std::fs::create_dir_all(dir)?;
                    }
                }
                let listener = UnixListener::bind(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
                })?;
                let sock = ControlSocket {
                    listener,
                    path: path.to_path_buf(),
                };
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                sock.listener.set_nonblocking(true)?;
                Some(sock)
            }
        };
        Ok(Daemon {
            pool: Some(pool),
            template,
            served: BTreeMap::new(),
            control,
            stop: StopHandle::new()?,
        })
    }

    /// Stops [`Daemon::run`] (for a signal waiter).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_ref().map(|c| c.path.as_path())
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("pool open until shutdown")
    }

    /// Starts serving volume `name` on `socket`; returns the reply text.
    pub fn add(&mut self, name: &str, socket: &Path, queues: u16) -> Result<String, String> {
        if self.served.contains_key(name) {
            return Err(format!("'{name}' is already served"));
        }
        if let Some((other, _)) = self.served.iter().find(|(_, s)| s.socket == socket) {
            return Err(format!(
                "{} is the socket of '{other}' already",
                socket.display()
            ));
        }
        let pool = self.pool();
        let info = pool.volume_info(name).map_err(|e| e.to_string())?;
        let read_only = self.template.read_only || info.read_only;
        let opts = ServeOptions {
            socket: socket.to_path_buf(),
            num_queues: queues,
            read_only,
            opt_io_bytes: pool.status().chunk_bytes,
            serial: default_serial(&info.name, info.id),
            ..self.template.clone()
        };
        let vol = Arc::new(pool.open_volume(name).map_err(|e| e.to_string())?);
        let mut server =
            Server::new(vol.clone(), &opts).map_err(|e| format!("serving '{name}': {e}"))?;
        let stop = server.stop_handle();
        let thread = std::thread::Builder::new()
            .name(format!(
                "serve-{}",
                name.chars().take(9).collect::<String>()
            ))
            .spawn(move || {
                let r = server.run();
                (r, server)
            })
            .map_err(|e| format!("starting a thread: {e}"))?;
        let text = format!(
            "serving {name} on {} ({queues} queue{}{})",
            socket.display(),
            if queues == 1 { "" } else { "s" },
            if read_only { ", read-only" } else { "" }
        );
        self.served.insert(
            name.to_string(),
            Served {
                socket: socket.to_path_buf(),
                queues,
                read_only,
                vol,
                stop,
                thread,
            },
        );
        Ok(text)
    }

    /// Stops serving `name`: ends its connection, joins its thread,
    /// removes its socket and flushes the volume.
    pub fn remove(&mut self, name: &str) -> Result<Stopped, String> {
        let s = self
            .served
            .remove(name)
            .ok_or_else(|| format!("'{name}' is not served"))?;
        s.stop.stop();
        Ok(finish(name, s))
    }

    /// `(name, socket, queues, read-only)` of every served volume.
    pub fn list(&self) -> Vec<(String, PathBuf, u16, bool)> {
        self.served
            .iter()
            .map(|(n, s)| (n.clone(), s.socket.clone(), s.queues, s.read_only))
            .collect()
    }

    fn status_text(&self) -> String {
        let st = self.pool().status();
        let crossed = if st.thresholds_crossed.is_empty() {
            "none".to_string()
        } else {
            st.thresholds_crossed.join(",").replace(' ', "")
        };
        format!(
            "size_bytes={} data_bytes={} data_used_bytes={} data_free_bytes={} \
             data_used_pct={} metadata_used_pct={} volumes={} snapshots={} bases={} \
             clones={} provisioned_bytes={} thresholds_crossed={crossed} served={}",
            st.size_bytes,
            st.data_bytes,
            st.data_used_bytes,
            st.data_free_bytes,
            st.data_used_pct,
            st.metadata_used_pct,
            st.volumes,
            st.snapshots,
            st.bases,
            st.clones,
            st.provisioned_bytes,
            self.served.len()
        )
    }

    /// Answers one request line: the reply line, without newline.
    pub fn handle_line(&mut self, line: &str) -> String {
        let r = match parse_request(line) {
            Err(e) => Err(e),
            Ok(req) => self.handle(req),
        };
        // One line whatever the engine or OS put in a message.
        match r {
            Ok(t) => format!("ok {}", t.replace(['\n', '\r'], "; ")),
            Err(t) => format!("error {}", t.replace(['\n', '\r'], "; ")),
        }
    }

    fn handle(&mut self, req: Request) -> Result<String, String> {
        match req {
            Request::Snapshot(spec) => {
                // The engine locks every write stripe: in-flight guest
                // writes finish first, new ones wait, so the snapshot is
                // crash-consistent with what the guest was told.
                let info = self
                    .pool()
                    .create_snapshot(&spec)
                    .map_err(|e| e.to_string())?;
                eprintln!("thinlun-vhost: created snapshot '{}'", info.name);
                Ok(format!("{} mapped_bytes={}", info.name, info.mapped_bytes))
            }
            Request::Grow => {
                // Served volumes see the new space at once: allocation
                // happens in this process.
                let bytes = self.pool().grow().map_err(|e| e.to_string())?;
                eprintln!("thinlun-vhost: pool grown to {bytes} bytes");
                Ok(format!("size_bytes={bytes}"))
            }
            Request::Add {
                name,
                socket,
                queues,
            } => {
                let t = self.add(&name, &socket, queues)?;
                eprintln!("thinlun-vhost: {t}");
                Ok(t)
            }
            Request::Remove(name) => {
                let s = self.remove(&name)?;
                let t = format!("stopped {}", s.summary());
                eprintln!("thinlun-vhost: {t}");
                Ok(t)
            }
            Request::List => {
                let mut t = self.served.len().to_string();
                for (n, s) in &self.served {
                    t.push_str(&format!(" {n}={}", s.socket.display()));
                }
                Ok(t)
            }
            Request::Status => Ok(self.status_text()),
        }
    }

    /// Answers the control socket until stopped (the stop handle, e.g.
    /// from a signal). Served volumes keep running in their threads.
    pub fn run(&mut self) -> io::Result<()> {
        loop {
            if self.stop.is_stopped() {
                return Ok(());
            }
            let mut fds = vec![libc::pollfd {
                fd: self.stop.wake_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(c) = &self.control {
                fds.push(libc::pollfd {
                    fd: c.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // Wake every second to log space warnings as they are crossed.
            // SAFETY: `fds` is a valid array of pollfd for the duration of
            // the call; the descriptors are owned by `self`.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            self.log_thresholds();
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if self.stop.is_stopped() {
                return Ok(());
            }
            if fds.len() > 1 && fds[1].revents & libc::POLLIN != 0 {
                self.accept_one();
            }
        }
    }

    /// Logs each warning threshold of the pool once per crossing (as LVM's
    /// dmeventd does for thin pools).
    fn log_thresholds(&self) {
        for ev in self.pool().threshold_events() {
            eprintln!("thinlun-vhost: warning: {ev}");
        }
    }

    /// Serves one control connection; a misbehaving client only costs
    /// the timeout.
    fn accept_one(&mut self) {
        let Some(c) = &self.control else { return };
        let stream = match c.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                eprintln!("thinlun-vhost: control socket: {e}");
                return;
            }
        };
        let reply = match read_request(&stream) {
            Ok(line) => self.handle_line(&line),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => format!("error {e}"),
            Err(_) => return, // gone or timed out: nobody to answer
        };
        let mut w = &stream;
        let _ = w
            .write_all(reply.as_bytes())
            .and_then(|_| w.write_all(b"\n"));
    }

    /// Stops every served volume, flushes them, removes the sockets and
    /// closes the pool cleanly (commit + checkpoint). Returns what each
    /// volume's serving came to, in name order.
    pub fn shutdown(mut self) -> Result<Vec<Stopped>, String> {
        let served = std::mem::take(&mut self.served);
        for s in served.values() {
            s.stop.stop();
        }
        let stopped: Vec<Stopped> = served
            .into_iter()
            .map(|(name, s)| finish(&name, s))
            .collect();
        self.control = None; // unlinks the control socket
        let pool = self.pool.take().expect("pool open until shutdown");
        pool.close().map_err(|e| format!("closing the pool: {e}"))?;
        Ok(stopped)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for s in self.served.values() {
            s.stop.stop();
        }
        for (name, s) in std::mem::take(&mut self.served) {
            finish(&name, s);
        }
    }
}

/// Joins a stopped volume's thread (dropping its server removes the
/// socket) and flushes the volume.
fn finish(name: &str, s: Served) -> Stopped {
    let (served, server, panicked) = match s.thread.join() {
        Ok((r, server)) => (r, Some(server), false),
        Err(_) => (Ok(()), None, true),
    };
    let (stats, connections) = server.as_ref().map_or((StatsSnapshot::default(), 0), |s| {
        (s.stats(), s.connections())
    });
    drop(server);
    let mut error = served.err().map(|e| e.to_string());
    if panicked {
        error = Some("serving thread panicked".to_string());
        let _ = std::fs::remove_file(&s.socket);
    }
    if !s.read_only {
        if let Err(e) = s.vol.flush() {
            error.get_or_insert(format!("flush: {e}"));
        }
    }
    Stopped {
        name: name.to_string(),
        connections,
        stats,
        error,
    }
}

/// Reads one request line of at most [`MAX_LINE`] bytes. A line too long
/// or not UTF-8 is `InvalidData` (answered with an error line).
fn read_request(stream: &UnixStream) -> io::Result<String> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::new();
    BufReader::new(stream.take(MAX_LINE as u64 + 1)).read_until(b'\n', &mut buf)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request line longer than {MAX_LINE} bytes"),
        ));
    }
    String::from_utf8(buf)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_request("snapshot vm-1@s1"),
            Ok(Request::Snapshot("vm-1@s1".into()))
        );
        assert_eq!(
            parse_request("  add vm-1 /run/a.sock 4 "),
            Ok(Request::Add {
                name: "vm-1".into(),
                socket: "/run/a.sock".into(),
                queues: 4
            })
        );
        assert_eq!(
            parse_request("add vm-1 /run/a.sock"),
            Ok(Request::Add {
                name: "vm-1".into(),
                socket: "/run/a.sock".into(),
                queues: 1
            })
        );
        assert_eq!(
            parse_request("remove vm-1"),
            Ok(Request::Remove("vm-1".into()))
        );
        assert_eq!(parse_request("list"), Ok(Request::List));
        assert_eq!(parse_request("status"), Ok(Request::Status));
        for bad in [
            "",
            "   ",
            "snapshot",
            "snapshot vm-1",
            "snapshot a@b c",
            "add",
            "add vm-1",
            "add vm-1 rel.sock",
            "add vm-1 /a.sock 0",
            "add vm-1 /a.sock 65",
            "add vm-1 /a.sock x",
            "add vm-1 /a.sock 1 2",
            "remove",
            "remove a b",
            "list x",
            "status x",
            "bogus",
            "\u{0}\u{1}",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn random_lines_never_panic() {
        let words = [
            "snapshot", "add", "remove", "list", "status", "@", "/", "1", "99", "x@y",
        ];
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 6) as usize;
            let line: Vec<&str> = (0..n)
                .map(|i| words[((x >> (i * 5)) % words.len() as u64) as usize])
                .collect();
            let _ = parse_request(&line.join(" "));
        }
    }

    #[test]
    fn control_path_follows_pool() {
        let dir = std::env::temp_dir().join(format!("thinlun-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pool = dir.join("pool.img");
        std::fs::write(&pool, b"").unwrap();
        let canon = std::fs::canonicalize(&pool).unwrap();
        assert_eq!(
            default_control_path(&pool),
            PathBuf::from(format!("{}.ctl", canon.display()))
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            default_control_path(Path::new("/dev/null")),
            PathBuf::from("/run/thinlun/dev-null.ctl")
        );
    }
}
