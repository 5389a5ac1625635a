//! The [`Daemon`]: many volumes of one open pool served from one process,
//! one vhost-user socket and serving thread each, and the control socket
//! answered between them. It holds the pool's lock, so the pool changes
//! asked for on the control socket (see [`super::protocol`] for the
//! grammar) run here: starting and stopping the serving of a volume, and
//! the engine calls `thinctl` would make itself if it could open the pool.

use super::protocol::{
    parse_request, read_request, Answer, PolicyChange, PoolFigures, Reply, Request, ServedVolume,
};
use crate::activation::{Activation, WriterSlot};
use crate::backend::StatsSnapshot;
use crate::server::{check_stale_socket, default_serial, ServeOptions, Server, StopHandle};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use thinlun::Pool;
use thinlun_nbd::NbdServer;

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
            "{}: {} connection{}, {} requests ({} streamed, {} batches), {} errors{}",
            self.name,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.stats.requests,
            self.stats.streamed,
            self.stats.batches,
            self.stats.errors,
            self.error
                .as_ref()
                .map_or(String::new(), |e| format!(" (failed: {e})"))
        )
    }
}

struct Served {
    /// The volume's name now (kept up to date by `rename`).
    name: String,
    /// The volume's id: its name can change while served (`rename`).
    id: u64,
    /// Shared with the other server of the volume during a migration
    /// between two QEMU processes of this host.
    writer: Arc<WriterSlot>,
    socket: PathBuf,
    queues: u16,
    read_only: bool,
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
    /// By socket: a volume has two servers while its VM moves to another
    /// QEMU process on this host.
    served: BTreeMap<PathBuf, Served>,
    control: Option<ControlSocket>,
    stop: StopHandle,
    /// The NBD socket, once a volume is exported on it.
    nbd: Option<NbdServer>,
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
            nbd: None,
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

    fn servers_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Served> + 'a {
        self.served.values().filter(move |s| s.name == name)
    }

    /// Starts serving volume `name` on `socket`; returns the reply text.
    /// `incoming`: serve the target of a live migration, which writes
    /// only once its front end starts the rings and the source (another
    /// host's server, or this daemon's on another socket) has released
    /// (docs/LOCKING.md 4.4).
    pub fn add(
        &mut self,
        name: &str,
        socket: &Path,
        queues: u16,
        incoming: bool,
    ) -> Result<String, String> {
        let same: Vec<&Served> = self.servers_of(name).collect();
        match (same.as_slice(), incoming) {
            ([], _) => {}
            ([src], true) => {
                if src.queues != queues {
                    return Err(format!(
                        "'{name}' is served with {} queue{} on {}; the target of its migration needs the same",
                        src.queues,
                        if src.queues == 1 { "" } else { "s" },
                        src.socket.display()
                    ));
                }
            }
            ([src], false) => {
                return Err(format!(
                    "'{name}' is already served on {}; to move its VM to another QEMU process, add it with incoming on a new socket",
                    src.socket.display()
                ))
            }
            _ => {
                return Err(format!(
                    "'{name}' is already served on two sockets (a migration); remove one first"
                ))
            }
        }
        if incoming && same.is_empty() {
            // A migration's source holds its volume until the handover, so
            // a free volume means the target was given the wrong one: the
            // target QEMU must not start on it (QEMU does not compare the
            // disks of a migration; the VM would go on with another disk).
            let holder = self.pool().active_host(name).map_err(|e| e.to_string())?;
            if holder.is_none() {
                return Err(format!(
                    "'{name}' is not in use (no server on any host has it active), so no running VM \
                     can be migrating from it: a migration target serves the source VM's volume \
                     (check the name); to start a VM or restore a saved state on '{name}', serve it \
                     without --incoming"
                ));
            }
        }
        let writer = same
            .first()
            .map_or_else(Default::default, |s| s.writer.clone());
        if let Some(srv) = &self.nbd {
            if srv.export_names().iter().any(|n| n == name) {
                return Err(format!("'{name}' is already exported over NBD"));
            }
        }
        if let Some(other) = self.served.get(socket) {
            return Err(format!(
                "{} is the socket of '{}' already",
                socket.display(),
                other.name
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
        // Only a shared pool's activation passes to another host, so the
        // target of a migration opens there when its rings start. On a
        // pool of one host the server keeps its volume open (and so
        // protected from remove and rollback) while it is served, and the
        // writer slot alone passes between the two servers.
        let wait = opts.activation_wait;
        let open = || {
            pool.open_volume(name)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        };
        let activation = if !pool.is_shared() {
            Activation::pinned_sharing(open()?, writer.clone(), wait)
        } else {
            let vol = if incoming { None } else { Some(open()?) };
            Activation::handover(pool.clone(), name, vol, writer.clone(), wait)
                .map_err(|e| e.to_string())?
        };
        let mut server = Server::with_activation(activation, &opts)
            .map_err(|e| format!("serving '{name}': {e}"))?;
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
            "serving {name} on {} ({queues} queue{}{}{})",
            socket.display(),
            if queues == 1 { "" } else { "s" },
            if read_only { ", read-only" } else { "" },
            if incoming {
                ", incoming: writes once its front end starts"
            } else {
                ""
            }
        );
        self.served.insert(
            socket.to_path_buf(),
            Served {
                name: info.name.clone(),
                id: info.id,
                writer,
                socket: socket.to_path_buf(),
                queues,
                read_only,
                stop,
                thread,
            },
        );
        Ok(text)
    }

    /// Exports `name` (a volume, or `VOL@SNAP` and base images read-only)
    /// over NBD on `socket`; the daemon's NBD server listens there from the
    /// first export. The volume is opened, and so activated on a shared
    /// pool and protected from remove and rollback, until it is removed.
    pub fn add_nbd(&mut self, name: &str, socket: &Path) -> Result<String, String> {
        if self.servers_of(name).next().is_some() {
            return Err(format!("'{name}' is already served over vhost-user"));
        }
        if let Some(srv) = &self.nbd {
            if srv.path() != socket {
                return Err(format!(
                    "this daemon exports over NBD on {}; use that socket",
                    srv.path().display()
                ));
            }
            if srv.export_names().iter().any(|n| n == name) {
                return Err(format!("'{name}' is already exported"));
            }
        }
        let pool = self.pool().clone();
        let info = pool.volume_info(name).map_err(|e| e.to_string())?;
        let read_only = self.template.read_only || info.read_only;
        let volume = Arc::new(pool.open_volume(name).map_err(|e| e.to_string())?);
        if self.nbd.is_none() {
            let srv = NbdServer::bind(socket).map_err(|e| e.to_string())?;
            self.nbd = Some(srv);
        }
        let export = thinlun_nbd::Export {
            volume,
            read_only,
            preferred_bytes: u32::try_from(pool.status().chunk_bytes).unwrap_or(1 << 20),
        };
        let srv = self.nbd.as_ref().ok_or("no NBD server")?;
        srv.add_export(name, export)?;
        Ok(format!(
            "exporting {name} over NBD on {}{}",
            socket.display(),
            if read_only { " (read-only)" } else { "" }
        ))
    }

    /// Withdraws an NBD export: closes its connections and commits.
    fn remove_nbd(&mut self, name: &str) -> Option<Result<String, String>> {
        let e = self.nbd.as_ref()?.remove_export(name)?;
        let flushed = if e.read_only {
            Ok(())
        } else {
            e.volume.flush()
        };
        Some(match flushed {
            Ok(()) => Ok(format!("stopped exporting {name}")),
            Err(err) => Err(format!("stopped exporting {name} (flush failed: {err})")),
        })
    }

    /// Stops serving `name` (on `socket` only, if given: the source of a
    /// finished migration on this host): ends the connection, joins the
    /// thread, removes the socket and flushes the volume.
    pub fn remove(&mut self, name: &str, socket: Option<&Path>) -> Result<Vec<Stopped>, String> {
        let sockets: Vec<PathBuf> = self
            .servers_of(name)
            .filter(|s| socket.is_none_or(|p| p == s.socket))
            .map(|s| s.socket.clone())
            .collect();
        if sockets.is_empty() {
            return Err(match socket {
                None => format!("'{name}' is not served"),
                Some(p) => format!("'{name}' is not served on {}", p.display()),
            });
        }
        let gone: Vec<Served> = sockets
            .iter()
            .filter_map(|p| self.served.remove(p))
            .collect();
        for s in &gone {
            s.stop.stop();
        }
        Ok(gone.into_iter().map(finish).collect())
    }

    /// `(name, socket, queues, read-only)` of every served volume.
    pub fn list(&self) -> Vec<(String, PathBuf, u16, bool)> {
        self.served
            .values()
            .map(|s| (s.name.clone(), s.socket.clone(), s.queues, s.read_only))
            .collect()
    }

    fn figures(&self) -> PoolFigures {
        let st = self.pool().status();
        PoolFigures {
            size_bytes: st.size_bytes,
            data_bytes: st.data_bytes,
            data_used_bytes: st.data_used_bytes,
            data_free_bytes: st.data_free_bytes,
            data_used_pct: st.data_used_pct,
            metadata_used_pct: st.metadata_used_pct,
            volumes: st.volumes,
            snapshots: st.snapshots,
            bases: st.bases,
            clones: st.clones,
            provisioned_bytes: st.provisioned_bytes,
            thresholds_crossed: st.thresholds_crossed,
            served: self.served.len(),
        }
    }

    /// Answers one request line: the reply line, without newline (JSON
    /// escapes any newline the engine or OS put in a message).
    pub fn handle_line(&mut self, line: &str) -> String {
        let r = match parse_request(line) {
            Err(e) => Reply::Error(e),
            Ok(req) => match self.handle(req) {
                Ok(a) => Reply::Ok(a),
                Err(e) => Reply::Error(e),
            },
        };
        r.to_line()
    }

    fn handle(&mut self, req: Request) -> Result<Answer, String> {
        match req {
            Request::Snapshot { name: spec } => {
                // The engine locks every write stripe: in-flight guest
                // writes finish first, new ones wait, so the snapshot is
                // crash-consistent with what the guest was told.
                let info = self
                    .pool()
                    .create_snapshot(&spec)
                    .map_err(|e| e.to_string())?;
                log::info!("created snapshot '{}'", info.name);
                Ok(Answer::SnapshotCreated {
                    name: info.name,
                    mapped_bytes: info.mapped_bytes,
                })
            }
            Request::Grow {} => {
                // Served volumes see the new space at once: allocation
                // happens in this process.
                let bytes = self.pool().grow().map_err(|e| e.to_string())?;
                log::info!("pool grown to {bytes} bytes");
                Ok(Answer::Grown { size_bytes: bytes })
            }
            Request::Add {
                name,
                socket,
                queues,
                incoming,
            } => {
                let t = self.add(&name, &socket, queues, incoming)?;
                log::info!("{t}");
                Ok(Answer::Serving { message: t })
            }
            Request::AddNbd { name, socket } => {
                let t = self.add_nbd(&name, &socket)?;
                log::info!("{t}");
                Ok(Answer::Serving { message: t })
            }
            Request::Remove { name, socket } => {
                if socket.is_none() {
                    if let Some(r) = self.remove_nbd(&name) {
                        log::info!("{}", r.as_ref().unwrap_or_else(|e| e));
                        return r.map(|t| Answer::Stopped { summaries: vec![t] });
                    }
                }
                let stopped = self.remove(&name, socket.as_deref())?;
                let summaries: Vec<String> = stopped
                    .iter()
                    .map(|s| format!("stopped {}", s.summary()))
                    .collect();
                log::info!("{}", summaries.join("; "));
                Ok(Answer::Stopped { summaries })
            }
            Request::List {} => {
                let mut volumes: Vec<ServedVolume> = self
                    .served
                    .values()
                    .map(|s| ServedVolume {
                        name: s.name.clone(),
                        socket: s.socket.clone(),
                        transport: "vhost-user".into(),
                    })
                    .collect();
                if let Some(srv) = &self.nbd {
                    volumes.extend(srv.export_names().into_iter().map(|name| ServedVolume {
                        name,
                        socket: srv.path().to_path_buf(),
                        transport: "nbd".into(),
                    }));
                }
                Ok(Answer::Served { volumes })
            }
            Request::Status {} => Ok(Answer::Status(self.figures())),
            Request::Create { name, bytes, force } => {
                let info = self
                    .pool()
                    .create_volume_with(&name, bytes, force)
                    .map_err(|e| e.to_string())?;
                log::info!("created volume '{}'", info.name);
                Ok(Answer::Created {
                    name: info.name,
                    size_bytes: info.size_bytes,
                })
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
                log::info!("resized volume '{name}' to {} bytes", new.size_bytes);
                Ok(Answer::Resized {
                    name,
                    old_size_bytes: info.size_bytes,
                    size_bytes: new.size_bytes,
                })
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
                log::info!("removed '{name}' from the pool");
                Ok(Answer::Deleted {
                    name,
                    snapshot: info.snapshot,
                    snapshots: if info.snapshot { Vec::new() } else { snaps },
                })
            }
            Request::Rename { old, new } => {
                self.pool()
                    .rename_volume(&old, &new)
                    .map_err(|e| e.to_string())?;
                self.rekey_served();
                log::info!("renamed '{old}' to '{new}'");
                Ok(Answer::Renamed { old, new })
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
                log::info!("rolled back to '{snapshot}'");
                Ok(Answer::RolledBack {
                    snapshot,
                    removed: newer,
                })
            }
            Request::Clone { source, new } => {
                let info = self
                    .pool()
                    .clone_volume(&source, &new)
                    .map_err(|e| e.to_string())?;
                log::info!("created linked clone '{}' of '{source}'", info.name);
                Ok(Answer::Cloned {
                    name: info.name,
                    size_bytes: info.size_bytes,
                    mapped_bytes: info.mapped_bytes,
                })
            }
            Request::Base { name, new_name } => {
                let info = self
                    .pool()
                    .make_base(&name, new_name.as_deref())
                    .map_err(|e| e.to_string())?;
                log::info!("'{}' is now a base image", info.name);
                Ok(Answer::Based { name: info.name })
            }
            Request::Policy { change } => {
                let pool = self.pool();
                let new = change.apply(pool.status().policy);
                pool.set_policy(new).map_err(|e| e.to_string())?;
                log::info!("pool policy changed");
                Ok(Answer::Policy {
                    policy: PolicyChange::whole(&new),
                })
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
        for s in self.served.values_mut() {
            if let Some(n) = names.get(&s.id) {
                s.name.clone_from(n);
            }
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
            log::warn!("{ev}");
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
                log::warn!("control socket: {e}");
                return;
            }
        };
        // The socket is 0600, so only its owner (and root) can connect;
        // the peer's credentials are checked too, should its mode be
        // widened by hand.
        if let Err(why) = peer_may_administer(&stream) {
            log::warn!("control socket: refused a client: {why}");
            let mut w = &stream;
            let _ = w.write_all(format!("{}\n", Reply::Error(why).to_line()).as_bytes());
            return;
        }
        let reply = match read_request(&stream) {
            Ok(line) => self.handle_line(&line),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                Reply::Error(e.to_string()).to_line()
            }
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
        let mut stopped: Vec<Stopped> = served.into_values().map(finish).collect();
        stopped.sort_by(|a, b| a.name.cmp(&b.name));
        // Closes every NBD connection and the export handles, so the pool
        // below commits everything they wrote.
        if let Some(mut srv) = self.nbd.take() {
            srv.stop();
        }
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
        for s in std::mem::take(&mut self.served).into_values() {
            finish(s);
        }
    }
}

/// Only root and the daemon's own user administer the pool.
fn peer_may_administer(stream: &UnixStream) -> Result<(), String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred
    // on the stack; the descriptor is the connected stream's.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!(
            "cannot read the client's credentials: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid == 0 || cred.uid == me {
        Ok(())
    } else {
        Err(format!(
            "permission denied: uid {} (pid {}) is neither root nor the daemon's user (uid {me})",
            cred.uid, cred.pid
        ))
    }
}

/// Joins a stopped volume's thread (dropping its server removes the
/// socket) and flushes the volume.
fn finish(s: Served) -> Stopped {
    let (served, server, panicked) = match s.thread.join() {
        Ok((r, server)) => (r, Some(server), false),
        Err(_) => (Ok(()), None, true),
    };
    let (stats, connections) = server.as_ref().map_or((StatsSnapshot::default(), 0), |s| {
        (s.stats(), s.connections())
    });
    let released = match &server {
        Some(srv) if !s.read_only => srv.release("no longer served"),
        _ => Ok(()),
    };
    drop(server);
    let mut error = served.err().map(|e| e.to_string());
    if panicked {
        error = Some("serving thread panicked".to_string());
        let _ = std::fs::remove_file(&s.socket);
    }
    if let Err(e) = released {
        error.get_or_insert(format!("flush: {e}"));
    }
    Stopped {
        name: s.name,
        connections,
        stats,
        error,
    }
}
