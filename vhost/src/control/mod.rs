//! Many volumes of one pool served from one process, changed at run time
//! through a control socket.
//!
//! The process that holds a pool for writing (its `flock`) is the only one
//! that may change it, so whatever has to happen to the pool while volumes
//! are served (a snapshot, serving another volume, stopping one) is asked
//! of that process on a Unix socket, by default `<pool path>.ctl`.
//!
//! The protocol is one request line per connection and one reply line:
//!
//! | request | reply |
//! |---|---|
//! | `snapshot VOL@SNAP` | `ok VOL@SNAP mapped_bytes=N` |
//! | `grow` | `ok size_bytes=N` |
//! | `add VOL SOCKET [QUEUES [incoming]]` | `ok serving VOL on SOCKET (N queues[, read-only])` |
//! | `add-nbd VOL SOCKET` (export over NBD; one NBD socket per daemon) | `ok exporting VOL over NBD on SOCKET[ (read-only)]` |
//! | `remove VOL` (stop serving or exporting it) | `ok stopped VOL: N connections, R requests (S streamed, B batches), E errors` |
//! | `list` | `ok N [VOL=SOCKET]...` |
//! | `status` | `ok key=value ...` (pool figures, `served=N`) |
//! | `create VOL BYTES [force]` | `ok VOL size_bytes=N` |
//! | `resize VOL BYTES [force]` | `ok VOL old_size_bytes=N size_bytes=N` |
//! | `delete VOL[@SNAP] [recursive]` (from the pool) | `ok NAME snapshot` or `ok NAME volume [VOL@SNAP]...` (the snapshots removed with it) |
//! | `rename OLD NEW` | `ok OLD NEW` |
//! | `rollback VOL@SNAP [force]` | `ok VOL@SNAP [VOL@SNAP]...` (the newer snapshots removed) |
//! | `clone SRC NEW` | `ok NEW size_bytes=N mapped_bytes=N` |
//! | `base VOL [NEW]` | `ok NAME` (its name now) |
//! | `policy [KEY=VALUE]...` | `ok KEY=VALUE ...` (the whole policy now; see [`PolicyChange`]) |
//!
//! `create` to `policy` are the pool changes `thinctl` makes itself when
//! it can open the pool; the daemon runs the same engine calls on the pool
//! it holds. A served volume cannot be deleted, rolled back or made a base
//! (the engine refuses volumes with open handles); renaming one keeps it
//! served under its new name.
//!
//! Any failure is `error <text>`. Lines are at most [`MAX_LINE`] bytes of
//! UTF-8; words are separated by blanks (so socket paths cannot hold
//! blanks). Volume names are checked to be words of `A-Za-z0-9._-` (and one
//! `@` where a snapshot is meant) before anything runs. Bad input of any
//! kind gets an error line, never a crash.
//!
//! The code is in two parts: `protocol.rs` holds the grammar above, its
//! parser and the client side ([`request`]); `daemon.rs` holds the
//! [`Daemon`], which serves the volumes and answers the socket.

mod daemon;
mod protocol;

pub use daemon::{Daemon, Stopped};
pub use protocol::{default_control_path, parse_request, request, PolicyChange, Request, MAX_LINE};
