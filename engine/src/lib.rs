//! thinlun: a thin-provisioned, copy-on-write block storage engine on a raw
//! LUN (a block device or a file).
//!
//! A pool holds thin volumes; space is allocated in chunks on first write
//! and tracked per 4 KiB block. Writes are durable once [`Volume::flush`]
//! (or [`Pool::flush`]) returns, like a disk with a volatile write cache.
//!
//! ```no_run
//! use thinlun::{Pool, PoolConfig};
//! # fn main() -> thinlun::Result<()> {
//! let cfg = PoolConfig { size_bytes: Some(1 << 30), ..PoolConfig::default() };
//! let pool = Pool::create_path("pool.img".as_ref(), &cfg)?;
//! pool.create_volume("vm-100-disk-0", 8 << 30)?;
//! let vol = pool.open_volume("vm-100-disk-0")?;
//! vol.write(0, &[0xab; 4096])?; // sector 0, one 4 KiB block
//! vol.flush()?;
//! let mut buf = vec![0u8; 4096];
//! vol.read(0, &mut buf)?;
//! assert_eq!(buf, vec![0xab; 4096]);
//! drop(vol);
//! pool.close()?;
//! # Ok(()) }
//! ```
//!
//! Snapshots (`vol@snap`), base images and linked clones share data until
//! one of them writes; each costs O(1) to create, and a 4 KiB write into
//! shared data copies 4 KiB, never a whole chunk. The example runs on an
//! in-memory LUN, as the engine's own tests do:
//!
//! ```
//! use std::sync::Arc;
//! use thinlun::{dev::MemDevice, Pool, PoolConfig};
//! # fn main() -> thinlun::Result<()> {
//! let lun = Arc::new(MemDevice::new(64 << 20));
//! let pool = Pool::create(lun, "demo", &PoolConfig::default())?;
//! pool.create_volume("vm-100-disk-0", 16 << 20)?;
//! let vol = pool.open_volume("vm-100-disk-0")?;
//! vol.write(0, &[1u8; 4096])?;
//! pool.create_snapshot("vm-100-disk-0@before-upgrade")?;
//! vol.write(0, &[2u8; 4096])?; // copy-on-write: the snapshot keeps the 1s
//! let changed = pool.diff("vm-100-disk-0@before-upgrade", "vm-100-disk-0")?;
//! assert_eq!(changed, vec![(0, 4096)]); // (offset, length) in bytes
//! drop(vol);
//! pool.rollback("vm-100-disk-0@before-upgrade", false)?;
//!
//! // A template and linked clones of it (Proxmox: base-N-disk-M).
//! pool.make_base("vm-100-disk-0", Some("base-100-disk-0"))?;
//! pool.clone_volume("base-100-disk-0", "vm-101-disk-0")?;
//! let usage = pool.usage(); // mapped / exclusive / shared bytes per volume
//! assert!(usage.iter().any(|u| u.name == "vm-101-disk-0" && u.shared_bytes == 4096));
//! pool.remove_volume("vm-101-disk-0", false)?;
//! pool.remove_volume("base-100-disk-0", true)?; // with its snapshot
//! # Ok(()) }
//! ```
//!
//! Servers and benchmarks that keep many requests in flight use an
//! [`IoQueue`]: each request completes as soon as its own I/O does, so the
//! device never idles waiting for the slowest of a batch. Buffers are owned
//! by the queue while in flight ([`IoBuf`]) and come back with the
//! completion:
//!
//! ```no_run
//! use thinlun::{dev::AlignedBuf, IoQueue, Pool, QueueOp};
//! # fn main() -> thinlun::Result<()> {
//! let pool = Pool::open_path("pool.img".as_ref(), &Default::default())?;
//! let vol = pool.open_volume("vm-100-disk-0")?;
//! let mut q: IoQueue<AlignedBuf> = vol.queue(32)?;
//! for i in 0..32u64 {
//!     let buf = AlignedBuf::zeroed(4096);
//!     q.submit(i, QueueOp::Read { sector: i * 8, buf });
//! }
//! let mut done = Vec::new();
//! q.drain(&mut done); // or q.complete(1, &mut done) to take them as they come
//! assert!(done.iter().all(|c| c.result.is_ok()));
//! # Ok(()) }
//! ```
//!
//! # Layers
//!
//! The modules form layers; each imports only those below it (run
//! `python3 engine/tools/layers.py` for the graph):
//!
//! | layer | modules |
//! |---|---|
//! | administration | `admin/`: [`check`], [`repair`], [`salvage`], [`dump`], [`diffstream`] |
//! | the pool | `pool/`: [`Pool`], creation (`create`), volumes (`volumes`), commit, snapshots, space policy (`guard`), shared pools, the I/O path (`pool/io/`: [`Volume`], [`IoQueue`]) |
//! | opening | `load/`: superblock choice, volume trees, journal replay |
//! | mapping | `map/`: extent maps, the in-memory pool state |
//! | logs and leases | `journal`, `unflushed`, [`lease`] |
//! | allocation | `alloc/`: the space map, shared-block references |
//! | on-disk format | `format/` (pure encoding and decoding; public with the `fuzzing` feature) |
//! | devices | [`dev`]: the LUN, block and sector sizes, batched reads |

// Every public item says what it is for (CI denies warnings).
#![warn(missing_docs)]

mod admin;
mod alloc;
pub mod dev;
mod error;
// The on-disk records are the engine's own: public only to the fuzz
// targets (feature `fuzzing`), which feed the decoders hostile blocks.
#[cfg(feature = "fuzzing")]
pub mod format;
#[cfg(not(feature = "fuzzing"))]
mod format;
mod journal;
pub mod lease;
mod load;
mod map;
mod pool;
mod unflushed;
mod util;

pub use admin::{check, diffstream, dump, repair, salvage};
pub use error::{BusyKind, Error, Result};
// From the on-disk format, only what callers need: the space policy they
// read and set, the volume flags a metadata dump carries, and the magic
// that tells a pool from other data on a device.
pub use format::catalog::flags as volume_flags;
pub use format::names::is_valid_volume_name;
/// Tells a thinlun pool from other data: `b` is the start of a device (at
/// least its first 8 bytes).
pub use format::superblock::has_magic as has_pool_magic;
pub use format::superblock::Policy;
pub use format::{BLOCK_SIZE, SECTOR_SIZE};
pub use pool::io::queue::{Completion, IoBuf, IoQueue, QueueOp};
pub use pool::io::volume::{Request, Volume};
pub use pool::shared::LockStatus;
pub use pool::snapshot::Usage;
pub use pool::ThresholdEvent;
pub use pool::{
    DamagedRange, HostOptions, OpenOptions, Pool, PoolConfig, PoolStatus, SharedConfig,
    UnflushedPlace, VolumeInfo,
};
pub use util::human_bytes_with;
