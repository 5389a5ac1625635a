//! vhost-user-blk server for thinlun volumes.
//!
//! The server is a thin layer over the engine's public API; the virtio
//! request handling lands here. Until then the crate only names the
//! virtio-blk block size it will advertise, derived from the engine.

/// Logical block size the server advertises to guests (virtio-blk `BLK_SIZE`).
pub const DEFAULT_GUEST_BLOCK_SIZE: u32 = thinlun::SECTOR_SIZE as u32;
