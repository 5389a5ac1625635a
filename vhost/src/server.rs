//! Serving one volume on one vhost-user socket: accept a front end, serve
//! it until it disconnects, listen again; stop on request.

use crate::activation::Activation;
use crate::backend::{BlkBackend, Device, Durability, StatsSnapshot};
use crate::config::BlkConfig;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use thinlun::Volume;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How to serve a volume.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub socket: PathBuf,
    pub num_queues: u16,
    /// Offer the device read-only (RO feature); writes fail with IOERR.
    pub read_only: bool,
    /// Logical block size the guest sees: 512 or 4096.
    pub block_size: u32,
    /// Optimal I/O size to advertise (the pool's chunk).
    pub opt_io_bytes: u64,
    /// GET_ID answer (at most 20 bytes are used).
    pub serial: String,
    pub durability: Durability,
    /// How long a server whose front end starts the rings waits for
    /// another server's release of the volume (a live migration's source).
    pub activation_wait: std::time::Duration,
}

impl ServeOptions {
    pub fn new(socket: &Path, serial: &str) -> ServeOptions {
        ServeOptions {
            socket: socket.to_path_buf(),
            num_queues: 1,
            read_only: false,
            block_size: 512,
            opt_io_bytes: 1 << 20,
            serial: serial.to_string(),
            durability: Durability::ProcessCrash,
            activation_wait: std::time::Duration::from_secs(10),
        }
    }
}

/// The serial of a volume: its name when it fits in the 20 bytes of
/// GET_ID, else `thinlun-<id>`.
pub fn default_serial(name: &str, id: u64) -> String {
    if name.len() <= crate::request::ID_BYTES {
        name.to_string()
    } else {
        format!("thinlun-{id}")
    }
}

/// Only a stale socket may be replaced: not another file, and not a
/// socket some server still listens on.
pub(crate) fn check_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by another server", path.display()),
        ));
    }
    Ok(())
}

/// Asks a running [`Server`] to stop; usable from any thread or a signal
/// waiter.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

struct StopInner {
    stopped: AtomicBool,
    wake: EventFd,
    conn: Mutex<Option<ShutdownHandle>>,
}

impl StopHandle {
    /// A handle not tied to a server yet (the control loop of
    /// [`crate::control::Daemon`] waits on it).
    pub fn new() -> io::Result<StopHandle> {
        Ok(StopHandle {
            inner: Arc::new(StopInner {
                stopped: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK)?,
                conn: Mutex::new(None),
            }),
        })
    }

    /// Ends the current connection (if any) and the listen loop.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let _ = self.inner.wake.write(1);
        if let Some(h) = self.conn().as_ref() {
            h.shutdown();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Readable (POLLIN) once a stop was asked.
    pub(crate) fn wake_fd(&self) -> std::os::unix::io::RawFd {
        self.inner.wake.as_raw_fd()
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Option<ShutdownHandle>> {
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A volume served on a socket.
pub struct Server {
    device: Arc<Device>,
    listener: Listener,
    socket: PathBuf,
    stop: StopHandle,
    connections: u64,
}

impl Server {
    /// Serves a volume the caller opened, for the server's whole life.
    pub fn new(volume: Arc<Volume>, opts: &ServeOptions) -> io::Result<Server> {
        Server::with_activation(Activation::pinned(volume), opts)
    }

    /// Binds the socket (replacing a stale one) and prepares the device.
    pub fn with_activation(activation: Activation, opts: &ServeOptions) -> io::Result<Server> {
        if opts.block_size != 512 && opts.block_size != 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("block size {} (use 512 or 4096)", opts.block_size),
            ));
        }
        if opts.num_queues == 0 || opts.num_queues > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} queues (use 1 to 64)", opts.num_queues),
            ));
        }
        let size = activation.size_bytes();
        let mut config = BlkConfig::new(size, opts.block_size, opts.opt_io_bytes, opts.num_queues);
        config.read_only = opts.read_only;
        crate::guest_fault::install();
        let device = Arc::new(Device::new(
            activation,
            config,
            &opts.serial,
            opts.durability,
        ));
        check_stale_socket(&opts.socket)?;
        let listener = Listener::new(&opts.socket, true).map_err(|e| {
            io::Error::other(format!("listening on {}: {e}", opts.socket.display()))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Server {
            device,
            listener,
            socket: opts.socket.clone(),
            stop: StopHandle::new()?,
            connections: 0,
        })
    }

    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    pub fn config(&self) -> &BlkConfig {
        &self.device.config
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.device.stats.snapshot()
    }

    /// Commits and gives up the volume (see [`Activation::release`]).
    pub fn release(&self, why: &str) -> thinlun::Result<()> {
        self.device.activation.release(why)
    }

    /// Front ends served so far.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// Serves front ends one after the other until stopped.
    pub fn run(&mut self) -> io::Result<()> {
        while self.wait_for_client()? {
            self.serve_one()?;
        }
        Ok(())
    }

    /// Waits until a client is pending (true) or a stop was asked (false).
    fn wait_for_client(&self) -> io::Result<bool> {
        loop {
            if self.stop.is_stopped() {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.inner.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the duration
            // of the call; both descriptors are owned by `self`.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if self.stop.is_stopped() {
                return Ok(false);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
        }
    }

    /// While a front end is served, closes the connections of others on
    /// the same socket, with a log line: the vhost-user protocol has no
    /// refusal message, and QEMU reports the closed socket at once. A
    /// connection arriving just as the served one ends (a reconnecting
    /// QEMU) gets a second's grace and is then served.
    fn refuse_others(&self, ended: &EventFd) {
        let name = self.device.activation.name();
        let mut grace = false;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: ended.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Until the grace runs out only the end of the served
            // connection is waited for.
            let (n, timeout) = if grace { (1, 1000) } else { (2, -1) };
            // SAFETY: `fds` is a valid array of at least `n` pollfd for the
            // duration of the call; the descriptors outlive it.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) };
            if r < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return;
            }
            if !grace {
                grace = fds[1].revents & libc::POLLIN != 0;
                continue;
            }
            grace = false;
            match self.listener.accept() {
                Ok(Some(stream)) => {
                    log::warn!(
                        "'{name}': refused a second front end on {}: the volume is served to another front end on this socket",
                        self.socket.display()
                    );
                    drop(stream);
                }
                Ok(None) => {}
                Err(e) => log::warn!("'{name}': accepting on {}: {e}", self.socket.display()),
            }
        }
    }

    /// Accepts the pending client and serves it until it disconnects or a
    /// stop is asked. Its worker threads are joined before this returns,
    /// so no request of this connection runs after it.
    fn serve_one(&mut self) -> io::Result<()> {
        let mem = GuestMemoryAtomic::new(crate::guest::Mem::new());
        let backend = BlkBackend::new(self.device.clone(), mem.clone());
        let mut daemon = VhostUserDaemon::new("thinlun-vhost".to_string(), backend.clone(), mem)
            .map_err(|e| io::Error::other(e.to_string()))?;
        daemon
            .start(&mut self.listener)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.connections += 1;
        backend.set_connection(daemon.shutdown_handle());
        *self.stop.conn() = daemon.shutdown_handle();
        if self.stop.is_stopped() {
            // A stop that raced with the accept.
            if let Some(h) = daemon.shutdown_handle() {
                h.shutdown();
            }
        }
        // One front end at a time: others that connect meanwhile are
        // refused rather than left waiting in the backlog.
        let this = &*self;
        let ended = EventFd::new(EFD_NONBLOCK).ok();
        let r = std::thread::scope(|scope| {
            let refuser = ended
                .as_ref()
                .map(|ended| scope.spawn(move || this.refuse_others(ended)));
            let r = daemon.wait();
            if let Some(e) = &ended {
                let _ = e.write(1);
            }
            if let Some(t) = refuser {
                let _ = t.join();
            }
            r
        });
        *self.stop.conn() = None;
        // Dropping the daemon signals the queue workers and joins them.
        drop(daemon);
        backend.close_exit_events();
        backend.release("the front end disconnected");
        if !self.stop.is_stopped() {
            match r {
                Ok(()) => log::info!("front end disconnected; listening again"),
                Err(e) => log::info!("front end gone ({e}); listening again"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stale_sockets_are_replaced() {
        let dir = std::env::temp_dir().join(format!("thinlun-vhost-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(check_stale_socket(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let live = dir.join("live.sock");
        let l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert_eq!(
            check_stale_socket(&live).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(l); // the file stays, nobody listens: stale
        assert!(check_stale_socket(&live).is_ok());
        assert!(check_stale_socket(&dir.join("missing")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_serial_fits_get_id() {
        assert_eq!(default_serial("vm-100-disk-0", 7), "vm-100-disk-0");
        assert_eq!(
            default_serial("a-very-long-volume-name-indeed", 42),
            "thinlun-42"
        );
    }
}
