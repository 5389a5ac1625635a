//! The vhost-user-blk backend: features and configuration for the
//! vhost-user protocol, and the data path of each queue.
//!
//! Each queue has its own worker thread (`queues_per_thread`). On a kick the
//! worker takes every available chain and parses it. Reads and writes go to
//! the engine's I/O queue ([`crate::flow`]) and stay in flight while the
//! worker takes more: the worker waits for completions, persists the new
//! mappings of finished writes, and publishes used entries in the order the
//! chains were taken, until nothing is left in flight. Everything else
//! (flush, discard, write-zeroes, GET_ID, bounced buffers) runs as one engine
//! batch ([`thinlun::Volume::submit`]) once the requests before it are done.
//! The guest is signalled when EVENT_IDX says it wants to hear. In-order
//! completion is what makes reconnect safe: see the crate README.

use crate::activation::Activation;
use crate::batch::{self, Pending};
use crate::config::BlkConfig;
use crate::flow::{DataRequest, Flow};
use crate::guest::{self, HostSeg, Mem, Reader, SegUse};
use crate::guest_fault::{self, FileRegistry};
use crate::request::{self, Command, Desc, Parsed, Status, ID_BYTES, SECTOR};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use thinlun::dev::AlignedBuf;
use thinlun::Volume;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringMutex, VringState, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type Gm = GuestMemoryAtomic<Mem>;

/// The vhost feature bit that says the device logs the guest pages it
/// writes (live migration; the log comes with SET_LOG_BASE).
const VHOST_F_LOG_ALL: u64 = 1 << 26;
type Vring = VringMutex<Gm>;

/// Largest queue the front end may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Size of the shared zero buffer used for write-zeroes without UNMAP.
pub(crate) const ZERO_BUF: usize = 1 << 20;

/// How completed writes are made to survive a crash of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Journal new mappings (`Volume::persist`) before completing a batch
    /// that made any: a `kill -9` of the server (and a reconnecting QEMU)
    /// loses no completed write. Power loss still needs FLUSH.
    ProcessCrash,
    /// Commit only on guest FLUSH (and the engine's background commit):
    /// a server crash loses unflushed writes, as a power loss would.
    FlushOnly,
}

/// Counters of the data path.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    /// Requests that streamed through the engine's queue.
    pub streamed: AtomicU64,
    /// Engine batches run (requests that did not stream).
    pub batches: AtomicU64,
    pub errors: AtomicU64,
    pub max_batch: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub streamed: u64,
    pub batches: u64,
    pub errors: u64,
    pub max_batch: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            streamed: self.streamed.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            max_batch: self.max_batch.load(Ordering::Relaxed),
        }
    }
}

/// What a backend serves, shared by every connection of one server.
pub struct Device {
    pub activation: Activation,
    pub config: BlkConfig,
    pub serial: [u8; ID_BYTES],
    pub durability: Durability,
    pub stats: Stats,
    pub(crate) zeroes: AlignedBuf,
}

impl Device {
    pub fn new(
        activation: Activation,
        config: BlkConfig,
        serial: &str,
        durability: Durability,
    ) -> Device {
        Device {
            activation,
            config,
            serial: request::serial_bytes(serial),
            durability,
            stats: Stats::default(),
            zeroes: AlignedBuf::zeroed(ZERO_BUF),
        }
    }
}

/// The backend of one vhost-user connection. Cheap to clone (the crate
/// hands a clone to each worker thread).
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

struct Inner {
    dev: Arc<Device>,
    mem: Mutex<Gm>,
    event_idx: AtomicBool,
    /// The guest turned the write cache off (CONFIG_WCE): commit (flush)
    /// before completing writes.
    write_through: AtomicBool,
    /// Per queue: `next_used` was taken from the used ring in guest memory
    /// since the queue was (re)started.
    synced: Vec<AtomicBool>,
    /// Per queue: the requests in flight, held by the worker while it
    /// processes the queue, so `stop_vring` (GET_VRING_BASE) returns only
    /// once everything taken has completed and the ring position it
    /// reports is final.
    flows: Vec<Mutex<Flow>>,
    /// The front end asked for dirty logging (VHOST_F_LOG_ALL): a live
    /// migration is under way, and a stop of every queue is its last.
    log_all: AtomicBool,
    /// This front end's memory files, for the SIGBUS handler.
    files: FileRegistry,
    /// The memory table last checked ([`guest_fault::check_table`]):
    /// the data path touches no other.
    checked: Mutex<Option<Arc<Mem>>>,
    /// The front end's memory faulted: nothing more is served to it.
    lost: AtomicBool,
    /// Ends this front end's connection (set by the server once it is
    /// accepted).
    connection: Mutex<Option<ShutdownHandle>>,
    /// The workers' exit eventfds, which vhost-user-backend 0.24.0 takes
    /// with `into_raw_fd` and never closes: one descriptor lost per
    /// connection, so a front end that reconnects in a loop would run the
    /// daemon out of descriptors. Closed in [`BlkBackend::close_exit_events`].
    exit_fds: Mutex<Vec<RawFd>>,
}

impl BlkBackend {
    pub fn new(dev: Arc<Device>, mem: Gm) -> BlkBackend {
        let n = dev.config.num_queues.max(1) as usize;
        BlkBackend {
            inner: Arc::new(Inner {
                dev,
                mem: Mutex::new(mem),
                event_idx: AtomicBool::new(false),
                write_through: AtomicBool::new(false),
                synced: (0..n).map(|_| AtomicBool::new(false)).collect(),
                flows: (0..n).map(|_| Mutex::new(Flow::new())).collect(),
                log_all: AtomicBool::new(false),
                files: FileRegistry::new(),
                checked: Mutex::new(None),
                lost: AtomicBool::new(false),
                connection: Mutex::new(None),
                exit_fds: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Gives the volume up once nothing is in flight: at the last stop of
    /// a migration, and when the front end disconnects (docs/LOCKING.md
    /// 4.4). The engine queues hold volume handles, so they close first.
    pub fn release(&self, why: &str) {
        for f in &self.inner.flows {
            f.lock().unwrap_or_else(|e| e.into_inner()).close();
        }
        if let Err(e) = self.inner.dev.activation.release(why) {
            log::warn!(
                "'{}': commit at release failed: {e}",
                self.inner.dev.activation.name()
            );
        }
    }

    /// Closes the exit eventfds the crate leaks (see `exit_fds`); only
    /// once the connection's workers are joined, and only descriptors
    /// that are still eventfds.
    pub fn close_exit_events(&self) {
        for fd in lock(&self.inner.exit_fds).drain(..) {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            if link.is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]") {
                // SAFETY: the crate gave up this descriptor (into_raw_fd)
                // to an epoll set that is closed now its worker is joined;
                // nothing else refers to it.
                unsafe { libc::close(fd) };
            }
        }
    }

    /// Lets the backend end its own connection (a front end whose memory
    /// faulted).
    pub fn set_connection(&self, handle: Option<ShutdownHandle>) {
        let mut conn = lock(&self.inner.connection);
        *conn = handle;
        // The front end may have faulted before the server got here (its
        // messages are handled from the accept on): end it now.
        if self.inner.lost.load(Ordering::Acquire) {
            if let Some(h) = conn.as_ref() {
                h.shutdown();
            }
        }
    }

    /// Checks a memory table before its first use and registers its
    /// files; an error says why it must not be touched.
    fn memory_checked(&self, mem: &Arc<Mem>) -> Result<(), String> {
        let mut checked = lock(&self.inner.checked);
        if checked.as_ref().is_some_and(|c| Arc::ptr_eq(c, mem)) {
            return Ok(());
        }
        let files = guest_fault::check_table(mem)?;
        self.inner.files.register(&files)?;
        *checked = Some(mem.clone());
        Ok(())
    }

    /// The front end's memory faulted under us (its file was truncated):
    /// what it asked for is not answered, and it is disconnected. Other
    /// front ends of the process go on.
    fn lose_front_end(&self) {
        if !self.inner.lost.swap(true, Ordering::AcqRel) {
            log::error!(
                "'{}': the front end's guest memory is no longer backed by its file (truncated?): disconnecting it",
                self.inner.dev.activation.name()
            );
        }
        // Not set yet: set_connection ends it when it is.
        if let Some(h) = lock(&self.inner.connection).as_ref() {
            h.shutdown();
        }
    }

    fn process_vring(&self, vring: &Vring, q: usize) -> io::Result<()> {
        let Some(flow) = self.inner.flows.get(q) else {
            return Ok(());
        };
        if self.inner.lost.load(Ordering::Acquire) {
            return Ok(());
        }
        // Outside the queue's lock: a GET_VRING_BASE during the wait for
        // another holder's release must not wait with it.
        let vol = self.inner.dev.activation.acquire();
        let mut flow = flow.lock().unwrap_or_else(|e| e.into_inner());
        let atomic = self
            .inner
            .mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mem: Arc<Mem> = atomic.memory().into_inner();
        // The handler installs a new table before telling us: one that
        // fails the check is refused there (update_memory) and never used.
        if self.memory_checked(&mem).is_err() {
            return Ok(());
        }
        if let Some(flag) = self.inner.synced.get(q) {
            if !flag.load(Ordering::Acquire) {
                // A restarted server (or a re-started queue) continues the
                // used ring where the guest sees it: QEMU resumes the avail
                // ring at the same index (last_avail_idx = used_idx), so
                // in-order completion lines the two up exactly.
                let used = vring.queue_used_idx().map_err(io::Error::other)?;
                vring.set_queue_next_used(used);
                flag.store(true, Ordering::Release);
            }
        }
        let vol = match vol {
            Ok(v) => v,
            Err(_) => return self.fail_all(vring, &mem),
        };
        let vol = &*vol;
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        loop {
            use virtio_queue::QueueT;
            if !vring.get_ref().get_queue().ready() {
                // Stopped (GET_VRING_BASE): take nothing more, finish what
                // was taken.
                flow.drain();
                self.publish(vring, &mem, vol, &mut flow)?;
                break;
            }
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains = take_chains(&mut vring.get_mut(), &mem)?;
            let took = !chains.is_empty();
            if took {
                self.start_chains(&mem, vol, chains, &mut flow);
            }
            if guest_fault::take_fault() {
                // Chains or data read as zeros: answer nothing more.
                self.lose_front_end();
                return Ok(());
            }
            if flow.in_flight() > 0 {
                // Having just taken requests, collect what is already done
                // (no system call if nothing is) and look for more;
                // otherwise wait for one.
                flow.reap(usize::from(!took));
            }
            self.publish(vring, &mem, vol, &mut flow)?;
            if flow.outstanding() > 0 {
                if flow.in_flight() == 0 {
                    break; // cannot happen: nothing left to wait for
                }
                continue;
            }
            if next_request_soon(vring, &mem) {
                continue;
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// The request limits, with the volume's current capacity (it may
    /// have grown since the server started).
    fn limits(&self, size_bytes: u64) -> request::Limits {
        let mut lim = self.inner.dev.config.limits();
        lim.capacity = size_bytes / SECTOR;
        lim
    }

    /// Answers every available chain with IOERR: the volume could not be
    /// activated (the reason is in the log).
    fn fail_all(&self, vring: &Vring, mem: &Mem) -> io::Result<()> {
        let lim = self.limits(self.inner.dev.activation.size_bytes());
        let chains = take_chains(&mut vring.get_mut(), mem)?;
        if chains.is_empty() {
            return Ok(());
        }
        for (head, descs) in chains {
            let mut p = Pending::new(head, request::parse(&descs, &Reader(mem), &lim));
            p.fail(Status::IoErr);
            self.inner.dev.stats.errors.fetch_add(1, Ordering::Relaxed);
            vring
                .add_used(head, p.finish(mem))
                .map_err(io::Error::other)?;
        }
        vring.signal_used_queue()
    }

    /// Starts the chains of one drain: reads and writes into the engine's
    /// queue, runs of other requests as batches once everything before
    /// them is done.
    fn start_chains(
        &self,
        mem: &Arc<Mem>,
        vol: &Volume,
        chains: Vec<(u16, Vec<Desc>)>,
        flow: &mut Flow,
    ) {
        let dev = &self.inner.dev;
        let cfg = &dev.config;
        let lim = self.limits(vol.size_bytes());
        let reader = Reader(mem);
        let n = chains.len();
        dev.stats.requests.fetch_add(n as u64, Ordering::Relaxed);
        dev.stats.max_batch.fetch_max(n as u64, Ordering::Relaxed);
        // Write-through needs a flush before each write completes: batches.
        let stream = !self.inner.write_through.load(Ordering::Relaxed);

        // What streams: a well-formed read or write whose segments all
        // translate to guest memory in place and overlap no other segment
        // of the drain where the device writes.
        let mut plans: Vec<Option<DataRequest>> = Vec::with_capacity(n);
        let mut all: Vec<SegUse> = Vec::new();
        for (i, (_, descs)) in chains.iter().enumerate() {
            let parsed = request::parse(descs, &reader, &lim);
            let data = match parsed {
                Ok(Parsed {
                    status_addr,
                    cmd: Ok(Command::Read { sector, segs }),
                }) => Some((status_addr, sector, segs, false)),
                Ok(Parsed {
                    status_addr,
                    cmd: Ok(Command::Write { sector, segs }),
                }) => Some((status_addr, sector, segs, true)),
                _ => None,
            };
            let plan = match data {
                Some((status_addr, sector, segs, write)) if stream => {
                    let host: Option<Vec<HostSeg>> = segs
                        .iter()
                        .map(|s| {
                            guest::translate(mem, *s)
                                .filter(|_| (s.len as u64).is_multiple_of(SECTOR))
                        })
                        .collect();
                    // A read-only device fails writes in the batch path.
                    let allowed = !write || !cfg.read_only;
                    match host {
                        Some(segs) if allowed && !segs.is_empty() => {
                            all.extend(segs.iter().map(|s| SegUse::new(s, !write, i)));
                            Some(DataRequest {
                                status_addr,
                                sector,
                                segs,
                                write,
                            })
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            plans.push(plan);
        }
        let mut flagged = vec![false; n];
        guest::overlapping_owners(&mut all, &mut flagged);

        let mut run: Vec<(u16, Vec<Desc>)> = Vec::new();
        for ((head, descs), (plan, flagged)) in
            chains.into_iter().zip(plans.into_iter().zip(flagged))
        {
            let streamed = match plan {
                Some(p) if !flagged => {
                    if !run.is_empty() {
                        self.run_in_order(mem, vol, std::mem::take(&mut run), flow);
                    }
                    let ok = flow.start(vol, mem, head, &p).is_ok();
                    if ok {
                        dev.stats.streamed.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                }
                _ => false,
            };
            if !streamed {
                run.push((head, descs));
            }
        }
        if !run.is_empty() {
            self.run_in_order(mem, vol, run, flow);
        }
    }

    /// Runs chains as one batch after everything taken before them.
    fn run_in_order(&self, mem: &Mem, vol: &Volume, run: Vec<(u16, Vec<Desc>)>, flow: &mut Flow) {
        flow.drain();
        let lim = self.limits(vol.size_bytes());
        let write_through = self.inner.write_through.load(Ordering::Relaxed);
        let done = batch::run(&self.inner.dev, &lim, write_through, mem, vol, &run);
        flow.finished(done);
    }

    /// Publishes the finished requests at the front of the flow, in order:
    /// persists the mappings of finished writes first (default
    /// durability), writes the status bytes, adds the used entries and
    /// signals the guest if it wants to hear.
    fn publish(&self, vring: &Vring, mem: &Mem, vol: &Volume, flow: &mut Flow) -> io::Result<()> {
        let dev = &self.inner.dev;
        let persist_failed = flow.writes_ready()
            && dev.durability == Durability::ProcessCrash
            && vol.persist().is_err();
        let mut done = Vec::new();
        flow.take_ready(persist_failed, &mut done);
        if done.is_empty() {
            return Ok(());
        }
        for d in done {
            let len = match d.finished {
                Some(len) => len,
                None => {
                    if d.status != Status::Ok {
                        dev.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    match d.status_addr {
                        Some(addr) if guest::put_status(mem, addr, d.status as u8) => {
                            d.used_data + 1
                        }
                        _ => 0,
                    }
                }
            };
            vring.add_used(d.head, len).map_err(io::Error::other)?;
        }
        if vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Pops every available chain, as (head index, descriptors).
fn take_chains(state: &mut VringState<Gm>, mem: &Mem) -> io::Result<Vec<(u16, Vec<Desc>)>> {
    use virtio_queue::QueueOwnedT;
    let queue = state.get_queue_mut();
    // Fails when the avail index is beyond what the ring can hold (a
    // broken driver): nothing can be taken safely, and the caller must not
    // spin on it.
    let iter = queue.iter(mem).map_err(io::Error::other)?;
    Ok(iter
        .map(|chain| {
            let head = chain.head_index();
            let descs = chain
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write: d.is_write_only(),
                })
                .collect();
            (head, descs)
        })
        .collect())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.inner.synced.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.inner.dev.config.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VHOST_F_LOG_ALL
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn acked_features(&self, features: u64) {
        let on = features & VHOST_F_LOG_ALL != 0;
        if self.inner.log_all.swap(on, Ordering::AcqRel) != on {
            log::info!(
                "'{}': dirty logging {}",
                self.inner.dev.activation.name(),
                if on { "on (migration)" } else { "off" }
            );
        }
    }

    fn reset_device(&self) {
        for s in &self.inner.synced {
            s.store(false, Ordering::Release);
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut cfg = self.inner.dev.config;
        cfg.writeback = !self.inner.write_through.load(Ordering::Relaxed);
        // The current size: a front end that re-reads the configuration
        // (at reconnect) sees a volume grown since the server started.
        cfg.size_bytes = self.inner.dev.activation.size_bytes();
        cfg.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the cache mode is writable (CONFIG_WCE).
        const WCE: u32 = 32;
        if offset <= WCE && (offset as u64 + buf.len() as u64) > WCE as u64 {
            let wce = buf[(WCE - offset) as usize];
            self.inner.write_through.store(wce == 0, Ordering::Relaxed);
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "only the writeback field of the configuration is writable",
            ))
        }
    }

    fn update_memory(&self, mem: Gm) -> io::Result<()> {
        let table = mem.memory().into_inner();
        if let Err(e) = self.memory_checked(&table) {
            log::warn!(
                "'{}': refusing the front end's memory table: {e}",
                self.inner.dev.activation.name()
            );
            // The handler installed it before asking: take it out before
            // any queue uses it. The error ends the connection.
            if let Ok(guard) = mem.lock() {
                guard.replace(Mem::new());
            }
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
        }
        *lock(&self.inner.mem) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.synced.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let pair =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        lock(&self.inner.exit_fds).push(pair.0.as_raw_fd());
        Some(pair)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The queue is already marked not ready; wait for the batch the
        // worker may be running: once it completes nothing is in flight.
        // The next start re-reads the used index.
        let q = queue_index as usize;
        let _idle = self
            .inner
            .flows
            .get(q)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(s) = self.inner.synced.get(q) {
            s.store(false, Ordering::Release);
        }
        drop(_idle);
        // With dirty logging on, the front end stops every queue only to
        // hand the device to a migration target: release for it. A
        // migration that fails resumes here, and the next kick opens the
        // volume again.
        let all_stopped = self.inner.synced.iter().all(|s| !s.load(Ordering::Acquire));
        if all_stopped && self.inner.log_all.load(Ordering::Acquire) {
            self.release("the front end stopped the device for a migration");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread: the thread index is the queue index.
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        let r = self.process_vring(vring, thread_id);
        if guest_fault::take_fault() {
            // What it read of the ring or the data were zeros, not the
            // guest's: the error, if any, says nothing more.
            self.lose_front_end();
        } else if let Err(e) = r {
            // Never stop the worker over one bad event; the guest sees
            // the queue stall only if the ring itself is unusable.
            log::warn!("queue {thread_id}: {e}");
        }
        Ok(())
    }
}

/// How long a queue that just answered everything looks for the guest's
/// next request before it sleeps until a kick: `THINLUN_VHOST_POLL_US`
/// microseconds, off (0) by default. At queue depth 1 a poll can catch the
/// next request without the guest's kick and this thread's wake-up, but
/// on the 2-core machines measured (BENCHMARKS.md) 20 µs made QD1 reads
/// slower (0.76-0.77x raw against 0.81-0.91x) and cost 2-5 µs more CPU
/// per request: the spinning thread competes with the front end and the
/// kernel. Bounded and only after work: an idle queue never spins.
fn poll_after_answers() -> std::time::Duration {
    static POLL: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *POLL.get_or_init(|| {
        let us = std::env::var("THINLUN_VHOST_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        std::time::Duration::from_micros(us)
    })
}

/// Whether the guest made a request available within
/// [`poll_after_answers`] (notifications stay off meanwhile, where the
/// guest honours that).
fn next_request_soon(vring: &Vring, mem: &Mem) -> bool {
    use virtio_queue::QueueT;
    let budget = poll_after_answers();
    if budget.is_zero() {
        return false;
    }
    let until = std::time::Instant::now() + budget;
    loop {
        let pending = {
            let v = vring.get_ref();
            let q = v.get_queue();
            q.ready()
                && q.avail_idx(mem, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != q.next_avail())
        };
        if pending {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        std::hint::spin_loop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_features() {
        let cfg = BlkConfig::new(1 << 20, 512, 1 << 20, 2);
        let f = cfg.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert!(f & (1 << 30) != 0);
        assert!(f & (1 << 32) != 0);
    }
}
