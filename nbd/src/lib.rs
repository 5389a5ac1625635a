//! An NBD server for thinlun volumes on Unix sockets: the export that
//! QEMU's block layer (`-blockdev driver=nbd`), qemu-img, libnbd's tools
//! and the kernel's NBD client attach to. It knows the engine's public API
//! and nothing of virtio. See docs/NBD.md.

mod buf;
mod commands;
pub mod exports;
pub mod handshake;
mod input;
mod output;
pub mod proto;
mod reply;
pub mod server;
pub mod session;

pub use exports::Export;
pub use server::NbdServer;
