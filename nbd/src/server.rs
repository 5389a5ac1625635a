//! An NBD server on one Unix socket: a thread per connection, exports
//! added and removed while it runs.
//!
//! There is no TCP listener: NBD without TLS has no authentication, and a
//! Unix socket's permissions are the access control (docs/NBD.md).

use crate::exports::{Export, Exports};
use crate::handshake::{negotiate, Ended};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;

/// A client that has not finished the handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct Conn {
    export: Option<String>,
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    exports: Exports,
    conns: Mutex<HashMap<u64, Conn>>,
    stopping: AtomicBool,
    served: AtomicU64,
}

/// A running server; stopped (and its socket removed) on [`NbdServer::stop`]
/// or drop.
pub struct NbdServer {
    path: PathBuf,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Listens on `path`, replacing a stale socket (not another file, and
    /// not a socket some server still answers on).
    pub fn bind(path: &Path) -> io::Result<NbdServer> {
        replace_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("listening on {}: {e}", path.display()))
        })?;
        let shared = Arc::new(Shared {
            exports: Exports::default(),
            conns: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            served: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, sh))?;
        Ok(NbdServer {
            path: path.to_path_buf(),
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Offers `export` under `name` to new connections.
    pub fn add_export(&self, name: &str, export: Export) -> Result<(), String> {
        self.shared.exports.insert(name, export)
    }

    /// Withdraws an export and closes its connections, waiting for them,
    /// so the volume handle is closed when this returns. Returns the
    /// export, or `None` if there was none by that name.
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        let e = self.shared.exports.remove(name)?;
        self.close_connections(|c| c.export.as_deref() == Some(name));
        Some(e)
    }

    pub fn export_names(&self) -> Vec<String> {
        self.shared.exports.names()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every connection and waits for them.
    pub fn stop(&mut self) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        // Wakes the acceptor, which sees `stopping`.
        let _ = UnixStream::connect(&self.path);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        self.close_connections(|_| true);
        let _ = std::fs::remove_file(&self.path);
    }

    /// Shuts the chosen connections down and waits for their threads
    /// (outside the table's lock, which a finishing thread takes).
    fn close_connections(&self, chosen: impl Fn(&Conn) -> bool) {
        let threads: Vec<JoinHandle<()>> = self
            .shared
            .conns
            .lock()
            .values_mut()
            .filter(|c| chosen(c))
            .filter_map(|c| {
                let _ = c.stream.shutdown(Shutdown::Both);
                c.thread.take()
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: UnixListener, sh: Arc<Shared>) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if sh.stopping.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("nbd: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let mut conns = sh.conns.lock();
        // Reap finished connections.
        conns.retain(|_, c| c.thread.as_ref().is_some_and(|t| !t.is_finished()));
        if conns.len() >= MAX_CONNECTIONS {
            log::warn!("nbd: {MAX_CONNECTIONS} connections already; closing a new one");
            continue;
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        let sh2 = sh.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                connection(stream, id, &sh2);
                sh2.conns.lock().remove(&id);
            });
        match thread {
            Ok(t) => {
                sh.served.fetch_add(1, Ordering::Relaxed);
                conns.insert(
                    id,
                    Conn {
                        export: None,
                        stream: clone,
                        thread: Some(t),
                    },
                );
            }
            Err(e) => log::warn!("nbd: starting a connection thread: {e}"),
        }
    }
}

fn connection(stream: UnixStream, id: u64, sh: &Shared) {
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut s = &stream;
    let n = match negotiate(&mut s, &sh.exports) {
        Ok(n) => n,
        Err(Ended::Quit) => return,
        Err(Ended::Protocol(why)) => {
            log::info!("nbd: closing a client in its handshake: {why}");
            return;
        }
        Err(Ended::Io(e)) => {
            log::info!("nbd: handshake: {e}");
            return;
        }
    };
    if let Some(c) = sh.conns.lock().get_mut(&id) {
        c.export = Some(n.name.clone());
    }
    // An export withdrawn during the handshake: do not serve it.
    if sh.exports.get(&n.name).is_none() || sh.stopping.load(Ordering::Acquire) {
        return;
    }
    let _ = stream.set_read_timeout(None);
    match crate::session::serve(&stream, &n) {
        Ok(()) | Err(Ended::Quit) => {}
        Err(Ended::Protocol(why)) => log::info!("nbd '{}': closing the client: {why}", n.name),
        Err(Ended::Io(e)) => log::info!("nbd '{}': {e}", n.name),
    }
}

fn replace_stale(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Ok(_) if UnixStream::connect(path).is_ok() => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by another server", path.display()),
        )),
        Ok(_) => std::fs::remove_file(path),
    }
}
