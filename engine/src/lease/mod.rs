//! Leases on the LUN that let several hosts share one pool safely: a
//! delta lease per host (its slot, renewed in the background), a global
//! lock for pool-wide changes, and the fence that stops a host's writes
//! before anyone may consider it dead. Protocol, layout and timing proof:
//! docs/LOCKING.md.

mod clock;
mod global;
mod host;

pub use clock::now_ms;
pub(crate) use global::GlobalGuard;
pub(crate) use host::{FencedDevice, HostLease, JoinOptions};

use std::time::Duration;

/// Every lease interval derives from the pool's I/O timeout `T`, as in
/// sanlock: renew every 2T, stop writing at 6T without a renewal, be
/// killed by the watchdog at 7T, and be declared dead by others after
/// they watched the slot unchanged for 8T plus a margin of T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// `T`: the longest a lease read or write may take.
    pub io_timeout: Duration,
}

impl Timing {
    /// The timing of a pool whose I/O timeout is `io_timeout_ms`.
    pub fn from_ms(io_timeout_ms: u32) -> Timing {
        Timing {
            io_timeout: Duration::from_millis(io_timeout_ms as u64),
        }
    }

    fn t(&self) -> u64 {
        self.io_timeout.as_millis() as u64
    }
    /// How often a host renews its slot (2T).
    pub fn renew_ms(&self) -> u64 {
        2 * self.t()
    }
    /// How long after its last renewal a host stops writing (6T).
    pub fn fence_ms(&self) -> u64 {
        6 * self.t()
    }
    /// How long after its last renewal the watchdog kills a host (7T).
    pub fn watchdog_ms(&self) -> u64 {
        7 * self.t()
    }
    /// How long others watch a slot unchanged before they declare its
    /// host dead (8T plus a margin of T).
    pub fn dead_ms(&self) -> u64 {
        9 * self.t()
    }
    /// How long a joining host waits after writing its slot before it
    /// re-reads it to see whether another host wrote the slot too.
    pub fn join_delay_ms(&self) -> u64 {
        2 * self.t()
    }
}

/// The default I/O timeout of a new shared pool (sanlock's default).
pub const DEFAULT_IO_TIMEOUT_MS: u32 = 10_000;

/// What one host slot says, as `thinctl lock status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    /// The slot's host id.
    pub host_id: u32,
    /// Host name of the process that holds or last held the slot.
    pub name: String,
    /// Incarnation: grows by one each time a process takes the slot.
    pub generation: u64,
    /// The slot's renewal counter (it grows every renewal while alive).
    pub renewal: u64,
    /// "live", "free", "dead" (unchanged past the dead time, as this host
    /// watched it) or "unknown" (not watched long enough to tell).
    pub state: &'static str,
    /// Milliseconds since this host last saw the slot change.
    pub unchanged_ms: Option<u64>,
    /// Milliseconds this process has watched the slot stay unchanged
    /// (the part of `unchanged_ms` that counts toward the dead time).
    pub watched_ms: Option<u64>,
    /// For a silent host: milliseconds until this process declares it
    /// dead, if its slot stays unchanged.
    pub dead_in_ms: Option<u64>,
    /// The slot is this process's own.
    pub is_self: bool,
}

/// How a silent holder looks to the host that waits for it
/// (`HostLease::watch_of`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostWatch {
    /// Milliseconds since the slot was last seen to change.
    pub unchanged_ms: u64,
    /// How long this process itself has seen the slot unchanged.
    pub watched_ms: u64,
    /// The slot changed while this process watched: its host renews.
    pub changed_while_watched: bool,
    /// Milliseconds until the host counts as dead if nothing changes.
    pub dead_in_ms: u64,
    /// The host left the pool (its slot is free).
    pub free: bool,
}
