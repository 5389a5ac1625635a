//! A pool: the [`Pool`] handle and its public API (creating, opening and
//! closing a pool, its status, and managing its volumes), and [`Inner`],
//! the state an open pool shares between its handles and volumes.
//!
//! The rest lives in submodules: `options` holds the public
//! configuration and report types ([`PoolConfig`], [`OpenOptions`],
//! [`PoolStatus`], ...), `commit` the machinery that makes mapping changes
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
mod guard;
pub(crate) mod io;
mod options;
pub(crate) mod shared;
pub(crate) mod snapshot;

pub(crate) use commit::{plan_tree, write_nodes, TreePlan};
pub use guard::ThresholdEvent;
pub use options::{
    DamagedRange, HostOptions, OpenOptions, PoolConfig, PoolStatus, SharedConfig, UnflushedPlace,
    VolumeInfo,
};

use crate::alloc::space::Cursor;
use crate::dev::{write_blocks, BlockDevice, FileDevice};
use crate::error::{Error, Result};
use crate::format::catalog::{self, encode_volume_header, VolumeHeader, VolumeRecord};
use crate::format::journal::{encode_host_checkpoint, Entry, HostCheckpoint};
use crate::format::names::is_valid_volume_name;
use crate::format::node::NodeAddr;
use crate::format::superblock::{has_magic, Policy, Superblock};
use crate::format::{
    claims, Layout, BLOCK_SIZE, FORMAT_VERSION, HOST_CHECKPOINT_BLOCKS, MAX_BLOCKS,
    MAX_CHUNK_BYTES, MAX_HOSTS, MAX_VOLUME_BYTES, MIN_CHUNK_BYTES, MIN_JOURNAL_BLOCKS,
    SUPERBLOCK_A, SUPERBLOCK_B,
};
use crate::journal::JournalWriter;
use crate::load::{load_with_record, Loaded};
use crate::map::state::{State, Vol};
use crate::util::{journal_seed, now_unix, random_uuid};
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

pub(crate) struct Inner {
    pub dev: Arc<dyn BlockDevice>,
    /// The path or name the pool was opened by, for messages.
    pub label: String,
    pub read_only: bool,
    pub host_id: u32,
    /// This machine's boot identity (0: unknown), written into the journal
    /// blocks of unflushed persists.
    pub boot: u64,
    pub state: Mutex<State>,
    pub commit: Mutex<Option<CommitCtl>>,
    commits_begun: AtomicU64,
    commits_done: AtomicU64,
    /// The last take of pending journal entries (`State::takes`) whose
    /// journal blocks (or trees) are written: a persist that finds nothing
    /// pending still waits for an earlier take to be written, since that
    /// take may hold its caller's entries.
    pub(crate) takes_written: AtomicU64,
    pub stripes: Box<[Arc<Mutex<()>>]>,
    /// Set after a metadata write failed: the on-disk state is still
    /// consistent, but this process refuses further writes.
    failed: Mutex<Option<String>>,
    bg: Arc<BackgroundCtl>,
    bg_thread: Mutex<Option<JoinHandle<()>>>,
    pub warnings: Vec<String>,
    /// Leases and group claims of a shared pool.
    pub shared: Option<crate::pool::shared::SharedCtx>,
    /// Highest data and metadata threshold last reported.
    pub threshold_seen: Mutex<[u8; 2]>,
    pub is_block_device: bool,
    /// Some volume's tree could not be fully loaded: I/O checks its
    /// volume's damage (a healthy pool skips that lock).
    pub damaged: std::sync::atomic::AtomicBool,
}

/// An open pool. Cheap to clone; the pool closes cleanly (commit and
/// checkpoint) when [`Pool::close`] is called or the last handle drops.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<Inner>,
}

fn default_journal_blocks(pool_blocks: u64, max_hosts: u32) -> u32 {
    let per_host = pool_blocks / 512 / max_hosts as u64;
    per_host.clamp(MIN_JOURNAL_BLOCKS as u64, 2048) as u32
}

impl Pool {
    /// Creates a pool on a file (made sparse if missing) or block device.
    pub fn create_path(path: &Path, cfg: &PoolConfig) -> Result<Pool> {
        let label = path.display().to_string();
        let created = !path.exists();
        let result = Pool::create_new_file(path, &label, cfg);
        if result.is_err() && created {
            // Leave nothing behind from a failed create.
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn create_new_file(path: &Path, label: &str, cfg: &PoolConfig) -> Result<Pool> {
        if !path.exists() {
            let size = cfg.size_bytes.ok_or_else(|| {
                Error::InvalidArgument(format!("{label} does not exist; give a size to create it"))
            })?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| Error::io(label, e))?;
            f.set_len(size).map_err(|e| Error::io(label, e))?;
        } else if let Some(size) = cfg.size_bytes {
            let meta = std::fs::metadata(path).map_err(|e| Error::io(label, e))?;
            if meta.is_file() && meta.len() < size {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(label, e))?;
                f.set_len(size).map_err(|e| Error::io(label, e))?;
            }
        }
        let dev = open_device(path, false)?;
        Pool::create(dev, label, cfg)
    }

    /// Opens the pool on a file or block device.
    pub fn open_path(path: &Path, opts: &OpenOptions) -> Result<Pool> {
        let dev = open_device(path, opts.read_only)?;
        Pool::open(dev, &path.display().to_string(), opts)
    }

    /// Writes a new, empty pool onto `dev` and opens it.
    pub fn create(dev: Arc<dyn BlockDevice>, label: &str, cfg: &PoolConfig) -> Result<Pool> {
        let dev_bytes = dev.size_bytes().map_err(|e| Error::io(label, e))?;
        let size = cfg.size_bytes.unwrap_or(dev_bytes);
        if size > dev_bytes {
            return Err(Error::InvalidArgument(format!(
                "pool size {size} is larger than {label} ({dev_bytes} bytes)"
            )));
        }
        let chunk = cfg.chunk_bytes;
        if !chunk.is_power_of_two() || !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk) {
            return Err(Error::InvalidArgument(format!(
                "chunk size {chunk} must be a power of two from 64K to 1G"
            )));
        }
        if cfg.max_hosts == 0 || cfg.max_hosts > MAX_HOSTS {
            return Err(Error::InvalidArgument(format!(
                "host count must be 1..={MAX_HOSTS}"
            )));
        }
        let pool_blocks = size / BLOCK_SIZE as u64;
        if pool_blocks >= MAX_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "pool size {size} exceeds the format's 1 EiB limit"
            )));
        }
        let journal_blocks = match cfg.journal_bytes {
            Some(j) => {
                let b = j / BLOCK_SIZE as u64;
                if b < MIN_JOURNAL_BLOCKS as u64 || b > u32::MAX as u64 {
                    return Err(Error::InvalidArgument(format!(
                        "journal size must be at least {} KiB",
                        MIN_JOURNAL_BLOCKS as usize * BLOCK_SIZE / 1024
                    )));
                }
                b as u32
            }
            None => default_journal_blocks(pool_blocks, cfg.max_hosts),
        };
        let max_pool_blocks = (pool_blocks.saturating_mul(64))
            .max((64u64 << 40) / BLOCK_SIZE as u64)
            .min(MAX_BLOCKS - 1);
        let chunk_blocks = (chunk / BLOCK_SIZE as u64) as u32;
        let ag_blocks = match cfg.shared.and_then(|s| s.group_bytes) {
            Some(g) => {
                let b = g / BLOCK_SIZE as u64;
                if !b.is_power_of_two() || b < chunk_blocks as u64 || b > u32::MAX as u64 {
                    return Err(Error::InvalidArgument(format!(
                        "allocation-group size {g} must be a power of two of at least one chunk"
                    )));
                }
                b as u32
            }
            None => crate::format::AG_BLOCKS.max(chunk_blocks),
        };
        // Small groups bound how far the pool may grow (the claim table is
        // sized at creation).
        let max_pool_blocks = if ag_blocks < crate::format::AG_BLOCKS {
            max_pool_blocks.min(crate::format::MAX_AGS * ag_blocks as u64)
        } else {
            max_pool_blocks
        };
        if let Some(s) = cfg.shared {
            if s.io_timeout_ms == 0 {
                return Err(Error::InvalidArgument(
                    "the I/O timeout must be positive".into(),
                ));
            }
        }
        let layout = Layout::compute_with_groups(
            pool_blocks,
            max_pool_blocks,
            chunk_blocks,
            ag_blocks,
            cfg.max_hosts,
            journal_blocks,
        );
        if layout.data_chunks() < 4 {
            let need = (layout.data_start + 4 * chunk_blocks as u64) * BLOCK_SIZE as u64;
            return Err(Error::InvalidArgument(format!(
                "pool too small: with these settings it needs at least {} MiB",
                need.div_ceil(1 << 20)
            )));
        }
        if !cfg.force {
            for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
                let b =
                    crate::dev::read_block(dev.as_ref(), at).map_err(|e| Error::io(label, e))?;
                if has_magic(&b) {
                    return Err(Error::busy(
                        crate::BusyKind::NeedsForce,
                        format!(
                            "{label} already holds a thinlun pool; use --force to overwrite it"
                        ),
                    ));
                }
            }
        }
        let uuid = random_uuid();
        let now = now_unix();
        let sb = Superblock {
            generation: 1,
            layout,
            uuid,
            catalog_root: 0,
            next_volume_id: 1,
            created_unix: now,
            commit_unix: now,
            policy: Policy::default(),
            shared: cfg.shared.map(|s| crate::format::superblock::SharedParams {
                io_timeout_ms: s.io_timeout_ms,
            }),
            ditto_nodes: cfg.ditto_nodes,
        };
        // Reserved regions start zeroed; claim table and host checkpoints
        // start valid and empty.
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for b in layout.host_slot_start..layout.ag_table_start {
            blocks.push((b, vec![0u8; BLOCK_SIZE]));
        }
        let empty_claims = vec![claims::Claim::default(); claims::CLAIMS_PER_BLOCK];
        for i in 0..layout.ag_table_blocks {
            let at = layout.ag_table_start + i;
            blocks.push((at, claims::encode(&empty_claims, 1, at)));
        }
        for host in 1..=cfg.max_hosts {
            let region = layout.host_region(host);
            for k in 0..HOST_CHECKPOINT_BLOCKS as u64 {
                let ck = HostCheckpoint {
                    generation: 1,
                    head: 0,
                    seq: 1,
                    prev_crc: journal_seed(&uuid, host),
                };
                blocks.push((region + k, encode_host_checkpoint(&ck, region + k)));
            }
        }
        let io = |e| Error::io(format!("{label}: writing new pool"), e);
        for batch in blocks.chunks(1024) {
            write_blocks(dev.as_ref(), batch).map_err(io)?;
        }
        dev.flush().map_err(io)?;
        // Superblock last: until it is durable the LUN is not a pool.
        for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
            write_blocks(dev.as_ref(), &[(at, sb.encode(at))]).map_err(io)?;
            dev.flush().map_err(io)?;
        }
        // A shared pool needs a host identity to be written; the creator
        // gets a read-only handle.
        let opts = OpenOptions {
            read_only: sb.shared.is_some(),
            ..OpenOptions::default()
        };
        Pool::open(dev, label, &opts)
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

    /// Every volume, snapshot and base, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock();
        let mut v: Vec<VolumeInfo> = st.volumes.values().map(|x| info_of(&st, x)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One volume, snapshot or base by name.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let st = self.inner.state.lock();
        st.volume_by_name(name)
            .map(|v| info_of(&st, v))
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    /// Creates a thin volume of `size_bytes` (a multiple of 4 KiB); no
    /// space is allocated until it is written.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size_bytes, false)
    }

    /// Like [`Pool::create_volume`]; `allow_overcommit` ignores the pool's
    /// overcommit limit.
    pub fn create_volume_with(
        &self,
        name: &str,
        size_bytes: u64,
        allow_overcommit: bool,
    ) -> Result<VolumeInfo> {
        check_size(size_bytes)?;
        if !is_valid_volume_name(name) {
            return Err(Error::InvalidName(name.to_string()));
        }
        self.inner.writable()?;
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        if st.id_by_name(name).is_some() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        check_overcommit(&st, size_bytes, allow_overcommit)?;
        let id = st.sb.next_volume_id;
        let [a, b] = st.alloc_header_pair()?;
        let header = VolumeHeader {
            volume_id: id,
            generation: 1,
            root: NodeAddr::NONE,
            depth: 0,
            mapped_blocks: 0,
            extent_count: 0,
            journal_seq: 0,
            journal_host: inner.host_id,
        };
        let rec = VolumeRecord {
            id,
            flags: 0,
            name: name.to_string(),
            size_bytes,
            header_blocks: [a, b],
            parent_id: 0,
            origin_id: 0,
            created_unix: now_unix(),
            active_host: 0,
            active_gen: 0,
        };
        let r = write_blocks(
            inner.dev.as_ref(),
            &[
                (a, encode_volume_header(&header, a)),
                (b, encode_volume_header(&header, b)),
            ],
        )
        .map_err(|e| Error::io("writing volume header", e));
        if let Err(e) = r {
            st.space.release(a, 1);
            st.space.release(b, 1);
            return Err(e);
        }
        st.sb.next_volume_id += 1;
        st.volumes.insert(
            id,
            Vol {
                rec,
                map: crate::map::extmap::ExtentMap::new(),
                header,
                cursor: Cursor::default(),
                handles: 0,
                damage: Vec::new(),
            },
        );
        if let Err(e) = inner.write_catalog(&mut st) {
            st.volumes.remove(&id);
            return Err(e);
        }
        Ok(info_of(&st, &st.volumes[&id]))
    }

    /// Removes a volume or snapshot (`vol@snap`); its space returns to the
    /// pool. A volume with snapshots needs `recursive`; one that clones
    /// depend on cannot be removed until they are removed or flattened.
    pub fn remove_volume(&self, name: &str, recursive: bool) -> Result<()> {
        self.inner.writable()?;
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        let id = st
            .id_by_name(name)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        let ids = crate::pool::snapshot::check_removable(&st, id, recursive)?;
        for &i in &ids {
            inner.check_not_active_elsewhere(&st, i)?;
            st.refuse_family_damaged(i, "removal of")?;
        }
        let removed: Vec<Vol> = ids.iter().filter_map(|id| st.volumes.remove(id)).collect();
        if let Err(e) = inner.write_catalog(&mut st) {
            for v in removed {
                st.volumes.insert(v.rec.id, v);
            }
            return Err(e);
        }
        // The catalog no longer names them and nothing has them open: what
        // only they held is free at once.
        for v in removed {
            let header_blocks = v.rec.header_blocks;
            crate::pool::snapshot::release_map(&mut st, v.map);
            for b in header_blocks {
                st.space.release(b, 1);
            }
        }
        Ok(())
    }

    /// Renames a volume, or a snapshot within its volume (`vol@a` to
    /// `vol@b`, or just `b`).
    pub fn rename_volume(&self, old: &str, new: &str) -> Result<()> {
        let (new_full, new_name) = match old.split_once('@') {
            None => (new.to_string(), new),
            Some((vol, _)) => {
                let snap = match new.split_once('@') {
                    None => new,
                    Some((v, s)) if v == vol => s,
                    Some(_) => {
                        return Err(Error::InvalidArgument(format!(
                            "a snapshot stays with its volume: rename '{old}' to '{vol}@NEW'"
                        )))
                    }
                };
                (format!("{vol}@{snap}"), snap)
            }
        };
        if !is_valid_volume_name(new_name) {
            return Err(Error::InvalidName(new.to_string()));
        }
        self.inner.writable()?;
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        let id = st
            .id_by_name(old)
            .ok_or_else(|| Error::NoSuchVolume(old.to_string()))?;
        if old == new_full {
            return Ok(());
        }
        if st.id_by_name(&new_full).is_some() {
            return Err(Error::VolumeExists(new_full));
        }
        let Some(v) = st.volumes.get_mut(&id) else {
            return Err(Error::NoSuchVolume(old.to_string()));
        };
        let old_name = std::mem::replace(&mut v.rec.name, new_name.to_string());
        if let Err(e) = inner.write_catalog(&mut st) {
            if let Some(v) = st.volumes.get_mut(&id) {
                v.rec.name = old_name;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Virtual byte ranges (offset, length) of a volume that hold data, in
    /// order (for exports that skip what was never written).
    pub fn mapped_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let st = self.inner.state.lock();
        let v = st
            .volume_by_name(name)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        let bs = BLOCK_SIZE as u64;
        let mut out: Vec<(u64, u64)> = Vec::new();
        v.map.for_each(|e| {
            if e.is_zero() {
                return;
            }
            let (off, len) = (e.vblock * bs, e.len as u64 * bs);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
        });
        // A damaged range counts as mapped, so a reader of "what holds
        // data" reads it and gets the error instead of taking it as zeros.
        if !v.damage.is_empty() {
            for d in damaged_ranges(v) {
                let (b0, b1) = d.bytes();
                if b1 > b0 {
                    out.push((b0, b1 - b0));
                }
            }
            out.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (o, l) in out {
                match merged.last_mut() {
                    Some((mo, ml)) if o <= *mo + *ml => *ml = (*ml).max(o + l - *mo),
                    _ => merged.push((o, l)),
                }
            }
            out = merged;
        }
        Ok(out)
    }

    /// Changes a volume's size. Shrinking drops the data past the new end
    /// and is refused unless `allow_shrink`.
    pub fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<VolumeInfo> {
        check_size(size_bytes)?;
        self.inner.writable()?;
        let inner = &self.inner;
        let _g = inner.global()?;
        let mut ctl_guard = inner.commit.lock();
        let ctl = ctl_guard.as_mut().ok_or(Error::PoolReadOnly)?;
        let (id, old_size) = {
            let st = inner.state.lock();
            let v = st
                .volume_by_name(name)
                .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
            inner.check_not_active_elsewhere(&st, v.rec.id)?;
            if v.rec.flags & catalog::flags::READ_ONLY != 0 {
                return Err(Error::ReadOnly(name.to_string()));
            }
            st.refuse_damaged(v.rec.id, "resize")?;
            (v.rec.id, v.rec.size_bytes)
        };
        if size_bytes > old_size {
            let st = inner.state.lock();
            check_overcommit(&st, size_bytes - old_size, allow_shrink)?;
        }
        if size_bytes < old_size {
            if !allow_shrink {
                return Err(Error::InvalidArgument(format!(
                    "shrinking '{name}' from {} to {} discards the data past the new end; use --force",
                    crate::util::human_bytes(old_size),
                    crate::util::human_bytes(size_bytes)
                )));
            }
            {
                let mut st = inner.state.lock();
                let st = &mut *st;
                let vol = st
                    .volumes
                    .get_mut(&id)
                    .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
                let from = size_bytes / BLOCK_SIZE as u64;
                let len = old_size / BLOCK_SIZE as u64 - from;
                let mut ch = crate::map::extmap::RefChanges::default();
                vol.map.unmap(from, len, &mut ch);
                vol.rec.size_bytes = size_bytes;
                let mut at = from;
                while at < from + len {
                    let n = (from + len - at).min(u32::MAX as u64);
                    st.queue_entries(&[Entry::Unmap {
                        volume: id,
                        vblock: at,
                        len: n as u32,
                    }]);
                    at += n;
                }
                st.apply_changes(&ch);
            }
            // The unmap is durable before the catalog names the new size.
            inner.commit_locked(ctl)?;
        }
        let mut st = inner.state.lock();
        let vol = st
            .volumes
            .get_mut(&id)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        vol.rec.size_bytes = size_bytes;
        if let Err(e) = inner.write_catalog(&mut st) {
            if size_bytes > old_size {
                if let Some(v) = st.volumes.get_mut(&id) {
                    v.rec.size_bytes = old_size;
                }
            }
            return Err(e);
        }
        Ok(info_of(&st, &st.volumes[&id]))
    }

    /// Opens a volume for I/O.
    ///
    /// On a shared pool a writable volume is activated exclusively for
    /// this host first (as `lvchange -aey`); it is released when its last
    /// handle closes. Snapshots and base images need no activation.
    ///
    /// On a shared pool, a volume held by a host that has stopped renewing
    /// its lease is waited for, as sanlock's acquire waits: once that
    /// host's slot has stayed unchanged for the dead time (counted from
    /// this process's own first read), the host is recovered and the
    /// volume taken. A holder seen renewing meanwhile is refused, at its
    /// next renewal (within 2 x io_timeout). See
    /// [`Pool::set_wait_for_dead_holders`].
    pub fn open_volume(&self, name: &str) -> Result<crate::Volume> {
        let mut wait = crate::pool::shared::HolderWait::default();
        loop {
            match self.open_volume_once(name) {
                Err(e @ Error::Busy { .. }) => {
                    if !self.inner.wait_for_holder(name, &mut wait)? {
                        return Err(e);
                    }
                }
                r => return r,
            }
        }
    }

    /// Opens a volume without waiting: Busy at once while another host
    /// holds it, silent or not (a migration target polls this while the
    /// source releases).
    pub fn try_open_volume(&self, name: &str) -> Result<crate::Volume> {
        self.open_volume_once(name)
    }

    fn open_volume_once(&self, name: &str) -> Result<crate::Volume> {
        // The handle is counted under the same lock that sees the
        // activation, so a release (which needs zero handles) cannot slip
        // in between.
        for _ in 0..3 {
            let mut st = self.inner.state.lock();
            let id = st.id_by_name(name);
            if let Some(v) = id.and_then(|id| st.volumes.get_mut(&id)) {
                if self.inner.holds_activation(v) {
                    v.handles += 1;
                    let id = v.rec.id;
                    return Ok(crate::Volume::new(self.inner.clone(), id, name));
                }
            }
            drop(st);
            if self.inner.shared.is_none() {
                return Err(Error::NoSuchVolume(name.to_string()));
            }
            // Under the global lock, with a view brought up to date (the
            // volume may be another host's creation).
            self.inner.activate(name)?;
        }
        Err(Error::busy(
            crate::BusyKind::Retry,
            format!("volume '{name}' keeps being released while this host activates it; try again"),
        ))
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

/// Sum of the sizes of all volumes but snapshots.
pub(crate) fn provisioned(st: &State) -> u64 {
    st.volumes
        .values()
        .filter(|v| v.rec.flags & catalog::flags::SNAPSHOT == 0)
        .map(|v| v.rec.size_bytes)
        .sum()
}

/// Refuses to provision `extra` more bytes past the pool's overcommit limit.
pub(crate) fn check_overcommit(st: &State, extra: u64, force: bool) -> Result<()> {
    let limit = st.sb.policy.max_overcommit_pct as u128;
    if limit == 0 || force {
        return Ok(());
    }
    let data = st.space.total_blocks() as u128 * BLOCK_SIZE as u128;
    let after = provisioned(st) as u128 + extra as u128;
    if after * 100 > data * limit {
        return Err(Error::InvalidArgument(format!(
            "this would provision {} on {} of data space ({:.2}x), past the pool's overcommit limit of {:.2}x; use --force",
            crate::util::human_bytes(u64::try_from(after).unwrap_or(u64::MAX)),
            crate::util::human_bytes(u64::try_from(data).unwrap_or(u64::MAX)),
            after as f64 / data.max(1) as f64,
            limit as f64 / 100.0
        )));
    }
    Ok(())
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::InvalidArgument(
            "volume size must be greater than zero".into(),
        ));
    }
    if !size.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(Error::InvalidArgument(format!(
            "volume size {size} bytes is not a multiple of 4 KiB"
        )));
    }
    if size > MAX_VOLUME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "volume size {} exceeds the format's 1 EiB limit",
            crate::util::human_bytes(size)
        )));
    }
    Ok(())
}

pub(crate) fn info_of(st: &State, v: &Vol) -> VolumeInfo {
    let name_of = |id: u64| st.volumes.get(&id).map(|p| st.display_name(p));
    VolumeInfo {
        id: v.rec.id,
        name: st.display_name(v),
        size_bytes: v.rec.size_bytes,
        mapped_bytes: v.map.mapped_blocks() * BLOCK_SIZE as u64,
        extents: v.map.extent_count(),
        read_only: v.rec.flags & catalog::flags::READ_ONLY != 0,
        snapshot: v.rec.flags & catalog::flags::SNAPSHOT != 0,
        base: v.rec.flags & catalog::flags::BASE != 0,
        created_unix: v.rec.created_unix,
        snapshot_of: if v.rec.flags & catalog::flags::SNAPSHOT != 0 {
            name_of(v.rec.parent_id)
        } else {
            None
        },
        clone_of: if v.rec.origin_id != 0 {
            name_of(v.rec.origin_id)
        } else {
            None
        },
        damage: damaged_ranges(v),
    }
}
