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
//!
//! Two servers of one volume in one process (a VM moving to a new QEMU
//! process on the same host) share a [`WriterSlot`]: only the server
//! holding it serves the rings, whatever the pool's activation says.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinlun::{Pool, Volume};

/// Where a server opens its volume again after releasing it: by id, since
/// the volume may be renamed meanwhile.
pub struct PoolVolume {
    pub pool: Pool,
    pub id: u64,
}

impl PoolVolume {
    fn info(&self) -> thinlun::Result<thinlun::VolumeInfo> {
        self.pool
            .volumes()
            .into_iter()
            .find(|v| v.id == self.id)
            .ok_or_else(|| thinlun::Error::NoSuchVolume(format!("volume id {}", self.id)))
    }

    fn open(&self) -> thinlun::Result<Volume> {
        let name = self.info()?.name;
        match self.pool.try_open_volume(&name) {
            // Renamed on another host: the activation's refresh knows.
            Err(thinlun::Error::NoSuchVolume(_)) => self.pool.try_open_volume(&self.info()?.name),
            r => r,
        }
    }

    fn size_bytes(&self) -> Option<u64> {
        self.info().ok().map(|i| i.size_bytes)
    }
}

/// The right to write one volume within this process, taken by the server
/// whose front end runs the rings and given back at its release.
#[derive(Default)]
pub struct WriterSlot {
    taken: Mutex<bool>,
}

impl WriterSlot {
    fn try_take(&self) -> bool {
        let mut t = self.taken.lock();
        !std::mem::replace(&mut *t, true)
    }

    fn give(&self) {
        *self.taken.lock() = false;
    }
}

/// What a server holds of its volume.
#[derive(Default)]
struct Held {
    /// The open handle (on a shared pool, the activation).
    volume: Option<Arc<Volume>>,
    /// This server has the [`WriterSlot`].
    writing: bool,
}

/// The volume a server writes, when it holds it.
pub struct Activation {
    name: String,
    held: Mutex<Held>,
    writer: Arc<WriterSlot>,
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
        Activation::pinned_sharing(vol, Arc::new(WriterSlot::default()), Duration::ZERO)
    }

    /// A volume held open for the server's whole life that writes only
    /// while it has `writer`, which other servers of the volume in this
    /// process share (waiting up to `wait` for it). Suits a pool of one
    /// host, where the open handle protects the volume from remove and
    /// rollback.
    pub fn pinned_sharing(vol: Arc<Volume>, writer: Arc<WriterSlot>, wait: Duration) -> Activation {
        Activation {
            name: vol.name().to_string(),
            size_bytes: vol.size_bytes(),
            held: Mutex::new(Held {
                volume: Some(vol),
                writing: false,
            }),
            writer,
            source: None,
            wait,
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
        writer: Arc<WriterSlot>,
        wait: Duration,
    ) -> thinlun::Result<Activation> {
        let info = pool.volume_info(name)?;
        let size_bytes = open.as_ref().map_or(info.size_bytes, |v| v.size_bytes());
        Ok(Activation {
            name: name.to_string(),
            held: Mutex::new(Held {
                volume: open,
                writing: false,
            }),
            writer,
            source: Some(PoolVolume { pool, id: info.id }),
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
        self.held.lock().volume.clone()
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

    /// The volume to serve the rings with, taking the writer slot and
    /// opening the volume if this server lacks either: retried until the
    /// bound while another server or host holds them (the source of a
    /// migration still releasing).
    pub fn acquire(&self) -> Result<Arc<Volume>, String> {
        let mut held = self.held.lock();
        if let (true, Some(v)) = (held.writing, held.volume.as_ref()) {
            return Ok(v.clone());
        }
        let mut gave_up = self.gave_up.lock();
        let start = Instant::now();
        let deadline = start + if *gave_up { Duration::ZERO } else { self.wait };
        let mut noted = false;
        loop {
            let why = match self.try_acquire(&mut held) {
                Ok(v) => {
                    *gave_up = false;
                    let waited = if noted {
                        format!(" after waiting {} ms", start.elapsed().as_millis())
                    } else {
                        String::new()
                    };
                    log::info!(
                        "'{}': activated for the front end's rings{waited}",
                        self.name
                    );
                    return Ok(v);
                }
                Err(Wait::Busy(why)) if Instant::now() < deadline => {
                    if !noted {
                        log::info!(
                            "'{}': waiting up to {} ms for its release: {why}",
                            self.name,
                            self.wait.as_millis()
                        );
                        noted = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(Wait::Busy(why) | Wait::Failed(why)) => why,
            };
            *gave_up = true;
            let why = format!(
                "'{}' not activated after {} ms ({why}); answering IOERR",
                self.name,
                start.elapsed().as_millis()
            );
            log::warn!("{why}");
            return Err(why);
        }
    }

    /// One try: the slot first (another server of this process may be
    /// writing), then the pool's activation.
    fn try_acquire(&self, held: &mut Held) -> Result<Arc<Volume>, Wait> {
        if !held.writing {
            if !self.writer.try_take() {
                return Err(Wait::Busy(
                    "another server of this process is writing it".to_string(),
                ));
            }
            held.writing = true;
        }
        if let Some(v) = &held.volume {
            return Ok(v.clone());
        }
        let opened = match &self.source {
            None => Err(Wait::Failed("it was released".to_string())),
            Some(src) => src.open().map_err(|e| match e {
                thinlun::Error::Busy { message: msg, .. } => Wait::Busy(msg),
                e => Wait::Failed(e.to_string()),
            }),
        };
        match opened {
            Ok(v) => {
                let v = Arc::new(v);
                held.volume = Some(v.clone());
                Ok(v)
            }
            Err(e) => {
                // Not holding the volume, this server must not keep others
                // of this process from it.
                held.writing = false;
                self.writer.give();
                Err(e)
            }
        }
    }

    /// Gives the volume up: commits what was written (the rings were
    /// drained by the caller) and closes it, which on a shared pool
    /// checkpoints and releases the activation. A pinned volume is only
    /// committed.
    pub fn release(&self, why: &str) -> thinlun::Result<()> {
        let mut held = self.held.lock();
        let flushed = match &held.volume {
            Some(v) if held.writing || self.source.is_some() => v.flush(),
            _ => Ok(()),
        };
        let had = held.writing || (self.source.is_some() && held.volume.is_some());
        if held.writing {
            held.writing = false;
            self.writer.give();
        }
        if self.source.is_some() {
            // Dropping the last handle releases; a flush error is still
            // reported, and the journal keeps what was persisted.
            held.volume = None;
        }
        if had {
            log::info!("'{}': released ({why})", self.name);
        }
        *self.gave_up.lock() = false;
        flushed
    }
}

/// Why a try to activate did not succeed.
enum Wait {
    /// Held elsewhere: worth waiting for.
    Busy(String),
    Failed(String),
}
