//! Many volumes of one pool served from one process, changed at run time
//! through a control socket.
//!
//! The process that holds a pool for writing (its `flock`) is the only one
//! that may change it, so whatever has to happen to the pool while volumes
//! are served (a snapshot, serving another volume, stopping one) is asked
//! of that process on a Unix socket, by default `<pool path>.ctl`.
//!
//! The protocol is one request per connection and one reply, each a JSON
//! object on one line ([`Request`], [`Reply`]). A request names its `op`;
//! a reply is `{"ok": {"kind": ..., ...}}` ([`Answer`]) or
//! `{"error": "text"}`:
//!
//! | request | `kind` of the answer |
//! |---|---|
//! | `{"op":"snapshot","name":"VOL@SNAP"}` | `snapshot_created` (`name`, `mapped_bytes`) |
//! | `{"op":"grow"}` | `grown` (`size_bytes`) |
//! | `{"op":"add","name":VOL,"socket":PATH[,"queues":N][,"incoming":true]}` | `serving` (`message`) |
//! | `{"op":"add-nbd","name":VOL,"socket":PATH}` (one NBD socket per daemon) | `serving` (`message`) |
//! | `{"op":"remove","name":VOL[,"socket":PATH]}` (stop serving it) | `stopped` (`summaries`) |
//! | `{"op":"list"}` | `served` (`volumes`: `name`, `socket`, `transport`) |
//! | `{"op":"status"}` | `status` (the pool's figures, `served`) |
//! | `{"op":"create","name":VOL,"bytes":N[,"force":true]}` | `created` (`name`, `size_bytes`) |
//! | `{"op":"resize","name":VOL,"bytes":N[,"force":true]}` | `resized` (`name`, `old_size_bytes`, `size_bytes`) |
//! | `{"op":"delete","name":NAME[,"recursive":true]}` | `deleted` (`name`, `snapshot`, `snapshots` removed with it) |
//! | `{"op":"rename","old":OLD,"new":NEW}` | `renamed` |
//! | `{"op":"rollback","snapshot":"VOL@SNAP"[,"force":true]}` | `rolled_back` (`snapshot`, `removed`: the newer snapshots) |
//! | `{"op":"clone","source":SRC,"new":NEW}` | `cloned` (`name`, `size_bytes`, `mapped_bytes`) |
//! | `{"op":"base","name":VOL[,"new_name":NEW]}` | `based` (`name`: its name now) |
//! | `{"op":"policy","change":{KEY:VALUE,...}}` | `policy` (the whole policy now; see [`PolicyChange`]) |
//!
//! `create` to `policy` are the pool changes `thinctl` makes itself when
//! it can open the pool; the daemon runs the same engine calls on the pool
//! it holds. A served volume cannot be deleted, rolled back or made a base
//! (the engine refuses volumes with open handles); renaming one keeps it
//! served under its new name.
//!
//! Requests are at most [`MAX_LINE`] bytes of UTF-8, and unknown fields
//! are refused. Volume names are checked to be `A-Za-z0-9._-` (and one `@`
//! where a snapshot is meant), and socket paths to be absolute, before
//! anything runs. Bad input of any kind gets an error reply, never a crash.
//!
//! The code is in two parts: `protocol.rs` holds the types above, their
//! checks and the client side ([`request`]); `daemon.rs` holds the
//! [`Daemon`], which serves the volumes and answers the socket.

mod daemon;
mod protocol;

pub use daemon::{Daemon, Stopped};
pub use protocol::{
    default_control_path, parse_request, request, Answer, PolicyChange, PoolFigures, Reply,
    Request, ServedVolume, MAX_LINE,
};
