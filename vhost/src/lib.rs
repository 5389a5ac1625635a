//! vhost-user-blk server for thinlun volumes.
//!
//! QEMU (or any vhost-user front end) attaches to a Unix socket and the
//! server answers virtio-blk requests from a [`thinlun::Volume`]:
//!
//! - [`request`]: parsing a descriptor chain into a request (pure);
//! - [`config`]: the virtio-blk configuration space and feature bits;
//! - [`guest`]: guest memory access and translation to host slices;
//! - `guest_fault`: refusing memory tables a front end does not back, and
//!   containing SIGBUS when it truncates them later;
//! - [`backend`]: the vhost-user backend and the per-queue data path;
//! - `batch`: the requests that do not stream, run as one engine batch;
//! - [`server`]: the accept / serve / re-listen loop;
//! - [`control`]: serving many volumes of one pool, changed at run time
//!   through a control socket (snapshots too): the socket's protocol
//!   (grammar, parsing, client) and the daemon that answers it;
//! - [`signals`]: stopping on SIGTERM/SIGINT.
//!
//! ```no_run
//! use std::sync::Arc;
//! use thinlun::{OpenOptions, Pool};
//! use thinlun_vhost::{Server, ServeOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::open_path("pool.img".as_ref(), &OpenOptions::default())?;
//! let vol = Arc::new(pool.open_volume("vm-100-disk-0")?);
//! let opts = ServeOptions::new("/run/vm-100.sock".as_ref(), "vm-100-disk-0");
//! let mut server = Server::new(vol.clone(), &opts)?;
//! server.run()?; // until server.stop_handle().stop() is called
//! # Ok(()) }
//! ```

pub mod activation;
pub mod backend;
mod batch;
pub mod config;
pub mod control;
mod flow;
pub mod guest;
mod guest_fault;
mod loglimit;
pub mod request;
pub mod server;
pub mod signals;

pub use activation::{Activation, WriterSlot};
pub use backend::{Durability, StatsSnapshot};
pub use config::BlkConfig;
pub use control::{default_control_path, Daemon};
pub use server::{default_serial, ServeOptions, Server, StopHandle};

/// Logical block size the server advertises to guests by default.
pub const DEFAULT_GUEST_BLOCK_SIZE: u32 = thinlun::SECTOR_SIZE as u32;
