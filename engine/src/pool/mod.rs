//! A pool: the [`Pool`] handle (opening and closing a pool, its status)
//! and [`Inner`], the state an open pool shares between its handles and
//! volumes.
//!
//! The rest lives in submodules: `create` makes a new pool, `volumes`
//! manages its volumes (create, remove, rename, resize, open), `options`
//! holds the public configuration and report types ([`PoolConfig`],
//! [`OpenOptions`], [`PoolStatus`], ...), `commit` the machinery that makes mapping changes
//! durable (journal group commit) and folds them into the volume trees
//! (checkpoint), with the background committer; `snapshot` snapshots,
//! clones, rollback, flatten and usage; `guard` the space policy;
//! `shared` what a shared pool does with its leases (claims, recovery,
//! activation, lock status); `io` the I/O path (batch planning, volumes,
//! queues).
//!
//! Lock order: the global lock (shared pools), then `commit`, then
//! `state`; a pool change takes all three through `Inner::pool_change`
//! (`change`), which is where the order is written down. The data path
//! takes only `state`, briefly; nothing holds `state` while waiting for
//! `commit`.

mod change;
mod commit;
mod create;
mod guard;
pub(crate) mod io;
mod options;
pub(crate) mod shared;
pub(crate) mod snapshot;
mod volumes;

pub(crate) use commit::{plan_tree, write_nodes, TreePlan};
pub use guard::ThresholdEvent;
pub use options::{
    DamagedRange, HostOptions, OpenOptions, PoolConfig, PoolStatus, SharedConfig, UnflushedPlace,
    VolumeInfo,
};
pub(crate) use volumes::{check_overcommit, info_of, provisioned};

use crate::dev::{BlockDevice, FileDevice};
use crate::error::{Error, Result};
use crate::format::catalog;
use crate::format::{claims, BLOCK_SIZE, FORMAT_VERSION, HOST_CHECKPOINT_BLOCKS};
use crate::journal::JournalWriter;
use crate::load::{load_with_record, Loaded};
use crate::map::state::State;
use commit::{BackgroundCtl, CommitCtl};
use parking_lot::Mutex;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;

pub(crate) use crate::format::format_uuid;
pub use crate::format::SINGLE_HOST_ID;
pub(crate) use crate::map::state::damaged_ranges;
/// Number of stripe locks that serialise overlapping writes.
pub(crate) const STRIPES: usize = 256;

/// What an open pool's handles and volumes share. Its fields are the pool
/// module's own but for three that salvage (admin/salvage.rs) still
/// reaches: `state`, `commit` and `damaged` (repair's tests read `state`).
pub(crate) struct Inner {
    dev: Arc<dyn BlockDevice>,
    /// The path or name the pool was opened by, for messages.
    label: String,
    read_only: bool,
    host_id: u32,
    /// This machine's boot identity (0: unknown), written into the journal
    /// blocks of unflushed persists.
    boot: u64,
    pub(crate) state: Mutex<State>,
    pub(crate) commit: Mutex<Option<CommitCtl>>,
    commits_begun: AtomicU64,
    commits_done: AtomicU64,
    /// The last take of pending journal entries (`State::takes`) whose
    /// journal blocks (or trees) are written: a persist that finds nothing
    /// pending still waits for an earlier take to be written, since that
    /// take may hold its caller's entries.
    takes_written: AtomicU64,
    stripes: Box<[Arc<Mutex<()>>]>,
    /// Set after a metadata write failed: the on-disk state is still
    /// consistent, but this process refuses further writes.
    failed: Mutex<Option<String>>,
    bg: Arc<BackgroundCtl>,
    bg_thread: Mutex<Option<JoinHandle<()>>>,
    warnings: Vec<String>,
    /// Leases and group claims of a shared pool.
    shared: Option<crate::pool::shared::SharedCtx>,
    /// Highest data and metadata threshold last reported.
    threshold_seen: Mutex<[u8; 2]>,
    is_block_device: bool,
    /// Some volume's tree could not be fully loaded: I/O checks its
    /// volume's damage (a healthy pool skips that lock).
    pub(crate) damaged: std::sync::atomic::AtomicBool,
}

/// An open pool. Cheap to clone; the pool closes cleanly (commit and
/// checkpoint) when [`Pool::close`] is called or the last handle drops.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<Inner>,
}

impl Pool {
    /// Opens the pool on a file or block device.
    pub fn open_path(path: &Path, opts: &OpenOptions) -> Result<Pool> {
        let dev = open_device(path, opts.read_only)?;
        Pool::open(dev, &path.display().to_string(), opts)
    }

    /// Opens an existing pool: verifies and loads its metadata, replays the
    /// journal, and (unless read-only) starts the background committer.
    pub fn open(dev: Arc<dyn BlockDevice>, label: &str, opts: &OpenOptions) -> Result<Pool> {
        let sb = crate::load::read_superblock(dev.as_ref(), label, &mut Vec::new())?;
        let boot = opts.boot_id.unwrap_or_else(crate::util::boot_id);
        match (sb.shared, opts.read_only) {
            (None, ro) => {
                let host = SINGLE_HOST_ID;
                Pool::open_as(dev, label, ro, host, boot, &opts.unflushed, None, None)
            }
            // Inspecting a shared pool replays no host's journal: each is
            // its host's business.
            (Some(_), true) => {
                Pool::open_as(dev, label, true, 0, boot, &UnflushedPlace::Off, None, None)
            }
            (Some(params), false) => {
                let host = opts.host.as_ref().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{label} is shared by several hosts: give this host's id (--host-id N or THINLUN_HOST_ID) to write it"
                    ))
                })?;
                crate::pool::shared::open_shared(
                    dev,
                    label,
                    &sb,
                    params,
                    host,
                    boot,
                    &opts.unflushed,
                )
            }
        }
    }

    /// Opens the pool as host `d` to fold a dead host's journal into the
    /// trees (allocating only in the groups `claims` gives it), for
    /// [`Pool::close`] right after.
    ///
    /// The recovering host is on boot `boot`: the dead host's unflushed
    /// persists are replayed only if it ran on that same boot (a crashed
    /// process on this machine), never after another machine died.
    pub(crate) fn open_for_recovery(
        dev: Arc<dyn BlockDevice>,
        label: &str,
        d: u32,
        claims: &[claims::Claim],
        boot: u64,
    ) -> Result<Pool> {
        // A dead host that ran on this machine (a process that died) left
        // its unflushed record here: recovery completes it, as that host's
        // next start would, and removes it when it closes.
        let place = &UnflushedPlace::RunDir;
        let pool = Pool::open_as(dev, label, false, d, boot, place, None, Some(claims))?;
        // A record the dead host left on another machine must never be
        // replayed after this: it would undo what the volumes' next writers
        // do. A record is current under one or two checkpoint generations;
        // skipping one makes it stale.
        if let Some(ctl) = pool.inner.commit.lock().as_mut() {
            ctl.host_ckpt.generation += 1;
        }
        Ok(pool)
    }

    /// Opens the pool as `host_id` (0 = replay no journal) on the boot
    /// `boot` ([`OpenOptions::boot_id`]). `restrict` narrows allocation to
    /// the groups that host claimed; `shared` makes it a member of a shared
    /// pool (its background thread is started by the caller then, after
    /// joining).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open_as(
        dev: Arc<dyn BlockDevice>,
        label: &str,
        read_only: bool,
        host_id: u32,
        boot: u64,
        unflushed: &UnflushedPlace,
        shared: Option<crate::pool::shared::SharedCtx>,
        restrict: Option<&[claims::Claim]>,
    ) -> Result<Pool> {
        let is_block_device = std::fs::metadata(label).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        });
        let uuid = crate::load::read_superblock(dev.as_ref(), label, &mut Vec::new())?.uuid;
        let owner = crate::unflushed::Owner {
            uuid,
            host_id,
            boot,
        };
        let memory = crate::unflushed::memory(unflushed, owner, read_only);
        let Loaded {
            state,
            host_ckpt,
            tail,
            next_seq,
            prev_crc,
            unsealed,
            warnings,
            from_record,
            record_epoch,
            bad_node_copies,
            ..
        } = load_with_record(dev.as_ref(), label, host_id, boot, memory.as_deref())?;
        let mut state = state;
        if let (Some(mem), false) = (memory, read_only) {
            let key = crate::unflushed::RecordKey::at(next_seq, host_ckpt.generation);
            state.unflushed = crate::unflushed::UnflushedRecord::start(
                mem,
                owner,
                record_epoch,
                key,
                &state.pending,
            );
        }
        let layout = state.sb.layout;
        let group_free =
            restrict.map(|c| crate::pool::shared::restrict_to_claims(&mut state, c, host_id));
        if let (Some(sh), Some(g)) = (&shared, group_free) {
            sh.set_group_free(g);
        }
        let journal = JournalWriter::new(
            layout.host_region(host_id.max(1)),
            layout.journal_blocks,
            &host_ckpt,
            tail,
            next_seq,
            prev_crc,
            unsealed,
        );
        let background = shared.is_none() && restrict.is_none();
        let damaged = state.is_damaged();
        let inner = Arc::new(Inner {
            dev,
            label: label.to_string(),
            read_only,
            host_id,
            boot,
            state: Mutex::new(state),
            commit: Mutex::new(Some(CommitCtl { journal, host_ckpt })),
            commits_begun: AtomicU64::new(0),
            commits_done: AtomicU64::new(0),
            takes_written: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Arc::new(Mutex::new(()))).collect(),
            failed: Mutex::new(None),
            bg: Arc::new(BackgroundCtl::default()),
            bg_thread: Mutex::new(None),
            warnings,
            shared,
            threshold_seen: Mutex::new([0, 0]),
            is_block_device,
            damaged: std::sync::atomic::AtomicBool::new(damaged),
        });
        let pool = Pool { inner };
        if !read_only {
            if !pool.inner.warnings.is_empty() {
                pool.inner.rewrite_redundant_copies(&bad_node_copies)?;
            }
            if from_record > 0 {
                log::info!(
                    "{label}: {from_record} mapping changes of writes completed before the last process ended replayed from its unflushed record"
                );
                pool.inner.flush()?;
            }
            if background {
                pool.start_background()?;
            }
        }
        Ok(pool)
    }

    /// Problems found while opening that did not prevent it (a damaged copy
    /// of a record whose twin was good).
    pub fn warnings(&self) -> &[String] {
        &self.inner.warnings
    }

    /// Where this host's unflushed record is kept when opened with
    /// [`UnflushedPlace::RunDir`] (the default); `None` for a reader.
    pub fn unflushed_record_path(&self) -> Option<std::path::PathBuf> {
        let uuid = self.inner.state.lock().sb.uuid;
        (!self.inner.read_only && self.inner.host_id != 0)
            .then(|| crate::unflushed::path_in_run_dir(&uuid, self.inner.host_id))
    }

    /// The path or name the pool was opened by.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Whether the pool was opened read-only (nothing in it can change).
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Whether several hosts share the pool (volumes are activated
    /// through leases on the LUN).
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// Makes every write completed before this call durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Commits and folds the journal into the volume trees.
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.writable()?;
        let mut ctl = self.inner.commit.lock();
        let ctl = ctl.as_mut().ok_or(Error::PoolReadOnly)?;
        self.inner.commit_locked(ctl)?;
        self.inner.checkpoint_locked(ctl)
    }

    /// Commits, checkpoints and stops the background committer. After a
    /// clean close the journal is empty.
    pub fn close(self) -> Result<()> {
        self.inner.shutdown()
    }

    /// Pool-wide figures (`thinctl pool status`).
    pub fn status(&self) -> PoolStatus {
        let st = self.inner.state.lock();
        let l = st.sb.layout;
        let data_blocks = st.space.total_blocks();
        let free = st.space.free_blocks();
        let (jused, jcap) = self
            .inner
            .commit
            .try_lock()
            .and_then(|c| {
                c.as_ref()
                    .map(|c| (c.journal.used_blocks(), c.journal.capacity()))
            })
            .unwrap_or((0, l.journal_blocks - HOST_CHECKPOINT_BLOCKS - 1));
        let b = BLOCK_SIZE as u64;
        let count = |mask: u32, want: u32| {
            st.volumes
                .values()
                .filter(|v| v.rec.flags & mask == want)
                .count() as u64
        };
        use catalog::flags::{BASE, SNAPSHOT};
        PoolStatus {
            uuid: format_uuid(&st.sb.uuid),
            // Version 2 is version 1 plus ditto nodes (docs/FORMAT.md).
            format_version: if st.sb.ditto_nodes { 2 } else { FORMAT_VERSION },
            node_copies: st.node_copies() as u32,
            size_bytes: l.pool_blocks * b,
            chunk_bytes: l.chunk_blocks as u64 * b,
            data_bytes: data_blocks * b,
            data_used_bytes: (data_blocks - free) * b,
            data_free_bytes: free * b,
            metadata_used_bytes: st.metadata_blocks() * b,
            metadata_reserved_bytes: st.metadata_reserve() * b,
            pending_free_bytes: st.pending_free_blocks() * b,
            volumes: count(SNAPSHOT, 0),
            snapshots: count(SNAPSHOT, SNAPSHOT),
            bases: count(BASE, BASE),
            clones: st
                .volumes
                .values()
                .filter(|v| v.rec.origin_id != 0 && v.rec.flags & SNAPSHOT == 0)
                .count() as u64,
            provisioned_bytes: provisioned(&st),
            data_used_pct: crate::pool::guard::data_used_pct(&st),
            metadata_used_pct: crate::pool::guard::meta_used_pct(&st),
            thresholds_crossed: crate::pool::guard::crossed_names(&st),
            journal_used_blocks: jused,
            journal_capacity_blocks: jcap,
            max_hosts: l.max_hosts,
            policy: st.sb.policy,
            shared_io_timeout_ms: st.sb.shared.map(|s| s.io_timeout_ms),
            host_id: self.inner.shared.as_ref().map(|_| self.inner.host_id),
        }
    }

    /// Verifies the live state: rebuilding the space map from every
    /// reference must give exactly the blocks in use (minus frees not yet
    /// reusable). Returns the problems found.
    pub fn verify_space(&self) -> Vec<String> {
        let st = self.inner.state.lock();
        let mut fresh = crate::alloc::space::SpaceMap::new(&st.sb.layout);
        let mut refs = crate::alloc::refs::SharedRefs::default();
        let mut problems = Vec::new();
        let mut already = Vec::new();
        for leaf in st.distinct_leaves() {
            for (p, n) in leaf.data_runs() {
                already.clear();
                fresh.mark_or_share(p, n, &mut already);
                for &(sp, sn) in &already {
                    refs.add(sp, sn);
                }
            }
        }
        for b in st.metadata_block_set() {
            if fresh.mark_used(b, 1).is_err() {
                problems.push(format!("metadata block {b} is also mapped as data"));
            }
        }
        // Damaged volumes hold blocks no map names (FORMAT.md 5.1).
        let mut held = Vec::new();
        for &(p, n) in &st.quarantine {
            fresh.mark_or_share(p, n, &mut held);
        }
        fresh.withhold(st.space.withheld());
        let live_used = st.space.total_blocks() - st.space.free_blocks();
        let referenced = fresh.total_blocks() - fresh.free_blocks();
        let pending = st.pending_free_blocks();
        if live_used != referenced + pending {
            problems.push(format!(
                "space accounting: {live_used} blocks in use, {referenced} referenced + {pending} awaiting reuse"
            ));
        }
        if !st.is_damaged() && refs.shared_blocks() != st.refs.shared_blocks() {
            problems.push(format!(
                "reference counts: {} blocks counted as shared, {} found shared",
                st.refs.shared_blocks(),
                refs.shared_blocks()
            ));
        }
        problems
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last handle gone without close(): still leave a clean pool.
        let _ = self.shutdown();
    }
}

fn open_device(path: &Path, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
    let label = path.display().to_string();
    let dev = FileDevice::open(path, !read_only).map_err(|e| Error::io(&label, e))?;
    // A shared pool is guarded by its leases, not by a local flock.
    let shared = crate::load::read_superblock(&dev, &label, &mut Vec::new())
        .is_ok_and(|sb| sb.shared.is_some());
    if !read_only && !shared {
        dev.lock_exclusive().map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::busy(
                    crate::BusyKind::PoolOpenElsewhere,
                    format!("{label} is open for writing by another thinlun process"),
                )
            } else {
                Error::io(&label, e)
            }
        })?;
    }
    Ok(Arc::new(dev))
}
