//! The right of one server to write its volume, handed over between
//! servers during a live migration (docs/LOCKING.md 4.4).
//!
//! A server holds an open [`Volume`] only while its front end runs the
//! device. On a shared pool the open handle *is* the activation: the last
//! handle to close commits, checkpoints and releases it, and opening it
//! again activates it on this host. A server started for the target of a
//! migration (`incoming`) answers the configuration from the catalog and
//! opens nothing until its front end starts the rings; the source's server
//! releases when its front end stops the device with dirty logging on
//! (the final stop of a migration) or disconnects. The target then waits a
//! bounded time for that release, so both never write at once.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinlun::{Pool, Volume};

/// Where a server opens its volume again after releasing it.
pub struct PoolVolume {
    pub pool: Pool,
    pub name: String,
}

impl PoolVolume {
    fn open(&self) -> thinlun::Result<Volume> {
        self.pool.try_open_volume(&self.name)
    }

    fn size_bytes(&self) -> Option<u64> {
        self.pool.volume_info(&self.name).ok().map(|i| i.size_bytes)
    }
}

/// The volume a server writes, when it holds it.
pub struct Activation {
    name: String,
    held: Mutex<Option<Arc<Volume>>>,
    /// `None`: the volume was handed in open and stays open (no
    /// handover; tests and embedders that manage activation themselves).
    source: Option<PoolVolume>,
    /// How long a server whose rings start waits for another holder's
    /// release.
    wait: Duration,
    /// Size to answer while nothing is held (the catalog's, at start).
    size_bytes: u64,
    /// A wait already timed out on this connection: later tries don't wait.
    gave_up: Mutex<bool>,
}

impl Activation {
    /// A volume opened by the caller, held for the server's whole life.
    pub fn pinned(vol: Arc<Volume>) -> Activation {
        Activation {
            name: vol.name().to_string(),
            size_bytes: vol.size_bytes(),
            held: Mutex::new(Some(vol)),
            source: None,
            wait: Duration::ZERO,
            gave_up: Mutex::new(false),
        }
    }

    /// A volume of `pool` the server may release and open again; `open`
    /// is the handle already taken (a server that starts serving), or
    /// `None` for the target of a migration, which opens at ring start.
    pub fn handover(
        pool: Pool,
        name: &str,
        open: Option<Arc<Volume>>,
        wait: Duration,
    ) -> thinlun::Result<Activation> {
        let size_bytes = match &open {
            Some(v) => v.size_bytes(),
            None => pool.volume_info(name)?.size_bytes,
        };
        Ok(Activation {
            name: name.to_string(),
            held: Mutex::new(open),
            source: Some(PoolVolume {
                pool,
                name: name.to_string(),
            }),
            wait,
            size_bytes,
            gave_up: Mutex::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The held volume, if any.
    pub fn current(&self) -> Option<Arc<Volume>> {
        self.held.lock().clone()
    }

    /// The size the front end sees: the held volume's (it may have grown),
    /// else the catalog's.
    pub fn size_bytes(&self) -> u64 {
        if let Some(v) = self.current() {
            return v.size_bytes();
        }
        self.source
            .as_ref()
            .and_then(PoolVolume::size_bytes)
            .unwrap_or(self.size_bytes)
    }

    /// The volume to serve the rings with, opening it if it is not held:
    /// retried until the bound while another server or host holds it
    /// (the source of a migration still releasing it).
    pub fn acquire(&self) -> Result<Arc<Volume>, String> {
        let mut held = self.held.lock();
        if let Some(v) = held.as_ref() {
            return Ok(v.clone());
        }
        let Some(src) = &self.source else {
            return Err(format!("'{}' was released", self.name));
        };
        let mut gave_up = self.gave_up.lock();
        let start = Instant::now();
        let deadline = start + if *gave_up { Duration::ZERO } else { self.wait };
        let mut noted = false;
        loop {
            match src.open() {
                Ok(v) => {
                    let v = Arc::new(v);
                    *held = Some(v.clone());
                    *gave_up = false;
                    eprintln!(
                        "thinlun-vhost: '{}': activated for the front end's rings{}",
                        self.name,
                        if noted {
                            format!(" after waiting {} ms", start.elapsed().as_millis())
                        } else {
                            String::new()
                        }
                    );
                    return Ok(v);
                }
                Err(thinlun::Error::Busy(msg)) if Instant::now() < deadline => {
                    if !noted {
                        eprintln!(
                            "thinlun-vhost: '{}': waiting up to {} ms for its release: {msg}",
                            self.name,
                            self.wait.as_millis()
                        );
                        noted = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    *gave_up = true;
                    let why = format!(
                        "'{}' not activated after {} ms ({e}); answering IOERR",
                        self.name,
                        start.elapsed().as_millis()
                    );
                    eprintln!("thinlun-vhost: {why}");
                    return Err(why);
                }
            }
        }
    }

    /// Gives the volume up: commits what was written (the rings were
    /// drained by the caller) and closes it, which on a shared pool
    /// checkpoints and releases the activation. A pinned volume is only
    /// committed.
    pub fn release(&self, why: &str) -> thinlun::Result<()> {
        let mut held = self.held.lock();
        let Some(v) = held.as_ref() else {
            return Ok(());
        };
        let flushed = v.flush();
        if self.source.is_some() {
            // Dropping the last handle releases; a flush error is still
            // reported, and the journal keeps what was persisted.
            *held = None;
            eprintln!("thinlun-vhost: '{}': released ({why})", self.name);
        }
        *self.gave_up.lock() = false;
        flushed
    }
}
