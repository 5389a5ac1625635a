//! The public configuration and report types of a pool: what creating
//! ([`PoolConfig`], [`SharedConfig`]) and opening ([`OpenOptions`],
//! [`HostOptions`]) take, and what `list`, `info` and `pool status` report
//! ([`VolumeInfo`], [`PoolStatus`]). Plain data; the pool code that reads
//! and fills them is in the parent module.

use crate::format::superblock::Policy;
use crate::format::DEFAULT_CHUNK_BYTES;
pub use crate::map::state::DamagedRange;
pub use crate::unflushed::UnflushedPlace;

/// Parameters of a new pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Pool size; default: the whole file or device.
    pub size_bytes: Option<u64>,
    /// Allocation chunk: a power of two from 64 KiB to 1 GiB.
    pub chunk_bytes: u64,
    /// Hosts that may share the pool (1..=100).
    pub max_hosts: u32,
    /// Journal size per host; default scales with the pool (256 KiB..8 MiB).
    pub journal_bytes: Option<u64>,
    /// Overwrite an existing pool.
    pub force: bool,
    /// Share the pool between hosts through leases on the LUN.
    pub shared: Option<SharedConfig>,
    /// Write every mapping-tree node twice, far apart (ditto nodes, the
    /// default). Off gives the single-copy trees of pools made before
    /// them: half the tree metadata, and one bad node block costs the
    /// volumes that share it.
    pub ditto_nodes: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size_bytes: None,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_hosts: 16,
            journal_bytes: None,
            force: false,
            ditto_nodes: true,
            shared: None,
        }
    }
}

/// How to open a pool.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Inspect only: no writes, no journal replay written back.
    pub read_only: bool,
    /// Who this process is on a shared pool (needed to write one; ignored
    /// by single-host pools).
    pub host: Option<HostOptions>,
    /// Identity of the machine's current boot, which decides whether
    /// journal blocks that `Volume::persist` wrote without a flush are
    /// replayed (docs/FORMAT.md, 6.6). `None`: the kernel's boot id. Tests
    /// that rebuild a LUN as a power loss leaves it pass another value,
    /// as the machine would have after rebooting.
    pub boot_id: Option<u64>,
    /// Where unflushed mapping changes are kept (and, when reopening after
    /// a crash of the process, found).
    pub unflushed: UnflushedPlace,
}

/// Identity of a host on a shared pool (docs/LOCKING.md).
#[derive(Clone, Debug, Default)]
pub struct HostOptions {
    /// 1..=the pool's host count; unique per host.
    pub host_id: u32,
    /// Recorded in the host slot for messages; default: the machine's
    /// host name.
    pub host_name: Option<String>,
    /// Have the kernel SIGKILL this process if its lease goes unrenewed
    /// past the fence time (a frozen process must never wake up and
    /// write). Servers and thinctl turn it on; tests that run several
    /// hosts in one process cannot.
    pub watchdog: bool,
    /// Where the per-host-id lock files live; default /run/thinlun (or
    /// $THINLUN_RUN_DIR).
    pub run_dir: Option<std::path::PathBuf>,
}

/// Sharing parameters of a new pool.
#[derive(Clone, Copy, Debug)]
pub struct SharedConfig {
    /// The I/O timeout every lease interval derives from (sanlock: 10 s).
    pub io_timeout_ms: u32,
    /// Allocation-group size in bytes (default 1 GiB); each host claims
    /// whole groups to allocate in.
    pub group_bytes: Option<u64>,
}

/// What a volume is, as `list` and `info` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The catalog id (pool-unique, never reused).
    pub id: u64,
    /// `vol`, or `vol@snap` for a snapshot.
    pub name: String,
    /// Virtual size.
    pub size_bytes: u64,
    /// Bytes its mapping points at (its own and shared ones).
    pub mapped_bytes: u64,
    /// Extents in its mapping.
    pub extents: u64,
    /// Writes are refused (snapshots and bases always are).
    pub read_only: bool,
    /// A snapshot (`vol@snap`).
    pub snapshot: bool,
    /// A base image that clones may share.
    pub base: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// For a snapshot: the volume it was taken of.
    pub snapshot_of: Option<String>,
    /// For a linked clone: the base or snapshot it shares data with.
    pub clone_of: Option<String>,
    /// Ranges of the volume whose mapping could not be read (empty:
    /// healthy). Reads there and all writes of the volume fail.
    pub damage: Vec<DamagedRange>,
}

/// Pool-wide figures, as `pool status` shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool's uuid as text.
    pub uuid: String,
    /// On-disk format version (2: version 1 with ditto nodes).
    pub format_version: u32,
    /// Copies of each mapping-tree node: 2 with ditto nodes.
    pub node_copies: u32,
    /// The LUN's size as the pool uses it.
    pub size_bytes: u64,
    /// Unit of first allocation.
    pub chunk_bytes: u64,
    /// The data area (whole chunks): what volumes and metadata share.
    pub data_bytes: u64,
    /// Of the data area: in use by data or metadata.
    pub data_used_bytes: u64,
    /// Of the data area: free.
    pub data_free_bytes: u64,
    /// Held by metadata (catalog, volume headers, tree nodes).
    pub metadata_used_bytes: u64,
    /// Free space kept back so a checkpoint can always finish.
    pub metadata_reserved_bytes: u64,
    /// Freed but not reusable until the next commit makes it safe.
    pub pending_free_bytes: u64,
    /// Volumes: every catalog entry that is not a snapshot (writable
    /// volumes, linked clones and base images alike).
    pub volumes: u64,
    /// Snapshots (VOL@SNAP), counted apart from the volumes.
    pub snapshots: u64,
    /// Of the volumes: read-only base images that clones may share.
    pub bases: u64,
    /// Of the volumes: linked clones (made from a snapshot or base).
    pub clones: u64,
    /// Sum of the sizes of all volumes but snapshots (overcommit =
    /// provisioned / data size).
    pub provisioned_bytes: u64,
    /// Data area in use, in percent.
    pub data_used_pct: u8,
    /// Metadata in use and reserved, in percent of what it could grow to.
    pub metadata_used_pct: u8,
    /// Warning thresholds currently crossed ("data 90%", "metadata 80%").
    pub thresholds_crossed: Vec<String>,
    /// Journal blocks a replay would read now: entries not yet folded into
    /// the trees (0 if the committer was busy when asked).
    pub journal_used_blocks: u32,
    /// Journal blocks a commit can use before a checkpoint must run.
    pub journal_capacity_blocks: u32,
    /// Host ids the pool has room for.
    pub max_hosts: u32,
    /// Warning thresholds and what happens when space runs out.
    pub policy: Policy,
    /// A shared pool's lease I/O timeout; `None` for a single-host pool.
    pub shared_io_timeout_ms: Option<u32>,
    /// The host id this process joined a shared pool as.
    pub host_id: Option<u32>,
}
