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
//! | `grow` | `ok size_bytes=N` |
//! | `add VOL SOCKET [QUEUES]` | `ok serving VOL on SOCKET (N queues[, read-only])` |
//! | `remove VOL` (stop serving it) | `ok stopped VOL: N connections, R requests in B batches, E errors` |
//! | `list` | `ok N [VOL=SOCKET]...` |
//! | `status` | `ok key=value ...` (pool figures, `served=N`) |
//! | `create VOL BYTES [force]` | `ok VOL size_bytes=N` |
//! | `resize VOL BYTES [force]` | `ok VOL old_size_bytes=N size_bytes=N` |
//! | `delete VOL[@SNAP] [recursive]` (from the pool) | `ok NAME snapshot` or `ok NAME volume [VOL@SNAP]...` (the snapshots removed with it) |
//! | `rename OLD NEW` | `ok OLD NEW` |
//! | `rollback VOL@SNAP [force]` | `ok VOL@SNAP [VOL@SNAP]...` (the newer snapshots removed) |
//! | `clone SRC NEW` | `ok NEW size_bytes=N mapped_bytes=N` |
//! | `base VOL [NEW]` | `ok NAME` (its name now) |
//! | `policy [KEY=VALUE]...` | `ok KEY=VALUE ...` (the whole policy now; see [`PolicyChange`]) |
//!
//! `create` to `policy` are the pool changes `thinctl` makes itself when
//! it can open the pool; the daemon runs the same engine calls on the pool
//! it holds. A served volume cannot be deleted, rolled back or made a base
//! (the engine refuses volumes with open handles); renaming one keeps it
//! served under its new name.
//!
//! Any failure is `error <text>`. Lines are at most [`MAX_LINE`] bytes of
//! UTF-8; words are separated by blanks (so socket paths cannot hold
//! blanks). Volume names are checked to be words of `A-Za-z0-9._-` (and one
//! `@` where a snapshot is meant) before anything runs. Bad input of any
//! kind gets an error line, never a crash.

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
use thinlun::format::superblock::Policy;
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
    /// Stop serving a volume (it stays in the pool).
    Remove(String),
    List,
    Status,
    /// A thin volume; `force` passes the overcommit limit.
    Create {
        name: String,
        bytes: u64,
        force: bool,
    },
    /// `force` allows shrinking.
    Resize {
        name: String,
        bytes: u64,
        force: bool,
    },
    /// Remove a volume or snapshot from the pool.
    Delete {
        name: String,
        recursive: bool,
    },
    Rename {
        old: String,
        new: String,
    },
    /// `force` removes the snapshots newer than the one rolled back to.
    Rollback {
        snapshot: String,
        force: bool,
    },
    Clone {
        source: String,
        new: String,
    },
    Base {
        name: String,
        new_name: Option<String>,
    },
    Policy(PolicyChange),
}

const COMMANDS: &str = "snapshot, grow, add, remove, list, status, create, resize, delete, \
                        rename, rollback, clone, base, policy";

/// Checks a volume or snapshot name word: one or two (`VOL@SNAP`) parts
/// of `A-Za-z0-9._-`. Whether a snapshot may stand there, and the finer
/// rules, are the engine's (so its errors read as on the direct path).
fn name_arg(s: &str) -> Result<String, String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    };
    let ok = match s.split_once('@') {
        None => part_ok(s),
        Some((v, snap)) => part_ok(v) && part_ok(snap),
    };
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{}' is not a valid name (letters, digits, '.', '_', '-'; VOL@SNAP for a snapshot)",
            s.chars().take(64).collect::<String>()
        ))
    }
}

fn bytes_arg(s: &str) -> Result<u64, String> {
    s.parse::<u64>().map_err(|_| {
        format!(
            "'{}' is not a size in bytes",
            s.chars().take(64).collect::<String>()
        )
    })
}

/// Parses one request line (without its newline). Pure; every malformed
/// line is an `Err` with the text of the error reply.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let usage = |u: &str| Err(format!("usage: {u}"));
    match words.as_slice() {
        [] => Err(format!("empty request (commands: {COMMANDS})")),
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
        [cmd @ ("create" | "resize"), name, bytes]
        | [cmd @ ("create" | "resize"), name, bytes, "force"] => {
            let (name, bytes) = (name_arg(name)?, bytes_arg(bytes)?);
            let force = words.len() == 4;
            Ok(if *cmd == "create" {
                Request::Create { name, bytes, force }
            } else {
                Request::Resize { name, bytes, force }
            })
        }
        ["create", ..] => usage("create VOL BYTES [force]"),
        ["resize", ..] => usage("resize VOL BYTES [force]"),
        ["delete", name] | ["delete", name, "recursive"] => Ok(Request::Delete {
            name: name_arg(name)?,
            recursive: words.len() == 3,
        }),
        ["delete", ..] => usage("delete VOL[@SNAP] [recursive]"),
        ["rename", old, new] => Ok(Request::Rename {
            old: name_arg(old)?,
            new: name_arg(new)?,
        }),
        ["rename", ..] => usage("rename OLD NEW"),
        ["rollback", snap] | ["rollback", snap, "force"] => Ok(Request::Rollback {
            snapshot: name_arg(snap)?,
            force: words.len() == 3,
        }),
        ["rollback", ..] => usage("rollback VOL@SNAP [force]"),
        ["clone", source, new] => Ok(Request::Clone {
            source: name_arg(source)?,
            new: name_arg(new)?,
        }),
        ["clone", ..] => usage("clone SRC NEW"),
        ["base", name] | ["base", name, _] => Ok(Request::Base {
            name: name_arg(name)?,
            new_name: words.get(2).map(|n| name_arg(n)).transpose()?,
        }),
        ["base", ..] => usage("base VOL [NEW]"),
        ["policy", pairs @ ..] => PolicyChange::parse(pairs).map(Request::Policy),
        [cmd, ..] => Err(format!(
            "unknown command '{}' (commands: {COMMANDS})",
            cmd.chars().take(64).collect::<String>()
        )),
    }
}

/// Changes to the pool policy (`policy` request); `None` keeps the
/// current value. On the wire each set field is a `KEY=VALUE` word with the
/// raw [`Policy`] value: `data_warn_pct=A,B,C` and `meta_warn_pct=A,B,C`
/// (three percentages, 0 for an unused slot), `when_full=0|1`,
/// `queue_timeout_ms=N`, `max_overcommit_pct=N`. The engine validates the
/// policy that results.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyChange {
    pub data_warn_pct: Option<[u8; 3]>,
    pub meta_warn_pct: Option<[u8; 3]>,
    pub when_full: Option<u8>,
    pub queue_timeout_ms: Option<u32>,
    pub max_overcommit_pct: Option<u32>,
}

impl PolicyChange {
    /// `p` with the changes made.
    pub fn apply(&self, mut p: Policy) -> Policy {
        if let Some(t) = self.data_warn_pct {
            p.data_warn_pct = t;
        }
        if let Some(t) = self.meta_warn_pct {
            p.meta_warn_pct = t;
        }
        if let Some(w) = self.when_full {
            p.when_full = w;
        }
        if let Some(ms) = self.queue_timeout_ms {
            p.queue_timeout_ms = ms;
        }
        if let Some(pct) = self.max_overcommit_pct {
            p.max_overcommit_pct = pct;
        }
        p
    }

    /// The request line that asks for this change.
    pub fn request_line(&self) -> String {
        let mut line = "policy".to_string();
        let three = |t: [u8; 3]| format!("{},{},{}", t[0], t[1], t[2]);
        if let Some(t) = self.data_warn_pct {
            line.push_str(&format!(" data_warn_pct={}", three(t)));
        }
        if let Some(t) = self.meta_warn_pct {
            line.push_str(&format!(" meta_warn_pct={}", three(t)));
        }
        if let Some(w) = self.when_full {
            line.push_str(&format!(" when_full={w}"));
        }
        if let Some(ms) = self.queue_timeout_ms {
            line.push_str(&format!(" queue_timeout_ms={ms}"));
        }
        if let Some(pct) = self.max_overcommit_pct {
            line.push_str(&format!(" max_overcommit_pct={pct}"));
        }
        line
    }

    /// Parses `KEY=VALUE` words, each key at most once (none: no change).
    pub fn parse(words: &[&str]) -> Result<PolicyChange, String> {
        fn set<T>(slot: &mut Option<T>, key: &str, v: T) -> Result<(), String> {
            match slot.replace(v) {
                None => Ok(()),
                Some(_) => Err(format!("'{key}' given twice")),
            }
        }
        let mut c = PolicyChange::default();
        for w in words {
            let shown = || w.chars().take(64).collect::<String>();
            let (key, value) = w
                .split_once('=')
                .ok_or_else(|| format!("'{}' is not KEY=VALUE", shown()))?;
            let bad = || format!("'{}': bad value", shown());
            let three = || -> Result<[u8; 3], String> {
                let v: Vec<u8> = value
                    .split(',')
                    .map(|x| x.parse::<u8>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad())?;
                <[u8; 3]>::try_from(v).map_err(|_| bad())
            };
            match key {
                "data_warn_pct" => set(&mut c.data_warn_pct, key, three()?)?,
                "meta_warn_pct" => set(&mut c.meta_warn_pct, key, three()?)?,
                "when_full" => set(&mut c.when_full, key, value.parse().map_err(|_| bad())?)?,
                "queue_timeout_ms" => set(
                    &mut c.queue_timeout_ms,
                    key,
                    value.parse().map_err(|_| bad())?,
                )?,
                "max_overcommit_pct" => set(
                    &mut c.max_overcommit_pct,
                    key,
                    value.parse().map_err(|_| bad())?,
                )?,
                _ => {
                    return Err(format!(
                        "unknown policy key '{}' (keys: data_warn_pct, meta_warn_pct, \
                         when_full, queue_timeout_ms, max_overcommit_pct)",
                        shown()
                    ))
                }
            }
        }
        Ok(c)
    }

    /// The policy, if every field is set (as in a `policy` reply).
    pub fn complete(&self) -> Option<Policy> {
        Some(Policy {
            data_warn_pct: self.data_warn_pct?,
            meta_warn_pct: self.meta_warn_pct?,
            when_full: self.when_full?,
            queue_timeout_ms: self.queue_timeout_ms?,
            max_overcommit_pct: self.max_overcommit_pct?,
        })
    }

    /// Every field of `p`, as the `policy` reply carries it.
    pub fn whole(p: &Policy) -> PolicyChange {
        PolicyChange {
            data_warn_pct: Some(p.data_warn_pct),
            meta_warn_pct: Some(p.meta_warn_pct),
            when_full: Some(p.when_full),
            queue_timeout_ms: Some(p.queue_timeout_ms),
            max_overcommit_pct: Some(p.max_overcommit_pct),
        }
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
    /// The volume's id: its name can change while served (`rename`).
    id: u64,
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
                id: info.id,
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
            Request::Create { name, bytes, force } => {
                let info = self
                    .pool()
                    .create_volume_with(&name, bytes, force)
                    .map_err(|e| e.to_string())?;
                eprintln!("thinlun-vhost: created volume '{}'", info.name);
                Ok(format!("{} size_bytes={}", info.name, info.size_bytes))
            }
            Request::Resize { name, bytes, force } => {
                let pool = self.pool();
                let info = pool.volume_info(&name).map_err(|e| e.to_string())?;
                // As thinctl: a snapshot's or base's content must not change.
                if info.read_only {
                    return Err(thinlun::Error::ReadOnly(info.name).to_string());
                }
                // A served volume is resized too: its requests are checked
                // against the live size (the guest learns it on reconnect).
                let new = pool
                    .resize_volume(&name, bytes, force)
                    .map_err(|e| e.to_string())?;
                eprintln!(
                    "thinlun-vhost: resized volume '{name}' to {} bytes",
                    new.size_bytes
                );
                Ok(format!(
                    "{name} old_size_bytes={} size_bytes={}",
                    info.size_bytes, new.size_bytes
                ))
            }
            Request::Delete { name, recursive } => {
                let pool = self.pool();
                let info = pool.volume_info(&name).map_err(|e| e.to_string())?;
                let snaps: Vec<String> = pool
                    .volumes()
                    .into_iter()
                    .filter(|s| s.snapshot_of.as_deref() == Some(name.as_str()))
                    .map(|s| s.name)
                    .collect();
                // A served volume has an open handle: the engine refuses it.
                pool.remove_volume(&name, recursive)
                    .map_err(|e| e.to_string())?;
                eprintln!("thinlun-vhost: removed '{name}' from the pool");
                Ok(if info.snapshot {
                    format!("{name} snapshot")
                } else {
                    format!("{name} volume{}", words_after(&snaps))
                })
            }
            Request::Rename { old, new } => {
                self.pool()
                    .rename_volume(&old, &new)
                    .map_err(|e| e.to_string())?;
                self.rekey_served();
                eprintln!("thinlun-vhost: renamed '{old}' to '{new}'");
                Ok(format!("{old} {new}"))
            }
            Request::Rollback { snapshot, force } => {
                let pool = self.pool();
                let snap = pool.volume_info(&snapshot).map_err(|e| e.to_string())?;
                let newer: Vec<String> = pool
                    .volumes()
                    .into_iter()
                    .filter(|v| v.snapshot && v.snapshot_of == snap.snapshot_of && v.id > snap.id)
                    .map(|v| v.name)
                    .collect();
                // The engine refuses a volume with open handles (served).
                pool.rollback(&snapshot, force).map_err(|e| e.to_string())?;
                eprintln!("thinlun-vhost: rolled back to '{snapshot}'");
                Ok(format!("{snapshot}{}", words_after(&newer)))
            }
            Request::Clone { source, new } => {
                let info = self
                    .pool()
                    .clone_volume(&source, &new)
                    .map_err(|e| e.to_string())?;
                eprintln!(
                    "thinlun-vhost: created linked clone '{}' of '{source}'",
                    info.name
                );
                Ok(format!(
                    "{} size_bytes={} mapped_bytes={}",
                    info.name, info.size_bytes, info.mapped_bytes
                ))
            }
            Request::Base { name, new_name } => {
                let info = self
                    .pool()
                    .make_base(&name, new_name.as_deref())
                    .map_err(|e| e.to_string())?;
                eprintln!("thinlun-vhost: '{}' is now a base image", info.name);
                Ok(info.name)
            }
            Request::Policy(change) => {
                let pool = self.pool();
                let new = change.apply(pool.status().policy);
                pool.set_policy(new).map_err(|e| e.to_string())?;
                eprintln!("thinlun-vhost: pool policy changed");
                let line = PolicyChange::whole(&new).request_line();
                Ok(line.trim_start_matches("policy ").to_string())
            }
        }
    }

    /// Files served volumes under their names now (after a rename, which
    /// may also have renamed a served snapshot's volume).
    fn rekey_served(&mut self) {
        let names: BTreeMap<u64, String> = self
            .pool()
            .volumes()
            .into_iter()
            .map(|v| (v.id, v.name))
            .collect();
        let served = std::mem::take(&mut self.served);
        for (name, s) in served {
            let key = names.get(&s.id).cloned().unwrap_or(name);
            self.served.insert(key, s);
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

/// `" a b c"`: names as further words of a reply.
fn words_after(names: &[String]) -> String {
    names.iter().map(|n| format!(" {n}")).collect()
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
    fn parses_pool_changes() {
        let ok = |line: &str, want: Request| assert_eq!(parse_request(line), Ok(want), "{line}");
        ok(
            "create vm-1 4096",
            Request::Create {
                name: "vm-1".into(),
                bytes: 4096,
                force: false,
            },
        );
        ok(
            "create a.b_c 0 force",
            Request::Create {
                name: "a.b_c".into(),
                bytes: 0,
                force: true,
            },
        );
        ok(
            "resize vm-1 8192 force",
            Request::Resize {
                name: "vm-1".into(),
                bytes: 8192,
                force: true,
            },
        );
        ok(
            "resize vm-1 18446744073709551615",
            Request::Resize {
                name: "vm-1".into(),
                bytes: u64::MAX,
                force: false,
            },
        );
        ok(
            "delete vm-1",
            Request::Delete {
                name: "vm-1".into(),
                recursive: false,
            },
        );
        ok(
            "delete vm-1@s1 recursive",
            Request::Delete {
                name: "vm-1@s1".into(),
                recursive: true,
            },
        );
        ok(
            "rename vm-1 vm-2",
            Request::Rename {
                old: "vm-1".into(),
                new: "vm-2".into(),
            },
        );
        ok(
            "rename vm-1@a b",
            Request::Rename {
                old: "vm-1@a".into(),
                new: "b".into(),
            },
        );
        ok(
            "rollback vm-1@s1",
            Request::Rollback {
                snapshot: "vm-1@s1".into(),
                force: false,
            },
        );
        ok(
            "rollback vm-1@s1 force",
            Request::Rollback {
                snapshot: "vm-1@s1".into(),
                force: true,
            },
        );
        ok(
            "clone vm-1@s1 c1",
            Request::Clone {
                source: "vm-1@s1".into(),
                new: "c1".into(),
            },
        );
        ok(
            "clone base-1 c1",
            Request::Clone {
                source: "base-1".into(),
                new: "c1".into(),
            },
        );
        ok(
            "base vm-1",
            Request::Base {
                name: "vm-1".into(),
                new_name: None,
            },
        );
        ok(
            "base vm-1 base-1",
            Request::Base {
                name: "vm-1".into(),
                new_name: Some("base-1".into()),
            },
        );
        ok("policy", Request::Policy(PolicyChange::default()));
        ok(
            "policy when_full=1 data_warn_pct=0,70,80",
            Request::Policy(PolicyChange {
                data_warn_pct: Some([0, 70, 80]),
                when_full: Some(1),
                ..PolicyChange::default()
            }),
        );
        for bad in [
            "create",
            "create vm-1",
            "create vm-1 -1",
            "create vm-1 1M",
            "create vm-1 18446744073709551616",
            "create vm-1 4096 forc",
            "create vm-1 4096 force x",
            "create vm/1 4096",
            "create 'vm' 4096",
            "create vm\u{e9} 4096",
            "resize",
            "resize vm-1",
            "resize vm-1 x",
            "resize vm-1 4096 recursive",
            "resize @ 4096",
            "delete",
            "delete vm-1 force",
            "delete vm-1 recursive x",
            "delete vm-1@",
            "delete @s",
            "delete a@b@c",
            "delete ../x",
            "rename",
            "rename a",
            "rename a b c",
            "rename a b/c",
            "rollback",
            "rollback vm-1@s1 recursive",
            "rollback vm-1@s1 force x",
            "rollback vm-1@",
            "clone",
            "clone a",
            "clone a b c",
            "clone a$ b",
            "base",
            "base vm-1 b c",
            "policy when_full",
            "policy when_full=",
            "policy when_full=x",
            "policy when_full=256",
            "policy when_full=1 when_full=0",
            "policy data_warn_pct=80,90",
            "policy data_warn_pct=80,90,95,99",
            "policy data_warn_pct=80,x,95",
            "policy meta_warn_pct=300,0,0",
            "policy queue_timeout_ms=-1",
            "policy max_overcommit_pct=4294967296",
            "policy bogus=1",
            "policy =1",
        ] {
            match parse_request(bad) {
                Err(e) => assert!(!e.is_empty() && !e.contains('\n'), "{bad:?}: {e:?}"),
                Ok(r) => panic!("{bad:?} accepted as {r:?}"),
            }
        }
    }

    #[test]
    fn policy_change_round_trips() {
        let p = Policy {
            data_warn_pct: [0, 70, 80],
            meta_warn_pct: [80, 90, 95],
            when_full: 1,
            queue_timeout_ms: 30_000,
            max_overcommit_pct: 250,
        };
        let line = PolicyChange::whole(&p).request_line();
        let Ok(Request::Policy(c)) = parse_request(&line) else {
            panic!("{line} not parsed");
        };
        assert_eq!(c.complete(), Some(p));
        // A partial change keeps the other fields, and is not a policy.
        let c = PolicyChange {
            max_overcommit_pct: Some(0),
            ..PolicyChange::default()
        };
        assert_eq!(c.complete(), None);
        let q = c.apply(p);
        assert_eq!(q.max_overcommit_pct, 0);
        assert_eq!(q.data_warn_pct, p.data_warn_pct);
        assert_eq!(q.queue_timeout_ms, p.queue_timeout_ms);
        assert_eq!(
            parse_request(&c.request_line()),
            Ok(Request::Policy(c.clone()))
        );
    }

    #[test]
    fn random_lines_never_panic() {
        let words = [
            "snapshot",
            "add",
            "remove",
            "list",
            "status",
            "create",
            "resize",
            "delete",
            "rename",
            "rollback",
            "clone",
            "base",
            "policy",
            "force",
            "recursive",
            "when_full=1",
            "@",
            "/",
            "1",
            "99",
            "x@y",
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
