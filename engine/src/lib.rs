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

pub mod check;
pub mod dev;
pub mod diffstream;
mod error;
mod extmap;
pub mod format;
pub mod guard;
mod journal;
mod load;
mod names;
mod pool;
mod refs;
mod snapshot;
mod space;
mod state;
mod util;
mod volume;

pub use error::{Error, Result};
pub use format::{BLOCK_SIZE, SECTOR_SIZE};
pub use names::is_valid_volume_name;
pub use pool::{OpenOptions, Pool, PoolConfig, PoolStatus, VolumeInfo};
pub use snapshot::Usage;
pub use volume::{Request, Volume};
