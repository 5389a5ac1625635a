//! A host's delta lease: joining the pool by taking its host slot, renewing
//! it in the background, watching the other hosts' slots, and fencing its
//! own writes when renewal stops.

use super::clock::{now_ms, raise_to_realtime, KillTimer};
use super::{HostView, HostWatch, Timing};
use crate::dev::read_blocks;
use crate::dev::{read_block, write_blocks, BlockDevice, IoOp};
use crate::error::{Error, Result};
use crate::format::lease::{HostSlot, SlotState};
use crate::format::Layout;
use crate::util::random_u64;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// How a process joins a shared pool.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    pub host_id: u32,
    /// Name recorded in the slot; a restart on the same machine (same
    /// name, and no local process holding the id) may retake its own slot
    /// without waiting for it to expire.
    pub host_name: String,
    /// Arm the SIGKILL watchdog (see [`KillTimer`]). Off only for tests
    /// that run several hosts inside one process.
    pub watchdog: bool,
    /// Directory of the per-host-id lock files that stop two processes on
    /// one machine from using the same id.
    pub run_dir: PathBuf,
}

/// What this host last saw of another host's slot, and since when. A
/// damaged slot (torn by a crash mid-write) is tracked by its raw bytes'
/// checksum: if it stays the same for the dead time its host is dead.
struct Observed {
    slot: Option<HostSlot>,
    damaged: bool,
    fingerprint: u32,
    since_ms: u64,
    /// The slot changed after this process first read it: its host was
    /// alive then.
    changed: bool,
}

/// Stand-in for a slot that cannot be decoded.
fn damaged_slot(h: u32) -> HostSlot {
    HostSlot {
        host_id: h,
        state: SlotState::Live,
        generation: 0,
        nonce: 0,
        renewal: 0,
        local_ms: 0,
        name: format!("host {h} (damaged slot)"),
    }
}

pub(crate) struct HostLease {
    dev: Arc<dyn BlockDevice>,
    pub layout: Layout,
    pub timing: Timing,
    pub host_id: u32,
    pub generation: u64,
    nonce: u64,
    name: String,
    renewal: AtomicU64,
    /// Boot-time ms at which the last successful renewal was issued.
    last_ok_ms: AtomicU64,
    /// Set for good once the lease is lost; every write is refused.
    lost: Mutex<Option<String>>,
    observed: Mutex<HashMap<u32, Observed>>,
    /// First time this host read the slots: nobody is "dead" before this
    /// host has watched for the full dead time.
    watching_since_ms: u64,
    watchdog: Option<KillTimer>,
    stop: Mutex<bool>,
    wake: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Held for the process's life; a crash releases it with the process.
    local_lock: Mutex<Option<std::fs::File>>,
}

fn io_err(what: &str) -> impl Fn(io::Error) -> Error + '_ {
    move |e| Error::io(what, e)
}

impl HostLease {
    /// Joins the pool as `opts.host_id`: takes the slot if it is free, its
    /// own leftover, or unchanged for the dead time; then verifies after a
    /// delay that no other host took it at the same time.
    pub fn join(
        dev: Arc<dyn BlockDevice>,
        layout: Layout,
        uuid: &[u8; 16],
        timing: Timing,
        opts: &JoinOptions,
    ) -> Result<Arc<HostLease>> {
        let id = opts.host_id;
        if id == 0 || id > layout.max_hosts {
            return Err(Error::InvalidArgument(format!(
                "host id {id} is out of range: this pool has host ids 1..={}",
                layout.max_hosts
            )));
        }
        let local_lock = lock_locally(&opts.run_dir, uuid, id)?;
        let at = layout.host_slot(id);
        let read_slot = || -> Result<Option<HostSlot>> {
            let b = read_block(dev.as_ref(), at).map_err(io_err("reading a host slot"))?;
            HostSlot::decode(&b, at, id)
        };
        let mut slot = read_slot_tolerant(&read_slot, timing)?;
        if let Some(s) = slot.clone().filter(|s| s.state == SlotState::Live) {
            if s.name != opts.host_name {
                slot = wait_until_dead(&read_slot, s, timing)?;
            }
        }
        let watchdog = if opts.watchdog {
            Some(KillTimer::new().map_err(io_err("creating the lease watchdog"))?)
        } else {
            None
        };
        // Between reading the slot and writing it this process must not
        // stall, or it could overwrite a host that took the slot meanwhile.
        if let Some(w) = &watchdog {
            w.arm(timing.io_timeout)
                .map_err(io_err("arming the lease watchdog"))?;
        }
        if read_slot_tolerant(&read_slot, timing)? != slot {
            return Err(Error::busy(
                crate::BusyKind::HostIdInUse,
                format!("host id {id} changed hands while joining; another host is using it"),
            ));
        }
        let (generation, renewal) = slot
            .as_ref()
            .map_or((1, 1), |s| (s.generation + 1, s.renewal + 1));
        let mine = HostSlot {
            host_id: id,
            state: SlotState::Live,
            generation,
            nonce: random_u64(),
            renewal,
            local_ms: now_ms(),
            name: opts.host_name.clone(),
        };
        let issued = now_ms();
        write_blocks(dev.as_ref(), &[(at, mine.encode(at))])
            .map_err(io_err("writing the host slot"))?;
        if let Some(w) = &watchdog {
            w.arm(Duration::from_millis(timing.watchdog_ms()))
                .map_err(io_err("arming the lease watchdog"))?;
        }
        std::thread::sleep(Duration::from_millis(timing.join_delay_ms()));
        match read_slot_tolerant(&read_slot, timing)? {
            Some(s) if s.nonce == mine.nonce => {}
            other => {
                if let Some(w) = &watchdog {
                    let _ = w.disarm();
                }
                let by = other.map_or("nobody".to_string(), |s| format!("'{}'", s.name));
                return Err(Error::busy(crate::BusyKind::HostIdInUse, format!(
                    "host id {id} was taken by {by} while this host was joining; each host needs its own id"
                )));
            }
        }
        let lease = Arc::new(HostLease {
            dev,
            layout,
            timing,
            host_id: id,
            generation,
            nonce: mine.nonce,
            name: opts.host_name.clone(),
            renewal: AtomicU64::new(renewal),
            last_ok_ms: AtomicU64::new(issued),
            lost: Mutex::new(None),
            observed: Mutex::new(HashMap::new()),
            watching_since_ms: now_ms(),
            watchdog,
            stop: Mutex::new(false),
            wake: Condvar::new(),
            thread: Mutex::new(None),
            local_lock: Mutex::new(Some(local_lock)),
        });
        lease.observe()?;
        let weak = Arc::downgrade(&lease);
        let t = std::thread::Builder::new()
            .name("thinlun-lease".into())
            .spawn(move || renew_loop(weak))
            .map_err(io_err("starting the lease renewer"))?;
        *lease.thread.lock() = Some(t);
        Ok(lease)
    }

    /// Refuses writes once the lease is lost or has gone unrenewed for the
    /// fence time. Every write to the LUN passes here (see [`FencedDevice`]).
    pub fn check_write(&self) -> io::Result<()> {
        if let Some(why) = self.lost.lock().as_ref() {
            return Err(io::Error::other(format!("host lease lost: {why}")));
        }
        let age = now_ms().saturating_sub(self.last_ok_ms.load(Ordering::Acquire));
        if age >= self.timing.fence_ms() {
            self.lose(format!(
                "not renewed for {} ms (fence time {} ms)",
                age,
                self.timing.fence_ms()
            ));
            return Err(io::Error::other("host lease expired: writes stopped"));
        }
        Ok(())
    }

    pub fn lost_reason(&self) -> Option<String> {
        self.lost.lock().clone()
    }

    fn lose(&self, why: String) {
        let mut lost = self.lost.lock();
        if lost.is_none() {
            log::warn!(
                "host {} lost its lease ({why}); writes are stopped until the pool is reopened",
                self.host_id
            );
            *lost = Some(why);
        }
    }

    fn renew(&self) {
        if self.lost.lock().is_some() {
            return;
        }
        let issued = now_ms();
        let age = issued.saturating_sub(self.last_ok_ms.load(Ordering::Acquire));
        if age >= self.timing.fence_ms() {
            // Too late: another host may already consider us dead. Renewing
            // now would make a dead host look alive again.
            self.lose(format!("renewal overdue by {age} ms"));
            return;
        }
        let at = self.layout.host_slot(self.host_id);
        let Ok(raw) = read_block(self.dev.as_ref(), at) else {
            return; // unreadable this round; retry next round
        };
        match HostSlot::decode(&raw, at, self.host_id) {
            Ok(Some(s)) if s.nonce == self.nonce && s.generation == self.generation => {}
            // Torn (this host crashed mid-renewal in an earlier life, or a
            // bad sector): rewriting our own slot repairs it.
            Err(_) => {}
            Ok(other) => {
                let by = other.map_or("a cleared slot".into(), |s| format!("'{}'", s.name));
                self.lose(format!("host slot {} now belongs to {by}", self.host_id));
                return;
            }
        }
        let renewal = self.renewal.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = self.slot(SlotState::Live, renewal);
        if write_blocks(self.dev.as_ref(), &[(at, slot.encode(at))]).is_ok() {
            self.last_ok_ms.store(issued, Ordering::Release);
            if let Some(w) = &self.watchdog {
                let left = self.timing.watchdog_ms().saturating_sub(now_ms() - issued);
                let _ = w.arm(Duration::from_millis(left.max(1)));
            }
        }
    }

    fn slot(&self, state: SlotState, renewal: u64) -> HostSlot {
        HostSlot {
            host_id: self.host_id,
            state,
            generation: self.generation,
            nonce: self.nonce,
            renewal,
            local_ms: now_ms(),
            name: self.name.clone(),
        }
    }

    /// Reads every host slot and notes which changed since last time.
    pub fn observe(&self) -> Result<()> {
        let l = &self.layout;
        let slots: Vec<u64> = (1..=l.max_hosts).map(|h| l.host_slot(h)).collect();
        let buf = read_blocks(self.dev.as_ref(), &slots, "reading host slots")?;
        let now = now_ms();
        let mut seen = self.observed.lock();
        for h in 1..=l.max_hosts {
            let raw = &buf[h as usize - 1];
            let fingerprint = crc32fast::hash(raw);
            let (slot, damaged) = match HostSlot::decode(raw, l.host_slot(h), h) {
                Ok(s) => (s, false),
                Err(_) => (Some(damaged_slot(h)), true),
            };
            match seen.get_mut(&h) {
                Some(o) if o.fingerprint == fingerprint => {}
                prev => {
                    let changed = prev.is_some();
                    seen.insert(
                        h,
                        Observed {
                            slot,
                            damaged,
                            fingerprint,
                            since_ms: now,
                            changed,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Host `h` holds its slot as generation `gen` and is not dead.
    pub fn holds(&self, h: u32, gen: u64) -> bool {
        if h == self.host_id {
            return gen == self.generation;
        }
        let seen = self.observed.lock();
        match seen.get(&h) {
            Some(o) if o.damaged => !self.dead_since(o.since_ms),
            Some(Observed {
                slot: Some(s),
                since_ms,
                ..
            }) => s.state == SlotState::Live && s.generation == gen && !self.dead_since(*since_ms),
            _ => false,
        }
    }

    fn dead_since(&self, since_ms: u64) -> bool {
        self.dead_in_ms(since_ms, now_ms()) == 0
    }

    /// How long this process has watched a slot that last changed at
    /// `since_ms` stay unchanged: only time since its own first read counts.
    fn watched_ms(&self, since_ms: u64, now: u64) -> u64 {
        now.saturating_sub(since_ms.max(self.watching_since_ms))
    }

    /// Milliseconds until a slot unchanged since `since_ms` counts as dead.
    fn dead_in_ms(&self, since_ms: u64, now: u64) -> u64 {
        self.timing
            .dead_ms()
            .saturating_sub(self.watched_ms(since_ms, now))
    }

    /// What this process has seen of host `h`'s slot (`None` for this
    /// host or a slot never read).
    pub fn watch_of(&self, h: u32) -> Option<HostWatch> {
        if h == self.host_id {
            return None;
        }
        let seen = self.observed.lock();
        let o = seen.get(&h)?;
        let now = now_ms();
        Some(HostWatch {
            unchanged_ms: now.saturating_sub(o.since_ms),
            watched_ms: self.watched_ms(o.since_ms, now),
            changed_while_watched: o.changed,
            dead_in_ms: self.dead_in_ms(o.since_ms, now),
            free: o.slot.as_ref().is_some_and(|s| s.state == SlotState::Free),
        })
    }

    /// Live-marked (or damaged) slots of other hosts that have not
    /// changed for the dead time: their hosts are dead (they fenced
    /// themselves long ago). With each, the checksum of its raw block.
    pub fn dead_hosts(&self) -> Vec<(HostSlot, u32)> {
        let seen = self.observed.lock();
        let mut out: Vec<(HostSlot, u32)> = seen
            .iter()
            .filter(|(&h, _)| h != self.host_id)
            .filter_map(|(_, o)| match &o.slot {
                Some(s) if s.state == SlotState::Live && self.dead_since(o.since_ms) => {
                    Some((s.clone(), o.fingerprint))
                }
                _ => None,
            })
            .collect();
        out.sort_by_key(|s| s.0.host_id);
        out
    }

    /// The current generation of host `h`'s slot, as last observed.
    pub fn generation_of(&self, h: u32) -> Option<u64> {
        if h == self.host_id {
            return Some(self.generation);
        }
        self.observed
            .lock()
            .get(&h)
            .filter(|o| !o.damaged)
            .and_then(|o| o.slot.as_ref().map(|s| s.generation))
    }

    /// Host `h`'s slot cannot be decoded (it is treated as live until it
    /// stays unchanged for the dead time).
    pub fn is_damaged(&self, h: u32) -> bool {
        self.observed.lock().get(&h).is_some_and(|o| o.damaged)
    }

    pub fn name_of(&self, h: u32) -> String {
        self.observed
            .lock()
            .get(&h)
            .and_then(|o| o.slot.as_ref().map(|s| s.name.clone()))
            .unwrap_or_else(|| format!("host {h}"))
    }

    pub fn hosts(&self) -> Vec<HostView> {
        let seen = self.observed.lock();
        let now = now_ms();
        let mut ids: Vec<u32> = seen.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|h| {
                let o = &seen[&h];
                let s = o.slot.as_ref()?;
                let state = if h == self.host_id {
                    "live"
                } else if s.state == SlotState::Free {
                    "free"
                } else if self.dead_since(o.since_ms) {
                    "dead"
                } else if now.saturating_sub(o.since_ms) < self.timing.renew_ms() * 2 {
                    "live"
                } else {
                    "unknown"
                };
                Some(HostView {
                    host_id: h,
                    name: s.name.clone(),
                    generation: s.generation,
                    renewal: s.renewal,
                    state,
                    unchanged_ms: Some(now.saturating_sub(o.since_ms)),
                    watched_ms: Some(self.watched_ms(o.since_ms, now)),
                    dead_in_ms: (state == "unknown").then(|| self.dead_in_ms(o.since_ms, now)),
                    is_self: h == self.host_id,
                })
            })
            .collect()
    }

    /// Leaves the pool: marks the slot free so the id can be reused at
    /// once, and stops the renewer and the watchdog.
    pub fn release(&self) {
        *self.stop.lock() = true;
        self.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if self.check_write().is_ok() {
            let at = self.layout.host_slot(self.host_id);
            let renewal = self.renewal.fetch_add(1, Ordering::AcqRel) + 1;
            let slot = self.slot(SlotState::Free, renewal);
            let _ = write_blocks(self.dev.as_ref(), &[(at, slot.encode(at))]);
        }
        if let Some(w) = &self.watchdog {
            let _ = w.disarm();
        }
        // Quietly: leaving is not losing.
        self.lost
            .lock()
            .get_or_insert_with(|| "the host left the pool".into());
    }

    /// Stops renewing without releasing anything, as if the process had
    /// frozen or died (tests of dead-host recovery).
    pub fn stop_renewing(&self) {
        *self.stop.lock() = true;
        self.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if let Some(w) = &self.watchdog {
            let _ = w.disarm();
        }
        self.local_lock.lock().take();
        self.lose("simulated crash".into());
    }
}

fn renew_loop(weak: Weak<HostLease>) {
    // Best effort: unprivileged processes renew at normal priority.
    let _ = raise_to_realtime();
    loop {
        let Some(lease) = weak.upgrade() else { return };
        let period = Duration::from_millis(lease.timing.renew_ms());
        {
            let mut stop = lease.stop.lock();
            if *stop {
                return;
            }
            lease.wake.wait_for(&mut stop, period);
            if *stop {
                return;
            }
        }
        lease.renew();
        let _ = lease.observe();
    }
}

/// Reads a slot, retrying a torn read (a concurrent write) a few times.
fn read_slot_tolerant(
    read: &dyn Fn() -> Result<Option<HostSlot>>,
    timing: Timing,
) -> Result<Option<HostSlot>> {
    let mut last = None;
    for _ in 0..5 {
        match read() {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(timing.io_timeout / 10);
    }
    Err(last.unwrap_or_else(|| Error::Corrupt("host slot unreadable".into())))
}

/// Watches a live slot held under another name: if it changes its holder
/// is alive and the id is refused; if it stays unchanged for the dead time
/// its holder is dead and the slot may be taken.
fn wait_until_dead(
    read: &dyn Fn() -> Result<Option<HostSlot>>,
    seen: HostSlot,
    timing: Timing,
) -> Result<Option<HostSlot>> {
    let start = now_ms();
    while now_ms() - start < timing.dead_ms() {
        std::thread::sleep(timing.io_timeout);
        let now = read_slot_tolerant(read, timing)?;
        if now.as_ref() != Some(&seen) {
            return Err(Error::busy(crate::BusyKind::HostIdInUse, format!(
                "host id {} is in use by host '{}' (its lease is being renewed); each host needs its own id",
                seen.host_id, seen.name
            )));
        }
    }
    Ok(Some(seen))
}

/// Takes a local lock file for (pool, host id) so two processes on this
/// machine never run as one host id.
fn lock_locally(dir: &std::path::Path, uuid: &[u8; 16], id: u32) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).map_err(io_err("creating the lease lock directory"))?;
    let u: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("thinlun-{u}-host{id}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(Error::busy(
            crate::BusyKind::HostIdInUseHere,
            format!("host id {id} is already in use by another thinlun process on this machine"),
        ));
    }
    Ok(f)
}

/// The device every pool write goes through on a shared pool: a write is
/// issued only while the host lease is held and fresh.
pub(crate) struct FencedDevice {
    pub inner: Arc<dyn BlockDevice>,
    pub lease: Arc<HostLease>,
}

impl BlockDevice for FencedDevice {
    fn size_bytes(&self) -> io::Result<u64> {
        self.inner.size_bytes()
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        if ops.iter().any(|op| matches!(op, IoOp::Write { .. })) {
            self.lease.check_write()?;
        }
        self.inner.submit(ops)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lease.check_write()?;
        self.inner.discard(offset, len)
    }
}
